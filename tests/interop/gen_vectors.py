#!/usr/bin/env python3
"""Generates the shared interop test vectors (inputs + expected outputs) from an independent
reference: scikit-learn / numpy in float64. Writes vectors/cases.json (small, committed).

Rerun only when the cases change:  .venv/bin/python tests/interop/gen_vectors.py
Every client (C++, Python, Go, Node) sends each case by unary Compute and by ComputeStream
and compares with `expected` within `atol` (values) and exactly (top-k indices).
"""

import json
import os

import numpy as np
from sklearn.metrics.pairwise import cosine_similarity, euclidean_distances

rng = np.random.default_rng(20261130)


def f32(x):
    return np.asarray(x, dtype=np.float32)


def dense(metric, a, b, epsilon=0.0):
    a3, b3 = (a[None], b[None]) if a.ndim == 2 else (a, b)
    out = []
    for x, y in zip(a3.astype(np.float64), b3.astype(np.float64)):
        if metric == "COSINE" and epsilon > 0:  # Keras: x / sqrt(max(sum(x^2), eps))
            xn = x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), epsilon))
            yn = y / np.sqrt(np.maximum((y * y).sum(-1, keepdims=True), epsilon))
            out.append(xn @ yn.T)
        elif metric == "COSINE":
            out.append(cosine_similarity(x, y))
        elif metric == "DOT":
            out.append(x @ y.T)
        elif metric == "EUCLIDEAN":
            out.append(euclidean_distances(x, y))
        else:
            out.append(euclidean_distances(x, y, squared=True))
    s = np.stack(out)
    return s[0] if a.ndim == 2 else s


def top_k(metric, s, k):
    # Stable sort: ties keep the lower column first.
    key = -s if metric in ("COSINE", "DOT") else s
    idx = np.argsort(key, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(s, idx, axis=-1), idx


def case(name, metric, a, b, epsilon=0.0, k=0, atol=2e-5):
    a, b = f32(a), f32(b)
    s = dense(metric, a, b, epsilon)
    c = {"name": name, "metric": metric, "epsilon": epsilon, "top_k": k, "atol": atol,
         "a": {"shape": list(a.shape), "values": a.ravel().tolist()},
         "b": {"shape": list(b.shape), "values": b.ravel().tolist()}}
    if k:
        vals, idx = top_k(metric, s, k)
        c["expected"] = {"shape": list(vals.shape), "values": vals.ravel().tolist(),
                         "indices": idx.ravel().astype(int).tolist()}
    else:
        c["expected"] = {"shape": list(s.shape), "values": s.ravel().tolist()}
    return c


def main():
    a = rng.standard_normal((2, 5, 8))
    b = rng.standard_normal((2, 7, 8))
    a[0, 1] = 0.0  # a zero row: cosine gives 0, never NaN (sklearn semantics)
    b[1, 3] = 0.0
    tiny_a = rng.standard_normal((3, 6)) * 1e-3  # tiny rows: the Keras clamp matters
    tiny_b = rng.standard_normal((4, 6)) * 1e-3
    # Small integers make dot products exact in float32, so ties are real ties.
    ia = rng.integers(-3, 4, (2, 4, 5)).astype(np.float32)
    ib = rng.integers(-3, 4, (2, 6, 5)).astype(np.float32)
    ib[:, 4] = ib[:, 1]  # duplicate columns -> ties, lower index must win
    cases = [
        case("cosine_3d_zero_rows", "COSINE", a, b),
        case("dot_2d", "DOT", rng.standard_normal((4, 3)), rng.standard_normal((6, 3)),
             atol=5e-5),
        case("euclidean_3d", "EUCLIDEAN", a, b, atol=5e-5),
        case("squared_euclidean_3d", "SQUARED_EUCLIDEAN", a, b, atol=2e-4),
        case("cosine_keras_epsilon_2d", "COSINE", tiny_a, tiny_b, epsilon=1e-3),
        case("topk_dot_ties_3d", "DOT", ia, ib, k=3, atol=1e-6),
        case("topk_euclidean_3d", "EUCLIDEAN", a, b, k=2, atol=5e-5),
    ]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors", "cases.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"generator": "tests/interop/gen_vectors.py (sklearn/numpy float64)",
                   "cases": cases}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {path}")


if __name__ == "__main__":
    main()
