"""Zero-copy protobuf wire codec for the two bulk messages of the streaming RPCs.

grpcio hands protobuf-python a bytes object per message, and protobuf copies every bytes
field out of it; for the ~80 MB of result tiles of the seed workload that is one more full
copy under the GIL. `parse_chunk` instead walks ComputeChunk's wire format and returns
memoryviews into the received buffer, which Assembler copies once, straight into the result.
`upload_piece` serialises an UploadRequest{a_data|b_data} with a single copy of the slice.
Field numbers come from the generated descriptors, so a renumbering in the proto cannot
silently break this; the tests run both paths against the real server.
"""

from __future__ import annotations

from typing import List, Tuple

from simserve.v1 import similarity_pb2 as pb

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_I32 = 0, 1, 2, 5


def _num(message, field: str) -> int:
    return message.DESCRIPTOR.fields_by_name[field].number


_C = pb.ComputeChunk
F_SHAPE, F_DTYPE, F_BATCH, F_ROW, F_COUNT, F_VALUES, F_INDICES = (
    _num(_C, f) for f in ("shape", "dtype", "batch_index", "row_offset", "row_count",
                          "values_raw", "indices_raw"))
F_A_DATA, F_B_DATA = _num(pb.UploadRequest, "a_data"), _num(pb.UploadRequest, "b_data")


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
    """A parsed ComputeChunk whose values_raw / indices_raw are memoryviews (no copy)."""

    __slots__ = ("shape", "dtype", "batch_index", "row_offset", "row_count", "values_raw",
                 "indices_raw")

    def __init__(self) -> None:
        self.shape: List[int] = []
        self.dtype = 0
        self.batch_index = self.row_offset = self.row_count = 0
        self.values_raw: memoryview = memoryview(b"")
        self.indices_raw: memoryview = memoryview(b"")


def parse_chunk(data: bytes) -> ChunkView:
    """Parses a serialised ComputeChunk (unknown fields are skipped, as protobuf does)."""
    buf = memoryview(data)
    end = len(buf)
    pos = 0
    c = ChunkView()
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == _WIRE_VARINT:
            v, pos = _varint(buf, pos)
            if field == F_SHAPE:
                c.shape.append(_int64(v))
            elif field == F_DTYPE:
                c.dtype = v
            elif field == F_BATCH:
                c.batch_index = _int64(v)
            elif field == F_ROW:
                c.row_offset = _int64(v)
            elif field == F_COUNT:
                c.row_count = _int64(v)
        elif wire == _WIRE_LEN:
            n, pos = _varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated ComputeChunk")
            if field == F_VALUES:
                c.values_raw = buf[pos:pos + n]
            elif field == F_INDICES:
                c.indices_raw = buf[pos:pos + n]
            elif field == F_SHAPE:  # packed repeated int64
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
            raise ValueError(f"unsupported wire type {wire} in ComputeChunk")
    return c


def upload_piece(field: int, piece: memoryview) -> bytes:
    """Serialised UploadRequest with the bytes `piece` in field `field` (a_data / b_data)."""
    return b"".join((encode_varint(field << 3 | _WIRE_LEN), encode_varint(len(piece)), piece))


def identity(data: bytes) -> bytes:
    """Serializer for requests that are already serialised."""
    return data
