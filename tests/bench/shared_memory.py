#!/usr/bin/env python3
"""The shared-memory benchmark of issue 12: in one run, interleaved round by round, each
contender in its own process.

Section "seed" (A 100x400x200, B 100x500x200 float32, cosine):
  kernel       similarity_benchmark BM_Seed_Cosine_Fp32 (in-process kernel, 2 threads)
  numpy        local numpy: unit rows, then a float32 batched matmul (2 BLAS threads)
  simserve shm simserve.Client.similarity(A, B, shared_memory=True)
  simserve shm in place  the same with A and B built in client.shared_array() (no copy)
  triton shm   tritonclient.grpc ModelInfer "cosine" with A, B and S in system shared memory
Section "bytes" (a quarter seed, 25x400x500x200, within the default 64 MiB receive limit):
  triton       tritonclient.grpc ModelInfer "cosine", tensors in the messages
  simserve     simserve.Client.similarity(A, B): auto mode (ComputeUpload at this size)
  simserve unary  the same with mode="unary": one message each way, like ModelInfer

Every figure is a median over the rounds of each round's median of --calls-per-turn calls
(like the kernel's repetitions: the first call after another contender ran is slower): the
call's wall (timed in the worker), and the CPU per call the server and the worker spent (/proc;
the server's counted until it stops rising; 10 ms ticks, so only their medians mean much).
Ratios are to the same round's kernel / numpy medians. One server, started with
--allow_shared_memory and otherwise defaults.

    .venv/bin/python tests/bench/shared_memory.py --build build/release [--rounds 9]
        [--triton-python .venv-kserve/bin/python] [--smoke]

--smoke runs tiny shapes for one round and only checks every contender's result against a
float64 reference (CTest bench_shared_memory_smoke). Exit 1 when a result check fails.
"""
import argparse
import os
import statistics
import sys
import tempfile
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
# pylint: disable=wrong-import-position
from data_path import (SEED_SHAPE, SMOKE_SHAPE, TOLERANCE, Server, Side, Worker,  # noqa: E402
                       interleaved, kernel_times, loadlib, max_error, progress, seed_inputs,
                       settled_cpu_ms, wait_for_quiet)

QUARTER_SHAPE = (25, 400, 500, 200)
SEED_CONTENDERS = (("kernel", None), ("numpy", "numpy"), ("simserve shm", "client-shm"),
                   ("simserve shm in place", "client-shm-inplace"), ("triton shm", "triton-shm"))
BYTES_CONTENDERS = (("triton", "triton"), ("simserve", "client"),
                    ("simserve unary", "client-unary"))
TRITON_KINDS = ("triton", "triton-shm")
TARGET_KERNEL_RATIO = 1.3


class Bench:
    """Starts the workers of one section, checks their results, runs the rounds."""

    def __init__(self, args, side, server, tmp):
        self.args, self.side, self.server, self.tmp = args, side, server, tmp
        self.samples = defaultdict(list)  # (section, contender, what) -> values
        self.failures = []

    def workers(self, contenders, paths):
        workers = {}
        for name, kind in contenders:
            if kind is None:
                continue
            python = self.args.triton_python if kind in TRITON_KINDS else None
            target = None if kind == "numpy" else self.server.target
            workers[name] = Worker(kind, paths, target, python=python)
            progress(f"{name}: {workers[name].origin}")
        return workers

    def check(self, workers, reference):
        for name, worker in workers.items():
            out = os.path.join(self.tmp, f"check-{name.replace(' ', '-')}.npy")
            worker.save(out)
            err = max_error(out, reference)
            progress(f"{name}: max |S - float64 reference| {err:.1e}")
            if err > TOLERANCE:
                self.failures.append(f"{name}: max error {err:.2e} > {TOLERANCE}")

    def section(self, section, contenders, shape):
        paths, reference = seed_inputs(self.tmp, shape, tag=section)
        workers = self.workers(contenders, paths)
        try:
            self.check(workers, reference)
            if self.args.smoke:
                return
            names = [name for name, _ in contenders]
            for r in range(self.args.rounds):
                wait_for_quiet(self.args.quiet_wait, section)
                for name in interleaved(names, r):
                    self.sample(section, name, workers.get(name))
                progress(f"{section} round {r + 1}: " + ", ".join(
                    f"{name} {self.samples[section, name, 'wall'][-1]:.1f} ms" for name in names))
        finally:
            for worker in workers.values():
                worker.close()

    def sample(self, section, name, worker):
        if worker is None:  # the kernel: the median of its repetitions in this round
            self.samples[section, name, "wall"].append(
                statistics.median(kernel_times(self.side, self.args.kernel_reps)))
            return
        calls = self.args.calls_per_turn
        server0 = settled_cpu_ms(self.server.pid)
        client0 = loadlib.cpu_seconds(worker.proc.pid) * 1e3
        walls = [worker.run() for _ in range(calls)]
        self.samples[section, name, "wall"].append(statistics.median(walls))
        self.samples[section, name, "client cpu"].append(
            (loadlib.cpu_seconds(worker.proc.pid) * 1e3 - client0) / calls)
        self.samples[section, name, "server cpu"].append(
            (settled_cpu_ms(self.server.pid) - server0) / calls)

    def median(self, section, name, what="wall"):
        values = self.samples.get((section, name, what))
        return statistics.median(values) if values else None

    def report(self):
        lines = [f"rounds: {self.args.rounds}, medians; CPU in core-ms per call", ""]
        kernel, numpy_ms = self.median("seed", "kernel"), self.median("seed", "numpy")
        lines += ["## seed 100x400x500x200 float32 cosine", "",
                  "| contender | wall ms | vs kernel | vs numpy | server CPU | client CPU |",
                  "|---|---|---|---|---|---|"]
        for name, _ in SEED_CONTENDERS:
            wall = self.median("seed", name)
            lines.append(f"| {name} | {fmt(wall)} | {fmt(ratio(wall, kernel))} | "
                         f"{fmt(ratio(wall, numpy_ms))} | "
                         f"{fmt(self.median('seed', name, 'server cpu'))} | "
                         f"{fmt(self.median('seed', name, 'client cpu'))} |")
        lines.append("")
        for name in ("simserve shm", "simserve shm in place", "triton shm"):
            r = ratio(self.median("seed", name), kernel)
            verdict = "-" if r is None else ("met" if r <= TARGET_KERNEL_RATIO else "missed")
            lines.append(f"target {name} <= {TARGET_KERNEL_RATIO}x kernel: {fmt(r)} ({verdict})")
        triton = self.median("bytes", "triton")
        lines += ["", "## bytes: 25x400x500x200 float32 cosine, tensors in the messages", "",
                  "| contender | wall ms | vs triton | server CPU | client CPU |",
                  "|---|---|---|---|---|"]
        for name, _ in BYTES_CONTENDERS:
            wall = self.median("bytes", name)
            lines.append(f"| {name} | {fmt(wall)} | {fmt(ratio(wall, triton))} | "
                         f"{fmt(self.median('bytes', name, 'server cpu'))} | "
                         f"{fmt(self.median('bytes', name, 'client cpu'))} |")
        return "\n".join(lines)


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(value):
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=os.path.join(ROOT, "build", "release"))
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--kernel-reps", type=int, default=3,
                        help="similarity_benchmark repetitions per round (their median counts)")
    parser.add_argument("--calls-per-turn", type=int, default=3,
                        help="back-to-back calls of a contender per round (their median "
                             "counts: the first call after another process ran is slower)")
    parser.add_argument("--triton-python", default=os.path.join(ROOT, ".venv-kserve", "bin",
                                                                "python"),
                        help="interpreter with tritonclient[grpc] (scripts/setup.d/45-kserve.sh)")
    parser.add_argument("--quiet-wait", type=float, default=10.0,
                        help="seconds to wait for a quiet host before each round")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.rounds = 1
    side = Side("current", args.build, [], {})
    with tempfile.TemporaryDirectory(prefix="simserve-shm-bench-") as tmp, \
            Server(side, tmp, flags=["--allow_shared_memory"]) as server:
        bench = Bench(args, side, server, tmp)
        bench.section("seed", SEED_CONTENDERS, SMOKE_SHAPE if args.smoke else SEED_SHAPE)
        bench.section("bytes", BYTES_CONTENDERS, SMOKE_SHAPE if args.smoke else QUARTER_SHAPE)
    if not args.smoke:
        print(bench.report())
    for failure in bench.failures:
        print("CHECK FAILED:", failure)
    print("shared_memory.py:", "FAILED" if bench.failures else "ok")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
