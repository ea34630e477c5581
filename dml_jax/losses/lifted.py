"""Lifted structured loss (Song, Xiang, Jegelka & Savarese, CVPR 2016)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks, parallel
from dml_jax.losses import _batch, _windows


def _pair_terms(row_lse, col_lse, d, pos_margin):
    """``(1/2 [J]_+^2, [J]_+, dJ/d row_lse, dJ/d col_lse)`` of ``J = logaddexp(row_lse,
    col_lse) + d - m_+``, elementwise over the broadcast shape."""
    lse = jnp.logaddexp(row_lse, col_lse)
    hinge = jax.nn.relu(lse + d - pos_margin)
    return 0.5 * hinge * hinge, hinge, jnp.exp(row_lse - lse), jnp.exp(col_lse - lse)


def _dense_positive_terms(d, row_lse, col_lse, pos, pos_margin, *, grads):
    """:func:`_positive_total`'s value (and with ``grads`` its gradients) over every entry of
    ``pos`` ``[b, B]``."""
    width = pos.shape[1]
    terms, hinge, d_row, d_col = _pair_terms(
        row_lse[:, None], col_lse[None, :], d[:, :width], pos_margin
    )
    total = _batch.masked_sum(terms, pos)
    if not grads:
        return total
    hinge = jnp.where(pos, hinge, 0.0)
    grad_d = jnp.pad(hinge, ((0, 0), (0, d.shape[1] - width)))
    return total, grad_d, jnp.sum(hinge * d_row, axis=1), jnp.sum(hinge * d_col, axis=0)


def _slotted_positive_terms(d, row_lse, col_lse, pos, pos_margin, *, grads, start, slots):
    """:func:`_positive_total`'s value (and gradients) on each row's window of ``slots``
    columns from ``start`` (which must hold all its positives): ``[b, S]`` work, and one
    ``[b, S]`` scatter into a zero ``[b, M]`` for the distances' gradient."""
    cols, filled = _windows.window(pos, start, slots)
    terms, hinge, d_row, d_col = _pair_terms(
        row_lse[:, None], col_lse[cols], jnp.take_along_axis(d, cols, axis=1), pos_margin
    )
    total = _batch.masked_sum(terms, filled)
    if not grads:
        return total
    hinge = jnp.where(filled, hinge, 0.0)
    return (total, _windows.scatter_rows(hinge, cols, d.shape[1]),
            jnp.sum(hinge * d_row, axis=1),
            jnp.zeros(col_lse.shape, jnp.float32).at[cols].add(hinge * d_col))


def _positive_terms(d, row_lse, col_lse, pos, pos_count, pos_margin, first, grads):
    """The slotted path whose window holds every row's positives, else the dense one."""
    index = _windows.slot_choice(pos, pos_count, _windows.SLOT_SIZES, first)
    return _windows.on_windows(
        index, _windows.SLOT_SIZES,
        functools.partial(_slotted_positive_terms, grads=grads, start=first),
        functools.partial(_dense_positive_terms, grads=grads),
        d, row_lse, col_lse, pos, pos_margin,
    )


def _positive_total_fwd(d, row_lse, col_lse, pos, pos_count, pos_margin, first):
    total, grad_d, grad_row, grad_col = _positive_terms(
        d, row_lse, col_lse, pos, pos_count, pos_margin, first, True
    )
    return total, (grad_d, grad_row, grad_col, pos_margin)


def _positive_total_bwd(residuals, g):
    grad_d, grad_row, grad_col, pos_margin = residuals
    return (g * grad_d, g * grad_row, g * grad_col, None, None, jnp.zeros_like(pos_margin),
            None)


@jax.custom_vjp
def _positive_total(d, row_lse, col_lse, pos, pos_count, pos_margin, first):
    """``sum over the positive pairs (i, j) of 1/2 [J_ij]_+^2`` with ``J_ij = logaddexp(
    row_lse_i, col_lse_j) + d_ij - m_+``, from distances ``d`` ``[b, M]``, the rows' and
    columns' log-sum-exps ``[b]`` / ``[B]`` and the positives ``pos`` ``[b, B]`` (``pos_count``
    ``[b]`` of them per row, the first at or after column ``first`` ``[b]``).

    ``J`` is needed at the positive pairs only. When one window of the columns holds each
    row's positives (:mod:`dml_jax.losses._windows`: label-ordered columns and classes of at
    most 32), it is evaluated on those ``[b, S]`` slots; otherwise on all of ``[b, B]``. Under
    differentiation both paths compute the gradient with the value (``[J]_+`` times ``J``'s
    partial derivatives), on constants, and hold one ``[b, M]`` array (the distances'
    gradient) for the backward pass.
    """
    return _positive_terms(d, row_lse, col_lse, pos, pos_count, pos_margin, first, False)


_positive_total.defvjp(_positive_total_fwd, _positive_total_bwd)


def lifted_from_distances(
    d: jax.Array,
    neg: jax.Array,
    pos: jax.Array,
    *,
    neg_margin: float,
    pos_margin: float,
    axis_name: str | None,
    pos_count: jax.Array | None = None,
    col_ids: jax.Array | None = None,
    symmetric: bool = False,
    first_positive: jax.Array | None = None,
) -> jax.Array:
    """The lifted structured loss from distances ``d`` ``[b, M]`` (``M >= B``), the negatives
    ``neg`` ``[b, M]`` of each row and the positive pairs ``pos`` ``[b, B]`` (among the first
    ``B`` columns, the global batch, whose log-sum-exps are gathered). ``pos_count``: each
    row's number of positives ``[b]`` when known (saves a pass over ``pos``). ``col_ids``: the
    global row behind each of the ``B`` columns when they are not in the gathered order
    (``pair_batch(sort_by_label=True)`` under ``axis_name``). ``symmetric``: ``d`` ``[B, B]``
    and the masks are the batch against itself (no ``axis_name``); the cotangent of ``d`` is
    then symmetric (see :func:`dml_jax.losses._batch.masked_logsumexp`; ``J`` is).
    ``first_positive``: each row's first positive column ``[b]`` (or any column before it)
    when the caller knows it without a pass over ``pos``
    (:func:`dml_jax.losses._windows.first_same_label`)."""
    row_lse = _batch.masked_logsumexp(neg_margin - d, neg, symmetric=symmetric)  # [b]
    col_lse = parallel.all_gather_rows(row_lse, axis_name)  # [B]
    if col_ids is not None:
        col_lse = col_lse[col_ids]
    if pos_count is None:
        pos_count = jnp.sum(pos, axis=1, dtype=jnp.float32)
    if first_positive is None:
        first_positive = _windows.first_positive(pos)
    total = _positive_total(
        d, row_lse, col_lse, pos, pos_count, jnp.asarray(pos_margin, jnp.float32),
        first_positive,
    )
    return _batch.global_mean(total, jnp.sum(pos_count), axis_name)


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
    computed once (``O(B^2)``, numerically stable), then combined per positive pair with
    ``logaddexp``: with the columns ordered by label, each row's positives lie in one window of
    at most 32 columns and ``J`` is evaluated there only (``O(B S)``); a batch with a larger
    class evaluates it over ``[B, B]``. A pair both of whose rows lack negatives has
    ``J = -inf`` and costs 0.

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
    # Label-ordered columns put each row's positives in one window (see `_positive_total`).
    batch = _batch.pair_batch(embeddings, labels, where, axis_name, sort_by_label=True)
    symmetric = axis_name is None
    return lifted_from_distances(
        _batch.distances_of(batch, axis_name, symmetric=symmetric), batch.neg, batch.pos,
        neg_margin=neg_margin, pos_margin=pos_margin, axis_name=axis_name,
        pos_count=batch.pos_count, col_ids=None if symmetric else batch.col_ids,
        symmetric=symmetric, first_positive=_windows.first_same_label(batch),
    )
