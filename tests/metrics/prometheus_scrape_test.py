#!/usr/bin/env python3
"""A real Prometheus (Debian `prometheus`) on loopback scrapes a real simserve every second; its
HTTP API must report the handled counts the test produced and a histogram quantile equal to the
one computed here (independently) from the server's own buckets. The example alert/recording
rules of deploy/prometheus are loaded and must evaluate without errors.

Usage: prometheus_scrape_test.py --server path/to/simserve
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.parse
import urllib.request

import grpc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402  pylint: disable=wrong-import-position

SERVER = None
RULES = os.path.join(harness.ROOT, "deploy", "prometheus", "simserve-alerts.yml")


class Prometheus:
    """`prometheus` on 127.0.0.1:<free port> with a temp config and TSDB; stop() cleans up."""

    def __init__(self, metrics_port):
        binary = shutil.which("prometheus")
        if binary is None:
            raise RuntimeError("prometheus missing (Debian prometheus; scripts/setup.sh)")
        self.dir = tempfile.TemporaryDirectory(prefix="simserve-prom-")
        self.port = harness.free_port()
        config = os.path.join(self.dir.name, "prometheus.yml")
        with open(config, "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - {RULES}
scrape_configs:
  - job_name: simserve
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
        self.log = open(os.path.join(self.dir.name, "prometheus.log"), "w+")
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}",
             f"--storage.tsdb.path={os.path.join(self.dir.name, 'data')}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def api(self, path, **params):
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read().decode())

    def query(self, expr):
        """Instant query; list of (labels, float value)."""
        body = self.api("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return [(r["metric"], float(r["value"][1])) for r in body["data"]["result"]]

    def wait_ready(self, timeout=60):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("prometheus exited:\n" + self.output())
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready",
                                            timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False
        if not harness.wait_for(ready, timeout, interval=0.2):
            raise RuntimeError("prometheus not ready:\n" + self.output())

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.dir.cleanup()


def value_of(results):
    return results[0][1] if len(results) == 1 else None


class PrometheusScrape(unittest.TestCase):
    def test_prometheus_sees_counts_and_quantiles(self):
        pb2, pb2_grpc = harness.load_stubs()
        with harness.Server(SERVER, "--warmup=false", "--workers=1",
                            "--threads_per_worker=1") as server, \
                grpc.insecure_channel(server.target()) as channel:
            stub = pb2_grpc.SimilarityStub(channel)
            shapes = [(1, 8, 256, 128), (1, 32, 512, 64), (2, 16, 64, 32)]
            for i in range(12):
                req, _, _ = harness.make_request(pb2, *shapes[i % 3], seed=i)
                stub.Compute(req, timeout=30)
            bad, _, _ = harness.make_request(pb2, 1, 4, 4, 8)
            bad.a.shape[:] = [1, 4, 9]
            for _ in range(2):
                with self.assertRaises(grpc.RpcError) as err:
                    stub.Compute(bad, timeout=10)
                self.assertEqual(err.exception.code(), grpc.StatusCode.INVALID_ARGUMENT)
            harness.wait_for(lambda: server.metrics().get("simserve_requests_in_flight") == 0)
            direct = server.metrics()

            prom = Prometheus(server.metrics_port)
            try:
                prom.wait_ready()
                ok_expr = ('grpc_server_handled_total{job="simserve",grpc_service='
                           '"simserve.v1.Similarity",grpc_method="Compute",grpc_code="OK"}')
                self.assertTrue(harness.wait_for(lambda: value_of(prom.query(ok_expr)) == 12,
                                                 timeout=30, interval=0.25),
                                f"{prom.query(ok_expr)}\n{prom.output()}")
                self.assertEqual(value_of(prom.query(
                    'grpc_server_handled_total{grpc_method="Compute",grpc_code="InvalidArgument"}'
                )), 2)
                self.assertEqual(value_of(prom.query(
                    'sum(grpc_server_handled_total{grpc_service="simserve.v1.Similarity"})')), 14)
                self.assertEqual(value_of(prom.query('up{job="simserve"}')), 1)

                # Quantiles over the cumulative buckets: Prometheus vs. our own interpolation.
                buckets = [(float(s["le"]), direct.get("grpc_server_handling_seconds_bucket", **s))
                           for s in direct.series("grpc_server_handling_seconds_bucket")
                           if s["grpc_method"] == "Compute"]
                self.assertEqual(len(buckets), 15)
                for q in (0.5, 0.9, 0.99):
                    got = value_of(prom.query(
                        f'histogram_quantile({q}, sum by (le) (grpc_server_handling_seconds_bucket'
                        f'{{grpc_method="Compute"}}))'))
                    want = harness.histogram_quantile(q, buckets)
                    self.assertTrue(math.isclose(got, want, rel_tol=1e-9), (q, got, want))

                # Traffic while Prometheus watches: the rate-based p95 becomes a finite value
                # within the bucket range, and the recording rule sees the Compute rate.
                t_end = time.monotonic() + 4
                while time.monotonic() < t_end:
                    req, _, _ = harness.make_request(pb2, 1, 8, 256, 128)
                    stub.Compute(req, timeout=30)
                    time.sleep(0.05)
                p95 = ('histogram_quantile(0.95, sum by (le) (rate(grpc_server_handling_seconds'
                       '_bucket{grpc_method="Compute"}[30s])))')
                got = harness.wait_for(lambda: value_of(prom.query(p95)) is not None
                                       and math.isfinite(value_of(prom.query(p95))), 20, 0.25)
                self.assertTrue(got, prom.query(p95))
                self.assertGreater(value_of(prom.query(p95)), 0)
                self.assertLessEqual(value_of(prom.query(p95)), 10)
                self.assertTrue(harness.wait_for(
                    lambda: (value_of(prom.query(
                        'simserve:grpc_requests:rate5m{grpc_method="Compute"}')) or 0) > 0,
                    20, 0.25))
                rules = prom.api("/api/v1/rules")["data"]["groups"]
                self.assertEqual({g["name"] for g in rules},
                                 {"simserve.recording", "simserve.alerts"})
                bad_rules = [r for g in rules for r in g["rules"] if r.get("health") == "err"]
                self.assertEqual(bad_rules, [])
            finally:
                prom.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    args, rest = parser.parse_known_args()
    SERVER = args.server
    unittest.main(argv=[sys.argv[0], "-v", *rest])
