#!/usr/bin/env python3
"""The seed question, answered by the service: cosine similarity of two 3D tensors.

    A (100, 400, 200), B (100, 500, 200) random  ->  S (100, 400, 500)
    S[k, i, j] = cos(A[k, i], B[k, j])

The service's answer is compared with scikit-learn's cosine_similarity looped over the batch
(np.allclose), and the time of the service call is printed next to local numpy (normalise +
batched matmul) and the scikit-learn loop.

Usage: start a server (build/release/server/simserve), then
    python examples/seed_cosine.py --target localhost:50051
"""

import argparse
import statistics
import time

import numpy as np
from sklearn.metrics.pairwise import cosine_similarity

import simserve


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Local baseline: normalise rows, then one batched matmul (float32)."""
    an = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-30)
    bn = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-30)
    return an @ bn.transpose(0, 2, 1)


def sklearn_loop(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The seed's reference answer: sklearn's cosine_similarity per batch entry."""
    return np.stack([cosine_similarity(x, y) for x, y in zip(a, b)])


def timed(fn, repeat: int):
    """(result of the last run, median milliseconds over `repeat` runs)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return out, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="localhost:50051", help="simserve host:port")
    ap.add_argument("--batch", type=int, default=100, help="batch size (seed: 100)")
    ap.add_argument("--repeat", type=int, default=5, help="runs per timing (median)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    a = rng.random((args.batch, 400, 200), dtype=np.float32)
    b = rng.random((args.batch, 500, 200), dtype=np.float32)

    with simserve.Client(args.target, timeout=120) as client:
        info = client.info()
        client.similarity(a[:1], b[:1])  # connect + warm the shape's primitives
        s, service_ms = timed(lambda: client.similarity(a, b), args.repeat)
        timings = client.last_timings
    expected, sklearn_ms = timed(lambda: sklearn_loop(a, b), args.repeat)
    _, numpy_ms = timed(lambda: numpy_cosine(a, b), args.repeat)

    print(f"server: simserve {info.version}, oneDNN {info.onednn_version}, ISA {info.cpu_isa}")
    print(f"A {a.shape}, B {b.shape} -> S {s.shape} {s.dtype}")
    print(f"np.allclose(S, sklearn) = {np.allclose(s, expected, atol=1e-5)}")
    print(f"max |S - sklearn| = {np.abs(s - expected).max():.2e}")
    print(f"service call ({timings.mode}): {service_ms:8.1f} ms  (server total "
          f"{timings.total_ms} ms, compute {timings.compute_ms} ms)")
    print(f"local numpy normalise+matmul:  {numpy_ms:8.1f} ms")
    print(f"sklearn cosine_similarity loop:{sklearn_ms:8.1f} ms")


if __name__ == "__main__":
    main()
