"""Plain NumPy (float64) loop references for the proxy, margin-softmax and pair-softmax losses,
written from the equations of the papers as pytorch-metric-learning 2.9 states them.

Deliberately naive: explicit loops over rows, classes and pairs, scalar ``math``, no shared
code with ``dml_jax``. ``where`` (and, for the losses on class parameters, a label outside
``[0, C)``) is handled by dropping the row first. ``weights_at`` (circle): compute the
stop-gradient weights at these embeddings instead, so finite differences see them frozen.
"""

from __future__ import annotations

import math

import numpy as np

from tests.losses.reference import _drop, cos


def _lse(values):
    """log(sum(exp(v))) of a non-empty list."""
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _drop_classes(e, y, params, where):
    e, y = _drop(e, y, where)
    keep = [i for i in range(len(y)) if 0 <= y[i] < len(params)]
    return e[keep], y[keep], np.asarray(params, np.float64)


def _mean(values):
    return sum(values) / len(values) if values else 0.0


def _cross_entropy(logits, label):
    return _lse(logits) - logits[label]


def proxy_anchor(e, y, proxies, margin=0.1, alpha=32.0, where=None):
    e, y, proxies = _drop_classes(e, y, proxies, where)
    num = len(proxies)
    pos_total, with_pos, neg_total = 0.0, 0, 0.0
    for c in range(num):
        pos = [-alpha * (cos(e[i], proxies[c]) - margin) for i in range(len(y)) if y[i] == c]
        neg = [alpha * (cos(e[i], proxies[c]) + margin) for i in range(len(y)) if y[i] != c]
        if pos:
            pos_total += _lse([0.0, *pos])
            with_pos += 1
        neg_total += _lse([0.0, *neg])
    return (pos_total / with_pos if with_pos else 0.0) + neg_total / num


def _unit(v):
    n = math.sqrt(sum(float(x) ** 2 for x in v))
    return [float(x) / max(n, 1e-12) for x in v]


def proxy_nca(e, y, proxies, softmax_scale=1.0, where=None):
    e, y, proxies = _drop_classes(e, y, proxies, where)
    losses = []
    for i in range(len(y)):
        f = _unit(e[i])
        logits = []
        for c in range(len(proxies)):
            p = _unit(proxies[c])
            logits.append(-softmax_scale * sum((a - b) ** 2 for a, b in zip(f, p)))
        losses.append(_cross_entropy(logits, y[i]))
    return _mean(losses)


def arcface(e, y, weights, margin=28.6, scale=64.0, where=None):
    e, y, weights = _drop_classes(e, y, weights, where)
    m = math.radians(margin)
    losses = []
    for i in range(len(y)):
        logits = []
        for c in range(len(weights)):
            cos_ic = cos(e[i], weights[c])
            if c == y[i]:
                theta = math.acos(min(1.0, max(-1.0, cos_ic)))
                if theta <= math.pi - m:
                    cos_ic = math.cos(theta + m)
                else:
                    cos_ic = math.cos(theta) - m * math.sin(m)
            logits.append(scale * cos_ic)
        losses.append(_cross_entropy(logits, y[i]))
    return _mean(losses)


def cosface(e, y, weights, margin=0.35, scale=64.0, where=None):
    e, y, weights = _drop_classes(e, y, weights, where)
    losses = []
    for i in range(len(y)):
        logits = [scale * (cos(e[i], weights[c]) - (margin if c == y[i] else 0.0))
                  for c in range(len(weights))]
        losses.append(_cross_entropy(logits, y[i]))
    return _mean(losses)


def soft_triple(e, y, centers, centers_per_class=10, la=20.0, gamma=0.1, margin=0.01,
                where=None):
    num = len(centers) // centers_per_class
    e, y, centers = _drop_classes(e, y, centers[: num * centers_per_class], where)
    y = [int(v) for v in y]
    losses = []
    for i in range(len(y)):
        if y[i] >= num:
            continue
        logits = []
        for c in range(num):
            sims = [cos(e[i], centers[c * centers_per_class + k])
                    for k in range(centers_per_class)]
            z = _lse([s / gamma for s in sims])
            s_ic = sum(math.exp(s / gamma - z) * s for s in sims)
            logits.append(la * (s_ic - (margin if c == y[i] else 0.0)))
        losses.append(_cross_entropy(logits, y[i]))
    return _mean(losses)


def supcon(e, y, temperature=0.1, where=None):
    e, y = _drop(e, y, where)
    n = len(y)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    if not any(y[i] == y[j] for i, j in pairs) or not any(y[i] != y[j] for i, j in pairs):
        return 0.0
    losses = []
    for i in range(n):
        others = [j for j in range(n) if j != i]
        positives = [j for j in others if y[j] == y[i]]
        if not positives:
            losses.append(0.0)
            continue
        denominator = _lse([cos(e[i], e[a]) / temperature for a in others])
        log_probs = [cos(e[i], e[p]) / temperature - denominator for p in positives]
        losses.append(-sum(log_probs) / len(positives))
    return _mean(losses)


def circle(e, y, m=0.4, gamma=80.0, where=None, weights_at=None):
    at = e if weights_at is None else weights_at
    e, y = _drop(e, y, where)
    at, _ = _drop(at, np.zeros(len(at)), where)
    n = len(y)
    losses = []
    for i in range(n):
        pos, neg = [], []
        for j in range(n):
            if j == i:
                continue
            s, s_at = cos(e[i], e[j]), cos(at[i], at[j])
            if y[j] == y[i]:
                pos.append(-gamma * max(0.0, 1 + m - s_at) * (s - (1 - m)))
            else:
                neg.append(gamma * max(0.0, s_at + m) * (s - m))
        losses.append(_softplus(_lse(pos) + _lse(neg)) if pos and neg else 0.0)
    return _mean(losses)
