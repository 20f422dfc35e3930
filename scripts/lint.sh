#!/usr/bin/env bash
# Style checks: clang-format (must be clean) and clang-tidy (.clang-tidy, warnings are errors)
# over simserve's own C++ sources. Needs a configured build for compile_commands.json.
# Usage: scripts/lint.sh [--format-only] [build_dir (default build/release)]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
format_only=0
if [ "${1:-}" = "--format-only" ]; then format_only=1; shift; fi
BUILD="${1:-build/release}"
mapfile -t files < <(git ls-files 'kernels/*.cc' 'kernels/*.h' 'server/*.cc' 'server/*.h' \
  'client/*.cc' 'client/*.h' 'tests/*.cc' 'tests/*.h' 'fuzz/*.cc' 'fuzz/*.h')
clang-format --dry-run -Werror "${files[@]}"
echo "lint: clang-format clean (${#files[@]} files)"
[ "$format_only" = 1 ] && exit 0
# omp.h for clang comes from libomp-14-dev (setup.sh); GCC-only warning flags are ignored.
# fuzz/ is compiled only by the fuzz preset, so the release build has no compile commands for it.
mapfile -t sources < <(printf '%s\n' "${files[@]}" | grep '\.cc$' | grep -v '^fuzz/')
clang-tidy -p "$BUILD" --quiet --extra-arg=-Wno-unknown-warning-option "${sources[@]}"
echo "lint: clang-tidy clean (${#sources[@]} sources)"
