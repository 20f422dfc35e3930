"""An in-process stand-in for the simserve server, for client-side behaviour the real server
cannot be made to show on demand: UNAVAILABLE then success (retries), malformed tile streams
(ProtocolError), the tile order the client must accept. Its numbers are numpy's; numerical
correctness is tested against the real server (test_server.py), never against this fake.
"""

from __future__ import annotations

import threading
from concurrent import futures
from typing import List, Optional

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


class FakeSimilarity(pb_grpc.SimilarityServicer):
    """Cosine/dot only. `fail_first` calls fail with UNAVAILABLE; `corrupt` drops a tile."""

    def __init__(self) -> None:
        self.fail_first = 0
        self.corrupt: Optional[str] = None  # None | "drop_tile" | "bad_length"
        self.calls: List[str] = []
        self._lock = threading.Lock()

    def _gate(self, context, name: str) -> None:
        with self._lock:
            self.calls.append(name)
            fail = self.fail_first > 0
            self.fail_first -= int(fail)
        if fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake: draining")

    def _chunks(self, req, a, b, context):
        s = _dense(req, a, b)
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
                yield pb.ComputeChunk(shape=shape if first else [], dtype=pb.FLOAT32,
                                      batch_index=k, row_offset=r, row_count=tile.shape[0],
                                      values_raw=raw)
                first = False
        context.set_trailing_metadata((("simserve-queue-ms", "0.5"),
                                       ("simserve-compute-ms", "1.5"),
                                       ("simserve-total-ms", "2.5")))

    def Compute(self, request, context):
        self._gate(context, "Compute")
        s = _dense(request, _arr(request.a), _arr(request.b))
        shape = list(s.shape[1:]) if len(request.a.shape) == 2 else list(s.shape)
        context.set_trailing_metadata((("simserve-total-ms", "1.25"),))
        return pb.ComputeResponse(shape=shape, dtype=pb.FLOAT32, values_raw=s.tobytes())

    def ComputeStream(self, request, context):
        self._gate(context, "ComputeStream")
        yield from self._chunks(request, _arr(request.a), _arr(request.b), context)

    def ComputeUpload(self, request_iterator, context):
        self._gate(context, "ComputeUpload")
        header, a_parts, b_parts = None, [], []
        for msg in request_iterator:
            part = msg.WhichOneof("part")
            if part == "header":
                header = msg.header.request
            elif part == "a_data":
                a_parts.append(msg.a_data)
            else:  # A and B may interleave, as with the real server
                b_parts.append(msg.b_data)
        yield from self._chunks(header, _arr(header.a, b"".join(a_parts)),
                                _arr(header.b, b"".join(b_parts)), context)

    def GetInfo(self, request, context):
        self._gate(context, "GetInfo")
        return pb.GetInfoResponse(version="fake", limits=pb.Limits(
            max_receive_message_bytes=64 << 20, max_send_message_bytes=64 << 20))


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
