"""Client behaviour the real server cannot be made to show on demand, against an in-process
fake (fake_server.py): UNAVAILABLE retries with backoff, malformed tile streams detected as
ProtocolError, full-duplex upload ordering (B before A), bf16/fp16 widening bit-exactness,
the zero-copy wire codec against protobuf's own serialisation."""

from __future__ import annotations

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


def test_upload_sends_header_then_b_then_a_in_pieces():
    a, b = inputs()
    prep = common.prepare(a, b, metric="cosine", output_dtype="float32", precision="fp32",
                          epsilon=0.0, top_k=0, chunk_bytes=0)
    msgs = [pb.UploadRequest.FromString(m) for m in common.upload_requests(prep, piece_bytes=200)]
    kinds = [m.WhichOneof("part") for m in msgs]
    assert kinds[0] == "header" and not msgs[0].header.request.a.HasField("raw")
    assert list(msgs[0].header.request.a.shape) == [2, 40, 8]
    first_a = kinds.index("a_data")
    assert set(kinds[1:first_a]) == {"b_data"} and set(kinds[first_a:]) == {"a_data"}
    assert b"".join(m.b_data for m in msgs[1:first_a]) == b.astype("<f4").tobytes()
    assert b"".join(m.a_data for m in msgs[first_a:]) == a.astype("<f4").tobytes()
    assert max(len(m.a_data) for m in msgs[first_a:]) == 200


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


def test_auto_mode_rule():
    def mode(a_shape, b_shape, limits, top_k=0):
        prep = common.prepare(np.zeros(a_shape, np.float32), np.zeros(b_shape, np.float32),
                              metric="cosine", output_dtype="float32", precision="fp32",
                              epsilon=0.0, top_k=top_k, chunk_bytes=0)
        return common.choose_mode(prep, "auto", limits, unary_max_bytes=1 << 20,
                                  upload_min_bytes=8 << 20)
    big = {"max_receive_message_bytes": 64 << 20, "max_send_message_bytes": 64 << 20}
    assert mode((10, 40, 20), (10, 50, 20), big) == "unary"         # 72 KB in, 80 KB out
    assert mode((300, 64), (700, 64), big) == "stream"              # 0.26 MB in, 0.8 MB out
    assert mode((300, 64), (700, 64), big, top_k=5) == "unary"      # top-k: small output
    assert mode((2, 600, 1024), (2, 700, 1024), big) == "upload"    # 10.6 MB in
    small = {"max_receive_message_bytes": 1 << 20, "max_send_message_bytes": 1 << 20}
    assert mode((1000, 256), (10, 256), small) == "upload"          # 1.03 MB > receive limit
    assert mode((100, 8), (3000, 8), small) == "stream"             # 1.2 MB out > unary max
    for explicit in ("unary", "stream", "upload"):
        prep = common.prepare(np.ones((2, 3)), np.ones((2, 3)), metric="dot",
                              output_dtype="float32", precision="fp32", epsilon=0.0,
                              top_k=0, chunk_bytes=0)
        assert common.choose_mode(prep, explicit, small, 1, 1) == explicit


def test_upload_pieces_fit_the_server_receive_limit():
    assert common.piece_bytes(4 << 20, {"max_receive_message_bytes": 64 << 20}) == 4 << 20
    assert common.piece_bytes(4 << 20, {"max_receive_message_bytes": 1 << 20}) == (1 << 20) - 65536
    assert common.piece_bytes(4 << 20, None) == 4 << 20
