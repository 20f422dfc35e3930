"""The Python client against the real simserve server, compared with sklearn/numpy references:
the seed question (sklearn cosine loop), the Keras epsilon clamp, every metric, top-k with
ties, every RPC mode, output dtypes, progress, in-place output, timings, errors, asyncio."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import grpc
import numpy as np
import pytest

import reference as ref
import simserve
import simserve.aio

MODES = ["auto", "unary", "stream", "upload"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture()
def rng(rng_seed):
    return np.random.default_rng(rng_seed)


@pytest.mark.parametrize("mode", MODES)
def test_seed_cosine_matches_sklearn_loop(client, rng, mode):
    a = rng.random((10, 40, 20))
    b = rng.random((10, 50, 20))
    s = client.similarity(a, b, mode=mode)
    assert s.shape == (10, 40, 50) and s.dtype == np.float32
    assert np.allclose(s, ref.sklearn_cosine(a, b), atol=1e-5)
    assert client.last_timings.mode == (mode if mode != "auto" else "unary")


def test_auto_mode_follows_size(server, rng):
    a = rng.standard_normal((2, 600, 1024)).astype(np.float32)  # ~10 MiB of inputs
    b = rng.standard_normal((2, 700, 1024)).astype(np.float32)
    with simserve.Client(server.address, timeout=60) as c:
        s = c.similarity(a, b)
        assert c.last_timings.mode == "upload"
        assert np.allclose(s, ref.sklearn_cosine(a, b), atol=1e-5)
        small_in = c.similarity(a[:, :300, :64], b[:, :, :64])  # 0.5 MB in, 1.7 MB out
        assert c.last_timings.mode == "stream"
        assert np.allclose(small_in, ref.sklearn_cosine(a[:, :300, :64], b[:, :, :64]),
                           atol=1e-5)


def test_2d_inputs_give_2d_result(client, rng):
    a, b = rng.standard_normal((30, 16)), rng.standard_normal((45, 16))
    for mode in MODES:
        s = client.similarity(a, b, mode=mode)
        assert s.shape == (30, 45)
        assert np.allclose(s, ref.sklearn_cosine(a, b), atol=1e-5)


def test_float64_and_fortran_order_inputs(client, rng):
    a = np.asfortranarray(rng.standard_normal((3, 12, 9)))  # float64, F order
    b = rng.standard_normal((3, 9, 14)).astype(np.float32).transpose(0, 2, 1)  # strided view
    s = client.similarity(a, b, mode="stream")
    assert np.allclose(s, ref.sklearn_cosine(a, b), atol=1e-5)


def test_zero_rows_give_zero_not_nan(client, rng):
    a, b = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 6, 8))
    a[0, 2] = 0
    b[1, 4] = 0
    s = client.similarity(a, b)
    assert not np.isnan(s).any()
    assert np.all(s[0, 2] == 0) and np.all(s[1, :, 4] == 0)
    assert np.allclose(s, ref.sklearn_cosine(a, b), atol=1e-5)


def test_keras_epsilon_clamp(client, rng):
    # Tiny rows: the clamp sqrt(max(sum_sq, eps)) changes the answer, sklearn's would not.
    a = rng.standard_normal((2, 7, 10)) * 1e-3
    b = rng.standard_normal((2, 9, 10)) * 1e-3
    eps = 1e-4
    want = ref.keras_cosine(a, b, eps)
    assert not np.allclose(want, ref.sklearn_cosine(a, b), atol=1e-3)  # the case matters
    for mode in ("unary", "stream", "upload"):
        s = client.similarity(a, b, epsilon=eps, mode=mode)
        assert np.allclose(s, want, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("metric,atol", [("dot", 1e-4), ("euclidean", 1e-4),
                                         ("squared_euclidean", 1e-3)])
def test_other_metrics(client, rng, metric, atol):
    a, b = rng.standard_normal((3, 20, 16)), rng.standard_normal((3, 25, 16))
    for mode in ("unary", "stream", "upload"):
        s = client.similarity(a, b, metric=metric, mode=mode)
        assert np.allclose(s, ref.dense(metric, a, b), atol=atol, rtol=1e-5), (metric, mode)


@pytest.mark.parametrize("metric", ["cosine", "dot", "euclidean", "squared_euclidean"])
def test_top_k_matches_stable_argsort(client, rng, metric):
    # Small integers: dot products are exact in float32, duplicated columns make real ties.
    a = rng.integers(-3, 4, (3, 10, 6)).astype(np.float32)
    b = rng.integers(-3, 4, (3, 12, 6)).astype(np.float32)
    b[:, 7] = b[:, 2]
    b[:, 9] = b[:, 2]
    want_vals, want_idx = ref.top_k(metric, ref.dense(metric, a, b), 4)
    for mode in ("unary", "stream", "upload"):
        vals, idx = client.top_k(a, b, 4, metric=metric, mode=mode)
        assert vals.shape == idx.shape == (3, 10, 4) and idx.dtype == np.int32
        assert np.allclose(vals, want_vals, atol=1e-5)
        if metric in ("dot", "squared_euclidean"):  # exact arithmetic: ties are exact too
            np.testing.assert_array_equal(idx, want_idx)
        else:  # values at the returned indices must be the k best (ties may differ by ulp)
            s = ref.dense(metric, a, b)
            assert np.allclose(np.take_along_axis(s, idx.astype(np.int64), -1), want_vals,
                               atol=1e-5)


def test_top_k_2d(client, rng):
    a, b = rng.standard_normal((8, 5)), rng.standard_normal((11, 5))
    vals, idx = client.top_k(a, b, 3)
    want_vals, want_idx = ref.top_k("cosine", ref.sklearn_cosine(a, b), 3)
    assert vals.shape == (8, 3)
    np.testing.assert_array_equal(idx, want_idx)
    assert np.allclose(vals, want_vals, atol=1e-5)


@pytest.mark.parametrize("output_dtype,rtol", [("bfloat16", 2 ** -8), ("float16", 2 ** -11)])
def test_reduced_output_dtypes_are_widened(client, rng, output_dtype, rtol):
    a, b = rng.standard_normal((4, 30, 32)), rng.standard_normal((4, 40, 32))
    want = ref.sklearn_cosine(a, b)
    for mode in ("unary", "stream", "upload"):
        s = client.similarity(a, b, output_dtype=output_dtype, mode=mode)
        assert s.dtype == np.float32 and s.shape == want.shape
        assert np.allclose(s, want, rtol=rtol, atol=1e-3)
        if output_dtype == "bfloat16":  # exactly bf16 values: low 16 bits are zero
            assert not np.any(s.view(np.uint32) & 0xFFFF)


def test_bf16_precision(client, rng):
    a, b = rng.standard_normal((4, 30, 64)), rng.standard_normal((4, 40, 64))
    s = client.similarity(a, b, precision="bf16")
    assert np.allclose(s, ref.sklearn_cosine(a, b), atol=3e-2)


def test_progress_and_out(server, rng):
    a, b = rng.standard_normal((3, 50, 8)), rng.standard_normal((3, 64, 8))
    calls = []
    out = np.full((3, 50, 64), np.nan, dtype=np.float32)
    with simserve.Client(server.address, timeout=60, chunk_bytes=1024) as c:
        s = c.similarity(a, b, mode="stream", out=out,
                         progress=lambda done, total: calls.append((done, total)))
    assert s is not None and np.shares_memory(s, out)
    assert np.allclose(out, ref.sklearn_cosine(a, b), atol=1e-5)
    assert len(calls) >= 3 * 50 // 4  # 1 KiB chunks: 4 rows of 64 floats each
    assert calls[-1] == (150, 150)
    assert all(x[0] < y[0] for x, y in zip(calls, calls[1:]))


@pytest.mark.parametrize("output_dtype", ["float32", "bfloat16"])
def test_out_is_filled_in_place_in_every_mode_sync_and_asyncio(server, rng, output_dtype):
    """Every path (unary, stream, upload; blocking and asyncio) writes the result straight
    into the caller's `out=` array and returns that very array (3D and 2D)."""
    a, b = rng.standard_normal((3, 40, 16)), rng.standard_normal((3, 30, 16))
    want = ref.sklearn_cosine(a, b)
    tol = 1e-5 if output_dtype == "float32" else 1e-2

    def check(s, out, want):
        assert s is not None and np.shares_memory(s, out) and s.shape == out.shape
        assert np.allclose(out, want, atol=tol)

    with simserve.Client(server.address, timeout=60, chunk_bytes=2048) as c:
        for mode in MODES:
            out = np.full((3, 40, 30), np.nan, dtype=np.float32)
            check(c.similarity(a, b, mode=mode, output_dtype=output_dtype, out=out), out, want)
            out2 = np.full((40, 30), np.nan, dtype=np.float32)
            check(c.similarity(a[1], b[1], mode=mode, output_dtype=output_dtype, out=out2),
                  out2, want[1])

    async def main():
        async with simserve.aio.Client(server.address, timeout=60, chunk_bytes=2048) as c:
            for mode in MODES:
                out = np.full((3, 40, 30), np.nan, dtype=np.float32)
                check(await c.similarity(a, b, mode=mode, output_dtype=output_dtype, out=out),
                      out, want)
    asyncio.run(main())


def test_server_reports_its_message_overhead(client):
    assert client.info().limits["message_overhead_bytes"] == 4096


def test_server_timings(client, rng):
    a, b = rng.standard_normal((2, 20, 8)), rng.standard_normal((2, 30, 8))
    for mode in ("unary", "stream", "upload"):
        client.similarity(a, b, mode=mode)
        t = client.last_timings
        assert t.mode == mode and t.attempts == 1 and t.client_ms > 0
        assert t.total_ms is not None and t.total_ms >= 0
        assert t.compute_ms is not None and t.queue_ms is not None


def test_info(client):
    info = client.info()
    assert info.version and info.cpu_isa
    assert info.limits["max_receive_message_bytes"] > 0
    assert "cosine" in info.metrics and "float32" in info.output_dtypes


@pytest.mark.parametrize("mode", ["unary", "stream", "upload"])
def test_server_rejects_bad_input(client, rng, mode):
    a, b = rng.standard_normal((2, 5, 8)), rng.standard_normal((2, 6, 8))
    with pytest.raises(simserve.InvalidArgumentError) as e:
        client.similarity(a, rng.standard_normal((2, 6, 9)), mode=mode)  # D mismatch
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and e.value.details
    with pytest.raises(simserve.InvalidArgumentError):
        client.similarity(a, rng.standard_normal((3, 6, 8)), mode=mode)  # batch mismatch
    bad = a.copy()
    bad[1, 3, 2] = np.nan
    with pytest.raises(simserve.InvalidArgumentError) as e:
        client.similarity(bad, b, mode=mode)
    # The contract: name the tensor and the first bad (flat) index, 1*40 + 3*8 + 2.
    assert "tensor a" in e.value.details and "66" in e.value.details
    with pytest.raises(simserve.InvalidArgumentError):
        client.top_k(a, b, 7, mode=mode)  # k > M
    # The connection and server are fine afterwards.
    assert np.allclose(client.similarity(a, b, mode=mode), ref.sklearn_cosine(a, b), atol=1e-5)


def test_client_side_argument_errors(client, rng):
    a = rng.standard_normal((5, 8))
    with pytest.raises(simserve.InvalidArgumentError):
        client.similarity(a[0], a)  # 1D
    with pytest.raises(simserve.InvalidArgumentError):
        client.similarity(a, a[np.newaxis])  # 2D with 3D
    with pytest.raises(simserve.InvalidArgumentError):
        client.similarity(a, a, metric="manhattan")
    with pytest.raises(simserve.InvalidArgumentError):
        client.top_k(a, a, 0)
    with pytest.raises(simserve.InvalidArgumentError):
        client.similarity(a, a, mode="carrier-pigeon")


def test_deadline_exceeded(client, rng):
    a = rng.standard_normal((20, 400, 256)).astype(np.float32)
    b = rng.standard_normal((20, 500, 256)).astype(np.float32)
    with pytest.raises(simserve.DeadlineExceededError) as e:
        client.similarity(a, b, mode="upload", timeout=0.005)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_small_server_limits(server_binary, rng):
    """A server with a 64 KiB send and 1 MiB receive limit: unary results over the limit are
    RESOURCE_EXHAUSTED (naming ComputeStream), auto mode streams instead, and uploads are cut
    into pieces that fit the receive limit."""
    from serverctl import Server
    with Server(server_binary, ["--metrics_listen=", "--max_send_message_bytes=65536",
                                "--max_chunk_bytes=65536", "--default_chunk_bytes=16384",
                                "--max_receive_message_bytes=1048576",
                                "--warmup=false"]) as srv, \
            simserve.Client(srv.address, timeout=60) as c:
        a, b = rng.standard_normal((1, 200, 8)), rng.standard_normal((1, 300, 8))
        with pytest.raises(simserve.ResourceExhaustedError) as e:
            c.similarity(a, b, mode="unary")  # 240 KB result > 64 KiB
        assert "ComputeStream" in e.value.details
        s = c.similarity(a, b)  # auto picks streaming within the limit
        assert c.last_timings.mode == "stream"
        assert np.allclose(s, ref.sklearn_cosine(a, b), atol=1e-5)
        big_a = rng.standard_normal((2, 300, 512))  # 1.2 MB of float32 > 1 MiB receive limit
        big_b = rng.standard_normal((2, 40, 512))
        s = c.similarity(big_a, big_b)
        assert c.last_timings.mode == "upload"
        assert np.allclose(s, ref.sklearn_cosine(big_a, big_b), atol=1e-5)


def test_unreachable_server_is_unavailable_after_retries():
    from serverctl import free_port
    policy = simserve.RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    with simserve.Client(f"127.0.0.1:{free_port()}", retry=policy, timeout=10) as c:
        with pytest.raises(simserve.UnavailableError) as e:
            c.similarity(np.ones((2, 3)), np.ones((2, 3)), mode="unary")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


def test_asyncio_client(server, rng):
    a, b = rng.standard_normal((3, 20, 8)), rng.standard_normal((3, 30, 8))

    async def main():
        async with simserve.aio.Client(server.address, timeout=60) as c:
            info = await c.info()
            results = await asyncio.gather(*(c.similarity(a, b, mode=m)
                                             for m in ("auto", "unary", "stream", "upload")))
            vals, idx = await c.top_k(a, b, 5, mode="stream")
            with pytest.raises(simserve.InvalidArgumentError):
                await c.similarity(a, b[:, :, :4])
            return info, results, vals, idx, c.last_timings

    info, results, vals, idx, timings = asyncio.run(main())
    want = ref.sklearn_cosine(a, b)
    assert info.version
    for s in results:
        assert np.allclose(s, want, atol=1e-5)
    want_vals, want_idx = ref.top_k("cosine", want, 5)
    np.testing.assert_array_equal(idx, want_idx)
    assert np.allclose(vals, want_vals, atol=1e-5)
    assert timings.mode == "stream" and timings.total_ms is not None


def test_seed_example_script(server):
    """examples/seed_cosine.py (reduced sizes) prints the seed's answer: allclose True."""
    p = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "seed_cosine.py"),
                        "--target", server.address, "--batch", "10", "--repeat", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "np.allclose(S, sklearn) = True" in p.stdout
