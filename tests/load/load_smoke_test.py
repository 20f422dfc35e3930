#!/usr/bin/env python3
"""Bounded ghz smoke load (a few seconds): small unary Compute at concurrency 4, a few large
server-streaming calls and the empty-handler baseline (grpc.health.v1.Health/Check) against a
real simserve on loopback. Asserts zero errors and that the server's metrics moved by exactly the
counts ghz reports (calls per method and code, streamed messages, flops).

Usage: load_smoke_test.py --server path/to/simserve
"""
import argparse
import os
import sys
import tempfile
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_requests  # noqa: E402  pylint: disable=wrong-import-position
import loadlib  # noqa: E402  pylint: disable=wrong-import-position
from loadlib import harness  # noqa: E402  pylint: disable=wrong-import-position

SERVER = None
HEALTH = "grpc.health.v1.Health"


class LoadSmoke(unittest.TestCase):
    def test_ghz_counts_match_server_metrics(self):
        ghz = loadlib.find_ghz()
        with tempfile.TemporaryDirectory(prefix="simserve-load-") as tmp:
            profiles = gen_requests.generate(tmp)
            protoset = loadlib.health_protoset(os.path.join(tmp, "health.protoset"))
            with harness.Server(SERVER, "--warmup=false", "--workers=1") as server:
                before = server.metrics()
                small = loadlib.summarise(loadlib.run_ghz(
                    ghz, server.target(), "simserve.v1.Similarity/Compute",
                    binary_file=profiles["small"]["file"], total=200, concurrency=4, cpus=1))
                large = loadlib.summarise(loadlib.run_ghz(
                    ghz, server.target(), "simserve.v1.Similarity/ComputeStream",
                    binary_file=profiles["large"]["file"], total=4, concurrency=2, cpus=1))
                health = loadlib.summarise(loadlib.run_ghz(
                    ghz, server.target(), loadlib.HEALTH_CALL, data={}, protoset=protoset,
                    total=200, concurrency=4, cpus=1))
                self.assertTrue(harness.wait_for(
                    lambda: server.metrics().get("simserve_requests_in_flight") == 0))
                after = server.metrics()

        for name, s, n in (("small", small, 200), ("large", large, 4), ("health", health, 200)):
            print(f"{name}: {s['count']} calls, {s['rps']:.1f} rps, p50 {s['p50']:.2f} ms, "
                  f"p99 {s['p99']:.2f} ms, codes {s['codes']}")
            self.assertEqual(s["count"], n, name)
            self.assertEqual(s["errors"], 0, f"{name}: {s['codes']} {s['error_dist']}")

        d = lambda fn: fn(after) - fn(before)  # noqa: E731
        self.assertEqual(d(lambda m: m.handled("Compute", "OK")), small["ok"])
        self.assertEqual(d(lambda m: m.rpc("grpc_server_started_total", "Compute")), small["count"])
        self.assertEqual(d(lambda m: m.handled("ComputeStream", "OK")), large["ok"])
        self.assertEqual(d(lambda m: m.rpc("grpc_server_msg_sent_total", "ComputeStream")),
                         large["ok"] * profiles["large"]["chunks"])
        self.assertEqual(d(lambda m: m.handled("Check", "OK", service=HEALTH)), health["ok"])
        self.assertEqual(d(lambda m: m.sum("grpc_server_handled_total")),
                         small["count"] + large["count"] + health["count"])
        self.assertEqual(d(lambda m: m.sum("grpc_server_handled_total", grpc_code="OK")),
                         small["count"] + large["count"] + health["count"])
        self.assertEqual(d(lambda m: m.get("simserve_flops_total")),
                         small["ok"] * profiles["small"]["flops"]
                         + large["ok"] * profiles["large"]["flops"])
        self.assertEqual(d(lambda m: m.get("simserve_sent_bytes_total")),
                         small["ok"] * profiles["small"]["out_bytes"]
                         + large["ok"] * profiles["large"]["out_bytes"])
        self.assertEqual(d(lambda m: m.sum("simserve_rejected_requests_total")), 0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    args, rest = parser.parse_known_args()
    SERVER = args.server
    unittest.main(argv=[sys.argv[0], "-v", *rest])
