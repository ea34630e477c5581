"""Evaluations chosen by name (``config.evals``), run on embedded splits.

A training loop embeds the splits an evaluation needs (:func:`required_splits`) into
:class:`EmbeddedSplit` records and calls :func:`run`; each evaluation is a small function
registered under its name, as the losses and models are:

=================  ==============  ==========================================================
name               splits          metrics
=================  ==============  ==========================================================
``retrieval``      test            ``recall@K`` (``ks``), ``precision@1``, ``r_precision``,
                                   ``map@r``, ``num_queries`` (:func:`retrieval_metrics`)
``clustering``     test            ``nmi``, ``f1`` (:func:`clustering_metrics`, k-means++)
``classification`` test            ``accuracy`` (+ ``sensitivity``, ``specificity``, ``auc``,
                                   ``ap`` for two classes) of the model's classifier
``knn_accuracy``   train, test     accuracy of the nearest training embedding's label
``reid``           query, gallery  ``cmc@K``, ``map`` (Market-1501 / MARS junk rule)
=================  ==============  ==========================================================

Metric names are returned as above; a name two evaluations share is prefixed with the
evaluation's name (``reid/num_queries``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from dml_jax.evaluation.classification import classification_metrics, knn_classify
from dml_jax.evaluation.clustering import clustering_metrics
from dml_jax.evaluation.reid import reid_metrics
from dml_jax.evaluation.retrieval import retrieval_metrics


class EmbeddedSplit(NamedTuple):
    """One split, embedded. ``N`` records, ``E`` embedding size, ``C`` classes.

    Attributes:
      embeddings: float32 ``[N, E]``.
      labels: int ``[N]``.
      logits: float32 ``[N, C]`` of the model's classifier, or None.
      person_ids: int ``[N]`` (re-ID), or None.
      camera_ids: int ``[N]`` (re-ID), or None.
    """

    embeddings: np.ndarray
    labels: np.ndarray
    logits: np.ndarray | None = None
    person_ids: np.ndarray | None = None
    camera_ids: np.ndarray | None = None


Evaluation = Callable[[Mapping[str, EmbeddedSplit], Mapping[str, Any]], dict[str, float]]
_EVALUATIONS: dict[str, tuple[tuple[str, ...], Evaluation]] = {}


def register(name: str, splits: Sequence[str]) -> Callable[[Evaluation], Evaluation]:
    """Decorator registering ``fn(splits, options) -> metrics`` under ``name``."""

    def decorator(fn: Evaluation) -> Evaluation:
        _EVALUATIONS[name] = (tuple(splits), fn)
        return fn

    return decorator


def available() -> tuple[str, ...]:
    """The registered evaluation names."""
    return tuple(sorted(_EVALUATIONS))


def check(names: Sequence[str]) -> None:
    """Raises ``ValueError`` naming an unknown evaluation and the known ones."""
    unknown = [n for n in names if n not in _EVALUATIONS]
    if unknown:
        raise ValueError(f"Unknown evaluations {unknown}; known: {list(available())}.")
    if not names:
        raise ValueError(f"config.evals is empty; choose from {list(available())}.")


def required_splits(names: Sequence[str]) -> tuple[str, ...]:
    """The splits the evaluations ``names`` need, in first-use order."""
    check(names)
    out: list[str] = []
    for name in names:
        out += [s for s in _EVALUATIONS[name][0] if s not in out]
    return tuple(out)


def needs_logits(names: Sequence[str]) -> bool:
    """Whether an evaluation reads the classifier's logits."""
    return "classification" in names


def run(names: Sequence[str], splits: Mapping[str, EmbeddedSplit],
        options: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Runs the evaluations ``names`` on ``splits``; returns one flat dict of metrics.

    ``options``: ``ks`` (retrieval / CMC ranks, default ``(1, 2, 4, 8)``), ``seed``
    (k-means), ``knn_k`` (``knn_accuracy``, default 1).
    """
    check(names)
    options = dict(options or {})
    out: dict[str, float] = {}
    for name in names:
        _, fn = _EVALUATIONS[name]
        for key, value in fn(splits, options).items():
            out[f"{name}/{key}" if key in out else key] = float(value)
    return out


@register("retrieval", ["test"])
def _retrieval(splits, options):
    test = splits["test"]
    ks = tuple(options.get("ks", (1, 2, 4, 8)))
    return retrieval_metrics(test.embeddings, test.labels, ks=ks)


@register("clustering", ["test"])
def _clustering(splits, options):
    test = splits["test"]
    return clustering_metrics(test.embeddings, test.labels, seed=int(options.get("seed", 0)))


@register("classification", ["test"])
def _classification(splits, options):
    test = splits["test"]
    if test.logits is None:
        raise ValueError("The 'classification' evaluation needs a model with a classifier "
                         "(a loss that reads logits, or config.loss.classifier_weight > 0).")
    return classification_metrics(test.logits, test.labels)


@register("knn_accuracy", ["train", "test"])
def _knn_accuracy(splits, options):
    train, test = splits["train"], splits["test"]
    predicted = knn_classify(train.embeddings, train.labels, test.embeddings,
                             k=int(options.get("knn_k", 1)))
    return {"knn_accuracy": float(np.mean(np.asarray(predicted) == np.asarray(test.labels)))}


@register("reid", ["query", "gallery"])
def _reid(splits, options):
    q, g = splits["query"], splits["gallery"]
    if q.camera_ids is None or g.camera_ids is None:
        raise ValueError("The 'reid' evaluation needs sources with person_ids and camera_ids "
                         "(dml_jax.data.reid).")
    return reid_metrics(q.embeddings, q.person_ids, q.camera_ids, g.embeddings, g.person_ids,
                        g.camera_ids, ranks=tuple(options.get("ks", (1, 5, 10, 20))))
