"""Ranked List Loss (Wang, Hua, Kodirov & Robertson, TPAMI; CVPR 2019 with Hu & Garnier)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks, parallel
from dml_jax.losses import _batch
from dml_jax.losses.memory import XBMState, with_memory

QUERY_WEIGHTINGS = ("uniform", "official")


def _normalised_weights(exponent: jax.Array, mask: jax.Array) -> jax.Array:
    """``exp(exponent) / sum_mask exp(exponent)`` per row over ``mask``, a constant ``[b, M]``
    (0 outside the mask and on rows with an empty mask). Shift-invariant, so never overflows."""
    exponent = jax.lax.stop_gradient(exponent)
    x = jnp.where(mask, exponent, _batch.NEG_LARGE)
    top = jnp.max(x, axis=1, keepdims=True)
    w = jnp.where(mask, jnp.exp(x - top), 0.0)
    total = jnp.sum(w, axis=1, keepdims=True)
    return w / jnp.where(total > 0, total, 1.0)


def ranked_list_from_distances(
    d: jax.Array,
    pos: jax.Array,
    neg: jax.Array,
    row_valid: jax.Array,
    *,
    margin: float,
    alpha: float,
    t_n: float,
    t_p: float,
    lam: float,
    query_weighting: str,
    axis_name: str | None,
) -> jax.Array:
    """The Ranked List Loss from distances ``d`` ``[b, M]`` and masks ``pos``/``neg``."""
    boundary = alpha - margin
    d_const = jax.lax.stop_gradient(d)
    pos = pos & (d_const > boundary)  # non-trivial positives P*
    neg = neg & (d_const < alpha)  # non-trivial negatives N*
    exp_p = t_p * (d - boundary)
    exp_n = t_n * (alpha - d)
    loss_p = jnp.sum(_normalised_weights(exp_p, pos) * jnp.where(pos, d - boundary, 0.0), axis=1)
    loss_n = jnp.sum(_normalised_weights(exp_n, neg) * jnp.where(neg, alpha - d, 0.0), axis=1)
    per_query = (1.0 - lam) * loss_p + lam * loss_n  # [b]
    if query_weighting == "uniform":
        return _batch.global_mean(
            _batch.masked_sum(per_query, row_valid), jnp.sum(row_valid), axis_name
        )
    # "official": each query scaled by its total mined weight W_i over the sum of all W_k.
    log_w = jnp.logaddexp(
        _batch.masked_logsumexp(jax.lax.stop_gradient(exp_p), pos),
        _batch.masked_logsumexp(jax.lax.stop_gradient(exp_n), neg),
    )
    mined = row_valid & (jnp.any(pos, axis=1) | jnp.any(neg, axis=1))
    top = parallel.global_max(jnp.max(jnp.where(mined, log_w, _batch.NEG_LARGE)), axis_name)
    q = jax.lax.stop_gradient(jnp.where(mined, jnp.exp(jnp.where(mined, log_w - top, 0.0)), 0.0))
    return _batch.global_mean(jnp.sum(q * per_query), jnp.sum(q), axis_name)


@functools.partial(jax.jit, static_argnames=("query_weighting", "axis_name"))
@_checks.propagate_nonfinite()
def ranked_list_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    margin: float = 0.4,
    alpha: float = 1.2,
    t_n: float = 10.0,
    t_p: float = 0.0,
    lam: float = 0.5,
    query_weighting: str = "uniform",
    memory: XBMState | None = None,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Ranked List Loss: every row is a query ranked against the rest of the batch.

    For query ``i``, with non-trivial positives ``P*_i = {j != i same label, d_ij > alpha - m}``
    and non-trivial negatives ``N*_i = {k other label, d_ik < alpha}``:

    .. math::
       w^+_{ij} = e^{T_p (d_{ij} - (\alpha - m))},\quad w^-_{ik} = e^{T_n (\alpha - d_{ik})}
       \quad(\text{constants})

       L_P(i) = \frac{\sum_{P^*_i} w^+ (d_{ij} - (\alpha - m))}{\sum_{P^*_i} w^+},\quad
       L_N(i) = \frac{\sum_{N^*_i} w^- (\alpha - d_{ik})}{\sum_{N^*_i} w^-},\quad
       L(i) = (1 - \lambda) L_P(i) + \lambda L_N(i)

    An empty set contributes 0 (never NaN, unlike implementations that divide 0 by 0). The
    weights are normalised per query with a max shift, so large ``T`` never overflows.

    ``query_weighting="uniform"`` (default, the paper): mean of ``L(i)`` over every valid
    query. ``"official"``: the official Caffe layer's weighting as read from its code: query
    ``i`` counts in proportion to its total mined weight,
    ``L = sum_i W_i L(i) / sum_i W_i`` with ``W_i = sum_{P*_i} w+ + sum_{N*_i} w-`` (a constant;
    queries with nothing mined have ``W_i = 0``). (The official layer also takes the gradient of
    ``d^2/2`` rather than of the hinge and reports an unweighted forward value; dml_jax keeps
    the paper's hinge on ``d`` so value and gradient agree.)

    Args:
      embeddings: float ``[B, D]``; not normalised here (the paper L2-normalises in the model).
      labels: int ``[B]``.
      margin: ``m``, the gap between the positive boundary ``alpha - m`` and ``alpha``.
        Default 0.4.
      alpha: the negative boundary. Default 1.2.
      t_n: negative temperature ``T_n``. Default 10.
      t_p: positive temperature ``T_p``. Default 0 (uniform positive weights).
      lam: ``lambda``, the weight of ``L_N``. Default 0.5.
      query_weighting: ``"uniform"`` (default) or ``"official"``.
      memory: optional cross-batch memory (:class:`~dml_jax.losses.XBMState`, ``M`` slots):
        its valid rows join every query's ranked list (no gradient); None (default) is the
        plain loss.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` (with ``memory``: ``[b, B + M]``) matrices
      per device.

    References:
      Wang, Hua, Kodirov, Hu, Garnier, Robertson, "Ranked List Loss for Deep Metric Learning",
      CVPR 2019; Wang, Hua, Kodirov, Robertson, TPAMI extension (arXiv 1903.03238).
    """
    _checks.check_choice(query_weighting, "query_weighting", QUERY_WEIGHTINGS)
    batch = with_memory(_batch.pair_batch(embeddings, labels, where, axis_name), memory)
    d = _batch.distances_of(batch, axis_name)
    return ranked_list_from_distances(
        d, batch.pos, batch.neg, batch.row_valid,
        margin=margin, alpha=alpha, t_n=t_n, t_p=t_p, lam=lam,
        query_weighting=query_weighting, axis_name=axis_name,
    )
