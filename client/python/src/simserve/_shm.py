"""System shared memory for same-host servers (`similarity(..., shared_memory=True)`).

The client owns its regions: POSIX shared-memory objects it creates in /dev/shm (mode 0600),
maps, registers with the server (SystemSharedMemoryRegister) and then unlinks at once, so
no file is left in /dev/shm even if the process dies; the server keeps its own mapping (and
so the memory) until the region is unregistered (Client.close) or the server exits. Regions
are reused across calls:

- an input region receives A and B (one copy each, unless the array already lies in one of
  this client's regions, e.g. a previous result or `shared_array()`: then it is named in
  place, no copy) and goes back to the pool when the call ends;
- an output region receives the result, written there by the server. A float32 result with
  no `out=` is returned as an array over the region itself (no copy); the region goes back to
  the pool when that array (and every view of it) is garbage collected.

This module knows nothing of gRPC: the clients register and unregister the names it hands
them, sync or async.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import mmap
import os
import secrets
import threading
import weakref
from typing import Any, Callable, Deque, Dict, Generator, List, Optional, Sequence, Tuple

import numpy as np

from simserve import _common, _wire, errors
from simserve.v1 import similarity_pb2 as pb

LOG = logging.getLogger("simserve")
SHM_DIR = "/dev/shm"
ALIGN = 64
"""Byte alignment of every tensor inside a region (a cache line; the kernels' preference)."""
MIN_REGION_BYTES = 1 << 20
MAX_IDLE_REGIONS = 4
"""Idle regions kept mapped and registered for reuse; more are unregistered."""


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Region:
    """One mapped, client-owned shared-memory object registered (or about to be) as `name`."""

    def __init__(self, name: str, size: int, generation: int) -> None:
        self.name = name
        self.key = "/" + name
        self.size = size
        self.generation = generation
        path = os.path.join(SHM_DIR, name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Allocated now, not on first touch: a full /dev/shm (64 MiB in a default
            # container) then fails here with ENOSPC instead of SIGBUS on a later write.
            os.posix_fallocate(fd, 0, size)
            self._map = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)  # the mapping keeps the object alive; the server opens it by key
        self._path: Optional[str] = path
        self.bytes = np.frombuffer(self._map, dtype=np.uint8)
        self.address = self.bytes.ctypes.data

    def owner_array(self, nbytes: int) -> np.ndarray:
        """A new uint8 array over the first `nbytes` whose base is not an ndarray (a buffer of
        the mapping): numpy then makes every view of it keep *it* alive (views of `bytes`
        would skip it), so a finalizer on it runs only when the last view is gone."""
        return np.frombuffer(self._map, dtype=np.uint8, count=nbytes)

    def unlink(self) -> None:
        """Removes the name from /dev/shm (the server opened it already, or never will)."""
        if self._path is not None:
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                pass
            self._path = None

    def ref(self, offset: int, nbytes: int) -> pb.SharedMemoryRef:
        return pb.SharedMemoryRef(region=self.name, offset=offset, byte_size=nbytes)

    def contains(self, arr: np.ndarray) -> Optional[int]:
        """The offset of a C-contiguous array lying wholly inside this region, else None."""
        start = arr.ctypes.data
        if self.address <= start and start + arr.nbytes <= self.address + self.size:
            return start - self.address
        return None


class Pool:
    """The client's regions: idle ones for reuse, and those checked out by a call or lent
    to a result array. Thread-safe; transport-free (the caller registers and unregisters)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._prefix = f"simserve-py-{secrets.token_hex(8)}"
        self._count = 0
        self._generation = 0
        self._idle: List[Region] = []
        self._busy: Dict[str, Region] = {}
        self._to_unregister: List[str] = []
        # Regions whose lent array was collected. A finalizer may run inside any allocation,
        # also while this thread holds _lock: it only appends here (atomic), and every locked
        # section takes these back first.
        self._returned: Deque[Region] = collections.deque()
        self._closed = False

    def _take_returned_locked(self) -> None:
        while self._returned:
            self._give_back_locked(self._returned.popleft())

    def take(self, nbytes: int) -> Optional[Region]:
        """The smallest idle region of at least `nbytes` and at most twice that (a small call
        does not pin a big region), checked out; None if there is none."""
        with self._lock:
            self._take_returned_locked()
            fits = [r for r in self._idle if nbytes <= r.size <= 2 * nbytes + MIN_REGION_BYTES]
            if not fits:
                return None
            region = min(fits, key=lambda r: r.size)
            self._idle.remove(region)
            self._busy[region.name] = region
            return region

    def create(self, nbytes: int) -> Region:
        """A new region (its object created and mapped, not yet registered) of at least
        `nbytes`: rounded up to whole MiB, so that similar calls share regions."""
        size = max(MIN_REGION_BYTES, -(-nbytes // MIN_REGION_BYTES) * MIN_REGION_BYTES)
        with self._lock:
            if self._closed:
                raise errors.FailedPreconditionError("the client is closed")
            self._count += 1
            name = f"{self._prefix}-{os.getpid()}-{self._count}"
            generation = self._generation
        return Region(name, size, generation)

    def adopt(self, region: Region) -> bool:
        """The server registered `region`: unlink its name, track it as checked out. False
        (and the name queued for unregistering) if the pool was closed meanwhile."""
        region.unlink()
        with self._lock:
            if self._closed:
                self._to_unregister.append(region.name)
                return False
            self._busy[region.name] = region
            return True

    @staticmethod
    def discard(region: Region) -> None:
        """Registration failed: drop the new region."""
        region.unlink()

    def give_back(self, region: Region) -> None:
        """A call is done with `region` (the server no longer uses it)."""
        with self._lock:
            self._take_returned_locked()
            self._give_back_locked(region)

    def _give_back_locked(self, region: Region) -> None:
        if self._busy.pop(region.name, None) is None:
            return
        if self._closed:
            return  # unregistered by close()
        if region.generation != self._generation:
            self._to_unregister.append(region.name)  # the server may still hold it
            return
        self._idle.append(region)
        if len(self._idle) > MAX_IDLE_REGIONS:
            evicted = min(self._idle, key=lambda r: r.size)
            self._idle.remove(evicted)
            self._to_unregister.append(evicted.name)

    def retire(self, region: Region) -> None:
        """A call that failed or was abandoned while the server may still be writing into
        `region`: never reused; unregistered (the server unmaps it once its call ends)."""
        with self._lock:
            if self._busy.pop(region.name, None) is not None and not self._closed:
                self._to_unregister.append(region.name)

    def retire_unadopted(self, region: Region) -> None:
        """A registration interrupted before its answer: the server may hold the name."""
        with self._lock:
            self._to_unregister.append(region.name)

    def lend(self, region: Region, owner: np.ndarray) -> None:
        """`owner` (a result array over `region`) keeps it checked out until collected."""
        weakref.finalize(owner, self._returned.append, region)

    def find(self, arr: np.ndarray) -> Optional[Tuple[Region, int]]:
        """A checked-out or lent region holding `arr`'s bytes, and their offset."""
        with self._lock:
            self._take_returned_locked()
            for region in self._busy.values():
                offset = region.contains(arr)
                if offset is not None and region.generation == self._generation:
                    return region, offset
        return None

    def idle_names(self) -> List[str]:
        """Names of the idle regions (after taking back collected results); diagnostics."""
        with self._lock:
            self._take_returned_locked()
            return sorted(r.name for r in self._idle)

    def pending_unregister(self) -> List[str]:
        """Names evicted, retired or stale, to unregister (best effort)."""
        with self._lock:
            self._take_returned_locked()
            names, self._to_unregister = self._to_unregister, []
            return names

    def forget_registrations(self) -> None:
        """The server lost (some of) our regions (it restarted, or someone unregistered
        them): retire the idle ones and mark the busy ones stale, so that the next calls
        register new regions (unregistering the old names is harmless where unknown)."""
        with self._lock:
            self._generation += 1
            self._to_unregister += [r.name for r in self._idle]
            self._idle.clear()

    def close(self) -> List[str]:
        """Every region the server may still hold (to unregister). Idle regions are unmapped
        when collected; lent result arrays keep their memory, now private to them."""
        with self._lock:
            self._closed = True
            names = [r.name for r in self._idle] + list(self._busy) + self._to_unregister
            self._idle, self._to_unregister = [], []
            self._returned.clear()
            return names


@dataclasses.dataclass
class SharedCall:
    """One Compute call with its tensors in shared memory: sizes what it needs, places the
    inputs (copying only those not already in a region), builds the request and turns the
    server's reply into the result (lent or copied)."""

    pool: Pool
    prep: _common.Prepared
    out: Optional[np.ndarray]
    input_region: Optional[Region] = None
    output_region: Optional[Region] = None
    # The inputs that already lie in one of our regions (region, offset), found once: a
    # concurrent forget_registrations must not change the plan half-way.
    in_place: Dict[str, Tuple[Region, int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        # A copied result (out=, a half dtype) is checked before any RPC (a wrong out=).
        self._assembler = None if self.lends_result() else _common.Assembler(self.prep, None,
                                                                             self.out)
        for which in ("a", "b"):
            arr = getattr(self.prep, which)
            hit = self.pool.find(arr) if arr is not None else None
            if hit is not None:
                self.in_place[which] = hit

    def region_names(self) -> List[str]:
        """Every region the request names."""
        names = {region.name for region, _ in self.in_place.values()}
        names.update(r.name for r in (self.input_region, self.output_region) if r is not None)
        return sorted(names)

    def input_bytes(self) -> int:
        """Bytes of input region needed (0 when every input already lies in a region)."""
        return sum(_aligned(getattr(self.prep, w).nbytes) for w in ("a", "b")
                   if getattr(self.prep, w) is not None and w not in self.in_place)

    def output_bytes(self) -> int:
        spec = self.prep.spec
        return _aligned(spec.values_bytes) + spec.indices_bytes

    def request_bytes(self) -> bytes:
        """Copies the inputs not yet in shared memory into the input region and serialises
        the ComputeRequest that names every tensor by region."""
        prep = self.prep
        req = prep.request(with_data=False)
        in_place = self.in_place
        offset = 0
        for which in ("a", "b"):
            arr = getattr(prep, which)
            if arr is None:
                continue
            tensor = getattr(req, which)
            if which in in_place:
                region, at = in_place[which]
            else:
                region, at = self.input_region, offset
                np.copyto(region.bytes[at:at + arr.nbytes], arr.reshape(-1).view(np.uint8))
                offset += _aligned(arr.nbytes)
            tensor.shared_memory.CopyFrom(region.ref(at, arr.nbytes))
        spec = prep.spec
        req.values_shared_memory.CopyFrom(self.output_region.ref(0, spec.values_bytes))
        if spec.indices_bytes:
            req.indices_shared_memory.CopyFrom(
                self.output_region.ref(_aligned(spec.values_bytes), spec.indices_bytes))
        return req.SerializeToString()

    def lends_result(self) -> bool:
        return self.out is None and self.prep.options.output_dtype == pb.FLOAT32

    def result(self, response: _wire.ChunkView):
        """The result from the output region: an array over it (lent until collected) for a
        float32 result without `out=`, else copied (and widened) by an Assembler."""
        prep, spec, region = self.prep, self.prep.spec, self.output_region
        if len(response.values_raw) or len(response.indices_raw):
            raise errors.ProtocolError("the server sent result bytes for a shared-memory result")
        view = _wire.ChunkView()
        view.shape, view.dtype = response.shape, response.dtype
        view.values_raw = memoryview(region.bytes[:spec.values_bytes])
        idx_at = _aligned(spec.values_bytes)
        view.indices_raw = memoryview(region.bytes[idx_at:idx_at + spec.indices_bytes])
        if self._assembler is not None:
            self._assembler.set_response(view)
            return self._assembler.result()
        if list(response.shape) != list(spec.shape) or response.dtype != pb.FLOAT32:
            raise errors.ProtocolError(
                f"server result shape {list(response.shape)} dtype {response.dtype}, expected "
                f"{list(spec.shape)} float32")
        # One base array over the result bytes; values/indices are views of it, so the
        # region is given back only when both (and their views) are gone.
        base = region.owner_array(idx_at + spec.indices_bytes)
        values = base[:spec.values_bytes].view(np.float32).reshape(spec.shape)
        self.pool.lend(region, base)
        self.output_region = None  # lent: not given back when the call ends
        if spec.indices_bytes:
            return values, base[idx_at:].view(np.int32).reshape(spec.shape)
        return values

    def release(self, retire: bool) -> None:
        """Gives back the regions this call checked out and did not lend; `retire`: the call
        failed in a way that may leave the server writing into them (a deadline, a cancel,
        an interrupt), so they are never reused but unregistered."""
        for region in (self.input_region, self.output_region):
            if region is not None:
                (self.pool.retire if retire else self.pool.give_back)(region)
        self.input_region = self.output_region = None


def available() -> Optional[str]:
    """None when this host can create POSIX shared memory, else why not."""
    if not os.path.isdir(SHM_DIR) or not os.access(SHM_DIR, os.W_OK):
        return f"{SHM_DIR} is not a writable directory on this host"
    return None


UNREGISTER_TIMEOUT_S = 5.0


def unregister_timeout(remaining: Optional[float]) -> float:
    """A best-effort unregister's timeout: 5 s, or less when the call's deadline is closer."""
    if remaining is None:
        return UNREGISTER_TIMEOUT_S
    return max(0.05, min(UNREGISTER_TIMEOUT_S, remaining))
_NOT_THIS_SERVER = ("NOT_FOUND", "INVALID_ARGUMENT", "FAILED_PRECONDITION",
                    "PERMISSION_DENIED", "UNIMPLEMENTED")


REJECTED_BEFORE_COMPUTE = ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION",
                           "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "PERMISSION_DENIED",
                           "ALREADY_EXISTS", "OUT_OF_RANGE", "UNIMPLEMENTED")
"""Compute failures the server reports before it computes (validation, admission): the
call's regions can be reused. Any other failure retires them."""
UNKNOWN_REGION = "unknown shared memory region"
"""What the server's message says when a call names a region it does not hold."""


def means_not_this_server(err: errors.Error) -> bool:
    """A registration failure that says this server cannot use our memory: another host
    (NOT_FOUND: no such object there), another user (permission), the flag off, an old
    server. Such a client falls back to the byte path for good."""
    return err.code.name in _NOT_THIS_SERVER


def register_request(region: Region) -> pb.SystemSharedMemoryRegisterRequest:
    return pb.SystemSharedMemoryRegisterRequest(name=region.name, key=region.key, offset=0,
                                                byte_size=region.size)


def fallback_message(target: str, why: str) -> str:
    return (f"simserve: shared_memory=True, but {why}; sending the tensors over gRPC instead "
            f"(server {target})")


# -- the clients' procedures, written once for the blocking and the asyncio client ----------
# Each is a generator that yields the RPCs it needs as Op values; the client performs each one
# (sync or awaited) and sends back the reply, or throws in the simserve.Error it raised.


@dataclasses.dataclass(frozen=True)
class Op:
    """One RPC a procedure needs: kind "info" (GetInfo; the client's cached Info back),
    "compute" (Compute with serialised `request`; (response, call, attempts) back), "rpc"
    (the stub method `method` with `request`; its response back) or "unregister"
    (best effort; None back)."""

    kind: str
    request: Any = None
    method: str = ""


Steps = Generator[Op, Any, Any]
_ALL: "weakref.WeakSet[SharedMemory]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    """A forked child must not share the parent's regions (they are MAP_SHARED: both would
    write into them) nor unregister them: every client's state starts afresh."""
    for state in list(_ALL):
        state._reset()  # pylint: disable=protected-access


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class SharedMemory:
    """A client's shared-memory state: its region pool, or why the server cannot use this
    host's memory (decided once per client, logged once). Thread-safe. A forked child
    starts afresh (its own regions; the parent's mappings it inherited are left alone)."""

    def __init__(self, target: str) -> None:
        self._target = target
        self._reset()
        _ALL.add(self)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._pool: Optional[Pool] = None
        self._unusable: Optional[str] = None

    def _give_up(self, why: str) -> Optional[Pool]:
        """Falls back for good (warns once); returns the pool to retire, if any."""
        with self._lock:
            first = self._unusable is None
            self._unusable = why
            pool, self._pool = self._pool, None
        if first:
            LOG.warning(fallback_message(self._target, why))
        return pool

    def _pool_steps(self) -> Steps:
        """-> the pool, or None when this server cannot use our memory."""
        with self._lock:
            if self._unusable is not None:
                return None
            if self._pool is not None:
                return self._pool
        why = available()
        if why is None:
            info = yield Op("info")
            if not info.raw.shared_memory:
                why = "the server does not allow it (start it with --allow_shared_memory)"
        if why is not None:
            self._give_up(why)
            return None
        with self._lock:
            if self._pool is None and self._unusable is None:
                self._pool = Pool()
            return self._pool

    def _give_up_steps(self, why: str) -> Steps:
        """Falls back for good and unregisters what the server may hold (best effort)."""
        pool = self._give_up(why)
        for name in pool.close() if pool is not None else ():
            yield Op("unregister", pb.SystemSharedMemoryUnregisterRequest(name=name))

    def _region_steps(self, pool: Pool, nbytes: int) -> Steps:
        """-> a registered region of at least `nbytes` (reused or new), or None (logged) when
        the server will not register one: the call then goes over gRPC."""
        region = pool.take(nbytes)
        if region is not None:
            return region
        try:
            region = pool.create(nbytes)
        except OSError as e:  # e.g. ENOSPC: /dev/shm too small for this call
            LOG.warning(fallback_message(
                self._target, f"no {nbytes}-byte region could be created in {SHM_DIR} ({e})"))
            return None
        try:
            yield Op("rpc", register_request(region), "SystemSharedMemoryRegister")
        except errors.Error as e:
            pool.discard(region)
            if e.code.name == "ALREADY_EXISTS":  # a retried registration that had succeeded:
                return region if pool.adopt(region) else None  # the name is ours (random)
            if means_not_this_server(e):
                yield from self._give_up_steps(f"it cannot map this host's memory ({e})")
                return None
            if e.code.name == "RESOURCE_EXHAUSTED":  # the server's region limit: this call only
                LOG.warning(fallback_message(self._target, str(e)))
                return None
            raise
        except BaseException:  # interrupted: the server may hold it; never leave the file
            pool.discard(region)
            pool.retire_unadopted(region)
            raise
        return region if pool.adopt(region) else None

    def compute(self, prep: Any, out: Optional[np.ndarray],
                progress: Optional[Callable[[int, int], None]]) -> Steps:
        """One Compute through shared memory -> (result, call, attempts), or None when it
        must go over gRPC instead. A server that lost our regions (it restarted; the call
        fails as naming an unknown region) gets new ones, once. After a failure that may
        leave the server writing into the call's regions (deadline, cancel, interrupt) they
        are retired, never reused."""
        for retry in (False, True):
            pool = yield from self._pool_steps()
            if pool is None:
                return None
            for name in pool.pending_unregister():
                yield Op("unregister", pb.SystemSharedMemoryUnregisterRequest(name=name))
            call = SharedCall(pool, prep, out)
            settled = False  # the server is certainly done with the call's regions
            try:
                if call.input_bytes():
                    call.input_region = yield from self._region_steps(pool, call.input_bytes())
                    if call.input_region is None:
                        settled = True
                        return None
                call.output_region = yield from self._region_steps(pool, call.output_bytes())
                if call.output_region is None:
                    settled = True
                    return None
                try:
                    resp, rpc, attempts = yield Op("compute", call.request_bytes())
                except errors.Error as e:
                    settled = e.code.name in REJECTED_BEFORE_COMPUTE
                    if e.code.name == "FAILED_PRECONDITION" and "shared memory" in e.details:
                        # A server restarted without --allow_shared_memory.
                        call.release(retire=True)
                        yield from self._give_up_steps(f"the server refused it ({e})")
                        return None
                    if (retry or not isinstance(e, (errors.NotFoundError,
                                                    errors.InvalidArgumentError))
                            or UNKNOWN_REGION not in e.details
                            or not (yield from self._lost_steps(call))):
                        raise
                    pool.forget_registrations()
                    continue
                result = call.result(resp)
                settled = True
            finally:
                call.release(retire=not settled)
            if progress is not None:
                total = prep.out_shape[0] * prep.out_shape[1]
                progress(total, total)
            return result, rpc, attempts
        raise AssertionError("unreachable")

    @staticmethod
    def _lost_steps(call: "SharedCall") -> Steps:
        """-> whether the server no longer knows a region this call named (the call then
        failed with "unknown shared memory region"); False if that cannot be told."""
        for name in call.region_names():
            try:
                yield Op("rpc", pb.SystemSharedMemoryStatusRequest(name=name),
                         "SystemSharedMemoryStatus")
            except errors.NotFoundError:
                return True
            except errors.Error:
                return False
        return False

    def shared_array(self, shape: Sequence[int], dtype: Any) -> Steps:
        """-> an uninitialised array in a registered region (lent to it), or a plain numpy
        array where the server cannot use our memory."""
        dtype = np.dtype(dtype)
        shape = tuple(np.atleast_1d(np.asarray(shape, dtype=np.int64)).tolist())
        if min(shape, default=0) < 0:
            raise errors.InvalidArgumentError(f"shared_array: negative dimension in {shape}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        pool = yield from self._pool_steps()
        region = (yield from self._region_steps(pool, nbytes)) if pool is not None else None
        if region is None:
            return np.empty(shape, dtype=dtype)
        base = region.owner_array(nbytes)
        pool.lend(region, base)
        return base.view(dtype).reshape(shape)

    def close(self) -> Steps:
        """Unregisters every region the server may hold for us (best effort)."""
        with self._lock:
            pool, self._pool = self._pool, None
            self._unusable = self._unusable or "the client is closed"
        for name in pool.close() if pool is not None else ():
            yield Op("unregister", pb.SystemSharedMemoryUnregisterRequest(name=name))
