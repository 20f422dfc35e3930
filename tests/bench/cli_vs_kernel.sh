#!/usr/bin/env bash
# Benchmark (not a CTest test): seed workload through simserve-cli over loopback vs. the
# same kernel in-process. Builds what it needs in BUILD_DIR (default build/release), then
# runs tests/bench/cli_vs_kernel.py. Usage: tests/bench/cli_vs_kernel.sh [build_dir] [--runs N]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUILD="${1:-build/release}"
shift || true
cd "$ROOT"
if [ ! -f "$BUILD/build.ninja" ]; then
  cmake --preset release -B "$BUILD" >/dev/null
fi
cmake --build "$BUILD" --target simserve simserve-cli similarity_benchmark -j2 >/dev/null
exec "$ROOT/.venv/bin/python" "$ROOT/tests/bench/cli_vs_kernel.py" --build "$BUILD" "$@"
