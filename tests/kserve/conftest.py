"""pytest fixtures for the Open Inference Protocol (KServe v2) suite: the real simserve binary
(--server PATH or $SIMSERVE_SERVER) started on a free loopback port with --allow_shared_memory
and a --gallery_dir gallery (and a second one without the flag, for the tests that need it
off), tritonclient.grpc clients connected to them, and a seeded random generator.

Runs in .venv-kserve (scripts/setup.d/45-kserve.sh): tritonclient, numpy, scikit-learn; never
the simserve Python package.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "interop"))

from server_option import pytest_addoption, server_binary  # noqa: E402,F401
from serverctl import Server  # noqa: E402



GALLERY_NAME = "kserve_gallery"


@pytest.fixture(scope="session")
def gallery(tmp_path_factory):
    """(name, array) of the one --gallery_dir gallery: float32 [M=9, D=12], fixed seed."""
    directory = tmp_path_factory.mktemp("galleries")
    array = np.random.default_rng(7).standard_normal((9, 12)).astype(np.float32)
    np.save(directory / f"{GALLERY_NAME}.npy", array)
    return GALLERY_NAME, array, str(directory)


@pytest.fixture(scope="session")
def server(server_binary, gallery):
    """One real server for the session: shared memory on, metrics exposer off, one directory
    gallery (loaded before SERVING)."""
    with Server(server_binary, ["--allow_shared_memory", "--metrics_listen=",
                                f"--gallery_dir={gallery[2]}"]) as srv:
        yield srv


@pytest.fixture(scope="session")
def server_no_shm(server_binary):
    """A second server with shared memory off (the default)."""
    with Server(server_binary, ["--metrics_listen="]) as srv:
        yield srv


@pytest.fixture()
def client(server):
    c = grpcclient.InferenceServerClient(url=server.address)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture()
def rng(request):
    """A generator seeded per test (stable across runs, different between tests)."""
    seed = 20261203 + sum(map(ord, request.node.name))
    return np.random.default_rng(seed)
