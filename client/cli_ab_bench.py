#!/usr/bin/env python3
"""A/B benchmark (not a test) of two or more simserve-cli binaries on the seed workload.

A 100x400x200 and B 100x500x200 float32 (cosine; 72 MB in, 80 MB out) go through each CLI
against one local `simserve` (one worker, 2 threads, 128 MiB receive limit so that unary
works too). The variants run interleaved, round by round and in alternating order, so that
the shared machine's load hits all of them alike; medians over the rounds are printed.

Per CLI run: "call" = the first RPC as timed inside the CLI (fresh process, fresh result
buffer), "warm" = median of the further --repeat calls on the same connection, "process" =
the whole CLI run (start, connect, map 72 MB of .npy, the calls, write 80 MB of .npy),
"save" = the CLI's own .npy write time, "cli cpu" = user+sys CPU of the CLI process per
call, "srv cpu" = the server's CPU per call (from /proc/<pid>/stat).

Usage: client/cli_ab_bench.py --server build/release/server/simserve \\
           --cli before=/path/old/simserve-cli --cli after=build/release/client/simserve-cli \\
           [--rounds 7] [--repeat 3] [--modes upload,stream,unary] [--output_dtype float32]
           [--env after:GRPC_TRACE=...]   # extra environment of one variant
"""
import argparse
import os
import re
import resource
import socket
import statistics
import subprocess
import tempfile
import time

import numpy as np

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_ms(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e3 / CLK_TCK  # utime + stime


def run_cli(cli, flags, server_pid, env=None):
    srv0 = proc_cpu_ms(server_pid)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.Popen([cli] + flags, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    out, err = proc.communicate(timeout=600)
    process_ms = (time.perf_counter() - start) * 1e3
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the CLI, reaped by communicate()
    cli_cpu = (ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime) * 1e3
    if proc.returncode != 0:
        raise RuntimeError(f"{cli} failed: {err}")
    srv = proc_cpu_ms(server_pid) - srv0
    walls = [float(x) for x in re.findall(r"client wall ([\d.]+) ms", out)]
    save = re.search(r"save ([\d.]+) ms", out)
    return {"process": process_ms, "walls": walls, "save": float(save.group(1)) if save else 0,
            "srv_cpu": srv, "cli_cpu": cli_cpu, "stdout": out}


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", required=True)
    ap.add_argument("--cli", action="append", required=True, help="name=path, repeatable")
    ap.add_argument("--env", action="append", default=[],
                    help="name:KEY=VALUE, an environment variable of variant `name`")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeat", type=int, default=3, help="calls per CLI run (1 + warm)")
    ap.add_argument("--modes", default="upload,stream,unary")
    ap.add_argument("--output_dtype", default="float32")
    ap.add_argument("--no_out", action="store_true", help="do not write the result file")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    clis = [tuple(c.split("=", 1)) for c in args.cli]
    envs = {name: dict(os.environ) for name, _ in clis}
    for item in args.env:
        name, assignment = item.split(":", 1)
        key, value = assignment.split("=", 1)
        envs[name][key] = value

    with tempfile.TemporaryDirectory(prefix="simserve_ab_") as tmp:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((100, 400, 200), dtype=np.float32)
        b = rng.standard_normal((100, 500, 200), dtype=np.float32)
        fa, fb, fo = (os.path.join(tmp, n) for n in ("a.npy", "b.npy", "s.npy"))
        np.save(fa, a)
        np.save(fb, b)
        target = f"127.0.0.1:{free_port()}"
        log = open(os.path.join(tmp, "server.log"), "w")
        server = subprocess.Popen(
            [args.server, f"--listen={target}", "--metrics_listen=", "--workers=1",
             f"--threads_per_worker={args.threads}", "--max_receive_message_bytes=134217728"],
            stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while subprocess.run([clis[0][1], f"--target={target}", "--info",
                                  "--connect_timeout_ms=500"], capture_output=True).returncode:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("server did not start")
                time.sleep(0.2)
            # Every variant computes the same result.
            ref = None
            for name, cli in clis:
                run_cli(cli, [f"--target={target}", f"--a={fa}", f"--b={fb}", f"--out={fo}",
                              f"--output_dtype={args.output_dtype}"], server.pid, envs[name])
                s = np.load(fo)
                ref = s if ref is None else ref
                assert np.array_equal(s, ref), f"{name} differs"
            print(f"check: all {len(clis)} CLIs wrote identical results; "
                  f"load average {os.getloadavg()[0]:.2f}")

            results = {}
            for r in range(args.rounds):
                order = clis if r % 2 == 0 else clis[::-1]
                for mode in args.modes.split(","):
                    for name, cli in order:
                        flags = [f"--target={target}", f"--a={fa}", f"--b={fb}",
                                 f"--mode={mode}", f"--output_dtype={args.output_dtype}",
                                 f"--repeat={args.repeat}", "--timeout_ms=120000"]
                        if not args.no_out:
                            flags.append(f"--out={fo}")
                        res = run_cli(cli, flags, server.pid, envs[name])
                        results.setdefault((mode, name), []).append(res)
            print(f"load average after: {os.getloadavg()[0]:.2f}")
        finally:
            server.terminate()
            server.wait(timeout=30)

    med = statistics.median
    print(f"\nseed workload, {args.output_dtype} output, {args.rounds} interleaved rounds, "
          f"medians; {args.repeat} calls per CLI run")
    print(f"{'mode':7} {'cli':10} {'call ms':>8} {'warm ms':>8} {'process ms':>11} "
          f"{'save ms':>8} {'cli cpu ms/run':>15} {'srv cpu ms/call':>16}")
    for (mode, name), runs in results.items():
        warm = [w for r in runs for w in r["walls"][1:args.repeat]]
        print(f"{mode:7} {name:10} {med(r['walls'][0] for r in runs):8.1f} "
              f"{med(warm) if warm else float('nan'):8.1f} {med(r['process'] for r in runs):11.1f} "
              f"{med(r['save'] for r in runs):8.1f} {med(r['cli_cpu'] for r in runs):15.1f} "
              f"{med(r['srv_cpu'] for r in runs) / args.repeat:16.1f}")


if __name__ == "__main__":
    main()
