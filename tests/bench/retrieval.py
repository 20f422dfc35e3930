#!/usr/bin/env python3
"""Retrieval benchmark (issue 10): cosine top-k against a server-side gallery, side by side.

One command, 2 threads everywhere, every engine in its own long-lived process, rounds
interleaved (engine by engine within a round) and medians reported:
  * simserve's kernel in-process (kernels/gallery_benchmark --stdin), float32 storage, and
    bfloat16 storage with precision bf16 (the matmul path for more than 8 query rows then
    runs on bf16 operands; the scan for up to 8 rows keeps the queries in float32);
  * faiss-cpu IndexFlatIP on L2-normalised vectors (exact cosine top-k), its own process;
  * the service end to end: a `simserve` server with the gallery registered over
    RegisterGallery, queried with Compute(gallery=...) through grpc from Python.
Also printed: the read-bandwidth floor of a scan (gallery bytes / measured read bandwidth),
the server's RSS growth for the registered gallery against its raw bytes, and the seed
workload with B registered once against sending B every call.

  .venv/bin/python tests/bench/retrieval.py            # 1M x 384, Q = 1, 16, 256
  .venv/bin/python tests/bench/retrieval.py --smoke    # tiny shapes, checks results
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "client", "python", "src"))

import grpc  # noqa: E402
import simserve  # noqa: E402
from simserve.v1 import similarity_pb2 as pb  # noqa: E402
from simserve.v1 import similarity_pb2_grpc as pb_grpc  # noqa: E402

FAISS_WORKER = r"""
import json, sys, time
import numpy as np, faiss
m, d, k, seed = (int(x) for x in sys.argv[1:5])
faiss.omp_set_num_threads(2)
rng = np.random.default_rng(seed)
g = rng.standard_normal((m, d), dtype=np.float32)
faiss.normalize_L2(g)
index = faiss.IndexFlatIP(d)
index.add(g)
del g
print(json.dumps({"event": "ready"}), flush=True)
for line in sys.stdin:
    q = int(line)
    a = rng.standard_normal((q, d), dtype=np.float32)
    t = time.perf_counter()
    faiss.normalize_L2(a)
    index.search(a, k)
    print(json.dumps({"event": "query", "queries": q, "ms": (time.perf_counter() - t) * 1e3}),
          flush=True)
"""


SPAWNED = []  # every child process, killed on exit


def progress(message):
    print(f"[retrieval {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Worker:
    """A process that answers one JSON line per query count written to its stdin."""

    def __init__(self, name, cmd, env=None):
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=dict(os.environ, **(env or {})))
        SPAWNED.append(self.proc)
        self.info = {}
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"{name} exited while starting")
            event = json.loads(line)
            self.info[event["event"]] = event
            last = "bandwidth" if "--bandwidth" in cmd else "gallery"
            if event["event"] in ("ready", last):
                break

    def query(self, q):
        self.proc.stdin.write(f"{q}\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["ms"]

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Server:
    def __init__(self, binary, gallery_bytes):
        self.target = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [binary, f"--listen={self.target}", "--metrics_listen=",
             f"--gallery_memory_bytes={gallery_bytes}", "--max_inflight_bytes=8589934592",
             "--max_receive_message_bytes=268435456"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        SPAWNED.append(self.proc)
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.channel = grpc.insecure_channel(self.target, options=options)
        self.stub = pb_grpc.SimilarityStub(self.channel)  # the seed comparison: raw Compute
        self.handles = {}
        deadline = time.monotonic() + 120
        while True:
            try:
                self.stub.GetInfo(pb.GetInfoRequest(), timeout=1)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("server did not start")
                time.sleep(0.2)

        self.client = simserve.Client(self.target)

    def register(self, name, rows):
        """Through the Python client; returns the server's GalleryInfo.bytes."""
        self.handles[name] = self.client.register_gallery(name, rows, timeout=600)
        return self.client.get_gallery(name).bytes

    def top_k(self, gallery, a, k):
        """The service end to end through the Python client (the handle: no lookup)."""
        return self.client.top_k(a, k, gallery=self.handles[gallery], timeout=600)

    def close(self):
        self.client.close()
        self.channel.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def gallery_rows(m, d, seed):
    return np.random.default_rng(seed).standard_normal((m, d), dtype=np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default=os.path.join(ROOT, "build", "release"))
    parser.add_argument("--m", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=384)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", default="1,16,256")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, 2 rounds, checks the service against numpy")
    args = parser.parse_args()
    if args.smoke:
        args.m, args.d, args.rounds, args.queries = 5000, 64, 2, "1,16"
    queries = [int(q) for q in args.queries.split(",")]
    env = {"OMP_NUM_THREADS": "2"}
    bench = os.path.join(args.build, "kernels", "gallery_benchmark")
    common = [f"--m={args.m}", f"--d={args.d}", f"--k={args.k}", "--stdin"]

    progress(f"gallery {args.m} x {args.d}, cosine top-{args.k}, Q = {queries}, "
             f"{args.rounds} rounds; building the engines (each in its own process)")
    workers = [Worker("simserve fp32", [bench, *common, "--storage=float32", "--bandwidth"], env),
               Worker("simserve bf16", [bench, *common, "--storage=bfloat16", "--precision=bf16"],
                      env)]
    try:
        import faiss  # noqa: F401
        workers.append(Worker("faiss", [sys.executable, "-c", FAISS_WORKER, str(args.m),
                                        str(args.d), str(args.k), "7"], env))
    except ImportError:
        progress("faiss-cpu is not installed (scripts/setup.sh installs it): skipping faiss")

    progress("starting the server and registering the gallery")
    server = Server(os.path.join(args.build, "server", "simserve"), 16 << 30)
    rows = gallery_rows(args.m, args.d, 11)
    rss_before = rss_bytes(server.proc.pid)
    t = time.perf_counter()
    info_bytes = server.register("bench", rows)
    register_s = time.perf_counter() - t
    rss_growth = rss_bytes(server.proc.pid) - rss_before
    raw_bytes = rows.nbytes

    service = {}
    rng = np.random.default_rng(5)
    if args.smoke:  # the service's answer against numpy, exact cosine top-k
        a = rng.standard_normal((3, args.d), dtype=np.float32)
        values, indices = server.top_k("bench", a, args.k)
        unit = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        ref = (a / np.linalg.norm(a, axis=1, keepdims=True)).astype(np.float64) @ unit.T
        want = np.argsort(-ref, axis=1, kind="stable")[:, :args.k]
        assert np.array_equal(indices, want), (indices, want)
        assert np.allclose(values, np.take_along_axis(ref, want, 1), atol=1e-5)
    del rows

    times = {w.name: {q: [] for q in queries} for w in workers}
    times["service"] = {q: [] for q in queries}
    service_cpu = {q: [] for q in queries}
    for w in workers:  # warm-up: primitives, scratch buffers, page cache
        for q in queries:
            w.query(q)
    for q in queries:
        server.top_k("bench", rng.standard_normal((q, args.d), dtype=np.float32), args.k)
    for r in range(args.rounds):
        for q in queries:
            for w in workers:
                times[w.name][q].append(w.query(q))
            a = rng.standard_normal((q, args.d), dtype=np.float32)
            cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
            server.top_k("bench", a, args.k)
            times["service"][q].append((time.perf_counter() - t0) * 1e3)
            service_cpu[q].append((cpu_seconds(server.proc.pid) - cpu0) * 1e3)
        progress(f"round {r + 1}/{args.rounds} done")

    # The seed workload with B as a gallery against sending B each call (unary Compute).
    seed = {}
    if not args.smoke:
        sb, sn, sm, sd = 100, 400, 500, 200
        srng = np.random.default_rng(3)
        a3 = srng.standard_normal((sb, sn, sd), dtype=np.float32)
        b3 = srng.standard_normal((sb, sm, sd), dtype=np.float32)
        server.register("seed", b3)
        full = pb.ComputeRequest(a=pb.Tensor(shape=list(a3.shape), raw=a3.tobytes()),
                                 b=pb.Tensor(shape=list(b3.shape), raw=b3.tobytes()))
        gal = pb.ComputeRequest(a=pb.Tensor(shape=list(a3.shape), raw=a3.tobytes()),
                                gallery="seed")
        seed = {"full upload": [], "gallery": []}
        for _ in range(args.rounds):
            for name, req in (("full upload", full), ("gallery", gal)):
                t0 = time.perf_counter()
                server.stub.Compute(req, timeout=600)
                seed[name].append((time.perf_counter() - t0) * 1e3)
    server.close()
    for w in workers:
        w.close()

    bandwidth = workers[0].info["bandwidth"]["bytes_per_s"]
    floor_fp32 = args.m * args.d * 4 / bandwidth * 1e3
    floor_bf16 = floor_fp32 / 2
    med = {name: {q: statistics.median(v) for q, v in per_q.items()} for name, per_q in
           times.items()}
    print(f"\nRetrieval: gallery {args.m} x {args.d} float32 ({raw_bytes / 1e9:.2f} GB), "
          f"cosine top-{args.k}, 2 threads, medians of {args.rounds} interleaved rounds (ms)")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s -> scan floor {floor_fp32:.1f} ms fp32, "
          f"{floor_bf16:.1f} ms bf16")
    header = "| engine | " + " | ".join(f"Q={q}" for q in queries) + " |"
    print(header)
    print("|" + "---|" * (len(queries) + 1))
    for name in med:
        print(f"| {name} | " + " | ".join(f"{med[name][q]:.1f}" for q in queries) + " |")
    print("| service server CPU (core-ms) | " +
          " | ".join(f"{statistics.median(service_cpu[q]):.0f}" for q in queries) + " |")
    if "faiss" in med:
        for q in queries:
            print(f"Q={q}: in-process fp32 {med['faiss'][q] / med['simserve fp32'][q]:.2f}x "
                  f"faiss speed; service {med['service'][q] / med['faiss'][q]:.2f}x faiss time")
    print(f"Q=1: fp32 {med['simserve fp32'][1] / floor_fp32:.2f}x its floor, bf16 "
          f"{med['simserve bf16'][1] / floor_bf16:.2f}x its floor; bf16 storage "
          f"{med['simserve fp32'][1] / med['simserve bf16'][1]:.2f}x faster than fp32")
    print(f"registration: {register_s:.1f} s; GalleryInfo.bytes {info_bytes / 1e6:.0f} MB; server "
          f"RSS grew {rss_growth / 1e6:.0f} MB = {rss_growth / raw_bytes:.2f}x the raw bytes")
    if seed:
        f, g = statistics.median(seed["full upload"]), statistics.median(seed["gallery"])
        print(f"seed 100x400x500x200 unary Compute: B sent every call {f:.0f} ms, B as a gallery "
              f"{g:.0f} ms ({f / g:.2f}x)")


if __name__ == "__main__":
    try:
        main()
    finally:  # never leave a server or a worker behind
        for child in SPAWNED:
            if child.poll() is None:
                child.kill()
