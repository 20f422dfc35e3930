"""Shared helpers for the KServe v2 suite: inputs in each wire datatype with their exact
float64 values, tritonclient InferInputs from numpy arrays, the float64 references (numpy /
scikit-learn, tests/python/reference.py) and the tolerances the tests compare with.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence, Tuple

import ml_dtypes
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "python"))
import reference  # noqa: E402  (tests/python/reference.py: sklearn / numpy in float64)

METRICS = ("cosine", "dot", "euclidean", "squared_euclidean")
LARGEST_FIRST = ("cosine", "dot")  # top-k order: largest first; distances: smallest first

# numpy dtype of each Open Inference Protocol datatype the server takes. tritonclient 2.73
# sends BF16 from ml_dtypes.bfloat16 arrays (set_data_from_numpy refuses float32 for "BF16").
WIRE_DTYPES = {"FP32": np.float32, "FP16": np.float16, "BF16": ml_dtypes.bfloat16}


def random_pair(rng: np.random.Generator, batch: int, n: int, m: int, d: int,
                datatype: str = "FP32") -> Tuple[np.ndarray, np.ndarray]:
    """A [batch,n,d] / B [batch,m,d] (batch 0: 2D [n,d] / [m,d]) in the wire dtype, standard
    normal (so no top-k ties). The arrays hold exactly the values sent: the references are
    computed from them converted to float64, i.e. from the rounded inputs."""
    lead = (batch,) if batch else ()
    dtype = WIRE_DTYPES[datatype]
    a = rng.standard_normal(lead + (n, d)).astype(dtype)
    b = rng.standard_normal(lead + (m, d)).astype(dtype)
    return a, b


def as64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def infer_input(name: str, array: np.ndarray) -> grpcclient.InferInput:
    """An InferInput carrying `array` in raw_input_contents, datatype from its dtype."""
    tensor = grpcclient.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def dense_reference(metric: str, a: np.ndarray, b: np.ndarray, epsilon: float = 0.0):
    """The float64 reference of the dense result (sklearn cosine/euclidean, numpy dot)."""
    return reference.dense(metric, as64(a), as64(b), epsilon)


def top_k_reference(metric: str, s: np.ndarray, k: int):
    """(values, indices) of the best k per row of the float64 reference `s`."""
    return reference.top_k(metric, s, k)


def fp32_tolerance(ref: np.ndarray) -> dict:
    """assert_allclose kwargs for a float32 computation of `ref` (float32 GEMM over D <= 64;
    euclidean via |a|^2 + |b|^2 - 2ab): a few float32 ulps of the result's scale."""
    scale = max(1.0, float(np.abs(ref).max()))
    return {"rtol": 1e-5, "atol": 2e-5 * scale}


def rounded_tolerance(ref: np.ndarray, mantissa_bits: int) -> dict:
    """Tolerance for results rounded to a narrower float (FP16: 10 mantissa bits, BF16: 7):
    half an ulp of that format relative to each value, plus the float32 computation's."""
    base = fp32_tolerance(ref)
    return {"rtol": 2.0 ** -(mantissa_bits + 1) + base["rtol"], "atol": base["atol"]}


def status_of(excinfo) -> str:
    """The gRPC status name of a tritonclient InferenceServerException ('INVALID_ARGUMENT')."""
    exc = excinfo.value if hasattr(excinfo, "value") else excinfo
    assert isinstance(exc, InferenceServerException), exc
    return str(exc.status()).replace("StatusCode.", "")


def assert_serving(client: grpcclient.InferenceServerClient) -> None:
    """The server still answers a valid request correctly (after an error case)."""
    a = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    b = np.array([[3.0, 4.0]], np.float32)
    result = client.infer("dot", [infer_input("A", a), infer_input("B", b)])
    np.testing.assert_array_equal(result.as_numpy("S"), np.array([[3.0], [8.0]], np.float32))


def output_shape(a: np.ndarray, b: np.ndarray, k: int = 0) -> Sequence[int]:
    return list(a.shape[:-1]) + [k or b.shape[-2]]
