#!/usr/bin/env python3
"""Interop matrix runner: starts the real simserve server on a free loopback port, then lets one
client language send the shared vectors (vectors/cases.json) by unary and server-streaming
calls and compare with the reference; or checks reflection with grpcurl. Galleries: the server
gets a --gallery_dir holding every case's B as dir-<case>.npy (written here with numpy), and
the Go, Node, C++ (simserve-cli) and grpcurl clients register each case's B as a gallery and
query both kinds by name against the same expected values. One CTest test per language (see
CMakeLists.txt). Prints 'N passed, M failed'; exit code 1 on any failure.

--security tls_token runs the same checks against a server with TLS (server1 of
tests/security/make_certs.sh, trusted through ca1) and --auth_token_file: every client
connects with TLS and sends `authorization: Bearer <token>` (CTest: interop_<lang>_tls_token),
and each also checks that a wrong and a missing token get UNAUTHENTICATED (grpcurl: for
reflection too).

Usage: run_interop.py --server BIN --lang {python,go,node,cpp,grpcurl}
                      [--security {plaintext,tls_token}] [--cli simserve-cli] [--work DIR]
Tools (Go plugins, grpcurl, node_modules) come from $SIMSERVE_TOOLS_DIR (default
~/.cache/simserve), installed by scripts/setup.d/40-python-interop.sh.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Tuple

import grpc
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROTO_DIR = os.path.join(ROOT, "proto")
CASES = os.path.join(HERE, "vectors", "cases.json")
TOOLS = os.environ.get("SIMSERVE_TOOLS_DIR", os.path.expanduser("~/.cache/simserve"))
sys.path.insert(0, HERE)
from serverctl import Server  # noqa: E402

TIMEOUT = 240  # per child process; CTest allows the whole test 300 s
MAKE_CERTS = os.path.join(ROOT, "tests", "security", "make_certs.sh")
# The token of --security tls_token: all of RFC 6750's b64token alphabet that the server
# accepts, so that every client is seen to pass it through unchanged.
TOKEN = "interop-Token_1.2~+/=="


@dataclasses.dataclass(frozen=True)
class Security:
    """How the clients reach the server: plaintext (ca None), or TLS trusting `ca` with
    `token` (also written to `token_file`, the CLI's source) on every call."""

    ca: Optional[str] = None
    token: Optional[str] = None
    token_file: Optional[str] = None

    @property
    def wrong_token(self) -> str:
        return f"wrong-{self.token}"


def run(cmd: List[str], **kw) -> subprocess.CompletedProcess:
    """Runs cmd, echoing its output; raises with the output on a non-zero exit."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    sys.stdout.write(p.stdout)
    if p.returncode != 0:
        sys.stdout.write(p.stderr)
    return p


def load_cases() -> list:
    with open(CASES) as f:
        return json.load(f)["cases"]


def go_env() -> dict:
    gopath = os.path.join(TOOLS, "go")
    path = os.pathsep.join([os.path.join(gopath, "bin"), "/usr/local/go/bin",
                            os.environ.get("PATH", "")])
    # Offline: everything was fetched by setup (go.sum pins it); never download at test time.
    return dict(os.environ, GOPATH=gopath, GOMODCACHE=os.path.join(gopath, "pkg", "mod"),
                GOFLAGS="-mod=readonly -modcacherw", GOPROXY="off", PATH=path)


def lang_go(addr: str, work: str, sec: Security) -> int:
    env = go_env()
    src = os.path.join(HERE, "go")
    os.makedirs(work, exist_ok=True)
    for name in ("go.mod", "go.sum", "main.go"):
        shutil.copyfile(os.path.join(src, name), os.path.join(work, name))
    gen = os.path.join(work, "gen")
    shutil.rmtree(gen, ignore_errors=True)
    m = "Msimserve/v1/similarity.proto=simserve.dev/interop/gen/simservev1"
    p = run(["protoc", f"-I{PROTO_DIR}", f"--go_out={work}", "--go_opt=module=simserve.dev/interop",
             f"--go_opt={m}", f"--go-grpc_out={work}",
             "--go-grpc_opt=module=simserve.dev/interop", f"--go-grpc_opt={m}",
             "simserve/v1/similarity.proto"], env=env)
    if p.returncode:
        return p.returncode
    p = run(["go", "build", "-o", "interop", "."], cwd=work, env=env)
    if p.returncode:
        return p.returncode
    tls = ["-ca", sec.ca, "-token", sec.token] if sec.ca else []
    return run([os.path.join(work, "interop"), "-addr", addr, "-cases", CASES, *tls]).returncode


def lang_node(addr: str, sec: Security) -> int:
    env = dict(os.environ, NODE_PATH=os.path.join(TOOLS, "node", "node_modules"))
    tls = [sec.ca, sec.token] if sec.ca else []
    return run(["node", os.path.join(HERE, "node", "interop.js"), addr, CASES, PROTO_DIR, *tls],
               env=env).returncode


def lang_python(addr: str, sec: Security) -> int:
    tls = ["--ca", sec.ca, "--token", sec.token] if sec.ca else []
    return run([sys.executable, os.path.join(HERE, "python_interop.py"), addr, CASES,
                *tls]).returncode


def compare(c: dict, values: np.ndarray, indices) -> str:
    exp = c["expected"]
    want = np.array(exp["values"]).reshape(exp["shape"])
    if list(values.shape) != exp["shape"]:
        return f"shape {list(values.shape)} != {exp['shape']}"
    if not np.allclose(values, want, atol=c["atol"], rtol=1e-5):
        i = int(np.argmax(np.abs(values - want)))
        return f"value[{i}] {values.ravel()[i]} != {want.ravel()[i]}"
    if c["top_k"]:
        want_idx = np.array(exp["indices"]).reshape(exp["shape"])
        if indices is None or not np.array_equal(indices, want_idx):
            return f"indices {None if indices is None else indices.tolist()} != {want_idx.tolist()}"
    return ""


def tally(results: List[Tuple[str, str]], lang: str) -> int:
    failed = 0
    for name, err in results:
        print(f"{'FAIL' if err else 'ok  '} {lang} {name}{': ' + err if err else ''}")
        failed += bool(err)
    print(f"{lang}: {len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


def lang_cpp(addr: str, cli: str, sec: Security) -> int:
    metric = {"COSINE": "cosine", "DOT": "dot", "EUCLIDEAN": "euclidean",
              "SQUARED_EUCLIDEAN": "sqeuclidean"}
    tls = [f"--tls_ca_file={sec.ca}"] if sec.ca else []
    base = [cli, f"--target={addr}", *tls,
            *([f"--token_file={sec.token_file}"] if sec.token_file else [])]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in load_cases():
            a_path, b_path = os.path.join(tmp, "a.npy"), os.path.join(tmp, "b.npy")
            np.save(a_path, np.array(c["a"]["values"], np.float32).reshape(c["a"]["shape"]))
            np.save(b_path, np.array(c["b"]["values"], np.float32).reshape(c["b"]["shape"]))
            for mode in ("unary", "stream"):
                out, idx_out = os.path.join(tmp, "s.npy"), os.path.join(tmp, "i.npy")
                for f in (out, idx_out):
                    if os.path.exists(f):
                        os.unlink(f)
                p = run(base + [f"--a={a_path}", f"--b={b_path}", f"--out={out}",
                                f"--indices_out={idx_out}", f"--metric={metric[c['metric']]}",
                                f"--top_k={c['top_k']}", f"--epsilon={c['epsilon']!r}",
                                f"--mode={mode}", "--max_chunk_bytes=64", "--timeout_ms=30000"])
                if p.returncode:
                    results.append((f"{mode} {c['name']}", f"exit {p.returncode}: {p.stderr}"))
                    continue
                idx = np.load(idx_out) if c["top_k"] else None
                results.append((f"{mode} {c['name']}", compare(c, np.load(out), idx)))
            results += cpp_gallery(base, tmp, c, a_path, b_path, metric[c["metric"]])
        if sec.token:  # the last case's files are still there
            for label, token in (("wrong token", [f"--token={sec.wrong_token}"]),
                                 ("no token", [])):
                for what, command in (("info", ["--info"]), ("stream", [
                        f"--a={a_path}", f"--b={b_path}", "--mode=stream"])):
                    p = run([cli, f"--target={addr}", *tls, *token, *command])
                    ok = p.returncode == 1 and "UNAUTHENTICATED" in p.stderr
                    results.append((f"{label} {what}",
                                    "" if ok else f"exit {p.returncode}: {p.stderr.strip()}"))
    return tally(results, "cpp")


def cpp_gallery(base: List[str], tmp: str, c: dict, a_path: str, b_path: str,
                metric: str) -> List[Tuple[str, str]]:
    """simserve-cli: registers the case's B as a gallery, queries it and dir-<case> by name."""
    name, results = f"cpp-{c['name']}", []
    base = base + ["--timeout_ms=30000"]
    p = run(base + [f"--register_gallery={name}", f"--b={b_path}", "--json"])
    info = json.loads(p.stdout) if p.returncode == 0 else {}
    ok = info.get("name") == name and [int(d) for d in info.get("shape", [])] == c["b"]["shape"]
    results.append((f"gallery register {c['name']}", "" if ok else f"exit {p.returncode}: "
                    f"{p.stderr.strip()} {info}"))
    if not ok:
        return results
    calls = [(m, name, m) for m in ("unary", "stream", "upload")] + \
        [("directory", f"dir-{c['name']}", "unary")]
    for label, gallery, mode in calls:
        out, idx_out = os.path.join(tmp, "gs.npy"), os.path.join(tmp, "gi.npy")
        for f in (out, idx_out):
            if os.path.exists(f):
                os.unlink(f)
        p = run(base + [f"--a={a_path}", f"--gallery={gallery}", f"--out={out}",
                        f"--indices_out={idx_out}", f"--metric={metric}",
                        f"--top_k={c['top_k']}", f"--epsilon={c['epsilon']!r}", f"--mode={mode}",
                        "--max_chunk_bytes=64"])
        if p.returncode:
            results.append((f"gallery {label} {c['name']}", f"exit {p.returncode}: {p.stderr}"))
            continue
        idx = np.load(idx_out) if c["top_k"] else None
        results.append((f"gallery {label} {c['name']}", compare(c, np.load(out), idx)))
    p = run(base + [f"--a={a_path}", f"--gallery={name}",
                    f"--gallery_version={int(info['version']) + 1}"])
    results.append((f"gallery wrong version {c['name']}",
                    "" if p.returncode == 1 and "FAILED_PRECONDITION" in p.stderr
                    else f"exit {p.returncode}: {p.stderr.strip()}"))
    p = run(base + [f"--delete_gallery={name}"])
    results.append((f"gallery delete {c['name']}", "" if p.returncode == 0 else p.stderr))
    return results


def grpcurl_json(p: subprocess.CompletedProcess) -> list:
    """grpcurl prints one JSON object per response message."""
    dec, text, i, out = json.JSONDecoder(), p.stdout, 0, []
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = dec.raw_decode(text, i)
        out.append(obj)


def lang_grpcurl(addr: str, sec: Security) -> int:
    """Reflection only (no proto file): list, describe, GetInfo, and a Compute/ComputeStream
    sent as JSON `values` (the convenience path for JSON tools). With TLS and a token: -H
    sends it on reflection and calls alike."""
    tool = os.path.join(TOOLS, "go", "bin", "grpcurl")
    transport = ["-cacert", sec.ca] if sec.ca else ["-plaintext"]
    base = [tool, *transport, "-max-time", "30"]
    if sec.token:
        base += ["-H", f"authorization: Bearer {sec.token}"]
    results = grpcurl_refusals(tool, transport, addr, sec) if sec.token else []
    p = run(base + [addr, "list"])
    services = p.stdout.split()
    results.append(("list", "" if p.returncode == 0 and "simserve.v1.Similarity" in services
                    and "grpc.health.v1.Health" in services else f"services: {services}"))
    p = run(base + [addr, "describe", "simserve.v1.Similarity"])
    results.append(("describe", "" if all(m in p.stdout for m in (
        "rpc Compute", "rpc ComputeStream", "rpc ComputeUpload", "rpc GetInfo",
        "rpc RegisterGallery", "rpc GetGallery", "rpc ListGalleries", "rpc DeleteGallery"))
        else "methods missing"))
    # The health service is described through reflection too (no health.proto needed).
    p = run(base + ["-d", "{}", addr, "grpc.health.v1.Health/Check"])
    health = grpcurl_json(p)[0] if p.returncode == 0 else {}
    results.append(("Health/Check", "" if health.get("status") == "SERVING"
                    else f"exit {p.returncode}: {p.stderr.strip()} {health}"))
    p = run(base + ["-d", "{}", addr, "simserve.v1.Similarity/GetInfo"])
    info = grpcurl_json(p)[0] if p.returncode == 0 else {}
    limits = info.get("limits", {})
    ok = info.get("version") and int(limits.get("max_receive_message_bytes",
                                                limits.get("maxReceiveMessageBytes", 0))) > 0
    results.append(("GetInfo", "" if ok else f"GetInfo answered {info}"))
    for c in [c for c in load_cases() if not c["top_k"]][:2]:
        req = json.dumps({
            "a": {"shape": c["a"]["shape"], "values": {"values": c["a"]["values"]}},
            "b": {"shape": c["b"]["shape"], "values": {"values": c["b"]["values"]}},
            "metric": c["metric"], "epsilon": c["epsilon"], "maxChunkBytes": 64})
        for method in ("Compute", "ComputeStream"):
            p = run(base + ["-d", "@", addr, f"simserve.v1.Similarity/{method}"], input=req)
            if p.returncode:
                results.append((f"{method} {c['name']}", f"exit {p.returncode}: {p.stderr}"))
                continue
            msgs = grpcurl_json(p)
            # grpcurl prints proto field names (values_raw); accept the JSON camelCase too.
            raw = b"".join(base64.b64decode(m.get("values_raw", m.get("valuesRaw", "")))
                           for m in msgs)
            vals = np.frombuffer(raw, "<f4").reshape([int(d) for d in msgs[0]["shape"]])
            results.append((f"{method} {c['name']}", compare(c, vals, None)))
    results += grpcurl_gallery(base, addr)
    return tally(results, "grpcurl")


def grpcurl_refusals(tool: str, transport: List[str], addr: str,
                     sec: Security) -> List[Tuple[str, str]]:
    """Without the token reflection is refused; a call whose reflection carries the token but
    the call itself a wrong one, or none, is UNAUTHENTICATED."""
    results = []
    base = [tool, *transport, "-max-time", "30"]
    right = f"authorization: Bearer {sec.token}"
    wrong = f"authorization: Bearer {sec.wrong_token}"
    for label, headers in (("list without a token", []),
                           ("list with a wrong token", ["-H", wrong])):
        p = run(base + headers + [addr, "list"])
        ok = p.returncode != 0 and "Unauthenticated" in p.stderr and \
            "simserve.v1.Similarity" not in p.stdout
        results.append((label, "" if ok else f"exit {p.returncode}: {p.stderr.strip()}"))
    for label, headers in (("GetInfo with a wrong token", ["-rpc-header", wrong]),
                           ("GetInfo without a token", [])):
        p = run(base + ["-reflect-header", right, *headers, "-d", "{}", addr,
                        "simserve.v1.Similarity/GetInfo"])
        ok = p.returncode != 0 and "Code: Unauthenticated" in p.stderr
        results.append((label, "" if ok else f"exit {p.returncode}: {p.stderr.strip()}"))
    return results


def field(msg: dict, name: str, default=None):
    """A field of grpcurl's JSON by proto name or its camelCase JSON name."""
    camel = name.split("_")[0] + "".join(w.title() for w in name.split("_")[1:])
    return msg.get(name, msg.get(camel, default))


def grpcurl_gallery(base: List[str], addr: str) -> List[Tuple[str, str]]:
    """RegisterGallery as a client stream of JSON messages (header, then base64 data pieces),
    Compute/ComputeStream with gallery=name and with a --gallery_dir gallery, GetGallery,
    ListGalleries, DeleteGallery and the error codes, all through reflection."""
    results = []
    svc = "simserve.v1.Similarity"

    def call(method: str, req) -> Tuple[subprocess.CompletedProcess, list]:
        text = req if isinstance(req, str) else json.dumps(req)
        p = run(base + ["-d", "@", addr, f"{svc}/{method}"], input=text)
        return p, (grpcurl_json(p) if p.returncode == 0 else [])

    def want_code(p: subprocess.CompletedProcess, code: str) -> str:
        return "" if p.returncode != 0 and f"Code: {code}" in p.stderr \
            else f"exit {p.returncode}: {p.stderr.strip()} (want {code})"

    for c in [c for c in load_cases() if not c["top_k"]][:2]:
        name = f"grpcurl-{c['name']}"
        raw = np.array(c["b"]["values"], "<f4").tobytes()
        half = len(raw) // 2
        # Several messages on stdin make a client stream; bytes are base64 in JSON.
        stream = "\n".join(json.dumps(m) for m in (
            {"header": {"name": name, "shape": c["b"]["shape"], "dtype": "FLOAT32"}},
            {"data": base64.b64encode(raw[:half]).decode()},
            {"data": base64.b64encode(raw[half:]).decode()}))
        p, msgs = call("RegisterGallery", stream)
        info = msgs[0] if msgs else {}
        ok = info.get("name") == name and \
            [int(d) for d in info.get("shape", [])] == c["b"]["shape"] and \
            int(info.get("version", 0)) >= 1
        results.append((f"RegisterGallery {c['name']}",
                        "" if ok else f"exit {p.returncode}: {p.stderr.strip()} {info}"))
        for gallery in (name, f"dir-{c['name']}"):
            req = {"a": {"shape": c["a"]["shape"], "values": {"values": c["a"]["values"]}},
                   "gallery": gallery, "metric": c["metric"], "epsilon": c["epsilon"],
                   "maxChunkBytes": 64}
            for method in ("Compute", "ComputeStream"):
                label = f"{method} gallery={gallery}"
                p, msgs = call(method, req)
                if p.returncode or not msgs:
                    results.append((label, f"exit {p.returncode}: {p.stderr}"))
                    continue
                raw_out = b"".join(base64.b64decode(field(m, "values_raw", "")) for m in msgs)
                vals = np.frombuffer(raw_out, "<f4").reshape([int(d) for d in msgs[0]["shape"]])
                results.append((label, compare(c, vals, None)))
        p, msgs = call("Compute", {"a": {"shape": c["a"]["shape"],
                                         "values": {"values": c["a"]["values"]}},
                                   "gallery": name,
                                   "galleryVersion": int(info.get("version", 0)) + 1})
        results.append((f"Compute wrong version {c['name']}",
                        want_code(p, "FailedPrecondition")))
    first = load_cases()[0]["name"]
    p, msgs = call("GetGallery", {"name": f"dir-{first}"})
    g = msgs[0] if msgs else {}
    results.append(("GetGallery directory", "" if g.get("source") == "DIRECTORY" and
                    field(g, "path", "").endswith(f"dir-{first}.npy") else f"{p.stderr} {g}"))
    p, msgs = call("ListGalleries", {})
    names = [g["name"] for g in (msgs[0].get("galleries", []) if msgs else [])]
    ok = names == sorted(names) and f"dir-{first}" in names and \
        any(n.startswith("grpcurl-") for n in names)
    results.append(("ListGalleries", "" if ok else f"{p.stderr} {names}"))
    for n in [n for n in names if n.startswith("grpcurl-")]:
        p, msgs = call("DeleteGallery", {"name": n})
        deleted = field(msgs[0], "deleted", {}) if msgs else {}
        results.append((f"DeleteGallery {n}", "" if deleted.get("name") == n
                        else f"exit {p.returncode}: {p.stderr} {msgs}"))
    p, _ = call("GetGallery", {"name": "grpcurl-never-registered"})
    results.append(("GetGallery unknown", want_code(p, "NotFound")))
    p, _ = call("DeleteGallery", {"name": f"dir-{first}"})
    results.append(("DeleteGallery directory", want_code(p, "FailedPrecondition")))
    p, _ = call("RegisterGallery", {"header": {"name": "bad name", "shape": [1, 2]}})
    results.append(("RegisterGallery bad name", want_code(p, "InvalidArgument")))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", required=True, help="path of the simserve binary")
    ap.add_argument("--lang", required=True, choices=["python", "go", "node", "cpp", "grpcurl"])
    ap.add_argument("--security", choices=["plaintext", "tls_token"], default="plaintext",
                    help="tls_token: the server serves TLS and requires a bearer token")
    ap.add_argument("--cli", help="path of simserve-cli (--lang cpp)")
    ap.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "simserve-interop-go"),
                    help="build directory for the Go client")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="simserve-interop-galleries-") as galleries:
        # Every case's B as a directory gallery, loaded by the server before it is SERVING.
        for c in load_cases():
            b = np.array(c["b"]["values"], np.float32).reshape(c["b"]["shape"])
            np.save(os.path.join(galleries, f"dir-{c['name']}.npy"), b)
        server_args = [f"--gallery_dir={galleries}"]
        if args.security == "plaintext":
            return run_lang(args, server_args, Security(), None)
        # TLS + token: fresh certificates and a token file next to the galleries' directory.
        with tempfile.TemporaryDirectory(prefix="simserve-interop-tls-") as d:
            subprocess.run(["bash", MAKE_CERTS, d], check=True)
            with open(os.path.join(d, "tokens"), "w") as f:
                f.write(f"# interop\nanother-token\n{TOKEN}\n")
            with open(os.path.join(d, "client_token"), "w") as f:
                f.write(f"{TOKEN}\n")
            server_args += [f"--tls_cert_file={d}/server1.crt", f"--tls_key_file={d}/server1.key",
                            f"--auth_token_file={d}/tokens"]
            with open(f"{d}/ca1.crt", "rb") as f:
                creds = grpc.ssl_channel_credentials(f.read())
            sec = Security(ca=f"{d}/ca1.crt", token=TOKEN, token_file=f"{d}/client_token")
            return run_lang(args, server_args, sec, creds)


def run_lang(args: argparse.Namespace, server_args: List[str], sec: Security,
             creds: Optional[grpc.ChannelCredentials]) -> int:
    with Server(args.server, extra_args=server_args, credentials=creds) as srv:
        if args.lang == "go":
            return lang_go(srv.address, args.work, sec)
        if args.lang == "node":
            return lang_node(srv.address, sec)
        if args.lang == "python":
            return lang_python(srv.address, sec)
        if args.lang == "cpp":
            return lang_cpp(srv.address, args.cli, sec)
        return lang_grpcurl(srv.address, sec)


if __name__ == "__main__":
    sys.exit(main())
