#!/usr/bin/env python3
"""The longer ghz benchmark of simserve (not in CI; a few minutes). Starts one server, runs every
profile at several concurrencies for a fixed duration, writes ghz JSON and HTML reports and
prints a Markdown summary table: rps, p50/p95/p99, errors, server CPU, and whether the server's
grpc_server_handled_total moved by exactly ghz's counts. The empty-handler baseline is
grpc.health.v1.Health/Check, measured the same way in the same run.

On a 2-core machine the default pins the server to CPU 1 (1 worker x 1 OpenMP thread) and ghz
to CPU 0 (--cpus=1), so client and server do not steal each other's core.

Usage: run_load.py --server build/release/server/simserve [--out DIR] [--duration 10s]
                   [--no-html] [--server_cpu 1] [--ghz_cpu 0] [--profiles small,medium,...]
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gen_requests  # noqa: E402  pylint: disable=wrong-import-position
import loadlib  # noqa: E402  pylint: disable=wrong-import-position
from loadlib import harness  # noqa: E402  pylint: disable=wrong-import-position

# (profile, concurrency); "health" is the empty-handler baseline.
RUNS = [("health", 1), ("health", 4), ("health", 16),
        ("small", 1), ("small", 4), ("small", 16),
        ("medium", 1), ("medium", 4),
        ("large", 1), ("large", 2)]


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="path to the simserve executable")
    parser.add_argument("--out", default=None, help="report directory")
    parser.add_argument("--duration", default="10s", help="ghz --duration of each run")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML report runs")
    parser.add_argument("--server_cpu", default="1", help="taskset CPU list of the server")
    parser.add_argument("--ghz_cpu", default="0", help="taskset CPU list of ghz")
    parser.add_argument("--profiles", default=None, help="comma list, e.g. health,small")
    args = parser.parse_args()

    out = args.out or os.path.join(
        harness.ROOT, "build", "load-report", datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    os.makedirs(out, exist_ok=True)
    ghz = loadlib.find_ghz()
    profiles = gen_requests.generate(os.path.join(out, "requests"))
    protoset = loadlib.health_protoset(os.path.join(out, "requests", "health.protoset"))
    wanted = set(args.profiles.split(",")) if args.profiles else None
    runs = [(p, c) for p, c in RUNS if wanted is None or p in wanted]
    ghz_cpus = len(args.ghz_cpu.split(","))

    def call_args(profile):
        if profile == "health":
            return loadlib.HEALTH_CALL, {"data": {}, "protoset": protoset}
        info = profiles[profile]
        return (f"{harness.SERVICE}/{info['method']}", {"binary_file": info["file"]})

    rows = []
    with open("/proc/loadavg") as f:
        load_start = f.read().split()[:3]
    with harness.Server(args.server, "--workers=1", "--threads_per_worker=1",
                        cpus=args.server_cpu) as server:
        print(f"server pid {server.pid} on CPU {args.server_cpu}, ghz on CPU {args.ghz_cpu}; "
              f"reports in {out}", file=sys.stderr)
        for profile, conc in runs:
            call, kw = call_args(profile)
            common = dict(concurrency=conc, cpus=ghz_cpus, pin=args.ghz_cpu, **kw)
            # Warm-up (primitive cache, connection), not counted in the table.
            loadlib.run_ghz(ghz, server.target(), call, total=max(20, 4 * conc), **common)
            harness.wait_for(lambda: server.metrics().get("simserve_requests_in_flight") == 0)
            before = server.metrics()
            cpu0, t0 = loadlib.cpu_seconds(server.pid), time.monotonic()
            name = f"{profile}-c{conc}"
            report = loadlib.run_ghz(ghz, server.target(), call, duration=args.duration,
                                     output=os.path.join(out, name + ".json"), **common)
            wall = time.monotonic() - t0
            harness.wait_for(lambda: server.metrics().get("simserve_requests_in_flight") == 0)
            cpu = loadlib.cpu_seconds(server.pid) - cpu0
            after = server.metrics()
            s = loadlib.summarise(report)
            service, method = call.rsplit("/", 1)
            handled = (after.sum("grpc_server_handled_total", grpc_service=service,
                                 grpc_method=method)
                       - before.sum("grpc_server_handled_total", grpc_service=service,
                                    grpc_method=method))
            handled_ok = after.handled(method, "OK", service) - before.handled(method, "OK",
                                                                                service)
            def mean_ms(family):
                n = after.get(family + "_count") - before.get(family + "_count")
                total = after.get(family + "_sum") - before.get(family + "_sum")
                return 1e3 * total / n if n else None
            rows.append(dict(profile=profile, call=method, conc=conc, **s, wall=wall,
                             compute_ms=mean_ms("simserve_compute_seconds"),
                             server_ms=mean_ms("simserve_request_seconds"),
                             cpu_cores=cpu / wall, cpu_ms_per_call=1e3 * cpu / max(1, s["count"]),
                             agree=(handled_ok == s["ok"] and handled == s["count"]),
                             handled=handled, handled_ok=handled_ok))
            print(f"{name}: {s['count']} calls {s['rps']:.1f} rps p50 {s['p50']:.2f} ms "
                  f"codes {s['codes']} server handled {handled} (OK {handled_ok})",
                  file=sys.stderr)
            if not args.no_html:
                subprocess.run(loadlib.ghz_command(
                    ghz, server.target(), call, duration=args.duration, fmt="html",
                    output=os.path.join(out, name + ".html"), **common),
                    check=True, capture_output=True)

    baseline = {r["conc"]: r for r in rows if r["profile"] == "health"}
    lines = ["| profile | call | conc | calls | rps | p50 ms | p95 ms | p99 ms | errors "
             "| server CPU (cores) | server CPU ms/call | server total ms | kernel ms "
             "| rps vs baseline | metrics = ghz |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = baseline.get(r["conc"])
        ratio = f"{r['rps'] / base['rps']:.3g}" if base and r is not base else "1" if base else "-"
        fmt = lambda v: "-" if v is None else f"{v:.3g}"  # noqa: E731
        lines.append(
            f"| {r['profile']} | {r['call']} | {r['conc']} | {r['count']} | {r['rps']:.1f} "
            f"| {fmt(r['p50'])} | {fmt(r['p95'])} | {fmt(r['p99'])} | {r['errors']} "
            f"| {r['cpu_cores']:.2f} | {r['cpu_ms_per_call']:.3f} | {fmt(r['server_ms'])} "
            f"| {fmt(r['compute_ms'])} | {ratio} "
            f"| {'yes' if r['agree'] else 'NO (%d/%d)' % (r['handled_ok'], r['handled'])} |")
    with open("/proc/loadavg") as f:
        load_end = f.read().split()[:3]
    lines.append("")
    lines.append(f"Machine: {os.cpu_count()} CPUs; load average (1/5/15 min) "
                 f"{' '.join(load_start)} at start, {' '.join(load_end)} at end; server on CPU "
                 f"{args.server_cpu}, ghz on CPU {args.ghz_cpu}, {args.duration} per run.")
    table = "\n".join(lines)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(table)
    return 0 if all(r["agree"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
