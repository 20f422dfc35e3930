#!/usr/bin/env python3
"""A/B benchmark (not a test) of two versions of the Python client against one server.

Each variant is a directory holding a `simserve` package (for example `client/python/src`
of this checkout and of an older one, with its generated `simserve/v1` stubs). Every case
runs in a fresh subprocess per variant and round, the variants interleaved in alternating
order; per call the wall time and the client process's CPU time (getrusage, user + sys) are
recorded with a reused `out=` array, and medians are printed.

    client/python/benchmarks/bench_ab.py --server build/release/server/simserve \\
        --variant before=/tmp/old/client/python/src --variant after=client/python/src \\
        [--rounds 9] [--calls 5]

Default cases: unary and stream with a large result (A 1x1024x64, B 1x4096x64: 16.8 MB out)
and with large inputs (A 1x64x512, B 1x16384x512: 33.6 MB in, 4.2 MB out).
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

WORKER = r'''
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, simserve
target, mode, shape_a, shape_b, n = (sys.argv[2], sys.argv[3], json.loads(sys.argv[4]),
                                     json.loads(sys.argv[5]), int(sys.argv[6]))
rng = np.random.default_rng(0)
a = rng.standard_normal(shape_a, dtype=np.float32)
b = rng.standard_normal(shape_b, dtype=np.float32)
out = np.empty(tuple(shape_a[:-1]) + (shape_b[-2],), np.float32)
with simserve.Client(target, timeout=120) as c:
    c.similarity(a, b, mode=mode, out=out)  # warm-up: connection, GetInfo
    walls, cpus = [], []
    for _ in range(n):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        c.similarity(a, b, mode=mode, out=out)
        t1, r1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        walls.append((t1 - t0) * 1e3)
        cpus.append((r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime) * 1e3)
print(json.dumps({"wall": walls, "cpu": cpus, "file": simserve.__file__}))
'''

CASES = [("unary", [1, 1024, 64], [1, 4096, 64]), ("stream", [1, 1024, 64], [1, 4096, 64]),
         ("unary", [1, 64, 512], [1, 16384, 512]), ("stream", [1, 64, 512], [1, 16384, 512])]


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True)
    ap.add_argument("--variant", action="append", required=True, help="name=dir, repeatable")
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--calls", type=int, default=5, help="timed calls per subprocess")
    args = ap.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant]
    target = f"127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [args.server, f"--listen={target}", "--metrics_listen=", "--workers=1",
         "--threads_per_worker=2", "--max_receive_message_bytes=134217728"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    res = {}
    try:
        deadline = time.monotonic() + 60
        while True:  # wait until the server accepts connections
            try:
                socket.create_connection(("127.0.0.1", int(target.rsplit(":", 1)[1])), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start")
                time.sleep(0.1)
        for r in range(args.rounds):
            for mode, sa, sb in CASES:
                for name, path in (variants if r % 2 == 0 else variants[::-1]):
                    p = subprocess.run([sys.executable, "-c", WORKER, os.path.abspath(path),
                                        target, mode, json.dumps(sa), json.dumps(sb),
                                        str(args.calls)],
                                       capture_output=True, text=True, check=True, timeout=600)
                    d = json.loads(p.stdout)
                    assert d["file"].startswith(os.path.abspath(path)), d["file"]
                    key = (mode, f"{sa}x{sb}", name)
                    res.setdefault(key, {"wall": [], "cpu": []})
                    res[key]["wall"] += d["wall"]
                    res[key]["cpu"] += d["cpu"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    med = statistics.median
    print(f"{args.rounds} interleaved rounds x {args.calls} calls, medians, out= reused")
    for (mode, shapes, name), d in res.items():
        print(f"{mode:7} {shapes:28} {name:8} wall {med(d['wall']):8.2f} ms   "
              f"client cpu {med(d['cpu']):8.2f} ms")


if __name__ == "__main__":
    main()
