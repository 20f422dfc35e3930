#!/usr/bin/env bash
# Lints and unit-tests the observability deploy files: `promtool check rules` and
# `promtool test rules` on deploy/prometheus, and the Grafana dashboard's PromQL and metric
# names (check_dashboard.py). Usage: check_deploy.sh ROOT [PYTHON]
set -euo pipefail
ROOT="$1"
PYTHON="${2:-python3}"
[ -x "$PYTHON" ] || PYTHON=python3
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
command -v promtool >/dev/null || { echo "promtool missing (Debian prometheus; scripts/setup.sh)"; exit 1; }
promtool check config "$ROOT"/deploy/prometheus/prometheus.yml
promtool check rules "$ROOT"/deploy/prometheus/simserve-alerts.yml
(cd "$HERE" && promtool test rules alerts_test.yml)
"$PYTHON" "$HERE/check_dashboard.py" "$ROOT"
