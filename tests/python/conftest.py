"""pytest fixtures: the real simserve server (binary from --server or $SIMSERVE_SERVER, started
on a free loopback port for the session) and clients connected to it."""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "interop"))

import simserve  # noqa: E402
from server_option import pytest_addoption, server_binary  # noqa: E402,F401
from serverctl import Server  # noqa: E402



@pytest.fixture(scope="session")
def server(server_binary):
    """One real server for the session (metrics exposer off: nothing else to port-clash)."""
    with Server(server_binary, ["--metrics_listen="]) as srv:
        yield srv


@pytest.fixture()
def client(server):
    with simserve.Client(server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def rng_seed():
    return 20261130
