"""The "one venv" issue: tritonclient[grpc] (protobuf < 7) and simserve's client in ONE process,
both calling the real server, both agreeing with numpy. tritonclient registers its `inference`
protos (grpc_service.proto, model_config.proto) in protobuf's default pool; simserve's messages
live in a private pool, so neither import order conflicts.

Skipped where tritonclient is not installed, unless SIMSERVE_REQUIRE_TRITONCLIENT=1 (the CTest
test python_tritonclient_one_process, run in .venv-kserve, sets it so that it cannot pass
vacuously)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("SIMSERVE_REQUIRE_TRITONCLIENT") != "1":
    pytest.importorskip("tritonclient.grpc")

HERE = os.path.dirname(os.path.abspath(__file__))


def _reference(a, b):
    an = a / np.linalg.norm(a, axis=-1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return np.einsum("bnd,bmd->bnm", an.astype(np.float64), bn.astype(np.float64))


def both_clients(address: str) -> str:
    """Calls the server with tritonclient (ModelInfer of model "cosine", A and B as FP32 raw
    inputs) and with simserve.Client; checks both against numpy; returns the versions."""
    import google.protobuf
    import grpc
    import tritonclient.grpc as triton

    import simserve

    rng = np.random.default_rng(2026)
    a = rng.standard_normal((2, 5, 24)).astype(np.float32)
    b = rng.standard_normal((2, 7, 24)).astype(np.float32)
    want = _reference(a, b)

    tc = triton.InferenceServerClient(address)
    try:
        assert tc.is_server_live()
        inputs = [triton.InferInput("A", list(a.shape), "FP32"),
                  triton.InferInput("B", list(b.shape), "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        s_triton = tc.infer("cosine", inputs, outputs=[triton.InferRequestedOutput("S")],
                            client_timeout=60).as_numpy("S")
    finally:
        tc.close()

    with simserve.Client(address, timeout=60) as c:
        s_simserve = c.similarity(a, b)
        values, indices = c.top_k(a, b, 3)

    assert s_triton.shape == s_simserve.shape == want.shape
    np.testing.assert_allclose(s_triton, want, atol=1e-5)
    np.testing.assert_allclose(s_simserve, want, atol=1e-5)
    np.testing.assert_array_equal(indices, np.argsort(-want, axis=-1, kind="stable")[..., :3])
    np.testing.assert_allclose(values, np.take_along_axis(want, indices, -1), atol=1e-5)

    # tritonclient's protos are in the default pool, simserve's are not.
    from google.protobuf import descriptor_pool

    from simserve.v1 import similarity_pb2

    pool = descriptor_pool.Default()
    assert pool.FindMessageTypeByName("inference.ModelInferRequest")
    with pytest.raises(KeyError):
        pool.FindFileByName("simserve/v1/similarity.proto")
    assert similarity_pb2.DESCRIPTOR.pool is not pool
    return f"protobuf {google.protobuf.__version__} grpcio {grpc.__version__}"


def test_simserve_then_tritonclient_in_one_process(server):
    # conftest imported simserve first; tritonclient comes second.
    assert "simserve" in sys.modules
    print(both_clients(server.address))


def test_tritonclient_then_simserve_in_one_process(server):
    code = ("import sys, tritonclient.grpc\n"
            "assert 'simserve' not in sys.modules\n"
            f"sys.path.insert(0, {HERE!r})\n"
            "import test_with_tritonclient as t\n"
            f"print(t.both_clients({server.address!r}))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       cwd="/", env=dict(os.environ, SIMSERVE_REQUIRE_TRITONCLIENT="1"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("protobuf ")
