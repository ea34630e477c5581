"""Supervised contrastive loss (Khosla et al. 2020)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks, parallel
from dml_jax.losses import _batch


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite()
def supcon_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    temperature: float = 0.1,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Supervised contrastive loss, as pytorch-metric-learning's ``SupConLoss`` but with
    ``MeanReducer`` (PML defaults to ``AvgNonZeroReducer``).

    With ``s`` the cosine similarity (embeddings L2-normalised internally), ``tau`` the
    temperature, ``P_i`` the positives and ``A_i`` all other valid rows of anchor ``i``:

    .. math::
       L_i = -\frac1{|P_i|}\sum_{p\in P_i}
             \log \frac{e^{s_{ip}/\tau}}{\sum_{a\in A_i} e^{s_{ia}/\tau}}

    ``L_i = 0`` for an anchor without positives; the loss is the mean of ``L_i`` over every
    valid anchor (MeanReducer: anchors without positives count, with 0). As in PML, the loss is
    0 when the (global) batch holds no positive pair or no negative pair. The denominators are
    exact log-sum-exps.

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]``.
      temperature: ``tau``. Default 0.1.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device.

    References:
      Khosla, Teterwak, Wang, Sarna, Tian, Isola, Maschinot, Liu, Krishnan, "Supervised
      Contrastive Learning", NeurIPS 2020.
    """
    batch = _batch.pair_batch(embeddings, labels, where, axis_name)
    symmetric = axis_name is None  # the batch against itself: see _batch.masked_logsumexp
    logits = _batch.cosine_of(batch, axis_name, symmetric=symmetric) / temperature
    pos, neg = batch.pos, batch.neg
    denominator = _batch.masked_logsumexp(logits, pos | neg, symmetric=symmetric)
    has_pos = batch.row_valid & (batch.pos_count > 0)
    weight = jnp.where(has_pos, 1.0 / jnp.maximum(batch.pos_count, 1.0), 0.0)  # [b]
    if symmetric:  # sum_ij w_i pos_ij l_ij, written with the symmetric weight (w_i + w_j) / 2
        weight = 0.5 * (weight[:, None] + weight[None, :])
    else:
        weight = weight[:, None]
    total = _batch.masked_sum(denominator, has_pos) - jnp.sum(
        jnp.where(pos, weight * logits, 0.0)
    )
    loss = _batch.global_mean(total, jnp.sum(batch.row_valid), axis_name)
    any_pos = parallel.global_count(jnp.sum(batch.pos_count), axis_name) > 0
    any_neg = parallel.global_count(jnp.sum(batch.neg_count), axis_name) > 0
    return jnp.where(any_pos & any_neg, loss, 0.0)
