#!/usr/bin/env python3
"""Seed workload (A 100x400x200, B 100x500x200, cosine): simserve's kernel vs numpy+OpenBLAS.

Runs, in one command and interleaved round by round so machine noise hits both alike:
  * the kernel's Google Benchmark (fp32 and bf16 precision, float32 output),
  * numpy (pip wheel, OpenBLAS, OPENBLAS_NUM_THREADS=threads): normalise rows, then matmul.
Prints medians, GFLOP/s, share of the fp32 peak, and the ratios the issue asks for.

Usage: kernels/bench_vs_numpy.py [--benchmark BIN] [--rounds 3] [--threads 2]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap

FLOPS = 2 * 100 * 400 * 500 * 200
PEAK_GFLOPS_2_CORES = 512.0  # 2 cores x 2 AVX-512 FMA units x 16 lanes x 2 flops x ~4 GHz

NUMPY_SNIPPET = textwrap.dedent("""
    import json, time, numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((100, 400, 200), dtype=np.float32)
    b = rng.standard_normal((100, 500, 200), dtype=np.float32)
    def run():
        an = a / np.maximum(np.linalg.norm(a, axis=2, keepdims=True), 1e-30)
        bn = b / np.maximum(np.linalg.norm(b, axis=2, keepdims=True), 1e-30)
        return np.matmul(an, bn.transpose(0, 2, 1))
    run()
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
    print(json.dumps(times))
""")


def run_kernel(binary, threads, reps):
    out = subprocess.run(
        [binary, "--benchmark_filter=^BM_Seed_Cosine_(Fp32|Bf16)/",
         f"--benchmark_repetitions={reps}", "--benchmark_format=json",
         "--benchmark_min_time=0.2"],
        env={**os.environ, "SIMSERVE_BENCH_THREADS": str(threads)},
        check=True, capture_output=True, text=True).stdout
    times = {"fp32": [], "bf16": []}
    impl = {}
    for bench in json.loads(out)["benchmarks"]:
        if bench.get("run_type") != "iteration":
            continue
        key = "fp32" if "Fp32" in bench["name"] else "bf16"
        times[key].append(bench["real_time"] / 1e3)  # ms -> s
        impl[key] = bench.get("label", "")
    return times, impl


def run_numpy(threads, reps):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", NUMPY_SNIPPET.replace("REPS", str(reps))],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--benchmark",
                        default=os.path.join(root, "build/release/kernels/similarity_benchmark"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    kernel = {"fp32": [], "bf16": []}
    numpy_times = []
    impl = {}
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        times, impl = run_kernel(args.benchmark, args.threads, args.reps)
        for key in kernel:
            kernel[key] += times[key]
        numpy_times += run_numpy(args.threads, args.reps)

    med = {k: statistics.median(v) for k, v in kernel.items()}
    med_np = statistics.median(numpy_times)
    print(f"seed workload 100x400x500x200 cosine, {FLOPS / 1e9:.0f} GFLOP, {args.threads} threads, "
          f"medians of {args.rounds * args.reps} runs each")
    print(f"{'variant':34s} {'median ms':>10s} {'GFLOP/s':>9s} {'% fp32 peak':>11s}")
    rows = [("numpy+OpenBLAS (normalise, matmul)", med_np),
            (f"simserve fp32 [{impl.get('fp32', '?')}]", med["fp32"]),
            (f"simserve bf16 [{impl.get('bf16', '?')}]", med["bf16"])]
    for name, t in rows:
        gflops = FLOPS / t / 1e9
        print(f"{name:34s} {t * 1e3:10.1f} {gflops:9.0f} {100 * gflops / PEAK_GFLOPS_2_CORES:10.0f}%")
    print(f"speed-up fp32 vs numpy: {med_np / med['fp32']:.2f}x (target >= 2.5x)")
    print(f"speed-up bf16 vs fp32:  {med['fp32'] / med['bf16']:.2f}x (target >= 1.8x)")


if __name__ == "__main__":
    main()
