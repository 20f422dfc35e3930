"""Gallery behaviour of the client that needs no real server (in-process fake, fake_server.py):
what gallery requests look like on the wire (b absent, the name and version set, only A
uploaded), the registration stream, the argument forms, and the handle's single
re-registration and retry when a gallery vanishes (NOT_FOUND) — which the real server shows
too (test_gallery_server.py) but not with the call counts checked here. Numbers against the
real server only."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

import simserve
import simserve.aio
from fake_server import FakeServer
from simserve import _common as common
from simserve import _wire
from simserve.v1 import similarity_pb2 as pb

MODES = ("unary", "stream", "upload")


@pytest.fixture()
def fake():
    with FakeServer() as srv:
        yield srv


def cosine(a, b):
    """Cosine of a [.., N, D] with b [M, D] or [.., M, D], float64."""
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ np.swapaxes(b, -1, -2)


def data(seed=11):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((2, 6, 8)), rng.standard_normal((9, 8))


def compute_calls(calls):
    return [c for c in calls if c.startswith("Compute")]


# -- requests on the wire ------------------------------------------------------------------

def test_gallery_request_has_no_b_and_names_the_gallery():
    a = np.arange(24, dtype="<f4").reshape(2, 3, 4)
    target = common.GalleryTarget("faces", version=7, shape=(5, 4))
    for top_k in (0, 2):
        prep = common.prepare(a, None, gallery=target, metric="dot", output_dtype="float32",
                              precision="fp32", epsilon=0.0, top_k=top_k, chunk_bytes=0)
        got = pb.ComputeRequest.FromString(prep.request_bytes())
        assert got == prep.request(with_data=True)  # the zero-copy codec = protobuf
        assert not got.HasField("b") and got.gallery == "faces" and got.gallery_version == 7
        assert got.a.raw == a.tobytes() and list(got.a.shape) == [2, 3, 4]
        assert prep.spec.shape == (2, 3, top_k or 5) and prep.input_bytes == a.nbytes
    # A 2D query against a 2D gallery: a 2D result; a 3D gallery's M sizes it the same way.
    prep = common.prepare(a[0], None, gallery=common.GalleryTarget("g", shape=(1, 5, 4)),
                          metric="dot", output_dtype="bfloat16", precision="fp32",
                          epsilon=0.0, top_k=0, chunk_bytes=0)
    assert prep.spec.shape == (3, 5) and prep.spec.values_bytes == 3 * 5 * 2
    msgs = [pb.UploadRequest.FromString(m) for m in common.upload_requests(prep, 5)]
    assert msgs[0].WhichOneof("part") == "header"
    assert msgs[0].header.request.gallery == "g"
    assert not msgs[0].header.request.HasField("b")
    assert {m.WhichOneof("part") for m in msgs[1:]} == {"a_data"}
    assert b"".join(m.a_data for m in msgs[1:]) == a[0].tobytes()


def test_registration_stream_is_header_then_pieces():
    b16 = np.linspace(-2, 2, 3 * 7 * 5).reshape(3, 7, 5).astype(np.float16)
    data16, wire = common.gallery_data(b16)
    assert wire == pb.FLOAT16 and data16 is b16  # float16 travels as is, no copy
    msgs = [pb.RegisterGalleryRequest.FromString(m) for m in common.register_requests(
        "g.1", data16, wire, pb.BFLOAT16, piece_bytes=64)]
    h = msgs[0].header
    assert (h.name, list(h.shape), h.dtype, h.storage_dtype) == (
        "g.1", [3, 7, 5], pb.FLOAT16, pb.BFLOAT16)
    assert all(m.WhichOneof("part") == "data" for m in msgs[1:])
    assert max(len(m.data) for m in msgs[1:]) == 64
    assert b"".join(m.data for m in msgs[1:]) == b16.astype("<f2").tobytes()
    data32, wire = common.gallery_data(np.ones((4, 3)))  # float64 -> float32
    assert wire == pb.FLOAT32 and data32.dtype == np.float32
    empty = list(common.register_requests("e", np.zeros((0, 3), np.float32), pb.FLOAT32,
                                          pb.FLOAT32, 64))
    assert len(empty) == 1  # the header only: the server rejects the shape
    with pytest.raises(simserve.InvalidArgumentError):
        common.gallery_data(np.ones(5))
    with pytest.raises(simserve.InvalidArgumentError):
        common.gallery_data(np.array([["a"]]))
    with pytest.raises(simserve.InvalidArgumentError):
        common.storage_dtype("int8")


def test_registration_pieces_fit_the_server_receive_limit(fake):
    fake.servicer.limits = pb.Limits(max_receive_message_bytes=8192,
                                     message_overhead_bytes=4096)
    b = np.random.default_rng(1).standard_normal((100, 32)).astype(np.float32)  # 12.8 KB
    sent = []
    with simserve.Client(fake.address) as c:
        real = c._register_gallery
        c._register_gallery = lambda reqs, timeout: real(
            (sent.append(len(m)) or m for m in reqs), timeout=timeout)
        g = c.register_gallery("small", b)
    assert g.version == 1 and len(sent) == 1 + 4  # header + 4 pieces of <= 4096 bytes
    assert max(sent[1:]) <= 4096 + 8
    np.testing.assert_array_equal(fake.servicer.galleries["small"][0], b)


@pytest.mark.parametrize("mode", MODES)
def test_calls_by_name_info_and_handle(fake, mode):
    a, b = data()
    want = cosine(a, b)
    with simserve.Client(fake.address) as c:
        g = c.register_gallery("faces", b)
        assert (g.name, g.version, g.shape, g.holds_data, g.pin) == ("faces", 1, (9, 8),
                                                                     True, False)
        fake.servicer.calls.clear()
        s = c.similarity(a, gallery="faces", mode=mode)  # by name: GetGallery sizes it
        assert fake.servicer.calls[0] == "GetGallery"
        np.testing.assert_allclose(s, want, atol=1e-5)
        info = c.get_gallery("faces")
        fake.servicer.calls.clear()
        for s in (c.similarity(a, gallery=info, mode=mode),  # known shape: no look-up
                  c.similarity(a, gallery=g, mode=mode), g.similarity(a, mode=mode)):
            np.testing.assert_allclose(s, want, atol=1e-5)
        assert "GetGallery" not in fake.servicer.calls
        req = fake.servicer.requests[-1]
        assert req.gallery == "faces" and req.gallery_version == 0 and not req.HasField("b")
        if mode == "upload":
            assert fake.servicer.upload_parts[0] == "header"
            assert set(fake.servicer.upload_parts[1:]) == {"a_data"}
        s2 = c.similarity(a[0], gallery=g, mode=mode)  # 2D query, 2D gallery: 2D result
        np.testing.assert_allclose(s2, want[0], atol=1e-5)


def test_top_k_argument_forms(fake):
    a, b = data()
    want_idx = np.argsort(-cosine(a, b), axis=-1, kind="stable")[..., :3]
    with simserve.Client(fake.address) as c:
        g = c.register_gallery("faces", b)
        for vals, idx in (c.top_k(a, 3, gallery=g), c.top_k(a, k=3, gallery="faces"),
                          g.top_k(a, 3), c.top_k(a, np.int64(3), gallery=g)):
            assert vals.shape == idx.shape == (2, 6, 3)
        with pytest.raises(simserve.InvalidArgumentError):
            c.top_k(a, b, 3, gallery=g)  # b and gallery
        with pytest.raises(simserve.InvalidArgumentError):
            c.top_k(a, gallery=g)  # no k
        with pytest.raises(simserve.InvalidArgumentError):
            c.similarity(a, b, gallery="faces")
        with pytest.raises(simserve.InvalidArgumentError):
            c.similarity(a)  # neither
        with pytest.raises(simserve.InvalidArgumentError):
            c.similarity(a, b, gallery_version=1)  # a version without a gallery
        with pytest.raises(simserve.InvalidArgumentError):
            c.similarity(a, gallery=g, gallery_version=1)  # a handle decides by its pin
        with pytest.raises(simserve.InvalidArgumentError):
            c.similarity(a, gallery=42)
        with pytest.raises(simserve.InvalidArgumentError):
            c.register_gallery(b"bytes-name", b)
    # Exact ties are not in this data, so the fake's numpy order is the stable argsort's.
    assert fake.servicer.requests[-1].top_k == 3
    np.testing.assert_array_equal(idx, want_idx)


# -- the handle: re-register once on NOT_FOUND -----------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_handle_reregisters_once_when_gallery_vanished(fake, mode):
    a, b = data()
    with simserve.Client(fake.address) as c:
        c.info()  # cached, so the call sequence below is only the gallery's
        g = c.register_gallery("faces", b)
        fake.servicer.calls.clear()
        fake.servicer.forget = 1  # the next compute finds an empty server (a restart)
        s = g.similarity(a, mode=mode)
        np.testing.assert_allclose(s, cosine(a, b), atol=1e-5)
        calls = fake.servicer.calls
        assert calls[1] == "RegisterGallery" and compute_calls(calls) == [calls[0]] * 2
        assert g.version == 2 and fake.servicer.galleries["faces"][1].version == 2
        np.testing.assert_array_equal(fake.servicer.galleries["faces"][0], b.astype(np.float32))
        # A second loss within the same call is not retried again.
        fake.servicer.calls.clear()
        fake.servicer.forget = 2
        with pytest.raises(simserve.NotFoundError) as e:
            g.similarity(a, mode=mode)
        assert "faces" in e.value.details
        assert fake.servicer.calls.count("RegisterGallery") == 1
        assert len(compute_calls(fake.servicer.calls)) == 2


def test_handle_without_data_does_not_reregister(fake):
    a, b = data()
    with simserve.Client(fake.address) as c:
        g = c.register_gallery("faces", b, keep=False)
        assert not g.holds_data
        fake.servicer.forget = 1
        fake.servicer.calls.clear()
        with pytest.raises(simserve.NotFoundError) as e:
            c.similarity(a, gallery=g, mode="unary")
        assert "holds no data" in e.value.details and "faces" in e.value.details
        assert fake.servicer.calls == ["Compute"]
        with pytest.raises(simserve.FailedPreconditionError):
            g.register()
        # A name is never re-registered either: the client holds nothing for it.
        c.register_gallery("other", b)
        fake.servicer.forget = 1
        with pytest.raises(simserve.NotFoundError):
            c.similarity(a, gallery=c.get_gallery("other"), mode="unary")
        h = c.register_gallery("kept", b)
        h.release()
        fake.servicer.forget = 1
        with pytest.raises(simserve.NotFoundError):
            h.similarity(a, mode="unary")


def test_pinned_handle_fails_on_replacement_and_follows_on_refresh(fake):
    a, b = data()
    with simserve.Client(fake.address) as c:
        g = c.register_gallery("faces", b, pin=True)
        g.similarity(a, mode="unary")
        assert fake.servicer.requests[-1].gallery_version == 1
        other = c.register_gallery("faces", 2 * b + 1)  # someone else replaces it
        assert other.version == 2
        fake.servicer.calls.clear()
        with pytest.raises(simserve.FailedPreconditionError) as e:
            g.similarity(a, mode="unary")
        assert "pins version 1" in e.value.details
        assert fake.servicer.calls == ["Compute"]  # no re-registration over theirs
        assert g.refresh().version == 2 and g.version == 2
        np.testing.assert_allclose(g.similarity(a, mode="unary"), cosine(a, 2 * b + 1),
                                   atol=1e-5)
        assert g.register().version == 3  # puts the handle's own data back
        np.testing.assert_allclose(g.similarity(a, mode="unary"), cosine(a, b), atol=1e-5)
        # A pinned handle whose gallery vanished re-registers and pins the new version.
        fake.servicer.forget = 1
        np.testing.assert_allclose(g.similarity(a, mode="stream"), cosine(a, b), atol=1e-5)
        assert g.version == 4 and fake.servicer.requests[-1].gallery_version == 4
        # By name, gallery_version pins too.
        with pytest.raises(simserve.FailedPreconditionError):
            c.similarity(a, gallery="faces", gallery_version=3, mode="unary")
        c.similarity(a, gallery="faces", gallery_version=4, mode="unary")


def test_a_handle_serves_another_client(fake):
    """A handle passed to a client of another replica (here: the same fake after a
    "restart") re-registers through that client."""
    a, b = data()
    with simserve.Client(fake.address) as c1, simserve.Client(fake.address) as c2:
        g = c1.register_gallery("faces", b)
        fake.servicer.forget = 1
        np.testing.assert_allclose(c2.similarity(a, gallery=g, mode="stream"), cosine(a, b),
                                   atol=1e-5)
        assert g.version == 2


def test_asyncio_handle_reregisters(fake):
    a, b = data()

    async def main():
        async with simserve.aio.Client(fake.address) as c:
            g = await c.register_gallery("faces", b.astype(np.float16))
            assert isinstance(g, simserve.aio.Gallery) and g.version == 1
            fake.servicer.forget = 1
            fake.servicer.calls.clear()
            results = [await g.similarity(a, mode=m) for m in MODES]
            vals, idx = await c.top_k(a, 2, gallery="faces")
            return g, results, vals, idx, list(fake.servicer.calls)

    g, results, vals, idx, calls = asyncio.run(main())
    want = cosine(a, b.astype(np.float16).astype(np.float64))
    for s in results:
        np.testing.assert_allclose(s, want, atol=1e-5)
    assert calls.count("RegisterGallery") == 1 and g.version == 2
    assert fake.servicer.galleries["faces"][1].dtype == pb.FLOAT16
    assert idx.shape == (2, 6, 2)


def test_gallery_shape_change_is_reported(fake):
    """The result's shape comes from the gallery's known shape; if the server's differs (it
    was replaced with another M meanwhile) the error says so."""
    a, b = data()
    with simserve.Client(fake.address) as c:
        g = c.register_gallery("faces", b)
        c.register_gallery("faces", np.ones((4, 8)))
        with pytest.raises(simserve.ProtocolError) as e:
            g.similarity(a, mode="unary")
        assert "faces" in e.value.details and "refresh" in e.value.details
        g.refresh()
        assert g.similarity(a, mode="unary").shape == (2, 6, 4)


def test_wire_field_of_gallery_data():
    assert _wire.F_GALLERY_DATA == pb.RegisterGalleryRequest.DESCRIPTOR.fields_by_name[
        "data"].number
    msg = pb.RegisterGalleryRequest.FromString(
        _wire.upload_piece(_wire.F_GALLERY_DATA, memoryview(b"abc")))
    assert msg.data == b"abc"
