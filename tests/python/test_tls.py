"""Transport security of the real server (issue 11, first part): TLS, mutual TLS and
certificate rotation without a restart, with certificates made by openssl for each run.

Flags under test: --tls_cert_file, --tls_key_file, --tls_client_ca_file (and their SIMSERVE_
variables), --tls_refresh_seconds."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import grpc
import numpy as np
import pytest
from sklearn.metrics.pairwise import cosine_similarity

from serverctl import free_port
from simserve.v1 import similarity_pb2 as pb
from simserve.v1 import similarity_pb2_grpc as pb_grpc

MAKE_CERTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "security",
                          "make_certs.sh")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if shutil.which("openssl") is None:
        pytest.fail("openssl missing (Debian package openssl; scripts/setup.sh installs it)")
    d = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", MAKE_CERTS, str(d)], check=True)
    return d


def read(path):
    with open(path, "rb") as f:
        return f.read()


def credentials(certs, root="ca1", client=None):
    if client is None:
        return grpc.ssl_channel_credentials(read(certs / f"{root}.crt"))
    return grpc.ssl_channel_credentials(read(certs / f"{root}.crt"),
                                        read(certs / f"{client}.key"),
                                        read(certs / f"{client}.crt"))


def get_info(address, creds, timeout=5.0):
    channel = (grpc.secure_channel(address, creds) if creds is not None
               else grpc.insecure_channel(address))
    with channel:
        return pb_grpc.SimilarityStub(channel).GetInfo(pb.GetInfoRequest(), timeout=timeout)


def rpc_code(address, creds):
    try:
        get_info(address, creds, timeout=3.0)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


class ServerProcess:
    """A simserve process started by a test; stop() collects its output in `output`."""

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.output = self.proc.stdout.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


class TlsServer(ServerProcess):
    """The simserve binary with TLS flags; ready once a client trusting `ready_creds` is
    served (the insecure health check of serverctl cannot reach a TLS port)."""

    def __init__(self, binary, args, ready_creds, env=None):
        self.address = f"127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [binary, f"--listen={self.address}", "--metrics_listen=", "--warmup=false", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, **(env or {})))
        deadline = time.monotonic() + 30
        while rpc_code(self.address, ready_creds) != grpc.StatusCode.OK:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not serve TLS:\n{self.output}")
            time.sleep(0.2)


def tls_args(certs, server="server1", client_ca=None, refresh=None):
    args = [f"--tls_cert_file={certs / (server + '.crt')}",
            f"--tls_key_file={certs / (server + '.key')}"]
    if client_ca:
        args.append(f"--tls_client_ca_file={certs / (client_ca + '.crt')}")
    if refresh:
        args.append(f"--tls_refresh_seconds={refresh}")
    return args


def test_tls_port_serves_tls_only_and_computes(server_binary, certs):
    with TlsServer(server_binary, tls_args(certs), credentials(certs)) as srv:
        a = np.random.default_rng(1).standard_normal((4, 8), dtype=np.float32)
        b = np.random.default_rng(2).standard_normal((5, 8), dtype=np.float32)
        with grpc.secure_channel(srv.address, credentials(certs)) as channel:
            resp = pb_grpc.SimilarityStub(channel).Compute(pb.ComputeRequest(
                a=pb.Tensor(shape=[4, 8], raw=a.tobytes()),
                b=pb.Tensor(shape=[5, 8], raw=b.tobytes())), timeout=10)
        got = np.frombuffer(resp.values_raw, np.float32).reshape(4, 5)
        np.testing.assert_allclose(got, cosine_similarity(a.astype(np.float64), b), atol=1e-6)
        assert rpc_code(srv.address, None) == grpc.StatusCode.UNAVAILABLE, "plaintext refused"
        assert rpc_code(srv.address, credentials(certs, root="ca2")) == \
            grpc.StatusCode.UNAVAILABLE, "a client that does not trust the certificate"
    assert "gRPC transport: TLS (certificate" in srv.output


def test_mutual_tls_refuses_clients_without_a_certificate_of_the_ca(server_binary, certs):
    with TlsServer(server_binary, tls_args(certs, client_ca="ca1"),
                   credentials(certs, client="client1")) as srv:
        assert get_info(srv.address, credentials(certs, client="client1")).version
        assert rpc_code(srv.address, credentials(certs)) == grpc.StatusCode.UNAVAILABLE
        assert rpc_code(srv.address, credentials(certs, client="client2")) == \
            grpc.StatusCode.UNAVAILABLE, "a certificate signed by another CA"
    assert "MUTUAL TLS" in srv.output


def test_certificates_rotate_without_a_restart(server_binary, certs, tmp_path):
    live = tmp_path / "live"
    live.mkdir()

    def install(name):
        for ext in ("crt", "key"):  # each file replaced atomically (rename)
            shutil.copy(certs / f"{name}.{ext}", live / f"tmp.{ext}")
            os.replace(live / f"tmp.{ext}", live / f"server.{ext}")

    install("server1")
    args = [f"--tls_cert_file={live / 'server.crt'}", f"--tls_key_file={live / 'server.key'}",
            "--tls_refresh_seconds=1"]
    with TlsServer(server_binary, args, credentials(certs, root="ca1")) as srv:
        install("server2")  # a certificate from another CA: only new handshakes see it
        deadline = time.monotonic() + 20
        while rpc_code(srv.address, credentials(certs, root="ca2")) != grpc.StatusCode.OK:
            assert time.monotonic() < deadline, "the new certificate was not picked up"
            time.sleep(0.3)
        assert rpc_code(srv.address, credentials(certs, root="ca1")) == \
            grpc.StatusCode.UNAVAILABLE, "the old certificate is no longer served"
        assert srv.proc.poll() is None, "no restart"


def test_tls_from_environment_variables(server_binary, certs):
    env = {"SIMSERVE_TLS_CERT_FILE": str(certs / "server1.crt"),
           "SIMSERVE_TLS_KEY_FILE": str(certs / "server1.key")}
    with TlsServer(server_binary, [], credentials(certs), env=env) as srv:
        assert rpc_code(srv.address, None) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("args, message", [
    (["--tls_cert_file={d}/server1.crt"], "both --tls_cert_file and --tls_key_file"),
    (["--tls_client_ca_file={d}/ca1.crt"], "needs --tls_cert_file"),
    (["--tls_cert_file={d}/nope.crt", "--tls_key_file={d}/server1.key"], "cannot be read"),
    (["--tls_cert_file={d}/server1.ext", "--tls_key_file={d}/server1.key"], "is not PEM"),
])
def test_bad_tls_configuration_is_refused_at_start(server_binary, certs, args, message):
    proc = subprocess.run(
        [server_binary, "--listen=127.0.0.1:0", "--metrics_listen=", "--warmup=false",
         *[a.format(d=certs) for a in args]], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout


def test_python_client_tls_options(server_binary, certs):
    import asyncio

    import simserve
    import simserve.aio

    a = np.random.default_rng(3).standard_normal((3, 8), dtype=np.float32)
    b = np.random.default_rng(4).standard_normal((6, 8), dtype=np.float32)
    want = cosine_similarity(a.astype(np.float64), b)
    with TlsServer(server_binary, tls_args(certs, client_ca="ca1"),
                   credentials(certs, client="client1")) as srv:
        # File paths, mutual TLS.
        with simserve.Client(srv.address, root_certificates=str(certs / "ca1.crt"),
                             certificate_chain=certs / "client1.crt",
                             private_key=certs / "client1.key") as c:
            np.testing.assert_allclose(c.similarity(a, b), want, atol=1e-6)
        # PEM bytes, asyncio.

        async def run():
            async with simserve.aio.Client(
                    srv.address, tls=True, root_certificates=read(certs / "ca1.crt"),
                    certificate_chain=read(certs / "client1.crt"),
                    private_key=read(certs / "client1.key")) as c:
                return await c.similarity(a, b)
        np.testing.assert_allclose(asyncio.run(run()), want, atol=1e-6)
        # Without the client certificate the handshake is refused.
        with simserve.Client(srv.address, root_certificates=certs / "ca1.crt", timeout=5,
                             retry=simserve.RetryPolicy(max_attempts=1)) as c:
            with pytest.raises(simserve.Error) as err:
                c.similarity(a, b)
            assert err.value.code == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="both certificate_chain and private_key"):
        simserve.Client("127.0.0.1:1", certificate_chain=certs / "client1.crt")
    with pytest.raises(ValueError, match="not both"):
        simserve.Client("127.0.0.1:1", tls=True,
                        credentials=grpc.ssl_channel_credentials())
    with pytest.raises(ValueError, match="cannot read"):
        simserve.Client("127.0.0.1:1", root_certificates=certs / "missing.crt")


def test_plaintext_health_listener_for_probes_of_a_tls_server(server_binary, certs):
    """Kubernetes gRPC probes cannot speak TLS: --health_listen serves only health, plaintext."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health_address = f"127.0.0.1:{free_port()}"
    with TlsServer(server_binary, [*tls_args(certs), f"--health_listen={health_address}"],
                   credentials(certs)) as srv:
        with grpc.insecure_channel(health_address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "simserve.v1.Similarity"):
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                pb_grpc.SimilarityStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, "health only"
        assert rpc_code(srv.address, None) == grpc.StatusCode.UNAVAILABLE, "main port: TLS only"
    assert "plaintext health-only listener on" in srv.output


def test_metrics_port_https_with_basic_auth_and_rotation(server_binary, certs, tmp_path):
    """--metrics_tls_cert_file/--metrics_tls_key_file serve /metrics over HTTPS only (files
    re-read per handshake); --metrics_basic_auth_file requires user:password (re-read per
    scrape)."""
    import base64
    import ssl
    import urllib.error
    import urllib.request

    live = tmp_path / "metrics"
    live.mkdir()
    for ext in ("crt", "key"):
        shutil.copy(certs / f"server1.{ext}", live / f"tls.{ext}")
    users = tmp_path / "users"
    users.write_text("# prometheus scrapers\nprom:s3cret\n")
    port = free_port()
    args = [*tls_args(certs), f"--metrics_tls_cert_file={live / 'tls.crt'}",
            f"--metrics_tls_key_file={live / 'tls.key'}", f"--metrics_basic_auth_file={users}"]

    def scrape(root="ca1", user="prom", password="s3cret", scheme="https"):
        context = ssl.create_default_context(cafile=str(certs / f"{root}.crt"))
        request = urllib.request.Request(f"{scheme}://localhost:{port}/metrics")
        if user is not None:
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=5,
                                        context=context if scheme == "https" else None) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""
        except (urllib.error.URLError, ConnectionError, ssl.SSLError) as err:
            return type(err).__name__, ""

    # TlsServer turns the metrics port off (--metrics_listen=); the later flag wins.
    with TlsServer(server_binary, [*args, f"--metrics_listen=127.0.0.1:{port}"],
                   credentials(certs)) as srv:
        status, text = scrape()
        assert status == 200 and "simserve_build_info" in text
        assert scrape(user=None)[0] == 401
        assert scrape(password="wrong")[0] == 401
        assert scrape(scheme="http")[0] != 200, "plaintext refused on an HTTPS port"
        assert scrape(root="ca2")[0] != 200, "a client that does not trust the certificate"
        users.write_text("prom:rotated\n")
        assert scrape()[0] == 401 and scrape(password="rotated")[0] == 200
        for ext in ("crt", "key"):  # renewed: another CA's certificate, no restart
            shutil.copy(certs / f"server2.{ext}", live / f"tmp.{ext}")
            os.replace(live / f"tmp.{ext}", live / f"tls.{ext}")
        assert scrape(root="ca2", password="rotated")[0] == 200
        assert srv.proc.poll() is None
    assert "HTTPS (certificate" in srv.output and "basic auth" in srv.output
    assert "s3cret" not in srv.output and "rotated" not in srv.output
