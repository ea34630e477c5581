"""NumPy (float64) loop references for the cross-batch memory, from the XBM paper's definition.

Deliberately naive and independent of ``dml_jax``: the memory is a Python ring of slots written
one row at a time; each loss loops over its anchors (the valid batch rows) and their candidate
list (the other valid batch rows, then the memory's valid entries), written out again from the
losses' equations. ``where`` drops rows first. ``weights_at``: the embeddings at which the
stop-gradient quantities (RLL's weights) are computed, so finite differences see them frozen.
"""

from __future__ import annotations

import math

import numpy as np

from tests.losses.reference import _drop, cos, dist, relu


def ring_update(mem_e, mem_y, valid, nxt, e, y, where=None):
    """Writes each kept row to slot ``nxt`` and advances it, one row at a time."""
    mem_e, mem_y, valid = np.array(mem_e, np.float64), np.array(mem_y), np.array(valid, bool)
    size = len(mem_y)
    for i in range(len(y)):
        if where is not None and not where[i]:
            continue
        mem_e[nxt], mem_y[nxt], valid[nxt] = e[i], y[i], True
        nxt = (nxt + 1) % size
    return mem_e, mem_y, valid, nxt


def memory_entries(mem_e, mem_y, valid):
    """The valid ``(embedding, label)`` entries, in slot order."""
    return [(np.asarray(mem_e[k], np.float64), mem_y[k]) for k in range(len(mem_y)) if valid[k]]


def _candidates(e, y, memory, i):
    """Anchor ``i``'s candidates: other batch rows, then the memory's entries."""
    return [(e[j], y[j]) for j in range(len(y)) if j != i] + list(memory)


def contrastive(e, y, memory, pos_margin=0.0, neg_margin=1.0, where=None):
    e, y = _drop(e, y, where)
    ps, ns = [], []
    for i in range(len(y)):
        for x, label in _candidates(e, y, memory, i):
            d = dist(e[i], x)
            if label == y[i]:
                ps.append(relu(d - pos_margin))
            else:
                ns.append(relu(neg_margin - d))
    return (np.mean(ps) if ps else 0.0) + (np.mean(ns) if ns else 0.0)


def triplet(e, y, memory, margin=0.2, mining="all", where=None):
    e, y = _drop(e, y, where)
    terms = []
    for a in range(len(y)):
        cands = _candidates(e, y, memory, a)
        pos = [dist(e[a], x) for x, label in cands if label == y[a]]
        neg = [dist(e[a], x) for x, label in cands if label != y[a]]
        if mining == "all":
            terms += [relu(dp - dn + margin) for dp in pos for dn in neg]
        elif mining == "batch_hard":
            if pos and neg:
                terms.append(relu(max(pos) - min(neg) + margin))
        elif mining == "semi_hard":
            if not neg:
                continue
            for dp in pos:
                harder = [dn for dn in neg if dn > dp]
                dn = min(harder) if harder else max(neg)
                terms.append(relu(dp - dn + margin))
        else:
            raise ValueError(mining)
    return float(np.mean(terms)) if terms else 0.0


def multi_similarity(e, y, memory, alpha=2.0, beta=50.0, base=0.5, epsilon=None, where=None):
    e, y = _drop(e, y, where)
    if len(y) == 0:
        return 0.0
    out = []
    for i in range(len(y)):
        cands = _candidates(e, y, memory, i)
        pos = [cos(e[i], x) for x, label in cands if label == y[i]]
        neg = [cos(e[i], x) for x, label in cands if label != y[i]]
        if epsilon is not None:
            min_pos, max_neg = min(pos, default=math.inf), max(neg, default=-math.inf)
            pos, neg = ([s for s in pos if s - epsilon < max_neg],
                        [s for s in neg if s + epsilon > min_pos])
        lp = math.log1p(sum(math.exp(-alpha * (s - base)) for s in pos)) / alpha
        ln = math.log1p(sum(math.exp(beta * (s - base)) for s in neg)) / beta
        out.append(lp + ln)
    return float(np.mean(out))


def ranked_list(e, y, memory, margin=0.4, alpha=1.2, t_n=10.0, t_p=0.0, lam=0.5,
                query_weighting="uniform", where=None, weights_at=None):
    w_e = e if weights_at is None else weights_at
    w_e, _ = _drop(w_e, y, where)
    e, y = _drop(e, y, where)
    boundary = alpha - margin
    losses, weights = [], []
    for i in range(len(y)):
        pn = pd = nn = nd = 0.0
        cands = _candidates(e, y, memory, i)
        frozen = _candidates(w_e, y, memory, i)
        for (x, label), (xw, _) in zip(cands, frozen):
            d, dw = dist(e[i], x), dist(w_e[i], xw)
            if label == y[i] and dw > boundary:
                w = math.exp(t_p * (dw - boundary))
                pn, pd = pn + w * (d - boundary), pd + w
            elif label != y[i] and dw < alpha:
                w = math.exp(t_n * (alpha - dw))
                nn, nd = nn + w * (alpha - d), nd + w
        losses.append((1 - lam) * (pn / pd if pd > 0 else 0.0)
                      + lam * (nn / nd if nd > 0 else 0.0))
        weights.append(pd + nd)
    if not losses:
        return 0.0
    if query_weighting == "uniform":
        return float(np.mean(losses))
    total = sum(weights)
    return sum(w * v for w, v in zip(weights, losses)) / total if total > 0 else 0.0
