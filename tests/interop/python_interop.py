#!/usr/bin/env python3
"""Sends the shared test vectors (vectors/cases.json) with the simserve Python client, by
unary Compute and by ComputeStream, and compares with the reference within the case's
tolerance (top-k indices exactly). Exit code 1 on any failure.

Usage: python_interop.py ADDR CASES_JSON
"""

import json
import sys

import numpy as np

import simserve


def main() -> int:
    addr, cases_path = sys.argv[1], sys.argv[2]
    with open(cases_path) as f:
        cases = json.load(f)["cases"]
    passed = failed = 0
    # Small chunks so that even these tiny results arrive in several tiles.
    with simserve.Client(addr, timeout=30, chunk_bytes=64) as client:
        for c in cases:
            a = np.array(c["a"]["values"], dtype=np.float32).reshape(c["a"]["shape"])
            b = np.array(c["b"]["values"], dtype=np.float32).reshape(c["b"]["shape"])
            exp = c["expected"]
            want = np.array(exp["values"]).reshape(exp["shape"])
            for mode in ("unary", "stream"):
                try:
                    kw = dict(metric=c["metric"].lower(), epsilon=c["epsilon"], mode=mode)
                    if c["top_k"]:
                        got, idx = client.top_k(a, b, c["top_k"], **kw)
                        want_idx = np.array(exp["indices"]).reshape(exp["shape"])
                        if not np.array_equal(idx, want_idx):
                            raise AssertionError(f"indices {idx.tolist()} != {want_idx.tolist()}")
                    else:
                        got = client.similarity(a, b, **kw)
                    if got.shape != want.shape:
                        raise AssertionError(f"shape {got.shape} != {want.shape}")
                    if not np.allclose(got, want, atol=c["atol"], rtol=1e-5):
                        bad = np.argmax(np.abs(got - want))
                        raise AssertionError(f"value[{bad}] {got.ravel()[bad]} != "
                                             f"{want.ravel()[bad]}")
                    passed += 1
                    print(f"ok   python {mode} {c['name']}")
                except (simserve.Error, AssertionError) as e:
                    failed += 1
                    print(f"FAIL python {mode} {c['name']}: {e}")
    print(f"python: {passed} passed, {failed} failed")
    return 1 if failed or not passed else 0


if __name__ == "__main__":
    sys.exit(main())
