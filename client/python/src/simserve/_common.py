"""Transport-independent parts of the clients: option parsing, input normalisation, the choice
of RPC, request building (unary message or upload pieces), and in-place result assembly.

Shared by the blocking `simserve.Client` and the asyncio `simserve.aio.Client`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import threading
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Tuple, Union

import grpc
import numpy as np

from simserve import _wire, errors
from simserve.v1 import similarity_pb2 as pb

ArrayLike = Union[np.ndarray, Sequence]
ProgressCallback = Callable[[int, int], None]
"""Called as progress(rows_done, rows_total) after every received tile (rows = batch * N)."""

MiB = 1 << 20

METRICS: Mapping[str, int] = {
    "cosine": pb.COSINE,
    "dot": pb.DOT,
    "euclidean": pb.EUCLIDEAN,
    "squared_euclidean": pb.SQUARED_EUCLIDEAN,
}
OUTPUT_DTYPES: Mapping[str, int] = {
    "float32": pb.FLOAT32, "fp32": pb.FLOAT32,
    "bfloat16": pb.BFLOAT16, "bf16": pb.BFLOAT16,
    "float16": pb.FLOAT16, "fp16": pb.FLOAT16,
}
PRECISIONS: Mapping[str, int] = {"fp32": pb.FP32, "float32": pb.FP32,
                                 "bf16": pb.BF16, "bfloat16": pb.BF16}
_WIRE_ITEMSIZE = {pb.FLOAT32: 4, pb.BFLOAT16: 2, pb.FLOAT16: 2}
MODES = ("auto", "unary", "stream", "upload")
DEFAULT_MESSAGE_OVERHEAD = 4096
"""Framing slack per message assumed when the server reports no message_overhead_bytes."""
GRPC_DEFAULT_MESSAGE_BYTES = 4 * MiB
"""gRPC's default message size limit, assumed when the server reports a limit of 0."""
_INT64_MAX = (1 << 63) - 1

SERVICE = "/simserve.v1.Similarity/"
TIMING_KEYS = {"simserve-queue-ms": "queue_ms", "simserve-compute-ms": "compute_ms",
               "simserve-total-ms": "total_ms"}


@dataclasses.dataclass(frozen=True)
class Timings:
    """Timings of the last completed call.

    Attributes:
        mode: the RPC used: "unary", "stream" or "upload".
        client_ms: wall time in the client, from the call to the assembled array.
        queue_ms, compute_ms, total_ms: the server's figures from trailing metadata
            (`simserve-queue-ms`, ...), None if the server sent none.
        attempts: 1 + the number of UNAVAILABLE retries.
    """

    mode: str
    client_ms: float
    queue_ms: Optional[float] = None
    compute_ms: Optional[float] = None
    total_ms: Optional[float] = None
    attempts: int = 1


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Retries of calls that fail with one of `codes` (default: UNAVAILABLE only).

    Backoff before attempt n+1 is min(max_backoff, initial_backoff * multiplier**(n-1)),
    randomised by +-jitter (a fraction). The call's timeout bounds all attempts together.
    `RetryPolicy(max_attempts=1)` disables retries.
    """

    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    codes: frozenset = frozenset({grpc.StatusCode.UNAVAILABLE})

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep after failed attempt number `attempt` (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        return max(0.0, base * (1.0 + random.uniform(-self.jitter, self.jitter)))


@dataclasses.dataclass(frozen=True)
class Info:
    """What GetInfo reports: versions, ISA, limits and capabilities.

    `limits` maps the Limits field names (e.g. "max_receive_message_bytes") to ints;
    metrics/dtypes/precisions are lower-case names as accepted by the client's keyword
    arguments. `raw` is the GetInfoResponse message itself.
    """

    version: str
    onednn_version: str
    cpu_isa: str
    compute_workers: int
    threads_per_worker: int
    limits: Mapping[str, int]
    metrics: Tuple[str, ...]
    input_dtypes: Tuple[str, ...]
    output_dtypes: Tuple[str, ...]
    precisions: Tuple[str, ...]
    raw: pb.GetInfoResponse = dataclasses.field(repr=False, compare=False)

    @staticmethod
    def from_proto(msg: pb.GetInfoResponse) -> "Info":
        """Builds an Info from a GetInfoResponse."""
        limits = {f.name: getattr(msg.limits, f.name) for f in msg.limits.DESCRIPTOR.fields}
        return Info(
            version=msg.version, onednn_version=msg.onednn_version, cpu_isa=msg.cpu_isa,
            compute_workers=msg.compute_workers, threads_per_worker=msg.threads_per_worker,
            limits=limits,
            metrics=tuple(pb.Metric.Name(m).lower() for m in msg.metrics),
            input_dtypes=tuple(pb.DataType.Name(d).lower() for d in msg.input_dtypes),
            output_dtypes=tuple(pb.DataType.Name(d).lower() for d in msg.output_dtypes),
            precisions=tuple(pb.Precision.Name(p).lower() for p in msg.precisions),
            raw=msg)


@dataclasses.dataclass(frozen=True)
class OutputSpec:
    """The result of a request: its shape as the server sends it ([batch, N, M] dense,
    [batch, N, k] top-k; 2D inputs give [N, M] / [N, k]) and its wire bytes."""

    shape: Tuple[int, ...]
    values_bytes: int   # prod(shape) * itemsize(output_dtype)
    indices_bytes: int  # top-k: prod(shape) * 4; dense: 0

    @property
    def total_bytes(self) -> int:
        return self.values_bytes + self.indices_bytes


def output_size(a_shape: Sequence[int], b_shape: Sequence[int], output_dtype: int,
                top_k: int) -> OutputSpec:
    """The one definition of the output-size arithmetic (the C++ client's OutputSize; both
    are checked against client/testdata/output_sizes.json).

    Only what sizing needs is checked: InvalidArgumentError unless both shapes are 2D or both
    3D without negative dimensions, ResourceExhaustedError if the result would exceed 2^63
    bytes. Batch/D mismatches, k > M, zero dimensions etc. are the server's to reject.
    """
    a_shape, b_shape = tuple(int(d) for d in a_shape), tuple(int(d) for d in b_shape)
    if len(a_shape) not in (2, 3) or len(b_shape) != len(a_shape):
        raise errors.InvalidArgumentError(
            f"a and b must both be 2D [rows, dim] or both 3D [batch, rows, dim], got shapes "
            f"{a_shape} and {b_shape}")
    if min(a_shape + b_shape) < 0:
        raise errors.InvalidArgumentError(f"negative dimension in {a_shape} or {b_shape}")
    cols = int(top_k) if top_k else b_shape[-2]
    shape = a_shape[:-1] + (cols,)
    elements = 1
    for dim in shape:
        elements *= dim
    per_element = _WIRE_ITEMSIZE[output_dtype] + (4 if top_k else 0)
    if elements * per_element > _INT64_MAX:
        raise errors.ResourceExhaustedError(f"the result {list(shape)} would exceed 2^63 bytes")
    return OutputSpec(shape=shape, values_bytes=elements * _WIRE_ITEMSIZE[output_dtype],
                      indices_bytes=elements * 4 if top_k else 0)


def _enum(name: str, value: Union[str, int], table: Mapping[str, int]) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if int(value) in table.values():
            return int(value)
    elif isinstance(value, str) and value.lower() in table:
        return table[value.lower()]
    raise errors.InvalidArgumentError(
        f"{name}={value!r} is not one of {sorted(set(table))}")


def _numeric_2d_or_3d(name: str, x: ArrayLike, rows: str = "rows") -> np.ndarray:
    """`x` as an array, checked: a numeric dtype and 2D [rows, dim] or 3D [batch, rows, dim]."""
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu":
        raise errors.InvalidArgumentError(f"{name} has dtype {arr.dtype}; expected floats")
    if arr.ndim not in (2, 3):
        raise errors.InvalidArgumentError(
            f"{name} must be 2D [{rows}, dim] or 3D [batch, {rows}, dim], got shape {arr.shape}")
    return arr


def _as_float32(name: str, x: ArrayLike) -> np.ndarray:
    """float32, C-contiguous, native little-endian; float64/float16/F-order are converted."""
    return np.ascontiguousarray(_numeric_2d_or_3d(name, x), dtype=np.dtype("<f4"))


@dataclasses.dataclass
class Prepared:
    """A normalised request: float32 C-order 3D inputs plus the proto options. A gallery
    request has no `b` (options.gallery names the server-side B)."""

    a: np.ndarray          # [batch, N, D] float32, C-contiguous
    b: Optional[np.ndarray]  # [batch, M, D]; None for a gallery request
    squeeze: bool          # 2D `a`: return 2D results
    top_k: int
    options: pb.ComputeRequest  # metric, output_dtype, precision, top_k, epsilon, chunk, gallery
    out_shape: Tuple[int, int, int]  # [batch, N, M or k]
    spec: OutputSpec  # what the server sends: its shape (2D for 2D inputs) and bytes
    shared_memory: bool = False  # tensors through shared-memory regions (see _shm)

    @property
    def input_bytes(self) -> int:
        return self.a.nbytes + (self.b.nbytes if self.b is not None else 0)

    @property
    def output_wire_bytes(self) -> int:
        return self.spec.total_bytes

    def request_bytes(self) -> bytes:
        """The serialised ComputeRequest (Compute / ComputeStream), one copy of the inputs."""
        b = memoryview(self.b).cast("B") if self.b is not None else None
        return _wire.compute_request(self.request(with_data=False),
                                     memoryview(self.a).cast("B"), b)

    def tensor(self, which: str, with_data: bool) -> pb.Tensor:
        """The proto Tensor for `a` or `b`; its user-facing (2D/3D) shape, data if asked."""
        arr = self.a if which == "a" else self.b
        shape = arr.shape[1:] if self.squeeze else arr.shape
        t = pb.Tensor(shape=list(shape), dtype=pb.FLOAT32)
        if with_data:
            t.raw = arr.tobytes()
        return t

    def request(self, with_data: bool = True) -> pb.ComputeRequest:
        """The ComputeRequest (Compute / ComputeStream; upload header when with_data=False).
        A gallery request leaves `b` absent, as the server requires."""
        req = pb.ComputeRequest()
        req.CopyFrom(self.options)
        req.a.CopyFrom(self.tensor("a", with_data))
        if self.b is not None:
            req.b.CopyFrom(self.tensor("b", with_data))
        return req


def _check_k(top_k: Any) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
        raise errors.InvalidArgumentError(f"k must be a non-negative int, got {top_k!r}")
    return int(top_k)


def prepare(a: ArrayLike, b: Optional[ArrayLike], *, metric: Union[str, int],
            output_dtype: Union[str, int], precision: Union[str, int], epsilon: float,
            top_k: int, chunk_bytes: int, gallery: Optional["GalleryTarget"] = None,
            shared_memory: bool = False) -> Prepared:
    """Validates what the client must know to size the result and normalises the inputs.

    Exactly one of `b` and `gallery` (whose shape must be known) gives B. Batch/D
    mismatches, NaN/Inf, k > M etc. are left to the server (one source of truth).
    """
    if (b is None) == (gallery is None):
        raise errors.InvalidArgumentError("pass exactly one of b and gallery=")
    a32 = _as_float32("a", a)
    b32 = _as_float32("b", b) if b is not None else None
    top_k = _check_k(top_k)
    output = _enum("output_dtype", output_dtype, OUTPUT_DTYPES)
    if gallery is not None:
        spec = output_size(a32.shape, gallery.b_shape_like(a32.shape), output, top_k)
        m = gallery.shape[-2]
    else:
        spec = output_size(a32.shape, b32.shape, output, top_k)
        m = b32.shape[-2]
    squeeze = a32.ndim == 2
    if squeeze:
        a32 = a32[np.newaxis]
        b32 = b32[np.newaxis] if b32 is not None else None
    opts = pb.ComputeRequest(
        metric=_enum("metric", metric, METRICS),
        output_dtype=output,
        precision=_enum("precision", precision, PRECISIONS),
        top_k=top_k, epsilon=float(epsilon), max_chunk_bytes=int(chunk_bytes))
    if gallery is not None:
        opts.gallery = gallery.name
        opts.gallery_version = gallery.version
    cols = top_k if top_k else m
    return Prepared(a=a32, b=b32, squeeze=squeeze, top_k=top_k, options=opts,
                    out_shape=(a32.shape[0], a32.shape[1], cols), spec=spec,
                    shared_memory=bool(shared_memory))


def message_overhead_bytes(limits: Optional[Mapping[str, int]]) -> int:
    """The framing slack of one message: the server's Limits.message_overhead_bytes, or
    DEFAULT_MESSAGE_OVERHEAD when it reports none (0)."""
    reported = (limits or {}).get("message_overhead_bytes") or 0
    return reported if reported > 0 else DEFAULT_MESSAGE_OVERHEAD


def _effective_limit(limits: Optional[Mapping[str, int]], name: str) -> float:
    """A message size limit: 0 means gRPC's default 4 MiB, a negative one unlimited."""
    limit = (limits or {}).get(name) or 0
    if limit == 0:
        return GRPC_DEFAULT_MESSAGE_BYTES
    return float("inf") if limit < 0 else limit


def fits_one_message(input_bytes: int, limits: Optional[Mapping[str, int]]) -> bool:
    """Whether inputs of input_bytes fit one request message (Compute / ComputeStream):
    input_bytes + message_overhead_bytes within the server's max_receive_message_bytes."""
    return input_bytes <= (_effective_limit(limits, "max_receive_message_bytes") -
                           message_overhead_bytes(limits))


def choose_mode(input_bytes: int, output_bytes: int, limits: Optional[Mapping[str, int]],
                unary_max_bytes: int, upload_min_bytes: int) -> str:
    """The RPC the automatic mode picks (the same rule as the C++ client's ChooseMode; both
    are checked against client/testdata/output_sizes.json). `output_bytes` is
    OutputSpec.total_bytes; a limit of 0 means gRPC's default 4 MiB, a negative one
    unlimited; overhead = message_overhead_bytes(limits):
    1. input_bytes + overhead exceed max_receive_message_bytes -> "upload";
    2. input_bytes + output_bytes <= unary_max_bytes and output_bytes + overhead fit
       max_send_message_bytes -> "unary";
    3. input_bytes >= upload_min_bytes -> "upload" (overlaps upload, compute and download);
    4. otherwise "stream"."""
    overhead = message_overhead_bytes(limits)
    if not fits_one_message(input_bytes, limits):
        return "upload"
    if (input_bytes + output_bytes <= unary_max_bytes and
            output_bytes <= _effective_limit(limits, "max_send_message_bytes") - overhead):
        return "unary"
    if input_bytes >= upload_min_bytes:
        return "upload"
    return "stream"


def check_mode(mode: str) -> None:
    """InvalidArgumentError unless `mode` is one of MODES."""
    if mode not in MODES:
        raise errors.InvalidArgumentError(f"mode={mode!r} is not one of {MODES}")


def resolve_mode(prep: Prepared, mode: str, limits: Optional[Mapping[str, int]],
                 unary_max_bytes: int, upload_min_bytes: int) -> str:
    """`mode` itself if explicit, else choose_mode() for the prepared request."""
    check_mode(mode)
    if mode != "auto":
        return mode
    return choose_mode(prep.input_bytes, prep.output_wire_bytes, limits, unary_max_bytes,
                       upload_min_bytes)


def piece_bytes(wanted: int, limits: Optional[Mapping[str, int]]) -> int:
    """Upload piece size: `wanted`, clamped to max_receive_message_bytes minus the message
    overhead when the server reports a positive receive limit larger than the overhead (the
    C++ client's UploadPieceBytes)."""
    receive = (limits or {}).get("max_receive_message_bytes") or 0
    overhead = message_overhead_bytes(limits)
    return min(wanted, receive - overhead) if receive > overhead else wanted


def upload_requests(prep: Prepared, piece_bytes: int) -> Iterator[bytes]:
    """The ComputeUpload request stream, serialised UploadRequests: the header, then per batch
    entry k its B[k] and then its A[k], in pieces of piece_bytes (one copy of the input each);
    a gallery request (header names it) sends only A's pieces.
    The server computes entry k as soon as B[k] and A[k] are in, so the upload overlaps the
    computation from the first entry on."""
    header = pb.UploadRequest(header=pb.UploadHeader(request=prep.request(with_data=False)))
    yield header.SerializeToString()
    for k in range(prep.a.shape[0]):
        parts = ((_wire.F_B_DATA, prep.b[k]),) if prep.b is not None else ()
        for field, arr in parts + ((_wire.F_A_DATA, prep.a[k]),):
            view = memoryview(arr).cast("B")
            for off in range(0, len(view), piece_bytes):
                yield _wire.upload_piece(field, view[off:off + piece_bytes])


GRPC_AIO_LOST_STATUS = "Internal error from Core"
"""What grpc.aio reports instead of the server's status when the server ends a
client-streaming call while a write is in flight (grpc/grpc#36066, open in grpcio 1.85):
`_StreamRequestMixin._write` overwrites the delivered status on the failed write. The
blocking client is not affected."""


def status_lost(err: errors.Error) -> bool:
    """Whether `err` is grpc.aio's stand-in for a server status it overwrote (see
    GRPC_AIO_LOST_STATUS): the server rejected an upload before all of it was sent."""
    return (type(err) is errors.InternalError and  # noqa: E721 (not ProtocolError)
            err.details.startswith(GRPC_AIO_LOST_STATUS))  # also after lost_status_error


def lost_status_error(err: errors.Error) -> errors.Error:
    """`err` with what happened, when the status cannot be asked for again."""
    return errors.InternalError(
        f"{err.details}: the server ended the upload while the client was still sending and "
        f"grpc.aio lost its status (grpc/grpc#36066); the inputs are too large to repeat the "
        f"request with ComputeStream; simserve.Client (blocking) reports the server's status",
        err.code)


def bulk_methods(channel) -> Tuple[Any, Any, Any]:
    """(Compute, ComputeStream, ComputeUpload) callables on `channel` (sync or aio) that use
    the zero-copy codec of _wire: requests are already serialised bytes
    (Prepared.request_bytes, upload_requests), responses arrive as ChunkView."""
    unary = channel.unary_unary(SERVICE + "Compute", request_serializer=_wire.identity,
                                response_deserializer=_wire.parse_response)
    stream = channel.unary_stream(SERVICE + "ComputeStream", request_serializer=_wire.identity,
                                  response_deserializer=_wire.parse_chunk)
    upload = channel.stream_stream(SERVICE + "ComputeUpload",
                                   request_serializer=_wire.identity,
                                   response_deserializer=_wire.parse_chunk)
    return unary, stream, upload


class Assembler:
    """Writes result tiles straight into a preallocated float32 array (and int32 indices).

    Checks that tiles arrive in (batch, row) order, cover the output exactly once and carry
    the declared byte length; bf16/fp16 tiles are widened to float32 while being written.
    """

    def __init__(self, prep: Prepared, progress: Optional[ProgressCallback] = None,
                 out: Optional[np.ndarray] = None) -> None:
        self._prep = prep
        self._progress = progress
        shape = prep.out_shape
        if out is not None:
            want = shape[1:] if prep.squeeze else shape
            if out.shape != tuple(want) or out.dtype != np.float32 or \
                    not out.flags.c_contiguous:
                raise errors.InvalidArgumentError(
                    f"out must be a C-contiguous float32 array of shape {tuple(want)}")
            self.values = out.reshape(shape)
        else:
            self.values = np.empty(shape, dtype=np.float32)
        self._fresh = out is None
        self.indices = np.empty(shape, dtype=np.int32) if prep.top_k else None
        self._total_rows = shape[0] * shape[1]
        self.reset()

    def prefault(self) -> None:
        """Touches one element per page of a freshly allocated result, so that its page
        faults (~10 ms per 80 MB) happen while the inputs upload, not while tiles arrive."""
        if self._fresh and self.values.nbytes >= 4 * MiB:
            self.values.reshape(-1)[::1024] = 0
            if self.indices is not None:
                self.indices.reshape(-1)[::1024] = 0
            self._fresh = False

    def reset(self) -> None:
        """Forgets received tiles (before a retry)."""
        self._batch, self._row, self._done = 0, 0, 0

    def _check_shape(self, shape: Sequence[int]) -> None:
        want = self._prep.spec.shape
        if tuple(shape) != tuple(want):
            gallery = self._prep.options.gallery
            if gallery:  # e.g. replaced by a gallery of another M after we looked it up
                raise errors.ProtocolError(
                    f"server result shape {list(shape)}, expected {list(want)} from the shape "
                    f"known for gallery {gallery!r} (replaced with another shape? look it up "
                    f"again: get_gallery / Gallery.refresh)")
            raise errors.ProtocolError(f"server result shape {list(shape)}, expected {list(want)}")

    def _write(self, batch: int, row: int, rows: int, dtype: int,
               values: Union[bytes, memoryview], indices: Union[bytes, memoryview]) -> None:
        b_total, n, cols = self._prep.out_shape
        if (batch, row) != (self._batch, self._row) or rows <= 0 or row + rows > n:
            raise errors.ProtocolError(
                f"tile batch={batch} rows [{row}, {row + rows}) out of order or out of range "
                f"(expected batch={self._batch} row={self._row}, N={n})")
        itemsize = _WIRE_ITEMSIZE.get(dtype)
        if dtype != self._prep.options.output_dtype or itemsize is None:
            raise errors.ProtocolError(f"tile dtype {dtype}, expected "
                                       f"{self._prep.options.output_dtype}")
        count = rows * cols
        if len(values) != count * itemsize:
            raise errors.ProtocolError(
                f"tile has {len(values)} value bytes, expected {count * itemsize}")
        dst = self.values[batch, row:row + rows]
        if dtype == pb.FLOAT32:
            np.copyto(dst, np.frombuffer(values, dtype="<f4").reshape(rows, cols))
        elif dtype == pb.BFLOAT16:
            # bf16 is the upper half of a float32: widen in place, no temporary.
            u32 = dst.view(np.uint32)
            np.copyto(u32, np.frombuffer(values, dtype="<u2").reshape(rows, cols),
                      casting="unsafe")
            np.left_shift(u32, 16, out=u32)
        else:
            np.copyto(dst, np.frombuffer(values, dtype="<f2").reshape(rows, cols),
                      casting="unsafe")
        if self.indices is not None:
            if len(indices) != count * 4:
                raise errors.ProtocolError(
                    f"tile has {len(indices)} index bytes, expected {count * 4}")
            np.copyto(self.indices[batch, row:row + rows],
                      np.frombuffer(indices, dtype="<i4").reshape(rows, cols))
        self._row += rows
        self._done += rows
        if self._row == n:
            self._batch, self._row = self._batch + 1, 0
        if self._progress is not None:
            self._progress(self._done, self._total_rows)

    def add_chunk(self, chunk: Union[pb.ComputeChunk, _wire.ChunkView]) -> None:
        """Writes one streamed tile into place (the first one must state the full shape)."""
        if self._done == 0:
            self._check_shape(chunk.shape)
        self._write(chunk.batch_index, chunk.row_offset, chunk.row_count, chunk.dtype,
                    chunk.values_raw, chunk.indices_raw)

    def set_response(self, resp: Union[pb.ComputeResponse, _wire.ChunkView]) -> None:
        """Writes a whole unary response into place (batch by batch, one copy)."""
        self._check_shape(resp.shape)
        b_total, n, _ = self._prep.out_shape
        itemsize = _WIRE_ITEMSIZE.get(resp.dtype, 4)
        per_batch = len(resp.values_raw) // max(b_total, 1)
        idx_per_batch = len(resp.indices_raw) // max(b_total, 1)
        if per_batch * b_total != len(resp.values_raw) or per_batch != n * \
                self._prep.out_shape[2] * itemsize:
            raise errors.ProtocolError(
                f"response has {len(resp.values_raw)} value bytes for shape {list(resp.shape)}")
        mv, mi = memoryview(resp.values_raw), memoryview(resp.indices_raw)
        for k in range(b_total):
            self._write(k, 0, n, resp.dtype, mv[k * per_batch:(k + 1) * per_batch],
                        mi[k * idx_per_batch:(k + 1) * idx_per_batch])

    def result(self) -> Union[np.ndarray, Tuple[np.ndarray, np.ndarray]]:
        """The assembled result (2D for 2D inputs); raises if tiles are missing."""
        if self._done != self._total_rows:
            raise errors.ProtocolError(
                f"stream ended after {self._done} of {self._total_rows} result rows")
        vals, idx = self.values, self.indices
        if self._prep.squeeze:
            vals = vals[0]
            idx = idx[0] if idx is not None else None
        return (vals, idx) if idx is not None else vals


def timings(metadata, mode: str, client_ms: float, attempts: int) -> Timings:
    """Builds Timings from trailing metadata (a sequence of (key, value) pairs)."""
    found = {}
    for key, value in metadata or ():
        field = TIMING_KEYS.get(key)
        if field is not None:
            try:
                found[field] = float(value)
            except (TypeError, ValueError):
                pass
    return Timings(mode=mode, client_ms=client_ms, attempts=attempts, **found)


PemSource = Union[bytes, str, "os.PathLike[str]", None]


def _pem(source: PemSource, what: str) -> Optional[bytes]:
    """PEM bytes from bytes or a file path."""
    if source is None or isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as err:
        raise ValueError(f"{what}: cannot read {source}: {err}") from err


def channel_credentials(credentials: Optional[grpc.ChannelCredentials], tls: bool,
                        root_certificates: PemSource, certificate_chain: PemSource,
                        private_key: PemSource) -> Optional[grpc.ChannelCredentials]:
    """The channel credentials of a client: `credentials` as given, or TLS built from the PEM
    arguments (bytes or file paths; root_certificates None = the system's roots), or None for
    plaintext. A client certificate (mutual TLS) needs both certificate_chain and private_key."""
    pems = (root_certificates, certificate_chain, private_key)
    if credentials is not None:
        if tls or any(p is not None for p in pems):
            raise ValueError("pass either credentials= or tls=/root_certificates=/"
                             "certificate_chain=/private_key=, not both")
        return credentials
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("mutual TLS needs both certificate_chain and private_key")
    if not tls and all(p is None for p in pems):
        return None
    return grpc.ssl_channel_credentials(_pem(root_certificates, "root_certificates"),
                                        _pem(private_key, "private_key"),
                                        _pem(certificate_chain, "certificate_chain"))


AUTHORIZATION = "authorization"


def bearer_metadata(token: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    """The call metadata that carries `token` (`authorization: Bearer <token>`), () for None.

    ValueError unless the token is a non-empty str of printable ASCII without whitespace (the
    server's --auth_token_file holds one such token per line). The message never contains
    the token."""
    if token is None:
        return ()
    if not isinstance(token, str):
        raise ValueError(f"token must be a str, got {type(token).__name__}")
    if not token:
        raise ValueError("token is empty")
    bad = next((i for i, ch in enumerate(token) if not "!" <= ch <= "~"), None)
    if bad is not None:
        what = "whitespace or a newline" if token[bad].isspace() else "a non-printable or " \
            "non-ASCII character"
        raise ValueError(f"token has {what} at position {bad} (of {len(token)}); pass the "
                         f"token alone, without 'Bearer ' or a trailing newline")
    return ((AUTHORIZATION, f"Bearer {token}"),)


class _WithMetadata:
    """A multi-callable (sync or aio) that adds fixed metadata to every invocation."""

    def __init__(self, multicallable: Any, metadata: Tuple[Tuple[str, str], ...]) -> None:
        self._callable = multicallable
        self._metadata = metadata

    def _kwargs(self, kwargs: dict) -> dict:
        kwargs["metadata"] = self._metadata + tuple(kwargs.get("metadata") or ())
        return kwargs

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._callable(*args, **self._kwargs(kwargs))

    def with_call(self, *args: Any, **kwargs: Any) -> Any:
        return self._callable.with_call(*args, **self._kwargs(kwargs))

    def future(self, *args: Any, **kwargs: Any) -> Any:
        return self._callable.future(*args, **self._kwargs(kwargs))

    def __repr__(self) -> str:
        return f"<{type(self._callable).__name__} with {len(self._metadata)} metadata (redacted)>"


class AuthorizedChannel:
    """What the clients make their RPC callables from: a channel (sync or aio) whose
    multi-callables send `authorization: Bearer <token>` with every call (unary and streaming,
    every method), over TLS and plaintext alike. gRPC's own access_token_call_credentials
    refuse plaintext channels; per-call metadata does not, so the token then travels in clear
    (documented). Only the multi-callable factories are proxied: the clients close, and wait
    on, the channel itself."""

    def __init__(self, channel: Any, metadata: Tuple[Tuple[str, str], ...]) -> None:
        self._channel = channel
        self._metadata = metadata

    def unary_unary(self, *args: Any, **kwargs: Any) -> _WithMetadata:
        return _WithMetadata(self._channel.unary_unary(*args, **kwargs), self._metadata)

    def unary_stream(self, *args: Any, **kwargs: Any) -> _WithMetadata:
        return _WithMetadata(self._channel.unary_stream(*args, **kwargs), self._metadata)

    def stream_unary(self, *args: Any, **kwargs: Any) -> _WithMetadata:
        return _WithMetadata(self._channel.stream_unary(*args, **kwargs), self._metadata)

    def stream_stream(self, *args: Any, **kwargs: Any) -> _WithMetadata:
        return _WithMetadata(self._channel.stream_stream(*args, **kwargs), self._metadata)

    def __repr__(self) -> str:
        return f"<AuthorizedChannel over {type(self._channel).__name__} (token redacted)>"


def rpc_channel(channel: Any, metadata: Tuple[Tuple[str, str], ...]) -> Any:
    """The channel a client builds its RPC callables on: `channel` itself without metadata,
    else an AuthorizedChannel over it (metadata from bearer_metadata)."""
    return AuthorizedChannel(channel, metadata) if metadata else channel


CHANNEL_OPTIONS = (
    # The server enforces its own limits (and says so with RESOURCE_EXHAUSTED).
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)


# -- galleries: a B that lives on the server ---------------------------------------------------

GALLERY_SOURCES: Mapping[int, str] = {pb.UPLOADED: "uploaded", pb.DIRECTORY: "directory"}


def _dtype_name(value: int) -> str:
    try:
        return pb.DataType.Name(value).lower()
    except ValueError:  # a newer server's dtype
        return str(value)


@dataclasses.dataclass(frozen=True)
class GalleryInfo:
    """What the server holds under a gallery name (GetGallery, ListGalleries, ...).

    Attributes:
        name: the gallery's name.
        shape: as registered, (M, D) or (batch, M, D).
        storage_dtype, dtype: "float32", "bfloat16" or "float16": how the server stores it
            and the element type of the bytes it was registered (or loaded) from.
        version: 1 for a new name, +1 per replacement (also across deletes). Per server:
            two replicas count independently.
        bytes: server memory it holds.
        source: "uploaded" (RegisterGallery; this server only, evictable, deletable) or
            "directory" (a NAME.npy in the server's --gallery_dir; on every replica).
        path: the file of a directory gallery ("" otherwise).
        registered_unix_ms, last_used_unix_ms: Unix milliseconds.
        prepare_seconds: the server's time to check and prepare it.
        raw: the GalleryInfo message itself.
    """

    name: str
    shape: Tuple[int, ...]
    storage_dtype: str
    version: int
    bytes: int
    source: str
    dtype: str
    path: str
    registered_unix_ms: int
    last_used_unix_ms: int
    prepare_seconds: float
    raw: pb.GalleryInfo = dataclasses.field(repr=False, compare=False)

    @staticmethod
    def from_proto(msg: pb.GalleryInfo) -> "GalleryInfo":
        """Builds a GalleryInfo from the proto message."""
        return GalleryInfo(
            name=msg.name, shape=tuple(int(d) for d in msg.shape),
            storage_dtype=_dtype_name(msg.storage_dtype), version=int(msg.version),
            bytes=int(msg.bytes), source=GALLERY_SOURCES.get(msg.source, str(msg.source)),
            dtype=_dtype_name(msg.dtype), path=msg.path,
            registered_unix_ms=int(msg.registered_unix_ms),
            last_used_unix_ms=int(msg.last_used_unix_ms),
            prepare_seconds=float(msg.prepare_seconds), raw=msg)


def gallery_name(gallery: Any) -> str:
    """The name of a gallery given as a str, a GalleryInfo or a handle."""
    if isinstance(gallery, (GalleryInfo, GalleryBase)):
        return gallery.name
    if isinstance(gallery, str):
        return gallery
    raise errors.InvalidArgumentError(
        f"gallery must be a name (str), a GalleryInfo or a Gallery handle, got "
        f"{type(gallery).__name__}")


def gallery_data(b: ArrayLike) -> Tuple[np.ndarray, int]:
    """A gallery's bytes to register and their wire dtype: float16 arrays are sent as
    FLOAT16 (half the bytes), everything else as float32; C-contiguous little-endian. No
    copy when `b` already is a C-contiguous float32 or float16 array."""
    arr = _numeric_2d_or_3d("gallery", b, rows="M")
    if arr.dtype == np.float16:
        return np.ascontiguousarray(arr, dtype=np.dtype("<f2")), pb.FLOAT16
    return np.ascontiguousarray(arr, dtype=np.dtype("<f4")), pb.FLOAT32


def storage_dtype(value: Union[str, int]) -> int:
    """The DataType of a storage_dtype argument ("float32", "bfloat16", "float16", ...)."""
    return _enum("storage_dtype", value, OUTPUT_DTYPES)


def register_requests(name: str, data: np.ndarray, wire_dtype: int, storage: int,
                      piece_bytes: int) -> Iterator[bytes]:
    """The RegisterGallery request stream, serialised: the header, then the bytes of `data`
    in pieces of piece_bytes (one copy each)."""
    header = pb.RegisterGalleryRequest(header=pb.GalleryHeader(
        name=name, shape=list(data.shape), dtype=wire_dtype, storage_dtype=storage))
    yield header.SerializeToString()
    view = memoryview(data).cast("B") if data.size else memoryview(b"")
    for off in range(0, len(view), piece_bytes):
        yield _wire.upload_piece(_wire.F_GALLERY_DATA, view[off:off + piece_bytes])


def register_method(channel) -> Any:
    """The RegisterGallery callable on `channel` (sync or aio), taking serialised requests
    (register_requests) so the gallery's bytes are copied once, not three times."""
    return channel.stream_unary(SERVICE + "RegisterGallery", request_serializer=_wire.identity,
                                response_deserializer=pb.GalleryInfo.FromString)


def top_k_args(b: Any, k: Any, gallery: Any) -> Tuple[Any, int]:
    """(b, k) of a top_k call: top_k(A, B, k) or top_k(A, k, gallery=...)."""
    if gallery is not None and k is None and b is not None and (
            isinstance(b, (int, np.integer)) and not isinstance(b, bool)):
        b, k = None, b
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise errors.InvalidArgumentError(f"k must be a positive int, got {k!r}")
    return b, int(k)


@dataclasses.dataclass(frozen=True)
class GalleryTarget:
    """The gallery a compute call names: its name, the version it sends
    (ComputeRequest.gallery_version, 0 = current), its shape (sizes the result; None until
    looked up with GetGallery) and the handle it came from, if any."""

    name: str
    version: int = 0
    shape: Optional[Tuple[int, ...]] = None
    handle: Optional["GalleryBase"] = None

    def b_shape_like(self, a_shape: Sequence[int]) -> Tuple[int, ...]:
        """The shape a `b` of a's rank would have: what output_size() needs. A 2D gallery
        [M, D] plays B for every batch entry of a 3D `a`."""
        g = tuple(self.shape or ())
        if len(g) not in (2, 3):
            raise errors.InvalidArgumentError(
                f"gallery {self.name!r} has shape {list(g)}; expected [M, D] or [batch, M, D]")
        return tuple(a_shape[:-2]) + g[-2:]

    def with_info(self, info: GalleryInfo) -> "GalleryTarget":
        return dataclasses.replace(self, shape=info.shape)


def gallery_target(gallery: Any, gallery_version: Optional[int]) -> GalleryTarget:
    """What a compute call's gallery= / gallery_version= arguments name.

    A str needs a GetGallery for its shape (GalleryTarget.shape None); a GalleryInfo or a
    handle already knows it. A handle sends its own version if pinned, else 0; it does not
    take gallery_version= as well (its pin decides)."""
    if gallery_version is not None and (isinstance(gallery_version, bool) or not isinstance(
            gallery_version, (int, np.integer)) or gallery_version < 0):
        raise errors.InvalidArgumentError(
            f"gallery_version must be a non-negative int, got {gallery_version!r}")
    if isinstance(gallery, GalleryBase):
        if gallery_version is not None:
            raise errors.InvalidArgumentError(
                "a Gallery handle sends its own version (pin=True) or the current one; "
                "gallery_version= goes with a gallery name")
        return GalleryTarget(gallery.name, gallery.version if gallery.pin else 0,
                             gallery.shape, gallery)
    name = gallery_name(gallery)
    shape = gallery.shape if isinstance(gallery, GalleryInfo) else None
    return GalleryTarget(name, int(gallery_version or 0), shape)


def compute_target(b: Any, gallery: Any, gallery_version: Optional[int]
                   ) -> Optional[GalleryTarget]:
    """The gallery of a similarity/top_k call, None for a call with `b`; rejects b together
    with gallery=, or gallery_version= without it."""
    if gallery is None:
        if gallery_version is not None:
            raise errors.InvalidArgumentError("gallery_version= needs gallery=")
        if b is None:
            raise errors.InvalidArgumentError("pass b or gallery=")
        return None
    if b is not None:
        raise errors.InvalidArgumentError("pass exactly one of b and gallery=")
    return gallery_target(gallery, gallery_version)


def reregisters(err: errors.Error, handle: Optional["GalleryBase"]) -> bool:
    """Whether a failed call re-registers its gallery and retries once: NOT_FOUND through
    a handle that still holds its data (a restarted server, another replica, an eviction).
    A pinned version that is not current (FAILED_PRECONDITION) is not retried: the name
    holds someone else's gallery, which the handle must not overwrite behind their back."""
    return isinstance(err, errors.NotFoundError) and handle is not None and handle.holds_data


def retarget(prep: Prepared, target: GalleryTarget) -> None:
    """Points a prepared gallery request at target's (new) version, after a handle
    re-registered its gallery (same data, so the same shape)."""
    prep.options.gallery_version = target.version


def gallery_error(err: errors.Error, target: GalleryTarget) -> errors.Error:
    """`err` of a call through `target`, with what a handle's user needs to know added."""
    handle = target.handle
    hint = ""
    if handle is not None and isinstance(err, errors.NotFoundError) and not handle.holds_data:
        hint = (f"the Gallery handle for {target.name!r} holds no data (keep=False or "
                f"released) and cannot re-register it")
    elif handle is not None and isinstance(err, errors.FailedPreconditionError) and handle.pin:
        hint = (f"the Gallery handle pins version {target.version} of {target.name!r} and the "
                f"server holds another one (replaced by someone else, or another replica): "
                f"handle.refresh() follows the server's version, handle.register() puts this "
                f"handle's data back")
    if not hint:
        return err
    return type(err)(f"{err.details} ({hint})", err.code)


class GalleryBase:
    """The state of a gallery handle, shared by simserve.Gallery and simserve.aio.Gallery:
    the server's GalleryInfo as last seen, and (unless released) the data it was registered
    from, so that a call that finds the name gone (NOT_FOUND: a restarted server, another
    replica, an eviction) re-registers it and retries once."""

    def __init__(self, client: Any, info: GalleryInfo, data: Optional[np.ndarray],
                 wire_dtype: int, storage: int, pin: bool) -> None:
        self._client = client
        self.info = info
        """GalleryInfo from the last registration or refresh()."""
        self.pin = pin
        """True: calls send this handle's version (FAILED_PRECONDITION if the server holds
        another); False: they use whatever version the server holds."""
        self._data = data
        self._wire_dtype = wire_dtype
        self._storage = storage
        self._thread_lock = threading.Lock()
        self._async_lock: Any = None  # asyncio.Lock, made inside the running loop

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def shape(self) -> Tuple[int, ...]:
        return self.info.shape

    @property
    def holds_data(self) -> bool:
        """Whether the handle can re-register its gallery (keeps B in client memory)."""
        return self._data is not None

    def release(self) -> None:
        """Drops the held data: the handle then no longer re-registers on NOT_FOUND."""
        self._data = None

    def _registration(self) -> Tuple[str, np.ndarray, int, int]:
        """(name, data, wire dtype, storage dtype) to register the held data again."""
        if self._data is None:
            raise errors.FailedPreconditionError(
                f"the Gallery handle for {self.name!r} holds no data (keep=False or released)")
        return self.name, self._data, self._wire_dtype, self._storage

    def __repr__(self) -> str:
        return (f"{type(self).__module__}.{type(self).__name__}(name={self.name!r}, "
                f"version={self.version}, shape={list(self.shape)}, "
                f"storage_dtype={self.info.storage_dtype!r}, pin={self.pin}, "
                f"holds_data={self.holds_data})")
