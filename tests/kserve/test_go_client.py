"""Driver of the Go client in tests/kserve/go: generates the Go stubs of
proto/inference/grpc_service.proto with protoc-gen-go / protoc-gen-go-grpc (installed with
the pinned modules by scripts/setup.d/40-python-interop.sh and 45-kserve.sh into
$SIMSERVE_TOOLS_DIR/go, offline here), builds the program, runs it against the real server
with FP32 A and B from numpy, and checks its JSON answer (ServerLive/Ready, ModelMetadata,
ModelInfer's S, NOT_FOUND for an unknown model) against scikit-learn's cosine_similarity.

Registered as its own CTest test, kserve_go (label "kserve;interop").
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from helpers import as64, dense_reference, fp32_tolerance, random_pair
from run_interop import go_env  # tests/interop (on the path via conftest): one Go setup

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROTO_DIR = os.path.join(ROOT, "proto")
MODULE = "simserve.dev/kserve"
BUILD_TIMEOUT = 240


def run(cmd, **kw) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT, **kw)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}{p.stderr}"


@pytest.fixture(scope="module")
def go_client(tmp_path_factory) -> str:
    """The built Go client (stubs generated into a scratch copy of tests/kserve/go)."""
    env = go_env()
    for tool in ("go", "protoc", "protoc-gen-go", "protoc-gen-go-grpc"):
        assert shutil.which(tool, path=env["PATH"]), \
            f"{tool} not found: run scripts/setup.sh (40-python-interop.sh installs it)"
    work = str(tmp_path_factory.mktemp("kserve-go"))
    for name in ("go.mod", "go.sum", "main.go"):
        shutil.copyfile(os.path.join(HERE, "go", name), os.path.join(work, name))
    mapping = f"Minference/grpc_service.proto={MODULE}/gen/inference"
    run(["protoc", f"-I{PROTO_DIR}", f"--go_out={work}", f"--go_opt=module={MODULE}",
         f"--go_opt={mapping}", f"--go-grpc_out={work}", f"--go-grpc_opt=module={MODULE}",
         f"--go-grpc_opt={mapping}", "inference/grpc_service.proto"], env=env)
    run(["go", "build", "-o", "kserve", "."], cwd=work, env=env)
    return os.path.join(work, "kserve")


def test_go_client_cosine(go_client, server, tmp_path, rng):
    a, b = random_pair(rng, 2, n=3, m=4, d=5)
    request = {"model": "cosine",
               "a": {"shape": list(a.shape), "values": a.ravel().tolist()},
               "b": {"shape": list(b.shape), "values": b.ravel().tolist()}}
    request_path, answer_path = tmp_path / "request.json", tmp_path / "answer.json"
    request_path.write_text(json.dumps(request))
    run([go_client, "-addr", server.address, "-in", str(request_path),
         "-out", str(answer_path)])
    answer = json.loads(answer_path.read_text())

    assert answer["live"] is True and answer["ready"] is True
    assert answer["metadata_name"] == "cosine" and answer["metadata_versions"] == ["1"]
    assert [(t["name"], t["datatype"]) for t in answer["metadata_inputs"]] == [
        ("A", "FP32"), ("B", "FP32")]
    assert [(t["name"], t["datatype"]) for t in answer["metadata_outputs"]] == [
        ("S", "FP32"), ("VALUES", "FP32"), ("INDICES", "INT32")]
    assert (answer["model_name"], answer["model_version"], answer["id"]) == ("cosine", "1",
                                                                            "go-1")
    [output] = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("S", "FP32", [2, 3, 4])
    got = np.array(output["values"], np.float64).reshape(output["shape"])
    ref = dense_reference("cosine", a, b)  # sklearn cosine_similarity in float64
    np.testing.assert_allclose(as64(got), ref, **fp32_tolerance(ref))
    assert answer["unknown_model_code"] == "NotFound"
