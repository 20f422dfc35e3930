"""Error statuses of ModelInfer through tritonclient.grpc (InferenceServerException.status())
and the raw generated stub: an unknown model or version is NOT_FOUND; a wrong datatype, a shape
mismatch, NaN/Inf, an unknown or badly typed parameter, a missing/unknown/duplicate input or
output are INVALID_ARGUMENT. After every case the server still answers a valid request with
the right result (assert_serving). Triton's own parameters (sequence_*, priority, timeout) are
ignored.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from helpers import (as64, assert_serving, dense_reference, fp32_tolerance, infer_input,
                     random_pair, status_of)


def pair(rng, **kw):
    a, b = random_pair(rng, 0, n=3, m=4, d=8, **kw)
    return [infer_input("A", a), infer_input("B", b)]


@pytest.mark.parametrize("model,version", [("nope", ""), ("cosine", "2"), ("COSINE", "")])
def test_unknown_model_or_version_is_not_found(client, rng, model, version):
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(model, pair(rng), model_version=version)
    assert status_of(excinfo) == "NOT_FOUND"
    assert model in excinfo.value.message()
    assert_serving(client)


def test_version_one_is_accepted(client, rng):
    a, b = random_pair(rng, 0, n=2, m=3, d=4)
    result = client.infer("dot", [infer_input("A", a), infer_input("B", b)], model_version="1")
    ref = dense_reference("dot", a, b)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


@pytest.mark.parametrize("numpy_dtype", [np.float64, np.int32, np.uint8])
def test_unsupported_datatype(client, rng, numpy_dtype):
    """FP64 / INT32 / UINT8 inputs: INVALID_ARGUMENT naming the datatype."""
    a = (rng.standard_normal((3, 8)) * 10).astype(numpy_dtype)
    b = (rng.standard_normal((4, 8)) * 10).astype(np.float32)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("cosine", [infer_input("A", a), infer_input("B", b)])
    assert status_of(excinfo) == "INVALID_ARGUMENT"
    assert "datatype" in excinfo.value.message()
    assert_serving(client)


def test_mixed_datatypes_are_invalid_or_exact(client, rng):
    """A FP16 with B FP32: either refused (INVALID_ARGUMENT) or computed exactly; never a
    wrong answer."""
    a, _ = random_pair(rng, 0, n=3, m=4, d=8, datatype="FP16")
    _, b = random_pair(rng, 0, n=3, m=4, d=8, datatype="FP32")
    try:
        result = client.infer("dot", [infer_input("A", a), infer_input("B", b)])
    except InferenceServerException as exc:
        assert status_of(exc) == "INVALID_ARGUMENT"
    else:
        ref = dense_reference("dot", a, b)
        np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))
    assert_serving(client)


@pytest.mark.parametrize("shape_a,shape_b", [
    ((3, 8), (4, 7)),          # D differs
    ((2, 3, 8), (3, 4, 8)),    # batch differs
    ((2, 3, 8), (4, 8)),       # 3D with 2D
    ((8,), (8,)),              # 1D
    ((1, 2, 3, 8), (1, 2, 4, 8)),  # 4D
    ((0, 8), (4, 8)),          # no rows
    ((3, 0), (4, 0)),          # D = 0
], ids=["d", "batch", "rank-mix", "1d", "4d", "n0", "d0"])
def test_shape_mismatch(client, rng, shape_a, shape_b):
    a = rng.standard_normal(shape_a).astype(np.float32)
    b = rng.standard_normal(shape_b).astype(np.float32)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("euclidean", [infer_input("A", a), infer_input("B", b)])
    assert status_of(excinfo) == "INVALID_ARGUMENT"
    assert_serving(client)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", ["A", "B"])
def test_non_finite_input(client, rng, bad, where):
    a, b = random_pair(rng, 0, n=3, m=4, d=8)
    (a if where == "A" else b)[1, 5] = bad
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("dot", [infer_input("A", a), infer_input("B", b)])
    assert status_of(excinfo) == "INVALID_ARGUMENT"
    assert "NaN or Inf" in excinfo.value.message()
    assert_serving(client)


def test_non_finite_fp16_input(client, rng):
    a, b = random_pair(rng, 0, n=3, m=4, d=8, datatype="FP16")
    b[0, 0] = np.float16(np.inf)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("cosine", [infer_input("A", a), infer_input("B", b)])
    assert status_of(excinfo) == "INVALID_ARGUMENT"
    assert_serving(client)


@pytest.mark.parametrize("parameters", [
    {"bogus": 1},
    {"metric": "dot"},             # gallery models only
    {"top_k": -1},
    {"top_k": "3"},
    {"top_k": True},
    {"top_k": 1.5},
    {"top_k": 5},                  # > M = 4
    {"precision": "FP64"},
    {"precision": 1},
    {"output_dtype": "INT8"},
    {"output_dtype": "fp16"},
    {"epsilon": "abc"},
    {"epsilon": -1.0},
], ids=lambda p: "-".join(f"{k}={v!r}" for k, v in p.items()))
def test_bad_parameter(client, rng, parameters):
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("cosine", pair(rng), parameters=parameters)
    assert status_of(excinfo) == "INVALID_ARGUMENT", excinfo.value.message()
    assert_serving(client)


def test_triton_parameters_are_ignored(client, rng):
    """sequence_id/start/end, priority and timeout (set by tritonclient itself) change
    nothing."""
    a, b = random_pair(rng, 0, n=3, m=4, d=8)
    result = client.infer("cosine", [infer_input("A", a), infer_input("B", b)],
                          sequence_id=7, sequence_start=True, sequence_end=True, priority=2,
                          timeout=5_000_000)
    ref = dense_reference("cosine", a, b)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


@pytest.mark.parametrize("names", [("A",), ("B",), ("A", "C"), ("A", "A"), ("A", "B", "C")])
def test_bad_input_names(client, rng, names):
    """A missing input, an unknown one, A twice."""
    a = rng.standard_normal((3, 8)).astype(np.float32)
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("dot", [infer_input(name, a) for name in names])
    assert status_of(excinfo) == "INVALID_ARGUMENT"
    assert_serving(client)


@pytest.mark.parametrize("outputs,parameters", [
    (["X"], {}),
    (["VALUES"], {}),             # top-k outputs without top_k
    (["S"], {"top_k": 2}),        # dense output with top_k
    (["S", "S"], {}),
    (["INDICES", "INDICES"], {"top_k": 2}),
], ids=["unknown", "values-dense", "s-topk", "s-twice", "indices-twice"])
def test_bad_outputs(client, rng, outputs, parameters):
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer("cosine", pair(rng),
                     outputs=[grpcclient.InferRequestedOutput(n) for n in outputs],
                     parameters=parameters)
    assert status_of(excinfo) == "INVALID_ARGUMENT"
    assert_serving(client)


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def raw_request(a_bytes: bytes, b_bytes: bytes, extra=()) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="cosine")
    request.inputs.add(name="A", datatype="FP32", shape=[3, 4])
    request.inputs.add(name="B", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.extend([a_bytes, b_bytes, *extra])
    return request


@pytest.mark.parametrize("case", ["a-short", "b-long", "extra-raw", "missing-raw"])
def test_raw_contents_mismatch(client, stub, case):
    """raw_input_contents whose byte size disagrees with the shape, or with one entry too many
    or too few."""
    a = np.ones((3, 4), np.float32).tobytes()
    b = np.ones((2, 4), np.float32).tobytes()
    request = {
        "a-short": lambda: raw_request(a[:-4], b),
        "b-long": lambda: raw_request(a, b + b"\0\0\0\0"),
        "extra-raw": lambda: raw_request(a, b, [b]),
        "missing-raw": lambda: raw_request(a, b)
    }[case]()
    if case == "missing-raw":
        del request.raw_input_contents[1]
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfer(request, timeout=30)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_serving(client)


def test_typed_contents_wrong_count(client, stub):
    request = service_pb2.ModelInferRequest(model_name="dot")
    for name, count in (("A", 7), ("B", 8)):  # A's shape [2, 4] needs 8 values
        tensor = request.inputs.add(name=name, datatype="FP32", shape=[2, 4])
        tensor.contents.fp32_contents.extend([1.0] * count)
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfer(request, timeout=30)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_serving(client)
