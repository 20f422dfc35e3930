"""The blocking simserve client: numpy arrays in, numpy arrays out, over gRPC.

    with simserve.Client("localhost:50051") as c:
        S = c.similarity(A, B)                 # [batch, N, M] float32
        values, indices = c.top_k(A, B, k=5)   # [batch, N, 5] float32 / int32
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, Sequence, Tuple, TypeVar, Union

import grpc
import numpy as np

from simserve import _common as common
from simserve import errors
from simserve._common import ArrayLike, Info, ProgressCallback, RetryPolicy, Timings
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc

T = TypeVar("T")


class Client:
    """A connection to one simserve server. Thread-safe: calls may run concurrently
    (`last_timings` then holds whichever call finished last).

    Args:
        target: "host:port" of the server.
        channel: an existing grpc.Channel to use instead of creating one (not closed by us).
        credentials: grpc.ChannelCredentials for TLS; None = insecure (plaintext).
        timeout: default per-call deadline in seconds (all retries included); None = no
            deadline (not recommended).
        retry: retry policy for UNAVAILABLE (see RetryPolicy; max_attempts=1 disables).
        chunk_bytes: max payload of one streamed result tile (0 = server default, 1 MiB).
        upload_piece_bytes: size of the A/B pieces sent by ComputeUpload (capped below the
            server's receive limit). 1-4 MiB measured alike; 512 KiB is ~20 % slower.
        unary_max_bytes: requests whose inputs + result are at most this many bytes use
            unary Compute (one round trip).
        upload_min_bytes: inputs of at least this many bytes (and any that exceed the
            server's receive limit) use the full-duplex ComputeUpload; between the two,
            ComputeStream. Same rule as the C++ client.
        options: extra gRPC channel arguments.
    """

    def __init__(self, target: str = "localhost:50051", *,
                 channel: Optional[grpc.Channel] = None,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 timeout: Optional[float] = 120.0,
                 retry: RetryPolicy = RetryPolicy(),
                 chunk_bytes: int = common.MiB,
                 upload_piece_bytes: int = common.MiB,
                 unary_max_bytes: int = common.MiB,
                 upload_min_bytes: int = 8 * common.MiB,
                 options: Sequence[Tuple[str, Any]] = ()) -> None:
        self._own_channel = channel is None
        if channel is None:
            opts = list(common.CHANNEL_OPTIONS) + list(options)
            channel = (grpc.secure_channel(target, credentials, options=opts) if credentials
                       else grpc.insecure_channel(target, options=opts))
        self._channel = channel
        self._stub = pb_grpc.SimilarityStub(channel)
        self._compute, self._compute_stream, self._compute_upload = common.bulk_methods(channel)
        self.timeout = timeout
        self.retry = retry
        self.chunk_bytes = chunk_bytes
        self.upload_piece_bytes = upload_piece_bytes
        self.unary_max_bytes = unary_max_bytes
        self.upload_min_bytes = upload_min_bytes
        self._info: Optional[Info] = None
        self._lock = threading.Lock()
        self.last_timings: Optional[Timings] = None
        """Timings of the last completed similarity/top_k call (client and server side)."""

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Closes the channel (if this client created it)."""
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- public API ------------------------------------------------------------------------
    def info(self, *, timeout: Optional[float] = None, refresh: bool = False) -> Info:
        """Server version, oneDNN version and ISA, limits and capabilities (cached).

        Raises:
            simserve.Error subclass on RPC failure.
        """
        with self._lock:
            cached = self._info
        if cached is not None and not refresh:
            return cached
        deadline = self._deadline(timeout)
        resp, _, _ = self._with_retries(
            lambda t: (self._stub.GetInfo(pb.GetInfoRequest(), timeout=t), None), deadline)
        info = Info.from_proto(resp)
        with self._lock:
            self._info = info
        return info

    def similarity(self, a: ArrayLike, b: ArrayLike, *, metric: Union[str, int] = "cosine",
                   output_dtype: Union[str, int] = "float32",
                   precision: Union[str, int] = "fp32", epsilon: float = 0.0,
                   timeout: Optional[float] = None, mode: str = "auto",
                   progress: Optional[ProgressCallback] = None,
                   out: Optional[np.ndarray] = None) -> np.ndarray:
        """Pairwise similarity S[k, i, j] = sim(a[k, i], b[k, j]).

        Args:
            a: [batch, N, D] or [N, D]; float32/float64 (converted), C or F order.
            b: [batch, M, D] or [M, D]; same batch and D as `a`.
            metric: "cosine" (sklearn semantics: zero rows give 0), "dot", "euclidean",
                "squared_euclidean".
            output_dtype: wire type of the result, "float32", "bfloat16" or "float16"; the
                returned array is always float32 (bf16/fp16 widened in the client).
            precision: "fp32" (exact) or "bf16" (bf16 operands, AMX fast path).
            epsilon: 0 for sklearn cosine; > 0 reproduces Keras' clamp
                x / sqrt(max(sum(x^2), epsilon)). Cosine only.
            timeout: deadline in seconds for the whole call (default: the client's).
            mode: "auto" (by size and the server's limits), "unary", "stream" or "upload".
            progress: progress(rows_done, rows_total) after every received tile.
            out: optional preallocated C-contiguous float32 array of the result's shape.

        Returns:
            float32 array [batch, N, M] ([N, M] for 2D inputs).

        Raises:
            simserve.InvalidArgumentError for bad input (client- or server-detected),
            simserve.ResourceExhaustedError over server limits, other simserve.Error
            subclasses for other gRPC failures (after retrying UNAVAILABLE).
        """
        prep = common.prepare(a, b, metric=metric, output_dtype=output_dtype,
                              precision=precision, epsilon=epsilon, top_k=0,
                              chunk_bytes=self.chunk_bytes)
        return self._run(prep, mode, timeout, progress, out)  # type: ignore[return-value]

    def top_k(self, a: ArrayLike, b: ArrayLike, k: int, *, metric: Union[str, int] = "cosine",
              output_dtype: Union[str, int] = "float32", precision: Union[str, int] = "fp32",
              epsilon: float = 0.0, timeout: Optional[float] = None, mode: str = "auto",
              progress: Optional[ProgressCallback] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Per row of `a`, the k best columns of b: largest for cosine/dot, smallest for the
        distances; ties go to the lower column index.

        Args: as for `similarity`, plus k (1 <= k <= M).

        Returns:
            (values float32 [batch, N, k], indices int32 [batch, N, k]); 2D for 2D inputs.

        Raises:
            as `similarity`; k > M is INVALID_ARGUMENT from the server.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise errors.InvalidArgumentError(f"k must be a positive int, got {k!r}")
        prep = common.prepare(a, b, metric=metric, output_dtype=output_dtype,
                              precision=precision, epsilon=epsilon, top_k=int(k),
                              chunk_bytes=self.chunk_bytes)
        return self._run(prep, mode, timeout, progress, None)  # type: ignore[return-value]

    # -- internals -------------------------------------------------------------------------
    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    def _with_retries(self, attempt: Callable[[Optional[float]], Tuple[T, Any]],
                      deadline: Optional[float]) -> Tuple[T, Any, int]:
        """Runs attempt(remaining_timeout) -> (result, call) with the retry policy."""
        n = 0
        while True:
            n += 1
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise errors.DeadlineExceededError("deadline passed before the call could start")
            try:
                result, call = attempt(remaining)
                return result, call, n
            except grpc.RpcError as e:
                err = errors.from_rpc_error(e)
                if err.code not in self.retry.codes or n >= self.retry.max_attempts:
                    raise err from None
                pause = self.retry.backoff(n)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    raise err from None
                time.sleep(pause)

    def _run(self, prep: common.Prepared, mode: str, timeout: Optional[float],
             progress: Optional[ProgressCallback], out: Optional[np.ndarray]):
        start = time.perf_counter()
        deadline = self._deadline(timeout)
        limits = self.info(timeout=timeout).limits if mode in ("auto", "upload") else None
        mode = common.resolve_mode(prep, mode, limits, self.unary_max_bytes,
                                   self.upload_min_bytes)
        asm = common.Assembler(prep, progress, out)
        piece = common.piece_bytes(self.upload_piece_bytes, limits)
        # Serialised once for all attempts (one copy of the inputs); responses are parsed
        # into memoryviews of the received bytes and copied once, straight into place.
        request = prep.request_bytes() if mode in ("unary", "stream") else b""

        def unary(t: Optional[float]):
            asm.reset()
            resp, call = self._compute.with_call(request, timeout=t)
            asm.set_response(resp)
            return None, call

        def streamed(t: Optional[float]):
            asm.reset()
            if mode == "stream":
                call = self._compute_stream(request, timeout=t)
            else:
                call = self._compute_upload(
                    common.upload_requests(prep, piece), timeout=t)
            asm.prefault()  # while the request is on its way
            try:
                for chunk in call:
                    asm.add_chunk(chunk)
            except BaseException:  # ProtocolError, a raising progress callback, Ctrl-C
                call.cancel()
                raise
            return None, call

        _, call, attempts = self._with_retries(unary if mode == "unary" else streamed, deadline)
        result = asm.result()
        self.last_timings = common.timings(call.trailing_metadata(), mode,
                                           (time.perf_counter() - start) * 1e3, attempts)
        return result
