"""Starts the real `simserve` server binary on a free loopback port for a test, waits until
its health service says SERVING (over TLS when given channel credentials: health needs no
token), and always stops it (SIGTERM, then SIGKILL).

Used by tests/interop/run_interop.py and tests/python/conftest.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from typing import List, Optional, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1 (the kernel's ephemeral pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`with Server(binary) as srv:` ... srv.address is "127.0.0.1:PORT"."""

    def __init__(self, binary: str, extra_args: Sequence[str] = (),
                 startup_timeout: float = 120.0, env: Optional[dict] = None,
                 credentials: Optional[grpc.ChannelCredentials] = None) -> None:
        self.binary = binary
        self.credentials = credentials  # for a TLS port; None = plaintext
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.env = dict(os.environ, **(env or {}))
        self.address = ""
        self.proc: Optional[subprocess.Popen] = None
        self._log = tempfile.NamedTemporaryFile(prefix="simserve-", suffix=".log", delete=False)

    def args(self, port: int) -> List[str]:
        return [self.binary, f"--listen=127.0.0.1:{port}",
                f"--metrics_listen=127.0.0.1:{free_port()}"] + self.extra_args

    def log(self) -> str:
        """The server's stdout+stderr so far."""
        with open(self._log.name, errors="replace") as f:
            return f.read()

    def __enter__(self) -> "Server":
        for _ in range(3):  # the free port may be taken between probe and bind: retry
            port = free_port()
            self.address = f"127.0.0.1:{port}"
            self.proc = subprocess.Popen(self.args(port), stdout=self._log,
                                         stderr=subprocess.STDOUT, env=self.env)
            if self._wait_serving():
                return self
            self.stop()
        log = self.log()
        os.unlink(self._log.name)
        raise RuntimeError(f"simserve did not become SERVING; log:\n{log}")

    def _wait_serving(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        with (grpc.secure_channel(self.address, self.credentials) if self.credentials
              else grpc.insecure_channel(self.address)) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    r = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM, up to 10 s for a graceful exit, then SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        os.unlink(self._log.name)
