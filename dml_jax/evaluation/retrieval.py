"""Retrieval metrics of deep metric learning: Recall@K, Precision@1, R-Precision, MAP@R.

Definitions (``NN_i(q)`` = the i-th nearest reference item of query ``q`` under the ranking rule
of :mod:`dml_jax.evaluation.knn`: squared Euclidean distance, ties to the lower reference index,
the query itself excluded by index when the query set is its own gallery):

* ``R_q = |{r in reference \\ {q} : y_r = y_q}|``; queries with ``R_q = 0`` are left out of every
  metric and of ``num_queries`` (as pytorch-metric-learning's ``AccuracyCalculator`` does).
* ``recall@K = mean_q 1[exists i <= K : y_{NN_i(q)} = y_q]`` (the hit rate DML papers call
  Recall@K; Song et al., CVPR 2016), ``precision@1 = recall@1``.
* ``r_precision = mean_q |{i <= R_q : y_{NN_i(q)} = y_q}| / R_q``.
* ``map@r = mean_q (1 / R_q) sum_{i <= R_q} P_q(i) rel_q(i)``, ``P_q(i)`` the precision among the
  first ``i`` neighbours and ``rel_q(i) = 1[y_{NN_i(q)} = y_q]``.

Reference: K. Musgrave, S. Belongie, S.-N. Lim, "A Metric Learning Reality Check", ECCV 2020,
section 3.2 (R-Precision and MAP@R).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from dml_jax.evaluation.knn import Backend, check_finite_2d, search_rows

# Host memory bound for one chunk of [chunk, k] neighbour indices / matches.
_MAX_CHUNK_ELEMENTS = 1 << 24


def check_labels(labels: jax.typing.ArrayLike, n: int, name: str, rows_name: str) -> np.ndarray:
    """Returns integer ``labels`` ``[n]`` as int64 or raises ``ValueError``."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"`{name}` must have shape [N]; got shape {labels.shape}.")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"`{name}` must be an integer array; got dtype {labels.dtype}.")
    if labels.shape[0] != n:
        raise ValueError(
            f"`{name}` has {labels.shape[0]} entries but `{rows_name}` has {n} rows: "
            "their lengths must match."
        )
    return labels.astype(np.int64)


def relevant_counts(
    query_labels: np.ndarray, reference_labels: np.ndarray, self_gallery: bool
) -> np.ndarray:
    """``R_q`` for each query: reference items with the query's label, self excluded. ``[Q]``."""
    uniq, counts = np.unique(reference_labels, return_counts=True)
    pos = np.searchsorted(uniq, query_labels)
    pos_c = np.minimum(pos, max(uniq.shape[0] - 1, 0))
    found = (uniq.shape[0] > 0) & (uniq[pos_c] == query_labels)
    r = np.where(found, counts[pos_c], 0)
    return r - 1 if self_gallery else r


def retrieval_metrics(
    query: jax.typing.ArrayLike,
    query_labels: jax.typing.ArrayLike,
    reference: jax.typing.ArrayLike | None = None,
    reference_labels: jax.typing.ArrayLike | None = None,
    *,
    ks: Sequence[int] = (1, 2, 4, 8),
    where: jax.typing.ArrayLike | None = None,
    backend: Backend = "auto",
) -> dict[str, float]:
    """Recall@K, Precision@1, R-Precision and MAP@R of exact nearest-neighbour retrieval.

    Args:
      query: float ``[Q, D]`` embeddings (L2-normalise them first for cosine ranking).
      query_labels: int ``[Q]`` class ids.
      reference: float ``[N, D]`` gallery, or None: the query set is its own gallery and each
        query's own index is excluded from its ranking and from ``R_q``.
      reference_labels: int ``[N]``; given exactly when ``reference`` is.
      ks: the K of ``recall@K``; each ``1 <= K <=`` gallery size (minus one without
        ``reference``).
      where: optional bool ``[Q]``; False rows are not used as queries (with ``reference=None``
        they stay in the gallery).
      backend: k-NN backend, see :func:`dml_jax.evaluation.knn` (all give identical values).

    Returns:
      ``{"recall@K": ... for K in ks, "precision@1", "r_precision", "map@r", "num_queries"}``,
      averaged in float64 over the ``num_queries`` queries with ``where`` True and ``R_q > 0``
      (see the module docstring for the formulas).

    Memory: the k-NN search holds ``[query_block, reference_block]`` per device; the host holds
    ``[chunk, k]`` neighbours with ``k = max(max(ks), max_q R_q)``; never ``[Q, N]``.

    Raises:
      ValueError: mismatched lengths or dimensions, wrong ranks, non-integer labels, NaN/inf
        embeddings, a K outside ``[1, gallery size]``, or no query with ``R_q > 0`` left
        (the metrics would be undefined; we raise rather than return NaN).

    Reference: Musgrave, Belongie, Lim, "A Metric Learning Reality Check", ECCV 2020.
    """
    q = check_finite_2d(query, "query")
    ql = check_labels(query_labels, q.shape[0], "query_labels", "query")
    if (reference is None) != (reference_labels is None):
        raise ValueError("Pass both `reference` and `reference_labels`, or neither.")
    self_gallery = reference is None
    if self_gallery:
        ref, rl = q, ql
    else:
        ref = check_finite_2d(reference, "reference")
        rl = check_labels(reference_labels, ref.shape[0], "reference_labels", "reference")
        if ref.shape[1] != q.shape[1]:
            raise ValueError(
                f"`query` has dimension {q.shape[1]} but `reference` has {ref.shape[1]}."
            )
    if where is None:
        mask = np.ones(q.shape[0], bool)
    else:
        mask = np.asarray(where)
        if mask.shape != (q.shape[0],):
            raise ValueError(f"`where` must have shape ({q.shape[0]},); got {mask.shape}.")
        mask = mask.astype(bool)
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("`ks` must name at least one K.")
    gallery = ref.shape[0] - (1 if self_gallery else 0)
    for kk in ks:
        if not 1 <= kk <= gallery:
            raise ValueError(
                f"Every K in `ks` must be in [1, {gallery}] (the gallery size"
                f"{' minus the query itself' if self_gallery else ''}); got {kk}."
            )

    r_q = relevant_counts(ql, rl, self_gallery)
    valid = np.nonzero(mask & (r_q > 0))[0]
    if valid.size == 0:
        raise ValueError(
            "No query has a relevant reference item (R_q > 0 among the queries selected by "
            "`where`): the retrieval metrics are undefined."
        )
    k = max(max(ks), int(r_q[valid].max()))
    q_self = valid.astype(np.int32) if self_gallery else np.full(valid.size, -1, np.int32)

    hits = {kk: 0.0 for kk in ks}
    p1_sum = 0.0
    rp_sum = 0.0
    map_sum = 0.0
    chunk = max(1, min(valid.size, _MAX_CHUNK_ELEMENTS // k))
    ranks = np.arange(1, k + 1, dtype=np.float64)
    for s in range(0, valid.size, chunk):
        rows = valid[s : s + chunk]
        _, idx = search_rows(q[rows], q_self[s : s + chunk], ref, k, backend=backend)
        match = rl[idx] == ql[rows][:, None]  # [chunk, k] bool
        p1_sum += float(np.sum(match[:, 0]))
        for kk in ks:
            hits[kk] += float(np.sum(np.any(match[:, :kk], axis=1)))
        r = r_q[rows].astype(np.float64)
        in_r = ranks[None, :] <= r[:, None]
        rel = match & in_r
        rp_sum += float(np.sum(np.sum(rel, axis=1) / r))
        prec = np.cumsum(match, axis=1) / ranks[None, :]
        map_sum += float(np.sum(np.sum(prec * rel, axis=1) / r))

    n = float(valid.size)
    out: dict[str, float] = {f"recall@{kk}": hits[kk] / n for kk in ks}
    out["precision@1"] = p1_sum / n  # equals recall@1
    out["r_precision"] = rp_sum / n
    out["map@r"] = map_sum / n
    out["num_queries"] = int(valid.size)
    return out
