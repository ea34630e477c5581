"""DeMAL-CNN hybrid loss (He, Wang, Zhao & Yao, Complex & Intelligent Systems 2022)."""

from __future__ import annotations

import functools

import jax

from dml_jax import _checks
from dml_jax.losses import _classify
from dml_jax.losses.triplet import MINING, triplet_loss


@functools.partial(jax.jit, static_argnames=("mining", "axis_name"))
@_checks.propagate_nonfinite(rows=("embeddings", "logits"))
def demal_hybrid_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    logits: jax.typing.ArrayLike,
    *,
    margin: float = 0.2,
    mining: str = "all",
    lam: float = 1.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""DeMAL-CNN's hybrid loss: triplet loss + ``lam`` x classification cross-entropy.

    .. math::
       L = L_{triplet}(f; m, \text{mining}) + \lambda \frac1{|V|}\sum_{i\in V}
           -\log \mathrm{softmax}(z_i)_{y_i}

    ``L_triplet`` is :func:`~dml_jax.losses.triplet_loss` (Euclidean, not squared distances,
    with its ``"all"``, ``"batch_hard"`` or ``"semi_hard"`` in-batch mining) and ``z = logits``
    come from a classification layer applied to the *same* embeddings (the paper's three
    weight-shared heads on anchor, positive and negative are one head on the whole batch
    here). This is a **reconstruction**: the paper's exact weighting, margin and distance
    (the paper notes write squared distances and ``L_cls + lambda L_tri``) are unverified; dml_jax
    follows the issue's ``triplet + lambda CE`` with the library's triplet loss.

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]``, class indices into the columns of ``logits``.
      logits: float ``[B, C]`` (sharded like ``embeddings`` under ``axis_name``).
      margin: triplet margin. Default 0.2.
      mining: ``"all"`` (default), ``"batch_hard"`` or ``"semi_hard"``.
      lam: ``lambda``, the cross-entropy weight. Default 1.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: that of :func:`~dml_jax.losses.triplet_loss` plus ``[b, C]``.

    References:
      He, Wang, Zhao, Yao, "Deep metric attention learning for skin lesion classification in
      dermoscopy images", Complex & Intelligent Systems, 2022.
    """
    _checks.check_choice(mining, "mining", MINING)
    _, labels_, valid = _checks.check_embeddings_labels(embeddings, labels, where)
    logits = _classify.check_logits(logits, labels_, valid)
    tri = triplet_loss(
        embeddings, labels, margin=margin, mining=mining, where=where, axis_name=axis_name
    )
    return tri + lam * _classify.cross_entropy(logits, labels_, valid, axis_name)
