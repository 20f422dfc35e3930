#!/usr/bin/env python3
"""End-to-end test of simserve-cli: starts a real `simserve` on a free loopback port, runs
the CLI on .npy files written by numpy, and checks the .npy results against numpy/sklearn.
GalleryCliTest starts a second server with a --gallery_dir of numpy-written files.

Usage: cli_test.py --cli path/to/simserve-cli --server path/to/simserve
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import unittest

import numpy as np

from sklearn.metrics.pairwise import cosine_similarity, euclidean_distances

# Modes agree bit for bit only where oneDNN runs its brgemm kernels (AVX-512).
with open("/proc/cpuinfo") as _f:
    HAS_AVX512 = " avx512f" in _f.read()

ARGS = None


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(workdir, extra_args=(), cli_flags=()):
    """Starts simserve on a free loopback port; returns (process, target, --info text).
    `cli_flags` are what the CLI needs to reach it (e.g. TLS)."""
    for _ in range(3):  # the free port may be taken between probe and bind: retry
        port = free_port()
        target = f"127.0.0.1:{port}"
        with open(os.path.join(workdir, "server.log"), "w") as log:
            server = subprocess.Popen(
                [ARGS.server, f"--listen={target}", "--metrics_listen=",
                 "--workers=1", "--threads_per_worker=2", *extra_args],
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and server.poll() is None:
            probe = subprocess.run([ARGS.cli, f"--target={target}", *cli_flags, "--info",
                                    "--connect_timeout_ms=500", "--timeout_ms=2000"],
                                   capture_output=True, text=True)
            if probe.returncode == 0:
                return server, target, probe.stdout
            time.sleep(0.2)
        server.kill()
        server.wait()
    raise RuntimeError("simserve did not start: " +
                       open(os.path.join(workdir, "server.log")).read()[-2000:])


def stop_server(server):
    server.terminate()
    try:
        code = server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
        raise
    assert code == 0, f"simserve exited with {code} after SIGTERM"


class ServerTestCase(unittest.TestCase):
    """One simserve (started with SERVER_ARGS) for all tests of a class, and CLI helpers."""
    SERVER_ARGS = ()
    CLI_FLAGS = ()  # given to every CLI call of the class

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="simserve_cli_test_")
        cls.dir = cls.tmp.name
        cls.prepare()
        cls.server = None
        cls.server, cls.target, cls.info = start_server(cls.dir, cls.server_args(),
                                                        cls.CLI_FLAGS)

    @classmethod
    def prepare(cls):
        """Runs before the server starts (subclasses write files it loads)."""

    @classmethod
    def server_args(cls):
        return cls.SERVER_ARGS

    @classmethod
    def tearDownClass(cls):
        if cls.server is not None:
            stop_server(cls.server)
        cls.tmp.cleanup()

    def path(self, name):
        return os.path.join(self.dir, name)

    def save(self, name, array):
        np.save(self.path(name), array)
        return self.path(name)

    def cli(self, *flags, expect=0):
        proc = subprocess.run([ARGS.cli, f"--target={self.target}", *self.CLI_FLAGS, *flags],
                              capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, expect,
                         f"simserve-cli {' '.join(flags)}\nstdout: {proc.stdout}\n"
                         f"stderr: {proc.stderr}")
        return proc


class CliTest(ServerTestCase):
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
            if HAS_AVX512:  # oneDNN's brgemm kernels: bit for bit
                np.testing.assert_array_equal(outputs[mode], outputs["unary"])
            else:  # gemm:jit (AVX2) may split the reduction by tile size: a few ulp
                np.testing.assert_allclose(outputs[mode], outputs["unary"], rtol=1e-6, atol=1e-7)

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
                     "--epsilon", "--timeout_ms", "--mode", "--info", "--gallery",
                     "--gallery_version", "--register_gallery", "--storage_dtype",
                     "--list_galleries", "--get_gallery", "--delete_gallery", "--json"):
            self.assertIn(flag.lstrip("-"), text)


def cosine_each(a, g):
    """sklearn cosine of every batch entry of a [batch, N, D] with g [M, D] or [batch, M, D]."""
    a64, g64 = a.astype(np.float64), g.astype(np.float64)
    return np.stack([cosine_similarity(a64[k], g64 if g.ndim == 2 else g64[k])
                     for k in range(a.shape[0])])


class GalleryCliTest(ServerTestCase):
    """Galleries through simserve-cli: uploaded ones, and the server's --gallery_dir."""
    MEMORY_BYTES = 4 << 20
    SERVER_ARGS = ()  # set in prepare(): the gallery dir lives in the class's temp dir

    @classmethod
    def prepare(cls):
        rng = np.random.default_rng(100)
        cls.gallery_dir = os.path.join(cls.dir, "galleries")
        os.mkdir(cls.gallery_dir)
        cls.dir_g3 = rng.standard_normal((2, 12, 8), dtype=np.float32)
        cls.dir_h = rng.standard_normal((9, 8)).astype(np.float16)
        np.save(os.path.join(cls.gallery_dir, "dir-3d.npy"), cls.dir_g3)
        np.save(os.path.join(cls.gallery_dir, "dir-half.npy"), cls.dir_h)
        # Not NAME.npy: must be ignored (how a new file is staged before its rename).
        with open(os.path.join(cls.gallery_dir, "staged.npy.tmp"), "wb") as f:
            np.save(f, cls.dir_g3)
        cls.SERVER_ARGS = (f"--gallery_dir={cls.gallery_dir}", "--gallery_rescan_seconds=1",
                           f"--gallery_memory_bytes={cls.MEMORY_BYTES}")

    def json_cli(self, *flags, expect=0):
        return json.loads(self.cli("--json", *flags, expect=expect).stdout)

    def test_register_compute_list_get_delete(self):
        rng = np.random.default_rng(101)
        g = rng.standard_normal((40, 16), dtype=np.float32)
        g[3] = 0  # a zero gallery row: cosine 0
        a = rng.standard_normal((3, 25, 16), dtype=np.float32)
        fg, fa = self.save("g.npy", g), self.save("q.npy", a)
        proc = self.cli("--register_gallery=cli-g", f"--b={fg}")
        self.assertRegex(proc.stdout, r"registered .*g\.npy")
        self.assertRegex(proc.stdout, r"version +1\b")
        self.assertRegex(proc.stdout, r"source +UPLOADED")
        self.assertIn("[40, 16]", proc.stdout)
        want = cosine_each(a, g)
        outputs = {}
        for mode in ("auto", "unary", "stream", "upload"):
            out = self.path(f"sg_{mode}.npy")
            proc = self.cli(f"--a={fa}", "--gallery=cli-g", f"--out={out}", f"--mode={mode}",
                            "--max_chunk_bytes=1000")
            self.assertIn("against gallery cli-g", proc.stdout)
            got = np.load(out)
            self.assertEqual(got.shape, (3, 25, 40))
            np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
            self.assertTrue(np.all(got[:, :, 3] == 0))
            outputs[mode] = got
        # Not bit-identical across modes here (unlike with --b): the server's gallery path
        # picks its kernel by tile height (1000-byte chunks = 6-row tiles), a few ulp apart.
        for mode in ("stream", "upload"):
            np.testing.assert_allclose(outputs[mode], outputs["unary"], atol=1e-6, rtol=0)
        # Top-k against the gallery.
        out = self.path("gtop.npy")
        self.cli(f"--a={fa}", "--gallery=cli-g", f"--out={out}", "--top_k=4",
                 "--metric=euclidean")
        d = np.stack([euclidean_distances(a[k].astype(np.float64), g.astype(np.float64))
                      for k in range(3)])
        want_idx = np.argsort(d, axis=-1, kind="stable")[..., :4]
        np.testing.assert_array_equal(np.load(self.path("gtop.indices.npy")), want_idx)
        np.testing.assert_allclose(np.load(out), np.take_along_axis(d, want_idx, -1),
                                   rtol=1e-4, atol=1e-4)
        # JSON answers: int64 fields are strings in the protobuf JSON mapping.
        info = self.json_cli("--get_gallery=cli-g")
        self.assertEqual(info["name"], "cli-g")
        self.assertEqual([int(x) for x in info["shape"]], [40, 16])
        self.assertEqual(info["source"], "UPLOADED")
        self.assertEqual(info["storage_dtype"], "FLOAT32")
        self.assertEqual(int(info["version"]), 1)
        self.assertGreater(int(info["bytes"]), 40 * 16 * 4 - 1)
        # Pinned versions.
        self.cli(f"--a={fa}", "--gallery=cli-g", "--gallery_version=1")
        proc = self.cli(f"--a={fa}", "--gallery=cli-g", "--gallery_version=2", expect=1)
        self.assertIn("FAILED_PRECONDITION", proc.stderr)
        again = self.json_cli("--register_gallery=cli-g", f"--b={fg}")
        self.assertEqual(int(again["version"]), 2)
        self.cli(f"--a={fa}", "--gallery=cli-g", "--gallery_version=2")
        # List (text and JSON), delete, then it is gone.
        listed = self.json_cli("--list_galleries")["galleries"]
        names = [x["name"] for x in listed]
        self.assertEqual(names, sorted(names))
        self.assertIn("cli-g", names)
        proc = self.cli("--list_galleries")
        self.assertRegex(proc.stdout, r"(?m)^NAME +SHAPE")
        self.assertRegex(proc.stdout, r"(?m)^cli-g +\[40,16\] +FLOAT32 +2 ")
        self.assertRegex(proc.stdout, r"\d+ galleries, \d+ bytes")
        deleted = self.json_cli("--delete_gallery=cli-g")["deleted"]
        self.assertEqual((deleted["name"], int(deleted["version"])), ("cli-g", 2))
        proc = self.cli("--get_gallery=cli-g", expect=1)
        self.assertIn("NOT_FOUND", proc.stderr)
        out = self.path("never.npy")
        proc = self.cli(f"--a={fa}", "--gallery=cli-g", f"--out={out}", expect=1)
        self.assertIn("NOT_FOUND", proc.stderr)
        self.assertFalse(os.path.exists(out))

    def test_storage_dtypes_and_float16_files(self):
        rng = np.random.default_rng(102)
        g = rng.standard_normal((30, 64), dtype=np.float32)
        a = rng.standard_normal((2, 10, 64), dtype=np.float32)
        fg, fa = self.save("g32.npy", g), self.save("qa.npy", a)
        want = cosine_each(a, g)
        sizes = {}
        for storage, atol in (("float32", 2e-6), ("bfloat16", 1.5e-2), ("float16", 2e-3)):
            info = self.json_cli("--register_gallery=cli-s", f"--b={fg}",
                                 f"--storage_dtype={storage}")
            self.assertEqual(info["storage_dtype"], storage.upper())
            sizes[storage] = int(info["bytes"])
            out = self.path(f"s_{storage}.npy")
            self.cli(f"--a={fa}", "--gallery=cli-s", f"--out={out}")
            np.testing.assert_allclose(np.load(out), want, atol=atol, rtol=0)
        self.assertLess(sizes["bfloat16"], sizes["float32"] * 3 // 4)
        self.assertLess(sizes["float16"], sizes["float32"] * 3 // 4)
        # A float16 .npy is uploaded as float16 (dtype FLOAT16), queried with float16 A too.
        g16, a16 = g.astype(np.float16), a.astype(np.float16)
        info = self.json_cli("--register_gallery=cli-s", f"--b={self.save('g16.npy', g16)}")
        self.assertEqual(info["dtype"], "FLOAT16")
        out = self.path("s16.npy")
        self.cli(f"--a={self.save('a16.npy', a16)}", "--gallery=cli-s", f"--out={out}")
        np.testing.assert_allclose(np.load(out), cosine_each(a16, g16), atol=2e-6, rtol=0)
        self.cli("--delete_gallery=cli-s")

    def test_directory_galleries_load_refuse_delete_and_roll_out(self):
        listed = {x["name"]: x for x in self.json_cli("--list_galleries")["galleries"]}
        self.assertIn("dir-3d", listed)
        self.assertIn("dir-half", listed)
        self.assertNotIn("staged.npy.tmp", listed)
        self.assertNotIn("staged", listed)
        d3 = listed["dir-3d"]
        self.assertEqual(d3["source"], "DIRECTORY")
        self.assertEqual([int(x) for x in d3["shape"]], [2, 12, 8])
        self.assertTrue(d3["path"].endswith("dir-3d.npy"), d3["path"])
        self.assertEqual(listed["dir-half"]["dtype"], "FLOAT16")
        rng = np.random.default_rng(103)
        a = rng.standard_normal((2, 7, 8), dtype=np.float32)
        fa = self.save("qd.npy", a)
        for name, g in (("dir-3d", self.dir_g3), ("dir-half", self.dir_h)):
            out = self.path(f"{name}.out.npy")
            self.cli(f"--a={fa}", f"--gallery={name}", f"--out={out}", "--metric=dot")
            want = np.einsum("kid,kjd->kij" if g.ndim == 3 else "kid,jd->kij",
                             a.astype(np.float64), g.astype(np.float64))
            np.testing.assert_allclose(np.load(out), want, rtol=1e-5, atol=1e-4)
        proc = self.cli("--delete_gallery=dir-3d", expect=1)
        self.assertIn("FAILED_PRECONDITION", proc.stderr)
        # Roll out a new version the documented way: write NAME.npy.tmp, then rename.
        new = rng.standard_normal((2, 15, 8), dtype=np.float32)
        staged = os.path.join(self.gallery_dir, "dir-3d.npy.tmp")
        with open(staged, "wb") as f:
            np.save(f, new)
        os.replace(staged, os.path.join(self.gallery_dir, "dir-3d.npy"))
        version = int(d3["version"])
        deadline = time.monotonic() + 30
        info = d3
        while time.monotonic() < deadline and int(info["version"]) == version:
            time.sleep(0.3)
            info = self.json_cli("--get_gallery=dir-3d")
        self.assertGreater(int(info["version"]), version, "the rescan did not pick up the file")
        self.assertEqual([int(x) for x in info["shape"]], [2, 15, 8])
        out = self.path("rolled.npy")
        self.cli(f"--a={fa}", "--gallery=dir-3d", f"--out={out}", "--metric=dot")
        np.testing.assert_allclose(
            np.load(out), np.einsum("kid,kjd->kij", a.astype(np.float64), new.astype(np.float64)),
            rtol=1e-5, atol=1e-4)

    def test_gallery_errors(self):
        rng = np.random.default_rng(104)
        fg = self.save("ge.npy", rng.standard_normal((6, 8), dtype=np.float32))
        fa9 = self.save("q9.npy", rng.standard_normal((2, 3, 9), dtype=np.float32))
        proc = self.cli("--register_gallery=bad/name", f"--b={fg}", expect=1)
        self.assertIn("INVALID_ARGUMENT", proc.stderr)
        # One gallery over the whole --gallery_memory_bytes budget.
        big = self.save("big.npy", np.ones((self.MEMORY_BYTES // 64 + 1, 16), dtype=np.float32))
        proc = self.cli("--register_gallery=cli-big", f"--b={big}", expect=1)
        self.assertIn("RESOURCE_EXHAUSTED", proc.stderr)
        # An upload cannot take the name of a --gallery_dir gallery.
        proc = self.cli("--register_gallery=dir-half", f"--b={fg}", expect=1)
        self.assertIn("FAILED_PRECONDITION", proc.stderr)
        self.cli("--register_gallery=cli-e", f"--b={fg}")
        proc = self.cli(f"--a={fa9}", "--gallery=cli-e", expect=1)
        self.assertIn("INVALID_ARGUMENT", proc.stderr)
        self.cli("--delete_gallery=cli-e")
        # Usage errors (exit 2).
        for flags, message in (
                (("--register_gallery=x",), "--register_gallery needs --b"),
                ((f"--a={fa9}", f"--b={fg}", "--gallery=x"), "--b and --gallery both name B"),
                (("--list_galleries", "--get_gallery=x"), "one command at a time"),
                (("--list_galleries", f"--a={fa9}"), "are for computing"),
                (("--get_gallery=x", f"--b={fg}"), "--b is for computing"),
                ((f"--a={fa9}", f"--b={fg}", "--gallery_version=3"), "--gallery_version needs"),
                (("--register_gallery=x", f"--b={fg}", "--storage_dtype=int8"),
                 "--storage_dtype")):
            proc = self.cli(*flags, expect=2)
            self.assertIn(message, proc.stderr)


class TlsCliTest(ServerTestCase):
    """The CLI against a mutual-TLS server: --tls_ca_file, --tls_cert_file, --tls_key_file."""

    @classmethod
    def prepare(cls):
        make_certs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                  "security", "make_certs.sh")
        subprocess.run(["bash", make_certs, cls.dir], check=True)
        d = cls.dir
        cls.CLI_FLAGS = (f"--tls_ca_file={d}/ca1.crt", f"--tls_cert_file={d}/client1.crt",
                         f"--tls_key_file={d}/client1.key")

    @classmethod
    def server_args(cls):
        d = cls.dir
        return (f"--tls_cert_file={d}/server1.crt", f"--tls_key_file={d}/server1.key",
                f"--tls_client_ca_file={d}/ca1.crt")

    def test_compute_over_mutual_tls_matches_numpy(self):
        rng = np.random.default_rng(7)
        a = rng.standard_normal((3, 16), dtype=np.float32)
        b = rng.standard_normal((5, 16), dtype=np.float32)
        self.cli("--a", self.save("a.npy", a), "--b", self.save("b.npy", b),
                 "--out", self.path("s.npy"), "--metric", "dot")
        np.testing.assert_allclose(np.load(self.path("s.npy")),
                                   a.astype(np.float64) @ b.T.astype(np.float64), atol=1e-4)

    def test_without_the_client_certificate_or_tls_the_call_fails(self):
        for flags in ((f"--tls_ca_file={self.dir}/ca1.crt",), ()):
            proc = subprocess.run([ARGS.cli, f"--target={self.target}", *flags, "--info",
                                   "--connect_timeout_ms=1000", "--timeout_ms=3000"],
                                  capture_output=True, text=True, timeout=60)
            self.assertNotEqual(proc.returncode, 0, flags)

    def test_bad_tls_flags_are_usage_errors(self):
        proc = subprocess.run([ARGS.cli, f"--target={self.target}",
                               f"--tls_cert_file={self.dir}/client1.crt", "--info"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("both --tls_cert_file and --tls_key_file", proc.stderr)
        proc = subprocess.run([ARGS.cli, f"--target={self.target}",
                               f"--tls_ca_file={self.dir}/missing.crt", "--info"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(proc.returncode, 2)
        self.assertIn("cannot be read", proc.stderr)


class TokenCliTest(ServerTestCase):
    """The CLI against a TLS server with --auth_token_file: --token_file, --token and
    $SIMSERVE_TOKEN; a wrong or missing token is a clear UNAUTHENTICATED failure (exit 1)."""
    TOKEN = "tok-cli.right_1"
    TLS = True

    @classmethod
    def prepare(cls):
        d = cls.dir
        with open(os.path.join(d, "server_tokens"), "w") as f:
            f.write(f"# accepted\ntok-cli-other\n{cls.TOKEN}\n")
        # The client's file: comments and blank lines before the token, whitespace around it.
        with open(os.path.join(d, "token"), "w") as f:
            f.write(f"# for simserve-cli\n\n  {cls.TOKEN}  \nignored-second-line\n")
        cls.CLI_FLAGS = (f"--token_file={d}/token",)
        if cls.TLS:
            make_certs = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                      "tests", "security", "make_certs.sh")
            subprocess.run(["bash", make_certs, d], check=True)
            cls.CLI_FLAGS += (f"--tls_ca_file={d}/ca1.crt",)

    @classmethod
    def server_args(cls):
        d = cls.dir
        args = (f"--auth_token_file={d}/server_tokens",)
        if cls.TLS:
            args += (f"--tls_cert_file={d}/server1.crt", f"--tls_key_file={d}/server1.key")
        return args

    def transport(self):
        return self.CLI_FLAGS[1:]  # the TLS flags, without the token

    def run_cli(self, *flags, env=None):
        environ = {k: v for k, v in os.environ.items() if k != "SIMSERVE_TOKEN"}
        return subprocess.run([ARGS.cli, f"--target={self.target}", *flags],
                              capture_output=True, text=True, timeout=120,
                              env=dict(environ, **(env or {})))

    def test_compute_and_galleries_with_the_token_match_sklearn(self):
        rng = np.random.default_rng(11)
        a = rng.standard_normal((2, 12, 16), dtype=np.float32)
        b = rng.standard_normal((2, 9, 16), dtype=np.float32)
        fa, fb = self.save("a.npy", a), self.save("b.npy", b)
        want = np.stack([cosine_similarity(a[k], b[k]) for k in range(2)])
        for mode in ("unary", "stream", "upload"):
            out = self.path(f"s_{mode}.npy")
            self.cli(f"--a={fa}", f"--b={fb}", f"--out={out}", f"--mode={mode}",
                     "--max_chunk_bytes=256")
            np.testing.assert_allclose(np.load(out), want, atol=2e-6, rtol=0)
        self.cli("--register_gallery=tok-g", f"--b={fb}")
        out = self.path("g.npy")
        self.cli(f"--a={fa}", "--gallery=tok-g", f"--out={out}", "--top_k=3")
        idx = np.load(self.path("g.indices.npy"))
        np.testing.assert_array_equal(idx, np.argsort(-want, axis=-1, kind="stable")[..., :3])
        self.assertIn("tok-g", self.cli("--list_galleries").stdout)
        self.cli("--delete_gallery=tok-g")

    def test_token_flag_and_environment_variable(self):
        proc = self.run_cli(*self.transport(), f"--token={self.TOKEN}", "--info")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        proc = self.run_cli(*self.transport(), "--info", env={"SIMSERVE_TOKEN": self.TOKEN})
        self.assertEqual(proc.returncode, 0, proc.stderr)
        # The flags win over the environment.
        proc = self.run_cli(*self.CLI_FLAGS, "--info", env={"SIMSERVE_TOKEN": "tok-wrong"})
        self.assertEqual(proc.returncode, 0, proc.stderr)
        proc = self.run_cli(*self.transport(), "--token=tok-wrong", "--info",
                            env={"SIMSERVE_TOKEN": self.TOKEN})
        self.assertEqual(proc.returncode, 1, proc.stderr)

    def test_wrong_or_missing_token_is_unauthenticated(self):
        a = self.save("wa.npy", np.ones((2, 4), np.float32))
        wrong = self.path("wrong_token")
        with open(wrong, "w") as f:
            f.write("tok-not-accepted\n")
        for flags, message in (((f"--token_file={wrong}",), "not valid"),
                               (("--token=tok-not-accepted",), "not valid"),
                               (("--token=tok-not-accepted", "--mode=upload"), "not valid"),
                               ((), "authorization: Bearer <token>")):
            for command in (("--info",), ("--list_galleries",),
                            (f"--a={a}", f"--b={a}", f"--out={self.path('w.npy')}", *flags[1:])):
                proc = self.run_cli(*self.transport(), *flags[:1], *command)
                self.assertEqual(proc.returncode, 1, f"{flags} {command}: {proc.stderr}")
                self.assertIn("UNAUTHENTICATED", proc.stderr)
                self.assertIn(message, proc.stderr)
                self.assertIn("requires a bearer token", proc.stderr)
                self.assertNotIn("tok-not-accepted", proc.stderr + proc.stdout)
                self.assertFalse(os.path.exists(self.path("w.npy")), "no result file left")

    def test_bad_token_flags_are_usage_errors(self):
        empty = self.path("empty_token")
        with open(empty, "w") as f:
            f.write("# only a comment\n\n")
        spaced = self.path("spaced_token")
        with open(spaced, "w") as f:
            f.write("tok secret-part\n")
        for flags, message in (
                ((f"--token_file={empty}",), "holds no token"),
                ((f"--token_file={self.dir}/missing",), "cannot be read"),
                ((f"--token_file={spaced}",), "whitespace"),
                (("--token=tok secret-part",), "whitespace"),
                (("--token=a", f"--token_file={empty}"), "one of --token and --token_file")):
            proc = self.run_cli(*self.transport(), *flags, "--info")
            self.assertEqual(proc.returncode, 2, f"{flags}: {proc.stderr}")
            self.assertIn(message, proc.stderr)
            self.assertNotIn("secret-part", proc.stderr)
        proc = self.run_cli(*self.transport(), "--info", env={"SIMSERVE_TOKEN": "tok\tsecret-part"})
        self.assertEqual(proc.returncode, 2, proc.stderr)
        self.assertIn("$SIMSERVE_TOKEN", proc.stderr)
        self.assertNotIn("secret-part", proc.stderr)


class PlaintextTokenCliTest(TokenCliTest):
    """TokenCliTest on a plaintext port (the token then travels in clear)."""
    TLS = False


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cli", required=True)
    parser.add_argument("--server", required=True)
    ARGS, rest = parser.parse_known_args()
    unittest.main(argv=[sys.argv[0], "-v", *rest])
