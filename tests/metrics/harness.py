"""Shared helpers of the metrics and load suites: start a `simserve` on loopback ephemeral ports,
scrape and parse its /metrics, generate Python stubs from proto/ at test time, build requests.

Used by tests/metrics/*_test.py and tests/load/*.py. Standard library + numpy + grpcio only.
"""
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROTO_DIR = os.path.join(ROOT, "proto")
PROTO_FILE = os.path.join(PROTO_DIR, "simserve", "v1", "similarity.proto")
SERVICE = "simserve.v1.Similarity"

_SAMPLE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\d+)?$')
_LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def free_port():
    """A currently free loopback TCP port (for tools that cannot bind port 0 themselves)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_stubs():
    """Compiles proto/ with grpc_tools.protoc into a temp dir; returns (pb2, pb2_grpc)."""
    from grpc_tools import protoc  # pylint: disable=import-outside-toplevel
    import grpc_tools  # pylint: disable=import-outside-toplevel
    out = tempfile.mkdtemp(prefix="simserve-stubs-")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out}",
                      f"--grpc_python_out={out}", PROTO_FILE])
    if rc != 0:
        raise RuntimeError(f"protoc failed with {rc}")
    sys.path.insert(0, out)
    from simserve.v1 import similarity_pb2, similarity_pb2_grpc  # pylint: disable=import-error
    return similarity_pb2, similarity_pb2_grpc


class Metrics:
    """A parsed Prometheus text exposition: {(name, frozenset(labels.items())): value}."""

    def __init__(self, text):
        self.text = text
        self.samples = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE_RE.match(line)
            if not m:
                raise ValueError(f"unparsable exposition line: {line!r}")
            labels = dict(_LABEL_RE.findall(m.group(3) or ""))
            self.samples[(m.group(1), frozenset(labels.items()))] = float(m.group(4))

    def get(self, name, **labels):
        """Value of exactly this series; KeyError when absent."""
        key = (name, frozenset(labels.items()))
        if key not in self.samples:
            raise KeyError(f"no series {name}{labels}")
        return self.samples[key]

    def sum(self, name, **labels):
        """Sum over all series of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)

    def series(self, name):
        """Label dicts of every series of `name`."""
        return [dict(ls) for (n, ls) in self.samples if n == name]

    def handled(self, method, code, service=SERVICE):
        return self.sum("grpc_server_handled_total", grpc_service=service, grpc_method=method,
                        grpc_code=code)

    def rpc(self, family, method, service=SERVICE):
        return self.sum(family, grpc_service=service, grpc_method=method)


def histogram_quantile(q, buckets):
    """Prometheus' histogram_quantile on [(upper_bound, cumulative_count)], re-implemented
    independently (linear interpolation inside the bucket, lowest bucket starts at 0)."""
    buckets = sorted(buckets)
    total = buckets[-1][1]
    if total == 0:
        return math.nan
    rank = q * total
    lower, lower_count = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - lower_count) / (count - lower_count)
        lower, lower_count = upper, count
    return buckets[-2][0]


def scrape(port, timeout=5):
    """GET http://127.0.0.1:port/metrics as text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        assert r.status == 200, r.status
        return r.read().decode()


class Server:
    """A `simserve` child process on 127.0.0.1 with ephemeral gRPC and metrics ports.

    Ports are read from the server's startup log line. Use as a context manager; stop() sends
    SIGTERM and waits (then SIGKILL), so no child outlives the test.
    """

    def __init__(self, binary, *flags, cpus=None, env=None):
        cmd = [binary, "--listen=127.0.0.1:0", "--metrics_listen=127.0.0.1:0", *flags]
        if cpus is not None:
            cmd = ["taskset", "-c", cpus, *cmd]
        self.log = []
        self._ready = threading.Event()
        self.port = self.metrics_port = 0
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()

    def _read_log(self):
        for line in self.proc.stderr:
            self.log.append(line)
            m = re.search(r"serving gRPC on \S+ \(port (\d+)\), metrics on \S+ \(port (\d+)\)",
                          line)
            if m:
                self.port, self.metrics_port = int(m.group(1)), int(m.group(2))
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout=120):
        if not self._ready.wait(timeout) or self.port == 0:
            self.stop()
            raise RuntimeError("simserve did not start:\n" + "".join(self.log))
        return self

    @property
    def pid(self):
        return self.proc.pid

    def target(self):
        return f"127.0.0.1:{self.port}"

    def metrics(self):
        return Metrics(scrape(self.metrics_port))

    def stop(self, grace=20):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self.proc.stderr.close()
        return self.proc.returncode

    def __enter__(self):
        return self.wait_ready()

    def __exit__(self, *exc):
        self.stop()


def wait_for(predicate, timeout=10.0, interval=0.02):
    """Polls predicate() until truthy or timeout; returns its last value."""
    deadline = time.monotonic() + timeout
    value = predicate()
    while not value and time.monotonic() < deadline:
        time.sleep(interval)
        value = predicate()
    return value


def make_request(pb2, batch, n, m, d, seed=0, **fields):
    """A ComputeRequest with random float32 A [batch,n,d], B [batch,m,d] as raw bytes."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((batch, n, d), dtype=np.float32)
    b = rng.standard_normal((batch, m, d), dtype=np.float32)
    req = pb2.ComputeRequest(
        a=pb2.Tensor(shape=[batch, n, d], dtype=pb2.FLOAT32, raw=a.tobytes()),
        b=pb2.Tensor(shape=[batch, m, d], dtype=pb2.FLOAT32, raw=b.tobytes()), **fields)
    return req, a, b
