"""Plain NumPy (float64) loop references written from the papers' equations.

Deliberately naive: explicit loops over pairs/triplets, no vectorisation, no shared code with
``dml_jax``. ``where`` is handled by dropping the masked rows first.
"""

from __future__ import annotations

import math

import numpy as np


def _drop(e, y, where):
    e = np.asarray(e, np.float64)
    y = np.asarray(y)
    if where is not None:
        keep = np.asarray(where, bool)
        e, y = e[keep], y[keep]
    return e, y


def dist(a, b):
    return math.sqrt(sum((float(x) - float(z)) ** 2 for x, z in zip(a, b)))


def cos(a, b):
    na = math.sqrt(sum(float(x) ** 2 for x in a))
    nb = math.sqrt(sum(float(x) ** 2 for x in b))
    if na == 0 or nb == 0:
        return 0.0
    return sum(float(x) * float(z) for x, z in zip(a, b)) / (na * nb)


def relu(x):
    return x if x > 0 else 0.0


def contrastive(e, y, pos_margin=0.0, neg_margin=1.0, where=None):
    e, y = _drop(e, y, where)
    n = len(y)
    ps, ns = [], []
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            d = dist(e[i], e[j])
            if y[i] == y[j]:
                ps.append(relu(d - pos_margin))
            else:
                ns.append(relu(neg_margin - d))
    return (np.mean(ps) if ps else 0.0) + (np.mean(ns) if ns else 0.0)


def triplet(e, y, margin=0.2, mining="all", where=None):
    e, y = _drop(e, y, where)
    n = len(y)
    D = [[dist(e[i], e[j]) for j in range(n)] for i in range(n)]
    terms = []
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [k for k in range(n) if y[k] != y[a]]
        if mining == "all":
            for p in pos:
                for k in neg:
                    terms.append(relu(D[a][p] - D[a][k] + margin))
        elif mining == "batch_hard":
            if pos and neg:
                terms.append(relu(max(D[a][p] for p in pos) - min(D[a][k] for k in neg) + margin))
        elif mining == "semi_hard":
            if not neg:
                continue
            for p in pos:
                harder = [D[a][k] for k in neg if D[a][k] > D[a][p]]
                d_an = min(harder) if harder else max(D[a][k] for k in neg)
                terms.append(relu(D[a][p] - d_an + margin))
        else:
            raise ValueError(mining)
    return float(np.mean(terms)) if terms else 0.0


def lifted(e, y, neg_margin=1.0, pos_margin=0.0, where=None):
    e, y = _drop(e, y, where)
    n = len(y)
    terms = []
    for i in range(n):
        for j in range(n):
            if i == j or y[i] != y[j]:
                continue
            s = 0.0
            for k in range(n):
                if y[k] != y[i]:
                    s += math.exp(neg_margin - dist(e[i], e[k]))
            for m in range(n):
                if y[m] != y[j]:
                    s += math.exp(neg_margin - dist(e[j], e[m]))
            if s == 0.0:
                terms.append(0.0)
                continue
            J = math.log(s) + dist(e[i], e[j]) - pos_margin
            terms.append(0.5 * relu(J) ** 2)
    return float(np.mean(terms)) if terms else 0.0


def multi_similarity(e, y, alpha=2.0, beta=50.0, base=0.5, epsilon=None, where=None):
    e, y = _drop(e, y, where)
    n = len(y)
    if n == 0:
        return 0.0
    out = []
    for i in range(n):
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        neg = [k for k in range(n) if y[k] != y[i]]
        S = {j: cos(e[i], e[j]) for j in range(n)}
        if epsilon is not None:
            min_pos = min((S[j] for j in pos), default=math.inf)
            max_neg = max((S[k] for k in neg), default=-math.inf)
            neg = [k for k in neg if S[k] + epsilon > min_pos]
            pos = [j for j in pos if S[j] - epsilon < max_neg]
        lp = math.log1p(sum(math.exp(-alpha * (S[j] - base)) for j in pos)) / alpha
        ln = math.log1p(sum(math.exp(beta * (S[k] - base)) for k in neg)) / beta
        out.append(lp + ln)
    return float(np.mean(out))


def numerical_grad(f, e, eps=1e-5):
    """Central finite differences of a float64 scalar function of ``e`` ``[B, D]``."""
    e = np.asarray(e, np.float64)
    g = np.zeros_like(e)
    for idx in np.ndindex(*e.shape):
        hi = e.copy()
        lo = e.copy()
        hi[idx] += eps
        lo[idx] -= eps
        g[idx] = (f(hi) - f(lo)) / (2 * eps)
    return g


# ---------------------------------------------------------------------------------------------
# Seed-paper losses. ``weights_at``: compute the (stop-gradient) weights at these embeddings
# instead of ``e``, so finite differences see the weights frozen, as the losses define them.


def _normalize(v):
    n = math.sqrt(sum(float(x) ** 2 for x in v))
    return [float(x) / max(n, 1e-12) for x in v]


def softmax_true_prob(logits_row, label):
    if not 0 <= label < len(logits_row):
        return 0.0
    m = max(float(z) for z in logits_row)
    ex = [math.exp(float(z) - m) for z in logits_row]
    return ex[label] / sum(ex)


def osm_caa(e, y, logits=None, margin=1.2, sigma=0.8, lam=0.5, kernel="paper",
            attention="softmax", where=None, weights_at=None):
    w_e = e if weights_at is None else weights_at
    if logits is not None:
        logits = np.asarray(logits, np.float64)
        if where is not None:
            logits = logits[np.asarray(where, bool)]
    e, y = _drop(e, y, where)
    w_e, _ = _drop(w_e, np.zeros(len(np.asarray(w_e))), where)
    n = len(y)
    f = [_normalize(e[i]) for i in range(n)]
    fw = [_normalize(w_e[i]) for i in range(n)]
    a = []
    for i in range(n):
        if logits is None:
            a.append(1.0)
            continue
        p = softmax_true_prob(logits[i], int(y[i]))
        if attention == "gaussian" and 0 <= y[i] < logits.shape[1]:
            p = math.exp(-0.5 * ((p - 1.0) / 0.68) ** 2)
        a.append(p)
    width = sigma**2 if kernel == "paper" else 2 * sigma**2
    pn = pd = nn = nd = 0.0
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            d = dist(f[i], f[j])
            dw = dist(fw[i], fw[j])
            aij = min(a[i], a[j])
            if y[i] == y[j]:
                w = math.exp(-dw * dw / width) * aij
                pn += w * d * d
                pd += w
            else:
                w = relu(margin - dw) * aij
                nn += w * relu(margin - d) ** 2
                nd += w
    lp = 0.5 * pn / pd if pd > 0 else 0.0
    ln = 0.5 * nn / nd if nd > 0 else 0.0
    return (1 - lam) * lp + lam * ln


def ranked_list(e, y, margin=0.4, alpha=1.2, t_n=10.0, t_p=0.0, lam=0.5,
                query_weighting="uniform", where=None, weights_at=None):
    w_e = e if weights_at is None else weights_at
    e, y = _drop(e, y, where)
    w_e, _ = _drop(w_e, np.zeros(len(np.asarray(w_e))), where)
    n = len(y)
    boundary = alpha - margin
    losses, weights = [], []
    for i in range(n):
        pn = pd = nn = nd = 0.0
        for j in range(n):
            if j == i:
                continue
            d = dist(e[i], e[j])
            dw = dist(w_e[i], w_e[j])
            if y[j] == y[i] and dw > boundary:
                w = math.exp(t_p * (dw - boundary))
                pn += w * (d - boundary)
                pd += w
            elif y[j] != y[i] and dw < alpha:
                w = math.exp(t_n * (alpha - dw))
                nn += w * (alpha - d)
                nd += w
        lp = pn / pd if pd > 0 else 0.0
        ln = nn / nd if nd > 0 else 0.0
        losses.append((1 - lam) * lp + lam * ln)
        weights.append(pd + nd)
    if n == 0:
        return 0.0
    if query_weighting == "uniform":
        return float(np.mean(losses))
    total = sum(weights)
    return sum(w * v for w, v in zip(weights, losses)) / total if total > 0 else 0.0


def center(e, y, centers, where=None):
    e, y = _drop(e, y, where)
    c = np.asarray(centers, np.float64)
    terms = [0.5 * dist(e[i], c[min(max(int(y[i]), 0), len(c) - 1)]) ** 2 for i in range(len(y))]
    return float(np.mean(terms)) if terms else 0.0


def update_centers(centers, e, y, alpha=0.5, where=None):
    e, y = _drop(e, y, where)
    c = np.array(centers, np.float64)
    new = c.copy()
    for j in range(len(c)):
        members = [i for i in range(len(y)) if y[i] == j]
        delta = sum((c[j] - e[i] for i in members), np.zeros(c.shape[1])) / (1 + len(members))
        new[j] = c[j] - alpha * delta
    return new


def cross_entropy(logits, y, where=None):
    logits, y = _drop(logits, y, where)
    out = [-math.log(softmax_true_prob(logits[i], int(y[i]))) for i in range(len(y))]
    return float(np.mean(out)) if out else 0.0


def center_structured(e, y, logits, centers, lam=1.0, beta=1.0, neg_margin=1.0,
                      center_margin=1.0, where=None):
    c = np.asarray(centers, np.float64)
    k = len(c)
    inter = []
    for a in range(k):
        for b in range(k):
            if a != b:
                inter.append(relu(center_margin - dist(c[a], c[b]) ** 2))
    inter = float(np.mean(inter)) if inter else 0.0
    metric = lifted(e, y, neg_margin=neg_margin, where=where) + center(e, y, c, where=where)
    return cross_entropy(logits, y, where) + lam * (metric + beta * inter)


def demal_hybrid(e, y, logits, margin=0.2, mining="all", lam=1.0, where=None):
    return triplet(e, y, margin=margin, mining=mining, where=where) + lam * cross_entropy(
        logits, y, where
    )


# --- Pair layout (rows 2k, 2k+1 = anchor, positive of pair k) and symmetrical synthesis. ------


def reflect(p, a):
    p = np.asarray(p, np.float64)
    u = np.asarray(_normalize(a))
    return 2 * float(np.dot(p, u)) * u - p


def _pairs(e, y, where):
    e = np.asarray(e, np.float64)
    y = np.asarray(y)
    keep = np.ones(len(y), bool) if where is None else np.asarray(where, bool)
    out = []
    for k in range(len(y) // 2):
        if keep[2 * k] and keep[2 * k + 1]:
            out.append((e[2 * k], e[2 * k + 1], int(y[2 * k])))
    return out


def _softmax_ce(logit_row, targets):
    m = max(logit_row)
    lse = m + math.log(sum(math.exp(z - m) for z in logit_row))
    return lse - sum(t * z for t, z in zip(targets, logit_row))


def _pair_ce(pairs, logit):
    n = len(pairs)
    if n == 0:
        return 0.0
    out = []
    for i in range(n):
        row = [logit(i, j) for j in range(n)]
        same = [1.0 if pairs[j][2] == pairs[i][2] else 0.0 for j in range(n)]
        out.append(_softmax_ce(row, [s / sum(same) for s in same]))
    return float(np.mean(out))


def _l2(pairs):
    if not pairs:
        return 0.0
    return 0.25 * (np.mean([np.dot(a, a) for a, _, _ in pairs])
                   + np.mean([np.dot(p, p) for _, p, _ in pairs]))


def _points(pair):
    a, p, _ = pair
    return {"a": a, "p": p, "s1": reflect(p, a), "s2": reflect(a, p)}


def npair(e, y, l2_reg=0.002, where=None):
    pairs = _pairs(e, y, where)
    return _pair_ce(pairs, lambda i, j: float(np.dot(pairs[i][0], pairs[j][1]))) + l2_reg * _l2(
        pairs)


def _angular_logit(pi, pj, same_index, x, y, degree):
    t2 = math.tan(math.radians(degree)) ** 2
    if same_index:
        return 2 * (1 + t2) * float(np.dot(pi[x], pi[y]))
    return 4 * t2 * float(np.dot(pi[x] + pi[y], pj[y]))


def angular(e, y, degree=45.0, l2_reg=0.0, where=None):
    pairs = _pairs(e, y, where)
    pts = [_points(q) for q in pairs]
    return _pair_ce(
        pairs, lambda i, j: _angular_logit(pts[i], pts[j], i == j, "a", "p", degree)
    ) + l2_reg * _l2(pairs)


def symmetric_npair(e, y, l2_reg=0.002, positive="max", where=None):
    import itertools
    pairs = _pairs(e, y, where)
    pts = [_points(q) for q in pairs]

    def logit(i, j):
        if positive == "original" and pairs[i][2] == pairs[j][2]:
            return float(np.dot(pts[i]["a"], pts[j]["p"]))
        return max(float(np.dot(pts[i][x], pts[j][z]))
                   for x, z in itertools.combinations(["a", "p", "s1", "s2"], 2))

    return _pair_ce(pairs, logit) + l2_reg * _l2(pairs)


def symmetric_angular(e, y, degree=45.0, l2_reg=0.0, positive="max", where=None):
    import itertools
    pairs = _pairs(e, y, where)
    pts = [_points(q) for q in pairs]

    def logit(i, j):
        if positive == "original" and pairs[i][2] == pairs[j][2]:
            return _angular_logit(pts[i], pts[j], i == j, "a", "p", degree)
        return max(_angular_logit(pts[i], pts[j], i == j, x, z, degree)
                   for x, z in itertools.permutations(["a", "p", "s1", "s2"], 2))

    return _pair_ce(pairs, logit) + l2_reg * _l2(pairs)


def symmetric_sets(e, y, where=None, normalize=False):
    """Per valid row i: (x_i, label, [positive vectors], [mined negative vectors])."""
    e = np.asarray(e, np.float64)
    if normalize:
        e = np.asarray([_normalize(v) for v in e])
    y = np.asarray(y)
    keep = np.ones(len(y), bool) if where is None else np.asarray(where, bool)
    out = []
    for i in range(len(y)):
        if not keep[i]:
            continue
        positives = [e[j] for j in range(len(y)) if j != i and keep[j] and y[j] == y[i]]
        negatives = []
        for k in range(len(y) // 2):
            xk, xl = e[2 * k], e[2 * k + 1]
            if not (keep[2 * k] and keep[2 * k + 1]) or y[2 * k] == y[i]:
                continue
            cands = [xk, xl, reflect(xk, xl), reflect(xl, xk)]
            negatives.append(min(cands, key=lambda c: dist(e[i], c)))
        out.append((e[i], int(y[i]), positives, negatives))
    return out


def symmetric_triplet(e, y, margin=0.2, mining="all", where=None):
    terms = []
    for x, _, ps, ns in symmetric_sets(e, y, where):
        dp = [dist(x, p) for p in ps]
        dn = [dist(x, n) for n in ns]
        if mining == "all":
            terms += [relu(a - b + margin) for a in dp for b in dn]
        elif mining == "batch_hard":
            if dp and dn:
                terms.append(relu(max(dp) - min(dn) + margin))
        else:
            for a in dp if dn else []:
                harder = [b for b in dn if b > a]
                terms.append(relu(a - (min(harder) if harder else max(dn)) + margin))
    return float(np.mean(terms)) if terms else 0.0


def symmetric_lifted(e, y, neg_margin=1.0, pos_margin=0.0, where=None):
    sets = symmetric_sets(e, y, where)
    lse = {}
    for idx, (x, _, _, ns) in enumerate(sets):
        lse[idx] = [math.exp(neg_margin - dist(x, n)) for n in ns]
    terms = []
    for i, (x, lab, _, _) in enumerate(sets):
        for j, (z, lab2, _, _) in enumerate(sets):
            if i == j or lab != lab2:
                continue
            s = sum(lse[i]) + sum(lse[j])
            terms.append(0.0 if s == 0 else 0.5 * relu(math.log(s) + dist(x, z) - pos_margin) ** 2)
    return float(np.mean(terms)) if terms else 0.0


def symmetric_contrastive(e, y, pos_margin=0.0, neg_margin=1.0, where=None):
    ps, ns = [], []
    for x, _, pos, neg in symmetric_sets(e, y, where):
        ps += [relu(dist(x, p) - pos_margin) for p in pos]
        ns += [relu(neg_margin - dist(x, n)) for n in neg]
    return (np.mean(ps) if ps else 0.0) + (np.mean(ns) if ns else 0.0)


def symmetric_multi_similarity(e, y, alpha=2.0, beta=50.0, base=0.5, where=None):
    out = []
    for x, _, pos, neg in symmetric_sets(e, y, where, normalize=True):
        lp = math.log1p(sum(math.exp(-alpha * (float(np.dot(x, p)) - base)) for p in pos))
        ln = math.log1p(sum(math.exp(beta * (float(np.dot(x, n)) - base)) for n in neg))
        out.append(lp / alpha + ln / beta)
    return float(np.mean(out)) if out else 0.0


def symmetric_osm_caa(e, y, margin=1.2, sigma=0.8, lam=0.5, kernel="paper", where=None,
                      weights_at=None):
    """Without logits (attention 1)."""
    w_sets = symmetric_sets(e if weights_at is None else weights_at, y, where, normalize=True)
    sets = symmetric_sets(e, y, where, normalize=True)
    width = sigma**2 if kernel == "paper" else 2 * sigma**2
    pn = pd = nn = nd = 0.0
    for (x, _, pos, neg), (xw, _, posw, negw) in zip(sets, w_sets):
        for p, pw in zip(pos, posw):
            w = math.exp(-dist(xw, pw) ** 2 / width)
            pn += w * dist(x, p) ** 2
            pd += w
        for n, nw in zip(neg, negw):
            w = relu(margin - dist(xw, nw))
            nn += w * relu(margin - dist(x, n)) ** 2
            nd += w
    lp = 0.5 * pn / pd if pd > 0 else 0.0
    ln = 0.5 * nn / nd if nd > 0 else 0.0
    return (1 - lam) * lp + lam * ln
