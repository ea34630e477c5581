"""Slow, obviously-correct NumPy references for the evaluation tests (O(N^2) memory: small N)."""

from __future__ import annotations

import numpy as np


def brute_knn(query, reference, k, self_gallery):
    """Indices [Q, k] ordered by (float64 sum((q - r)^2), index), self excluded by index."""
    q = np.asarray(query, np.float32).astype(np.float64)
    r = np.asarray(reference, np.float32).astype(np.float64)
    d = np.stack([np.sum((r - qi) ** 2, axis=1) for qi in q])
    if self_gallery:
        d[np.arange(len(q)), np.arange(len(q))] = np.inf
    out = []
    for row in d:
        order = sorted(range(len(row)), key=lambda j: (row[j], j))
        out.append(order[:k])
    return np.array(out)


def brute_retrieval(query, ql, reference, rl, ks):
    """Per-query loop implementation of the DML retrieval metrics."""
    self_gallery = reference is None
    if self_gallery:
        reference, rl = query, ql
    ql, rl = np.asarray(ql), np.asarray(rl)
    n_ref = len(reference) - (1 if self_gallery else 0)
    order = brute_knn(query, reference, n_ref, self_gallery)
    acc = {f"recall@{k}": [] for k in ks}
    acc.update({"precision@1": [], "r_precision": [], "map@r": []})
    for i, row in enumerate(order):
        rel = [rl[j] == ql[i] for j in row]
        r = sum(rel)
        if r == 0:
            continue
        for k in ks:
            acc[f"recall@{k}"].append(float(any(rel[:k])))
        acc["precision@1"].append(float(rel[0]))
        acc["r_precision"].append(sum(rel[:r]) / r)
        hits, ap = 0, 0.0
        for pos in range(r):
            if rel[pos]:
                hits += 1
                ap += hits / (pos + 1)
        acc["map@r"].append(ap / r)
    out = {key: float(np.mean(v)) for key, v in acc.items()}
    out["num_queries"] = len(acc["precision@1"])
    return out
