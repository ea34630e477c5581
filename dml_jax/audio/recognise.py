"""Word recognition from utterance embeddings: nearest enrolled utterances or class centroids.

A query utterance gets one score per word from the enrolled (labelled) utterances, by cosine
similarity (both sides are L2-normalised here, in float64):

* ``method="knn"``: the mean similarity of the query's ``k`` most similar enrolled utterances
  *of that word* (all of them when the word has fewer than ``k``); ``k = 1`` scores a word by
  its nearest enrolled utterance, so the top-1 word is the nearest neighbour's word;
* ``method="centroid"``: the similarity to the word's centroid (the L2-normalised mean of its
  L2-normalised enrolled embeddings).

A word without enrolled utterances scores ``-2`` (below any cosine). The recognised word is the
best-scoring one, ties to the lower label; top-k accuracy counts a query correct when its word
is among the ``k`` best (ranked by ``(-score, label)``).

The classifier baseline's logits go through :func:`word_accuracy` the same way.
"""

from __future__ import annotations

import jax
import numpy as np

from dml_jax.evaluation import classification_metrics
from dml_jax.evaluation.knn import check_finite_2d
from dml_jax.evaluation.retrieval import check_labels

METHODS = ("knn", "centroid")
MISSING_SCORE = -2.0


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def class_scores(
    query: jax.typing.ArrayLike,
    enrol: jax.typing.ArrayLike,
    enrol_labels: jax.typing.ArrayLike,
    *,
    num_classes: int,
    method: str = "knn",
    k: int = 1,
    block: int = 1024,
) -> np.ndarray:
    """Per-word scores of each query (see the module docstring).

    Args:
      query: float ``[Q, D]`` query embeddings.
      enrol: float ``[N, D]`` enrolled embeddings.
      enrol_labels: int ``[N]`` in ``[0, num_classes)``.
      num_classes: ``C``.
      method: ``"knn"`` or ``"centroid"``.
      k: neighbours per word for ``"knn"``.
      block: queries per block.

    Returns:
      float64 ``[Q, C]``. Memory: ``[block, N]`` similarities plus the ``[Q, C]`` result.

    Raises:
      ValueError: bad shapes, NaN/inf, labels out of range, unknown method, ``k < 1``.
    """
    if method not in METHODS:
        raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}.")
    q = _unit(check_finite_2d(query, "query"))
    e = _unit(check_finite_2d(enrol, "enrol"))
    if q.shape[1] != e.shape[1]:
        raise ValueError(f"`query` has dimension {q.shape[1]} but `enrol` has {e.shape[1]}.")
    y = check_labels(enrol_labels, e.shape[0], "enrol_labels", "enrol")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"`enrol_labels` must lie in [0, {num_classes}); got "
                         f"[{y.min()}, {y.max()}].")
    members = [np.flatnonzero(y == c) for c in range(num_classes)]
    out = np.full((q.shape[0], num_classes), MISSING_SCORE)
    if method == "centroid":
        cents = np.stack([e[m].mean(axis=0) if m.size else np.zeros(e.shape[1])
                          for m in members])
        has = np.array([m.size > 0 for m in members])
        out[:, has] = q @ _unit(cents[has]).T
        return out
    for s in range(0, q.shape[0], block):
        sims = q[s : s + block] @ e.T  # [b, N]
        for c, m in enumerate(members):
            if m.size == 0:
                continue
            kk = min(k, m.size)
            top = -np.partition(-sims[:, m], kk - 1, axis=1)[:, :kk]
            out[s : s + block, c] = top.mean(axis=1)
    return out


def word_accuracy(
    scores: jax.typing.ArrayLike, labels: jax.typing.ArrayLike, *, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Top-k word accuracy of per-word scores (or logits) ``[Q, C]`` for true words ``[Q]``.

    Returns ``{"top1": ..., "top5": ...}`` (one key per ``k``; ``k >= C`` gives 1.0). Top-1 is
    :func:`dml_jax.evaluation.classification_metrics`'s accuracy (argmax, ties to the lower
    label). Memory: the ``[Q, C]`` ranks.
    """
    s = np.asarray(scores, np.float64)
    if s.ndim != 2:
        raise ValueError(f"`scores` must have shape [Q, C]; got {s.shape}.")
    y = check_labels(labels, s.shape[0], "labels", "scores")
    if not np.all(np.isfinite(s)):
        raise ValueError("`scores` has NaN or inf values.")
    if y.size and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"`labels` must lie in [0, {s.shape[1]}); got [{y.min()}, {y.max()}].")
    if y.size == 0:
        return {f"top{k}": float("nan") for k in ks}
    true = s[np.arange(y.size), y][:, None]
    cols = np.arange(s.shape[1])[None, :]
    # rank of the true word under (-score, label) ordering
    rank = np.sum((s > true) | ((s == true) & (cols < y[:, None])), axis=1)
    out = {}
    for k in ks:
        if k < 1:
            raise ValueError(f"ks must be >= 1; got {k}.")
        out[f"top{k}"] = (classification_metrics(s, y)["accuracy"] if k == 1
                          else float(np.mean(rank < k)))
    return out


def recognise(scores: jax.typing.ArrayLike) -> np.ndarray:
    """The recognised word of each query: ``argmax`` of ``scores`` ``[Q, C]`` -> int64 ``[Q]``."""
    return np.argmax(np.asarray(scores), axis=1)
