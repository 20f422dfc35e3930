"""Client behaviour the real server cannot be made to show on demand, against an in-process
fake (fake_server.py): UNAVAILABLE retries with backoff, malformed tile streams detected as
ProtocolError, full-duplex upload ordering (B before A), bf16/fp16 widening bit-exactness,
the zero-copy wire codec against protobuf's own serialisation."""

from __future__ import annotations

import json
import os

import grpc
import numpy as np
import pytest

import simserve
from fake_server import FakeServer
from simserve import _common as common
from simserve import _wire
from simserve.v1 import similarity_pb2 as pb

FAST_RETRY = simserve.RetryPolicy(max_attempts=4, initial_backoff=0.01, max_backoff=0.02)


@pytest.fixture()
def fake():
    with FakeServer() as srv:
        yield srv


def inputs():
    rng = np.random.default_rng(7)
    return rng.standard_normal((2, 40, 8)), rng.standard_normal((2, 30, 8))


def test_unavailable_is_retried_then_succeeds(fake):
    a, b = inputs()
    fake.servicer.fail_first = 2
    with simserve.Client(fake.address, retry=FAST_RETRY) as c:
        c.similarity(a, b, mode="stream")
        assert c.last_timings.attempts == 3
    assert fake.servicer.calls == ["ComputeStream"] * 3


def test_retries_are_bounded_and_configurable(fake):
    a, b = inputs()
    policy = simserve.RetryPolicy(max_attempts=2, initial_backoff=0.01)
    with simserve.Client(fake.address, retry=policy) as c:
        c.info()  # cached: upload mode sizes its pieces by the server's receive limit
        fake.servicer.fail_first = 10
        with pytest.raises(simserve.UnavailableError) as e:
            c.similarity(a, b, mode="upload")
    assert e.value.code == grpc.StatusCode.UNAVAILABLE and "draining" in e.value.details
    assert fake.servicer.calls == ["GetInfo"] + ["ComputeUpload"] * 2


def test_no_retry_when_disabled(fake):
    a, b = inputs()
    fake.servicer.fail_first = 1
    with simserve.Client(fake.address, retry=simserve.RetryPolicy(max_attempts=1)) as c:
        with pytest.raises(simserve.UnavailableError):
            c.similarity(a, b, mode="unary")
    assert fake.servicer.calls == ["Compute"]


@pytest.mark.parametrize("corruption", ["drop_tile", "bad_length"])
def test_malformed_streams_are_protocol_errors(fake, corruption):
    a, b = inputs()
    fake.servicer.corrupt = corruption
    with simserve.Client(fake.address, chunk_bytes=256) as c:
        for mode in ("stream", "upload"):
            with pytest.raises(simserve.ProtocolError) as e:
                c.similarity(a, b, mode=mode)
            assert e.value.code == grpc.StatusCode.INTERNAL


def test_upload_interleaves_each_batch_entry_b_then_a_in_pieces():
    a, b = inputs()
    prep = common.prepare(a, b, metric="cosine", output_dtype="float32", precision="fp32",
                          epsilon=0.0, top_k=0, chunk_bytes=0)
    msgs = [pb.UploadRequest.FromString(m) for m in common.upload_requests(prep, piece_bytes=200)]
    kinds = [m.WhichOneof("part") for m in msgs]
    assert kinds[0] == "header" and not msgs[0].header.request.a.HasField("raw")
    assert list(msgs[0].header.request.a.shape) == [2, 40, 8]
    # Runs of b_data then a_data per batch entry: b[0], a[0], b[1], a[1].
    runs = [k for i, k in enumerate(kinds[1:]) if i == 0 or kinds[i] != k]
    assert runs == ["b_data", "a_data", "b_data", "a_data"]
    assert b"".join(m.b_data for m in msgs[1:]) == b.astype("<f4").tobytes()
    assert b"".join(m.a_data for m in msgs[1:]) == a.astype("<f4").tobytes()
    assert max(len(m.a_data) for m in msgs[1:]) == 200


def test_timings_from_trailing_metadata(fake):
    a, b = inputs()
    with simserve.Client(fake.address) as c:
        c.similarity(a, b, mode="stream")
    t = c.last_timings
    assert (t.queue_ms, t.compute_ms, t.total_ms) == (0.5, 1.5, 2.5)


@pytest.mark.parametrize("dtype", [pb.BFLOAT16, pb.FLOAT16])
def test_reduced_precision_tiles_widen_exactly(dtype):
    # Values exactly representable in bf16 and fp16; the wire bytes are built by numpy
    # (fp16) or by taking the upper half of the float32 (bf16, its definition).
    want = np.array([[1.5, -2.0, 0.15625, 0.0], [-0.0, 3.0, -0.375, 65504.0]], np.float32)
    if dtype == pb.BFLOAT16:
        want[1, 3] = 2.0 ** 100  # out of fp16 range, fine for bf16
        raw = (want.view(np.uint32) >> 16).astype("<u2").tobytes()
    else:
        raw = want.astype("<f2").tobytes()
    prep = common.prepare(np.ones((2, 3)), np.ones((4, 3)), metric="dot",
                          output_dtype=dtype, precision="fp32", epsilon=0.0, top_k=0,
                          chunk_bytes=0)
    asm = common.Assembler(prep)
    asm.add_chunk(pb.ComputeChunk(shape=[2, 4], dtype=dtype, batch_index=0, row_offset=0,
                                  row_count=1, values_raw=raw[:len(raw) // 2]))
    asm.add_chunk(pb.ComputeChunk(dtype=dtype, batch_index=0, row_offset=1, row_count=1,
                                  values_raw=raw[len(raw) // 2:]))
    got = asm.result()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_wire_codec_matches_protobuf():
    rng = np.random.default_rng(3)
    vals = rng.standard_normal(37).astype("<f4").tobytes()
    idx = np.arange(37, dtype="<i4").tobytes()
    msg = pb.ComputeChunk(shape=[3, 1 << 40, 5], dtype=pb.BFLOAT16, batch_index=2,
                          row_offset=300, row_count=7, values_raw=vals, indices_raw=idx)
    # An unknown field (number 15, varint and length-delimited) must be skipped.
    data = msg.SerializeToString() + bytes([15 << 3 | 0, 0x96, 0x01, 15 << 3 | 2, 2, 9, 9])
    c = _wire.parse_chunk(data)
    assert (c.shape, c.dtype, c.batch_index, c.row_offset, c.row_count) == (
        [3, 1 << 40, 5], pb.BFLOAT16, 2, 300, 7)
    assert bytes(c.values_raw) == vals and bytes(c.indices_raw) == idx
    assert c.values_raw.obj is data and c.indices_raw.obj is data  # views, not copies
    empty = _wire.parse_chunk(pb.ComputeChunk().SerializeToString())
    assert empty.shape == [] and len(empty.values_raw) == 0
    with pytest.raises(ValueError):
        _wire.parse_chunk(msg.SerializeToString()[:-5])
    for n in (0, 1, 127, 128, 300, 1 << 20, (1 << 20) + 17):
        piece = memoryview(bytes(range(256)) * (n // 256 + 1))[:n]
        up = pb.UploadRequest.FromString(_wire.upload_piece(_wire.F_A_DATA, piece))
        assert up.WhichOneof("part") == "a_data" and up.a_data == bytes(piece)
    assert pb.UploadRequest.FromString(
        _wire.upload_piece(_wire.F_B_DATA, memoryview(b"xy"))).b_data == b"xy"


def test_response_codec_matches_protobuf():
    rng = np.random.default_rng(4)
    vals = rng.standard_normal(60).astype("<f2").tobytes()
    idx = np.arange(60, dtype="<i4").tobytes()
    msg = pb.ComputeResponse(shape=[3, 4, 5], dtype=pb.FLOAT16, values_raw=vals,
                             indices_raw=idx)
    data = msg.SerializeToString() + bytes([15 << 3 | 0, 0x96, 0x01, 15 << 3 | 2, 2, 9, 9])
    r = _wire.parse_response(data)
    assert (r.shape, r.dtype, r.batch_index, r.row_offset, r.row_count) == (
        [3, 4, 5], pb.FLOAT16, 0, 0, 0)
    assert bytes(r.values_raw) == vals and bytes(r.indices_raw) == idx
    assert r.values_raw.obj is data  # a view into the received bytes
    # values_raw is field 3 of a response but batch_index of a chunk: the parsers differ.
    assert len(_wire.parse_chunk(msg.SerializeToString()).values_raw) == 0
    ser = msg.SerializeToString()
    for cut in (1, 3, len(ser) - 1, len(ser) - 300):  # tag, packed shape, payloads
        with pytest.raises(ValueError):
            _wire.parse_response(ser[:cut])


def test_compute_request_codec_matches_protobuf():
    a = np.arange(24, dtype="<f4").reshape(2, 3, 4)
    b = -np.arange(8, dtype="<f4").reshape(2, 1, 4)
    for top_k, squeeze in ((0, False), (3, False), (0, True)):
        prep = common.prepare(a[0] if squeeze else a, b[0] if squeeze else b, metric="dot",
                              output_dtype="bfloat16", precision="bf16", epsilon=0.25,
                              top_k=top_k, chunk_bytes=4096)
        got = pb.ComputeRequest.FromString(prep.request_bytes())
        want = prep.request(with_data=True)
        assert got == want
        assert got.a.raw == prep.a.tobytes() and list(got.a.shape) == list(want.a.shape)


VECTORS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "client", "testdata", "output_sizes.json")


@pytest.fixture(scope="module")
def vectors():
    """client/testdata/output_sizes.json: the C++ client_test checks the same vectors."""
    with open(VECTORS) as f:
        return json.load(f)


def _elements(shape):
    n = 1
    for d in shape:
        n *= d
    return n


def test_shared_output_size_vectors(vectors):
    assert len(vectors["output_sizes"]) > 10
    for c in vectors["output_sizes"]:
        dtype = pb.DataType.Value(c["output_dtype"])
        if "error" in c:
            want = {"INVALID_ARGUMENT": simserve.InvalidArgumentError,
                    "RESOURCE_EXHAUSTED": simserve.ResourceExhaustedError}[c["error"]]
            with pytest.raises(want):
                common.output_size(c["a_shape"], c["b_shape"], dtype, c["top_k"])
            continue
        spec = common.output_size(c["a_shape"], c["b_shape"], dtype, c["top_k"])
        assert (list(spec.shape), spec.values_bytes, spec.indices_bytes) == (
            c["out_shape"], c["values_bytes"], c["indices_bytes"]), c["name"]


def test_shared_mode_vectors(vectors):
    assert len(vectors["modes"]) > 10
    defaults = vectors["defaults"]
    for c in vectors["modes"]:
        spec = common.output_size(c["a_shape"], c["b_shape"],
                                  pb.DataType.Value(c["output_dtype"]), c["top_k"])
        inputs = 4 * (_elements(c["a_shape"]) + _elements(c["b_shape"]))
        got = common.choose_mode(inputs, spec.total_bytes, c["limits"],
                                 c.get("unary_max_bytes", defaults["unary_max_bytes"]),
                                 c.get("upload_min_bytes", defaults["upload_min_bytes"]))
        assert got == c["mode"], c["name"]


def test_shared_upload_piece_vectors(vectors):
    assert len(vectors["upload_piece_bytes"]) > 4
    for c in vectors["upload_piece_bytes"]:
        assert common.piece_bytes(c["wanted"], c["limits"]) == c["piece_bytes"], c["name"]


def test_prepared_requests_use_the_shared_rule():
    def mode(a_shape, b_shape, limits, top_k=0):
        prep = common.prepare(np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32),
                              metric="cosine", output_dtype="float32", precision="fp32",
                              epsilon=0.0, top_k=top_k, chunk_bytes=0)
        return common.resolve_mode(prep, "auto", limits, unary_max_bytes=1 << 20,
                                   upload_min_bytes=8 << 20)
    big = {"max_receive_message_bytes": 64 << 20, "max_send_message_bytes": 64 << 20}
    assert mode((10, 40, 20), (10, 50, 20), big) == "unary"         # 72 KB in, 80 KB out
    assert mode((300, 64), (700, 64), big) == "stream"              # 0.26 MB in, 0.8 MB out
    assert mode((300, 64), (700, 64), big, top_k=5) == "unary"      # top-k: small output
    assert mode((2, 600, 1024), (2, 700, 1024), big) == "upload"    # 10.6 MB in
    small = {"max_receive_message_bytes": 1 << 20, "max_send_message_bytes": 1 << 20,
             "message_overhead_bytes": 4096}
    assert mode((1001, 256), (20, 256), small) == "upload"          # 1 row over the limit
    assert mode((100, 8), (3000, 8), small) == "stream"             # 1.2 MB out > unary max
    for explicit in ("unary", "stream", "upload"):
        prep = common.prepare(np.ones((2, 3)), np.ones((2, 3)), metric="dot",
                              output_dtype="float32", precision="fp32", epsilon=0.0,
                              top_k=0, chunk_bytes=0)
        assert common.resolve_mode(prep, explicit, small, 1, 1) == explicit
    with pytest.raises(simserve.InvalidArgumentError):
        common.resolve_mode(prep, "carrier-pigeon", small, 1, 1)
