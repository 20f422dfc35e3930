#!/usr/bin/env python3
"""Lints deploy/grafana/*.json and deploy/prometheus/*.yml against the metrics simserve exports.

Every dashboard query becomes a recording rule in a temporary rules file (Grafana variables
replaced by plain values) so `promtool check rules` validates its PromQL; every metric name a
query or rule uses must be registered in server/metrics.cc (the exporter's source), so a
renamed metric cannot silently blank a panel. Usage: check_dashboard.py ROOT
"""
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

ROOT = sys.argv[1]
METRIC_RE = re.compile(r"\b((?:grpc_server|simserve)_[a-z_]+)\b")
SUFFIXES = ("_bucket", "_sum", "_count")


def exported_names():
    """Family names registered in server/metrics.cc (string literals passed to Name(...) etc.)."""
    src = open(os.path.join(ROOT, "server", "metrics.cc")).read()
    names = set(re.findall(r'"((?:grpc_server|simserve)_[a-z_]+)"', src))
    hist = {n for n in names if n.endswith("_seconds")}
    for n in hist:
        names.update(n + s for s in SUFFIXES)
    return names


def check_names(where, expr, known, errors):
    for name in METRIC_RE.findall(expr):
        if name not in known and not name.startswith("simserve:"):
            errors.append(f"{where}: unknown metric {name} in: {expr}")


def main():
    known = exported_names()
    for required in ("grpc_server_handled_total", "grpc_server_started_total",
                     "grpc_server_handling_seconds", "simserve_build_info"):
        assert required in known, f"{required} missing from server/metrics.cc"
    errors = []
    dashboards = glob.glob(os.path.join(ROOT, "deploy", "grafana", "*.json"))
    assert dashboards, "no dashboard in deploy/grafana"
    rules = []
    for path in dashboards:
        dash = json.load(open(path))
        ids = [p["id"] for p in dash["panels"]]
        if len(ids) != len(set(ids)):
            errors.append(f"{path}: duplicate panel ids")
        titles = " ".join(p["title"].lower() for p in dash["panels"])
        for topic in ("p99", "throughput", "errors by code", "queue", "gflop/s"):
            if topic not in titles:
                errors.append(f"{path}: no panel about {topic!r}")
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                check_names(f"{path} panel {panel['title']!r}", expr, known, errors)
                plain = (expr.replace("$__rate_interval", "5m").replace("$job", ".*")
                         .replace("$instance", ".*"))
                if "$" in plain:
                    errors.append(f"{path}: unresolved variable in {expr}")
                rules.append(plain)
    for path in [os.path.join(ROOT, "deploy", "prometheus", "simserve-alerts.yml")]:
        for line in open(path):
            if "expr:" in line or line.startswith("          "):
                check_names(path, line, known, errors)
    with tempfile.TemporaryDirectory() as tmp:
        rules_file = os.path.join(tmp, "dashboard-queries.yml")
        with open(rules_file, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, expr in enumerate(rules):
                f.write(f"      - record: dashboard:query{i}\n        expr: {json.dumps(expr)}\n")
        result = subprocess.run(["promtool", "check", "rules", rules_file],
                                capture_output=True, text=True)
        if result.returncode != 0:
            errors.append("dashboard PromQL does not parse:\n" + result.stdout + result.stderr)
    if errors:
        print("\n".join(errors))
        return 1
    print(f"dashboard OK: {len(rules)} queries parse, all metric names exported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
