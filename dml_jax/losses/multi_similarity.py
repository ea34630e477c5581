"""Multi-similarity loss (Wang, Han, Huang, Dong & Scott, CVPR 2019)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks
from dml_jax.losses import _batch
from dml_jax.losses.memory import XBMState, with_memory


def _exponent_bound(scale: float, base: float) -> jax.Array:
    """``max over s in [-1, 1] of scale (s - base)``, ``|scale| - scale base``: the largest
    exponent of a multi-similarity log-sum-exp over cosine similarities (attained at ``s =
    sign(scale)``; a computed cosine may pass 1 by a few ulps). A float32 scalar.

    With the defaults the bounds are ``2 + 1 = 3`` (positives) and ``50 - 25 = 25``
    (negatives), both under the fixed-shift limit of :func:`dml_jax.losses._batch.row_logsumexp`
    (60): neither log-sum-exp needs a pass for the row maxima.
    """
    scale = jnp.asarray(scale, jnp.float32)
    return jnp.abs(scale) - scale * jnp.asarray(base, jnp.float32)


def multi_similarity_from_similarities(
    s: jax.Array,
    pos: jax.Array,
    neg: jax.Array,
    row_valid: jax.Array,
    *,
    alpha: float,
    beta: float,
    base: float,
    epsilon: float | None,
    axis_name: str | None,
    symmetric: bool = False,
) -> jax.Array:
    """The multi-similarity loss from cosine similarities ``s`` ``[b, M]`` (in ``[-1, 1]``),
    masks ``pos``/``neg`` ``[b, M]`` and the valid anchors ``row_valid`` ``[b]`` (global mean
    over them).
    ``symmetric``: ``s`` ``[B, B]`` and the masks are the batch against itself (no
    ``axis_name``, memory or mining); the cotangent of ``s`` is then symmetric (see
    :func:`dml_jax.losses._batch.masked_logsumexp`)."""
    if epsilon is not None:
        s_const = jax.lax.stop_gradient(s)
        min_pos = jnp.min(jnp.where(pos, s_const, jnp.inf), axis=1, keepdims=True)
        max_neg = jnp.max(jnp.where(neg, s_const, -jnp.inf), axis=1, keepdims=True)
        neg = neg & (s_const + epsilon > min_pos)
        pos = pos & (s_const - epsilon < max_neg)
    symmetric = symmetric and epsilon is None
    # Cosines lie in [-1, 1], which bounds each exponent: the log-sum-exps may use a fixed
    # shift instead of a pass for the row maxima (see _batch.row_logsumexp).
    pos_lse = _batch.masked_logsumexp(
        -alpha * (s - base), pos, symmetric=symmetric, bound=_exponent_bound(-alpha, base)
    )
    neg_lse = _batch.masked_logsumexp(
        beta * (s - base), neg, symmetric=symmetric, bound=_exponent_bound(beta, base)
    )
    per_anchor = _batch.softplus_of_lse(pos_lse) / alpha + _batch.softplus_of_lse(neg_lse) / beta
    return _batch.global_mean(
        _batch.masked_sum(per_anchor, row_valid), jnp.sum(row_valid), axis_name
    )


@functools.partial(jax.jit, static_argnames=("epsilon", "axis_name"))
@_checks.propagate_nonfinite()
def multi_similarity_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float | None = None,
    memory: XBMState | None = None,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Multi-similarity loss on cosine similarity, with the paper's optional pair mining.

    .. math::
       L_i = \frac1\alpha \log\Big(1 + \sum_{j\in P_i} e^{-\alpha (s_{ij} - \lambda)}\Big)
           + \frac1\beta \log\Big(1 + \sum_{k\in N_i} e^{\beta (s_{ik} - \lambda)}\Big)

    averaged over every valid anchor (an anchor without positives or negatives still counts,
    with its empty term 0). ``s`` is the cosine similarity: the embeddings are L2-normalised
    internally. Both sums are evaluated as stable log-sum-exps.

    With ``epsilon`` set, the paper's mining (Sec. 3.3) keeps negative pair ``(i, k)`` only if
    ``s_ik + epsilon > min_{j in P_i} s_ij`` and positive pair ``(i, j)`` only if
    ``s_ij - epsilon < max_{k in N_i} s_ik`` (thresholds are constants; an anchor without
    positives keeps no negative and one without negatives keeps no positive).

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]``.
      alpha: positive scale. Default 2.
      beta: negative scale. Default 50.
      base: the similarity offset ``lambda``. Default 0.5.
      epsilon: mining margin; None (default) uses every pair.
      memory: optional cross-batch memory (:class:`~dml_jax.losses.XBMState`, ``M`` slots):
        its valid rows join every anchor's positives and negatives (no gradient; mining
        included); None (default) is the plain loss.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` (with ``memory``: ``[b, B + M]``) matrices
      per device.

    References:
      Wang, Han, Huang, Dong, Scott, "Multi-Similarity Loss with General Pair Weighting for
      Deep Metric Learning", CVPR 2019.
    """
    batch = with_memory(_batch.pair_batch(embeddings, labels, where, axis_name), memory)
    symmetric = axis_name is None and memory is None and epsilon is None
    return multi_similarity_from_similarities(
        _batch.cosine_of(batch, axis_name, symmetric=symmetric), batch.pos, batch.neg,
        batch.row_valid, alpha=alpha, beta=beta, base=base, epsilon=epsilon,
        axis_name=axis_name, symmetric=symmetric,
    )
