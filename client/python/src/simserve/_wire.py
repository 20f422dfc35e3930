"""Zero-copy protobuf wire codec for the bulk messages of every RPC.

grpcio hands protobuf-python a bytes object per message, and protobuf copies every bytes
field out of it; for the ~80 MB of result of the seed workload that is one more full copy
under the GIL. `parse_chunk` / `parse_response` instead walk the wire format of ComputeChunk /
ComputeResponse and return memoryviews into the received buffer, which Assembler copies once,
straight into the result. On the way out, `compute_request` and `upload_piece` serialise a
ComputeRequest / UploadRequest{a_data|b_data} with a single copy of the tensor bytes (protobuf
would copy them into the message and again into the serialisation).
Field numbers come from the generated descriptors, so a renumbering in the proto cannot
silently break this; the tests run both paths against the real server.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from simserve.v1 import similarity_pb2 as pb

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def _num(message, field: str) -> int:
    return message.DESCRIPTOR.fields_by_name[field].number


_C = pb.ComputeChunk
F_SHAPE, F_DTYPE, F_BATCH, F_ROW, F_COUNT, F_VALUES, F_INDICES = (
    _num(_C, f) for f in ("shape", "dtype", "batch_index", "row_offset", "row_count",
                          "values_raw", "indices_raw"))
_R = pb.ComputeResponse
R_SHAPE, R_DTYPE, R_VALUES, R_INDICES = (
    _num(_R, f) for f in ("shape", "dtype", "values_raw", "indices_raw"))
F_A_DATA, F_B_DATA = _num(pb.UploadRequest, "a_data"), _num(pb.UploadRequest, "b_data")
REQ_A, REQ_B = _num(pb.ComputeRequest, "a"), _num(pb.ComputeRequest, "b")
TENSOR_RAW = _num(pb.Tensor, "raw")
F_GALLERY_DATA = _num(pb.RegisterGalleryRequest, "data")


def encode_varint(n: int) -> bytes:
    """Protobuf base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


class ChunkView:
    """A parsed ComputeChunk or ComputeResponse whose values_raw / indices_raw are
    memoryviews into the received message (no copy). A response has no batch_index /
    row_offset / row_count (they stay 0)."""

    __slots__ = ("shape", "dtype", "batch_index", "row_offset", "row_count", "values_raw",
                 "indices_raw")

    def __init__(self) -> None:
        self.shape: List[int] = []
        self.dtype = 0
        self.batch_index = self.row_offset = self.row_count = 0
        self.values_raw: memoryview = memoryview(b"")
        self.indices_raw: memoryview = memoryview(b"")


# Per message type: field number -> ChunkView attribute, split by wire representation.
_CHUNK_VARINTS = {F_SHAPE: "shape", F_DTYPE: "dtype", F_BATCH: "batch_index",
                  F_ROW: "row_offset", F_COUNT: "row_count"}
_CHUNK_BYTES = {F_VALUES: "values_raw", F_INDICES: "indices_raw"}
_RESPONSE_VARINTS = {R_SHAPE: "shape", R_DTYPE: "dtype"}
_RESPONSE_BYTES = {R_VALUES: "values_raw", R_INDICES: "indices_raw"}


def _parse(data: bytes, varints, byte_fields, name: str) -> ChunkView:
    """Walks one message's wire format (unknown fields are skipped, as protobuf does)."""
    buf = memoryview(data)
    end = len(buf)
    pos = 0
    c = ChunkView()
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            v, pos = _varint(buf, pos)
            attr = varints.get(field)
            if attr == "shape":
                c.shape.append(_int64(v))
            elif attr == "dtype":
                c.dtype = v
            elif attr is not None:
                setattr(c, attr, _int64(v))
        elif wire == _WIRE_LEN:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError(f"truncated {name}")
            attr = byte_fields.get(field)
            if attr is not None:
                setattr(c, attr, buf[pos:pos + n])
            elif varints.get(field) == "shape":  # packed repeated int64
                sub, q = buf[pos:pos + n], 0
                while q < n:
                    v, q = _varint(sub, q)
                    c.shape.append(_int64(v))
            pos += n
        elif wire == _WIRE_I64:
            pos += 8
        elif wire == _WIRE_I32:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire} in {name}")
    if pos > end:
        raise ValueError(f"truncated {name}")
    return c


def parse_chunk(data: bytes) -> ChunkView:
    """Parses a serialised ComputeChunk."""
    return _parse(data, _CHUNK_VARINTS, _CHUNK_BYTES, "ComputeChunk")


def parse_response(data: bytes) -> ChunkView:
    """Parses a serialised ComputeResponse (the whole unary result)."""
    return _parse(data, _RESPONSE_VARINTS, _RESPONSE_BYTES, "ComputeResponse")


def _len_field(field: int, size: int) -> bytes:
    return encode_varint(field << 3 | _WIRE_LEN) + encode_varint(size)


def compute_request(header: pb.ComputeRequest, a: memoryview,
                    b: Optional[memoryview]) -> bytes:
    """Serialised ComputeRequest: `header` (shapes, dtypes, options; tensors without data)
    with `a` and `b` as the tensors' raw bytes, copied once (protobuf accepts the fields in
    any order, so the options follow the tensors). b=None (a gallery request) leaves the
    `b` field out entirely."""
    parts = []
    tensors = [(REQ_A, header.a, a)] + ([(REQ_B, header.b, b)] if b is not None else [])
    for field, tensor, data in tensors:
        prefix = tensor.SerializeToString() + _len_field(TENSOR_RAW, len(data))
        parts += [_len_field(field, len(prefix) + len(data)), prefix, data]
    options = pb.ComputeRequest()
    options.CopyFrom(header)
    options.ClearField("a")
    options.ClearField("b")
    parts.append(options.SerializeToString())
    return b"".join(parts)


def upload_piece(field: int, piece: memoryview) -> bytes:
    """Serialised UploadRequest with the bytes `piece` in field `field` (a_data / b_data), or
    RegisterGalleryRequest with it in `data` (F_GALLERY_DATA): a message whose only field is
    one bytes field."""
    return b"".join((_len_field(field, len(piece)), piece))


def identity(data: bytes) -> bytes:
    """Serializer for requests that are already serialised."""
    return data
