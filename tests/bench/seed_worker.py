#!/usr/bin/env python3
"""One contender of data_path.py's Python seed comparison, in its own process.

    seed_worker.py numpy  A.npy B.npy          local numpy: normalise rows, batched matmul
    seed_worker.py client A.npy B.npy TARGET   simserve.Client(TARGET).similarity(A, B)

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


def main():
    kind, a_path, b_path = sys.argv[1:4]
    a, b = np.load(a_path), np.load(b_path)
    if kind == "numpy":
        compute, origin = (lambda: numpy_cosine(a, b)), np.__file__
    else:
        import simserve  # pylint: disable=import-outside-toplevel
        client = simserve.Client(sys.argv[4], timeout=120)
        compute, origin = (lambda: client.similarity(a, b)), simserve.__file__
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
