"""An in-process stand-in for the simserve server, for client-side behaviour the real server
cannot be made to show on demand: UNAVAILABLE then success (retries), malformed tile streams
(ProtocolError), the tile order the client must accept, galleries that vanish between calls
(a restart or another replica: the handle's re-registration). Its numbers are numpy's;
numerical correctness is tested against the real server (test_server.py,
test_gallery_server.py), never against this fake.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import Dict, List, Optional, Tuple

import grpc
import numpy as np

from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc


def _arr(t: pb.Tensor, raw: Optional[bytes] = None) -> np.ndarray:
    data = raw if raw is not None else t.raw
    x = np.frombuffer(data, dtype="<f4").reshape(list(t.shape))
    return x[np.newaxis] if x.ndim == 2 else x


def _dense(req: pb.ComputeRequest, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    an, bn = a.astype(np.float64), b.astype(np.float64)
    if req.metric == pb.COSINE:
        na = np.linalg.norm(an, axis=-1, keepdims=True)
        nb = np.linalg.norm(bn, axis=-1, keepdims=True)
        na[na == 0], nb[nb == 0] = 1, 1
        an, bn = an / na, bn / nb
    return np.einsum("bnd,bmd->bnm", an, bn).astype(np.float32)


def _top_k(req: pb.ComputeRequest, s: np.ndarray):
    """(values, indices) of the k largest per row (cosine/dot), or (s, None) when dense."""
    if not req.top_k:
        return s, None
    idx = np.argsort(-s, axis=-1, kind="stable")[..., :req.top_k].astype(np.int32)
    return np.take_along_axis(s, idx, axis=-1), idx


class FakeSimilarity(pb_grpc.SimilarityServicer):
    """Cosine/dot only (top-k: largest first). `fail_first` calls fail with UNAVAILABLE;
    `corrupt` drops a tile.

    Galleries: held in `galleries` (name -> (array, GalleryInfo)); `forget` > 0 makes the next
    `forget` compute calls find the store emptied first (as after a restart); `requests`
    records every ComputeRequest (upload: the header) and `upload_parts` the data fields of
    the last upload."""

    def __init__(self) -> None:
        self.fail_first = 0
        self.corrupt: Optional[str] = None  # None | "drop_tile" | "bad_length"
        self.calls: List[str] = []
        self.galleries: Dict[str, Tuple[np.ndarray, pb.GalleryInfo]] = {}
        self.versions: Dict[str, int] = {}
        self.forget = 0
        self.requests: List[pb.ComputeRequest] = []
        self.upload_parts: List[str] = []
        self.limits = pb.Limits(max_receive_message_bytes=64 << 20,
                                max_send_message_bytes=64 << 20)
        self._lock = threading.Lock()

    def _gate(self, context, name: str) -> None:
        with self._lock:
            self.calls.append(name)
            fail = self.fail_first > 0
            self.fail_first -= int(fail)
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake: draining")

    def _chunks(self, req, a, b, context):
        s, idx = _top_k(req, _dense(req, a, b))
        cols = s.shape[2]
        rows = max(1, (req.max_chunk_bytes or (1 << 20)) // (4 * cols))
        shape = list(s.shape[1:]) if len(req.a.shape) == 2 else list(s.shape)
        first = True
        for k in range(s.shape[0]):
            for r in range(0, s.shape[1], rows):
                tile = s[k, r:r + rows]
                if self.corrupt == "drop_tile" and (k, r) == (0, 0) and s.shape[1] > rows:
                    continue
                raw = tile.tobytes()
                if self.corrupt == "bad_length":
                    raw = raw[:-4]
                indices = idx[k, r:r + rows].tobytes() if idx is not None else b""
                yield pb.ComputeChunk(shape=shape if first else [], dtype=pb.FLOAT32,
                                      batch_index=k, row_offset=r, row_count=tile.shape[0],
                                      values_raw=raw, indices_raw=indices)
                first = False
        context.set_trailing_metadata((("simserve-queue-ms", "0.5"),
                                       ("simserve-compute-ms", "1.5"),
                                       ("simserve-total-ms", "2.5")))

    def _b(self, req: pb.ComputeRequest, a: np.ndarray, context,
           raw: Optional[bytes] = None) -> np.ndarray:
        """B of a request: its tensor, or the named gallery (NOT_FOUND / FAILED_PRECONDITION
        as the real server)."""
        with self._lock:
            self.requests.append(req)
            if self.forget > 0:
                self.forget -= 1
                self.galleries.clear()
            entry = self.galleries.get(req.gallery) if req.gallery else None
        if not req.gallery:
            return _arr(req.b, raw)
        if req.HasField("b"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fake: b with gallery")
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"fake: gallery '{req.gallery}' not found")
        g, info = entry
        if req.gallery_version and req.gallery_version != info.version:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"fake: gallery '{req.gallery}' is at version {info.version}")
        return np.broadcast_to(g, (a.shape[0],) + g.shape[-2:]) if g.ndim == 2 else g

    def Compute(self, request, context):
        self._gate(context, "Compute")
        a = _arr(request.a)
        s, idx = _top_k(request, _dense(request, a, self._b(request, a, context)))
        shape = list(s.shape[1:]) if len(request.a.shape) == 2 else list(s.shape)
        context.set_trailing_metadata((("simserve-total-ms", "1.25"),))
        return pb.ComputeResponse(shape=shape, dtype=pb.FLOAT32, values_raw=s.tobytes(),
                                  indices_raw=idx.tobytes() if idx is not None else b"")

    def ComputeStream(self, request, context):
        self._gate(context, "ComputeStream")
        a = _arr(request.a)
        yield from self._chunks(request, a, self._b(request, a, context), context)

    def ComputeUpload(self, request_iterator, context):
        self._gate(context, "ComputeUpload")
        header, a_parts, b_parts, kinds = None, [], [], []
        for msg in request_iterator:
            part = msg.WhichOneof("part")
            kinds.append(part)
            if part == "header":
                header = msg.header.request
            elif part == "a_data":
                a_parts.append(msg.a_data)
            else:  # A and B may interleave, as with the real server
                b_parts.append(msg.b_data)
        self.upload_parts = kinds
        a = _arr(header.a, b"".join(a_parts))
        yield from self._chunks(header, a, self._b(header, a, context, b"".join(b_parts)),
                                context)

    def RegisterGallery(self, request_iterator, context):
        self._gate(context, "RegisterGallery")
        header, parts = None, []
        for msg in request_iterator:
            if msg.WhichOneof("part") == "header":
                header = msg.header
            else:
                parts.append(msg.data)
        dtype = "<f2" if header.dtype == pb.FLOAT16 else "<f4"
        g = np.frombuffer(b"".join(parts), dtype=dtype).astype(np.float32).reshape(
            list(header.shape))
        with self._lock:
            version = self.versions.get(header.name, 0) + 1
            self.versions[header.name] = version
            info = pb.GalleryInfo(name=header.name, shape=header.shape, version=version,
                                  storage_dtype=header.storage_dtype, dtype=header.dtype,
                                  bytes=g.nbytes, source=pb.UPLOADED)
            self.galleries[header.name] = (g, info)
        return info

    def GetGallery(self, request, context):
        self._gate(context, "GetGallery")
        with self._lock:
            entry = self.galleries.get(request.name)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"fake: gallery '{request.name}' not found")
        return entry[1]

    def GetInfo(self, request, context):
        self._gate(context, "GetInfo")
        return pb.GetInfoResponse(version="fake", limits=self.limits)


class FakeServer:
    """Runs FakeSimilarity on 127.0.0.1:<ephemeral>; use as a context manager."""

    def __init__(self) -> None:
        self.servicer = FakeSimilarity()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[
            ("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)])
        pb_grpc.add_SimilarityServicer_to_server(self.servicer, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{self.port}"

    def __enter__(self) -> "FakeServer":
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None).wait()
