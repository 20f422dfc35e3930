#!/usr/bin/env bash
# The one test command: installs what is missing, builds, and runs every test suite
# (unit, integration, interop, load smoke, deploy) through CTest.
# Usage: scripts/test.sh [extra ctest args, e.g. -L unit]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
start=$(date +%s)
./scripts/setup.sh
./scripts/build.sh release
ctest --preset release "$@"
echo "test.sh: all suites passed in $(( $(date +%s) - start )) s"
