"""Galleries against the real simserve server, compared with scikit-learn/NumPy references in
float64: 2D and 3D galleries with every metric and storage dtype (float32, and bfloat16 /
float16 within a bound derived from their rounding), dense and top-k, every RPC mode, sync
and asyncio; directory galleries; list/get/delete; the handle's re-registration after a
delete, a server restart and on another replica; LRU eviction under the memory budget; and
every error status through the client's error types (or a raw stub where the client cannot
send the malformed request)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time

import grpc
import numpy as np
import pytest

import reference as ref
import simserve
import simserve.aio
from serverctl import Server
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc

METRICS = ["cosine", "dot", "euclidean", "squared_euclidean"]
STORAGE = ["float32", "bfloat16", "float16"]
MODES = ["unary", "stream", "upload"]
# Bound on a stored element's relative rounding error, with a factor 2 of slack over the
# unit roundoff (bf16: 8 significand bits, fp16: 11); float32 storage is exact.
STORAGE_EPS = {"float32": 0.0, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -10}
BUDGET = 256 << 20


@pytest.fixture(scope="module")
def gallery_dir(tmp_path_factory):
    """--gallery_dir with two directory galleries: dir2d [40, 16] and dir3d [3, 30, 16]."""
    d = tmp_path_factory.mktemp("galleries")
    rng = np.random.default_rng(99)
    np.save(d / "dir2d.npy", rng.standard_normal((40, 16)).astype(np.float32))
    np.save(d / "dir3d.npy", rng.standard_normal((3, 30, 16)).astype(np.float32))
    return d


@pytest.fixture(scope="module")
def gserver(server_binary, gallery_dir):
    with Server(server_binary, ["--metrics_listen=", f"--gallery_dir={gallery_dir}",
                                f"--gallery_memory_bytes={BUDGET}"]) as srv:
        yield srv


@pytest.fixture()
def gc(gserver):
    with simserve.Client(gserver.address, timeout=60) as c:
        yield c


@pytest.fixture()
def rng(rng_seed):
    return np.random.default_rng(rng_seed)


def against(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The B a gallery plays for `a`: a 2D gallery serves every batch entry of a 3D a."""
    return np.broadcast_to(g, a.shape[:1] + g.shape) if g.ndim == 2 and a.ndim == 3 else g


def expected(metric, a, g, epsilon=0.0):
    return ref.dense(metric, a, against(a, g), epsilon)


def tolerance(metric: str, storage: str, a: np.ndarray, g: np.ndarray, want: np.ndarray):
    """Elementwise bound on |server - reference|: float32 arithmetic plus, for half storage,
    the effect of a relative error eps on every stored element of the gallery rows (or of
    their unit vectors). Cauchy-Schwarz: |<a, db>| <= eps |a| |b|, so a dot product moves by
    at most e = eps |a| |b| and a squared distance by 2e (via norms) or by
    2 d eps |b| + (eps |b|)^2 (directly); a distance d by min(2e / d, sqrt(2e)) or eps |b|.
    Everything gets a factor 2 of slack."""
    eps = STORAGE_EPS[storage]
    b = against(a, g).astype(np.float64)
    na = np.linalg.norm(a, axis=-1)[..., :, None]
    nb = np.linalg.norm(b, axis=-1)[..., None, :]
    e = eps * na * nb
    fp32 = 1e-5 * np.abs(want)
    if metric == "cosine":
        return 1e-5 + 2 * eps
    if metric == "dot":
        return 1e-4 + fp32 + 2 * e
    d = np.sqrt(np.abs(want)) if metric == "squared_euclidean" else np.abs(want)
    direct = eps * nb
    if metric == "euclidean":
        via_norms = np.minimum(2 * e / np.maximum(d, 1e-12), np.sqrt(2 * e))
        return 1e-4 + fp32 + 2 * np.maximum(direct, via_norms)
    return 1e-3 + fp32 + 2 * np.maximum(2 * d * direct + direct ** 2, 2 * e)


def row_tolerance(metric: str, storage: str, a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """tolerance() widened to each row's worst column: a bound for top-k values [.., N, k]."""
    dense = expected(metric, a, g)
    tol = np.broadcast_to(tolerance(metric, storage, a, g, dense), dense.shape)
    return tol.max(axis=-1, keepdims=True)


def assert_close(got, want, tol, what=""):
    assert got.shape == want.shape, (got.shape, want.shape, what)
    excess = np.abs(got.astype(np.float64) - want) - tol
    assert np.all(excess <= 0), f"{what}: worst excess {excess.max():.3g} over the bound"


def names(c) -> set:
    return {g.name for g in c.galleries()}


def code_of(fn) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value.code()


# -- numbers -------------------------------------------------------------------------------

LAYOUTS = {  # query shape, gallery shape
    "2d-gallery-3d-query": ((3, 20, 16), (25, 16)),
    "2d-gallery-2d-query": ((20, 16), (25, 16)),
    "3d-gallery": ((3, 20, 16), (3, 25, 16)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("metric", METRICS)
def test_dense_matches_reference(gc, rng, metric, storage, layout):
    a_shape, g_shape = LAYOUTS[layout]
    a, g = rng.standard_normal(a_shape), rng.standard_normal(g_shape)
    name = f"dense-{metric}-{storage}-{layout}"
    handle = gc.register_gallery(name, g, storage_dtype=storage)
    assert handle.shape == g_shape and handle.info.storage_dtype == storage
    want = expected(metric, a, g)
    tol = tolerance(metric, storage, a, g, want)
    for s in (gc.similarity(a, gallery=name, metric=metric),
              handle.similarity(a, metric=metric, mode="stream")):
        assert s.dtype == np.float32
        assert_close(s, want, tol, name)
    if storage != "float32":  # the half storage is really used: results differ from exact
        exact = gc.similarity(a, np.ascontiguousarray(against(a, g)), metric=metric)
        assert np.abs(s - exact).max() > 1e-6 * max(1.0, np.abs(exact).max())
    gc.delete_gallery(name)


def assert_duplicates_tie_lower_first(idx, dups=(2, 7, 9)):
    """Columns with bit-identical rows tie exactly: if one is among a row's k best, so is
    every lower-indexed copy, ranked before it."""
    for row in idx.reshape(-1, idx.shape[-1]).tolist():
        present = [c for c in dups if c in row]
        assert present == list(dups[:len(present)]), row
        assert [row.index(c) for c in present] == sorted(row.index(c) for c in present), row


@pytest.mark.parametrize("storage", STORAGE)
@pytest.mark.parametrize("metric", METRICS)
def test_top_k_matches_stable_argsort(gc, rng, metric, storage):
    """Small integers: exact in every storage dtype, integer dot products and squared
    distances. A gallery keeps unit rows and norms, so two *different* rows with the same
    exact score may come out in either order (ulps apart); exact copies must tie lower
    index first, and the scores at the returned columns must be the k best."""
    a = rng.integers(-3, 4, (3, 10, 6)).astype(np.float32)
    g = rng.integers(-3, 4, (12, 6)).astype(np.float32)
    g[7] = g[2]
    g[9] = g[2]
    g3 = rng.integers(-3, 4, (3, 12, 6)).astype(np.float32)
    g3[:, 7] = g3[:, 2]
    g3[:, 9] = g3[:, 2]
    handle = gc.register_gallery(f"topk-{metric}-{storage}", g, storage_dtype=storage)
    h3 = gc.register_gallery(f"topk3-{metric}-{storage}", g3, storage_dtype=storage)
    integer_scores = metric in ("dot", "squared_euclidean") and storage == "float32"
    for gal, data in ((handle, g), (h3, g3)):
        s = expected(metric, a, data)
        want_vals, want_idx = ref.top_k(metric, s, 4)
        tol = row_tolerance(metric, storage, a, data)
        for mode in MODES:
            vals, idx = gc.top_k(a, 4, gallery=gal, metric=metric, mode=mode)
            assert vals.shape == idx.shape == (3, 10, 4) and idx.dtype == np.int32
            assert_close(vals, want_vals, tol, f"{metric} {storage} {mode}")
            at_idx = np.take_along_axis(s, idx.astype(np.int64), -1)
            if integer_scores:
                np.testing.assert_array_equal(at_idx, want_vals)
            else:
                assert_close(at_idx, want_vals, 2 * tol)
            assert_duplicates_tie_lower_first(idx)
            # Apart from ties, the reference's order: most rows match it exactly.
            assert np.mean(np.all(idx == want_idx, axis=-1)) > 0.5
    vals, idx = handle.top_k(a[0], 3, metric=metric)  # 2D query: 2D result
    want_vals, _ = ref.top_k(metric, expected(metric, a[0], g), 3)
    assert vals.shape == (10, 3)
    assert_close(vals, want_vals, row_tolerance(metric, storage, a[0], g))
    handle.delete()
    h3.delete()


def test_modes_out_progress_output_dtype_epsilon(gserver, rng):
    a = rng.standard_normal((3, 50, 16))
    g = rng.standard_normal((3, 64, 16))
    want = ref.sklearn_cosine(a, g)
    with simserve.Client(gserver.address, timeout=60, chunk_bytes=1024) as c:
        handle = c.register_gallery("modes", g)
        for mode in ["auto"] + MODES:
            out = np.full((3, 50, 64), np.nan, dtype=np.float32)
            calls = []
            s = c.similarity(a, gallery=handle, mode=mode, out=out,
                             progress=lambda done, total: calls.append((done, total)))
            assert np.shares_memory(s, out)
            assert_close(out, want, 1e-5, mode)
            assert calls[-1] == (150, 150)
            assert c.last_timings.mode == (mode if mode != "auto" else "unary")  # 57 KB
            s = c.similarity(a, gallery="modes", mode=mode, output_dtype="bfloat16")
            assert not np.any(s.view(np.uint32) & 0xFFFF)  # bf16 values, widened
            assert_close(s, want, 2 ** -8 * np.abs(want) + 1e-3, mode)
        tiny_a, tiny_g = a * 1e-3, g * 1e-3  # the Keras clamp changes the answer here
        c.register_gallery("modes", tiny_g)
        keras = ref.keras_cosine(tiny_a, tiny_g, 1e-4)
        assert not np.allclose(keras, ref.sklearn_cosine(tiny_a, tiny_g), atol=1e-3)
        for mode in MODES:
            s = c.similarity(tiny_a, gallery="modes", epsilon=1e-4, mode=mode)
            assert_close(s, keras, 1e-6 + 1e-4 * np.abs(keras), mode)
        c.delete_gallery("modes")


def test_large_query_uploads_against_a_gallery(gc, rng):
    """A query over upload_min_bytes goes through ComputeUpload with only A's pieces."""
    a = rng.standard_normal((2, 1100, 1024)).astype(np.float32)  # 9 MB
    g = rng.standard_normal((300, 1024)).astype(np.float32)
    handle = gc.register_gallery("big-query", g)
    s = handle.similarity(a)
    assert gc.last_timings.mode == "upload"
    assert_close(s, expected("cosine", a, g), 1e-5)
    handle.delete()


def test_float16_gallery_is_sent_as_float16(gc, rng):
    g16 = rng.standard_normal((30, 16)).astype(np.float16)
    a = rng.standard_normal((4, 10, 16))
    handle = gc.register_gallery("fp16-in", g16)
    assert handle.info.dtype == "float16" and handle.info.storage_dtype == "float32"
    for metric in METRICS:
        want = expected(metric, a, g16.astype(np.float64))
        assert_close(handle.similarity(a, metric=metric),
                     want, tolerance(metric, "float32", a, g16, want), metric)
    handle.delete()


def test_directory_galleries(gc, rng, gallery_dir):
    g2 = np.load(gallery_dir / "dir2d.npy")
    g3 = np.load(gallery_dir / "dir3d.npy")
    a = rng.standard_normal((3, 12, 16))
    infos = {g.name: g for g in gc.galleries()}
    for name, data in (("dir2d", g2), ("dir3d", g3)):
        info = infos[name]
        assert info.source == "directory" and info.shape == data.shape
        assert os.path.basename(info.path) == f"{name}.npy" and info.version >= 1
        assert info.bytes > 0
        got = gc.get_gallery(name)
        assert (got.source, got.shape, got.version) == ("directory", data.shape, info.version)
        for metric in METRICS:
            want = expected(metric, a, data)
            assert_close(gc.similarity(a, gallery=name, metric=metric), want,
                         tolerance(metric, "float32", a, data, want), f"{name} {metric}")
        vals, idx = gc.top_k(a, 5, gallery=name)
        want_vals, _ = ref.top_k("cosine", expected("cosine", a, data), 5)
        assert_close(vals, want_vals, 1e-5)
        with pytest.raises(simserve.FailedPreconditionError) as e:
            gc.delete_gallery(name)  # remove the file instead
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert name in names(gc)


def test_asyncio_galleries(gserver, rng):
    a = rng.standard_normal((3, 20, 16))
    g = rng.standard_normal((25, 16))
    want = ref.sklearn_cosine(a, against(a, g))

    async def main():
        async with simserve.aio.Client(gserver.address, timeout=60) as c:
            handle = await c.register_gallery("aio", g, storage_dtype="float16")
            assert isinstance(handle, simserve.aio.Gallery)
            dense = await asyncio.gather(*(c.similarity(a, gallery="aio", mode=m)
                                           for m in MODES))
            topk = await handle.top_k(a, 5, mode="stream")
            listed = [x.name for x in await c.galleries()]
            await c.delete_gallery("aio")  # server-side; the handle re-registers
            again = await handle.similarity(a, mode="upload")
            info = await c.get_gallery("aio")
            deleted = await handle.delete()
            with pytest.raises(simserve.NotFoundError):
                await c.get_gallery("aio")
            with pytest.raises(simserve.NotFoundError):
                await handle.similarity(a)  # released by delete(): nothing to re-register
            return handle, dense, topk, listed, again, info, deleted

    handle, dense, (vals, idx), listed, again, info, deleted = asyncio.run(main())
    tol = tolerance("cosine", "float16", a, g, want)
    for s in dense + [again]:
        assert_close(s, want, tol)
    want_vals, _ = ref.top_k("cosine", want, 5)
    assert_close(vals, want_vals, tol)
    assert_close(np.take_along_axis(want, idx.astype(np.int64), -1), want_vals, 2 * tol)
    assert "aio" in listed and info.version == handle.version == deleted.version == 2
    assert info.storage_dtype == "float16"


# -- list / get / delete ---------------------------------------------------------------------

def test_list_get_delete(gc, rng):
    g = rng.standard_normal((2, 30, 8)).astype(np.float32)
    t0 = time.time() * 1000
    first = gc.register_gallery("lgd.b", g)
    gc.register_gallery("lgd.a", g[0], storage_dtype="bfloat16")
    t1 = time.time() * 1000
    info = gc.get_gallery("lgd.b")
    assert (info.name, info.shape, info.version, info.source) == ("lgd.b", (2, 30, 8), 1,
                                                                  "uploaded")
    assert (info.dtype, info.storage_dtype, info.path) == ("float32", "float32", "")
    assert info.bytes >= g.nbytes and info.prepare_seconds >= 0
    assert t0 - 1000 <= info.registered_unix_ms <= t1 + 1000
    assert info.last_used_unix_ms >= info.registered_unix_ms
    listed = gc.galleries()
    assert [x.name for x in listed] == sorted(x.name for x in listed)
    assert {"lgd.a", "lgd.b", "dir2d", "dir3d"} <= {x.name for x in listed}
    half = gc.get_gallery("lgd.a")
    assert half.storage_dtype == "bfloat16" and half.shape == (30, 8)
    # Half storage halves the gallery's memory.
    full = gc.register_gallery("lgd.full", g[0])
    assert half.bytes < 0.75 * full.info.bytes
    full.delete()
    # Replacing bumps the version; the handle holds the first registration's info.
    time.sleep(0.01)
    second = gc.register_gallery("lgd.b", g * 2)
    assert second.version == 2 and first.version == 1
    a = rng.standard_normal((2, 4, 8))
    assert_close(gc.similarity(a, gallery="lgd.b", metric="dot"), ref.dense("dot", a, g * 2),
                 1e-4 + 1e-5 * 4 * np.abs(ref.dense("dot", a, g)))
    used = gc.get_gallery("lgd.b").last_used_unix_ms
    assert used >= second.info.registered_unix_ms
    # Delete: returns what was removed, then NOT_FOUND; a new registration goes on counting.
    deleted = gc.delete_gallery("lgd.b")
    assert deleted.name == "lgd.b" and deleted.version == 2
    assert "lgd.b" not in names(gc)
    with pytest.raises(simserve.NotFoundError) as e:
        gc.get_gallery("lgd.b")
    assert "lgd.b" in e.value.details and e.value.code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(simserve.NotFoundError):
        gc.delete_gallery("lgd.b")
    assert gc.register_gallery("lgd.b", g, keep=False).version == 3
    gc.delete_gallery("lgd.b")
    gc.delete_gallery("lgd.a")


def test_info_reports_the_gallery_budget(gc):
    assert gc.info(refresh=True).limits["max_gallery_bytes"] == BUDGET


# -- the handle ------------------------------------------------------------------------------

def test_handle_reregisters_after_server_side_delete(gc, rng):
    a = rng.standard_normal((2, 7, 16))
    g = rng.standard_normal((2, 20, 16))
    handle = gc.register_gallery("reg", g, storage_dtype="bfloat16")
    v0 = handle.version
    for mode in MODES:
        gc.delete_gallery("reg")  # the server forgets it: as after an eviction
        s = gc.similarity(a, gallery=handle, mode=mode)
        assert_close(s, expected("cosine", a, g), tolerance("cosine", "bfloat16", a, g, s))
        info = gc.get_gallery("reg")
        assert handle.version == info.version and info.storage_dtype == "bfloat16"
    assert handle.version == v0 + 3
    gc.delete_gallery("reg")
    vals, idx = handle.top_k(a, 3, metric="dot")
    want_vals, _ = ref.top_k("dot", expected("dot", a, g), 3)
    assert_close(vals, want_vals, row_tolerance("dot", "bfloat16", a, g))
    # Without data, the same situation is a NotFoundError that says why.
    handle.release()
    gc.delete_gallery("reg")
    with pytest.raises(simserve.NotFoundError) as e:
        handle.similarity(a)
    assert "reg" in e.value.details and "holds no data" in e.value.details


def test_pinned_handle_and_versions(gc, rng):
    a = rng.standard_normal((2, 5, 8))
    g = rng.standard_normal((9, 8))
    handle = gc.register_gallery("pin", g, pin=True)
    v = handle.version
    assert_close(handle.similarity(a), expected("cosine", a, g), 1e-5)
    gc.register_gallery("pin", -g)  # someone else replaces it
    for mode in MODES:
        with pytest.raises(simserve.FailedPreconditionError) as e:
            handle.similarity(a, mode=mode)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert f"pins version {v}" in e.value.details
        with pytest.raises(simserve.FailedPreconditionError):
            gc.similarity(a, gallery="pin", gallery_version=v, mode=mode)
    # Version 0 / unpinned: the current one (theirs).
    assert_close(gc.similarity(a, gallery="pin", gallery_version=0), -expected("cosine", a, g),
                 1e-5)
    assert_close(gc.similarity(a, gallery="pin", gallery_version=v + 1),
                 -expected("cosine", a, g), 1e-5)
    handle.register()  # puts the handle's data back under a new version
    assert handle.version == v + 2
    assert_close(handle.similarity(a), expected("cosine", a, g), 1e-5)
    handle.delete()


class _FixedPortServer(Server):
    """A Server on a given port, so that a restarted server has the old address."""

    def __init__(self, binary, port, args):
        super().__init__(binary, args)
        self._port = port

    def __enter__(self):
        self.address = f"127.0.0.1:{self._port}"
        self.proc = subprocess.Popen(self.args(self._port), stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env)
        if not self._wait_serving():
            self.stop()
            raise RuntimeError(f"simserve did not become SERVING; log:\n{self.log()}")
        return self


def test_handle_survives_a_server_restart(server_binary, rng):
    from serverctl import free_port
    port = free_port()
    args = ["--metrics_listen=", "--warmup=false"]
    a = rng.standard_normal((2, 6, 16))
    g = rng.standard_normal((20, 16))
    policy = simserve.RetryPolicy(max_attempts=20, initial_backoff=0.05, max_backoff=0.5)
    with simserve.Client(f"127.0.0.1:{port}", timeout=60, retry=policy) as c:
        with _FixedPortServer(server_binary, port, args):
            handle = c.register_gallery("restart", g)
            assert handle.version == 1
        with _FixedPortServer(server_binary, port, args):  # a new pod, empty
            s = handle.similarity(a, metric="euclidean", mode="unary")
            assert_close(s, expected("euclidean", a, g),
                         tolerance("euclidean", "float32", a, g, s))
            assert c.get_gallery("restart").version == handle.version == 1


def test_handle_on_another_replica(gserver, server_binary, rng):
    a = rng.standard_normal((2, 6, 16))
    g = rng.standard_normal((2, 20, 16))
    with Server(server_binary, ["--metrics_listen=", "--warmup=false"]) as other, \
            simserve.Client(gserver.address, timeout=60) as c1, \
            simserve.Client(other.address, timeout=60) as c2:
        handle = c1.register_gallery("replica", g)
        assert "replica" not in names(c2)
        vals, idx = c2.top_k(a, 4, gallery=handle, mode="upload")  # lands on the other one
        want_vals, want_idx = ref.top_k("cosine", expected("cosine", a, g), 4)
        assert_close(vals, want_vals, 1e-5)
        np.testing.assert_array_equal(idx, want_idx)
        assert c2.get_gallery("replica").source == "uploaded"
        assert c1.get_gallery("replica").name == "replica"  # the first one keeps its own
        handle.delete()  # on the handle's own client's server
        assert "replica" in names(c2)


def test_lru_eviction_and_budget(server_binary, gc, rng):
    """Uploaded galleries are evicted least recently used first to make room; one that does
    not fit even then is RESOURCE_EXHAUSTED and not registered. The budget is sized from
    what the server reports for one gallery (its bookkeeping is its own business)."""
    g = rng.standard_normal((200, 64)).astype(np.float32)
    per = gc.register_gallery("probe", g).info.bytes
    gc.delete_gallery("probe")
    budget = int(3.5 * per)
    with Server(server_binary, ["--metrics_listen=", "--warmup=false",
                                f"--gallery_memory_bytes={budget}"]) as srv, \
            simserve.Client(srv.address, timeout=60) as c:
        assert c.info().limits["max_gallery_bytes"] == budget
        h1 = c.register_gallery("g1", g)
        h2 = c.register_gallery("g2", g + 1)
        c.register_gallery("g3", g + 2)
        a = rng.standard_normal((3, 64))
        h1.similarity(a)  # g1 is now used more recently than g2
        c.register_gallery("g4", g + 3)  # 4 do not fit: g2 goes
        assert names(c) == {"g1", "g3", "g4"}
        with pytest.raises(simserve.NotFoundError):
            c.similarity(a, gallery="g2")
        assert_close(h2.similarity(a, metric="dot"), ref.dense("dot", a, g + 1),
                     1e-4 + 1e-5 * np.abs(ref.dense("dot", a, g + 1)))  # re-registered
        assert "g2" in names(c) and len(names(c)) == 3
        with pytest.raises(simserve.ResourceExhaustedError) as e:
            c.register_gallery("huge", np.ones((2000, 64), np.float32))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "huge" not in names(c)


# -- errors ----------------------------------------------------------------------------------

def test_unknown_gallery_is_not_found(gc, rng):
    a = rng.standard_normal((2, 5, 8))
    with pytest.raises(simserve.NotFoundError) as e:
        gc.similarity(a, gallery="no-such-gallery")
    assert "no-such-gallery" in e.value.details
    handle = gc.register_gallery("gone", rng.standard_normal((6, 8)), keep=False)
    info = handle.info
    gc.delete_gallery("gone")
    for mode in MODES:  # the compute RPCs themselves (a GalleryInfo needs no look-up)
        with pytest.raises(simserve.NotFoundError) as e:
            gc.similarity(a, gallery=info, mode=mode)
        assert "gone" in e.value.details and e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(simserve.NotFoundError):
            gc.top_k(a, 2, gallery=info, mode=mode)
    with pytest.raises(simserve.NotFoundError):
        gc.delete_gallery("no-such-gallery")


@pytest.mark.parametrize("name", ["", "has space", "a/b", "x" * 129, "ümlaut", "semi;colon"])
def test_bad_names_are_invalid_and_register_nothing(gc, name):
    before = names(gc)
    with pytest.raises(simserve.InvalidArgumentError) as e:
        gc.register_gallery(name, np.ones((4, 8)))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert names(gc) == before


def test_name_alphabet_and_length_are_accepted(gc):
    for name in ("Az09._-", "x" * 128):
        assert gc.register_gallery(name, np.ones((4, 8))).name == name
        gc.delete_gallery(name)


@pytest.mark.parametrize("shape", [(0, 8), (8, 0), (2, 0, 8), (0, 4, 8)])
def test_bad_shapes_are_invalid(gc, shape):
    before = names(gc)
    with pytest.raises(simserve.InvalidArgumentError):
        gc.register_gallery("bad-shape", np.ones(shape, np.float32))
    assert names(gc) == before


def test_query_mismatches_are_invalid(gc, rng):
    gc.register_gallery("d16", rng.standard_normal((10, 16)))
    gc.register_gallery("b3", rng.standard_normal((3, 10, 16)))
    for mode in MODES:
        with pytest.raises(simserve.InvalidArgumentError):  # D 8 vs 16
            gc.similarity(rng.standard_normal((2, 5, 8)), gallery="d16", mode=mode)
        with pytest.raises(simserve.InvalidArgumentError):  # batch 2 vs 3
            gc.similarity(rng.standard_normal((2, 5, 16)), gallery="b3", mode=mode)
        with pytest.raises(simserve.InvalidArgumentError):  # k > M
            gc.top_k(rng.standard_normal((2, 5, 16)), 11, gallery="d16", mode=mode)
    # Nothing else broke.
    a = rng.standard_normal((3, 5, 16))
    g = gc.get_gallery("b3")
    assert gc.similarity(a, gallery=g).shape == (3, 5, 10)
    gc.delete_gallery("d16")
    gc.delete_gallery("b3")


def _register_raw(address, messages):
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.SimilarityStub(ch).RegisterGallery(iter(messages), timeout=30)


def test_malformed_registration_streams(gserver):
    """What the client never sends: the server's own checks (nothing gets registered)."""
    data = np.ones((4, 8), np.float32).tobytes()

    def header(name, shape=(4, 8), dtype=pb.FLOAT32):
        return pb.RegisterGalleryRequest(header=pb.GalleryHeader(name=name, shape=shape,
                                                                 dtype=dtype))

    def piece(b):
        return pb.RegisterGalleryRequest(data=b)

    cases = {
        "raw-data-first": [piece(data[:64]), header("raw-data-first"), piece(data[64:])],
        "raw-no-header": [piece(data)],
        "raw-empty": [],
        "raw-two-headers": [header("raw-two-headers"), header("raw-two-headers"), piece(data)],
        "raw-too-many": [header("raw-too-many"), piece(data), piece(b"\0\0\0\0")],
        "raw-too-few": [header("raw-too-few"), piece(data[:-4])],
        "raw-fp16-as-fp32": [header("raw-fp16-as-fp32", dtype=pb.FLOAT16), piece(data)],
        "raw-1d": [header("raw-1d", shape=(32,)), piece(data)],
        "raw-4d": [header("raw-4d", shape=(1, 1, 4, 8)), piece(data)],
        "raw-negative": [header("raw-negative", shape=(-4, -8)), piece(data)],
    }
    for name, msgs in cases.items():
        code = code_of(lambda: _register_raw(gserver.address, msgs))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, name
    with simserve.Client(gserver.address) as c:
        assert not {n for n in names(c) if n.startswith("raw-")}
    # The well-formed stream, split anywhere, is fine.
    info = _register_raw(gserver.address, [header("raw-ok"), piece(data[:5]), piece(data[5:])])
    assert info.name == "raw-ok" and list(info.shape) == [4, 8]


def test_gallery_and_b_together_are_invalid(gserver):
    a = np.ones((2, 8), np.float32)
    with simserve.Client(gserver.address) as c:
        c.register_gallery("with-b", np.ones((3, 8)))
    req = pb.ComputeRequest(a=pb.Tensor(shape=[2, 8], raw=a.tobytes()),
                            b=pb.Tensor(shape=[2, 8], raw=a.tobytes()), gallery="with-b")
    with grpc.insecure_channel(gserver.address) as ch:
        stub = pb_grpc.SimilarityStub(ch)
        assert code_of(lambda: stub.Compute(req, timeout=30)) == \
            grpc.StatusCode.INVALID_ARGUMENT
        req.ClearField("b")
        resp = stub.Compute(req, timeout=30)
        assert list(resp.shape) == [2, 3]


def test_asyncio_uploads_report_the_server_status(gserver, server_binary, rng):
    """grpc.aio loses the status of a client-streaming call that the server ends while a
    write is in flight (grpc/grpc#36066: about every other early rejection came back as
    INTERNAL "Internal error from Core"). The asyncio client asks again in one message, or
    for a gallery upload too large for one message asks GetGallery, so the handle still sees
    NOT_FOUND and re-registers; 40 and 20 rounds, where the bug showed in about half."""
    a = rng.standard_normal((3, 20, 16))
    g = rng.standard_normal((25, 16))
    want = expected("cosine", a, g)

    async def rounds(address, a, rounds):
        async with simserve.aio.Client(address, timeout=60) as c:
            handle = await c.register_gallery("aio-lost", g)
            bad = rng.standard_normal(a.shape[:-1] + (8,))
            for _ in range(rounds):
                with pytest.raises(simserve.InvalidArgumentError):  # D mismatch
                    await c.similarity(bad, g[np.newaxis].repeat(a.shape[0], 0), mode="upload")
                await c.delete_gallery("aio-lost")
                s = await handle.similarity(a, mode="upload")  # NOT_FOUND -> re-register
                assert_close(s, expected("cosine", a, g), 1e-5)
            return handle.version

    assert asyncio.run(rounds(gserver.address, a, 40)) == 41
    big = rng.standard_normal((2, 300, 16 * 64))  # 2.4 MB: more than a 1 MiB message
    g = rng.standard_normal((25, 16 * 64))
    with Server(server_binary, ["--metrics_listen=", "--warmup=false",
                                "--max_receive_message_bytes=1048576"]) as small:
        assert asyncio.run(rounds(small.address, big, 20)) == 21
    assert want.shape == (3, 20, 25)
