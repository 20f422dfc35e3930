"""The pytest `--server PATH` option and `server_binary` fixture shared by the suites that
start the real simserve binary (tests/python, tests/kserve): their conftest.py imports both
names, and pytest registers them from there."""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--server", default=os.environ.get("SIMSERVE_SERVER"),
                     help="path of the simserve server binary (CTest passes it)")


@pytest.fixture(scope="session")
def server_binary(request):
    path = request.config.getoption("--server")
    if not path:
        pytest.skip("needs the server binary: --server PATH or SIMSERVE_SERVER")
    return path
