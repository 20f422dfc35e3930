"""Independent references for the tests: scikit-learn and numpy in float64."""

from __future__ import annotations

import numpy as np
from sklearn.metrics.pairwise import cosine_similarity, euclidean_distances


def batched(fn, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Applies fn(a[k], b[k]) per batch entry (2D inputs: once)."""
    if a.ndim == 2:
        return fn(a.astype(np.float64), b.astype(np.float64))
    return np.stack([fn(x, y) for x, y in zip(a.astype(np.float64), b.astype(np.float64))])


def sklearn_cosine(a, b):
    """The seed's answer: sklearn cosine_similarity looped over the batch."""
    return batched(cosine_similarity, a, b)


def keras_cosine(a, b, epsilon):
    """The Keras answer: l2_normalize with x / sqrt(max(sum(x^2), epsilon)), then matmul."""
    def norm(x):
        return x / np.sqrt(np.maximum((x * x).sum(-1, keepdims=True), epsilon))
    return batched(lambda x, y: norm(x) @ norm(y).T, a, b)


def dense(metric, a, b, epsilon=0.0):
    if metric == "cosine":
        return keras_cosine(a, b, epsilon) if epsilon > 0 else sklearn_cosine(a, b)
    if metric == "dot":
        return batched(lambda x, y: x @ y.T, a, b)
    if metric == "euclidean":
        return batched(euclidean_distances, a, b)
    return batched(lambda x, y: euclidean_distances(x, y, squared=True), a, b)


def top_k(metric, s, k):
    """Best k per row: largest for cosine/dot, smallest for distances; stable (ties -> lower
    column first)."""
    key = -s if metric in ("cosine", "dot") else s
    idx = np.argsort(key, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(s, idx, axis=-1), idx
