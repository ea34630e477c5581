"""Pair-based losses: contrastive (Hadsell, Chopra & LeCun, CVPR 2006)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks, parallel
from dml_jax.losses import _batch
from dml_jax.losses.memory import XBMState, with_memory


def contrastive_from_distances(
    d: jax.Array,
    pos: jax.Array,
    neg: jax.Array,
    *,
    pos_margin: float,
    neg_margin: float,
    axis_name: str | None,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """The contrastive loss from distances ``d`` ``[b, M]`` and masks ``pos``/``neg`` ``[b, M]``:
    global mean over ``pos`` of ``relu(d - pos_margin)`` + over ``neg`` of
    ``relu(neg_margin - d)``. ``counts``: ``(sum(pos), sum(neg))`` when known (saves two
    passes over the masks)."""
    if counts is None:
        counts = jnp.sum(pos, dtype=jnp.float32), jnp.sum(neg, dtype=jnp.float32)
    # Both means in one pass over [b, M]: each term weighted by 1 / its set's global count (a
    # constant known before the pass), then one sum; 0 for an empty set.
    num_pos, num_neg = (parallel.global_count(c, axis_name) for c in counts)
    w_pos = jnp.where(num_pos > 0, 1.0 / jnp.maximum(num_pos, 1.0), 0.0)
    w_neg = jnp.where(num_neg > 0, 1.0 / jnp.maximum(num_neg, 1.0), 0.0)
    terms = jnp.where(
        pos, w_pos * jax.nn.relu(d - pos_margin),
        jnp.where(neg, w_neg * jax.nn.relu(neg_margin - d), 0.0),
    )
    return parallel.global_sum(jnp.sum(terms), axis_name)


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite()
def contrastive_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    memory: XBMState | None = None,
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
      memory: optional cross-batch memory (:class:`~dml_jax.losses.XBMState`, ``M`` slots):
        its valid rows join the pairs as columns of every anchor (no gradient); None
        (default) is the plain loss.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis; the loss is then that of the global batch (see
        :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` (with ``memory``: ``[b, B + M]``) matrices
      per device.

    References:
      Hadsell, Chopra, LeCun, "Dimensionality Reduction by Learning an Invariant Mapping",
      CVPR 2006.
    """
    batch = with_memory(_batch.pair_batch(embeddings, labels, where, axis_name), memory)
    return contrastive_from_distances(
        _batch.distances_of(batch, axis_name, symmetric=True), batch.pos, batch.neg,
        pos_margin=pos_margin, neg_margin=neg_margin, axis_name=axis_name,
        counts=(jnp.sum(batch.pos_count), jnp.sum(batch.neg_count)),
    )
