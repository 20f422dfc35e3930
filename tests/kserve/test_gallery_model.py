"""A gallery served as a model (input A only, request parameter `metric`): here a
--gallery_dir gallery written with numpy by conftest.py, so no native API (and no simserve
package) is needed; uploaded galleries are covered by the native suites. Checks its metadata,
readiness, dense and top-k results against numpy/sklearn, and that B is refused.
"""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.utils import InferenceServerException

from helpers import (METRICS, as64, dense_reference, fp32_tolerance, infer_input, status_of,
                     top_k_reference)


def test_gallery_metadata_and_ready(client, gallery):
    name, array, _ = gallery
    assert client.is_model_ready(name)
    metadata = client.get_model_metadata(name)
    assert [t.name for t in metadata.inputs] == ["A"]
    assert list(metadata.inputs[0].shape)[-1] == array.shape[-1]
    assert name in {m.name for m in client.get_model_repository_index().models}


@pytest.mark.parametrize("metric", [None, *METRICS])
def test_gallery_infer(client, rng, gallery, metric):
    """Default metric is cosine."""
    name, array, _ = gallery
    a = rng.standard_normal((4, array.shape[1])).astype(np.float32)
    parameters = {"metric": metric} if metric else {}
    result = client.infer(name, [infer_input("A", a)], parameters=parameters)
    ref = dense_reference(metric or "cosine", a, array)
    np.testing.assert_allclose(as64(result.as_numpy("S")), ref, **fp32_tolerance(ref))


def test_gallery_top_k(client, rng, gallery):
    name, array, _ = gallery
    a = rng.standard_normal((3, array.shape[1])).astype(np.float32)
    result = client.infer(name, [infer_input("A", a)],
                          parameters={"metric": "euclidean", "top_k": 4})
    want_values, want_indices = top_k_reference("euclidean",
                                                dense_reference("euclidean", a, array), 4)
    np.testing.assert_array_equal(result.as_numpy("INDICES"), want_indices)
    np.testing.assert_allclose(as64(result.as_numpy("VALUES")), want_values,
                               **fp32_tolerance(want_values))


@pytest.mark.parametrize("case", ["with-b", "bad-metric", "wrong-d"])
def test_gallery_errors(client, rng, gallery, case):
    name, array, _ = gallery
    d = array.shape[1]
    a = rng.standard_normal((2, d + (case == "wrong-d"))).astype(np.float32)
    inputs = [infer_input("A", a)] + ([infer_input("B", a)] if case == "with-b" else [])
    parameters = {"metric": "manhattan"} if case == "bad-metric" else {}
    with pytest.raises(InferenceServerException) as excinfo:
        client.infer(name, inputs, parameters=parameters)
    assert status_of(excinfo) == "INVALID_ARGUMENT"
