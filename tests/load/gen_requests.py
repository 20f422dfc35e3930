#!/usr/bin/env python3
"""Writes the load profiles' request files: protobuf-encoded simserve.v1.ComputeRequest messages
for `ghz --binary-file`, generated from proto/ at run time (never hand-made or committed).

  small.bin   Compute       1 x 8 x 256 x 128     (0.5 MFLOP, 8 KiB out)
  medium.bin  Compute       1 x 64 x 4096 x 256   (134 MFLOP, 1 MiB out)
  large.bin   ComputeStream 1 x 2048 x 8192 x 128 (4.3 GFLOP, 64 MiB out in 1 MiB chunks)

ghz 0.93 runs the call data through Go's text/template even in binary mode, so a "{{" byte
pair inside the float data breaks it; such floats are nudged by one unit in a low byte.

Usage: gen_requests.py OUT_DIR  (prints the JSON description of the profiles)
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "metrics"))
import harness  # noqa: E402  pylint: disable=wrong-import-position

# name -> (method, batch, N, M, D, extra request fields)
PROFILES = {
    "small": ("Compute", 1, 8, 256, 128, {}),
    "medium": ("Compute", 1, 64, 4096, 256, {}),
    "large": ("ComputeStream", 1, 2048, 8192, 128, {"max_chunk_bytes": 1 << 20}),
}


def template_safe(x):
    """float32 array without the byte pair "{{" (0x7b 0x7b) inside any element."""
    b = np.ascontiguousarray(x, dtype="<f4").view(np.uint8).reshape(-1, 4).copy()
    for lo in (0, 1):  # pairs (byte0, byte1) and (byte1, byte2); byte3 is never 0x7b here
        bad = (b[:, lo] == 0x7B) & (b[:, lo + 1] == 0x7B)
        b[bad, lo] ^= 1
    return b.view("<f4").reshape(x.shape)


def build(pb2, name, seed=0):
    """(method, ComputeRequest, info dict) of profile `name`."""
    return build_shape(pb2, *PROFILES[name], seed=seed)


def build_shape(pb2, method, batch, n, m, d, extra, seed=0):
    """(method, ComputeRequest, info dict) of random template-safe float32 A [batch, n, d] and
    B [batch, m, d] with the extra request fields (a profile that is not in PROFILES)."""
    rng = np.random.default_rng(seed)
    a = template_safe(rng.standard_normal((batch, n, d), dtype=np.float32))
    b = template_safe(rng.standard_normal((batch, m, d), dtype=np.float32))
    req = pb2.ComputeRequest(
        a=pb2.Tensor(shape=[batch, n, d], dtype=pb2.FLOAT32, raw=a.tobytes()),
        b=pb2.Tensor(shape=[batch, m, d], dtype=pb2.FLOAT32, raw=b.tobytes()), **extra)
    out_bytes = batch * n * m * 4
    chunk = extra.get("max_chunk_bytes", 0)
    rows_per_chunk = max(1, chunk // (m * 4)) if chunk else n
    chunks = batch * -(-n // rows_per_chunk)
    info = {"method": method, "shape": [batch, n, m, d], "flops": 2 * batch * n * m * d,
            "in_bytes": a.nbytes + b.nbytes, "out_bytes": out_bytes,
            "chunks": chunks if method == "ComputeStream" else 0}
    return method, req, info


def generate(out_dir, pb2=None):
    """Writes <name>.bin for every profile into out_dir; returns {name: info}."""
    if pb2 is None:
        pb2, _ = harness.load_stubs()
    os.makedirs(out_dir, exist_ok=True)
    infos = {}
    for name in PROFILES:
        _, req, info = build(pb2, name)
        data = req.SerializeToString()
        if b"{{" in data:
            raise RuntimeError(f"{name}: serialized request still contains '{{{{'")
        info["file"] = os.path.join(out_dir, f"{name}.bin")
        with open(info["file"], "wb") as f:
            f.write(data)
        infos[name] = info
    return infos


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    print(json.dumps(generate(sys.argv[1]), indent=2))
