"""The asyncio simserve client (grpc.aio); same API as `simserve.Client`, awaitable.

    async with simserve.aio.Client("localhost:50051") as c:
        S = await c.similarity(A, B)
        g = await c.register_gallery("faces", B)
        S = await g.similarity(A)           # or await c.similarity(A, gallery="faces")
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, List, Optional, Sequence, Tuple, Union

import grpc
import grpc.aio
import numpy as np

from simserve import _common as common
from simserve import _shm
from simserve import errors
from simserve._common import (ArrayLike, GalleryInfo, Info, ProgressCallback, RetryPolicy,
                              Timings)
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc

GalleryArg = Union[str, GalleryInfo, common.GalleryBase, None]


class Client:
    """asyncio counterpart of `simserve.Client` (same arguments and semantics, `token=`
    included; no `channel=`).

    Create and use it inside one running event loop; calls may run concurrently.
    """

    def __init__(self, target: str = "localhost:50051", *,
                 credentials: Optional[grpc.ChannelCredentials] = None,
                 tls: bool = False,
                 root_certificates: common.PemSource = None,
                 certificate_chain: common.PemSource = None,
                 private_key: common.PemSource = None,
                 token: Optional[str] = None,
                 timeout: Optional[float] = 120.0,
                 retry: RetryPolicy = RetryPolicy(),
                 chunk_bytes: int = common.MiB,
                 upload_piece_bytes: int = common.MiB,
                 unary_max_bytes: int = common.MiB,
                 upload_min_bytes: int = 8 * common.MiB,
                 options: Sequence[Tuple[str, Any]] = ()) -> None:
        opts = list(common.CHANNEL_OPTIONS) + list(options)
        metadata = common.bearer_metadata(token)
        credentials = common.channel_credentials(credentials, tls, root_certificates,
                                                 certificate_chain, private_key)
        self._channel = (grpc.aio.secure_channel(target, credentials, options=opts)
                         if credentials else grpc.aio.insecure_channel(target, options=opts))
        rpc = common.rpc_channel(self._channel, metadata)  # every RPC callable comes from it
        self._stub = pb_grpc.SimilarityStub(rpc)
        self._compute_unary, self._compute_stream, self._compute_upload = common.bulk_methods(
            rpc)
        self._register_gallery = common.register_method(rpc)
        self.timeout = timeout
        self.retry = retry
        self.chunk_bytes = chunk_bytes
        self.upload_piece_bytes = upload_piece_bytes
        self.unary_max_bytes = unary_max_bytes
        self.upload_min_bytes = upload_min_bytes
        self._info: Optional[Info] = None
        self._shm = _shm.SharedMemory(target)
        self.last_timings: Optional[Timings] = None
        """Timings of the last completed similarity/top_k call."""

    async def close(self) -> None:
        """Unregisters this client's shared-memory regions (if any), closes the channel."""
        await self._drive(self._shm.close(), None)
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

    async def similarity(self, a: ArrayLike, b: Optional[ArrayLike] = None, *,
                         gallery: GalleryArg = None, gallery_version: Optional[int] = None,
                         metric: Union[str, int] = "cosine",
                         output_dtype: Union[str, int] = "float32",
                         precision: Union[str, int] = "fp32", epsilon: float = 0.0,
                         timeout: Optional[float] = None, mode: str = "auto",
                         progress: Optional[ProgressCallback] = None,
                         out: Optional[np.ndarray] = None,
                         shared_memory: bool = False) -> np.ndarray:
        """As `simserve.Client.similarity`."""
        return await self._compute(a, b, 0, gallery, gallery_version, mode, timeout, progress,
                                   out, dict(metric=metric, output_dtype=output_dtype,
                                             precision=precision, epsilon=epsilon,
                                             shared_memory=shared_memory))

    async def top_k(self, a: ArrayLike, b: Optional[ArrayLike] = None,
                    k: Optional[int] = None, *, gallery: GalleryArg = None,
                    gallery_version: Optional[int] = None,
                    metric: Union[str, int] = "cosine",
                    output_dtype: Union[str, int] = "float32",
                    precision: Union[str, int] = "fp32", epsilon: float = 0.0,
                    timeout: Optional[float] = None, mode: str = "auto",
                    progress: Optional[ProgressCallback] = None,
                    shared_memory: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """As `simserve.Client.top_k`: top_k(a, b, k) or top_k(a, k, gallery=...)."""
        b, k = common.top_k_args(b, k, gallery)
        return await self._compute(a, b, k, gallery, gallery_version, mode, timeout, progress,
                                   None, dict(metric=metric, output_dtype=output_dtype,
                                              precision=precision, epsilon=epsilon,
                                              shared_memory=shared_memory))

    async def shared_array(self, shape: Sequence[int], dtype: Any = np.float32, *,
                           timeout: Optional[float] = None) -> np.ndarray:
        """As `simserve.Client.shared_array`."""
        return await self._drive(self._shm.shared_array(shape, dtype), self._deadline(timeout))

    async def _drive(self, steps, deadline: Optional[float]):
        """As simserve.Client._drive, awaiting each RPC."""
        reply: Any = None
        error: Optional[errors.Error] = None
        while True:
            try:
                op = steps.throw(error) if error is not None else steps.send(reply)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            try:
                reply = await self._perform(op, deadline)
            except errors.Error as e:
                error = e
            except BaseException:  # an interrupt, a cancel: the procedure cleans up, then out
                steps.close()
                raise

    async def _perform(self, op: _shm.Op, deadline: Optional[float]) -> Any:
        if op.kind == "info":
            return await self.info(timeout=self._remaining(deadline))
        if op.kind == "compute":
            async def attempt(t: Optional[float]):
                call = self._compute_unary(op.request, timeout=t)
                return await call, call
            return await self._with_retries(attempt, deadline)
        if op.kind == "unregister":  # best effort: the server may be gone already
            try:
                await self._stub.SystemSharedMemoryUnregister(
                    op.request, timeout=_shm.unregister_timeout(self._remaining(deadline)))
            except Exception:  # pylint: disable=broad-except  # e.g. a closed channel
                pass
            return None
        method = getattr(self._stub, op.method)

        async def rpc(t: Optional[float]):
            return await method(op.request, timeout=t), None

        resp, _, _ = await self._with_retries(rpc, deadline)
        return resp

    async def register_gallery(self, name: str, b: ArrayLike,
                               storage_dtype: Union[str, int] = "float32", *,
                               keep: bool = True, pin: bool = False,
                               timeout: Optional[float] = None) -> "Gallery":
        """As `simserve.Client.register_gallery`; returns a `simserve.aio.Gallery`."""
        data, wire = common.gallery_data(b)
        storage = common.storage_dtype(storage_dtype)
        info = await self._register(name, data, wire, storage, self._deadline(timeout))
        return Gallery(self, info, data if keep else None, wire, storage, pin)

    async def get_gallery(self, name: GalleryArg, *,
                          timeout: Optional[float] = None) -> GalleryInfo:
        """As `simserve.Client.get_gallery`."""
        req = pb.GetGalleryRequest(name=common.gallery_name(name))
        return GalleryInfo.from_proto(await self._small_call(self._stub.GetGallery, req,
                                                             timeout))

    async def galleries(self, *, timeout: Optional[float] = None) -> List[GalleryInfo]:
        """As `simserve.Client.galleries`."""
        resp = await self._small_call(self._stub.ListGalleries, pb.ListGalleriesRequest(),
                                      timeout)
        return [GalleryInfo.from_proto(g) for g in resp.galleries]

    async def delete_gallery(self, name: GalleryArg, *,
                             timeout: Optional[float] = None) -> GalleryInfo:
        """As `simserve.Client.delete_gallery`."""
        req = pb.DeleteGalleryRequest(name=common.gallery_name(name))
        resp = await self._small_call(self._stub.DeleteGallery, req, timeout)
        return GalleryInfo.from_proto(resp.deleted)

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

    @staticmethod
    def _remaining(deadline: Optional[float]) -> Optional[float]:
        return None if deadline is None else deadline - time.monotonic()

    async def _small_call(self, method, request, timeout: Optional[float]):
        async def attempt(t: Optional[float]):
            return await method(request, timeout=t), None

        resp, _, _ = await self._with_retries(attempt, self._deadline(timeout))
        return resp

    async def _register(self, name: str, data: np.ndarray, wire: int, storage: int,
                        deadline: Optional[float]) -> GalleryInfo:
        if not isinstance(name, str):
            raise errors.InvalidArgumentError(f"gallery name must be a str, got {name!r}")
        limits = (await self.info(timeout=self._remaining(deadline))).limits
        piece = common.piece_bytes(self.upload_piece_bytes, limits)

        async def attempt(t: Optional[float]):
            requests = common.register_requests(name, data, wire, storage, piece)
            return await self._register_gallery(requests, timeout=t), None

        resp, _, _ = await self._with_retries(attempt, deadline)
        return GalleryInfo.from_proto(resp)

    async def _compute(self, a, b, k: int, gallery: GalleryArg,
                       gallery_version: Optional[int], mode: str, timeout: Optional[float],
                       progress: Optional[ProgressCallback], out: Optional[np.ndarray],
                       options: dict):
        """As simserve.Client._compute: the gallery look-up, and a handle's re-registration
        and single retry on NOT_FOUND."""
        target = common.compute_target(b, gallery, gallery_version)
        if target is None:
            prep = common.prepare(a, b, top_k=k, chunk_bytes=self.chunk_bytes, **options)
            return await self._run(prep, mode, timeout, progress, out)
        deadline = self._deadline(timeout)
        if target.shape is None:
            target = target.with_info(await self.get_gallery(
                target.name, timeout=self._remaining(deadline)))
        handle = target.handle
        seen = handle.info if handle is not None else None
        prep = common.prepare(a, None, gallery=target, top_k=k, chunk_bytes=self.chunk_bytes,
                              **options)
        try:
            return await self._run(prep, mode, self._remaining(deadline), progress, out)
        except errors.Error as e:
            if common.status_lost(e):  # an upload too large to repeat in one message
                e = await self._gallery_status(target, deadline, e)
            if not common.reregisters(e, handle):
                raise common.gallery_error(e, target) from None
        if handle._async_lock is None:
            handle._async_lock = asyncio.Lock()
        async with handle._async_lock:
            if handle.info is seen:
                handle.info = await self._register(*handle._registration(), deadline)
        target = common.gallery_target(handle, None)
        common.retarget(prep, target)
        try:
            return await self._run(prep, mode, self._remaining(deadline), progress, out)
        except errors.Error as e:
            raise common.gallery_error(e, target) from None

    async def _gallery_status(self, target: common.GalleryTarget, deadline: Optional[float],
                              lost: errors.Error) -> errors.Error:
        """The likeliest status of a gallery upload whose status grpc.aio lost: NOT_FOUND or a
        version that is not current if GetGallery says so, else `lost` itself."""
        try:
            info = await self.get_gallery(target.name, timeout=self._remaining(deadline))
        except errors.NotFoundError as e:
            return e
        except errors.Error:
            return lost
        if target.version and info.version != target.version:
            return errors.FailedPreconditionError(
                f"gallery {target.name!r} is at version {info.version}, not {target.version}")
        return lost

    async def _run(self, prep: common.Prepared, mode: str, timeout: Optional[float],
                   progress: Optional[ProgressCallback], out: Optional[np.ndarray]):
        start = time.perf_counter()
        deadline = self._deadline(timeout)
        if prep.shared_memory:
            common.check_mode(mode)  # also when the call then falls back
            done = await self._drive(self._shm.compute(prep, out, progress), deadline)
            if done is not None:  # else: this server cannot use our memory (logged once)
                result, call, attempts = done
                self.last_timings = common.timings(
                    await call.trailing_metadata(), "shared_memory",
                    (time.perf_counter() - start) * 1e3, attempts)
                return result
        limits = ((await self.info(timeout=timeout)).limits if mode in ("auto", "upload")
                  else None)
        mode = common.resolve_mode(prep, mode, limits, self.unary_max_bytes,
                                   self.upload_min_bytes)
        asm = common.Assembler(prep, progress, out)
        try:
            call, attempts = await self._attempts(prep, mode, limits, asm, deadline)
        except errors.Error as e:
            if mode != "upload" or not common.status_lost(e):
                raise
            # The server rejected the upload and grpc.aio lost its status (grpc#36066):
            # ask again in one message, which cannot race (same checks, same result).
            if not common.fits_one_message(prep.input_bytes, limits):
                raise common.lost_status_error(e) from None
            mode = "stream"
            call, attempts = await self._attempts(prep, mode, limits, asm, deadline)
        result = asm.result()
        self.last_timings = common.timings(await call.trailing_metadata(), mode,
                                           (time.perf_counter() - start) * 1e3, attempts)
        return result

    async def _attempts(self, prep: common.Prepared, mode: str, limits, asm: common.Assembler,
                        deadline: Optional[float]):
        """Runs the call in `mode` (with UNAVAILABLE retries) into `asm`: (call, attempts)."""
        piece = common.piece_bytes(self.upload_piece_bytes, limits)
        # As in simserve.Client: one copy of the inputs out, one of the result in.
        request = prep.request_bytes() if mode in ("unary", "stream") else b""

        async def attempt(t: Optional[float]):
            asm.reset()
            if mode == "unary":
                call = self._compute_unary(request, timeout=t)
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
        return call, attempts


class Gallery(common.GalleryBase):
    """asyncio counterpart of `simserve.Gallery` (same semantics; methods are awaitable)."""

    async def similarity(self, a: ArrayLike, **kwargs: Any) -> np.ndarray:
        """`await Client.similarity(a, gallery=self, **kwargs)`."""
        return await self._client.similarity(a, gallery=self, **kwargs)

    async def top_k(self, a: ArrayLike, k: int, **kwargs: Any
                    ) -> Tuple[np.ndarray, np.ndarray]:
        """`await Client.top_k(a, k, gallery=self, **kwargs)`."""
        return await self._client.top_k(a, k=k, gallery=self, **kwargs)

    async def refresh(self, *, timeout: Optional[float] = None) -> GalleryInfo:
        """As `simserve.Gallery.refresh`."""
        self.info = await self._client.get_gallery(self.name, timeout=timeout)
        return self.info

    async def register(self, *, timeout: Optional[float] = None) -> GalleryInfo:
        """As `simserve.Gallery.register`."""
        if self._async_lock is None:
            self._async_lock = asyncio.Lock()
        async with self._async_lock:
            self.info = await self._client._register(*self._registration(),
                                                     self._client._deadline(timeout))
        return self.info

    async def delete(self, *, timeout: Optional[float] = None) -> GalleryInfo:
        """As `simserve.Gallery.delete`."""
        info = await self._client.delete_gallery(self.name, timeout=timeout)
        self.release()
        return info
