"""Helpers of the ghz load suite: find ghz, build the health protoset, run ghz and summarise its
JSON report, read a process's CPU time. Used by load_smoke_test.py and run_load.py."""
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "metrics"))
import harness  # noqa: E402  pylint: disable=wrong-import-position

PROTO = os.path.join("simserve", "v1", "similarity.proto")
HEALTH_CALL = "grpc.health.v1.Health/Check"


def find_ghz():
    """$GHZ, ghz on PATH, or $SIMSERVE_TOOLS_DIR/go/bin/ghz (where scripts/setup.d puts it)."""
    tools = os.environ.get("SIMSERVE_TOOLS_DIR", os.path.expanduser("~/.cache/simserve"))
    for candidate in (os.environ.get("GHZ"), shutil.which("ghz"),
                      os.path.join(tools, "go", "bin", "ghz")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("ghz not found: run scripts/setup.sh (go install github.com/bojand/ghz)")


def health_protoset(path):
    """Writes a FileDescriptorSet of grpc.health.v1 (from grpcio-health-checking) to path."""
    from google.protobuf import descriptor_pb2  # pylint: disable=import-outside-toplevel
    from grpc_health.v1 import health_pb2  # pylint: disable=import-outside-toplevel
    fds = descriptor_pb2.FileDescriptorSet()
    health_pb2.DESCRIPTOR.CopyToProto(fds.file.add())
    with open(path, "wb") as f:
        f.write(fds.SerializeToString())
    return path


def ghz_command(ghz, target, call, *, binary_file=None, data=None, protoset=None, total=None,
                duration=None, concurrency=1, cpus=None, pin=None, fmt="json", output=None,
                timeout="60s", rps=None, extra=()):
    """The ghz argv of one run (plaintext, loopback); `rps` paces it at a constant rate,
    `extra` are further ghz flags."""
    cmd = [ghz, "--insecure", f"--call={call}", f"--concurrency={concurrency}",
           f"--timeout={timeout}", f"--format={fmt}"]
    if protoset:
        cmd.append(f"--protoset={protoset}")
    else:
        cmd += [f"--proto={os.path.join(harness.PROTO_DIR, PROTO)}",
                f"--import-paths={harness.PROTO_DIR}"]
    if binary_file:
        cmd.append(f"--binary-file={binary_file}")
    if data is not None:
        cmd.append(f"--data={json.dumps(data)}")
    if total:
        cmd.append(f"--total={total}")
    if duration:
        # "wait": calls in flight at the end finish and are counted (the default "close"
        # reports them as Unavailable although the server completes them).
        cmd += [f"--duration={duration}", "--duration-stop=wait"]
    if cpus:
        cmd.append(f"--cpus={cpus}")
    if rps:
        cmd.append(f"--rps={rps}")
    if output:
        cmd.append(f"--output={output}")
    cmd += list(extra)
    cmd.append(target)
    if pin is not None:
        cmd = ["taskset", "-c", str(pin), *cmd]
    return cmd


def run_ghz(*args, **kwargs):
    """Runs ghz with JSON output; returns the parsed report (raises with ghz's stderr)."""
    kwargs["fmt"] = "json"
    out = kwargs.pop("output", None)
    cmd = ghz_command(*args, **kwargs)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 or not result.stdout.strip():
        raise RuntimeError(f"ghz failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr}")
    if out:
        with open(out, "w") as f:
            f.write(result.stdout)
    return json.loads(result.stdout)


def summarise(report):
    """count, ok, errors, rps and latency percentiles (ms) of a ghz JSON report."""
    codes = report.get("statusCodeDistribution") or {}
    pct = {int(p["percentage"]): p["latency"] / 1e6 for p in report.get("latencyDistribution")
           or []}
    return {"count": report["count"], "ok": codes.get("OK", 0),
            "errors": report["count"] - codes.get("OK", 0), "codes": codes,
            "error_dist": report.get("errorDistribution") or {}, "rps": report["rps"],
            "p50": pct.get(50), "p95": pct.get(95), "p99": pct.get(99),
            "avg_ms": report["average"] / 1e6}


def cpu_seconds(pid):
    """User + system CPU seconds consumed so far by process `pid` (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_resources(pid):
    """{"rss_bytes", "threads", "fds"} of process `pid` now (VmRSS and Threads from
    /proc/PID/status, the entries of /proc/PID/fd)."""
    out = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_bytes"] = int(value.split()[0]) * 1024
            elif key == "Threads":
                out["threads"] = int(value)
    return out
