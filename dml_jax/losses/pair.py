"""Pair-based losses: contrastive (Hadsell, Chopra & LeCun, CVPR 2006)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks
from dml_jax.losses import _batch


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite()
def contrastive_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Contrastive loss over all ordered pairs of the batch.

    .. math::
       L = \frac{1}{|P|}\sum_{(i,j)\in P} [d_{ij} - m_+]_+
         + \frac{1}{|N|}\sum_{(i,j)\in N} [m_- - d_{ij}]_+

    with ``P`` the ordered positive pairs ``i != j`` and ``N`` the negative pairs; a set with no
    pair contributes 0. Distances are Euclidean (not squared); no normalisation is applied.

    Args:
      embeddings: float ``[B, D]`` (float32 or bfloat16; arithmetic in float32).
      labels: int ``[B]``.
      pos_margin: ``m_+``, positives closer than this cost nothing. Default 0.
      neg_margin: ``m_-``, negatives farther than this cost nothing. Default 1.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis; the loss is then that of the global batch (see
        :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device.

    References:
      Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant Mapping",
      CVPR 2006.
    """
    batch = _batch.pair_batch(embeddings, labels, where, axis_name)
    d = _batch.distances_of(batch)
    pos_term = jax.nn.relu(d - pos_margin)
    neg_term = jax.nn.relu(neg_margin - d)
    return _batch.global_mean(
        _batch.masked_sum(pos_term, batch.pos), jnp.sum(batch.pos), axis_name
    ) + _batch.global_mean(_batch.masked_sum(neg_term, batch.neg), jnp.sum(batch.neg), axis_name)
