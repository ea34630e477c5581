"""Clustering quality of embeddings: k-means, then NMI and the pairwise F1 of Song et al.

``clustering_metrics`` runs k-means with ``k`` = number of distinct labels (the DML protocol)
and scores the assignment against the labels:

* ``nmi = I(Y; C) / ((H(Y) + H(C)) / 2)`` -- arithmetic normalisation, equal to scikit-learn's
  ``normalized_mutual_info_score`` default (natural logarithms cancel in the ratio).
* ``f1`` -- pair counting (Song et al., "Deep Metric Learning via Facility Location", CVPR 2017):
  over all ``comb(N, 2)`` sample pairs, ``TP`` = same cluster and same class,
  ``TP + FP = sum_c comb(n_c, 2)`` over clusters, ``TP + FN = sum_y comb(n_y, 2)`` over classes;
  ``P = TP / (TP + FP)``, ``R = TP / (TP + FN)``, ``F1 = 2 P R / (P + R)``. Computed from the
  sparse contingency table in O(N log N), never from the ``O(N^2)`` pairs.

k-means backends (``backend=``): ``"faiss"`` -- ``faiss.Kmeans`` (the implementation
pytorch-metric-learning's AccuracyCalculator and Roth et al. use; multi-threaded BLAS on CPU,
much faster there than a JAX or scikit-learn Lloyd loop at SOP size, 60k x 512 with ~11k
clusters); ``"jax"`` -- Lloyd's algorithm jitted on the default device (the choice on an
accelerator); ``"auto"`` -- faiss when installed and JAX runs on CPU, else JAX. Both start from
the same seeds -- greedy k-means++ (Arthur & Vassilvitskii 2007: each next seed drawn with
probability proportional to its squared distance to the nearest seed so far, the best of
``2 + ln K`` such draws kept, as in scikit-learn; computed in JAX, O(N log K) memory)
or ``num_clusters`` distinct random points -- run ``num_iters`` Lloyd iterations, and repeat
``num_init`` times from different seeds keeping the run of lowest inertia (sum of squared
distances to the assigned centroid), as scikit-learn's ``KMeans`` does. A result is reproducible
for a fixed seed, backend and machine (faiss: also a fixed thread count).
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from dml_jax.evaluation.knn import _faiss_available, check_finite_2d
from dml_jax.evaluation.retrieval import check_labels

KMeansBackend = Literal["auto", "jax", "faiss"]


def _contingency(labels_true: np.ndarray, labels_pred: np.ndarray):
    """Sparse contingency table.

    Returns ``(nij, a_i, b_j, a, b)``: the nonzero cell counts, the class and cluster size of
    each such cell, and all class sizes ``a`` and cluster sizes ``b``. Memory O(N).
    """
    _, yt = np.unique(labels_true, return_inverse=True)
    _, yp = np.unique(labels_pred, return_inverse=True)
    a, b = np.bincount(yt), np.bincount(yp)
    codes = yt.astype(np.int64) * b.size + yp
    cells, nij = np.unique(codes, return_counts=True)
    return nij, a[cells // b.size], b[cells % b.size], a, b


def _check_assignments(labels_true, labels_pred) -> tuple[np.ndarray, np.ndarray]:
    labels_true = np.asarray(labels_true).reshape(-1)
    labels_pred = np.asarray(labels_pred).reshape(-1)
    if labels_true.shape != labels_pred.shape:
        raise ValueError(
            f"`labels_true` has {labels_true.shape[0]} entries but `labels_pred` has "
            f"{labels_pred.shape[0]}: their lengths must match."
        )
    if labels_true.size == 0:
        raise ValueError("Empty label arrays: clustering metrics are undefined.")
    return labels_true, labels_pred


def normalized_mutual_info(
    labels_true: jax.typing.ArrayLike, labels_pred: jax.typing.ArrayLike
) -> float:
    """NMI with arithmetic normalisation: ``I(Y; C) / ((H(Y) + H(C)) / 2)``.

    Args:
      labels_true: int ``[N]`` classes.
      labels_pred: int ``[N]`` cluster ids.

    Returns:
      float in ``[0, 1]``; 1.0 when both partitions are a single block (scikit-learn's
      convention), matching ``sklearn.metrics.normalized_mutual_info_score`` (default
      ``average_method="arithmetic"``). Memory: O(N) (sparse contingency table).
    """
    yt, yp = _check_assignments(labels_true, labels_pred)
    nij, ai, bj, a, b = _contingency(yt, yp)
    if (a.size == 1 and b.size == 1) or (a.size == 0 and b.size == 0):
        return 1.0
    n = float(yt.size)

    def entropy(counts):
        p = counts[counts > 0] / n
        return float(-np.sum(p * np.log(p)))

    h_true, h_pred = entropy(a), entropy(b)
    # I = sum_ij n_ij/n log(n n_ij / (a_i b_j)) over the nonzero cells.
    ai, bj = ai.astype(np.float64), bj.astype(np.float64)
    mi = float(np.sum(nij / n * (np.log(nij * n) - np.log(ai * bj))))
    mi = max(mi, 0.0)
    denom = max((h_true + h_pred) / 2.0, np.finfo(np.float64).eps)
    return mi / denom


def pairwise_f1(labels_true: jax.typing.ArrayLike, labels_pred: jax.typing.ArrayLike) -> float:
    """Pairwise clustering F1 (Song et al., CVPR 2017) from ``comb(n, 2)`` counts.

    Args:
      labels_true: int ``[N]`` classes.
      labels_pred: int ``[N]`` cluster ids.

    Returns:
      ``2 P R / (P + R)`` with pair precision ``P`` and recall ``R`` (see the module
      docstring); 0.0 when no pair is predicted or relevant. Memory: O(N).
    """
    yt, yp = _check_assignments(labels_true, labels_pred)
    nij, _, _, a, b = _contingency(yt, yp)

    def pairs(c):
        c = c.astype(np.float64)
        return float(np.sum(c * (c - 1.0) / 2.0))

    tp, pred_pos, true_pos = pairs(nij), pairs(b), pairs(a)
    if tp == 0.0:
        return 0.0
    precision, recall = tp / pred_pos, tp / true_pos
    return 2.0 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# k-means
# --------------------------------------------------------------------------------------------


KMeansInit = Literal["auto", "k-means++", "random"]
# Above this many point-cluster pairs (N x K), k-means++'s K sequential passes over the data
# cost more than the Lloyd iterations themselves (SOP: 60k x 11k): "auto" then starts from one
# set of random distinct points, as pytorch-metric-learning's faiss k-means does.
LARGE_KMEANS = 10**8


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def _kmeans_plus_plus(x: jax.Array, key: jax.Array, *, num_clusters: int) -> jax.Array:
    """Greedy k-means++ seed indices ``[K]`` into ``x`` ``[N, D]``.

    Each step draws ``2 + floor(ln K)`` candidates with probability proportional to their
    squared distance to the nearest seed so far and keeps the one that lowers the total most
    (the greedy variant scikit-learn uses). Holds ``[L, N]`` distances, ``L`` candidates.
    """
    n = x.shape[0]
    trials = 2 + int(math.log(num_clusters))
    x_sq = jnp.sum(x * x, axis=1)

    def sq_dist_to(idx):  # [L] -> [L, N]
        dots = jnp.matmul(x[idx], x.T, precision=jax.lax.Precision.HIGHEST)
        return jnp.maximum(x_sq[idx][:, None] - 2.0 * dots + x_sq[None, :], 0.0)

    key, first_key = jax.random.split(key)
    first = jax.random.randint(first_key, (1,), 0, n)
    chosen = jnp.zeros((num_clusters,), jnp.int32).at[0].set(first[0])
    nearest = sq_dist_to(first)[0].at[first[0]].set(0.0)

    def add_seed(j, carry):
        chosen, nearest, key = carry
        key, draw = jax.random.split(key)
        taken = jnp.zeros((n,), bool).at[chosen].set(jnp.arange(num_clusters) < j)
        # Points that coincide with a seed have weight 0; when every remaining point does,
        # draw uniformly among those not chosen yet.
        weight = jnp.where(jnp.sum(nearest) > 0, nearest, 1.0)
        logits = jnp.where(taken | (weight <= 0), -jnp.inf, jnp.log(jnp.maximum(weight, 0.0)))
        candidates = jax.random.categorical(draw, logits, shape=(trials,)).astype(jnp.int32)
        updated = jnp.minimum(nearest[None, :], sq_dist_to(candidates))  # [L, N]
        best = jnp.argmin(jnp.sum(updated, axis=1))
        i = candidates[best]
        return chosen.at[j].set(i), updated[best].at[i].set(0.0), key

    chosen, _, _ = jax.lax.fori_loop(1, num_clusters, add_seed, (chosen, nearest, key))
    return chosen


def _initial_seeds(x: np.ndarray, k: int, key: jax.Array, init: KMeansInit) -> np.ndarray:
    """``k`` distinct seed indices into ``x`` (sorted for the random init, in draw order for
    k-means++)."""
    if init == "random":
        return np.sort(np.asarray(jax.random.permutation(key, x.shape[0]))[:k])
    return np.asarray(_kmeans_plus_plus(jnp.asarray(x), key, num_clusters=k))


@functools.partial(jax.jit, static_argnames=("num_clusters", "block"))
def _lloyd_step(x_blocks, valid_blocks, centroids, *, num_clusters, block):
    """One Lloyd iteration. ``x_blocks [nb, block, D]``; holds ``[block, K]`` per step.

    Returns the new centroids, the assignment ``[nb, block]`` and the inertia of that
    assignment to the *given* centroids.
    """
    c_sq = jnp.sum(centroids * centroids, axis=1)

    def assign(args):
        xb, _ = args
        d = c_sq[None, :] - 2.0 * jnp.matmul(xb, centroids.T, precision=jax.lax.Precision.HIGHEST)
        a = jnp.argmin(d, axis=1).astype(jnp.int32)
        return a, jnp.min(d, axis=1) + jnp.sum(xb * xb, axis=1)

    a, sq = jax.lax.map(assign, (x_blocks, valid_blocks))
    flat_x = x_blocks.reshape(-1, x_blocks.shape[-1])
    flat_a = a.reshape(-1)
    w = valid_blocks.reshape(-1).astype(jnp.float32)
    sums = jax.ops.segment_sum(flat_x * w[:, None], flat_a, num_segments=num_clusters)
    counts = jax.ops.segment_sum(w, flat_a, num_segments=num_clusters)
    # An empty cluster keeps its previous centroid.
    new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centroids)
    inertia = jnp.sum(jnp.where(valid_blocks, jnp.maximum(sq, 0.0), 0.0))
    return new, a, inertia


def _kmeans_jax(x: np.ndarray, seeds: np.ndarray, num_iters: int, block: int = 4096):
    """Lloyd from ``x[seeds]``; returns ``(assignment [N], inertia)``."""
    n, dim = x.shape
    k = seeds.size
    block = min(block, n)
    nb = math.ceil(n / block)
    xp = np.zeros((nb * block, dim), np.float32)
    xp[:n] = x
    valid = np.zeros((nb * block,), bool)
    valid[:n] = True
    centroids = jnp.asarray(x[seeds])
    xb = jnp.asarray(xp.reshape(nb, block, dim))
    vb = jnp.asarray(valid.reshape(nb, block))
    for _ in range(num_iters):
        centroids, _, _ = _lloyd_step(xb, vb, centroids, num_clusters=k, block=block)
    _, a, inertia = _lloyd_step(xb, vb, centroids, num_clusters=k, block=block)
    return np.asarray(a).reshape(-1)[:n].astype(np.int64), float(inertia)


def _kmeans_faiss(x: np.ndarray, seeds: np.ndarray, num_iters: int):
    """faiss Lloyd from ``x[seeds]``; returns ``(assignment [N], inertia)``."""
    import faiss

    k = seeds.size
    km = faiss.Kmeans(x.shape[1], k, niter=num_iters, verbose=False)
    # faiss subsamples to 256 points per centroid by default; keep every point.
    km.cp.max_points_per_centroid = max(256, math.ceil(x.shape[0] / k) + 1)
    km.train(x, init_centroids=np.ascontiguousarray(x[seeds]))
    sq, a = km.index.search(x, 1)
    return a[:, 0].astype(np.int64), float(np.sum(sq[:, 0], dtype=np.float64))


def kmeans(
    x: jax.typing.ArrayLike,
    num_clusters: int,
    *,
    seed: int = 0,
    num_iters: int = 20,
    num_init: int | None = None,
    init: KMeansInit = "auto",
    backend: KMeansBackend = "auto",
) -> np.ndarray:
    """k-means cluster assignments: the best of ``num_init`` Lloyd runs.

    Args:
      x: float ``[N, D]``.
      num_clusters: ``1 <= K <= N``.
      seed: seed of the initialisations (reproducible for fixed seed, backend and machine).
      num_iters: Lloyd iterations per run (20, as pytorch-metric-learning's ``FaissKMeans``).
      num_init: runs from different seeds; the one of lowest inertia is returned. Default
        (None): 3, or 1 when ``N x K > LARGE_KMEANS`` (1e8).
      init: ``"k-means++"``, ``"random"`` (distinct points drawn uniformly) or ``"auto"``
        (default: k-means++, or random when ``N x K > LARGE_KMEANS``).
      backend: ``"faiss"``, ``"jax"`` or ``"auto"`` (see the module docstring).

    Returns:
      int64 ``[N]`` cluster ids in ``[0, K)``. Memory: JAX backend ``[4096, K]`` per step plus
      ``x``; k-means++ ``[N]``; faiss: its own blocked search. Time: ``num_init`` x (seeding,
      ``K`` passes over ``x`` for k-means++, plus ``num_iters`` Lloyd iterations).
    """
    x = check_finite_2d(x, "x")
    k = int(num_clusters)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"`num_clusters` must be in [1, {x.shape[0]}]; got {k}.")
    if backend not in ("auto", "jax", "faiss"):
        raise ValueError(f"`backend` must be one of ('auto', 'jax', 'faiss'); got {backend!r}.")
    if init not in ("auto", "k-means++", "random"):
        raise ValueError(f"`init` must be 'auto', 'k-means++' or 'random'; got {init!r}.")
    large = x.shape[0] * k > LARGE_KMEANS
    if init == "auto":
        init = "random" if large else "k-means++"
    if num_init is None:
        num_init = 1 if large else 3
    if int(num_init) < 1:
        raise ValueError(f"`num_init` must be >= 1; got {num_init}.")
    if backend == "auto":
        backend = "faiss" if jax.default_backend() == "cpu" and _faiss_available() else "jax"
    run = _kmeans_faiss if backend == "faiss" else _kmeans_jax
    best, best_inertia = None, math.inf
    for key in jax.random.split(jax.random.key(seed), int(num_init)):
        assignment, inertia = run(x, _initial_seeds(x, k, key, init), num_iters)
        if inertia < best_inertia:
            best, best_inertia = assignment, inertia
    return best


def clustering_metrics(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    num_clusters: int | None = None,
    seed: int = 0,
    num_iters: int = 20,
    num_init: int | None = None,
    init: KMeansInit = "auto",
    backend: KMeansBackend = "auto",
) -> dict[str, float]:
    """NMI and pairwise F1 of k-means clusters of ``embeddings`` against ``labels``.

    Args:
      embeddings: float ``[N, D]`` (L2-normalise them first, as DML papers do).
      labels: int ``[N]`` classes.
      num_clusters: k-means K; default the number of distinct labels.
      seed: k-means seed.
      num_iters: Lloyd iterations per run.
      num_init: k-means runs; the one of lowest inertia is kept (see :func:`kmeans`).
      init: ``"auto"`` (default), ``"k-means++"`` or ``"random"`` (see :func:`kmeans`).
      backend: k-means backend, see :func:`kmeans`.

    Returns:
      ``{"nmi": float, "f1": float}`` (formulas in the module docstring).

    Raises:
      ValueError: wrong ranks, mismatched lengths, NaN/inf embeddings, bad ``num_clusters``.

    References: Song et al., "Deep Metric Learning via Facility Location", CVPR 2017 (NMI and
    F1 protocol); scikit-learn ``normalized_mutual_info_score``.
    """
    x = check_finite_2d(embeddings, "embeddings")
    y = check_labels(labels, x.shape[0], "labels", "embeddings")
    k = int(np.unique(y).size) if num_clusters is None else int(num_clusters)
    assign = kmeans(x, k, seed=seed, num_iters=num_iters, num_init=num_init, init=init,
                    backend=backend)
    return {"nmi": normalized_mutual_info(y, assign), "f1": pairwise_f1(y, assign)}
