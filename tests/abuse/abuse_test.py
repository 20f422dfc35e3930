#!/usr/bin/env python3
"""Abuse tests against the real simserve binary on loopback (bounded counts and durations):

  * garbage bytes on every method of simserve.v1.Similarity, grpc.health.v1.Health and the
    reflection service: each answers the status in GARBAGE_STATUS, then the server still
    serves (Health SERVING, a Compute equal to scikit-learn's cosine);
  * 300 concurrent connections each making calls while another client's Health/Check and
    small Compute keep succeeding within their deadline; then the server's fds return to
    their baseline;
  * 64 concurrent slow-reading ComputeStream calls (64 MiB results, one chunk read): the
    server's RSS grows by at most the bound computed from GetInfo's limits and the stream
    window, other clients are served, and after the slow calls are cancelled it keeps serving;
  * a message over the receive limit (GetInfo's max_receive_message_bytes) on Compute and on
    ComputeUpload is RESOURCE_EXHAUSTED, one just under it succeeds, and the server serves on.

Usage: abuse_test.py --server path/to/simserve [unittest args]
"""
import argparse
import concurrent.futures
import os
import sys
import threading
import time
import unittest

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "soak"))
import soak  # noqa: E402  pylint: disable=wrong-import-position
from soak import harness, loadlib, reference  # noqa: E402  pylint: disable=wrong-import-position

SERVER = None
SIM = f"/{harness.SERVICE}/"
HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
MiB = 1 << 20

# path -> (call shape, request message name, status, text the details must contain).
# uu = unary, us = server streaming, su = client streaming, ss = bidi.
GARBAGE_STATUS = {
    # our raw decoders (server/wire_codec): documented INVALID_ARGUMENT
    SIM + "Compute": ("uu", "ComputeRequest", "INVALID_ARGUMENT", "malformed ComputeRequest"),
    SIM + "ComputeStream": ("us", "ComputeRequest", "INVALID_ARGUMENT",
                            "malformed ComputeRequest"),
    SIM + "ComputeUpload": ("ss", "UploadRequest", "INVALID_ARGUMENT", "malformed UploadRequest"),
    SIM + "RegisterGallery": ("su", "RegisterGalleryRequest", "INVALID_ARGUMENT",
                              "malformed RegisterGalleryRequest"),
    # generated callback handlers: gRPC 1.51 answers a request it cannot parse with
    # UNIMPLEMENTED and no message (grpcpp/impl/codegen/server_callback_handlers.h,
    # "if deserialization or reactor creator failed"), not INTERNAL as the sync API does
    SIM + "GetInfo": ("uu", "GetInfoRequest", "UNIMPLEMENTED", ""),
    SIM + "GetGallery": ("uu", "GetGalleryRequest", "UNIMPLEMENTED", ""),
    SIM + "ListGalleries": ("uu", "ListGalleriesRequest", "UNIMPLEMENTED", ""),
    SIM + "DeleteGallery": ("uu", "DeleteGalleryRequest", "UNIMPLEMENTED", ""),
    # gRPC's default health service decodes by hand; Check and Watch disagree on the code
    HEALTH + "Check": ("uu", "HealthCheckRequest", "INVALID_ARGUMENT", "could not parse request"),
    HEALTH + "Watch": ("us", "HealthCheckRequest", "INTERNAL", "could not parse request"),
    # gRPC's reflection service is a sync bidi handler: a message it cannot parse ends its
    # read loop like a half-close, so the call ends OK with no response
    REFLECTION: ("ss", "ServerReflectionRequest", "OK", ""),
}


def garbage_payloads():
    """Bytes no protobuf parser accepts: an invalid wire type, a length past the end, and
    4 KiB of random bytes (seeded)."""
    return {"wire type 7": b"\x0f\x00\x01",
            "truncated length": b"\x0a\x64abc",
            "random 4 KiB": np.random.default_rng(11).bytes(4096)}


def established(port):
    """Server-side TCP connections of local port `port` in state ESTABLISHED, from the
    kernel's tables (gRPC serves 127.0.0.1 on a dual-stack socket: they are in tcp6)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, _, state = line.split()[1:4]
                if int(local.rsplit(":", 1)[1], 16) == port and state == "01":
                    n += 1
    return n


class Liveness(threading.Thread):
    """Another client: Health/Check and a small Compute (checked against scikit-learn) in a
    loop on its own connection until stopped; every call must succeed within `timeout` s."""

    def __init__(self, target, pb2, timeout=10):
        super().__init__(daemon=True)
        self.target, self.pb2, self.timeout = target, pb2, timeout
        self.stop_event = threading.Event()
        self.calls, self.max_seconds, self.errors = 0, 0.0, []

    def run(self):
        req, a, b = harness.make_request(self.pb2, 1, 8, 256, 128, seed=5)
        want = reference.sklearn_cosine(a, b)
        data = req.SerializeToString()
        with grpc.insecure_channel(self.target,
                                   options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
            check = ch.unary_unary(HEALTH + "Check")
            compute = ch.unary_unary(SIM + "Compute")
            while not self.stop_event.is_set():
                t0 = time.monotonic()
                try:
                    check(health_pb2.HealthCheckRequest().SerializeToString(),
                          timeout=self.timeout)
                    resp = self.pb2.ComputeResponse.FromString(compute(data, timeout=self.timeout))
                    got = np.frombuffer(resp.values_raw, dtype="<f4").reshape(want.shape)
                    if np.max(np.abs(got - want)) > 1e-5:
                        self.errors.append("Compute result differs from scikit-learn")
                except grpc.RpcError as e:
                    self.errors.append(f"{e.code().name}: {e.details()}")
                self.calls += 1
                self.max_seconds = max(self.max_seconds, time.monotonic() - t0)
                time.sleep(0.05)

    def finish(self, test):
        self.stop_event.set()
        self.join(2 * self.timeout + 5)
        print(f"  other client: {self.calls} Health+Compute rounds, slowest "
              f"{1e3 * self.max_seconds:.0f} ms, errors {self.errors[:3]}", flush=True)
        test.assertFalse(self.is_alive())
        test.assertGreater(self.calls, 0)
        test.assertEqual(self.errors, [])


class Abuse(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pb2, _ = harness.load_stubs()

    def start(self, *flags):
        server = harness.Server(SERVER, "--warmup=false", *flags).wait_ready()
        self.addCleanup(self.assert_clean_exit, server)
        return server

    def assert_clean_exit(self, server):
        self.assertEqual(server.stop(), 0, "server exit code on SIGTERM")

    def assert_serving(self, server):
        self.assertIsNone(server.proc.poll(), "server died")
        self.assertEqual(soak.serving_problems(server.target(), self.pb2), [])

    def info(self, channel):
        return self.pb2.GetInfoResponse.FromString(
            channel.unary_unary(SIM + "GetInfo")(b"", timeout=10))

    def message_class(self, name):
        for module in (self.pb2, health_pb2, reflection_pb2):
            if hasattr(module, name):
                return getattr(module, name)
        raise KeyError(name)

    # ---- garbage ----

    def test_garbage_on_every_method(self):
        server = self.start()
        ch = grpc.insecure_channel(server.target())
        self.addCleanup(ch.close)
        for path, (shape, request, code, details) in GARBAGE_STATUS.items():
            for name, data in garbage_payloads().items():
                with self.subTest(method=path, payload=name):
                    with self.assertRaises(DecodeError, msg="premise: protobuf rejects it"):
                        self.message_class(request).FromString(data)
                    got_code, got_details, responses = self.call_raw(ch, shape, path, [data])
                    print(f"  {path} <- {name}: {got_code} {got_details!r}", flush=True)
                    self.assertEqual(got_code, code)
                    self.assertIn(details, got_details)
                    self.assertEqual(responses, 0)

        # garbage after a valid first message, for the decoders of the data pieces
        req, _, _ = harness.make_request(self.pb2, 1, 4, 4, 8)
        header = self.pb2.UploadRequest(header=self.pb2.UploadHeader(request=req))
        header.header.request.a.ClearField("raw")
        header.header.request.b.ClearField("raw")
        gallery = self.pb2.RegisterGalleryRequest(header=self.pb2.GalleryHeader(
            name="abuse", shape=[4, 8]))
        for path, shape, first, details in (
                (SIM + "ComputeUpload", "ss", header, "malformed UploadRequest"),
                (SIM + "RegisterGallery", "su", gallery, "malformed RegisterGalleryRequest")):
            payloads = dict(garbage_payloads())
            payloads["truncated length"] = b"\x12\x64abc"  # field 2: a data piece
            for name, data in payloads.items():
                with self.subTest(method=path, payload="header, then " + name):
                    got_code, got_details, _ = self.call_raw(
                        ch, shape, path, [first.SerializeToString(), data])
                    print(f"  {path} <- header, {name}: {got_code} {got_details!r}", flush=True)
                    self.assertEqual(got_code, "INVALID_ARGUMENT")
                    self.assertIn(details, got_details)
        self.assert_serving(server)

    @staticmethod
    def call_raw(channel, shape, path, messages):
        """(status code name, details, number of responses) of a call sending raw bytes."""
        kwargs = {"timeout": 10}
        try:
            if shape == "uu":
                channel.unary_unary(path)(messages[0], **kwargs)
                return "OK", "", 1
            if shape == "su":
                channel.stream_unary(path)(iter(messages), **kwargs)
                return "OK", "", 1
            call = (channel.unary_stream(path)(messages[0], **kwargs) if shape == "us"
                    else channel.stream_stream(path)(iter(messages), **kwargs))
            n = sum(1 for _ in call)
            return call.code().name, call.details() or "", n
        except grpc.RpcError as e:
            return e.code().name, e.details() or "", 0

    # ---- many connections ----

    def test_300_concurrent_connections(self):
        connections, rounds = 300, 5
        server = self.start()
        base = loadlib.proc_resources(server.pid)["fds"]
        req, a, b = harness.make_request(self.pb2, 1, 8, 256, 128, seed=3)
        data, want = req.SerializeToString(), reference.sklearn_cosine(a, b)
        other = Liveness(server.target(), self.pb2)
        other.start()
        channels = [grpc.insecure_channel(server.target(),
                                          options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(connections)]
        try:
            def calls(ch):
                for _ in range(rounds):
                    resp = self.pb2.ComputeResponse.FromString(
                        ch.unary_unary(SIM + "Compute")(data, timeout=60))
                    got = np.frombuffer(resp.values_raw, dtype="<f4").reshape(want.shape)
                    if np.max(np.abs(got - want)) > 1e-5:
                        return "wrong result"
                    ch.unary_unary(HEALTH + "Check")(b"", timeout=60)
                return None

            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(64) as pool:
                results = list(pool.map(calls, channels))
            self.assertEqual([r for r in results if r], [])
            open_fds = loadlib.proc_resources(server.pid)["fds"]
            conns = established(server.port)
            print(f"  {connections} connections x {2 * rounds} calls in "
                  f"{time.monotonic() - t0:.1f} s; "
                  f"server fds {base} -> {open_fds}, established connections {conns}",
                  flush=True)
            self.assertGreaterEqual(conns, connections + 1)  # + the other client
            self.assertGreaterEqual(open_fds, base + connections)
            other.finish(self)
        finally:
            other.stop_event.set()
            for ch in channels:
                ch.close()
        settled = harness.wait_for(
            lambda: loadlib.proc_resources(server.pid)["fds"] <= base + 2, timeout=30,
            interval=0.2)
        print(f"  after closing: server fds {loadlib.proc_resources(server.pid)['fds']} "
              f"(baseline {base})", flush=True)
        self.assertTrue(settled, "the server's fds did not return to the baseline")
        self.assert_serving(server)

    # ---- slow readers ----

    def test_64_slow_reading_streams_bounded_memory(self):
        slow, window = 64, 3
        # 64 streams arriving at once are 64 new requests in the compute queue: its default
        # bound (64) leaves no room for the other clients' calls, so it is raised here.
        server = self.start(f"--stream_window={window}", "--max_queued_requests=256")
        ch = grpc.insecure_channel(server.target())
        self.addCleanup(ch.close)
        limits = self.info(ch).limits
        chunk = limits.default_chunk_bytes
        n, m, d = 4096, 4096, 16  # 64 MiB result, 512 KiB input
        req, a, b = harness.make_request(self.pb2, 1, n, m, d, seed=8)
        data = req.SerializeToString()
        rows = max(1, chunk // (m * 4))
        tile = rows * m * 4
        # Per call (server/README "Memory per call"): the inputs twice (gRPC keeps the received
        # message, the pipeline its aligned copy), `window` tiles computed but not written, and
        # one more tile inside gRPC's transport while it is being sent.
        per_call = 2 * (a.nbytes + b.nbytes) + (window + 1) * tile
        slack = 64 * MiB + slow * MiB  # thread stacks, gRPC's per-connection buffers, allocator
        bound = slow * per_call + slack
        want_first = reference.sklearn_cosine(a[:, :rows], b)[0]

        stream = ch.unary_stream(SIM + "ComputeStream")
        for _ in range(2):  # warm-up: primitives, buffer pool, allocator
            self.assertEqual(sum(1 for _ in stream(data, timeout=60)), n // rows)
        base = loadlib.proc_resources(server.pid)["rss_bytes"]
        sent0 = server.metrics().rpc("grpc_server_msg_sent_total", "ComputeStream")

        slow_channels = [grpc.insecure_channel(server.target(),
                                               options=[("grpc.use_local_subchannel_pool", 1)])
                         for _ in range(slow)]
        calls = []
        try:
            def open_slow(c):
                call = c.unary_stream(SIM + "ComputeStream")(data, timeout=300)
                first = self.pb2.ComputeChunk.FromString(next(call))
                return call, first

            with concurrent.futures.ThreadPoolExecutor(slow) as pool:
                opened = list(pool.map(open_slow, slow_channels))
            calls = [c for c, _ in opened]
            for _, first in opened:
                self.assertEqual((first.batch_index, first.row_offset, first.row_count),
                                 (0, 0, rows))
                got = np.frombuffer(first.values_raw, dtype="<f4").reshape(rows, m)
                self.assertLess(np.max(np.abs(got - want_first)), 1e-5)
            other = Liveness(server.target(), self.pb2)
            other.start()
            small, sa, sb = harness.make_request(self.pb2, 1, 256, 512, 32, seed=9,
                                                 max_chunk_bytes=64 << 10)
            tiles = [self.pb2.ComputeChunk.FromString(x)
                     for x in stream(small.SerializeToString(), timeout=60)]
            got = np.concatenate([np.frombuffer(t.values_raw, dtype="<f4") for t in tiles])
            self.assertLess(np.max(np.abs(got.reshape(256, 512)
                                          - reference.sklearn_cosine(sa, sb)[0])), 1e-5)
            # the slow calls have filled their windows and the transport's: RSS is at its peak
            peak = 0
            for _ in range(25):
                peak = max(peak, loadlib.proc_resources(server.pid)["rss_bytes"])
                time.sleep(0.2)
            other.finish(self)
            sent = server.metrics().rpc("grpc_server_msg_sent_total", "ComputeStream") - sent0
            print(f"  {slow} slow streams: RSS {base / MiB:.0f} -> peak {peak / MiB:.0f} MiB "
                  f"(+{(peak - base) / MiB:.0f}, bound {bound / MiB:.0f} = {slow} x "
                  f"{per_call / MiB:.2f} + {slack / MiB:.0f} slack); {sent:.0f} chunks sent of "
                  f"{slow * n // rows} ({sent / slow:.1f} per stream)", flush=True)
            # premise: the streams are really stalled (backpressure), far from complete
            self.assertLess(sent, slow * (n // rows) / 2)
            self.assertLessEqual(peak - base, bound)
        finally:
            for call in calls:
                call.cancel()
        self.assertTrue(harness.wait_for(
            lambda: server.metrics().get("simserve_requests_in_flight") == 0, timeout=30))
        for call in calls:
            self.assertEqual(call.code(), grpc.StatusCode.CANCELLED)
        for c in slow_channels:
            c.close()
        self.assert_serving(server)
        time.sleep(10)
        after = loadlib.proc_resources(server.pid)["rss_bytes"]
        print(f"  10 s after the cancels: RSS {after / MiB:.0f} MiB (baseline {base / MiB:.0f}; "
              "not asserted: giving memory back is issue 11's 'Memory given back')", flush=True)

    # ---- receive limit ----

    def test_message_over_the_receive_limit(self):
        server = self.start()
        options = [("grpc.max_send_message_length", -1),
                   ("grpc.max_receive_message_length", -1)]
        ch = grpc.insecure_channel(server.target(), options=options)
        self.addCleanup(ch.close)
        limits = self.info(ch).limits
        limit, overhead = limits.max_receive_message_bytes, limits.message_overhead_bytes
        d = 1024
        b = np.random.default_rng(1).standard_normal((1, 1, d), dtype=np.float32)

        def request(a_bytes):
            a = np.random.default_rng(2).standard_normal((1, a_bytes // (4 * d), d),
                                                         dtype=np.float32)
            return a, self.pb2.ComputeRequest(
                a=self.pb2.Tensor(shape=a.shape, raw=a.tobytes()),
                b=self.pb2.Tensor(shape=b.shape, raw=b.tobytes())).SerializeToString()

        # just under: payload + message_overhead_bytes within the limit -> computed
        fits = (limit - overhead - b.nbytes) // (4 * d) * (4 * d)
        a, data = request(fits)
        self.assertLessEqual(len(data), limit)
        resp = self.pb2.ComputeResponse.FromString(
            ch.unary_unary(SIM + "Compute")(data, timeout=120))
        got = np.frombuffer(resp.values_raw, dtype="<f4").reshape(tuple(resp.shape))
        self.assertLess(np.max(np.abs(got - reference.sklearn_cosine(a, b))), 1e-5)

        # over: Compute with A one row more than the limit, an upload piece over the limit
        _, data = request(limit + 4 * d)
        self.assertGreater(len(data), limit)
        piece = self.pb2.UploadRequest(a_data=bytes(limit + 1)).SerializeToString()
        header = self.pb2.UploadRequest(header=self.pb2.UploadHeader(
            request=self.pb2.ComputeRequest(
                a=self.pb2.Tensor(shape=[1, (limit + 4 * d) // (4 * d), d]),
                b=self.pb2.Tensor(shape=[1, 1, d]))))
        for path, shape, messages in ((SIM + "Compute", "uu", [data]),
                                      (SIM + "ComputeUpload", "ss",
                                       [header.SerializeToString(), piece])):
            with self.subTest(method=path):
                code, details, _ = self.call_raw(ch, shape, path, messages)
                print(f"  {path} with a {len(messages[-1]) / MiB:.1f} MiB message (limit "
                      f"{limit / MiB:.0f} MiB): {code} {details!r}", flush=True)
                self.assertEqual(code, "RESOURCE_EXHAUSTED")
                self.assertIn("larger than max", details)
        self.assert_serving(server)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    args, rest = parser.parse_known_args()
    SERVER = args.server
    unittest.main(argv=[sys.argv[0], "-v", *rest])
