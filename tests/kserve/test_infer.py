"""ModelInfer through tritonclient.grpc against the real server: dense results of every metric
model for every input datatype (FP32, FP16, BF16) in 2D and 3D, typed contents
(fp32_contents, a hand-built ModelInferRequest sent on the generated stub), top-k VALUES and
INT32 INDICES, and the parameters precision, output_dtype and epsilon. Every result is checked
against float64 numpy / scikit-learn computed from the exact values sent.
"""

from __future__ import annotations

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc

from helpers import (LARGEST_FIRST, METRICS, WIRE_DTYPES, as64, dense_reference,
                     fp32_tolerance, infer_input, output_shape, random_pair, rounded_tolerance,
                     top_k_reference)


@pytest.mark.parametrize("batch", [0, 2], ids=["2d", "3d"])
@pytest.mark.parametrize("datatype", list(WIRE_DTYPES))
@pytest.mark.parametrize("metric", METRICS)
def test_dense(client, rng, metric, datatype, batch):
    """S for each model x datatype x rank. FP16/BF16 inputs are widened exactly by the server
    and computed in float32, so the reference (from the same rounded values) holds to float32
    accuracy."""
    a, b = random_pair(rng, batch, n=5, m=7, d=24, datatype=datatype)
    result = client.infer(metric, [infer_input("A", a), infer_input("B", b)],
                          outputs=[grpcclient.InferRequestedOutput("S")])
    response = result.get_response()
    assert response.model_name == metric and response.model_version == "1"
    out = result.get_output("S")
    assert out.datatype == "FP32"
    assert list(out.shape) == output_shape(a, b)
    s = result.as_numpy("S")
    assert s.dtype == np.float32 and list(s.shape) == output_shape(a, b)
    ref = dense_reference(metric, a, b)
    np.testing.assert_allclose(as64(s), ref, **fp32_tolerance(ref))


def test_outputs_default_to_all(client, rng):
    """No requested outputs: dense S only (top_k = 0), raw_output_contents, request id echoed."""
    a, b = random_pair(rng, 0, 3, 4, 8)
    result = client.infer("cosine", [infer_input("A", a), infer_input("B", b)], request_id="r-7")
    response = result.get_response()
    assert response.id == "r-7"
    assert [o.name for o in response.outputs] == ["S"]
    assert len(response.raw_output_contents) == 1
    ref = dense_reference("cosine", a, b)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


def typed_request(model: str, a: np.ndarray, b: np.ndarray) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest with both inputs as contents.fp32_contents (no raw contents):
    tritonclient.grpc always sends raw, so typed contents are built by hand."""
    request = service_pb2.ModelInferRequest(model_name=model, id="typed")
    for name, array in (("A", a), ("B", b)):
        tensor = request.inputs.add(name=name, datatype="FP32", shape=list(array.shape))
        tensor.contents.fp32_contents.extend(array.ravel().tolist())
    return request


@pytest.fixture()
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@pytest.mark.parametrize("batch", [0, 2], ids=["2d", "3d"])
@pytest.mark.parametrize("metric", METRICS)
def test_typed_fp32_contents(stub, rng, metric, batch):
    a, b = random_pair(rng, batch, n=4, m=6, d=16)
    response = stub.ModelInfer(typed_request(metric, a, b), timeout=30)
    assert response.id == "typed"
    assert [o.name for o in response.outputs] == ["S"]
    assert response.outputs[0].datatype == "FP32"
    assert list(response.outputs[0].shape) == output_shape(a, b)
    s = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(output_shape(a, b))
    ref = dense_reference(metric, a, b)
    np.testing.assert_allclose(as64(s), ref, **fp32_tolerance(ref))


def test_typed_and_raw_mixed(stub, rng):
    """A as fp32_contents, B in raw_input_contents (the raw entries go to the inputs that carry
    neither contents nor a region)."""
    a, b = random_pair(rng, 0, n=3, m=5, d=12)
    request = service_pb2.ModelInferRequest(model_name="dot")
    tensor = request.inputs.add(name="A", datatype="FP32", shape=list(a.shape))
    tensor.contents.fp32_contents.extend(a.ravel().tolist())
    request.inputs.add(name="B", datatype="FP32", shape=list(b.shape))
    request.raw_input_contents.append(b.tobytes())
    response = stub.ModelInfer(request, timeout=30)
    s = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(3, 5)
    ref = dense_reference("dot", a, b)
    np.testing.assert_allclose(as64(s), ref, **fp32_tolerance(ref))


def test_typed_contents_rejected_for_fp16(stub):
    """Typed contents are FP32-only (README): FP16 with fp32_contents is INVALID_ARGUMENT."""
    request = service_pb2.ModelInferRequest(model_name="cosine")
    for name in ("A", "B"):
        tensor = request.inputs.add(name=name, datatype="FP16", shape=[1, 2])
        tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfer(request, timeout=30)
    assert excinfo.value.code() == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("batch", [0, 3], ids=["2d", "3d"])
@pytest.mark.parametrize("metric", METRICS)
def test_top_k(client, rng, metric, batch):
    """VALUES (FP32) and INDICES (INT32) against numpy argsort of the float64 reference;
    random normal data, so there are no ties."""
    k = 4
    a, b = random_pair(rng, batch, n=6, m=40, d=20)
    result = client.infer(metric, [infer_input("A", a), infer_input("B", b)],
                          outputs=[grpcclient.InferRequestedOutput("VALUES"),
                                   grpcclient.InferRequestedOutput("INDICES")],
                          parameters={"top_k": k})
    assert result.get_output("VALUES").datatype == "FP32"
    assert result.get_output("INDICES").datatype == "INT32"
    values, indices = result.as_numpy("VALUES"), result.as_numpy("INDICES")
    assert indices.dtype == np.int32
    assert list(values.shape) == list(indices.shape) == output_shape(a, b, k)
    want_values, want_indices = top_k_reference(metric, dense_reference(metric, a, b), k)
    np.testing.assert_array_equal(indices, want_indices)
    np.testing.assert_allclose(as64(values), want_values, **fp32_tolerance(want_values))
    order = np.diff(as64(values), axis=-1)
    assert np.all(order <= 0) if metric in LARGEST_FIRST else np.all(order >= 0)


def test_top_k_default_outputs_and_k_equal_m(client, rng):
    """top_k without requested outputs returns VALUES then INDICES; k = M ranks every column
    (k > M is INVALID_ARGUMENT: test_errors.py)."""
    a, b = random_pair(rng, 0, n=2, m=5, d=8)
    result = client.infer("euclidean", [infer_input("A", a), infer_input("B", b)],
                          parameters={"top_k": 5})
    assert [o.name for o in result.get_response().outputs] == ["VALUES", "INDICES"]
    want_values, want_indices = top_k_reference("euclidean",
                                                dense_reference("euclidean", a, b), 5)
    np.testing.assert_array_equal(result.as_numpy("INDICES"), want_indices)
    np.testing.assert_allclose(as64(result.as_numpy("VALUES")), want_values,
                               **fp32_tolerance(want_values))


def test_top_k_only_indices(client, rng):
    a, b = random_pair(rng, 2, n=3, m=12, d=8)
    result = client.infer("dot", [infer_input("A", a), infer_input("B", b)],
                          outputs=[grpcclient.InferRequestedOutput("INDICES")],
                          parameters={"top_k": 3})
    assert [o.name for o in result.get_response().outputs] == ["INDICES"]
    _, want_indices = top_k_reference("dot", dense_reference("dot", a, b), 3)
    np.testing.assert_array_equal(result.as_numpy("INDICES"), want_indices)


@pytest.mark.parametrize("metric", METRICS)
def test_precision_bf16(client, rng, metric):
    """precision BF16 computes with bf16-rounded operands (or float32 where the CPU has no
    bf16 matmul). Loose tolerance: bf16 keeps 8 significant bits, so each product is off by
    up to 2^-8 relative; over D = 32 terms that stays well inside 3% of the result's scale."""
    a, b = random_pair(rng, 2, n=4, m=6, d=32)
    result = client.infer(metric, [infer_input("A", a), infer_input("B", b)],
                          parameters={"precision": "BF16"})
    ref = dense_reference(metric, a, b)
    scale = max(1.0, float(np.abs(ref).max()))
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, rtol=0.03, atol=0.03 * scale)


def test_precision_fp32_explicit(client, rng):
    a, b = random_pair(rng, 0, n=3, m=4, d=16)
    result = client.infer("cosine", [infer_input("A", a), infer_input("B", b)],
                          parameters={"precision": "FP32"})
    ref = dense_reference("cosine", a, b)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


@pytest.mark.parametrize("output_dtype,mantissa_bits,numpy_dtype",
                         [("FP16", 10, np.float16), ("BF16", 7, ml_dtypes.bfloat16),
                          ("FP32", 23, np.float32)])
@pytest.mark.parametrize("metric", METRICS)
def test_output_dtype(client, rng, metric, output_dtype, mantissa_bits, numpy_dtype):
    """output_dtype FP16/BF16: S arrives in that datatype (as_numpy gives float16 /
    ml_dtypes.bfloat16), equal to the reference within half an ulp of the format."""
    a, b = random_pair(rng, 0, n=4, m=5, d=16)
    result = client.infer(metric, [infer_input("A", a), infer_input("B", b)],
                          parameters={"output_dtype": output_dtype})
    assert result.get_output("S").datatype == output_dtype
    s = result.as_numpy("S")
    assert s.dtype == numpy_dtype
    ref = dense_reference(metric, a, b)
    np.testing.assert_allclose(as64(s), ref, **rounded_tolerance(ref, mantissa_bits))


def test_output_dtype_top_k_values(client, rng):
    """output_dtype applies to VALUES; INDICES stay INT32."""
    a, b = random_pair(rng, 0, n=3, m=20, d=16)
    result = client.infer("cosine", [infer_input("A", a), infer_input("B", b)],
                          parameters={"top_k": 3, "output_dtype": "FP16"})
    assert result.get_output("VALUES").datatype == "FP16"
    assert result.get_output("INDICES").datatype == "INT32"
    want_values, want_indices = top_k_reference("cosine", dense_reference("cosine", a, b), 3)
    np.testing.assert_array_equal(result.as_numpy("INDICES"), want_indices)
    np.testing.assert_allclose(as64(result.as_numpy("VALUES")), want_values,
                               **rounded_tolerance(want_values, 10))


@pytest.mark.parametrize("epsilon", [0.5, 1e-12, 4])
def test_epsilon_cosine(client, rng, epsilon):
    """epsilon (double or integer parameter): the Keras clamp x / sqrt(max(|x|^2, epsilon)).
    Rows scaled to norms from 0.01 to 3 make the clamp matter for the large epsilons."""
    a, b = random_pair(rng, 0, n=6, m=5, d=8)
    a *= np.geomspace(0.01, 3, 6, dtype=np.float32)[:, None] / np.linalg.norm(a, axis=1,
                                                                               keepdims=True)
    result = client.infer("cosine", [infer_input("A", a), infer_input("B", b)],
                          parameters={"epsilon": epsilon})
    ref = dense_reference("cosine", a, b, float(epsilon))
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))
    if epsilon >= 0.5:  # the clamp changed something: not plain cosine similarity
        assert not np.allclose(ref, dense_reference("cosine", a, b), atol=1e-3)


def test_zero_rows_cosine(client):
    """An all-zero row has cosine 0 against everything (sklearn's convention), not NaN."""
    a = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 2.0]], np.float32)
    b = np.array([[2.0, 1.0, 2.0], [0.0, 0.0, 0.0]], np.float32)
    result = client.infer("cosine", [infer_input("A", a), infer_input("B", b)])
    ref = dense_reference("cosine", a, b)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))
