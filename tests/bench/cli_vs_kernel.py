#!/usr/bin/env python3
"""Benchmark (not a test): the seed workload (A 100x400x200, B 100x500x200, cosine) computed
(1) in-process by the kernel (kernels/similarity_benchmark, Google Benchmark, output buffer
reused) and (2) by `simserve-cli` against a local `simserve` over loopback, with float32 and
bfloat16 output. Prints medians of several runs and the ratio CLI / in-process.

Usage: cli_vs_kernel.py --build build/release [--runs 5]
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import tempfile
import time

import numpy as np


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kernel_medians(build, runs, threads):
    """Median real time (ms) of the kernel benchmarks for fp32 and bf16 output."""
    env = dict(os.environ, SIMSERVE_BENCH_THREADS=str(threads))
    proc = subprocess.run(
        [os.path.join(build, "kernels", "similarity_benchmark"),
         "--benchmark_filter=^BM_Seed_Cosine_Fp32(_Bf16Out)?(/|$)",
         f"--benchmark_repetitions={runs}", "--benchmark_report_aggregates_only=true",
         "--benchmark_format=json"],
        capture_output=True, text=True, check=True, env=env, timeout=600)
    out = {}
    for bench in json.loads(proc.stdout)["benchmarks"]:
        if bench.get("aggregate_name") == "median":
            unit = {"ms": 1.0, "us": 1e-3, "ns": 1e-6}[bench["time_unit"]]
            key = "bfloat16" if "Bf16Out" in bench["run_name"] else "float32"
            out[key] = bench["real_time"] * unit
    return out


def run_cli(cli, target, a, b, out, dtype, mode, repeat=1):
    flags = [cli, f"--target={target}", f"--a={a}", f"--b={b}", f"--output_dtype={dtype}",
             f"--mode={mode}", f"--repeat={repeat}", "--timeout_ms=120000"]
    if out:
        flags.append(f"--out={out}")
    start = time.perf_counter()
    proc = subprocess.run(flags, capture_output=True, text=True, timeout=600)
    process_ms = (time.perf_counter() - start) * 1e3
    if proc.returncode != 0:
        raise RuntimeError(f"simserve-cli failed: {proc.stderr}")
    walls = [float(x) for x in re.findall(r"client wall ([\d.]+) ms", proc.stdout)]
    server = re.search(r"server queue ([\d.na/]+)(?: ms)?, compute ([\d.na/]+)(?: ms)?, "
                       r"total ([\d.na/]+)", proc.stdout)
    return {"process_ms": process_ms, "walls": walls, "stdout": proc.stdout,
            "server": server.groups() if server else None}


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build/release")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2,
                        help="OpenMP threads for the kernel and the server (one worker)")
    args = parser.parse_args()
    cli = os.path.join(args.build, "client", "simserve-cli")
    server_bin = os.path.join(args.build, "server", "simserve")

    print(f"seed workload: A 100x400x200, B 100x500x200 float32, cosine, "
          f"{args.runs} runs each, {args.threads} threads, {os.cpu_count()} cores on host")
    kernel = kernel_medians(args.build, args.runs, args.threads)

    with tempfile.TemporaryDirectory(prefix="simserve_bench_") as tmp:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((100, 400, 200), dtype=np.float32)
        b = rng.standard_normal((100, 500, 200), dtype=np.float32)
        fa, fb = os.path.join(tmp, "a.npy"), os.path.join(tmp, "b.npy")
        np.save(fa, a)
        np.save(fb, b)
        port = free_port()
        target = f"127.0.0.1:{port}"
        log = open(os.path.join(tmp, "server.log"), "w")  # closed with the directory
        # 128 MiB receive limit so that the one-message ComputeStream path can be compared too.
        server = subprocess.Popen(
            [server_bin, f"--listen={target}", "--metrics_listen=", "--workers=1",
             f"--threads_per_worker={args.threads}",
             "--max_receive_message_bytes=134217728"], stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:
                probe = subprocess.run([cli, f"--target={target}", "--info",
                                        "--connect_timeout_ms=500"], capture_output=True)
                if probe.returncode == 0:
                    break
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start")
                time.sleep(0.2)

            # Correctness spot check of one batch entry against numpy.
            out = os.path.join(tmp, "s.npy")
            run_cli(cli, target, fa, fb, out, "float32", "auto")
            s = np.load(out, mmap_mode="r")
            a0 = a[7] / np.linalg.norm(a[7], axis=1, keepdims=True)
            b0 = b[7] / np.linalg.norm(b[7], axis=1, keepdims=True)
            err = float(np.abs(s[7] - a0 @ b0.T).max())
            print(f"check: max |cli - numpy| on batch 7 = {err:.2e}")

            rows = []
            for dtype in ("float32", "bfloat16"):
                for mode in ("auto", "stream"):
                    procs = [run_cli(cli, target, fa, fb, out, dtype, mode)
                             for _ in range(args.runs)]
                    warm = run_cli(cli, target, fa, fb, None, dtype, mode, repeat=args.runs)
                    rows.append((dtype, mode,
                                 statistics.median(p["process_ms"] for p in procs),
                                 statistics.median(p["walls"][-1] for p in procs),
                                 statistics.median(warm["walls"][:-1]),
                                 procs[-1]["server"], procs[-1]["stdout"]))
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    print(f"\nin-process kernel (similarity_benchmark, median): float32 out "
          f"{kernel['float32']:.1f} ms, bfloat16 out {kernel['bfloat16']:.1f} ms")
    print(f"{'output':9} {'mode':7} {'cli process':>12} {'cli call':>9} {'warm call':>10} "
          f"{'server q/compute/total ms':>27}  ratio call/kernel  ratio process/kernel")
    for dtype, mode, process_ms, call_ms, warm_ms, server, stdout in rows:
        k = kernel[dtype]
        srv = "/".join(server) if server else "n/a"
        used = re.search(r"via (\w+)", stdout).group(1)
        print(f"{dtype:9} {mode + '=' + used if mode == 'auto' else mode:7} "
              f"{process_ms:10.1f}ms {call_ms:7.1f}ms {warm_ms:8.1f}ms {srv:>27}  "
              f"{call_ms / k:10.2f}x {process_ms / k:18.2f}x")
    print("\ncli process = whole simserve-cli run (start, connect, read 72 MB .npy, call, "
          "write 80 MB .npy);\ncli call = the RPC as timed by the client (first call of the "
          "process); warm call = median\nof --repeat calls on one connection; ratios vs the "
          "in-process kernel median above.")


if __name__ == "__main__":
    main()
