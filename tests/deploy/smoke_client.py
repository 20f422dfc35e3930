"""Smoke client for a deployed simserve (container or pod): waits for the gRPC health
service to report SERVING, checks GetInfo, makes real similarity calls (unary cosine compared
with scikit-learn, streamed euclidean compared with a numpy double loop), registers a gallery
and queries it by name (then deletes it), checks that bad input gets INVALID_ARGUMENT, and
scrapes /metrics for the calls it made. With --gallery NAME=FILE.npy it also checks that the
server loaded FILE as the directory gallery NAME (its --gallery_dir) and computes against it.

A secured server (the prod overlay): --tls-ca CA.pem makes every call TLS verified with that
CA and checks that plaintext is refused; --token TOKEN sends `authorization: Bearer TOKEN` and
checks that calls without it or with a wrong one are UNAUTHENTICATED (health stays open);
--health-target the plaintext health-only listener (SERVING, nothing else served there);
--metrics-ca and --metrics-basic-auth USER:PASS for an HTTPS /metrics behind basic auth (and
checks that it refuses plain HTTP and a missing or wrong password).

Python stubs are generated from proto/ at run time into a temporary directory.
Optionally, last: SIGTERM arrives while a streamed call is in flight, which must complete.
Usage: smoke_client.py --target 127.0.0.1:PORT [--metrics-url URL] [--expect-threads N]
                       [--gallery NAME=FILE.npy] [--sigterm-during-stream COMMAND]
                       [--tls-ca FILE] [--token TOKEN] [--health-target HOST:PORT]
                       [--metrics-ca FILE] [--metrics-basic-auth USER:PASS]
Exit 0 = all checks passed; otherwise a message on stderr and exit 1.
"""

import argparse
import base64
import os
import re
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc
from sklearn.metrics.pairwise import cosine_similarity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fail(msg):
    print(f"smoke: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def generate_stubs(out_dir):
    proto_dir = os.path.join(ROOT, "proto")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main([
        "protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}", os.path.join(proto_dir, "simserve/v1/similarity.proto"),
    ])
    if rc != 0:
        fail(f"protoc failed with {rc}")
    # Regular packages (with __init__.py), so that they win over an installed simserve
    # package (a namespace portion would lose to it, whatever its place in sys.path).
    for pkg in ("simserve", os.path.join("simserve", "v1")):
        open(os.path.join(out_dir, pkg, "__init__.py"), "a").close()
    sys.path.insert(0, out_dir)
    from simserve.v1 import similarity_pb2, similarity_pb2_grpc  # noqa: E402 (generated)
    return similarity_pb2, similarity_pb2_grpc


def wait_serving(channel, seconds, service=""):
    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + seconds
    last = None
    while time.monotonic() < deadline:
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
            last = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            if resp.status == health_pb2.HealthCheckResponse.SERVING:
                return time.monotonic() - (deadline - seconds)
        except grpc.RpcError as e:
            last = e.code().name
        time.sleep(0.25)
    fail(f"health {service!r} never SERVING within {seconds} s (last: {last})")


def tls_credentials(ca_file, token=None):
    """TLS verified with ca_file, plus `authorization: Bearer token` on every call if given."""
    with open(ca_file, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def open_channel(args):
    if args.tls_ca:
        return grpc.secure_channel(args.target, tls_credentials(args.tls_ca, args.token))
    if args.token:
        fail("--token needs --tls-ca (gRPC sends call credentials only over TLS)")
    return grpc.insecure_channel(args.target)


def expect_code(what, code, call):
    try:
        call()
    except grpc.RpcError as e:
        if e.code() != code:
            fail(f"{what}: {e.code().name} ({e.details()}), want {code.name}")
        return e.details()
    fail(f"{what} succeeded, want {code.name}")


def check_health_port(pb_grpc, pb, target, wait):
    """The plaintext health-only listener (--health_listen): both health services SERVING, the
    similarity service not served there."""
    with grpc.insecure_channel(target) as channel:
        waited = wait_serving(channel, wait)
        wait_serving(channel, 5, service="simserve.v1.Similarity")
        expect_code("GetInfo on the health-only port", grpc.StatusCode.UNIMPLEMENTED,
                    lambda: pb_grpc.SimilarityStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5))
    print(f"smoke: plaintext health port {target}: SERVING after {waited:.1f} s ('' and "
          "simserve.v1.Similarity), GetInfo UNIMPLEMENTED there")


def check_transport_security(pb_grpc, pb, args):
    """TLS only on the gRPC port; with tokens, health is open and everything else needs one."""
    with grpc.insecure_channel(args.target) as channel:
        expect_code("plaintext Health/Check on the TLS port", grpc.StatusCode.UNAVAILABLE,
                    lambda: health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=5))
    print("smoke: the gRPC port refuses plaintext")
    if not args.token:
        return
    for label, token in (("no token", None), ("a wrong token", args.token + "-wrong")):
        with grpc.secure_channel(args.target, tls_credentials(args.tls_ca, token)) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            details = expect_code(f"GetInfo with {label}", grpc.StatusCode.UNAUTHENTICATED,
                                  lambda: pb_grpc.SimilarityStub(channel).GetInfo(
                                      pb.GetInfoRequest(), timeout=5))
        print(f"smoke: TLS with {label}: Health open, GetInfo UNAUTHENTICATED ({details})")


def tensor(pb, array):
    array = np.ascontiguousarray(array, dtype="<f4")
    return pb.Tensor(shape=list(array.shape), dtype=pb.FLOAT32, raw=array.tobytes())


def check_unary_cosine(pb, stub, rng):
    a = rng.standard_normal((3, 17, 33)).astype(np.float32)
    b = rng.standard_normal((3, 11, 33)).astype(np.float32)
    a[1, 4, :] = 0.0  # a zero row: sklearn gives 0, never NaN
    resp = stub.Compute(pb.ComputeRequest(a=tensor(pb, a), b=tensor(pb, b),
                                          metric=pb.COSINE), timeout=30)
    if list(resp.shape) != [3, 17, 11]:
        fail(f"Compute shape {list(resp.shape)}, want [3, 17, 11]")
    got = np.frombuffer(resp.values_raw, dtype="<f4").reshape(3, 17, 11)
    want = np.stack([cosine_similarity(a[k].astype(np.float64), b[k].astype(np.float64))
                     for k in range(3)])
    err = float(np.max(np.abs(got - want)))
    if not err <= 1e-5:
        fail(f"Compute cosine differs from sklearn by {err}")
    print(f"smoke: Compute cosine [3,17,33]x[3,11,33] matches sklearn (max abs err {err:.2e})")


def check_stream_euclidean(pb, stub, rng):
    a = rng.standard_normal((2, 40, 16)).astype(np.float32)
    b = rng.standard_normal((2, 9, 16)).astype(np.float32)
    got = np.full((2, 40, 9), np.nan)
    chunks = 0
    for chunk in stub.ComputeStream(pb.ComputeRequest(
            a=tensor(pb, a), b=tensor(pb, b), metric=pb.EUCLIDEAN, max_chunk_bytes=9 * 4 * 7),
            timeout=30):
        rows = np.frombuffer(chunk.values_raw, dtype="<f4").reshape(chunk.row_count, 9)
        got[chunk.batch_index, chunk.row_offset:chunk.row_offset + chunk.row_count] = rows
        chunks += 1
    want = np.zeros((2, 40, 9))
    for k in range(2):
        for i in range(40):
            for j in range(9):
                want[k, i, j] = np.sqrt(np.sum((a[k, i].astype(np.float64) - b[k, j]) ** 2))
    err = float(np.max(np.abs(got - want)))  # NaN (an uncovered row) fails too
    if not err <= 1e-4:
        fail(f"ComputeStream euclidean differs from the double loop by {err}")
    print(f"smoke: ComputeStream euclidean in {chunks} chunks matches a double loop "
          f"(max abs err {err:.2e})")
    return chunks


def gallery_cosine(pb, stub, a, gallery):
    """Compute of a [batch, N, D] against the named gallery; the result as float64."""
    resp = stub.Compute(pb.ComputeRequest(a=tensor(pb, a), gallery=gallery, metric=pb.COSINE),
                        timeout=30)
    return np.frombuffer(resp.values_raw, dtype="<f4").reshape(list(resp.shape))


def cosine_each(a, g):
    return np.stack([cosine_similarity(a[k].astype(np.float64),
                                       (g if g.ndim == 2 else g[k]).astype(np.float64))
                     for k in range(a.shape[0])])


def check_uploaded_gallery(pb, stub, rng):
    g = rng.standard_normal((21, 33)).astype(np.float32)
    a = rng.standard_normal((2, 5, 33)).astype(np.float32)
    raw = np.ascontiguousarray(g, dtype="<f4").tobytes()
    header = pb.GalleryHeader(name="smoke-uploaded", shape=list(g.shape), dtype=pb.FLOAT32)
    parts = [pb.RegisterGalleryRequest(header=header),
             pb.RegisterGalleryRequest(data=raw[:1000]), pb.RegisterGalleryRequest(data=raw[1000:])]
    info = stub.RegisterGallery(iter(parts), timeout=30)
    if info.source != pb.UPLOADED or list(info.shape) != [21, 33]:
        fail(f"RegisterGallery answered {info}")
    err = float(np.max(np.abs(gallery_cosine(pb, stub, a, "smoke-uploaded") - cosine_each(a, g))))
    if not err <= 1e-5:
        fail(f"Compute against the uploaded gallery differs from sklearn by {err}")
    stub.DeleteGallery(pb.DeleteGalleryRequest(name="smoke-uploaded"), timeout=10)
    print(f"smoke: RegisterGallery + Compute(gallery) match sklearn (max abs err {err:.2e}), "
          "deleted")


def check_directory_gallery(pb, stub, spec):
    name, path = spec.split("=", 1)
    g = np.load(path)
    info = stub.GetGallery(pb.GetGalleryRequest(name=name), timeout=10)
    if info.source != pb.DIRECTORY or list(info.shape) != list(g.shape):
        fail(f"directory gallery {name}: GetGallery answered {info}")
    a = np.random.default_rng(12).standard_normal((g.shape[0] if g.ndim == 3 else 2, 6,
                                                  g.shape[-1])).astype(np.float32)
    err = float(np.max(np.abs(gallery_cosine(pb, stub, a, name) - cosine_each(a, g))))
    if not err <= 1e-5:
        fail(f"Compute against directory gallery {name} differs from sklearn by {err}")
    try:
        stub.DeleteGallery(pb.DeleteGalleryRequest(name=name), timeout=10)
        fail(f"DeleteGallery of directory gallery {name} succeeded")
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.FAILED_PRECONDITION:
            fail(f"DeleteGallery of a directory gallery gave {e.code().name}")
    print(f"smoke: directory gallery {name} {list(g.shape)} from {info.path} matches sklearn "
          f"(max abs err {err:.2e}); not deletable")


def check_drain(pb, stub, sigterm_command):
    """Starts a streamed call that a slow reader keeps in flight, runs sigterm_command after
    the first chunk, and checks the call still completes with every row correct (the server
    drains instead of dropping running calls)."""
    rng = np.random.default_rng(11)
    a = rng.standard_normal((1, 2048, 64)).astype(np.float32)
    b = rng.standard_normal((1, 2048, 64)).astype(np.float32)
    got = np.full((2048, 2048), np.nan, dtype=np.float32)
    sent_at = None
    chunks = 0
    for chunk in stub.ComputeStream(pb.ComputeRequest(
            a=tensor(pb, a), b=tensor(pb, b), metric=pb.COSINE, max_chunk_bytes=1 << 20),
            timeout=60):
        rows = np.frombuffer(chunk.values_raw, dtype="<f4").reshape(chunk.row_count, 2048)
        got[chunk.row_offset:chunk.row_offset + chunk.row_count] = rows
        chunks += 1
        if sent_at is None:
            if subprocess.run(sigterm_command, shell=True).returncode != 0:
                fail(f"'{sigterm_command}' failed")
            sent_at = time.monotonic()
            print("smoke: SIGTERM sent after the first chunk; reading the rest slowly")
        time.sleep(0.15)
    finished = time.monotonic() - sent_at
    want = cosine_similarity(a[0].astype(np.float64), b[0].astype(np.float64))
    err = float(np.max(np.abs(got - want)))
    if not err <= 1e-5:
        fail(f"the stream in flight at SIGTERM is wrong or incomplete (max abs err {err})")
    print(f"smoke: call in flight at SIGTERM completed OK: {chunks} chunks, all rows correct, "
          f"{finished:.1f} s after SIGTERM")


def check_bad_input(pb, stub):
    a = np.zeros((2, 3, 4), np.float32)
    b = np.zeros((2, 3, 5), np.float32)  # D mismatch
    try:
        stub.Compute(pb.ComputeRequest(a=tensor(pb, a), b=tensor(pb, b)), timeout=10)
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.INVALID_ARGUMENT:
            fail(f"D mismatch gave {e.code().name}, want INVALID_ARGUMENT")
        print(f"smoke: D mismatch -> INVALID_ARGUMENT ({e.details()})")
        return
    fail("D mismatch was accepted")


def metric_value(text, name, **labels):
    total = None
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total = (total or 0.0) + float(m.group(3))
    return total


def fetch(url, ca_file=None, basic_auth=None):
    """(status, body) of a GET; HTTP errors are answers, not exceptions."""
    request = urllib.request.Request(url)
    if basic_auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(basic_auth.encode()).decode())
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, ""


def check_metrics_security(url, ca_file, basic_auth):
    """An HTTPS /metrics refuses plain HTTP; with basic auth, no or a wrong password is 401."""
    if url.startswith("https:"):
        try:
            status, _ = fetch("http:" + url[len("https:"):])
        except (OSError, urllib.error.URLError):
            status = None
        if status == 200:
            fail("/metrics answered plain HTTP on its HTTPS port")
        print("smoke: /metrics refuses plain HTTP")
    if basic_auth:
        for label, auth in (("no password", None), ("a wrong password", basic_auth + "-wrong")):
            status, _ = fetch(url, ca_file, auth)
            if status != 401:
                fail(f"/metrics with {label}: HTTP {status}, want 401")
        print("smoke: /metrics without or with a wrong password -> 401")


def check_metrics(url, stream_chunks, ca_file=None, basic_auth=None, auth_failures=0):
    status, text = fetch(url, ca_file, basic_auth)
    if status != 200:
        fail(f"/metrics: HTTP {status}")
    checks = [
        ("grpc_server_handled_total", dict(grpc_method="Compute", grpc_code="OK"), 1),
        ("grpc_server_handled_total", dict(grpc_method="Compute", grpc_code="InvalidArgument"), 1),
        ("grpc_server_handled_total", dict(grpc_method="ComputeStream", grpc_code="OK"), 1),
        ("grpc_server_msg_sent_total", dict(grpc_method="ComputeStream"), stream_chunks),
        ("simserve_build_info", {}, 1),
    ]
    if auth_failures:
        checks.append(("simserve_auth_failures_total", {}, auth_failures))
    for name, labels, minimum in checks:
        value = metric_value(text, name, **labels)
        if value is None or value < minimum:
            fail(f"/metrics: {name}{labels} = {value}, want >= {minimum}")
    print(f"smoke: /metrics has the calls ({len(text)} bytes, {len(text.splitlines())} lines)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, help="host:port of the gRPC server")
    ap.add_argument("--metrics-url", help="http://host:port/metrics to scrape afterwards")
    ap.add_argument("--expect-threads", type=int, help="GetInfo threads_per_worker wanted")
    ap.add_argument("--wait", type=float, default=90, help="seconds to wait for SERVING")
    ap.add_argument("--gallery", metavar="NAME=FILE.npy",
                    help="the server must hold FILE (its --gallery_dir) as directory gallery NAME")
    ap.add_argument("--sigterm-during-stream", metavar="COMMAND",
                    help="last check: run COMMAND (which sends SIGTERM to the server) while a "
                         "streamed call is in flight; the call must still complete")
    ap.add_argument("--tls-ca", metavar="FILE", help="the gRPC port serves TLS: verify it with FILE")
    ap.add_argument("--token", help="bearer token for every call (needs --tls-ca)")
    ap.add_argument("--health-target", metavar="HOST:PORT",
                    help="the plaintext health-only listener (--health_listen)")
    ap.add_argument("--metrics-ca", metavar="FILE", help="CA of an https --metrics-url")
    ap.add_argument("--metrics-basic-auth", metavar="USER:PASS", help="basic auth of /metrics")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="simserve-stubs-") as gen:
        pb, pb_grpc = generate_stubs(gen)
        if args.health_target:
            check_health_port(pb_grpc, pb, args.health_target, args.wait)
        if args.tls_ca:
            check_transport_security(pb_grpc, pb, args)
        with open_channel(args) as channel:
            waited = wait_serving(channel, args.wait)
            print(f"smoke: health SERVING after {waited:.1f} s")
            stub = pb_grpc.SimilarityStub(channel)
            info = stub.GetInfo(pb.GetInfoRequest(), timeout=10)
            print(f"smoke: GetInfo version={info.version} onednn={info.onednn_version} "
                  f"isa={info.cpu_isa} workers={info.compute_workers} "
                  f"threads_per_worker={info.threads_per_worker}")
            if args.expect_threads is not None and info.threads_per_worker != args.expect_threads:
                fail(f"threads_per_worker={info.threads_per_worker}, want {args.expect_threads}")
            rng = np.random.default_rng(7)
            check_unary_cosine(pb, stub, rng)
            chunks = check_stream_euclidean(pb, stub, rng)
            check_bad_input(pb, stub)
            check_uploaded_gallery(pb, stub, rng)
            if args.gallery:
                check_directory_gallery(pb, stub, args.gallery)
            if args.metrics_url:
                check_metrics_security(args.metrics_url, args.metrics_ca, args.metrics_basic_auth)
                check_metrics(args.metrics_url, chunks, args.metrics_ca, args.metrics_basic_auth,
                              auth_failures=2 if args.token else 0)
            if args.sigterm_during_stream:
                check_drain(pb, stub, args.sigterm_during_stream)
    print("smoke: PASS")


if __name__ == "__main__":
    main()
