"""The asyncio simserve client (grpc.aio); same API as `simserve.Client`, awaitable.

    async with simserve.aio.Client("localhost:50051") as c:
        S = await c.similarity(A, B)
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Optional, Sequence, Tuple, Union

import grpc
import grpc.aio
import numpy as np

from simserve import _common as common
from simserve import errors
from simserve._common import ArrayLike, Info, ProgressCallback, RetryPolicy, Timings
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc


class Client:
    """asyncio counterpart of `simserve.Client` (same arguments and semantics).

    Create and use it inside one running event loop; calls may run concurrently.
    """

    def __init__(self, target: str = "localhost:50051", *,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 timeout: Optional[float] = 120.0,
                 retry: RetryPolicy = RetryPolicy(),
                 chunk_bytes: int = common.MiB,
                 upload_piece_bytes: int = common.MiB,
                 unary_max_bytes: int = common.MiB,
                 upload_min_bytes: int = 8 * common.MiB,
                 options: Sequence[Tuple[str, Any]] = ()) -> None:
        opts = list(common.CHANNEL_OPTIONS) + list(options)
        self._channel = (grpc.aio.secure_channel(target, credentials, options=opts)
                         if credentials else grpc.aio.insecure_channel(target, options=opts))
        self._stub = pb_grpc.SimilarityStub(self._channel)
        self._compute, self._compute_stream, self._compute_upload = common.bulk_methods(
            self._channel)
        self.timeout = timeout
        self.retry = retry
        self.chunk_bytes = chunk_bytes
        self.upload_piece_bytes = upload_piece_bytes
        self.unary_max_bytes = unary_max_bytes
        self.upload_min_bytes = upload_min_bytes
        self._info: Optional[Info] = None
        self.last_timings: Optional[Timings] = None
        """Timings of the last completed similarity/top_k call."""

    async def close(self) -> None:
        """Closes the channel."""
        await self._channel.close()

    async def __aenter__(self) -> "Client":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def info(self, *, timeout: Optional[float] = None, refresh: bool = False) -> Info:
        """As `simserve.Client.info`."""
        if self._info is not None and not refresh:
            return self._info

        async def attempt(t: Optional[float]):
            return await self._stub.GetInfo(pb.GetInfoRequest(), timeout=t), None

        resp, _, _ = await self._with_retries(attempt, self._deadline(timeout))
        self._info = Info.from_proto(resp)
        return self._info

    async def similarity(self, a: ArrayLike, b: ArrayLike, *,
                         metric: Union[str, int] = "cosine",
                         output_dtype: Union[str, int] = "float32",
                         precision: Union[str, int] = "fp32", epsilon: float = 0.0,
                         timeout: Optional[float] = None, mode: str = "auto",
                         progress: Optional[ProgressCallback] = None,
                         out: Optional[np.ndarray] = None) -> np.ndarray:
        """As `simserve.Client.similarity`."""
        prep = common.prepare(a, b, metric=metric, output_dtype=output_dtype,
                              precision=precision, epsilon=epsilon, top_k=0,
                              chunk_bytes=self.chunk_bytes)
        return await self._run(prep, mode, timeout, progress, out)

    async def top_k(self, a: ArrayLike, b: ArrayLike, k: int, *,
                    metric: Union[str, int] = "cosine",
                    output_dtype: Union[str, int] = "float32",
                    precision: Union[str, int] = "fp32", epsilon: float = 0.0,
                    timeout: Optional[float] = None, mode: str = "auto",
                    progress: Optional[ProgressCallback] = None
                    ) -> Tuple[np.ndarray, np.ndarray]:
        """As `simserve.Client.top_k`."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise errors.InvalidArgumentError(f"k must be a positive int, got {k!r}")
        prep = common.prepare(a, b, metric=metric, output_dtype=output_dtype,
                              precision=precision, epsilon=epsilon, top_k=int(k),
                              chunk_bytes=self.chunk_bytes)
        return await self._run(prep, mode, timeout, progress, None)

    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    async def _with_retries(self, attempt, deadline: Optional[float]):
        n = 0
        while True:
            n += 1
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise errors.DeadlineExceededError("deadline passed before the call could start")
            try:
                result, call = await attempt(remaining)
                return result, call, n
            except grpc.RpcError as e:
                err = errors.from_rpc_error(e)
                if err.code not in self.retry.codes or n >= self.retry.max_attempts:
                    raise err from None
                pause = self.retry.backoff(n)
                if deadline is not None and time.monotonic() + pause >= deadline:
                    raise err from None
                await asyncio.sleep(pause)

    async def _run(self, prep: common.Prepared, mode: str, timeout: Optional[float],
                   progress: Optional[ProgressCallback], out: Optional[np.ndarray]):
        start = time.perf_counter()
        deadline = self._deadline(timeout)
        limits = ((await self.info(timeout=timeout)).limits if mode in ("auto", "upload")
                  else None)
        mode = common.resolve_mode(prep, mode, limits, self.unary_max_bytes,
                                   self.upload_min_bytes)
        asm = common.Assembler(prep, progress, out)
        piece = common.piece_bytes(self.upload_piece_bytes, limits)
        # As in simserve.Client: one copy of the inputs out, one of the result in.
        request = prep.request_bytes() if mode in ("unary", "stream") else b""

        async def attempt(t: Optional[float]):
            asm.reset()
            if mode == "unary":
                call = self._compute(request, timeout=t)
                asm.set_response(await call)
                return None, call
            if mode == "stream":
                call = self._compute_stream(request, timeout=t)
            else:
                call = self._compute_upload(
                    common.upload_requests(prep, piece), timeout=t)
            asm.prefault()  # while the request is on its way
            try:
                async for chunk in call:
                    asm.add_chunk(chunk)
            except BaseException:  # ProtocolError, a raising progress callback, Ctrl-C
                call.cancel()
                raise
            return None, call

        _, call, attempts = await self._with_retries(attempt, deadline)
        result = asm.result()
        self.last_timings = common.timings(await call.trailing_metadata(), mode,
                                           (time.perf_counter() - start) * 1e3, attempts)
        return result
