"""The blocking simserve client: numpy arrays in, numpy arrays out, over gRPC.

    with simserve.Client("localhost:50051") as c:
        S = c.similarity(A, B)                 # [batch, N, M] float32
        values, indices = c.top_k(A, B, k=5)   # [batch, N, 5] float32 / int32
        g = c.register_gallery("faces", B)     # B stays on the server
        S = c.similarity(A, gallery=g)         # or gallery="faces", or g.similarity(A)
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar, Union

import grpc
import numpy as np

from simserve import _common as common
from simserve import _shm, errors
from simserve._common import (ArrayLike, GalleryInfo, Info, ProgressCallback, RetryPolicy,
                              Timings)
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc

T = TypeVar("T")
GalleryArg = Union[str, GalleryInfo, "Gallery", None]


class Client:
    """A connection to one simserve server. Thread-safe: calls may run concurrently
    (`last_timings` then holds whichever call finished last).

    Args:
        target: "host:port" of the server.
        channel: an existing grpc.Channel to use instead of creating one (not closed by us).
        credentials: grpc.ChannelCredentials for TLS; None = insecure (plaintext).
        tls, root_certificates, certificate_chain, private_key: TLS without building
            credentials: tls=True with the system's roots, or root_certificates (PEM bytes or
            a file path) for a private CA; certificate_chain + private_key for mutual TLS.
            Any of them implies TLS. Not together with credentials=.
        token: bearer token for a server with --auth_token_file: every call (compute,
            GetInfo, galleries) sends `authorization: Bearer <token>`, over TLS or plaintext
            (where it travels in clear: use TLS beyond a trusted network). ValueError unless
            it is non-empty printable ASCII without whitespace. Never logged or shown in
            reprs and error messages. Also applied to a `channel=` passed in.
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
        self._own_channel = channel is None
        metadata = common.bearer_metadata(token)
        credentials = common.channel_credentials(credentials, tls, root_certificates,
                                                 certificate_chain, private_key)
        if channel is None:
            opts = list(common.CHANNEL_OPTIONS) + list(options)
            channel = (grpc.secure_channel(target, credentials, options=opts) if credentials
                       else grpc.insecure_channel(target, options=opts))
        self._channel = channel
        rpc = common.rpc_channel(channel, metadata)  # every RPC callable comes from it
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
        self._lock = threading.Lock()
        self._shm = _shm.SharedMemory(target)
        self.last_timings: Optional[Timings] = None
        """Timings of the last completed similarity/top_k call (client and server side)."""

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        """Unregisters this client's shared-memory regions (if any), then closes the channel
        (if this client created it)."""
        self._drive(self._shm.close(), None)
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

    def similarity(self, a: ArrayLike, b: Optional[ArrayLike] = None, *,
                   gallery: GalleryArg = None, gallery_version: Optional[int] = None,
                   metric: Union[str, int] = "cosine",
                   output_dtype: Union[str, int] = "float32",
                   precision: Union[str, int] = "fp32", epsilon: float = 0.0,
                   timeout: Optional[float] = None, mode: str = "auto",
                   progress: Optional[ProgressCallback] = None,
                   out: Optional[np.ndarray] = None,
                   shared_memory: bool = False) -> np.ndarray:
        """Pairwise similarity S[k, i, j] = sim(a[k, i], b[k, j]).

        Args:
            a: [batch, N, D] or [N, D]; float32/float64 (converted), C or F order.
            b: [batch, M, D] or [M, D]; same batch and D as `a`. Leave out with `gallery`.
            gallery: instead of `b`, a gallery held by the server: its name (one GetGallery
                round trip per call sizes the result), a GalleryInfo, or a Gallery handle
                from register_gallery (re-registers and retries once on NOT_FOUND while it
                holds its data). A 2D gallery [M, D] serves every batch entry of `a`; a 3D
                one [batch, M, D] must match a's batch.
            gallery_version: with a gallery name or GalleryInfo: 0/None = the server's
                current version, else it must be the current one (FailedPreconditionError
                otherwise). A handle decides by its `pin`.
            metric: "cosine" (sklearn semantics: zero rows give 0), "dot", "euclidean",
                "squared_euclidean".
            output_dtype: wire type of the result, "float32", "bfloat16" or "float16"; the
                returned array is always float32 (bf16/fp16 widened in the client).
            precision: "fp32" (exact) or "bf16" (bf16 operands, AMX fast path).
            epsilon: 0 for sklearn cosine; > 0 reproduces Keras' clamp
                x / sqrt(max(sum(x^2), epsilon)). Cosine only.
            timeout: deadline in seconds for the whole call (default: the client's),
                including a gallery look-up or re-registration.
            mode: "auto" (by size and the server's limits), "unary", "stream" or "upload".
            progress: progress(rows_done, rows_total) after every received tile.
            out: optional preallocated C-contiguous float32 array of the result's shape.
            shared_memory: for a server on this host started with --allow_shared_memory:
                the tensors travel through this client's POSIX shared-memory regions
                (reused across calls) instead of gRPC messages: one unary Compute that
                names them, any size. Inputs are copied into a region once, unless they
                already lie in one (a previous result, or an array from `shared_array`);
                a float32 result without `out=` is returned over its region, no copy (the
                region is reused once the array is garbage collected). If the server cannot
                use this host's shared memory (remote, or the flag is off) the call goes
                over gRPC as usual (by `mode`), after one warning on the "simserve"
                logger; otherwise `mode` is not used.

        Returns:
            float32 array [batch, N, M] ([N, M] for 2D `a`).

        Raises:
            simserve.InvalidArgumentError for bad input (client- or server-detected),
            simserve.ResourceExhaustedError over server limits, simserve.NotFoundError for
            an unknown gallery, simserve.FailedPreconditionError for a gallery version that
            is not current, other simserve.Error subclasses for other gRPC failures (after
            retrying UNAVAILABLE).
        """
        return self._compute(a, b, 0, gallery, gallery_version, mode, timeout, progress, out,
                             dict(metric=metric, output_dtype=output_dtype,
                                  precision=precision, epsilon=epsilon,
                                  shared_memory=shared_memory))

    def top_k(self, a: ArrayLike, b: Optional[ArrayLike] = None, k: Optional[int] = None, *,
              gallery: GalleryArg = None, gallery_version: Optional[int] = None,
              metric: Union[str, int] = "cosine",
              output_dtype: Union[str, int] = "float32", precision: Union[str, int] = "fp32",
              epsilon: float = 0.0, timeout: Optional[float] = None, mode: str = "auto",
              progress: Optional[ProgressCallback] = None,
              shared_memory: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """Per row of `a`, the k best columns of b: largest for cosine/dot, smallest for the
        distances; ties go to the lower column index.

        Call as top_k(a, b, k) or top_k(a, k, gallery=...).

        Args: as for `similarity`, plus k (1 <= k <= M).

        Returns:
            (values float32 [batch, N, k], indices int32 [batch, N, k]); 2D for 2D `a`.

        Raises:
            as `similarity`; k > M is INVALID_ARGUMENT from the server.
        """
        b, k = common.top_k_args(b, k, gallery)
        return self._compute(a, b, k, gallery, gallery_version, mode, timeout, progress, None,
                             dict(metric=metric, output_dtype=output_dtype,
                                  precision=precision, epsilon=epsilon,
                                  shared_memory=shared_memory))

    # -- galleries -------------------------------------------------------------------------
    def register_gallery(self, name: str, b: ArrayLike,
                         storage_dtype: Union[str, int] = "float32", *, keep: bool = True,
                         pin: bool = False, timeout: Optional[float] = None) -> "Gallery":
        """Uploads `b` as the server-side gallery `name` (replacing one of that name, whose
        version then goes up by 1) and returns a handle to it.

        Args:
            name: [A-Za-z0-9._-]{1,128}.
            b: [M, D] or [batch, M, D]; float16 is sent as float16, anything else as float32.
            storage_dtype: how the server stores it: "float32" (exact), "bfloat16" or
                "float16" (half the memory and the bytes a query reads; 8 / 11 significant
                bits, ~2.4 / ~3.3 decimal digits).
            keep: the handle keeps (a reference to) the data so that it can re-register it
                on NOT_FOUND (a restarted server, another replica, an eviction). No copy is
                made when b is already C-contiguous float32/float16: do not modify it then.
                False: nothing is kept; such a handle raises NotFoundError instead.
            pin: calls through the handle send its version (gallery_version), so a result
                is never computed against someone else's replacement
                (FailedPreconditionError instead). Versions count per server: with several
                replicas leave it False.
            timeout: deadline in seconds (default: the client's).

        Returns:
            a `simserve.Gallery` handle (name, version, shape, info, similarity, top_k, ...).

        Raises:
            simserve.InvalidArgumentError for a bad name, shape or dtype (nothing is
            registered), simserve.ResourceExhaustedError if it does not fit the server's
            gallery memory even after evicting least recently used uploaded galleries.
        """
        data, wire = common.gallery_data(b)
        storage = common.storage_dtype(storage_dtype)
        info = self._register(name, data, wire, storage, self._deadline(timeout))
        return Gallery(self, info, data if keep else None, wire, storage, pin)

    def get_gallery(self, name: GalleryArg, *, timeout: Optional[float] = None) -> GalleryInfo:
        """The server's GalleryInfo for a name (or handle). Raises NotFoundError if unknown."""
        req = pb.GetGalleryRequest(name=common.gallery_name(name))
        return GalleryInfo.from_proto(self._small_call(self._stub.GetGallery, req, timeout))

    def galleries(self, *, timeout: Optional[float] = None) -> List[GalleryInfo]:
        """Every gallery this server holds (uploaded and directory), sorted by name."""
        resp = self._small_call(self._stub.ListGalleries, pb.ListGalleriesRequest(), timeout)
        return [GalleryInfo.from_proto(g) for g in resp.galleries]

    def delete_gallery(self, name: GalleryArg, *, timeout: Optional[float] = None
                       ) -> GalleryInfo:
        """Removes an uploaded gallery; returns what was removed. A handle to it keeps its
        data (and so re-registers it when next used); Gallery.delete() also releases it.

        Raises:
            simserve.NotFoundError if unknown, simserve.FailedPreconditionError for a
            directory gallery (remove its file from --gallery_dir instead).
        """
        req = pb.DeleteGalleryRequest(name=common.gallery_name(name))
        resp = self._small_call(self._stub.DeleteGallery, req, timeout)
        return GalleryInfo.from_proto(resp.deleted)

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

    @staticmethod
    def _remaining(deadline: Optional[float]) -> Optional[float]:
        return None if deadline is None else deadline - time.monotonic()

    def _small_call(self, method: Callable, request: Any, timeout: Optional[float]) -> Any:
        resp, _, _ = self._with_retries(lambda t: (method(request, timeout=t), None),
                                        self._deadline(timeout))
        return resp

    def _register(self, name: str, data: np.ndarray, wire: int, storage: int,
                  deadline: Optional[float]) -> GalleryInfo:
        if not isinstance(name, str):
            raise errors.InvalidArgumentError(f"gallery name must be a str, got {name!r}")
        limits = self.info(timeout=self._remaining(deadline)).limits
        piece = common.piece_bytes(self.upload_piece_bytes, limits)
        resp, _, _ = self._with_retries(
            lambda t: (self._register_gallery(
                common.register_requests(name, data, wire, storage, piece), timeout=t), None),
            deadline)
        return GalleryInfo.from_proto(resp)

    def _compute(self, a: ArrayLike, b: Optional[ArrayLike], k: int, gallery: GalleryArg,
                 gallery_version: Optional[int], mode: str, timeout: Optional[float],
                 progress: Optional[ProgressCallback], out: Optional[np.ndarray],
                 options: dict):
        target = common.compute_target(b, gallery, gallery_version)
        if target is None:
            prep = common.prepare(a, b, top_k=k, chunk_bytes=self.chunk_bytes, **options)
            return self._run(prep, mode, timeout, progress, out)
        deadline = self._deadline(timeout)
        if target.shape is None:
            target = target.with_info(self.get_gallery(target.name,
                                                       timeout=self._remaining(deadline)))
        handle = target.handle
        seen = handle.info if handle is not None else None
        prep = common.prepare(a, None, gallery=target, top_k=k, chunk_bytes=self.chunk_bytes,
                              **options)
        try:
            return self._run(prep, mode, self._remaining(deadline), progress, out)
        except errors.Error as e:
            if not common.reregisters(e, handle):
                raise common.gallery_error(e, target) from None
        # NOT_FOUND through a handle that holds its data: register it again (once, if
        # concurrent calls all found it gone) and retry once.
        with handle._thread_lock:
            if handle.info is seen:
                handle.info = self._register(*handle._registration(), deadline)
        target = common.gallery_target(handle, None)
        common.retarget(prep, target)
        try:
            return self._run(prep, mode, self._remaining(deadline), progress, out)
        except errors.Error as e:
            raise common.gallery_error(e, target) from None

    def _run(self, prep: common.Prepared, mode: str, timeout: Optional[float],
             progress: Optional[ProgressCallback], out: Optional[np.ndarray]):
        start = time.perf_counter()
        deadline = self._deadline(timeout)
        if prep.shared_memory:
            common.check_mode(mode)  # also when the call then falls back
            done = self._drive(self._shm.compute(prep, out, progress), deadline)
            if done is not None:  # else: this server cannot use our memory (logged once)
                result, rpc, attempts = done
                self.last_timings = common.timings(
                    rpc.trailing_metadata(), "shared_memory",
                    (time.perf_counter() - start) * 1e3, attempts)
                return result
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
            resp, call = self._compute_unary.with_call(request, timeout=t)
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

    # -- shared memory ---------------------------------------------------------------------
    def shared_array(self, shape: Sequence[int], dtype: Any = np.float32, *,
                     timeout: Optional[float] = None) -> np.ndarray:
        """An uninitialised array in one of this client's shared-memory regions: fill it and
        pass it to a `shared_memory=True` call, and it is named in place (no copy at all).
        Its region is reused once the array is garbage collected. Where the server cannot
        use this host's shared memory, a plain numpy array (and the warning of
        `similarity`)."""
        return self._drive(self._shm.shared_array(shape, dtype), self._deadline(timeout))

    def _drive(self, steps, deadline: Optional[float]):
        """Runs one of _shm's sans-I/O procedures: performs each RPC it yields (sending back
        the reply, or throwing in the simserve.Error) and returns what it returns."""
        reply: Any = None
        error: Optional[errors.Error] = None
        while True:
            try:
                op = steps.throw(error) if error is not None else steps.send(reply)
            except StopIteration as done:
                return done.value
            reply, error = None, None
            try:
                reply = self._perform(op, deadline)
            except errors.Error as e:
                error = e
            except BaseException:  # an interrupt, a cancel: the procedure cleans up, then out
                steps.close()
                raise

    def _perform(self, op: _shm.Op, deadline: Optional[float]) -> Any:
        if op.kind == "info":
            return self.info(timeout=self._remaining(deadline))
        if op.kind == "compute":
            return self._with_retries(
                lambda t: self._compute_unary.with_call(op.request, timeout=t), deadline)
        if op.kind == "unregister":  # best effort: the server may be gone already
            try:
                self._stub.SystemSharedMemoryUnregister(
                    op.request, timeout=_shm.unregister_timeout(self._remaining(deadline)))
            except Exception:  # pylint: disable=broad-except  # e.g. a closed channel
                pass
            return None
        return self._small_call_until(getattr(self._stub, op.method), op.request, deadline)


    def _small_call_until(self, method: Callable, request: Any,
                          deadline: Optional[float]) -> Any:
        resp, _, _ = self._with_retries(lambda t: (method(request, timeout=t), None), deadline)
        return resp

class Gallery(common.GalleryBase):
    """A handle to a gallery registered by `Client.register_gallery`: its name, version,
    shape and GalleryInfo (`info`), and unless released the data it was registered from.

    Use it as `client.similarity(A, gallery=g)` / `client.top_k(A, k, gallery=g)` or
    `g.similarity(A)` / `g.top_k(A, k)` (same keyword arguments). A call that finds the
    gallery gone (NOT_FOUND: the server restarted, the call reached another replica, or the
    gallery was evicted or deleted) registers the held data again under the same name and
    retries once. With `pin=True` calls send the handle's version: if the server holds
    another version of the name (someone replaced it) the call fails with
    FailedPreconditionError and nothing is re-registered; `refresh()` follows the server's
    version, `register()` puts the handle's data back. Thread-safe.
    """

    def similarity(self, a: ArrayLike, **kwargs: Any) -> np.ndarray:
        """`Client.similarity(a, gallery=self, **kwargs)`."""
        return self._client.similarity(a, gallery=self, **kwargs)

    def top_k(self, a: ArrayLike, k: int, **kwargs: Any) -> Tuple[np.ndarray, np.ndarray]:
        """`Client.top_k(a, k, gallery=self, **kwargs)`."""
        return self._client.top_k(a, k=k, gallery=self, **kwargs)

    def refresh(self, *, timeout: Optional[float] = None) -> GalleryInfo:
        """Fetches the server's GalleryInfo of this name into `info` (and so its version).
        Raises NotFoundError if the server does not hold it."""
        self.info = self._client.get_gallery(self.name, timeout=timeout)
        return self.info

    def register(self, *, timeout: Optional[float] = None) -> GalleryInfo:
        """Registers the held data again (a new version on the server); FailedPrecondition-
        Error if the handle holds none."""
        with self._thread_lock:
            self.info = self._client._register(*self._registration(),
                                               self._client._deadline(timeout))
        return self.info

    def delete(self, *, timeout: Optional[float] = None) -> GalleryInfo:
        """Deletes the gallery on the server and releases the held data."""
        info = self._client.delete_gallery(self.name, timeout=timeout)
        self.release()
        return info
