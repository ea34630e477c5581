"""Circle loss (Sun et al. 2020), pair-based form."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks
from dml_jax.losses import _batch


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite()
def circle_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    m: float = 0.4,
    gamma: float = 80.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Circle loss with pair labels, as pytorch-metric-learning's ``CircleLoss`` but with
    ``MeanReducer`` (PML defaults to ``AvgNonZeroReducer``).

    With ``s`` the cosine similarity (embeddings L2-normalised internally), per anchor ``i``
    with positives ``P_i`` and negatives ``N_i``:

    .. math::
       a^p_{ij} = \mathrm{sg}[1 + m - s_{ij}]_+,\qquad a^n_{ik} = \mathrm{sg}[s_{ik} + m]_+

       L_i = \mathrm{softplus}\Big(
             \log\sum_{j\in P_i} e^{-\gamma a^p_{ij} (s_{ij} - (1 - m))}
           + \log\sum_{k\in N_i} e^{\gamma a^n_{ik} (s_{ik} - m)}\Big)

    (the weights ``a`` are constants, ``sg`` = stop-gradient, as in the paper and PML).
    ``L_i = 0`` for an anchor without positives or without negatives; the loss is the mean of
    ``L_i`` over every valid anchor (MeanReducer: such anchors count, with 0). Both sums are
    exact log-sum-exps and the softplus is evaluated stably, so ``gamma = 256`` is safe.

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]``.
      m: the relaxation margin. Default 0.4.
      gamma: the scale. Default 80.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device.

    References:
      Sun, Cheng, Zhang, Zhang, Zheng, Wang, Wei, "Circle Loss: A Unified Perspective of Pair
      Similarity Optimization", CVPR 2020.
    """
    batch = _batch.pair_batch(embeddings, labels, where, axis_name)
    symmetric = axis_name is None  # the batch against itself: see _batch.masked_logsumexp
    s = _batch.cosine_of(batch, axis_name, symmetric=symmetric)
    s_const = jax.lax.stop_gradient(s)
    pos_logits = -gamma * jax.nn.relu(1.0 + m - s_const) * (s - (1.0 - m))
    neg_logits = gamma * jax.nn.relu(s_const + m) * (s - m)
    pos_lse = _batch.masked_logsumexp(pos_logits, batch.pos, symmetric=symmetric)
    neg_lse = _batch.masked_logsumexp(neg_logits, batch.neg, symmetric=symmetric)
    has_both = (batch.pos_count > 0) & (batch.neg_count > 0)
    per_anchor = jnp.where(has_both, jnp.logaddexp(0.0, pos_lse + neg_lse), 0.0)
    return _batch.global_mean(
        _batch.masked_sum(per_anchor, batch.row_valid), jnp.sum(batch.row_valid), axis_name
    )
