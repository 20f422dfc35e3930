"""Health and metadata RPCs through tritonclient.grpc: ServerLive/ServerReady, ServerMetadata
(name, version from the top-level CMakeLists.txt, extensions with system_shared_memory only
when --allow_shared_memory is on), ModelMetadata and ModelConfig of each metric model,
ModelReady, RepositoryIndex and ModelStatistics counting the requests this test sends.
"""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from helpers import METRICS, infer_input, status_of

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def project_version() -> str:
    with open(os.path.join(ROOT, "CMakeLists.txt")) as f:
        return re.search(r"project\(simserve VERSION ([0-9.]+)", f.read()).group(1)


def test_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()


def test_server_metadata(client):
    metadata = client.get_server_metadata()
    assert metadata.name == "simserve"
    assert metadata.version == project_version()
    assert {"model_configuration", "statistics", "system_shared_memory"} <= set(
        metadata.extensions)


def test_server_metadata_without_shared_memory(server_no_shm):
    with grpcclient.InferenceServerClient(server_no_shm.address) as client:
        extensions = client.get_server_metadata().extensions
    assert "system_shared_memory" not in extensions
    assert {"model_configuration", "statistics"} <= set(extensions)


@pytest.mark.parametrize("model", METRICS)
def test_model_metadata(client, model):
    metadata = client.get_model_metadata(model)
    assert metadata.name == model
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "simserve"
    assert [(t.name, t.datatype, len(t.shape)) for t in metadata.inputs] == [
        ("A", "FP32", 3), ("B", "FP32", 3)]
    assert [(t.name, t.datatype) for t in metadata.outputs] == [
        ("S", "FP32"), ("VALUES", "FP32"), ("INDICES", "INT32")]
    assert client.get_model_metadata(model, model_version="1").name == model


@pytest.mark.parametrize("model", METRICS)
def test_model_config(client, model):
    config = client.get_model_config(model).config
    assert config.name == model
    assert [i.name for i in config.input] == ["A", "B"]
    assert [o.name for o in config.output] == ["S", "VALUES", "INDICES"]


@pytest.mark.parametrize("model,version", [("nope", ""), ("cosine", "2")])
def test_metadata_of_unknown_model(client, model, version):
    for call in (client.get_model_metadata, client.get_model_config,
                 client.get_inference_statistics):
        with pytest.raises(InferenceServerException) as excinfo:
            call(model, model_version=version)
        assert status_of(excinfo) == "NOT_FOUND"


def test_model_ready(client):
    for model in METRICS:
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, model_version="1")
    assert not client.is_model_ready("nope")
    assert not client.is_model_ready("cosine", model_version="2")


def test_repository_index(client):
    models = {m.name: m for m in client.get_model_repository_index().models}
    assert set(METRICS) <= set(models)
    assert all(models[m].state == "READY" and models[m].version == "1" for m in METRICS)


def test_model_statistics_count_requests(client):
    """Two successful and one failed squared_euclidean request move its counters by that."""
    def counts():
        stats = client.get_inference_statistics("squared_euclidean").model_stats[0]
        return (stats.inference_stats.success.count, stats.inference_stats.fail.count)

    before = counts()
    a = np.ones((2, 3), np.float32)
    for _ in range(2):
        client.infer("squared_euclidean", [infer_input("A", a), infer_input("B", a)])
    with pytest.raises(InferenceServerException):
        client.infer("squared_euclidean", [infer_input("A", a), infer_input("B", a[:, :2])])
    assert counts() == (before[0] + 2, before[1] + 1)
