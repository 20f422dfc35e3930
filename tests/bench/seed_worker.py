#!/usr/bin/env python3
"""One contender of data_path.py's and shared_memory.py's comparisons, in its own process.

    seed_worker.py numpy        A.npy B.npy          local numpy: unit rows, batched matmul
    seed_worker.py client       A.npy B.npy TARGET   simserve.Client(TARGET).similarity(A, B)
    seed_worker.py client-unary A.npy B.npy TARGET   the same with mode="unary"
    seed_worker.py client-shm   A.npy B.npy TARGET   the same with shared_memory=True
    seed_worker.py triton       A.npy B.npy TARGET   tritonclient.grpc ModelInfer "cosine",
                                                     inputs and S in the messages
    seed_worker.py triton-shm   A.npy B.npy TARGET   the same with A, B and S in system
                                                     shared-memory regions (registered once;
                                                     A and B copied in per call, S read in
                                                     place, as tritonclient's examples do)

Prints "ready <where simserve or numpy was imported from>", then answers each stdin line:
"run" computes once and prints the wall time in ms; "save PATH" computes once and writes the
result to PATH (.npy), printing "saved". EOF ends. Thread counts come from the environment
(OPENBLAS_NUM_THREADS etc., set by data_path.py before numpy is imported).
"""
import sys
import time

import numpy as np


def numpy_cosine(a, b):
    """Cosine similarity the plain-numpy way: unit rows, then one batched float32 matmul."""
    an = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), np.float32(1e-30))
    bn = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), np.float32(1e-30))
    return an @ bn.transpose(0, 2, 1)


def triton_contender(kind, a, b, target):
    """(compute, origin) for the tritonclient kinds; regions are removed at exit."""
    import atexit  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel

    import tritonclient.grpc as grpcclient  # pylint: disable=import-outside-toplevel
    from tritonclient.utils import shared_memory as shm  # pylint: disable=import-outside-toplevel

    client = grpcclient.InferenceServerClient(target)
    out_shape = [a.shape[0], a.shape[1], b.shape[1]]
    out_bytes = int(np.prod(out_shape)) * 4

    def inputs():
        ia = grpcclient.InferInput("A", list(a.shape), "FP32")
        ib = grpcclient.InferInput("B", list(b.shape), "FP32")
        return ia, ib

    if kind == "triton":
        def compute():
            ia, ib = inputs()
            ia.set_data_from_numpy(a)
            ib.set_data_from_numpy(b)
            return client.infer("cosine", [ia, ib]).as_numpy("S")
        return compute, grpcclient.__file__

    tag = f"seedbench{os.getpid()}"
    regions = {"in": a.nbytes + b.nbytes, "out": out_bytes}
    handles = {}
    for role, size in regions.items():
        handles[role] = shm.create_shared_memory_region(f"{tag}-{role}", f"/{tag}-{role}", size)
        client.register_system_shared_memory(f"{tag}-{role}", f"/{tag}-{role}", size)

    def cleanup():
        for role, handle in handles.items():
            client.unregister_system_shared_memory(f"{tag}-{role}")
            shm.destroy_shared_memory_region(handle)
    atexit.register(cleanup)

    def compute():
        shm.set_shared_memory_region(handles["in"], [a, b])
        ia, ib = inputs()
        ia.set_shared_memory(f"{tag}-in", a.nbytes, 0)
        ib.set_shared_memory(f"{tag}-in", b.nbytes, a.nbytes)
        out = grpcclient.InferRequestedOutput("S")
        out.set_shared_memory(f"{tag}-out", out_bytes)
        client.infer("cosine", [ia, ib], outputs=[out])
        return shm.get_contents_as_numpy(handles["out"], np.float32, out_shape)
    return compute, grpcclient.__file__


def main():
    kind, a_path, b_path = sys.argv[1:4]
    a, b = np.load(a_path), np.load(b_path)
    if kind == "numpy":
        compute, origin = (lambda: numpy_cosine(a, b)), np.__file__
    elif kind.startswith("triton"):
        compute, origin = triton_contender(kind, a, b, sys.argv[4])
    else:
        import simserve  # pylint: disable=import-outside-toplevel
        client = simserve.Client(sys.argv[4], timeout=120)
        kwargs = {"client": {}, "client-unary": {"mode": "unary"},
                  "client-shm": {"shared_memory": True}}[kind]
        compute, origin = (lambda: client.similarity(a, b, **kwargs)), simserve.__file__
    print("ready", origin, flush=True)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        t0 = time.perf_counter()
        result = compute()
        ms = (time.perf_counter() - t0) * 1e3
        if command == "save":
            np.save(arg, result)
            print("saved", flush=True)
        else:
            print(f"{ms:.3f}", flush=True)


if __name__ == "__main__":
    main()
