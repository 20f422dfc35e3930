#!/usr/bin/env bash
# Clang's thread-safety analysis over simserve's own sources, warnings as errors: proves
# that every ABSL_GUARDED_BY field is only touched with its lock held (GCC ignores the
# annotations). Compiles with clang++-14 -fsyntax-only using the flags CMake recorded in
# compile_commands.json. A CTest test (label lint) runs it, so scripts/test.sh does too.
# Usage: scripts/thread_safety.sh [build_dir (default build/release)]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-$ROOT/build/release}"
CLANG="${CLANG:-clang++-14}"
exec python3 - "$ROOT" "$BUILD" "$CLANG" <<'PY'
import concurrent.futures, json, os, shlex, subprocess, sys, time

root, build, clang = sys.argv[1:4]
start = time.monotonic()
commands = json.load(open(os.path.join(build, "compile_commands.json")))
# The libraries and executables (tests hold no annotated state of their own).
ours = [c for c in commands
        if os.path.relpath(c["file"], root).split(os.sep)[0] in ("server", "client", "kernels")
        and not c["file"].endswith("_test.cc")]
if not ours:
    sys.exit("thread_safety: no simserve sources in compile_commands.json")

def check(entry):
    args = shlex.split(entry["command"])[1:]
    keep, skip = [], False
    for a in args:  # drop the output and GCC-only flags; keep defines, includes, -std
        if skip:
            skip = False
            continue
        if a in ("-o", "-MF", "-MT", "-MQ"):
            skip = True
            continue
        if a in ("-c", "-MD", "-Werror") or a.startswith("-W"):
            continue
        keep.append(a)
    cmd = [clang, *keep, "-fsyntax-only", "-Wthread-safety", "-Wthread-safety-beta",
           "-Werror=thread-safety", "-Wno-unknown-warning-option"]
    proc = subprocess.run(cmd, cwd=entry["directory"], capture_output=True, text=True)
    return entry["file"], proc.returncode, proc.stderr

failed = 0
with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
    for path, code, err in pool.map(check, ours):
        if code != 0:
            failed += 1
            print(f"thread_safety: {os.path.relpath(path, root)}:\n{err}", file=sys.stderr)
print(f"thread_safety: {len(ours) - failed}/{len(ours)} sources clean "
      f"({time.monotonic() - start:.0f} s, {clang} -Wthread-safety)")
sys.exit(1 if failed else 0)
PY
