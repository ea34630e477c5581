"""Person re-identification metrics: CMC rank-k and mAP (Market-1501 / MARS protocol).

For each query ``q`` the gallery is ranked by squared Euclidean distance (float64 on the host,
ties to the lower gallery index), then

* **junk** gallery items are removed from the ranking: same identity *and* same camera as the
  query (the Market-1501 / MARS rule), and every item with a negative identity (Market-1501's
  ``-1`` "junk" images). Identity ``0`` (Market's distractors) or any other non-negative id of
  another person stays in as a negative.
* **good** items: same identity, different camera. Queries with no good item are skipped and
  not counted (as the official evaluation code does).
* ``cmc@k`` = fraction of queries whose first good item is within the first ``k`` remaining
  positions; ``map`` = mean over queries of ``AP = (1/|good|) sum_{good i} hits(<= i) / i``
  (non-interpolated, as in torchreid / the MARS evaluation code).

References: L. Zheng et al., "Scalable Person Re-identification: A Benchmark" (Market-1501),
ICCV 2015; L. Zheng et al., "MARS: A Video Benchmark for Large-Scale Person
Re-identification", ECCV 2016.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from dml_jax.evaluation.knn import check_finite_2d
from dml_jax.evaluation.retrieval import check_labels


def reid_metrics(
    query: jax.typing.ArrayLike,
    query_ids: jax.typing.ArrayLike,
    query_cams: jax.typing.ArrayLike,
    gallery: jax.typing.ArrayLike,
    gallery_ids: jax.typing.ArrayLike,
    gallery_cams: jax.typing.ArrayLike,
    *,
    ranks: Sequence[int] = (1, 5, 10, 20),
    block: int = 512,
) -> dict[str, float]:
    """CMC and mAP of a query/gallery split with camera ids (Market-1501 / MARS protocol).

    Args:
      query: float ``[Q, D]`` query (or tracklet-pooled) features.
      query_ids: int ``[Q]`` identities.
      query_cams: int ``[Q]`` camera ids.
      gallery: float ``[G, D]``.
      gallery_ids: int ``[G]``; negative ids are junk (removed from every ranking).
      gallery_cams: int ``[G]``.
      ranks: the k of ``cmc@k``, each in ``[1, G]``.
      block: queries per block.

    Returns:
      ``{"cmc@k": ... for k in ranks, "map": float, "num_queries": int}``.

    Memory: ``[block, G]`` float64 distances and sort orders; never ``[Q, G]`` at once.

    Raises:
      ValueError: mismatched lengths or dimensions, NaN/inf features, a rank outside
        ``[1, G]``, or no query with a valid (same id, other camera) gallery match.
    """
    q = check_finite_2d(query, "query")
    g = check_finite_2d(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"`query` has dimension {q.shape[1]} but `gallery` has {g.shape[1]}.")
    qid = check_labels(query_ids, q.shape[0], "query_ids", "query")
    qcam = check_labels(query_cams, q.shape[0], "query_cams", "query")
    gid = check_labels(gallery_ids, g.shape[0], "gallery_ids", "gallery")
    gcam = check_labels(gallery_cams, g.shape[0], "gallery_cams", "gallery")
    ranks = tuple(int(r) for r in ranks)
    for r in ranks:
        if not 1 <= r <= g.shape[0]:
            raise ValueError(f"Every rank must be in [1, {g.shape[0]}]; got {r}.")

    g64 = g.astype(np.float64)
    g_sq = np.sum(g64 * g64, axis=1)
    cmc_hits = {r: 0.0 for r in ranks}
    ap_sum = 0.0
    n_valid = 0
    for s in range(0, q.shape[0], block):
        qb = q[s : s + block].astype(np.float64)
        d = np.sum(qb * qb, axis=1)[:, None] + g_sq[None, :] - 2.0 * (qb @ g64.T)
        order = np.argsort(d, axis=1, kind="stable")  # ties: lower gallery index first
        ids, cams = gid[order], gcam[order]
        same_id = ids == qid[s : s + block, None]
        junk = (same_id & (cams == qcam[s : s + block, None])) | (ids < 0)
        good = same_id & ~junk
        n_good = good.sum(axis=1)
        keep = n_good > 0
        if not np.any(keep):
            continue
        good, junk, n_good = good[keep], junk[keep], n_good[keep].astype(np.float64)
        pos = np.cumsum(~junk, axis=1)  # 1-based position among non-junk items
        first = np.min(np.where(good, pos, np.iinfo(np.int64).max), axis=1)
        for r in ranks:
            cmc_hits[r] += float(np.sum(first <= r))
        hits = np.cumsum(good, axis=1)
        prec = np.where(good, hits / np.maximum(pos, 1), 0.0)
        ap_sum += float(np.sum(np.sum(prec, axis=1) / n_good))
        n_valid += int(keep.sum())
    if n_valid == 0:
        raise ValueError(
            "No query has a gallery item of the same identity from another camera: "
            "CMC and mAP are undefined."
        )
    out: dict[str, float] = {f"cmc@{r}": cmc_hits[r] / n_valid for r in ranks}
    out["map"] = ap_sum / n_valid
    out["num_queries"] = n_valid
    return out
