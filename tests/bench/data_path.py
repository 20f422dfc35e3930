#!/usr/bin/env python3
"""The data-path benchmark of issue 9: one command that measures, in one run and side by side
for the current build and (optionally) a baseline build, every figure the issue's targets name.

Sections (--only picks a subset, comma-separated):
  kernel  in-process kernel wall: similarity_benchmark BM_Seed_Cosine_Fp32, 2 OpenMP threads
  cli     simserve-cli seed call (A 100x400x200, B 100x500x200 float32, cosine, auto mode) over
          TCP loopback and over a unix socket: call wall, process wall, server CPU from /proc
  python  simserve.Client(target).similarity(A, B) vs numpy (unit rows, then a float32 batched
          matmul, 2 BLAS threads), each in its own process, interleaved round by round
  medium  unary Compute 1x64x4096x256 rps at concurrency 1 and 4, server CPU per call
  small   unary Compute 1x8x256x128 rps vs the same bytes rejected after parsing
          (top_k = M + 1 = 257, INVALID_ARGUMENT) vs grpc.health.v1.Health/Check
Rounds are interleaved (current, baseline, then reversed) and every figure is a median.
The medium/small servers run like tests/load/run_load.py: pinned to --server-cpu with
--workers=1 --threads_per_worker=1, the load generator pinned to --load-cpu. The load
generator is unary_load (this folder; pre-serialized requests, one thread) unless
--load-tool ghz: ghz re-marshals the 4 MiB medium request on every call and saturates its
core before the server does. Seed servers run with their defaults. --server-arg/--env (and
the --baseline-... forms) add server flags and environment per side; later flags win, so
they can override the defaults above.

    .venv/bin/python tests/bench/data_path.py --build build/release \\
        [--baseline-build /work/baseline/build/release] [--rounds 9] [--markdown] [--smoke]

Progress goes to stderr, the tables to stdout. Exit status 1 when a correctness or status-code
check failed (targets missed do not fail the run).
"""
import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

import grpc
import grpc_tools
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "load"))
import gen_requests  # noqa: E402  pylint: disable=wrong-import-position
import loadlib  # noqa: E402  pylint: disable=wrong-import-position
from loadlib import harness  # noqa: E402  pylint: disable=wrong-import-position

SECTIONS = ("kernel", "cli", "python", "medium", "small")
SEED_SHAPE = (100, 400, 500, 200)   # batch, N, M, D
SMOKE_SHAPE = (3, 17, 23, 8)
KERNEL_FILTER = "^BM_Seed_Cosine_Fp32(/|$)"
TOLERANCE = 1e-5                    # max |result - float64 reference|
DISTURBED_CORES = 0.3               # other processes' load above which a section is flagged
CONCURRENCIES = (1, 4)
SMALL_KINDS = ("real", "rejected", "health")
CLI_WALL = re.compile(r"client wall ([\d.]+) ms")
CLI_MODE = re.compile(r" via (\w+)")
STARTED = time.monotonic()


def progress(message):
    """A timestamped progress line on stderr."""
    print(f"[{time.monotonic() - STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)


def interleaved(items, round_index):
    """items in order on even rounds and reversed on odd ones, so no side always goes first."""
    return list(items) if round_index % 2 == 0 else list(reversed(items))


@dataclasses.dataclass
class Side:
    """One build under test: its binaries, its source tree, how its servers are started."""
    name: str
    build: str
    server_args: list
    env: dict

    def binary(self, *parts):
        return os.path.join(self.build, *parts)

    @property
    def root(self):
        """The source tree the build was configured from (CMakeCache.txt)."""
        with open(os.path.join(self.build, "CMakeCache.txt")) as f:
            for line in f:
                if line.startswith("CMAKE_HOME_DIRECTORY:"):
                    return line.split("=", 1)[1].strip()
        raise RuntimeError(f"{self.build}: no CMAKE_HOME_DIRECTORY in CMakeCache.txt")

    def revision(self):
        """Short commit of the source tree, '+dirty' with uncommitted changes."""
        git = ["git", "-C", self.root]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True).stdout.strip() or "?"
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return head + ("+dirty" if dirty else "")

    def python_client(self, tmp):
        """A private copy of the side's Python client with its generated files (re)made from
        the side's proto as its client/python/setup.py does (the descriptor set its
        simserve/v1 loaders read; protoc gencode for a side from before those loaders), so
        each side runs its own client. Returns the directory to put on PYTHONPATH."""
        out = os.path.join(tmp, f"python-{self.name}")
        shutil.copytree(os.path.join(self.root, "client", "python", "src", "simserve"),
                        os.path.join(out, "simserve"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        proto_dir = os.path.join(self.root, "proto")
        if os.path.exists(os.path.join(out, "simserve", "_protoload.py")):
            binpb = os.path.join(out, "simserve", "v1", "similarity.binpb")
            generate = [f"--descriptor_set_out={binpb}", "--include_imports"]
        else:
            generate = [f"--python_out={out}", f"--grpc_python_out={out}"]
        if protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", *generate,
                        os.path.join(proto_dir, loadlib.PROTO)]):
            raise RuntimeError(f"{self.name}: protoc failed on {proto_dir}")
        init = os.path.join(out, "simserve", "v1", "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()
        return out


def seed_inputs(directory, shape, tag=""):
    """Writes random float32 A [batch, N, D] and B [batch, M, D] for shape (batch, N, M, D) to
    directory/a{tag}.npy and b{tag}.npy; returns (paths, float64 cosine reference)."""
    batch, n, m, d = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((batch, n, d), dtype=np.float32)
    b = rng.standard_normal((batch, m, d), dtype=np.float32)
    paths = (os.path.join(directory, f"a{tag}.npy"), os.path.join(directory, f"b{tag}.npy"))
    np.save(paths[0], a)
    np.save(paths[1], b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    a64 /= np.linalg.norm(a64, axis=-1, keepdims=True)
    b64 /= np.linalg.norm(b64, axis=-1, keepdims=True)
    return paths, a64 @ b64.transpose(0, 2, 1)


def kernel_times(side, reps, min_time=None):
    """Wall ms of each repetition of similarity_benchmark's seed cosine (KERNEL_FILTER) in
    its own process, 2 OpenMP threads, with the side's binary and environment."""
    cmd = [side.binary("kernels", "similarity_benchmark"), f"--benchmark_filter={KERNEL_FILTER}",
           f"--benchmark_repetitions={reps}", "--benchmark_format=json"]
    if min_time:
        cmd.append(f"--benchmark_min_time={min_time}")
    env = dict(os.environ, SIMSERVE_BENCH_THREADS="2", **side.env)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env,
                         timeout=600).stdout
    unit = {"ms": 1.0, "us": 1e-3, "ns": 1e-6}
    return [b["real_time"] * unit[b["time_unit"]]
            for b in json.loads(out)["benchmarks"] if b.get("run_type") == "iteration"]


class Server:
    """A simserve process of one side, listening on a free loopback port or a unix socket;
    ready once grpc.health.v1 Check answers SERVING. Stopped with SIGTERM, then SIGKILL."""

    def __init__(self, side, log_dir, unix_path=None, flags=(), cpu=None):
        self.side, self.unix_path, self.flags, self.cpu = side, unix_path, list(flags), cpu
        kind = "unix" if unix_path else "tcp"
        self.log_path = os.path.join(log_dir, f"server-{side.name}-{kind}-{id(self)}.log")
        self.proc = None
        self.target = ""

    @property
    def pid(self):
        return self.proc.pid

    def __enter__(self):
        for _ in range(3):  # a free TCP port can be taken before the server binds it
            if self.unix_path:
                self.target = f"unix://{self.unix_path}"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.unix_path)
            else:
                self.target = f"127.0.0.1:{harness.free_port()}"
            cmd = [self.side.binary("server", "simserve"), f"--listen={self.target}",
                   "--metrics_listen=", *self.flags, *self.side.server_args]
            if self.cpu:
                cmd = ["taskset", "-c", self.cpu, *cmd]
            with open(self.log_path, "w") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                             env=dict(os.environ, **self.side.env))
            if self._wait_serving():
                progress(f"{self.side.name} server pid {self.pid} on {self.target}"
                         f"{' CPU ' + self.cpu if self.cpu else ''}")
                return self
            self.stop()
        with open(self.log_path, errors="replace") as f:
            raise RuntimeError(f"{self.side.name} server did not start:\n{f.read()[-3000:]}")

    def _wait_serving(self, timeout=120.0):
        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(grpc.RpcError):
                    if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == \
                            health_pb2.HealthCheckResponse.SERVING:
                        return True
                time.sleep(0.1)
        return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc):
        self.stop()


def load_tool(args):
    """The load generator's executable: ghz, or unary_load from --load-bin or a build dir."""
    if args.load_tool == "ghz":
        return loadlib.find_ghz()
    candidates = [args.load_bin] if args.load_bin else [
        os.path.join(args.build, "tests", "bench", "unary_load"),
        os.path.join(HERE, "..", "..", "build", "release", "tests", "bench", "unary_load")]
    for path in candidates:
        if os.access(path, os.X_OK):
            return os.path.abspath(path)
    raise SystemExit(f"unary_load not found in {candidates}: build the target unary_load "
                     "or pass --load-bin (or use --load-tool ghz)")


def host_cpu_seconds():
    """(busy, steal) CPU seconds of the whole host since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _, _, irq, softirq, steal = map(int, f.readline().split()[1:9])
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def wait_for_quiet(limit_s, section, threshold=0.25):
    """Waits up to limit_s seconds until the host was less than `threshold` cores busy for
    half a second (between sections this benchmark's own processes are idle)."""
    deadline = time.monotonic() + limit_s
    for attempt in itertools.count():
        busy0 = host_cpu_seconds()[0]
        time.sleep(0.5)
        busy = (host_cpu_seconds()[0] - busy0) / 0.5
        if busy < threshold:
            return
        if time.monotonic() >= deadline:
            progress(f"{section}: host still {busy:.2f} cores busy, starting anyway")
            return
        if attempt == 0:
            progress(f"{section}: waiting up to {limit_s:g} s for a quiet host "
                     f"({busy:.2f} cores busy)")


def settled_cpu_ms(pid):
    """The process's CPU ms (utime + stime) once it stops rising: compute threads may still
    spin for a moment after a call, and that spin belongs to the call."""
    last = loadlib.cpu_seconds(pid) * 1e3
    for _ in range(100):
        time.sleep(0.02)
        now = loadlib.cpu_seconds(pid) * 1e3
        if now == last:
            break
        last = now
    return last


def children_cpu_ms():
    """CPU ms of all waited-for child processes so far (here: the load generator runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (usage.ru_utime + usage.ru_stime) * 1e3


def max_error(path_or_array, reference):
    """max |x - reference| of a result (array or .npy path) against the float64 reference."""
    x = np.load(path_or_array) if isinstance(path_or_array, str) else path_or_array
    if x.shape != reference.shape:
        return float("inf")
    return float(np.abs(x.astype(np.float64) - reference).max())


class Bench:
    """Runs the sections and collects samples keyed by (figure..., side name)."""

    def __init__(self, args, sides, tmp):
        self.args, self.sides, self.tmp = args, sides, tmp
        self.samples = defaultdict(list)
        self.failures = []
        self.notes = []
        self.shape = SMOKE_SHAPE if args.smoke else SEED_SHAPE
        self.run_length = ({"total": 20} if args.smoke else {"duration": args.duration})
        self.load_bin = self.protoset = None
        self.live = []        # servers whose CPU counts as this benchmark's own
        self.contention = {}  # section -> (cores used by other processes, cores stolen)
        self.kernel_reps = 1 if args.smoke else 5

    def check(self, ok, message):
        """Records a failed correctness or protocol check (the run then exits 1)."""
        if not ok:
            self.failures.append(message)
            progress("CHECK FAILED: " + message)

    # -- kernel ------------------------------------------------------------------------------
    def kernel(self):
        """similarity_benchmark's seed cosine, each side's binary in turn."""
        reps, min_time = self.kernel_reps, "0.01" if self.args.smoke else None
        for r in range(self.args.kernel_rounds):
            for side in interleaved(self.sides, r):
                if r or side is not self.sides[0]:  # a barrier-heavy kernel: wait every run
                    wait_for_quiet(self.args.quiet_wait, "kernel")
                times = kernel_times(side, reps, min_time)
                self.check(bool(times), f"{side.name}: {KERNEL_FILTER} matched no benchmark")
                self.samples[("kernel", side.name)] += times
                progress(f"kernel {side.name} round {r + 1}: "
                         + " ".join(f"{t:.1f}" for t in times) + " ms")

    # -- seed inputs -------------------------------------------------------------------------
    def seed_inputs(self):
        """Writes A and B (.npy) and returns (paths, float64 cosine reference)."""
        return seed_inputs(self.tmp, self.shape)

    # -- cli ---------------------------------------------------------------------------------
    def cli_call(self, side, server, paths, out):
        """One simserve-cli process: (call wall ms, process wall ms, server CPU ms, mode)."""
        cmd = [side.binary("client", "simserve-cli"), f"--target={server.target}",
               f"--a={paths[0]}", f"--b={paths[1]}", f"--out={out}", "--timeout_ms=120000"]
        cpu0 = settled_cpu_ms(server.pid)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        process_ms = (time.perf_counter() - t0) * 1e3
        cpu = settled_cpu_ms(server.pid) - cpu0
        wall, mode = CLI_WALL.search(proc.stdout), CLI_MODE.search(proc.stdout)
        if proc.returncode != 0 or not wall:
            raise RuntimeError(f"{side.name} simserve-cli failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
        return float(wall[1]), process_ms, cpu, mode[1] if mode else "?"

    def cli(self, servers, paths, reference):
        """The seed through simserve-cli: a checked warm-up per server, then the rounds."""
        runs = [(side, transport) for side in self.sides for transport in ("tcp", "unix")]
        out = os.path.join(self.tmp, "s.npy")
        for side, transport in runs:  # warm-up call, checked against the reference
            *_, mode = self.cli_call(side, servers[side.name, transport], paths, out)
            err = max_error(out, reference)
            self.check(err <= TOLERANCE, f"cli {side.name} {transport}: max error {err:.2e}")
            self.notes.append(f"simserve-cli {side.name} over {transport}: mode {mode}, "
                              f"max |S - float64 reference| {err:.1e}")
        for r in range(self.args.rounds):
            for side, transport in interleaved(runs, r):
                call, process, cpu, _ = self.cli_call(side, servers[side.name, transport], paths,
                                                      out)
                for figure, value in (("call", call), ("process", process), ("cpu", cpu)):
                    self.samples[("cli", transport, figure, side.name)].append(value)
                progress(f"cli {side.name} {transport} round {r + 1}: call {call:.1f} ms, "
                         f"process {process:.1f} ms, server CPU {cpu:.0f} ms")

    # -- python ------------------------------------------------------------------------------
    def python(self, servers, paths, reference):
        """The seed through each side's Python client and through numpy, call by call."""
        workers = {"numpy": Worker("numpy", paths)}
        sources = {"numpy": os.path.dirname(workers["numpy"].origin)}
        for side in self.sides:
            python_path = side.python_client(self.tmp)
            workers[side.name] = Worker("client", paths, servers[side.name, "tcp"].target,
                                        python_path)
            self.check(workers[side.name].origin.startswith(python_path),
                       f"python {side.name}: imported {workers[side.name].origin}")
            sources[side.name] = os.path.join(side.root, "client", "python")
        try:
            for name, worker in workers.items():  # warm-up call, checked against the reference
                out = os.path.join(self.tmp, f"py-{name}.npy")
                worker.save(out)
                err = max_error(out, reference)
                self.check(err <= TOLERANCE, f"python {name}: max error {err:.2e}")
                self.notes.append(f"python {name} ({sources[name]}): max |S - float64 "
                                  f"reference| {err:.1e}")
            for r in range(2 * self.args.rounds):
                times = {name: workers[name].run() for name in interleaved(workers, r)}
                for name, ms in times.items():
                    self.samples[("python", name)].append(ms)
                for side in self.sides:
                    self.samples[("python", "ratio", side.name)].append(
                        times[side.name] / times["numpy"])
                progress(f"python round {r + 1}: "
                         + ", ".join(f"{k} {v:.1f} ms" for k, v in times.items()))
        finally:
            for worker in workers.values():
                worker.close()

    # -- load (medium, small) ----------------------------------------------------------------
    def requests(self):
        """{kind: (method, request file, expected status)} for the load sections."""
        pb2, _ = harness.load_stubs()
        m = gen_requests.PROFILES["small"][3]
        calls = {}
        for kind, profile, fields in (("medium", "medium", {}), ("real", "small", {}),
                                      ("rejected", "small", {"top_k": m + 1})):
            method, request, _ = gen_requests.build(pb2, profile)
            for key, value in fields.items():
                setattr(request, key, value)
            data = request.SerializeToString()
            if b"{{" in data:  # ghz runs binary data through text/template (tests/load)
                raise RuntimeError(f"{kind}: serialized request contains '{{{{'")
            path = os.path.join(self.tmp, f"{kind}.bin")
            with open(path, "wb") as f:
                f.write(data)
            calls[kind] = (f"{harness.SERVICE}/{method}", path,
                           "InvalidArgument" if fields else "OK")
        empty = os.path.join(self.tmp, "health.bin")  # HealthCheckRequest{} is zero bytes
        open(empty, "wb").close()
        calls["health"] = (loadlib.HEALTH_CALL, empty, "OK")
        return calls

    def load_run(self, target, method, path, conc, length):
        """One run of the load generator: {count, rps, p50 (ms), codes, errors}."""
        if self.args.load_tool == "ghz":
            kwargs = ({"data": {}, "protoset": self.protoset} if method == loadlib.HEALTH_CALL
                      else {"binary_file": path})
            if "duration" in length:
                length = {"duration": f"{length['duration']}s"}
            s = loadlib.summarise(loadlib.run_ghz(
                self.load_bin, target, method, concurrency=conc, cpus=1,
                pin=self.args.load_cpu or None, **length, **kwargs))
            return {"count": s["count"], "rps": s["rps"], "p50": s["p50"], "codes": s["codes"],
                    "errors": s["error_dist"]}
        cmd = [self.load_bin, f"--target={target}", f"--method=/{method}", f"--request={path}",
               f"--concurrency={conc}",
               f"--total={length['total']}" if "total" in length
               else f"--duration_s={length['duration']}"]
        if self.args.load_cpu:
            cmd = ["taskset", "-c", self.args.load_cpu, *cmd]
        out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True,
                                        timeout=600).stdout)
        return {"count": out["count"], "rps": out["rps"], "p50": out["p50_ms"],
                "codes": out["codes"], "errors": out["first_error"]}

    def load(self, server, call, conc, warm=False):
        """One measurement: rps, p50 ms, server and load generator CPU ms per call; checks
        that every call got the expected status."""
        method, path, expected = call
        length = {"total": max(20, 4 * conc)} if warm else self.run_length
        cpu0, client0 = settled_cpu_ms(server.pid), children_cpu_ms()
        s = self.load_run(server.target, method, path, conc, length)
        client = children_cpu_ms() - client0
        cpu = settled_cpu_ms(server.pid) - cpu0
        self.check(s["codes"] == {expected: s["count"]} and s["count"] > 0,
                   f"{server.side.name} {method} c={conc}: codes {s['codes']}, expected "
                   f"{expected} {s['errors']}")
        n = max(1, s["count"])
        return {"rps": s["rps"], "p50": s["p50"], "cpu": cpu / n, "client_cpu": client / n}

    def record(self, key, side, result):
        """Appends each figure of one load measurement to its samples."""
        for figure, value in result.items():
            self.samples[(*key, figure, side.name)].append(value)

    def medium(self, servers, calls):
        """Medium unary at each concurrency, current and baseline alternating."""
        for conc in CONCURRENCIES:
            for side in self.sides:
                self.load(servers[side.name, "load"], calls["medium"], conc, warm=True)
            for r in range(self.args.load_rounds):
                rps = {}
                for side in interleaved(self.sides, r):
                    result = self.load(servers[side.name, "load"], calls["medium"], conc)
                    self.record(("medium", conc), side, result)
                    rps[side.name] = result["rps"]
                    progress(f"medium c={conc} {side.name} round {r + 1}: "
                             f"{result['rps']:.1f} rps, server CPU {result['cpu']:.2f} ms/call")
                if "baseline" in rps:
                    self.samples[("medium", conc, "vs baseline")].append(
                        rps["current"] / rps["baseline"])

    def small(self, servers, calls):
        """Small unary, its rejected twin and Health/Check back to back on each server."""
        for conc in CONCURRENCIES:
            for side in self.sides:
                for kind in SMALL_KINDS:
                    self.load(servers[side.name, "load"], calls[kind], conc, warm=True)
            for r in range(self.args.load_rounds):
                for side in interleaved(self.sides, r):
                    rps = {}
                    for kind in interleaved(SMALL_KINDS, r):
                        result = self.load(servers[side.name, "load"], calls[kind], conc)
                        self.record(("small", conc, kind), side, result)
                        rps[kind] = result["rps"]
                    for kind in ("rejected", "health"):
                        self.samples[("small", conc, "vs " + kind, side.name)].append(
                            rps["real"] / rps[kind])
                    progress(f"small c={conc} {side.name} round {r + 1}: rps "
                             + ", ".join(f"{k} {v:.0f}" for k, v in rps.items()))

    # -- driver ------------------------------------------------------------------------------
    def run(self, only):
        """Runs the sections in `only`, starting and stopping the servers they need."""
        if "kernel" in only:
            with self.section("kernel"):
                self.kernel()
        with contextlib.ExitStack() as stack:
            servers = {}
            if only & {"cli", "python"}:
                paths, reference = self.seed_inputs()
                for side in self.sides:
                    servers[side.name, "tcp"] = stack.enter_context(Server(side, self.tmp))
                    if "cli" in only:
                        sock = os.path.join(self.tmp, f"{side.name}.sock")
                        servers[side.name, "unix"] = stack.enter_context(
                            Server(side, self.tmp, unix_path=sock))
                self.live = list(servers.values())
                if "cli" in only:
                    with self.section("cli"):
                        self.cli(servers, paths, reference)
                if "python" in only:
                    with self.section("python"):
                        self.python(servers, paths, reference)
                for key in list(servers):  # free the seed servers' memory and cores
                    servers.pop(key).stop()
            if only & {"medium", "small"}:
                self.load_bin = load_tool(self.args)
                if self.args.load_tool == "ghz":
                    self.protoset = loadlib.health_protoset(
                        os.path.join(self.tmp, "health.protoset"))
                calls = self.requests()
                flags = ["--workers=1", "--threads_per_worker=1"]
                for side in self.sides:
                    servers[side.name, "load"] = stack.enter_context(
                        Server(side, self.tmp, flags=flags, cpu=self.args.server_cpu or None))
                self.live = list(servers.values())
                if "medium" in only:
                    with self.section("medium"):
                        self.medium(servers, calls)
                if "small" in only:
                    with self.section("small"):
                        self.small(servers, calls)

    def own_cpu_seconds(self):
        """CPU seconds of this benchmark: itself, its reaped children, its running servers."""
        t = os.times()
        running = [s.pid for s in self.live if s.proc.poll() is None]
        return (t.user + t.system + t.children_user + t.children_system
                + sum(loadlib.cpu_seconds(pid) for pid in running))

    @contextlib.contextmanager
    def section(self, name):
        """Waits for a quiet host (--quiet-wait), then measures how many cores other processes
        (and the hypervisor's steal) took while section `name` ran: /proc/stat's busy time
        minus this benchmark's own."""
        wait_for_quiet(self.args.quiet_wait, name)
        busy0, steal0, own0, t0 = *host_cpu_seconds(), self.own_cpu_seconds(), time.monotonic()
        yield
        busy1, steal1, own1, t1 = *host_cpu_seconds(), self.own_cpu_seconds(), time.monotonic()
        self.contention[name] = ((busy1 - busy0 - (own1 - own0)) / (t1 - t0),
                                 (steal1 - steal0) / (t1 - t0))


class Worker:
    """A seed_worker.py process (numpy, a simserve client or tritonclient; see its kinds)
    driven line by line; `python` is the interpreter (default: this one)."""

    def __init__(self, kind, paths, target=None, python_path=None, python=None):
        env = dict(os.environ, OPENBLAS_NUM_THREADS="2", OMP_NUM_THREADS="2",
                   MKL_NUM_THREADS="2")
        if python_path:
            env["PYTHONPATH"] = python_path
        cmd = [python or sys.executable, os.path.join(HERE, "seed_worker.py"), kind, *paths]
        self.kind = kind
        self.proc = subprocess.Popen(cmd + ([target] if target else []), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.origin = self._answer().partition(" ")[2]

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} worker exited with {self.proc.wait()}")
        return line.strip()

    def _ask(self, command):
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def run(self):
        """Wall ms of one call, timed inside the worker."""
        return float(self._ask("run"))

    def save(self, path):
        self._ask(f"save {path}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# -- report ------------------------------------------------------------------------------------
def ratio(a, b):
    """a / b, or None when either is missing."""
    return a / b if a is not None and b else None


def fmt(value):
    """About three significant digits; '-' for a missing value."""
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


class Report:
    """The figures table (current | baseline | current/baseline) and the targets table."""

    def __init__(self, bench):
        self.bench = bench
        self.figures = []
        self.targets = []

    def median(self, *key):
        values = self.bench.samples.get(key)
        return statistics.median(values) if values else None

    def figure(self, label, *key):
        """Adds a row with the medians of `key` for both sides."""
        now, base = self.median(*key, "current"), self.median(*key, "baseline")
        if now is None and base is None:
            return
        change = ratio(now, base)
        self.figures.append((label, fmt(now), fmt(base),
                             "-" if change is None else f"{change:.2f}"))

    def target(self, label, limit, now, base=None):
        """Adds a target row: `limit` is '<= x' or '>= x' on the ratio `now`."""
        op, bound = limit.split()
        met = None if now is None else (now <= float(bound) if op == "<=" else now >= float(bound))
        self.targets.append((label, limit.replace("<=", "≤").replace(">=", "≥"),
                             "-" if now is None else f"{now:.3g}",
                             "-" if base is None else f"{base:.3g}",
                             "n/a" if met is None else "met" if met else "MISSED"))

    def build(self):
        """Fills both tables from the samples; returns self."""
        m = self.median
        self.figure("kernel in-process seed cosine fp32, ms", "kernel")
        for transport in ("tcp", "unix"):
            self.figure(f"CLI seed call over {transport}, ms", "cli", transport, "call")
            self.figure(f"CLI seed server CPU per call over {transport}, ms",
                        "cli", transport, "cpu")
            self.figure(f"CLI seed whole process over {transport}, ms",
                        "cli", transport, "process")
        self.figure("Python seed client call, ms", "python")
        if m("python", "numpy") is not None:
            self.figures.append(("numpy in its own process, ms", fmt(m("python", "numpy")),
                                 "-", "-"))
        for conc in CONCURRENCIES:
            self.figure(f"medium unary c={conc}, rps", "medium", conc, "rps")
            self.figure(f"medium unary c={conc}, p50 ms", "medium", conc, "p50")
            self.figure(f"medium unary c={conc}, server CPU ms/call", "medium", conc, "cpu")
            self.figure(f"medium unary c={conc}, load generator CPU ms/call",
                        "medium", conc, "client_cpu")
        for conc in CONCURRENCIES:
            for kind, label in zip(SMALL_KINDS, ("small unary", "small rejected after parsing",
                                                 "Health/Check")):
                self.figure(f"{label} c={conc}, rps", "small", conc, kind, "rps")
                self.figure(f"{label} c={conc}, server CPU ms/call", "small", conc, kind, "cpu")
                self.figure(f"{label} c={conc}, load generator CPU ms/call",
                            "small", conc, kind, "client_cpu")

        ratios = {side: self.ratios(side) for side in ("current", "baseline")}
        now, base = ratios["current"], ratios["baseline"]
        self.target("server CPU per seed call / (2 x kernel wall)", "<= 1.6", now["cpu"],
                    base["cpu"])
        self.target("CLI seed call / kernel wall", "<= 2.5", now["cli"], base["cli"])
        self.target("Python seed call / numpy", "<= 1.0",
                    now["python"], base["python"])
        for conc in CONCURRENCIES:
            self.target(f"medium unary rps c={conc} / baseline", ">= 2",
                        m("medium", conc, "vs baseline"))
        for conc in CONCURRENCIES:
            self.target(f"small unary c={conc} / same bytes rejected", ">= 0.9",
                        now["small", conc], base["small", conc])
            if now["health", conc] is not None:
                self.targets.append((f"small unary c={conc} / Health/Check (for reference)",
                                     "-", f"{now['health', conc]:.3g}",
                                     "-" if base["health", conc] is None
                                     else f"{base['health', conc]:.3g}", "-"))
        self.target("kernel wall / baseline kernel wall", "<= 1.05",
                    ratio(m("kernel", "current"), m("kernel", "baseline")))
        return self

    def ratios(self, side):
        """One side's ratios that the targets compare within that side."""
        m = self.median
        kernel = m("kernel", side)
        out = {"cpu": ratio(m("cli", "tcp", "cpu", side), kernel and 2 * kernel),
               "cli": ratio(m("cli", "tcp", "call", side), kernel),
               "python": m("python", "ratio", side)}
        for conc in CONCURRENCIES:
            out["small", conc] = m("small", conc, "vs rejected", side)
            out["health", conc] = m("small", conc, "vs health", side)
        return out

    @staticmethod
    def table(header, rows, markdown):
        """Rows as Markdown or as aligned text (first column left, the others right)."""
        if markdown:
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(r, widths)))
                         for r in [header, *rows])

    def render(self, markdown):
        figures = self.table(("figure", "current", "baseline", "current/baseline"),
                             self.figures, markdown)
        targets = self.table(("target", "limit", "current", "baseline", "verdict"),
                             self.targets, markdown)
        return figures + "\n\n" + targets


def header_lines(args, bench, load_start):
    """What ran where: host, load, shapes, rounds, builds and their server options."""
    cpu_model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                      if line.startswith("model name")), "?")
    load_end = " ".join(f"{x:.1f}" for x in os.getloadavg())
    smoke = " (smoke: shapes too small for the targets)" if args.smoke else ""
    run = "20 calls" if args.smoke else f"{args.duration:g} s"
    lines = [f"simserve data path benchmark{smoke}",
             f"host: {os.cpu_count()} x {cpu_model}; load average {load_start} at start, "
             f"{load_end} at end",
             f"seed {'x'.join(map(str, bench.shape))} (batch x N x M x D); CLI {args.rounds} "
             f"rounds, Python {2 * args.rounds}, kernel {args.kernel_rounds} x "
             f"{bench.kernel_reps} runs, "
             f"load {args.load_rounds} x {run}; medians",
             f"medium/small: server on CPU {args.server_cpu or 'any'} with --workers=1 "
             f"--threads_per_worker=1, {args.load_tool} on CPU {args.load_cpu or 'any'}, "
             "one connection"]
    for side in bench.sides:
        lines.append(f"{side.name}: {side.build} ({side.revision()})"
                     + "".join(f" {a}" for a in side.server_args)
                     + "".join(f" {k}={v}" for k, v in side.env.items()))
    if bench.contention:
        lines.append("cores taken by other processes on the host (steal) during each section: "
                     + ", ".join(f"{name} {other:.2f} ({steal:.2f})"
                                 for name, (other, steal) in bench.contention.items()))
    return lines + bench.notes


def parse_env(pairs):
    """KEY=VALUE strings as a dict."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build/release", help="build dir under test")
    parser.add_argument("--baseline-build", help="build dir of the baseline (omit: no baseline)")
    parser.add_argument("--rounds", type=int, default=9,
                        help="rounds of the CLI section (the Python section runs twice as many)")
    parser.add_argument("--kernel-rounds", type=int, default=5,
                        help="similarity_benchmark runs per side, 5 repetitions each")
    parser.add_argument("--load-rounds", type=int, default=9,
                        help="load measurements per figure and side")
    parser.add_argument("--duration", type=float, default=1.0,
                        help="seconds of one load measurement")
    parser.add_argument("--load-tool", choices=("unary_load", "ghz"), default="unary_load",
                        help="load generator of the medium/small sections")
    parser.add_argument("--load-bin", help="unary_load executable (default: in --build)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra flag for the current build's servers, e.g. "
                             "--server-arg=--stream_window=4 (repeatable)")
    parser.add_argument("--baseline-server-arg", action="append", default=[])
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="environment of the current build's servers and kernel benchmark")
    parser.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--server-cpu", default="1" if os.cpu_count() >= 2 else "",
                        help="taskset CPUs of the medium/small servers ('' = unpinned)")
    parser.add_argument("--load-cpu", default="0" if os.cpu_count() >= 2 else "",
                        help="taskset CPUs of the load generator ('' = unpinned)")
    parser.add_argument("--quiet-wait", type=float, default=60,
                        help="seconds to wait before each section for other processes to leave "
                             "the host idle (0 = do not wait)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny seed shapes, 1 round, 20 load calls, no baseline: checks that "
                             "the benchmark works and its results are correct")
    args = parser.parse_args()
    only = set(args.only.split(","))
    if only - set(SECTIONS):
        parser.error(f"--only: unknown sections {sorted(only - set(SECTIONS))}")
    if args.smoke:
        args.rounds = args.kernel_rounds = args.load_rounds = 1
        args.quiet_wait = 0
        args.baseline_build = None

    sides = [Side("current", os.path.abspath(args.build), args.server_arg, parse_env(args.env))]
    if args.baseline_build:
        sides.append(Side("baseline", os.path.abspath(args.baseline_build),
                          args.baseline_server_arg, parse_env(args.baseline_env)))
    load_start = " ".join(f"{x:.1f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="simserve-data-path-") as tmp:
        bench = Bench(args, sides, tmp)
        bench.run(only)
    elapsed = time.monotonic() - STARTED

    header = header_lines(args, bench, load_start)
    if args.markdown:
        print("\n".join(f"- {h}" if i else h for i, h in enumerate(header)) + "\n")
    else:
        print("\n".join(header) + "\n")
    print(Report(bench).build().render(args.markdown))
    disturbed = [name for name, (other, steal) in bench.contention.items()
                 if other + steal > DISTURBED_CORES]
    if disturbed:
        print(f"\nDISTURBED: other processes took more than {DISTURBED_CORES} cores during "
              f"{', '.join(disturbed)}; those figures say more about the host than the build")
    for failure in bench.failures:
        print(f"CHECK FAILED: {failure}")
    print(f"\ntotal {int(elapsed) // 60} min {int(elapsed) % 60} s")
    return 1 if bench.failures else 0


if __name__ == "__main__":
    sys.exit(main())
