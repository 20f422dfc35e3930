#!/usr/bin/env bash
# Quick start: installs what is missing, builds (release), and runs the server in the
# foreground with default settings (gRPC on 0.0.0.0:50051, metrics on 0.0.0.0:9464).
# Extra arguments go to the server, e.g. scripts/run.sh --listen=127.0.0.1:6000
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./scripts/setup.sh
./scripts/build.sh release
exec ./build/release/server/simserve "$@"
