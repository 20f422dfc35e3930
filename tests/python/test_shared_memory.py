"""`shared_memory=True` against the real server (started with --allow_shared_memory): results
against sklearn/numpy for dense, top-k, 2D, float64 input, half outputs, `out=` and galleries;
the client's regions (registered once and reused, never left in /dev/shm, unregistered by
close, a lent result never overwritten by a later call, `shared_array` inputs named in place);
a server that lost the regions; bad input; threads and asyncio; and the fallback to the byte
path (with one warning) against a server without the flag."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading

import grpc
import numpy as np
import pytest

import reference
import simserve
import simserve.aio
from serverctl import Server
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc

METRICS = ("cosine", "dot", "euclidean", "squared_euclidean")


@pytest.fixture(scope="module")
def shm_server(server_binary):
    with Server(server_binary, ["--metrics_listen=", "--allow_shared_memory"]) as srv:
        yield srv


@pytest.fixture()
def shm_client(shm_server):
    with simserve.Client(shm_server.address, timeout=60) as c:
        yield c


@pytest.fixture()
def stub(shm_server):
    with grpc.insecure_channel(shm_server.address) as channel:
        yield pb_grpc.SimilarityStub(channel)


def data(shape_a=(3, 40, 24), shape_b=(3, 50, 24), seed=7):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape_a).astype(np.float32),
            rng.standard_normal(shape_b).astype(np.float32))


def prefix(client) -> str:
    """The name prefix of `client`'s regions (its pool must exist: after a shm call)."""
    return client._shm._pool._prefix


def registered(stub, client_or_prefix) -> list:
    """Names of the regions the server holds for a client (or a region-name prefix)."""
    prefix_ = (client_or_prefix if isinstance(client_or_prefix, str)
               else prefix(client_or_prefix))
    regions = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
    return sorted(name for name in regions if name.startswith(prefix_))


def leftover_files(client) -> list:
    return [f for f in os.listdir("/dev/shm") if f.startswith(prefix(client))]


@pytest.mark.parametrize("metric", METRICS)
def test_dense_matches_reference(shm_client, metric):
    a, b = data()
    s = shm_client.similarity(a, b, metric=metric, shared_memory=True)
    assert shm_client.last_timings.mode == "shared_memory"
    np.testing.assert_allclose(s, reference.dense(metric, a, b), rtol=1e-4, atol=2e-4)
    # The same bits as the byte path: one kernel, whatever carries the tensors.
    assert np.array_equal(s, shm_client.similarity(a, b, metric=metric, mode="unary"))


@pytest.mark.parametrize("metric", ("cosine", "euclidean"))
def test_top_k_matches_reference(shm_client, metric):
    a, b = data(seed=3)
    values, indices = shm_client.top_k(a, b, 7, metric=metric, shared_memory=True)
    want_values, want_indices = reference.top_k(metric, reference.dense(metric, a, b), 7)
    assert indices.dtype == np.int32 and indices.shape == (3, 40, 7)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(values, want_values, rtol=1e-4, atol=2e-4)


def test_2d_float64_half_outputs_and_out(shm_client):
    a, b = data((30, 16), (20, 16), seed=5)
    want = reference.dense("cosine", a.astype(np.float64), b.astype(np.float64))
    s = shm_client.similarity(a.astype(np.float64), b, shared_memory=True)
    assert s.shape == (30, 20)
    np.testing.assert_allclose(s, want, rtol=1e-5, atol=1e-6)
    for dtype, tol in (("float16", 2e-3), ("bfloat16", 1e-2)):
        half = shm_client.similarity(a, b, output_dtype=dtype, shared_memory=True)
        assert half.dtype == np.float32
        np.testing.assert_allclose(half, want, atol=tol)
    out = np.full((30, 20), np.nan, dtype=np.float32)
    got = shm_client.similarity(a, b, out=out, shared_memory=True)
    assert got.base is out or got is out or np.shares_memory(got, out)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_gallery(shm_client):
    a, b = data((2, 10, 12), (25, 12), seed=9)
    g = shm_client.register_gallery("shm-gallery", b)
    s = shm_client.similarity(a, gallery=g, shared_memory=True)
    np.testing.assert_allclose(
        s, reference.dense("cosine", a, np.broadcast_to(b, (2, 25, 12))), rtol=1e-4,
        atol=2e-4)
    g.delete()


def test_regions_are_reused_unlinked_and_unregistered(shm_server, stub):
    a, b = data()
    client = simserve.Client(shm_server.address, timeout=60)
    try:
        s1 = client.similarity(a, b, shared_memory=True)
        first = registered(stub, client)
        assert len(first) == 2  # one input region, one output region
        assert leftover_files(client) == []  # unlinked once the server opened them
        del s1
        gc.collect()
        for _ in range(3):
            client.similarity(a, b, shared_memory=True)
        assert registered(stub, client) == first  # reused, nothing new registered
        names = prefix(client)
    finally:
        client.close()
    assert registered(stub, names) == []


def test_a_kept_result_is_never_overwritten(shm_client):
    a, b = data(seed=1)
    c, d = data(seed=2)
    s1 = shm_client.similarity(a, b, shared_memory=True)
    keep = s1.copy()
    s2 = shm_client.similarity(c, d, shared_memory=True)  # must use another output region
    assert not np.shares_memory(s1, s2)
    np.testing.assert_array_equal(s1, keep)
    np.testing.assert_allclose(s2, reference.dense("cosine", c, d), rtol=1e-4, atol=2e-4)


def test_inputs_already_in_shared_memory_are_not_copied(shm_server, stub):
    a, b = data(seed=4)
    with simserve.Client(shm_server.address, timeout=60) as client:
        x = client.shared_array(a.shape)
        y = client.shared_array(b.shape)
        x[...] = a
        y[...] = b
        before = registered(stub, client)
        s = client.similarity(x, y, shared_memory=True)
        # Only an output region was added: the inputs were named where they are.
        assert len(registered(stub, client)) == len(before) + 1
        np.testing.assert_allclose(s, reference.dense("cosine", a, b), rtol=1e-4, atol=2e-4)
        # A result can be the next call's input, in place too.
        s2 = client.similarity(s, s, metric="dot", shared_memory=True)
        np.testing.assert_allclose(s2, reference.dense("dot", s, s), rtol=1e-4, atol=1e-3)


def test_server_that_lost_the_regions(shm_client, stub):
    a, b = data(seed=6)
    shm_client.similarity(a, b, shared_memory=True)
    # What a restarted server looks like to the client: none of its regions is known.
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=""))
    s = shm_client.similarity(a, b, shared_memory=True)
    np.testing.assert_allclose(s, reference.dense("cosine", a, b), rtol=1e-4, atol=2e-4)
    assert len(registered(stub, shm_client)) == 2


def test_bad_input_is_rejected_and_the_next_call_works(shm_client):
    a, b = data(seed=8)
    bad = a.copy()
    bad[1, 2, 3] = np.nan
    with pytest.raises(simserve.InvalidArgumentError, match="(?i)nan"):
        shm_client.similarity(bad, b, shared_memory=True)
    with pytest.raises(simserve.InvalidArgumentError):
        shm_client.similarity(a, b[:, :, :5], shared_memory=True)  # D mismatch
    s = shm_client.similarity(a, b, shared_memory=True)
    np.testing.assert_allclose(s, reference.dense("cosine", a, b), rtol=1e-4, atol=2e-4)


def test_concurrent_threads(shm_client):
    inputs = [data(seed=20 + i) for i in range(6)]
    results, failures = {}, []

    def work(i):
        try:
            for _ in range(3):
                results[i] = shm_client.similarity(*inputs[i], shared_memory=True)
        except Exception as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    for i, (a, b) in enumerate(inputs):
        np.testing.assert_allclose(results[i], reference.dense("cosine", a, b), rtol=1e-4,
                                   atol=2e-4)


def test_asyncio(shm_server, stub):
    a, b = data(seed=12)

    async def main():
        client = simserve.aio.Client(shm_server.address, timeout=60)
        try:
            s = await client.similarity(a, b, shared_memory=True)
            values, indices = await client.top_k(a, b, 4, shared_memory=True)
            x = await client.shared_array(a.shape)
            x[...] = a
            s2 = await client.similarity(x, b, shared_memory=True)
            held = registered(stub, client)
            return s, values, indices, s2, client.last_timings.mode, held, prefix(client)
        finally:
            await client.close()

    s, values, indices, s2, mode, held, names = asyncio.run(main())
    want = reference.dense("cosine", a, b)
    np.testing.assert_allclose(s, want, rtol=1e-4, atol=2e-4)
    np.testing.assert_array_equal(s2, s)
    np.testing.assert_array_equal(indices, reference.top_k("cosine", want, 4)[1])
    assert mode == "shared_memory" and held
    assert registered(stub, names) == []  # close() unregistered them


def test_falls_back_without_the_flag(server, caplog):
    a, b = data(seed=13)
    with simserve.Client(server.address, timeout=60) as client:
        with caplog.at_level(logging.WARNING, logger="simserve"):
            s1 = client.similarity(a, b, shared_memory=True)
            s2 = client.similarity(a, b, shared_memory=True)
            x = client.shared_array((4, 5))
        assert client.last_timings.mode == "unary"
        assert isinstance(x, np.ndarray) and x.shape == (4, 5)
    warnings = [r for r in caplog.records if "shared_memory=True" in r.getMessage()]
    assert len(warnings) == 1 and "--allow_shared_memory" in warnings[0].getMessage()
    np.testing.assert_allclose(s1, reference.dense("cosine", a, b), rtol=1e-4, atol=2e-4)
    np.testing.assert_array_equal(s1, s2)


def test_no_space_in_dev_shm_falls_back_for_that_call(shm_server, monkeypatch, caplog):
    """A /dev/shm too small (64 MiB in a default container) fails the region's allocation
    with ENOSPC up front (never SIGBUS later): that call goes over gRPC, with a warning."""
    a, b = data(seed=14)

    def no_space(fd, offset, length):
        raise OSError(28, "No space left on device")

    with simserve.Client(shm_server.address, timeout=60) as client:
        monkeypatch.setattr(os, "posix_fallocate", no_space)
        with caplog.at_level(logging.WARNING, logger="simserve"):
            s = client.similarity(a, b, shared_memory=True)
        assert client.last_timings.mode == "unary"
        assert any("No space left" in r.getMessage() for r in caplog.records)
        np.testing.assert_allclose(s, reference.dense("cosine", a, b), rtol=1e-4, atol=2e-4)
        monkeypatch.undo()
        assert [f for f in os.listdir("/dev/shm") if f.startswith(prefix(client))] == []
        s = client.similarity(a, b, shared_memory=True)  # space again: shared memory again
        assert client.last_timings.mode == "shared_memory"


def test_a_call_that_fails_mid_way_retires_its_regions(shm_server, stub):
    """After a deadline (or a cancel) the server may still be writing into the call's
    regions: they must never serve another call (they are unregistered instead)."""
    a, b = data((20, 400, 200), (20, 500, 200), seed=15)
    with simserve.Client(shm_server.address, timeout=60) as client:
        client.similarity(a, b, shared_memory=True)  # warm: its two regions are now idle
        pool = client._shm._pool
        warm = set(pool.idle_names())
        assert len(warm) == 2
        with pytest.raises(simserve.DeadlineExceededError):
            client.similarity(a, b, shared_memory=True, timeout=0.003)
        retired = warm - set(pool.idle_names())
        s = client.similarity(a, b, shared_memory=True)
        np.testing.assert_allclose(s, reference.dense("cosine", a, b), rtol=1e-4, atol=2e-4)
        if retired:  # the deadline struck after the regions were taken
            assert not retired & set(registered(stub, client))  # unregistered, not reused
            assert not retired & set(pool.idle_names())


def test_a_forked_child_starts_with_its_own_regions(shm_client):
    a, b = data(seed=16)
    shm_client.similarity(a, b, shared_memory=True)
    assert shm_client._shm._pool is not None
    pid = os.fork()
    if pid == 0:  # the child: the parent's MAP_SHARED regions must not be reused here
        os._exit(0 if shm_client._shm._pool is None else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert shm_client._shm._pool is not None  # the parent keeps its own
    np.testing.assert_allclose(shm_client.similarity(a, b, shared_memory=True),
                               reference.dense("cosine", a, b), rtol=1e-4, atol=2e-4)


def test_bad_mode_and_out_are_rejected_before_any_call(shm_client):
    a, b = data(seed=17)
    with pytest.raises(simserve.InvalidArgumentError, match="mode"):
        shm_client.similarity(a, b, shared_memory=True, mode="bogus")
    with pytest.raises(simserve.InvalidArgumentError, match="out must be"):
        shm_client.similarity(a, b, shared_memory=True, out=np.empty((2, 2), np.float32))
