#!/usr/bin/env python3
"""Sends the shared test vectors (vectors/cases.json) with the simserve Python client, by
unary Compute and by ComputeStream, and compares with the reference within the case's
tolerance (top-k indices exactly). Galleries go through plain grpcio stubs generated from
proto/ at run time, in a child process that never imports the client package (whose own
generated `simserve.v1` would shadow them): each case's B is registered and queried by name,
and so is its directory gallery dir-<case> (run_interop.py's --gallery_dir).
With --ca and --token (a TLS server with --auth_token_file) the client passes
root_certificates= and token=, the plain stubs grpc's own TLS + access-token credentials, and
both check that a wrong and a missing token get UNAUTHENTICATED.
Exit code 1 on any failure.

Usage: python_interop.py ADDR CASES_JSON [--ca CA_PEM --token TOKEN]
       (--galleries: the gallery part alone, as the child runs it)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import grpc
import numpy as np
from grpc_tools import protoc

PROTO_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "proto")


def stubs(out_dir):
    """similarity_pb2 and _grpc generated from proto/ into out_dir."""
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    if protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}",
                    f"--grpc_python_out={out_dir}",
                    os.path.join(PROTO_DIR, "simserve/v1/similarity.proto")]) != 0:
        raise RuntimeError("protoc failed")
    # Regular packages (with __init__.py), so that they win over an installed simserve
    # package (a namespace portion would lose to it, whatever its place in sys.path).
    for pkg in ("simserve", os.path.join("simserve", "v1")):
        open(os.path.join(out_dir, pkg, "__init__.py"), "a").close()
    sys.path.insert(0, out_dir)
    from simserve.v1 import similarity_pb2, similarity_pb2_grpc  # noqa: E402 (generated)
    sys.path.pop(0)
    return similarity_pb2, similarity_pb2_grpc


def check(c, shape, values, indices):
    exp = c["expected"]
    want = np.array(exp["values"]).reshape(exp["shape"])
    if list(shape) != exp["shape"]:
        raise AssertionError(f"shape {list(shape)} != {exp['shape']}")
    got = np.frombuffer(values, "<f4").reshape(shape)
    if not np.allclose(got, want, atol=c["atol"], rtol=1e-5):
        bad = np.argmax(np.abs(got - want))
        raise AssertionError(f"value[{bad}] {got.ravel()[bad]} != {want.ravel()[bad]}")
    if c["top_k"]:
        idx = np.frombuffer(indices, "<i4").reshape(shape)
        want_idx = np.array(exp["indices"]).reshape(exp["shape"])
        if not np.array_equal(idx, want_idx):
            raise AssertionError(f"indices {idx.tolist()} != {want_idx.tolist()}")


def channel_for(args, token):
    """A plain grpcio channel: insecure, or TLS trusting args.ca with `token` (None: none) in
    grpc's access-token call credentials."""
    if not args.ca:
        return grpc.insecure_channel(args.addr)
    with open(args.ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(f.read())
    if token is not None:
        creds = grpc.composite_channel_credentials(
            creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(args.addr, creds)


def gallery_checks(args, cases, report):
    """RegisterGallery (header + two data pieces), Compute/ComputeStream by gallery name,
    directory galleries, DeleteGallery, NOT_FOUND after it; with a token, UNAUTHENTICATED
    for a wrong one and none."""
    with tempfile.TemporaryDirectory(prefix="simserve-py-stubs-") as gen:
        pb, pb_grpc = stubs(gen)
        if args.token:
            for label, token in (("wrong token", f"wrong-{args.token}"), ("no token", None)):
                with channel_for(args, token) as channel:
                    try:
                        pb_grpc.SimilarityStub(channel).ListGalleries(
                            pb.ListGalleriesRequest(), timeout=10)
                        report(f"stub {label}", AssertionError("ListGalleries succeeded"))
                    except grpc.RpcError as e:
                        report(f"stub {label}", None if e.code() ==
                               grpc.StatusCode.UNAUTHENTICATED else e)
        with channel_for(args, args.token) as channel:
            stub = pb_grpc.SimilarityStub(channel)
            for c in cases:
                name = f"python-{c['name']}"
                raw = np.array(c["b"]["values"], "<f4").tobytes()
                parts = [pb.RegisterGalleryRequest(header=pb.GalleryHeader(
                             name=name, shape=c["b"]["shape"], dtype=pb.FLOAT32)),
                         pb.RegisterGalleryRequest(data=raw[:len(raw) // 2]),
                         pb.RegisterGalleryRequest(data=raw[len(raw) // 2:])]
                try:
                    info = stub.RegisterGallery(iter(parts), timeout=30)
                    if info.name != name or list(info.shape) != c["b"]["shape"]:
                        raise AssertionError(f"RegisterGallery answered {info}")
                    report(f"gallery register {c['name']}", None)
                except (grpc.RpcError, AssertionError) as e:
                    report(f"gallery register {c['name']}", e)
                    continue
                a = pb.Tensor(shape=c["a"]["shape"], dtype=pb.FLOAT32,
                              raw=np.array(c["a"]["values"], "<f4").tobytes())
                for gallery in (name, f"dir-{c['name']}"):
                    req = pb.ComputeRequest(a=a, gallery=gallery, metric=c["metric"],
                                            top_k=c["top_k"], epsilon=c["epsilon"],
                                            max_chunk_bytes=64)
                    try:
                        r = stub.Compute(req, timeout=30)
                        check(c, r.shape, r.values_raw, r.indices_raw)
                        report(f"gallery unary {gallery}", None)
                    except (grpc.RpcError, AssertionError) as e:
                        report(f"gallery unary {gallery}", e)
                    try:
                        chunks = list(stub.ComputeStream(req, timeout=30))
                        check(c, chunks[0].shape, b"".join(x.values_raw for x in chunks),
                              b"".join(x.indices_raw for x in chunks))
                        report(f"gallery stream {gallery}", None)
                    except (grpc.RpcError, AssertionError) as e:
                        report(f"gallery stream {gallery}", e)
                try:
                    stub.DeleteGallery(pb.DeleteGalleryRequest(name=name), timeout=10)
                    try:
                        stub.GetGallery(pb.GetGalleryRequest(name=name), timeout=10)
                        raise AssertionError("GetGallery found it after DeleteGallery")
                    except grpc.RpcError as e:
                        if e.code() != grpc.StatusCode.NOT_FOUND:
                            raise
                    report(f"gallery delete {c['name']}", None)
                except (grpc.RpcError, AssertionError) as e:
                    report(f"gallery delete {c['name']}", e)


def galleries_main(args, cases) -> int:
    failed = 0

    def report(name, err):
        nonlocal failed
        print(f"{'FAIL' if err else 'ok  '} python {name}{': ' + str(err) if err else ''}")
        failed += err is not None
    gallery_checks(args, cases, report)
    return 1 if failed else 0


def refusals(simserve, args, a, b):
    """(name, error or None): the client with a wrong token and without one."""
    out = []
    for label, token in (("wrong token", f"wrong-{args.token}"), ("no token", None)):
        with simserve.Client(args.addr, root_certificates=args.ca, token=token,
                             timeout=10) as client:
            try:
                client.similarity(a, b, mode="stream")
                out.append((label, AssertionError("the call succeeded")))
            except simserve.UnauthenticatedError:
                out.append((label, None))
            except simserve.Error as e:
                out.append((label, e))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("addr")
    ap.add_argument("cases")
    ap.add_argument("--ca", help="PEM CA of the server's TLS certificate (TLS; else plaintext)")
    ap.add_argument("--token", help="bearer token")
    ap.add_argument("--galleries", action="store_true", help="the gallery child")
    args = ap.parse_args()
    with open(args.cases) as f:
        cases = json.load(f)["cases"]
    if args.galleries:
        return galleries_main(args, cases)
    import simserve  # noqa: E402 (not in the --galleries child: see the docstring)
    passed = failed = 0
    # Small chunks so that even these tiny results arrive in several tiles.
    with simserve.Client(args.addr, root_certificates=args.ca, token=args.token, timeout=30,
                         chunk_bytes=64) as client:
        for c in cases:
            a = np.array(c["a"]["values"], dtype=np.float32).reshape(c["a"]["shape"])
            b = np.array(c["b"]["values"], dtype=np.float32).reshape(c["b"]["shape"])
            exp = c["expected"]
            want = np.array(exp["values"]).reshape(exp["shape"])
            for mode in ("unary", "stream"):
                try:
                    kw = dict(metric=c["metric"].lower(), epsilon=c["epsilon"], mode=mode)
                    if c["top_k"]:
                        got, idx = client.top_k(a, b, c["top_k"], **kw)
                        want_idx = np.array(exp["indices"]).reshape(exp["shape"])
                        if not np.array_equal(idx, want_idx):
                            raise AssertionError(f"indices {idx.tolist()} != {want_idx.tolist()}")
                    else:
                        got = client.similarity(a, b, **kw)
                    if got.shape != want.shape:
                        raise AssertionError(f"shape {got.shape} != {want.shape}")
                    if not np.allclose(got, want, atol=c["atol"], rtol=1e-5):
                        bad = np.argmax(np.abs(got - want))
                        raise AssertionError(f"value[{bad}] {got.ravel()[bad]} != "
                                             f"{want.ravel()[bad]}")
                    passed += 1
                    print(f"ok   python {mode} {c['name']}")
                except (simserve.Error, AssertionError) as e:
                    failed += 1
                    print(f"FAIL python {mode} {c['name']}: {e}")
    if args.token:
        for label, err in refusals(simserve, args, a, b):
            passed, failed = passed + (err is None), failed + (err is not None)
            print(f"{'FAIL' if err else 'ok  '} python {label}{': ' + str(err) if err else ''}")
    tls = ["--ca", args.ca, "--token", args.token] if args.ca else []
    child = subprocess.run([sys.executable, os.path.abspath(__file__), "--galleries",
                            args.addr, args.cases, *tls], capture_output=True, text=True,
                           timeout=200)
    sys.stdout.write(child.stdout)
    sys.stdout.write(child.stderr)
    lines = child.stdout.splitlines()
    passed += sum(line.startswith("ok   python") for line in lines)
    failed += sum(line.startswith("FAIL python") for line in lines)
    if child.returncode and not any(line.startswith("FAIL python") for line in lines):
        failed += 1
        print(f"FAIL python galleries: the child exited with {child.returncode}")
    print(f"python: {passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
