#!/usr/bin/env python3
"""End-to-end test of simserve-cli: starts a real `simserve` on a free loopback port, runs
the CLI on .npy files written by numpy, and checks the .npy results against numpy/sklearn.

Usage: cli_test.py --cli path/to/simserve-cli --server path/to/simserve
"""
import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np
from sklearn.metrics.pairwise import cosine_similarity, euclidean_distances

ARGS = None


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CliTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="simserve_cli_test_")
        cls.dir = cls.tmp.name
        cls.server = None
        for _ in range(3):  # the free port may be taken between probe and bind: retry
            port = free_port()
            cls.target = f"127.0.0.1:{port}"
            with open(os.path.join(cls.dir, "server.log"), "w") as log:
                server = subprocess.Popen(
                    [ARGS.server, f"--listen={cls.target}", "--metrics_listen=",
                     "--workers=1", "--threads_per_worker=2"],
                    stdout=subprocess.DEVNULL, stderr=log)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and server.poll() is None:
                probe = subprocess.run([ARGS.cli, f"--target={cls.target}", "--info",
                                        "--connect_timeout_ms=500", "--timeout_ms=2000"],
                                       capture_output=True, text=True)
                if probe.returncode == 0:
                    cls.server = server
                    cls.info = probe.stdout
                    return
                time.sleep(0.2)
            server.kill()
            server.wait()
        raise RuntimeError("simserve did not start: " +
                           open(os.path.join(cls.dir, "server.log")).read()[-2000:])

    @classmethod
    def tearDownClass(cls):
        if cls.server is not None:
            cls.server.terminate()
            try:
                code = cls.server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                cls.server.kill()
                cls.server.wait()
                raise
            assert code == 0, f"simserve exited with {code} after SIGTERM"
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def save(self, name, array):
        np.save(self.path(name), array)
        return self.path(name)

    def cli(self, *flags, expect=0):
        proc = subprocess.run([ARGS.cli, f"--target={self.target}", *flags],
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, expect,
                         f"simserve-cli {' '.join(flags)}\nstdout: {proc.stdout}\n"
                         f"stderr: {proc.stderr}")
        return proc

    def test_info_prints_server_facts(self):
        self.assertIn("onednn_version", self.info)
        self.assertIn("max_receive_message_bytes", self.info)
        self.assertRegex(self.info, r"message_overhead_bytes +4096")
        self.assertIn("COSINE", self.info)

    def test_cosine_3d_matches_sklearn_in_every_mode(self):
        rng = np.random.default_rng(1)
        a = rng.standard_normal((3, 40, 16), dtype=np.float32)
        b = rng.standard_normal((3, 30, 16), dtype=np.float32)
        a[1, 5] = 0  # zero row: sklearn gives 0
        fa, fb = self.save("a.npy", a), self.save("b.npy", b)
        want = np.stack([cosine_similarity(a[k], b[k]) for k in range(3)])
        outputs = {}
        for mode in ("auto", "unary", "stream", "upload"):
            out = self.path(f"s_{mode}.npy")
            proc = self.cli(f"--a={fa}", f"--b={fb}", f"--out={out}", "--metric=cosine",
                            f"--mode={mode}", "--max_chunk_bytes=1000")
            self.assertIn("client wall", proc.stdout)
            self.assertIn("server queue", proc.stdout)
            self.assertRegex(proc.stdout, r"total \d+\.\d+ ms")
            self.assertIn("MB/s", proc.stdout)
            got = np.load(out)
            self.assertEqual(got.dtype, np.float32)
            self.assertEqual(got.shape, (3, 40, 30))
            np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
            self.assertTrue(np.all(got[1, 5] == 0))
            outputs[mode] = got
        for mode in ("stream", "upload"):
            np.testing.assert_array_equal(outputs[mode], outputs["unary"])

    def test_float64_2d_euclidean_matches_sklearn(self):
        rng = np.random.default_rng(2)
        a = rng.standard_normal((25, 12))  # float64: converted to float32 by the CLI
        b = rng.standard_normal((19, 12))
        out = self.path("e.npy")
        self.cli(f"--a={self.save('a64.npy', a)}", f"--b={self.save('b64.npy', b)}",
                 f"--out={out}", "--metric=euclidean")
        got = np.load(out)
        self.assertEqual(got.shape, (25, 19))
        want = euclidean_distances(a.astype(np.float32).astype(np.float64),
                                   b.astype(np.float32).astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

    def test_float16_inputs_and_float16_output(self):
        rng = np.random.default_rng(3)
        a = rng.standard_normal((2, 10, 32)).astype(np.float16)
        b = rng.standard_normal((2, 14, 32)).astype(np.float16)
        out = self.path("h.npy")
        self.cli(f"--a={self.save('a16.npy', a)}", f"--b={self.save('b16.npy', b)}",
                 f"--out={out}", "--metric=dot", "--output_dtype=float16")
        got = np.load(out)
        self.assertEqual(got.dtype, np.float16)
        want = np.einsum("kid,kjd->kij", a.astype(np.float64), b.astype(np.float64))
        np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-3, atol=2e-2)

    def test_bfloat16_output_is_written_as_float32_with_a_note(self):
        rng = np.random.default_rng(4)
        a = rng.standard_normal((2, 8, 20), dtype=np.float32)
        b = rng.standard_normal((2, 9, 20), dtype=np.float32)
        out = self.path("bf.npy")
        proc = self.cli(f"--a={self.save('a.npy', a)}", f"--b={self.save('b.npy', b)}",
                        f"--out={out}", "--output_dtype=bfloat16", "--precision=bf16")
        self.assertIn("bfloat16", proc.stderr)
        got = np.load(out)
        self.assertEqual(got.dtype, np.float32)
        # Every value must be exactly representable in bfloat16 (low 16 bits zero).
        self.assertTrue(np.all(got.view(np.uint32) & 0xFFFF == 0))
        want = np.stack([cosine_similarity(a[k], b[k]) for k in range(2)])
        np.testing.assert_allclose(got, want, atol=3e-2)

    def test_top_k_writes_values_and_indices(self):
        rng = np.random.default_rng(5)
        a = rng.standard_normal((2, 11, 8), dtype=np.float32)
        b = rng.standard_normal((2, 30, 8), dtype=np.float32)
        out = self.path("top.npy")
        proc = self.cli(f"--a={self.save('a.npy', a)}", f"--b={self.save('b.npy', b)}",
                        f"--out={out}", "--metric=sqeuclidean", "--top_k=4")
        self.assertIn("top.indices.npy", proc.stdout)
        values = np.load(out)
        indices = np.load(self.path("top.indices.npy"))
        self.assertEqual(values.shape, (2, 11, 4))
        self.assertEqual(indices.dtype, np.int32)
        d2 = np.stack([euclidean_distances(a[k].astype(np.float64), b[k].astype(np.float64),
                                           squared=True) for k in range(2)])
        want_idx = np.argsort(d2, axis=-1, kind="stable")[..., :4]
        np.testing.assert_array_equal(indices, want_idx)
        np.testing.assert_allclose(values, np.take_along_axis(d2, want_idx, -1),
                                   rtol=1e-4, atol=1e-4)

    def test_epsilon_reproduces_the_keras_clamp(self):
        rng = np.random.default_rng(6)
        a = rng.standard_normal((1, 4, 8), dtype=np.float32)
        a[0, 0] *= 1e-4
        b = rng.standard_normal((1, 5, 8), dtype=np.float32)
        out = self.path("eps.npy")
        self.cli(f"--a={self.save('a.npy', a)}", f"--b={self.save('b.npy', b)}",
                 f"--out={out}", "--epsilon=1e-3")
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        na = np.sqrt(np.maximum((a64 ** 2).sum(-1, keepdims=True), 1e-3))
        nb = np.sqrt(np.maximum((b64 ** 2).sum(-1, keepdims=True), 1e-3))
        want = np.einsum("kid,kjd->kij", a64 / na, b64 / nb)
        np.testing.assert_allclose(np.load(out), want, atol=2e-6)

    def test_server_errors_exit_1_with_the_servers_message(self):
        rng = np.random.default_rng(7)
        fa = self.save("a.npy", rng.standard_normal((2, 4, 8), dtype=np.float32))
        fb = self.save("b9.npy", rng.standard_normal((2, 5, 9), dtype=np.float32))
        out = self.path("never.npy")
        for mode in ("unary", "stream", "upload"):
            proc = self.cli(f"--a={fa}", f"--b={fb}", f"--mode={mode}", f"--out={out}",
                            "--top_k=2", expect=1)
            self.assertIn("INVALID_ARGUMENT", proc.stderr)
            self.assertIn("D mismatch", proc.stderr)
            # The result files, created before the call, are removed again.
            self.assertFalse(os.path.exists(out))
            self.assertFalse(os.path.exists(self.path("never.indices.npy")))
        nan = rng.standard_normal((2, 4, 8), dtype=np.float32)
        nan[1, 2, 3] = np.nan
        proc = self.cli(f"--a={self.save('nan.npy', nan)}", f"--b={fa}", expect=1)
        self.assertIn("INVALID_ARGUMENT", proc.stderr)

    def test_file_and_usage_errors(self):
        fa = self.save("a.npy", np.ones((2, 3), dtype=np.float32))
        proc = self.cli(f"--a={self.path('missing.npy')}", f"--b={fa}", expect=1)
        self.assertIn("missing.npy", proc.stderr)
        self.assertIn("NOT_FOUND", proc.stderr)
        fortran = self.save("f.npy", np.asfortranarray(np.ones((3, 2), dtype=np.float32)))
        proc = self.cli(f"--a={fortran}", f"--b={fa}", expect=1)
        self.assertIn("Fortran order", proc.stderr)
        proc = self.cli(f"--a={fa}", f"--b={fa}", "--metric=manhattan", expect=2)
        self.assertIn("--metric", proc.stderr)
        proc = self.cli(f"--a={fa}", expect=2)
        self.assertIn("--a and --b are required", proc.stderr)
        proc = self.cli(f"--a={fa}", f"--b={fa}", "--out=/nonexistent-dir/s.npy", expect=1)
        self.assertIn("/nonexistent-dir/s.npy", proc.stderr)

    def test_unreachable_server_is_unavailable(self):
        proc = subprocess.run([ARGS.cli, f"--target=127.0.0.1:{free_port()}", "--info",
                               "--connect_timeout_ms=300"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 1)
        self.assertIn("UNAVAILABLE", proc.stderr)

    def test_help_lists_the_flags(self):
        proc = subprocess.run([ARGS.cli, "--help"], capture_output=True, text=True, timeout=60)
        text = proc.stdout + proc.stderr
        for flag in ("--target", "--metric", "--output_dtype", "--precision", "--top_k",
                     "--epsilon", "--timeout_ms", "--mode", "--info"):
            self.assertIn(flag.lstrip("-"), text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cli", required=True)
    parser.add_argument("--server", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0], "-v", *rest])
