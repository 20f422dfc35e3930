"""simserve.v1.similarity_pb2 / _pb2_grpc, built at import time from the proto's descriptor set
(simserve._protoload), offer what protoc's gencode offers, on whatever protobuf / grpcio this
venv runs (CTest runs the suite at both ends of the supported range), and leave protobuf's
default descriptor pool alone."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, text_format

from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO = os.path.join(ROOT, "proto", "simserve", "v1", "similarity.proto")


def _proto_text():
    with open(PROTO) as f:
        return f.read()


def test_every_message_enum_and_value_is_a_module_attribute():
    text = _proto_text()
    for name in re.findall(r"^message (\w+)", text, re.M):
        cls = getattr(pb, name)
        assert cls.DESCRIPTOR.full_name == f"simserve.v1.{name}"
        assert cls.__module__ == "simserve.v1.similarity_pb2"
    for name in re.findall(r"^enum (\w+)", text, re.M):
        wrapper = getattr(pb, name)
        for value in wrapper.DESCRIPTOR.values:
            assert getattr(pb, value.name) == value.number == wrapper.Value(value.name)
            assert wrapper.Name(value.number) == value.name
    assert pb.DESCRIPTOR.name == "simserve/v1/similarity.proto"
    assert pb.DESCRIPTOR.package == "simserve.v1"
    assert pb.DataType.keys() == ["FLOAT32", "BFLOAT16", "FLOAT16"]
    # Nested messages as class attributes, as in gencode.
    assert pb.SystemSharedMemoryStatusResponse.RegionStatus.DESCRIPTOR.full_name == \
        "simserve.v1.SystemSharedMemoryStatusResponse.RegionStatus"


def test_messages_round_trip_through_every_format():
    req = pb.ComputeRequest(a=pb.Tensor(shape=[2, 3], dtype=pb.BFLOAT16, raw=b"\x01" * 12),
                            b=pb.Tensor(shape=[4, 3], values=pb.FloatValues(values=[1.5] * 12)),
                            metric=pb.DOT, top_k=2, gallery_version=-7)
    assert pb.ComputeRequest.FromString(req.SerializeToString()) == req
    assert req.b.WhichOneof("data") == "values"
    assert text_format.Parse(text_format.MessageToString(req), pb.ComputeRequest()) == req
    assert json_format.Parse(json_format.MessageToJson(req), pb.ComputeRequest()) == req
    assert pickle.loads(pickle.dumps(req)) == req
    status = pb.SystemSharedMemoryStatusResponse()
    status.regions["r"].byte_size = 64
    assert pb.SystemSharedMemoryStatusResponse.FromString(
        status.SerializeToString()).regions["r"].byte_size == 64
    with pytest.raises(ValueError):
        pb.Metric.Value("NOPE")


def test_not_in_the_default_pool_in_a_fresh_process():
    """Importing the client registers nothing in protobuf's default pool: neither its own file
    nor (ever) the repository's inference/*.proto, which tritonclient registers there."""
    code = ("import simserve, simserve.aio, simserve.v1.similarity_pb2_grpc as g\n"
            "from google.protobuf import descriptor_pool\n"
            "pool = descriptor_pool.Default()\n"
            "for f in ('simserve/v1/similarity.proto', 'inference/grpc_service.proto',\n"
            "          'grpc_service.proto', 'model_config.proto'):\n"
            "    try:\n"
            "        pool.FindFileByName(f); print('registered', f)\n"
            "    except KeyError:\n"
            "        pass\n"
            "for m in ('simserve.v1.ComputeRequest', 'inference.ModelInferRequest'):\n"
            "    try:\n"
            "        pool.FindMessageTypeByName(m); print('registered', m)\n"
            "    except KeyError:\n"
            "        pass\n"
            "print('ok')\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["ok"]
    assert pb.DESCRIPTOR.pool is not descriptor_pool.Default()


def test_stub_and_servicer_cover_every_rpc_with_its_streaming_kind():
    rpcs = re.findall(r"^\s*rpc (\w+)\((stream )?\w+\)\s*returns \((stream )?\w+\)",
                      _proto_text(), re.M)
    assert len(rpcs) == 11
    kinds = {"unary_unary": grpc.UnaryUnaryMultiCallable,
             "unary_stream": grpc.UnaryStreamMultiCallable,
             "stream_unary": grpc.StreamUnaryMultiCallable,
             "stream_stream": grpc.StreamStreamMultiCallable}
    with grpc.insecure_channel("127.0.0.1:1") as channel:
        stub = pb_grpc.SimilarityStub(channel)
        for name, client_stream, server_stream in rpcs:
            kind = ("stream" if client_stream else "unary") + "_" + \
                   ("stream" if server_stream else "unary")
            assert isinstance(getattr(stub, name), kinds[kind]), name
            assert callable(getattr(pb_grpc.SimilarityServicer, name))


def test_servicer_serves_and_defaults_to_unimplemented():
    class Impl(pb_grpc.SimilarityServicer):
        def GetInfo(self, request, context):  # noqa: N802
            return pb.GetInfoResponse(version="fake", metrics=[pb.DOT])

        def ComputeUpload(self, requests, context):  # noqa: N802
            for r in requests:
                yield pb.ComputeChunk(row_count=len(r.a_data))

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SimilarityServicer_to_server(Impl(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SimilarityStub(channel)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            assert info.version == "fake" and list(info.metrics) == [pb.DOT]
            chunks = list(stub.ComputeUpload(
                iter([pb.UploadRequest(a_data=b"abc"), pb.UploadRequest(a_data=b"de")]),
                timeout=10))
            assert [c.row_count for c in chunks] == [3, 2]
            with pytest.raises(grpc.RpcError) as err:
                stub.ListGalleries(pb.ListGalleriesRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)
