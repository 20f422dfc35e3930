#!/usr/bin/env python3
"""Seed workload benchmark (figures, not a test): the Python client over loopback next to
local numpy (OpenBLAS, 2 threads) and the scikit-learn loop, in one run, interleaved round by
round so machine load hits all variants alike; prints medians and ratios vs numpy.

    python client/python/benchmarks/bench_seed.py --server build/release/server/simserve
    python client/python/benchmarks/bench_seed.py --target localhost:50051 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time

import numpy as np
from sklearn.metrics.pairwise import cosine_similarity
from threadpoolctl import threadpool_limits

import simserve

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def numpy_cosine(a, b):
    an = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-30)
    bn = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-30)
    return an @ bn.transpose(0, 2, 1)


def sklearn_loop(a, b):
    return np.stack([cosine_similarity(x, y) for x, y in zip(a, b)])


def run(target: str, args) -> None:
    rng = np.random.default_rng(0)
    a = rng.random((args.batch, 400, 200), dtype=np.float32)
    b = rng.random((args.batch, 500, 200), dtype=np.float32)
    client = simserve.Client(target, timeout=120)
    client_4m = simserve.Client(target, timeout=120, upload_piece_bytes=4 << 20)
    info = client.info()
    out = np.empty((args.batch, 400, 500), np.float32)
    variants = {
        "service fp32 (auto)": lambda: client.similarity(a, b),
        "service fp32 (auto, out=)": lambda: client.similarity(a, b, out=out),
        "service fp32 (out=, 4 MiB pieces)": lambda: client_4m.similarity(a, b, out=out),
        "service bf16 output": lambda: client.similarity(a, b, output_dtype="bfloat16"),
        "service bf16 precision+output": lambda: client.similarity(
            a, b, precision="bf16", output_dtype="bfloat16"),
        "local numpy (2 threads)": lambda: numpy_cosine(a, b),
        "sklearn loop": lambda: sklearn_loop(a, b),
    }
    times = {k: [] for k in variants}
    server = {k: [] for k in variants}
    with threadpool_limits(limits=args.threads):
        for fn in variants.values():  # warm-up: connections, primitives, page cache
            fn()
        for _ in range(args.repeat):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t0) * 1e3)
                if name.startswith("service"):
                    t = (client_4m if "4 MiB" in name else client).last_timings
                    server[name].append((t.mode, t.total_ms or 0.0, t.compute_ms or 0.0))
    base = statistics.median(times["local numpy (2 threads)"])
    load = os.getloadavg()[0]
    print(f"seed workload A {a.shape}, B {b.shape}; server {info.version} "
          f"({info.cpu_isa}, {info.compute_workers}x{info.threads_per_worker} threads); "
          f"{args.repeat} rounds; load avg {load:.1f} on {os.cpu_count()} cores")
    print(f"{'variant':34s} {'median ms':>10s} {'vs numpy':>9s} {'mode':>7s} "
          f"{'srv total':>10s} {'srv compute':>12s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        mode, srv_total, srv_comp = ("", "", "")
        if server[name]:
            mode = server[name][-1][0]
            srv_total = f"{statistics.median(s[1] for s in server[name]):.1f}"
            srv_comp = f"{statistics.median(s[2] for s in server[name]):.1f}"
        print(f"{name:34s} {med:10.1f} {med / base:8.2f}x {mode:>7s} {srv_total:>10s} "
              f"{srv_comp:>12s}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(3):
            client.similarity(a, b)
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
        print(s.getvalue())
    client.close()
    client_4m.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--target", help="a running server, host:port")
    g.add_argument("--server", help="simserve binary to start on a free loopback port")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2, help="BLAS threads for numpy/sklearn")
    ap.add_argument("--profile", action="store_true", help="cProfile 3 client calls")
    args = ap.parse_args()
    if args.target:
        run(args.target, args)
        return
    sys.path.insert(0, os.path.join(ROOT, "tests", "interop"))
    from serverctl import Server
    with Server(args.server, ["--metrics_listen="]) as srv:
        run(srv.address, args)


if __name__ == "__main__":
    main()
