"""`pip install ./client/python` works from the repository: the wheel carries stubs generated
from proto/ at build time (never committed) and declares grpcio/protobuf lower bounds that
match the generator; the installed package imports and talks to a server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PKG = os.path.join(ROOT, "client", "python")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Build from a copy without any generated file (and without touching the checkout, which
    # other tests import from): the stubs must come from proto/ during the build.
    src = tmp_path_factory.mktemp("src") / "python"
    shutil.copytree(PKG, src, ignore=shutil.ignore_patterns(
        "build", "dist", "*.egg-info", "__pycache__", "v1"))
    assert not (src / "src" / "simserve" / "v1").exists()
    out = tmp_path_factory.mktemp("wheel")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                        "--no-build-isolation", "--disable-pip-version-check", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=240,
                       env=dict(os.environ, SIMSERVE_PROTO_DIR=os.path.join(ROOT, "proto")))
    assert p.returncode == 0, p.stderr
    (whl,) = out.glob("simserve-*.whl")
    return whl


def test_wheel_has_generated_stubs_and_bounds(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith("METADATA"))).decode()
        pb2 = z.read("simserve/v1/similarity_pb2.py").decode()
        pb2_grpc = z.read("simserve/v1/similarity_pb2_grpc.py").decode()
    for f in ("simserve/__init__.py", "simserve/client.py", "simserve/aio.py",
              "simserve/v1/similarity_pb2_grpc.py", "simserve/py.typed"):
        assert f in names
    assert "ComputeUpload" in pb2_grpc
    # The stubs come from the current proto (same messages), not from a stale copy.
    with open(os.path.join(ROOT, "proto", "simserve", "v1", "similarity.proto")) as f:
        proto = f.read()
    assert "UploadHeader" in proto and "UploadHeader" in pb2
    assert "Requires-Dist: protobuf>=" in meta and "Requires-Dist: grpcio>=" in meta


def test_generated_code_is_not_committed():
    p = subprocess.run(["git", "-C", ROOT, "ls-files", "client/python"], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip("not a git checkout")
    assert not [f for f in p.stdout.split() if "_pb2" in f or f.endswith(".pyi")]


def test_installed_wheel_computes(wheel, tmp_path, server):
    target = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                        "--disable-pip-version-check", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    code = ("import numpy as np, simserve, sys; "
            "from sklearn.metrics.pairwise import cosine_similarity as cs; "
            "a = np.random.default_rng(1).random((3, 4, 5)); b = a[:, ::-1] + 1; "
            f"c = simserve.Client('{server.address}', timeout=30); s = c.similarity(a, b); "
            "print(simserve.__file__); "
            "print(np.allclose(s, np.stack([cs(x, y) for x, y in zip(a, b)]), atol=1e-5))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, cwd=str(tmp_path),
                       env=dict(os.environ, PYTHONPATH=str(target)))
    assert p.returncode == 0, p.stderr
    file_line, ok_line = p.stdout.split()
    assert file_line.startswith(str(target)) and ok_line == "True"
