"""Memory given back after a burst (issue 11): 64 concurrent ComputeStream calls with 64 MB
results each, read slowly and then cancelled; 10 s later the server's RSS must be within 150 MB
of its level before the burst. Run beside the old behaviour (--memory_release_delay=inf, which
keeps the cached tiles and glibc's retained heap) for the figures; only the default is held
to the bound."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from serverctl import Server
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc

MB = 1e6
STREAMS = 64
N = M = 4096  # 4096 x 4096 float32 results: 64 MiB per stream
D = 32


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def request(seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((N, D), dtype=np.float32)
    b = rng.standard_normal((M, D), dtype=np.float32)
    return pb.ComputeRequest(a=pb.Tensor(shape=[N, D], raw=a.tobytes()),
                             b=pb.Tensor(shape=[M, D], raw=b.tobytes()))


def burst(address):
    """64 streams that each read two chunks, wait, and cancel; returns chunks read."""
    requests = [request(i) for i in range(4)]
    read = []
    go = threading.Barrier(STREAMS)

    def one(i):
        with grpc.insecure_channel(address) as channel:
            go.wait()
            call = pb_grpc.SimilarityStub(channel).ComputeStream(requests[i % 4], timeout=60)
            got = 0
            for _ in call:
                got += 1
                if got == 2:
                    break
            time.sleep(1.0)  # the server holds its window of tiles for this slow reader
            call.cancel()
            read.append(got)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return read


def small_call(address):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 16), dtype=np.float32)
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.SimilarityStub(channel).Compute(pb.ComputeRequest(
            a=pb.Tensor(shape=[8, 16], raw=a.tobytes()),
            b=pb.Tensor(shape=[8, 16], raw=a.tobytes())), timeout=30)
    np.testing.assert_allclose(np.diag(np.frombuffer(reply.values_raw, np.float32).reshape(8, 8)),
                               1.0, rtol=1e-5)


def measure(server_binary, extra):
    with Server(server_binary, ["--metrics_listen=", *extra]) as srv:
        pid = srv.proc.pid
        small_call(srv.address)
        time.sleep(3)
        before = rss_bytes(pid)
        read = burst(srv.address)
        assert len(read) == STREAMS and all(r == 2 for r in read), read
        peak = rss_bytes(pid)
        time.sleep(10)
        after = rss_bytes(pid)
        small_call(srv.address)  # still serving
    return before, peak, after


def test_rss_returns_near_its_level_after_a_burst_of_cancelled_streams(server_binary):
    old = measure(server_binary, ["--memory_release_delay=inf"])
    new = measure(server_binary, [])
    for name, (before, peak, after) in (("memory_release_delay=inf", old), ("default", new)):
        print(f"{name}: RSS before {before / MB:.0f} MB, right after the burst {peak / MB:.0f} MB,"
              f" 10 s later {after / MB:.0f} MB (+{(after - before) / MB:.0f} MB)")
    before, _, after = new
    assert after - before < 150 * MB, f"RSS stayed {(after - before) / MB:.0f} MB above its level"
