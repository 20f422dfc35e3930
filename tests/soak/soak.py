#!/usr/bin/env python3
"""Soak test of simserve: mixed traffic at a fixed total rate against the real server binary,
with the server's memory, open file descriptors and threads sampled every 10 s.

Traffic (all kinds at once, each at a constant rate; ghz for the first seven, one Python
thread for the cancels). Calls/s at the default --rate 32:

  small (20)          Compute        1 x 8 x 256 x 128                     -> OK
  medium (4)          Compute        4 x 64 x 512 x 128                    -> OK
  stream (1)          ComputeStream  8 x 400 x 500 x 200 (8 chunks)        -> OK
  upload (1)          ComputeUpload  2 x 256 x 1024 x 128, 64 KiB pieces   -> OK
  bad (3, ~9.4 %)     Compute        D mismatch, NaN, unknown dtype, wrong byte length,
                                     top_k > M, in turn                    -> INVALID_ARGUMENT
  deadline (1)        ComputeStream  1 x 2048 x 4096 x 32 (32 chunks), 20 ms deadline
                                                                -> DEADLINE_EXCEEDED or OK
  deadline-unary (1)  Compute        the medium request, 2 ms deadline -> DEADLINE_EXCEEDED or OK
  cancel-* (1)        Python, in turn: a stream cancelled after its first chunk, a medium
                      unary call cancelled after 2 ms, an upload cancelled after its first
                      chunk with a quarter of the data unsent -> CANCELLED (unary: or OK)

The deadline kinds may also end INTERNAL "unexpected EOF": the server's deadline fired while
the response was on the wire, gRPC then ends the stream with RST_STREAM (trailers cannot follow
a partial message) and grpc-go (ghz) reports that as Internal "unexpected EOF" (deadlines over
HTTP/2 are best effort: grpc/grpc#2685, grpc/grpc-go#8294). Only that exact error is accepted.

Warm-up: first a burst (BURST_SECONDS at BURST_RATE times every kind's rate, the same
concurrency: the overlaps of kinds that take the paced run many minutes to meet happen at
once, so the allocator and the buffer pool reach their working set), then the first
min(20 % of the run, 60 s) of the paced run. Samples are taken every 10 s of the paced run
and at the warm-up end; "reference" = the maximum over the samples up to the warm-up end,
"late" = the maximum over the samples in the last third of the run.

Fails (exit 1, each reason printed) on:
  * RSS growth: late > 1.10 x reference AND the median of the last third > 1.10 x the median
    of the first third after the warm-up. The server returns freed heap pages
    (--memory_release_delay, --malloc_arena_max), so RSS follows the memory in use and swings
    with the traffic of the moment by +-30 %: the maximum of 20 late samples beats the
    maximum of 7 early ones by chance, and the medians of 2-3 samples of a short run swing as
    much. Growth (a leak, fragmentation that creeps) raises both the peak and the typical
    level, so it must show in both;
  * fds: late > reference + 8; threads: late > reference + 4 (a count that keeps growing);
  * any call (burst included) with a status outside its kind's set above; no call at all of a
    kind; a deadline / cancel kind without a single DEADLINE_EXCEEDED / CANCELLED.
    RESOURCE_EXHAUSTED is never expected: the rates stay far below the queue and in-flight
    limits;
  * the server's grpc_server_handled_total with a code other than OK, InvalidArgument,
    DeadlineExceeded, Canceled; its InvalidArgument count other than the bad calls plus the
    known misreports in MISLABELS (which must stay within the deadline and cancel calls);
  * after the traffic: Health not SERVING, a small Compute not equal to scikit-learn's
    cosine, or an exit code other than 0 on SIGTERM.

Usage: soak.py --server build/release/server/simserve [--duration 600] [--rate 32]
                [--server-arg=--some_flag=value ...]
"""
import argparse
import collections
import datetime
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "load"))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
import gen_requests  # noqa: E402  pylint: disable=wrong-import-position
import loadlib  # noqa: E402  pylint: disable=wrong-import-position
import reference  # noqa: E402  pylint: disable=wrong-import-position
from loadlib import harness  # noqa: E402  pylint: disable=wrong-import-position

SAMPLE_SECONDS = 10
BURST_SECONDS = 15
BURST_RATE = 5  # the burst runs the mix at this multiple of the paced rates
RSS_GROWTH = 0.10  # for the maximum and the median alike (see the rules above)
FD_SLACK = 8
THREAD_SLACK = 4
OK, INVALID, DEADLINE, CANCELLED = "OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED"
DEADLINE_RACE = "rpc error: code = Internal desc = unexpected EOF"

SHAPES = {  # request name: (method, batch, N, M, D, extra request fields)
    "small": ("Compute", 1, 8, 256, 128, {}),
    "medium": ("Compute", 4, 64, 512, 128, {}),
    "stream": ("ComputeStream", 8, 400, 500, 200, {}),
    "upload": ("ComputeUpload", 2, 256, 1024, 128, {}),
    # little input, much output: the deadline expires while tiles stream, not while the
    # request is still being received
    "deadline": ("ComputeStream", 1, 2048, 4096, 32, {}),
}
UPLOAD_PIECE = 64 << 10

# kind: (request, method, calls/s at the default rate, ghz concurrency, ghz --timeout,
#        expected codes, codes that must appear)
GHZ_KINDS = {
    "small": ("small", "Compute", 20, 1, "60s", {OK}, {OK}),
    "medium": ("medium", "Compute", 4, 1, "60s", {OK}, {OK}),
    "stream": ("stream", "ComputeStream", 1, 1, "60s", {OK}, {OK}),
    "upload": ("upload", "ComputeUpload", 1, 1, "60s", {OK}, {OK}),
    "bad": ("bad", "Compute", 3, 1, "60s", {INVALID}, {INVALID}),
    "deadline": ("deadline", "ComputeStream", 1, 1, "20ms", {OK, DEADLINE}, {DEADLINE}),
    "deadline-unary": ("medium", "Compute", 1, 1, "2ms", {OK, DEADLINE}, {DEADLINE}),
}
CANCEL_RATE = 1  # cancels per second at the default rate, the variants in turn
CANCEL_KINDS = {"cancel-stream": ({CANCELLED}, {CANCELLED}),
                "cancel-unary": ({CANCELLED, OK}, {CANCELLED}),
                "cancel-upload": ({CANCELLED}, {CANCELLED})}
DEFAULT_RATE = sum(k[2] for k in GHZ_KINDS.values()) + CANCEL_RATE
SERVER_CODES = {"OK", "InvalidArgument", "DeadlineExceeded", "Canceled"}
# Known server misreports (the client sees DEADLINE_EXCEEDED / CANCELLED, the server logs and
# counts INVALID_ARGUMENT): message start -> what the call really was.
MISLABELS = {
    "tensor a is missing or empty": "deadline expired or cancelled before the request arrived",
    "upload stream ended early": "upload cancelled by the client",
}
FAILED_RE = re.compile(r"simserve: (\w+) failed: ([A-Z_]+): (.*) \(peer ")


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def canonical(code):
    """Upper snake case gRPC code name from ghz's Go spelling ("DeadlineExceeded", "Canceled")
    or a grpc.StatusCode."""
    if isinstance(code, grpc.StatusCode):
        return code.name
    if code in ("OK", "Canceled"):
        return {"OK": OK, "Canceled": CANCELLED}[code]
    return "".join("_" + c if c.isupper() and i else c for i, c in enumerate(code)).upper()


# ---- requests ----

def delimited(messages):
    """Serialized messages, each after its varint length (ghz's format for several)."""
    out = bytearray()
    for m in messages:
        data = m.SerializeToString()
        n = len(data)
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                break
        out += data
    return bytes(out)


def upload_messages(pb2, req, batch):
    """UploadRequest messages of `req`: the header, then B[k] and A[k] per batch entry in
    UPLOAD_PIECE pieces (interleaved, as simserve's clients send them)."""
    header = pb2.ComputeRequest()
    header.CopyFrom(req)
    header.a.ClearField("raw")
    header.b.ClearField("raw")
    msgs = [pb2.UploadRequest(header=pb2.UploadHeader(request=header))]
    for k in range(batch):
        for field, data in (("b_data", req.b.raw), ("a_data", req.a.raw)):
            entry = data[k * len(data) // batch:(k + 1) * len(data) // batch]
            for off in range(0, len(entry), UPLOAD_PIECE):
                msgs.append(pb2.UploadRequest(**{field: entry[off:off + UPLOAD_PIECE]}))
    return msgs


def bad_requests(pb2):
    """One request per kind of bad input, each INVALID_ARGUMENT."""
    def small(**fields):
        return gen_requests.build_shape(pb2, "Compute", 1, 8, 256, 128, fields, seed=7)[1]
    d_mismatch = small()
    d_mismatch.b.shape[2] = 64
    d_mismatch.b.raw = d_mismatch.b.raw[:len(d_mismatch.b.raw) // 2]
    nan = small()
    a = np.frombuffer(nan.a.raw, dtype="<f4").copy()
    a[37] = np.nan
    nan.a.raw = a.tobytes()
    dtype = small()
    dtype.a.dtype = 7  # not a DataType
    length = small()
    length.a.raw = length.a.raw[:-4]
    return [d_mismatch, nan, dtype, length, small(top_k=257)]


def write_requests(pb2, out_dir):
    """Writes the ghz request files; returns ({name: path}, {name: request}, upload messages
    as bytes)."""
    reqs = {name: gen_requests.build_shape(pb2, *shape)[1] for name, shape in SHAPES.items()}
    upload = upload_messages(pb2, reqs["upload"], SHAPES["upload"][1])
    files = {name: delimited([r]) for name, r in reqs.items() if name != "upload"}
    files["upload"] = delimited(upload)
    files["bad"] = delimited(bad_requests(pb2))
    paths = {}
    for name, data in files.items():
        if b"{{" in data:  # ghz runs binary call data through Go's text/template
            raise RuntimeError(f"{name}: request file contains '{{{{'")
        paths[name] = os.path.join(out_dir, name + ".bin")
        with open(paths[name], "wb") as f:
            f.write(data)
    return paths, reqs, [m.SerializeToString() for m in upload]


# ---- traffic ----

class Canceller(threading.Thread):
    """Python calls cancelled mid-flight, the CANCEL_KINDS variants in turn at `rate` per
    second for `duration` s (unpaced if rate is None)."""

    def __init__(self, target, rate, duration, reqs, upload):
        super().__init__(daemon=True)
        self.target, self.rate, self.duration = target, rate, duration
        self.stream_req = reqs["stream"].SerializeToString()
        self.unary_req = reqs["medium"].SerializeToString()
        self.upload = upload
        self.results = {k: [] for k in CANCEL_KINDS}  # kind -> [(code, seconds)]
        self.error = None

    def run(self):
        try:
            with grpc.insecure_channel(self.target) as ch:
                method = f"/{harness.SERVICE}/"
                variants = [
                    ("cancel-stream", self._stream, ch.unary_stream(method + "ComputeStream")),
                    ("cancel-unary", self._unary, ch.unary_unary(method + "Compute")),
                    ("cancel-upload", self._upload, ch.stream_stream(method + "ComputeUpload"))]
                start = time.monotonic()
                i = 0
                while time.monotonic() < start + self.duration:
                    kind, call, stub = variants[i % len(variants)]
                    t0 = time.monotonic()
                    code = call(stub)
                    self.results[kind].append((canonical(code), time.monotonic() - t0))
                    i += 1
                    if self.rate:
                        time.sleep(max(0.0, start + i / self.rate - time.monotonic()))
        except Exception as e:  # pylint: disable=broad-except
            self.error = e

    def _stream(self, stub):
        call = stub(self.stream_req, timeout=60)
        next(call)
        call.cancel()
        return call.code()

    def _unary(self, stub):
        future = stub.future(self.unary_req, timeout=60)
        time.sleep(0.002)
        future.cancel()
        return future.code()

    def _upload(self, stub):
        release = threading.Event()

        def requests():  # the header and the first three quarters of the pieces
            yield from self.upload[:1 + (len(self.upload) - 1) * 3 // 4]
            release.wait(30)

        call = stub(requests(), timeout=60)
        next(call)
        call.cancel()
        release.set()
        return call.code()


def start_ghz(ghz, target, kind, path, duration, tmp, rate=None):
    """Starts one ghz of `kind` for `duration` s, at `rate` calls/s (None: unpaced); its JSON
    report is written when it ends (finish_ghz)."""
    _, method, _, conc, timeout, _, _ = GHZ_KINDS[kind]
    out, err = (os.path.join(tmp, f"{kind}-{rate}.{ext}") for ext in ("json", "err"))
    cmd = loadlib.ghz_command(ghz, target, f"{harness.SERVICE}/{method}", binary_file=path,
                              concurrency=conc, cpus=1, timeout=timeout, output=out, rps=rate,
                              duration=f"{duration:.0f}s", extra=["--count-errors"])
    with open(err, "w") as ef:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=ef)
    return {"proc": proc, "out": out, "err": err}


def finish_ghz(p):
    """(report, None) of a ghz started by start_ghz, or (None, its stderr)."""
    rc = p["proc"].wait()
    if rc != 0 or not os.path.exists(p["out"]):
        with open(p["err"]) as f:
            return None, f"ghz exited {rc}: {f.read()[-2000:]}"
    with open(p["out"]) as f:
        return json.load(f), None


class Phase:
    """Every traffic kind at once for `duration` s: ghz at `rates` (None: unpaced) and the
    cancel thread at `cancel_rate`."""

    def __init__(self, ghz, target, paths, reqs, upload, duration, tmp, rates, cancel_rate):
        self.procs = {kind: start_ghz(ghz, target, kind, paths[GHZ_KINDS[kind][0]], duration,
                                      tmp, rates[kind] if rates else None)
                      for kind in GHZ_KINDS}
        self.canceller = Canceller(target, cancel_rate, duration, reqs, upload)
        self.canceller.start()

    def running(self):
        return [k for k, p in self.procs.items() if p["proc"].poll() is None]

    def finish(self, failures):
        """Rows (kind, calls, {code: n}, p50 ms, p99 ms) of every kind; appends the status
        rule failures."""
        rows = []
        for kind, p in self.procs.items():
            report, error = finish_ghz(p)
            if report is None:
                failures.append(f"{kind}: {error}")
                continue
            codes = collections.Counter()
            for code, n in (report.get("statusCodeDistribution") or {}).items():
                codes[canonical(code)] += n
            errors = report.get("errorDistribution") or {}
            if (DEADLINE in GHZ_KINDS[kind][5] and codes.get("INTERNAL")
                    and codes["INTERNAL"] == errors.get(DEADLINE_RACE)):
                codes["INTERNAL (deadline race)"] = codes.pop("INTERNAL")
            s = loadlib.summarise(report)
            rows.append((kind, s["count"], dict(codes), s["p50"], s["p99"]))
            expected = GHZ_KINDS[kind][5] | {"INTERNAL (deadline race)"}
            check_codes(failures, kind, codes, expected, GHZ_KINDS[kind][6], errors)
        self.canceller.join(120)
        if self.canceller.is_alive() or self.canceller.error is not None:
            failures.append(f"cancel client failed: {self.canceller.error!r}")
        for kind, results in self.canceller.results.items():
            codes = collections.Counter(code for code, _ in results)
            secs = [1e3 * t for _, t in results]
            pct = [float(np.percentile(secs, q)) if secs else None for q in (50, 99)]
            rows.append((kind, len(results), dict(codes), *pct))
            check_codes(failures, kind, codes, *CANCEL_KINDS[kind], None)
        return rows


def check_codes(failures, kind, codes, expected, required, errors):
    extra = {c: n for c, n in codes.items() if c not in expected}
    if extra:
        failures.append(f"{kind}: unexpected statuses {extra} (expected {sorted(expected)})"
                        + (f"; ghz errors {errors}" if errors else ""))
    for code in required:
        if not codes.get(code):
            failures.append(f"{kind}: no call ended {code} (codes {dict(codes)})")


# ---- resources and server-side checks ----

def sample_until(server, t0, duration, warmup):
    """Samples the server every SAMPLE_SECONDS and at the warm-up end until `duration` s after
    t0, printing a progress line per sample."""
    samples = []
    for t in sorted({*range(0, int(duration) + 1, SAMPLE_SECONDS), warmup, duration}):
        time.sleep(max(0.0, t0 + t - time.monotonic()))
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited with {server.proc.returncode}:\n"
                               + "".join(server.log[-20:]))
        s = dict(t=time.monotonic() - t0, **loadlib.proc_resources(server.pid))
        samples.append(s)
        handled = handled_codes(server.metrics())
        log(f"t={s['t']:4.0f}s rss {s['rss_bytes'] / 2**20:6.1f} MiB  fds {s['fds']:3d}  "
            f"threads {s['threads']:3d}  handled {sum(handled.values()):.0f} "
            + " ".join(f"{c} {n:.0f}" for c, n in sorted(handled.items())))
    return samples


def handled_codes(metrics):
    """{grpc_code: calls} of simserve.v1.Similarity from grpc_server_handled_total."""
    codes = collections.Counter()
    for labels in metrics.series("grpc_server_handled_total"):
        if labels.get("grpc_service") == harness.SERVICE:
            codes[labels["grpc_code"]] += metrics.get("grpc_server_handled_total", **labels)
    return {c: n for c, n in codes.items() if n}


def check_resources(samples, warmup, duration, rss_growth=RSS_GROWTH):
    """The failures of the RSS / fd / thread rules (RSS: `rss_growth` for the maximum and
    the median), and the table's figures."""
    ref = [s for s in samples if s["t"] <= warmup + 0.5]
    late = [s for s in samples if duration * 2 / 3 <= s["t"] <= duration + 0.5]
    failures, figures = [], {}
    settled = [s for s in samples
               if warmup - 0.5 <= s["t"] <= warmup + (duration - warmup) / 3 + 0.5]
    settled_median = float(np.median([s["rss_bytes"] for s in settled]))
    late_median = float(np.median([s["rss_bytes"] for s in late]))
    figures["rss_medians"] = dict(settled=settled_median, late=late_median,
                                  limit=settled_median * (1 + rss_growth))
    median_grew = late_median > settled_median * (1 + rss_growth)
    for key, growth, slack in (("rss_bytes", rss_growth, 0), ("fds", 0, FD_SLACK),
                               ("threads", 0, THREAD_SLACK)):
        r, l = max(s[key] for s in ref), max(s[key] for s in late)
        limit = r * (1 + growth) + slack
        figures[key] = dict(warmup_end=ref[-1][key], reference=r, late=l, end=late[-1][key],
                            max=max(s[key] for s in samples), limit=limit)
        if l > limit and (key != "rss_bytes" or median_grew):
            failures.append(f"{key} grew: last third max {l} > limit {limit:.0f} "
                            f"(warm-up max {r})" + (
                                f", and its median {late_median:.0f} > "
                                f"{settled_median * (1 + rss_growth):.0f}" if key == "rss_bytes"
                                else ""))
    return failures, figures


def check_server(failures, lines, codes, bad_calls, deadline_cancel_calls):
    """The server's failure log lines and handled codes against the calls sent; returns
    {misreport message: calls}."""
    unexpected = {c: n for c, n in codes.items() if c not in SERVER_CODES}
    if unexpected:
        failures.append(f"server handled calls with unexpected codes {unexpected}")
    mislabelled, invalid = collections.Counter(), 0
    for line in lines:
        m = FAILED_RE.search(line)
        if m and m.group(2) == INVALID:
            known = next((k for k in MISLABELS if m.group(3).startswith(k)), None)
            if known:
                mislabelled[known] += 1
            else:
                invalid += 1
    if invalid != bad_calls:
        failures.append(f"server logged {invalid} INVALID_ARGUMENT calls besides the known "
                        f"misreports {dict(mislabelled)}; {bad_calls} bad calls were sent")
    if codes.get("InvalidArgument", 0) != bad_calls + sum(mislabelled.values()):
        failures.append(f"server counted {codes.get('InvalidArgument', 0):.0f} InvalidArgument,"
                        f" expected {bad_calls} bad calls + misreports {dict(mislabelled)}")
    if sum(mislabelled.values()) > deadline_cancel_calls:
        failures.append(f"misreports {dict(mislabelled)} exceed the {deadline_cancel_calls} "
                        "deadline and cancel calls")
    return mislabelled


def serving_problems(target, pb2, seed=99):
    """[] if Health says SERVING and a small Compute equals scikit-learn's cosine, else what
    is wrong (also used by the abuse tests)."""
    problems = []
    with grpc.insecure_channel(target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                      timeout=10).status
        if status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            problems.append(f"health is {name}")
        req, a, b = harness.make_request(pb2, 1, 8, 256, 128, seed=seed)
        resp = pb2.ComputeResponse.FromString(
            ch.unary_unary(f"/{harness.SERVICE}/Compute")(req.SerializeToString(), timeout=10))
    got = np.frombuffer(resp.values_raw, dtype="<f4").reshape(tuple(resp.shape))
    err = float(np.max(np.abs(got - reference.sklearn_cosine(a, b))))
    if err > 1e-5:
        problems.append(f"Compute differs from scikit-learn's cosine by {err}")
    return problems


# ---- report ----

def print_report(rows, burst_rows, figures, samples, info):
    def ms(v):
        return "-" if v is None else f"{v:.2f}"

    def statuses(codes):
        return ", ".join(f"{c} {n:g}" for c, n in sorted(codes.items()))

    with open("/proc/cpuinfo") as f:
        model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    print(f"\n## Soak result ({datetime.date.today()}, nproc {os.cpu_count()}, {model}; "
          f"{info['duration']:.0f} s at {info['rate']:g} calls/s after a {BURST_SECONDS} s "
          f"burst, warm-up {info['warmup']:.0f} s)")
    print("\n| kind | calls/s | calls | statuses | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    for kind, count, codes, p50, p99 in rows:
        print(f"| {kind} | {info['rates'].get(kind, info['cancel_rate'] / 3):.3g} | {count} | "
              f"{statuses(codes)} | {ms(p50)} | {ms(p99)} |")
    print(f"\n{info['total']} calls in {info['wall']:.0f} s, {info['bad']:.1f} % bad; server "
          f"CPU {info['server_cpu']:.2f} cores, ghz + Python clients {info['client_cpu']:.2f}"
          f" cores; server handled by code: {statuses(info['server_codes'])}")
    print(f"warm-up burst: {sum(r[1] for r in burst_rows)} calls, "
          + "; ".join(f"{r[0]} {statuses(r[2])}" for r in burst_rows))
    for message, n in info["mislabelled"].items():
        print(f"known server misreport: {n} calls logged and counted as INVALID_ARGUMENT "
              f"\"{message} ...\" were: {MISLABELS[message]}")
    print("\n| resource | warm-up end | warm-up max (reference) | last third max | limit | end "
          "| max |\n|---|---|---|---|---|---|---|")
    for key, name, scale, fmt in (("rss_bytes", "RSS MiB", 2**-20, "{:.1f}"),
                                  ("fds", "open fds", 1, "{:.0f}"),
                                  ("threads", "threads", 1, "{:.0f}")):
        f = figures[key]
        print(f"| {name} | " + " | ".join(fmt.format(f[c] * scale) for c in (
            "warmup_end", "reference", "late", "limit", "end", "max")) + " |")
    m = figures["rss_medians"]
    print(f"\nRSS medians: first third after the warm-up {m['settled'] / 2**20:.1f} MiB, last "
          f"third {m['late'] / 2**20:.1f} MiB (limit {m['limit'] / 2**20:.1f} MiB, "
          f"{100 * (m['late'] / m['settled'] - 1):+.1f} %)")
    print("\nsamples (s: RSS MiB/fds/threads): " + "; ".join(
        f"{s['t']:.0f}: {s['rss_bytes'] / 2**20:.0f}/{s['fds']}/{s['threads']}"
        for s in samples))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="path to the simserve executable")
    parser.add_argument("--duration", type=float, default=600, help="seconds of paced traffic")
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE,
                        help=f"total calls/s (default {DEFAULT_RATE}); every kind keeps its "
                             "share, at least 1/s (ghz paces whole calls per second)")
    parser.add_argument("--rss-growth", type=float, default=RSS_GROWTH,
                        help=f"allowed RSS growth of the maximum and the median (default "
                             f"{RSS_GROWTH}); a short run's 2-3-sample medians swing by up to "
                             "the +-30 %% of the traffic of the moment, so CTest's 60 s run "
                             "passes 0.3 (gross leaks only; the 10-minute run is the measure)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="extra simserve flag, e.g. --server-arg=--malloc_retain_bytes=0 "
                             "(repeatable)")
    args = parser.parse_args()
    duration, warmup = args.duration, min(0.2 * args.duration, 60.0)
    scale = args.rate / DEFAULT_RATE
    rates = {k: max(1, round(v[2] * scale)) for k, v in GHZ_KINDS.items()}
    cancel_rate = CANCEL_RATE * scale
    ghz = loadlib.find_ghz()
    pb2, _ = harness.load_stubs()
    log(f"{BURST_SECONDS} s burst, then {duration:.0f} s at {args.rate:g} calls/s, warm-up "
        f"{warmup:.0f} s; calls/s: " + ", ".join(f"{k} {v}" for k, v in rates.items())
        + f", cancels {cancel_rate:g}")

    failures = []
    with tempfile.TemporaryDirectory(prefix="simserve-soak-") as tmp:
        paths, reqs, upload = write_requests(pb2, tmp)
        server = harness.Server(args.server, *args.server_arg).wait_ready()
        try:
            log(f"server pid {server.pid} on {server.target()}; warm-up burst")
            common = (ghz, server.target(), paths, reqs, upload)
            burst_rows = Phase(*common, BURST_SECONDS, tmp,
                               {k: BURST_RATE * r for k, r in rates.items()},
                               BURST_RATE * cancel_rate).finish(failures)
            log(f"burst: {sum(r[1] for r in burst_rows)} calls; paced run")
            cpu0, client0 = loadlib.cpu_seconds(server.pid), clients_cpu()
            t0 = time.monotonic()
            phase = Phase(*common, duration, tmp, rates, cancel_rate)
            samples = sample_until(server, t0, duration, warmup)
            rows = phase.finish(failures)
            wall = time.monotonic() - t0
            cpu = loadlib.cpu_seconds(server.pid) - cpu0
            client_cpu = clients_cpu() - client0  # before the server is reaped
            samples.append(dict(t=wall, **loadlib.proc_resources(server.pid)))
            time.sleep(0.5)  # the log reader thread catches up with the last failure lines
            failures += [f"after the soak: {p}" for p in serving_problems(server.target(), pb2)]
            codes = handled_codes(server.metrics())
            log_lines = list(server.log)
        finally:
            rc = server.stop()
    if rc != 0:
        failures.append(f"server exited with {rc} on SIGTERM")
    sent = collections.Counter()
    for kind, n, *_ in rows + burst_rows:
        sent[kind] += n
    mislabelled = check_server(failures, log_lines, codes, sent["bad"], sum(
        n for k, n in sent.items() if k.startswith(("deadline", "cancel"))))
    res_failures, figures = check_resources(samples, warmup, duration, args.rss_growth)
    failures += res_failures
    total = sum(r[1] for r in rows)
    print_report(rows, burst_rows, figures, samples, dict(
        duration=duration, warmup=warmup, rate=args.rate, rates=rates, cancel_rate=cancel_rate,
        total=total, wall=wall, bad=100 * dict(r[:2] for r in rows).get("bad", 0) / max(1, total),
        server_cpu=cpu / wall, client_cpu=client_cpu / wall,
        server_codes=codes, mislabelled=mislabelled))
    if failures:
        print("\nSOAK FAILED:\n  " + "\n  ".join(failures), flush=True)
        return 1
    print("\nSOAK PASSED", flush=True)
    return 0


def clients_cpu():
    """CPU seconds of this process (the Python clients) and its finished children (ghz)."""
    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                   resource.getrusage(resource.RUSAGE_CHILDREN)))


if __name__ == "__main__":
    sys.exit(main())
