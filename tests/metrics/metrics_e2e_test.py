#!/usr/bin/env python3
"""End-to-end check of simserve's /metrics: a real server on loopback ephemeral ports gets a known
set of calls (OK, invalid, rejected, cancelled, unknown method); after each phase the scraped
values must have moved by exactly the expected amounts (computed here from the requests
themselves, not from the server). Finally `promtool check metrics` lints the live exposition.

Usage: metrics_e2e_test.py --server path/to/simserve
"""
import argparse
import os
import shutil
import subprocess
import sys
import time
import unittest

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  pylint: disable=wrong-import-position

SERVER = None
CODES = ["OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
         "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted",
         "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"]
# Methods with pre-created series: 11 Similarity, Health Check and Watch, reflection's one,
# 13 of inference.GRPCInferenceService.
SERIES_METHODS = 11 + 2 + 1 + 13
MAX_FLOPS = 50_000_000  # small limit so a modest request is rejected


def flops(batch, n, m, d):
    return 2 * batch * n * m * d


class MetricsEndToEnd(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.pb2, cls.pb2_grpc = harness.load_stubs()
        cls.server = harness.Server(SERVER, "--warmup=false", "--workers=1",
                                    "--threads_per_worker=1", f"--max_flops={MAX_FLOPS}",
                                    "--drain_grace=5s").wait_ready()
        cls.channel = grpc.insecure_channel(cls.server.target())
        cls.stub = cls.pb2_grpc.SimilarityStub(cls.channel)
        cls.health = health_pb2_grpc.HealthStub(cls.channel)

    @classmethod
    def tearDownClass(cls):
        cls.channel.close()
        rc = cls.server.stop()
        if rc != 0:
            print("".join(cls.server.log), file=sys.stderr)

    def delta(self, before, after, fn):
        return fn(after) - fn(before)

    def settle(self):
        """Scrape once the server is idle (in-flight is decremented after the client's status)."""
        ok = harness.wait_for(lambda: self.server.metrics().get("simserve_requests_in_flight") == 0
                              and self.server.metrics().get("simserve_queue_depth") == 0)
        self.assertTrue(ok, "server did not become idle")
        return self.server.metrics()

    def test_1_precreated_series_and_build_info(self):
        m = self.server.metrics()
        services = {s["grpc_service"] for s in m.series("grpc_server_handled_total")}
        self.assertEqual(services, {harness.SERVICE, "grpc.health.v1.Health",
                                    "grpc.reflection.v1alpha.ServerReflection",
                                    "inference.GRPCInferenceService"})
        self.assertEqual(len(m.series("grpc_server_handled_total")), SERIES_METHODS * len(CODES))
        for method, gtype in [("ModelInfer", "unary"), ("ModelStreamInfer", "bidi_stream"),
                              ("SystemSharedMemoryRegister", "unary")]:
            self.assertIn({"grpc_method": method, "grpc_service": "inference.GRPCInferenceService",
                           "grpc_type": gtype, "grpc_code": "OK"},
                          m.series("grpc_server_handled_total"), method)
        for method, gtype in [("Compute", "unary"), ("ComputeStream", "server_stream"),
                              ("ComputeUpload", "bidi_stream"), ("GetInfo", "unary"),
                              ("RegisterGallery", "client_stream"), ("GetGallery", "unary"),
                              ("ListGalleries", "unary"), ("DeleteGallery", "unary")]:
            for code in CODES:
                m.get("grpc_server_handled_total", grpc_service=harness.SERVICE,
                      grpc_method=method, grpc_type=gtype, grpc_code=code)
        info = self.stub.GetInfo(self.pb2.GetInfoRequest(), timeout=10)
        build = m.series("simserve_build_info")
        self.assertEqual(len(build), 1)
        self.assertEqual(build[0]["version"], info.version)
        self.assertEqual(build[0]["onednn_version"], info.onednn_version)
        self.assertEqual(build[0]["isa"], info.cpu_isa)
        self.assertEqual(m.get("simserve_build_info", **build[0]), 1)
        buckets = sorted(float(s["le"]) for s in m.series("simserve_request_seconds_bucket"))
        self.assertEqual(buckets[0], 0.0005)
        self.assertEqual(buckets[-2], 10.0)

    def test_2_ok_calls_move_every_family_exactly(self):
        before = self.settle()
        unary = [(1, 8, 256, 128), (2, 5, 7, 3), (1, 8, 256, 128)]
        sent_bytes = recv_bytes = total_flops = 0
        for i, shape in enumerate(unary):
            req, a, b = harness.make_request(self.pb2, *shape, seed=i)
            resp = self.stub.Compute(req, timeout=30)
            batch, n, m_, d = shape
            self.assertEqual(list(resp.shape), [batch, n, m_])
            # Cosine against an independent numpy reference (sanity that the calls were real).
            an = a / np.linalg.norm(a, axis=2, keepdims=True)
            bn = b / np.linalg.norm(b, axis=2, keepdims=True)
            got = np.frombuffer(resp.values_raw, np.float32).reshape(batch, n, m_)
            np.testing.assert_allclose(got, an @ bn.transpose(0, 2, 1), atol=1e-4)
            sent_bytes += len(resp.values_raw) + len(resp.indices_raw)
            recv_bytes += a.nbytes + b.nbytes
            total_flops += flops(*shape)
        mid = self.settle()
        unary_tiles = self.delta(before, mid, lambda m: m.get("simserve_tiles_streamed_total"))

        chunks = 0
        for i, (shape, chunk_bytes) in enumerate([((1, 64, 100, 32), 6400), ((2, 10, 50, 16), 0)]):
            req, a, b = harness.make_request(self.pb2, *shape, seed=10 + i,
                                             max_chunk_bytes=chunk_bytes)
            got = list(self.stub.ComputeStream(req, timeout=30))
            rows = sum(c.row_count for c in got)
            self.assertEqual(rows, shape[0] * shape[1])
            chunks += len(got)
            sent_bytes += sum(len(c.values_raw) + len(c.indices_raw) for c in got)
            recv_bytes += a.nbytes + b.nbytes
            total_flops += flops(*shape)
        self.assertEqual(chunks, 4 + 2)  # 6400 B = 16 rows of 100 floats -> 4; default -> 1/batch

        # ComputeUpload: header + B in 3 pieces + A in 2 pieces = 6 messages up.
        shape = (1, 40, 30, 16)
        full, a, b = harness.make_request(self.pb2, *shape, seed=20, max_chunk_bytes=30 * 4 * 10)
        header = self.pb2.ComputeRequest()
        header.CopyFrom(full)
        header.a.ClearField("raw")
        header.b.ClearField("raw")
        braw, araw = b.tobytes(), a.tobytes()
        pieces = [self.pb2.UploadRequest(header=self.pb2.UploadHeader(request=header))]
        self.assertEqual(len(braw), 1920)
        pieces += [self.pb2.UploadRequest(b_data=braw[i:i + 700]) for i in (0, 700, 1400)]
        pieces += [self.pb2.UploadRequest(a_data=araw[:1234]), self.pb2.UploadRequest(
            a_data=araw[1234:])]
        up = list(self.stub.ComputeUpload(iter(pieces), timeout=30))
        self.assertEqual(sum(c.row_count for c in up), 40)
        self.assertEqual(len(up), 4)  # 10 rows of 30 floats per 1200-byte chunk
        sent_bytes += sum(len(c.values_raw) + len(c.indices_raw) for c in up)
        recv_bytes += a.nbytes + b.nbytes
        total_flops += flops(*shape)
        after = self.settle()

        d = lambda fn: self.delta(before, after, fn)  # noqa: E731
        self.assertEqual(d(lambda m: m.handled("Compute", "OK")), 3)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_started_total", "Compute")), 3)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_msg_received_total", "Compute")), 3)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_msg_sent_total", "Compute")), 3)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_handling_seconds_count", "Compute")), 3)
        self.assertEqual(d(lambda m: m.handled("ComputeStream", "OK")), 2)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_msg_received_total", "ComputeStream")), 2)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_msg_sent_total", "ComputeStream")), chunks)
        self.assertEqual(d(lambda m: m.handled("ComputeUpload", "OK")), 1)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_msg_received_total", "ComputeUpload")), 6)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_msg_sent_total", "ComputeUpload")), 4)
        for code in CODES[1:]:
            self.assertEqual(d(lambda m, c=code: m.sum("grpc_server_handled_total", grpc_code=c)),
                             0, code)
        self.assertEqual(d(lambda m: m.get("simserve_flops_total")), total_flops)
        self.assertEqual(d(lambda m: m.get("simserve_received_bytes_total")), recv_bytes)
        self.assertEqual(d(lambda m: m.get("simserve_sent_bytes_total")), sent_bytes)
        self.assertEqual(d(lambda m: m.get("simserve_request_seconds_count")), 6)
        self.assertEqual(d(lambda m: m.get("simserve_compute_seconds_count")), 6)
        self.assertEqual(d(lambda m: m.get("simserve_queue_wait_seconds_count")), 6)
        self.assertEqual(d(lambda m: m.get("simserve_write_seconds_count")), 3)
        self.assertEqual(self.delta(mid, after, lambda m: m.get("simserve_tiles_streamed_total")),
                         chunks + len(up))
        # Unary results are one message; the server counts them as 0 or one tile per batch.
        self.assertIn(unary_tiles, (0, sum(s[0] for s in unary)))
        self.assertEqual(after.get("simserve_requests_in_flight"), 0)
        self.assertEqual(after.get("simserve_queue_depth"), 0)
        self.assertGreaterEqual(
            after.get("simserve_request_seconds_bucket", le="+Inf"),
            after.get("simserve_request_seconds_bucket", le="10"))

    def test_3_invalid_and_rejected_calls(self):
        before = self.settle()
        bad_d, _, _ = harness.make_request(self.pb2, 1, 4, 4, 8)
        bad_d.b.shape[2] = 4  # D mismatch (byte length also wrong)
        nan_req, a, _ = harness.make_request(self.pb2, 1, 4, 4, 8)
        a[0, 2, 3] = np.nan
        nan_req.a.raw = a.tobytes()
        codes = []
        for req in (bad_d, nan_req):
            with self.assertRaises(grpc.RpcError) as err:
                self.stub.Compute(req, timeout=10)
            codes.append(err.exception.code())
        with self.assertRaises(grpc.RpcError) as err:
            list(self.stub.ComputeStream(nan_req, timeout=10))
        codes.append(err.exception.code())
        self.assertEqual(codes, [grpc.StatusCode.INVALID_ARGUMENT] * 3)
        # Over --max_flops: rejected by admission control.
        big, _, _ = harness.make_request(self.pb2, 1, 64, 64, 8192)
        self.assertGreater(flops(1, 64, 64, 8192), MAX_FLOPS)
        with self.assertRaises(grpc.RpcError) as err:
            self.stub.Compute(big, timeout=10)
        self.assertEqual(err.exception.code(), grpc.StatusCode.RESOURCE_EXHAUSTED)
        after = self.settle()

        d = lambda fn: self.delta(before, after, fn)  # noqa: E731
        self.assertEqual(d(lambda m: m.handled("Compute", "InvalidArgument")), 2)
        self.assertEqual(d(lambda m: m.handled("ComputeStream", "InvalidArgument")), 1)
        self.assertEqual(d(lambda m: m.handled("Compute", "ResourceExhausted")), 1)
        self.assertEqual(d(lambda m: m.sum("grpc_server_handled_total", grpc_code="OK")), 0)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_started_total", "Compute")), 3)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_msg_sent_total", "Compute")), 0)
        self.assertEqual(d(lambda m: m.rpc("grpc_server_msg_sent_total", "ComputeStream")), 0)
        self.assertEqual(d(lambda m: m.get("simserve_rejected_requests_total",
                                           reason="too_many_flops")), 1)
        self.assertEqual(d(lambda m: m.sum("simserve_rejected_requests_total")), 1)
        self.assertEqual(d(lambda m: m.get("simserve_flops_total")), 0)
        self.assertEqual(d(lambda m: m.get("simserve_sent_bytes_total")), 0)
        self.assertEqual(d(lambda m: m.get("simserve_compute_seconds_count")), 0)

    def test_4_cancelled_and_deadline_calls(self):
        before = self.settle()
        # 1 x 8192 x 1024 output (32 MiB) in 4 KiB chunks (1 row each): far more than fits in
        # flow control, so the server is mid-stream when the client cancels after one chunk.
        req, _, _ = harness.make_request(self.pb2, 1, 8192, 1024, 2, max_chunk_bytes=4096)
        call = self.stub.ComputeStream(req, timeout=30)
        first = next(call)
        self.assertEqual(first.row_count, 1)
        call.cancel()
        self.assertTrue(harness.wait_for(
            lambda: self.delta(before, self.server.metrics(),
                               lambda m: m.rpc("grpc_server_handling_seconds_count",
                                               "ComputeStream")) == 1))
        after = self.settle()
        d = lambda fn: self.delta(before, after, fn)  # noqa: E731
        self.assertEqual(d(lambda m: m.rpc("grpc_server_started_total", "ComputeStream")), 1)
        self.assertEqual(d(lambda m: m.handled("ComputeStream", "Canceled")), 1)
        self.assertEqual(d(lambda m: m.sum("grpc_server_handled_total")), 1)
        sent_msgs = d(lambda m: m.rpc("grpc_server_msg_sent_total", "ComputeStream"))
        self.assertGreaterEqual(sent_msgs, 1)
        self.assertLess(sent_msgs, 8192)

        # A deadline that expires while the client is not reading (the server is blocked on
        # flow control mid-stream): DeadlineExceeded on the client; the server ends the call
        # as DeadlineExceeded or Canceled.
        before = after
        slow, _, _ = harness.make_request(self.pb2, 1, 8192, 1024, 2, max_chunk_bytes=4096)
        call = self.stub.ComputeStream(slow, timeout=0.3)
        with self.assertRaises(grpc.RpcError) as err:
            next(call)
            time.sleep(0.6)
            list(call)
        self.assertEqual(err.exception.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
        self.assertTrue(harness.wait_for(
            lambda: self.delta(before, self.server.metrics(),
                               lambda m: m.sum("grpc_server_handled_total")) == 1))
        after = self.settle()
        d = lambda fn: self.delta(before, after, fn)  # noqa: E731
        self.assertEqual(d(lambda m: m.handled("ComputeStream", "DeadlineExceeded"))
                         + d(lambda m: m.handled("ComputeStream", "Canceled")), 1)

    def test_5_health_unknown_methods_and_promtool(self):
        before = self.server.metrics()
        for _ in range(4):
            resp = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            self.assertEqual(resp.status, health_pb2.HealthCheckResponse.SERVING)
        unknown = self.channel.unary_unary("/evil.Service/Method")
        with self.assertRaises(grpc.RpcError) as err:
            unknown(b"", timeout=5)
        self.assertEqual(err.exception.code(), grpc.StatusCode.UNIMPLEMENTED)
        after = self.server.metrics()
        self.assertEqual(self.delta(before, after, lambda m: m.handled(
            "Check", "OK", service="grpc.health.v1.Health")), 4)
        self.assertNotIn("evil", after.text)
        self.assertEqual(len(after.series("grpc_server_handled_total")), SERIES_METHODS * len(CODES))

        promtool = shutil.which("promtool")
        self.assertIsNotNone(promtool, "promtool missing (Debian prometheus; scripts/setup.sh)")
        lint = subprocess.run([promtool, "check", "metrics"], input=after.text,
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(lint.returncode, 0, lint.stdout + lint.stderr)
        self.assertEqual(lint.stdout.strip() + lint.stderr.strip(), "")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    args, rest = parser.parse_known_args()
    SERVER = args.server
    unittest.main(argv=[sys.argv[0], "-v", *rest])
