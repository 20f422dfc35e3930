"""Bearer-token authentication of the real server (issue 11): --auth_token_file on plaintext
and TLS ports, health left open for probes, reflection and GetInfo closed, refusals counted in
simserve_auth_failures_total, tokens rotated by rewriting the file, and never logged."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sklearn.metrics.pairwise import cosine_similarity

from serverctl import free_port
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc
from test_tls import ServerProcess, certs, credentials, tls_args  # noqa: F401 (certs: fixture)

TOKENS = ["tok-alpha.1", "tok-beta_2+/=="]
SECRET_MARK = "tok-"  # every token starts with it: the log must never contain it


def write_tokens(path, tokens, comment="# simserve tokens\n"):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(comment + "".join(t + "\n" for t in tokens))
    os.replace(tmp, path)  # as a Kubernetes Secret update: a new file under the same name


class AuthServer(ServerProcess):
    """The simserve binary with --auth_token_file; ready once Health/Check (open without a
    token) answers SERVING."""

    def __init__(self, binary, token_file, creds=None, args=(), env=None):
        self.address = f"127.0.0.1:{free_port()}"
        self.metrics_port = free_port()
        self.creds = creds
        self.proc = subprocess.Popen(
            [binary, f"--listen={self.address}", f"--metrics_listen=127.0.0.1:{self.metrics_port}",
             "--warmup=false", f"--auth_token_file={token_file}", "--auth_refresh_seconds=1",
             *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, **(env or {})))
        deadline = time.monotonic() + 30
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not become healthy:\n{self.output}")
            time.sleep(0.2)

    def channel(self):
        return (grpc.secure_channel(self.address, self.creds) if self.creds is not None
                else grpc.insecure_channel(self.address))

    def healthy(self):
        try:
            with self.channel() as ch:
                reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=2)
            return reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.RpcError:
            return False

    def call(self, method, token=None, scheme="Bearer"):
        """(code, details, reply) of GetInfo or Compute with `token` (None: no metadata)."""
        metadata = None if token is None else [("authorization", f"{scheme} {token}")]
        with self.channel() as ch:
            stub = pb_grpc.SimilarityStub(ch)
            try:
                if method == "GetInfo":
                    reply = stub.GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=5)
                else:
                    reply = stub.Compute(method, metadata=metadata, timeout=10)
                return grpc.StatusCode.OK, "", reply
            except grpc.RpcError as err:
                return err.code(), err.details(), None

    def reflection_code(self, token=None):
        metadata = None if token is None else [("authorization", f"Bearer {token}")]
        with self.channel() as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            try:
                replies = list(stub.ServerReflectionInfo(iter([request]), metadata=metadata,
                                                         timeout=5))
                names = [s.name for s in replies[0].list_services_response.service]
                return grpc.StatusCode.OK, names
            except grpc.RpcError as err:
                return err.code(), []

    def metric(self, name):
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                      timeout=5).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"{name} not exported")


def compute_request(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((4, 8), dtype=np.float32)
    b = rng.standard_normal((5, 8), dtype=np.float32)
    request = pb.ComputeRequest(a=pb.Tensor(shape=[4, 8], raw=a.tobytes()),
                                b=pb.Tensor(shape=[5, 8], raw=b.tobytes()))
    return request, cosine_similarity(a.astype(np.float64), b.astype(np.float64))


def check_token_rules(srv):
    """Every rule of the issue on one running server (plaintext or TLS)."""
    code, details, _ = srv.call("GetInfo")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in details
    code, details, _ = srv.call("GetInfo", token="tok-wrong")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "not valid" in details
    code, details, _ = srv.call("GetInfo", token=TOKENS[0], scheme="Basic")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "must be 'Bearer <token>'" in details
    code, _, info = srv.call("GetInfo", token=TOKENS[1])
    assert code == grpc.StatusCode.OK and info.version

    request, want = compute_request()
    code, details, _ = srv.call(request)
    assert code == grpc.StatusCode.UNAUTHENTICATED, "Compute needs a token too"
    code, details, reply = srv.call(request, token=TOKENS[0])
    assert code == grpc.StatusCode.OK, details
    got = np.frombuffer(reply.values_raw, np.float32).reshape(want.shape)
    np.testing.assert_allclose(got, want, atol=1e-6)

    assert srv.healthy(), "health needs no token (Kubernetes probes carry none)"
    assert srv.reflection_code()[0] == grpc.StatusCode.UNAUTHENTICATED, "reflection is closed"
    code, names = srv.reflection_code(TOKENS[0])
    assert code == grpc.StatusCode.OK and "simserve.v1.Similarity" in names

    assert srv.metric('simserve_auth_failures_total{reason="missing"}') >= 2
    assert srv.metric('simserve_auth_failures_total{reason="invalid"}') == 1
    assert srv.metric('simserve_auth_failures_total{reason="malformed"}') == 1


def test_plaintext_port_with_tokens(server_binary, tmp_path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    with AuthServer(server_binary, tokens) as srv:
        check_token_rules(srv)
    assert "BEARER TOKENS required (2 accepted" in srv.output
    assert "tokens travel in clear" in srv.output
    assert SECRET_MARK not in srv.output, "a token reached the log"


def test_tls_port_with_tokens(server_binary, certs, tmp_path):  # noqa: F811
    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    with AuthServer(server_binary, tokens, creds=credentials(certs),
                    args=tls_args(certs)) as srv:
        check_token_rules(srv)
    assert "gRPC transport: TLS (certificate" in srv.output
    assert "BEARER TOKENS required" in srv.output
    assert SECRET_MARK not in srv.output


def test_mutual_tls_with_tokens(server_binary, certs, tmp_path):  # noqa: F811
    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    with AuthServer(server_binary, tokens, creds=credentials(certs, client="client1"),
                    args=tls_args(certs, client_ca="ca1")) as srv:
        assert srv.call("GetInfo")[0] == grpc.StatusCode.UNAUTHENTICATED
        assert srv.call("GetInfo", token=TOKENS[0])[0] == grpc.StatusCode.OK


def test_tokens_rotate_without_a_restart(server_binary, tmp_path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    with AuthServer(server_binary, tokens) as srv:
        assert srv.call("GetInfo", token=TOKENS[0])[0] == grpc.StatusCode.OK
        write_tokens(tokens, ["tok-gamma"])  # revokes both, adds one
        deadline = time.monotonic() + 15
        while srv.call("GetInfo", token=TOKENS[0])[0] == grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the revoked token still works"
            time.sleep(0.2)
        assert srv.call("GetInfo", token="tok-gamma")[0] == grpc.StatusCode.OK
        assert srv.call("GetInfo", token=TOKENS[1])[0] == grpc.StatusCode.UNAUTHENTICATED
        tokens.unlink()  # a missing file fails closed
        deadline = time.monotonic() + 15
        while srv.call("GetInfo", token="tok-gamma")[0] == grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "a deleted token file must refuse every token"
            time.sleep(0.2)
        assert srv.healthy()
        assert srv.proc.poll() is None, "no restart"
    assert "tokens accepted" in srv.output and SECRET_MARK not in srv.output


def test_token_file_from_environment(server_binary, tmp_path):
    tokens = tmp_path / "tokens"
    write_tokens(tokens, TOKENS)
    port = free_port()
    proc = subprocess.Popen([server_binary, f"--listen=127.0.0.1:{port}", "--metrics_listen=",
                             "--warmup=false"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, SIMSERVE_AUTH_TOKEN_FILE=str(tokens)))
    try:
        deadline = time.monotonic() + 30
        code = None
        while code != grpc.StatusCode.UNAUTHENTICATED:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
                try:
                    pb_grpc.SimilarityStub(ch).GetInfo(pb.GetInfoRequest(), timeout=2)
                    code = grpc.StatusCode.OK
                except grpc.RpcError as err:
                    code = err.code()
            assert code != grpc.StatusCode.OK, "SIMSERVE_AUTH_TOKEN_FILE was ignored"
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("contents, message", [
    ("# nothing here\n", "holds no token"),
    ("good\nbad token\n", "line 2: not a token"),
    (None, "cannot be read"),
])
def test_bad_token_file_is_refused_at_start(server_binary, tmp_path, contents, message):
    tokens = tmp_path / "tokens"
    if contents is not None:
        tokens.write_text(contents)
    proc = subprocess.run(
        [server_binary, "--listen=127.0.0.1:0", "--metrics_listen=", "--warmup=false",
         f"--auth_token_file={tokens}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "bad token" not in proc.stderr + proc.stdout, "the file's contents were echoed"
