"""Lifted structured loss (Song, Xiang, Jegelka & Savarese, CVPR 2016)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks, parallel
from dml_jax.losses import _batch


def lifted_from_distances(
    d: jax.Array,
    neg: jax.Array,
    pos: jax.Array,
    *,
    neg_margin: float,
    pos_margin: float,
    axis_name: str | None,
    pos_count: jax.Array | None = None,
    symmetric: bool = False,
) -> jax.Array:
    """The lifted structured loss from distances ``d`` ``[b, M]`` (``M >= B``), the negatives
    ``neg`` ``[b, M]`` of each row and the positive pairs ``pos`` ``[b, B]`` (among the first
    ``B`` columns, the global batch, whose log-sum-exps are gathered). ``pos_count``: each
    row's number of positives ``[b]`` when known (saves a pass over ``pos``). ``symmetric``:
    ``d`` ``[B, B]`` and the masks are the batch against itself (no ``axis_name``); the
    cotangent of ``d`` is then symmetric (see :func:`dml_jax.losses._batch.masked_logsumexp`)."""
    row_lse = _batch.masked_logsumexp(neg_margin - d, neg, symmetric=symmetric)  # [b]
    col_lse = parallel.all_gather_rows(row_lse, axis_name)  # [B]
    j = jnp.logaddexp(row_lse[:, None], col_lse[None, :]) + d[:, : pos.shape[1]] - pos_margin
    terms = 0.5 * jnp.square(jax.nn.relu(j))
    count = jnp.sum(pos, dtype=jnp.float32) if pos_count is None else jnp.sum(pos_count)
    return _batch.global_mean(_batch.masked_sum(terms, pos), count, axis_name)


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite()
def lifted_structure_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Lifted structured loss of Song et al. 2016 (eq. 4), over all positive pairs.

    .. math::
       J_{ij} = \log\Big(\sum_{k\in N_i} e^{m_- - d_{ik}} + \sum_{l\in N_j} e^{m_- - d_{jl}}\Big)
                + d_{ij} - m_+ ,\qquad
       L = \frac{1}{|P|}\sum_{(i,j)\in P} \tfrac12 [J_{ij}]_+^2

    ``N_i`` is the set of negatives of ``i``. Each row's log-sum-exp over its negatives is
    computed once (``O(B^2)``, numerically stable), then combined per pair with ``logaddexp``.
    A pair both of whose rows lack negatives has ``J = -inf`` and costs 0.

    Args:
      embeddings: float ``[B, D]``; not normalised here.
      labels: int ``[B]``.
      neg_margin: ``m_-``. Default 1.
      pos_margin: ``m_+``, subtracted from ``d_ij``. Default 0.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar: mean over ordered positive pairs (0 if there is none). Memory: a few
      ``[b, B]`` matrices per device.

    References:
      Song, Xiang, Jegelka, Savarese, "Deep Metric Learning via Lifted Structured Feature
      Embedding", CVPR 2016.
    """
    batch = _batch.pair_batch(embeddings, labels, where, axis_name)
    symmetric = axis_name is None
    return lifted_from_distances(
        _batch.distances_of(batch, axis_name, symmetric=symmetric), batch.neg, batch.pos,
        neg_margin=neg_margin, pos_margin=pos_margin, axis_name=axis_name,
        pos_count=batch.pos_count, symmetric=symmetric,
    )
