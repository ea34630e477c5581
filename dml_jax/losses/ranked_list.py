"""Ranked List Loss (Wang, Hua, Kodirov & Robertson, TPAMI; CVPR 2019 with Hu & Garnier)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dml_jax import _checks, parallel
from dml_jax.losses import _batch, _windows
from dml_jax.losses.memory import XBMState, with_memory

QUERY_WEIGHTINGS = ("uniform", "official")


class _Lists(NamedTuple):
    """Each query's mined lists, from constant distances ``d`` ``[b, M]``.

    ``in_p``/``in_n``: the non-trivial positives ``P*`` / negatives ``N*``, bool ``[b, M]``;
    ``x_p``/``x_n``: the weights' exponents ``T_p (d - (alpha - m))`` / ``T_n (alpha - d)``.
    """

    in_p: jax.Array
    in_n: jax.Array
    x_p: jax.Array
    x_n: jax.Array


def _positive_list(d, pos, boundary, t_p) -> tuple[jax.Array, jax.Array]:
    """``P*`` among the positives ``pos`` (``d > alpha - m``) and its exponents, elementwise
    over ``d`` (whole ``[b, M]`` rows or ``[b, S]`` windows of them)."""
    return pos & (d > boundary), t_p * (d - boundary)


def _lists(d, pos, neg, margin, alpha, t_n, t_p) -> _Lists:
    in_p, x_p = _positive_list(d, pos, alpha - margin, t_p)
    return _Lists(in_p, neg & (d < alpha), x_p, t_n * (alpha - d))


# A fixed shift is used for a list whose exponents span at most this much: exp(x - top) then
# lies in [exp(-80), 1], never underflowing, so the weights are exact.
_FIXED_SHIFT_SPAN = 80.0


def _negative_shift(x_n, in_n, alpha, t_n) -> jax.Array:
    """Per row, the shift ``top_n`` float32 ``[b]`` that keeps every ``exp(x - top_n)`` of
    ``N*`` in ``(0, 1]`` without underflow: its exponents lie between 0 and ``T_n alpha``
    (``0 <= d < alpha``), so when ``|T_n alpha| <= 80`` the fixed shift ``max(T_n alpha, 0)``
    serves (no pass over ``[b, M]``); otherwise the row's largest exponent on ``N*`` (0 for an
    empty list)."""
    # A [b] zero derived from the rows (never NaN), so that under shard_map both branches of a
    # cond vary across devices alike.
    zero = jnp.where(in_n[:, 0], 0.0, 0.0)
    return jax.lax.cond(
        jnp.abs(t_n * alpha) <= _FIXED_SHIFT_SPAN,
        lambda: zero + jnp.maximum(t_n * alpha, 0.0),
        lambda: _batch.masked_max(x_n, in_n, axis=1),
    )


def _positive_sums(d, pos, boundary, t_p):
    """``(top_p, W_P, sum of w+ d)`` float32 ``[b]`` over each row's ``P*`` among the
    positives ``pos`` of ``d`` (``[b, K]``: whole rows or windows of them). ``top_p`` shifts
    the exponents (0 when ``T_p = 0``, where the weights are 1 without an exponential; else the
    row's largest exponent on ``P*``, 0 for an empty list)."""
    in_p, x_p = _positive_list(d, pos, boundary, t_p)
    zero = jnp.where(in_p[:, 0], 0.0, 0.0)  # as in `_negative_shift`
    top_p = jax.lax.cond(t_p == 0, lambda: zero, lambda: _batch.masked_max(x_p, in_p, axis=1))
    w_p = jnp.where(in_p, jnp.where(t_p == 0, 1.0, jnp.exp(x_p - top_p[:, None])), 0.0)
    return top_p, jnp.sum(w_p, axis=1), jnp.sum(w_p * d, axis=1)


def _dense_positive_sums(d, pos, runs, boundary, t_p):
    del runs
    return _positive_sums(d, pos, boundary, t_p)


def _window_positive_sums(d, pos, runs, boundary, t_p, *, slots):
    cols, filled = _windows.run_window(pos, runs, slots)
    d = jnp.take_along_axis(d, cols, axis=1)
    return _positive_sums(d, filled, boundary, t_p)


def _positive_terms(d, pos, runs, run_index, boundary, t_p, sizes):
    """:func:`_positive_sums` on each row's window of positives (:mod:`~dml_jax.losses._windows`:
    the smallest of ``sizes`` that holds both its runs, ``run_index``) or, when none does
    (``run_index == len(sizes)``), on whole rows: a row's positives are a few dozen of its
    ``M`` columns, and the dense form spends a mask and two reductions over ``[b, M]`` on
    them."""
    return _windows.on_windows(run_index, sizes, _window_positive_sums, _dense_positive_sums,
                               d, pos, runs, boundary, t_p)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _per_query(d, pos, neg, runs, run_index, margin, alpha, t_n, t_p, symmetric, sizes):
    """``(L_P [b], L_N [b], log W_P [b], log W_N [b])`` of each query (see
    :func:`ranked_list_loss`; ``W`` its total mined weight, ``NEG_LARGE`` when its list is
    empty). Only ``d`` ``[b, M]`` takes a gradient, ``sum_j w_ij / W_i`` per list (the weights
    are constants); with ``symmetric`` (``d`` a symmetric ``[B, B]`` function of the points,
    and symmetric masks) the cotangent handed back is the symmetric ``(H + H^T) / 2``, which
    gives the points the same gradient and lets :func:`dml_jax.losses._batch.self_gram` take
    its one-product path. It is evaluated per entry with the column's row constants, so no
    ``[B, B]`` transpose is formed. The positive lists are summed on windows of the columns
    ordered by label (``runs``, ``run_index``, ``sizes``: :func:`_positive_terms`). Holds
    ``[b, M]`` temporaries only.
    """
    return _per_query_fwd(d, pos, neg, runs, run_index, margin, alpha, t_n, t_p, symmetric,
                          sizes)[0]


def _per_query_fwd(d, pos, neg, runs, run_index, margin, alpha, t_n, t_p, symmetric, sizes):
    del symmetric
    boundary = alpha - margin
    lists = _lists(d, pos, neg, margin, alpha, t_n, t_p)  # its P* mask goes unused here
    top_n = _negative_shift(lists.x_n, lists.in_n, alpha, t_n)
    w_n = jnp.where(lists.in_n, jnp.exp(lists.x_n - top_n[:, None]), 0.0)
    top_p, total_p, weighted_p = _positive_terms(d, pos, runs, run_index, boundary, t_p, sizes)
    total_n = jnp.sum(w_n, axis=1)
    has_p, has_n = total_p > 0, total_n > 0
    safe_p, safe_n = jnp.where(has_p, total_p, 1.0), jnp.where(has_n, total_n, 1.0)
    # The weighted means of d - boundary and alpha - d, from the weighted sums of d: the
    # shifted copies of d would each be one more [b, M] array for the reductions to read.
    loss_p = jnp.where(has_p, weighted_p / safe_p - boundary, 0.0)
    loss_n = jnp.where(has_n, alpha - jnp.sum(w_n * d, axis=1) / safe_n, 0.0)
    log_w_p = jnp.where(has_p, jnp.log(safe_p) + top_p, _batch.NEG_LARGE)
    log_w_n = jnp.where(has_n, jnp.log(safe_n) + top_n, _batch.NEG_LARGE)
    residuals = (d, pos, neg, margin, alpha, t_n, t_p, top_p, top_n, safe_p, safe_n)
    return (loss_p, loss_n, log_w_p, log_w_n), residuals


def _per_query_bwd(symmetric, sizes, residuals, cotangents):
    d, pos, neg, margin, alpha, t_n, t_p, top_p, top_n, total_p, total_n = residuals
    g_p, g_n = cotangents[0], cotangents[1]  # the log-weights carry no gradient
    lists = _lists(d, pos, neg, margin, alpha, t_n, t_p)
    # dL/dd_ij = k_i exp(x_ij - top_i): k = g / W on P*, -g / W on N*.
    in_p = lists.in_p
    x = jnp.where(in_p, lists.x_p, lists.x_n)
    k_p, k_n = g_p / total_p, -g_n / total_n

    def coefficient(k_p, k_n, top_p, top_n):  # row constants broadcast along `x`
        return jnp.where(in_p, k_p, k_n) * jnp.exp(x - jnp.where(in_p, top_p, top_n))

    grad = coefficient(k_p[:, None], k_n[:, None], top_p[:, None], top_n[:, None])
    if symmetric:  # + the same entry of H^T: the column's constants, since d and masks are
        grad = 0.5 * (grad + coefficient(k_p[None, :], k_n[None, :], top_p[None, :],
                                         top_n[None, :]))
    grad = jnp.where(in_p | lists.in_n, grad, 0.0)
    return (grad, None, None, None, None,
            *(jnp.zeros_like(h) for h in (margin, alpha, t_n, t_p)))


_per_query.defvjp(_per_query_fwd, _per_query_bwd)


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
    symmetric: bool = False,
    positive_runs: tuple[_windows.Runs, jax.Array] | None = None,
    run_sizes: tuple[int, ...] = (),
) -> jax.Array:
    """The Ranked List Loss from distances ``d`` ``[b, M]`` and masks ``pos``/``neg``.

    ``symmetric``: ``d`` is a symmetric function of the points, with symmetric masks (the
    batch against itself, no ``axis_name``): the cotangent of ``d`` is then symmetric (see
    :func:`_per_query`). ``positive_runs``: each row's runs of same-label columns and the
    index of the smallest of ``run_sizes`` that holds them
    (:func:`dml_jax.losses._windows.run_choice`, label-ordered columns): the positive lists
    are then summed on those windows; without them, on whole rows.
    """
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    d = f32(d)
    if positive_runs is None:  # the dense form only
        positive_runs, run_sizes = _windows.no_runs(d.shape[0]), ()
    runs, run_index = positive_runs
    loss_p, loss_n, log_w_p, log_w_n = _per_query(
        d, pos, neg, runs, jnp.asarray(run_index, jnp.int32), f32(margin), f32(alpha),
        f32(t_n), f32(t_p), symmetric, tuple(run_sizes),
    )
    per_query = (1.0 - lam) * loss_p + lam * loss_n  # [b]
    if query_weighting == "uniform":
        return _batch.global_mean(
            _batch.masked_sum(per_query, row_valid), jnp.sum(row_valid), axis_name
        )
    # "official": each query scaled by its total mined weight W_i over the sum of all W_k.
    log_w = jax.lax.stop_gradient(jnp.logaddexp(log_w_p, log_w_n))
    mined = row_valid & ((log_w_p > _batch.NEG_LARGE / 2) | (log_w_n > _batch.NEG_LARGE / 2))
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
    # Label-ordered columns put each row's positives in two runs (batch and memory columns),
    # on whose windows the positive lists are summed (see `_positive_terms`).
    batch = _batch.pair_batch(embeddings, labels, where, axis_name, sort_by_label=True)
    batch = with_memory(batch, memory, sort_by_label=True)
    symmetric = axis_name is None and memory is None
    d = _batch.distances_of(batch, axis_name, symmetric=symmetric)
    sizes = _windows.SLOT_SIZES if memory is None else _windows.RUN_SIZES
    positive_runs = _windows.run_choice(
        batch.row_labels, batch.row_valid, batch.col_labels, batch.col_valid,
        d.shape[1] - batch.memory.shape[0], sizes,
    )
    return ranked_list_from_distances(
        d, batch.pos, batch.neg, batch.row_valid,
        margin=margin, alpha=alpha, t_n=t_n, t_p=t_p, lam=lam,
        query_weighting=query_weighting, axis_name=axis_name, symmetric=symmetric,
        positive_runs=positive_runs, run_sizes=sizes,
    )
