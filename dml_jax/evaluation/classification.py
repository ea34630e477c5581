"""Classification metrics for the papers that report them, from logits or a k-NN classifier.

* Gong et al. (remote-sensing scenes): overall accuracy.
* DeMAL-CNN (skin lesions, binary): accuracy, sensitivity ``TP / (TP + FN)``, specificity
  ``TN / (TN + FP)``, ROC AUC and average precision (AP).

AUC and AP are computed with scikit-learn (``roc_auc_score``, ``average_precision_score``: AP
is the step-wise ``sum_n (R_n - R_{n-1}) P_n``, not the trapezoidal area), the definitions
reviewers reproduce with.
"""

from __future__ import annotations

import jax
import numpy as np

from dml_jax.evaluation.knn import Backend, check_finite_2d, knn
from dml_jax.evaluation.retrieval import check_labels


def classification_metrics(
    logits: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    threshold: float = 0.0,
) -> dict[str, float]:
    """Accuracy, and for binary problems sensitivity, specificity, AUC and AP.

    Args:
      logits: ``[N, C]`` logits or probabilities (prediction: ``argmax``; ties to the lower
        class), or ``[N]`` scores of the positive class of a binary problem (prediction:
        ``score > threshold``).
      labels: int ``[N]`` in ``[0, C)`` (``{0, 1}`` for ``[N]`` scores; 1 = positive).
      threshold: decision threshold for ``[N]`` scores: 0.0 for logits, pass 0.5 for
        probabilities.

    Returns:
      ``{"accuracy"}``; binary problems (``C == 2`` or ``[N]`` scores) add ``"sensitivity"``,
      ``"specificity"``, ``"auc"`` and ``"ap"`` with class 1 positive and ranking score
      ``logits[:, 1] - logits[:, 0]`` (monotone in the softmax probability; for probabilities,
      in ``p_1``). A quantity whose denominator is empty (e.g. sensitivity without positives,
      AUC with one class present) is NaN.

    Raises:
      ValueError: wrong ranks, mismatched lengths, NaN scores, labels out of range.
    """
    s = np.asarray(logits, np.float64)
    y = np.asarray(labels)
    if s.ndim not in (1, 2):
        raise ValueError(f"`logits` must have shape [N, C] or [N]; got shape {s.shape}.")
    y = check_labels(y, s.shape[0], "labels", "logits")
    if not np.all(np.isfinite(s)):
        raise ValueError("`logits` has NaN or inf values.")
    num_classes = s.shape[1] if s.ndim == 2 else 2
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"`labels` must lie in [0, {num_classes}); got [{y.min()}, {y.max()}].")
    if s.ndim == 2:
        pred = np.argmax(s, axis=1)
    else:
        pred = (s > threshold).astype(np.int64)
    out = {"accuracy": float(np.mean(pred == y))}
    if num_classes != 2:
        return out
    score = s if s.ndim == 1 else s[:, 1] - s[:, 0]
    tp = float(np.sum((pred == 1) & (y == 1)))
    fn = float(np.sum((pred == 0) & (y == 1)))
    tn = float(np.sum((pred == 0) & (y == 0)))
    fp = float(np.sum((pred == 1) & (y == 0)))
    out["sensitivity"] = tp / (tp + fn) if tp + fn else float("nan")
    out["specificity"] = tn / (tn + fp) if tn + fp else float("nan")
    if 0 < np.sum(y) < y.size:
        from sklearn.metrics import average_precision_score, roc_auc_score

        out["auc"] = float(roc_auc_score(y, score))
        out["ap"] = float(average_precision_score(y, score))
    else:
        out["auc"] = out["ap"] = float("nan")
    return out


def knn_classify(
    train_embeddings: jax.typing.ArrayLike,
    train_labels: jax.typing.ArrayLike,
    test_embeddings: jax.typing.ArrayLike,
    *,
    k: int = 1,
    backend: Backend = "auto",
) -> np.ndarray:
    """Majority vote of the ``k`` nearest training embeddings (exact, see :func:`knn`).

    Ties between classes with the same number of votes go to the class of the nearest
    neighbour among them (neighbours ordered by (distance, index)), so the result is
    deterministic and, for ``k = 1``, is the nearest neighbour's label.

    Args:
      train_embeddings: float ``[N, D]``.
      train_labels: int ``[N]``.
      test_embeddings: float ``[M, D]``.
      k: neighbours, ``1 <= k <= N``.
      backend: k-NN backend.

    Returns:
      int64 ``[M]`` predicted labels. Accuracy: ``np.mean(pred == test_labels)``.

    Memory: the k-NN search's blocks plus ``[M, k, k]`` booleans for the vote.
    """
    train = check_finite_2d(train_embeddings, "train_embeddings")
    y = check_labels(train_labels, train.shape[0], "train_labels", "train_embeddings")
    idx, _ = knn(test_embeddings, train, k=k, backend=backend)
    neigh = y[idx]  # [M, k]
    votes = np.sum(neigh[:, :, None] == neigh[:, None, :], axis=2)  # votes for each slot's class
    best = np.argmax(votes, axis=1)  # first (nearest) slot among the most-voted classes
    return neigh[np.arange(neigh.shape[0]), best]
