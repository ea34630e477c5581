"""The pair layout shared by the N-pair and angular losses and the symmetrical-synthesis
losses of :mod:`dml_jax.losses.symmetric`.

Pair layout: rows ``2k`` (anchor ``a_k``) and ``2k + 1`` (positive ``p_k``) form pair ``k``, of
class ``labels[2k]`` (``labels[2k + 1]`` must equal it). ``where`` drops a pair unless both its
rows are True. Under ``axis_name`` each device's shard must hold whole pairs (an even number of
rows). Every similarity between the points of two pairs is read from the one ``[b, B]`` Gram
matrix of the rows against the gathered columns.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dml_jax import parallel
from dml_jax.losses import _batch

_AXIS_FLOOR = 1e-12  # an axis with ||a||^2 below this counts as zero: reflect(p about 0) = -p


def reflection_coefficient(dot: jax.Array, axis_sq_norm: jax.Array) -> jax.Array:
    """``2 (p.a) / ||a||^2``, the coefficient of ``a`` in ``reflect(p about a)``; 0 (with a zero
    gradient) for an axis of squared norm below 1e-12, so a zero axis gives ``-p``."""
    ok = axis_sq_norm > _AXIS_FLOOR
    return jnp.where(ok, 2.0 * dot / jnp.where(ok, axis_sq_norm, 1.0), 0.0)


class PairLayout(NamedTuple):
    """Dot products between the local pairs (``n`` rows) and the global pairs (``N`` columns).

    ``aa[i, j] = a_i . a_j``, ``ap = a_i . p_j``, ``pa = p_i . a_j``, ``pp = p_i . p_j``
    (float32 ``[n, N]``); ``row_dots``/``col_dots``: ``(a.a, a.p, p.p)`` of each pair (``[n]``,
    ``[N]``); labels, validity and ``row_ids`` (global pair index of each local pair).
    """

    aa: jax.Array
    ap: jax.Array
    pa: jax.Array
    pp: jax.Array
    row_dots: tuple[jax.Array, jax.Array, jax.Array]
    col_dots: tuple[jax.Array, jax.Array, jax.Array]
    row_labels: jax.Array
    col_labels: jax.Array
    row_valid: jax.Array
    col_valid: jax.Array
    row_ids: jax.Array


def check_pairs(num_rows: int) -> None:
    """Raises ``ValueError`` unless the (local) batch holds whole anchor/positive pairs."""
    if num_rows % 2:
        raise ValueError(
            f"`embeddings` must hold anchor/positive pairs (rows 2k, 2k+1): an even number of "
            f"rows per device; got {num_rows}."
        )


@jax.custom_vjp
def _self_dots(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(a.a, a.p, p.p)`` of each pair of ``x`` ``[2n, D]``, float32 ``[n]`` each."""
    a, p = x[0::2], x[1::2]
    return jnp.sum(a * a, axis=1), jnp.sum(a * p, axis=1), jnp.sum(p * p, axis=1)


def _self_dots_fwd(x):
    return _self_dots(x), x


def _self_dots_bwd(x, cotangents):
    # A hand-written gradient keeps the pairs' three vectors one small computation: left to
    # autodiff, XLA fuses every use of them into the final [2n, D] gradient loop.
    g_aa, g_ap, g_pp = (jax.lax.optimization_barrier(g) for g in cotangents)
    a, p = x[0::2], x[1::2]
    grad_a = 2.0 * g_aa[:, None] * a + g_ap[:, None] * p
    grad_p = g_ap[:, None] * a + 2.0 * g_pp[:, None] * p
    return (jnp.stack([grad_a, grad_p], axis=1).reshape(x.shape),)


_self_dots.defvjp(_self_dots_fwd, _self_dots_bwd)


@jax.custom_vjp
def _blocks(g: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """The four ``[n, N]`` blocks ``(aa, ap, pa, pp)`` of a pair-layout Gram matrix ``[2n, 2N]``
    (even / odd rows against even / odd columns)."""
    return g[0::2, 0::2], g[0::2, 1::2], g[1::2, 0::2], g[1::2, 1::2]


def _blocks_fwd(g):
    return _blocks(g), None


def _blocks_bwd(_, cotangents):
    # The blocks' cotangents interleaved back into one [2n, 2N] array by a stack and a reshape
    # (one pass); autodiff of the strided slices adds four padded copies (several times slower).
    aa, ap, pa, pp = cotangents
    rows, cols = aa.shape
    return (jnp.stack([jnp.stack([aa, ap], -1), jnp.stack([pa, pp], -1)], 1)
            .reshape(2 * rows, 2 * cols),)


_blocks.defvjp(_blocks_fwd, _blocks_bwd)


def pair_layout(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    where: jax.typing.ArrayLike | None,
    axis_name: str | None,
    *,
    normalize: bool = False,
) -> PairLayout:
    """Builds the :class:`PairLayout` (holds the ``[b, B]`` Gram matrix)."""
    batch = _batch.pair_batch(embeddings, labels, where, axis_name)
    check_pairs(batch.rows.shape[0])
    rows, cols = _batch.points(batch, axis_name, normalize=normalize)
    g = _batch.gram(batch, axis_name, normalize=normalize)[0]
    n = rows.shape[0] // 2
    aa, ap, pa, pp = _blocks(g)
    return PairLayout(
        aa=aa,
        ap=ap,
        pa=pa,
        pp=pp,
        row_dots=_self_dots(rows),
        col_dots=_self_dots(cols),
        row_labels=batch.row_labels[0::2],
        col_labels=batch.col_labels[0::2],
        row_valid=batch.row_valid[0::2] & batch.row_valid[1::2],
        col_valid=batch.col_valid[0::2] & batch.col_valid[1::2],
        row_ids=parallel.row_offset(n, axis_name) + jnp.arange(n, dtype=jnp.int32),
    )


# Each point of a pair as ``u a + v p``: a = (1, 0), p = (0, 1), and the reflections
# s1 = reflect(p about a) = (2 a.p / |a|^2) a - p, s2 = reflect(a about p) = (2 a.p / |p|^2) p - a.
POINTS = ("a", "p", "s1", "s2")

# Each point's (u, v) as triples in the basis (1, c1, c2) of its pair's reflection
# coefficients c1 = 2 a.p / |a|^2 and c2 = 2 a.p / |p|^2: the one statement of the points'
# formulas, read by `coefficients` (arrays) and `max_pair_logits` (constants per combination).
_BASIS = {
    "a": ((1.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    "p": ((0.0, 0.0, 0.0), (1.0, 0.0, 0.0)),
    "s1": ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0)),
    "s2": ((-1.0, 0.0, 0.0), (0.0, 0.0, 1.0)),
}


def coefficients(dots: tuple[jax.Array, jax.Array, jax.Array], point: str):
    """``(u, v)`` with ``point = u a + v p`` per pair (arrays or Python scalars), from the
    point's row of :data:`_BASIS`."""
    if point not in _BASIS:
        raise ValueError(f"unknown point {point!r}; expected one of {POINTS}")
    aa, ap, pp = dots
    c1, c2 = reflection_coefficient(ap, aa), reflection_coefficient(ap, pp)
    u, v = _BASIS[point]
    return _in_basis(u, c1, c2), _in_basis(v, c1, c2)


def _outer(x, y):
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    return (x[:, None] if x.ndim else x) * (y[None, :] if y.ndim else y)


def cross_dots(layout: PairLayout, x: str, y: str) -> jax.Array:
    """``X_i . Y_j`` for local pair ``i`` and global pair ``j``, float32 ``[n, N]``."""
    ux, vx = coefficients(layout.row_dots, x)
    uy, vy = coefficients(layout.col_dots, y)
    return (
        _outer(ux, uy) * layout.aa
        + _outer(ux, vy) * layout.ap
        + _outer(vx, uy) * layout.pa
        + _outer(vx, vy) * layout.pp
    )


def self_dots(layout: PairLayout, x: str, y: str) -> jax.Array:
    """``X_i . Y_i`` of each local pair, float32 ``[n]``."""
    aa, ap, pp = layout.row_dots
    ux, vx = coefficients(layout.row_dots, x)
    uy, vy = coefficients(layout.row_dots, y)
    return ux * uy * aa + (ux * vy + vx * uy) * ap + vx * vy * pp


def diagonal(layout: PairLayout) -> jax.Array:
    """bool ``[n, N]``: column ``j`` is row ``i``'s own pair."""
    return layout.row_ids[:, None] == jnp.arange(layout.col_labels.shape[0])[None, :]


def same_class(layout: PairLayout) -> jax.Array:
    """bool ``[n, N]``: the pairs share a label (own pair included), both valid."""
    return (
        (layout.row_labels[:, None] == layout.col_labels[None, :])
        & layout.row_valid[:, None]
        & layout.col_valid[None, :]
    )


def softmax_cross_entropy(
    logits: jax.Array, layout: PairLayout, axis_name: str | None
) -> jax.Array:
    """Mean over valid anchor pairs of ``CE(softmax_j logits_ij, t_ij)``, ``t_ij`` uniform over
    the valid same-class columns; invalid columns take no part in the softmax."""
    cols = layout.col_valid[None, :] & layout.row_valid[:, None]
    target = same_class(layout).astype(jnp.float32)
    target = target / jnp.maximum(jnp.sum(target, axis=1, keepdims=True), 1.0)
    lse = _batch.masked_logsumexp(logits, cols)
    ce = jnp.where(layout.row_valid, lse - jnp.sum(target * jnp.where(cols, logits, 0.0), 1), 0.0)
    return _batch.global_mean(jnp.sum(ce), jnp.sum(layout.row_valid), axis_name)


def l2_regulariser(layout: PairLayout, axis_name: str | None) -> jax.Array:
    """``0.25 (mean_k ||a_k||^2 + mean_k ||p_k||^2)`` over the valid pairs of the global batch."""
    aa, _, pp = layout.row_dots
    return 0.25 * _batch.global_mean(
        _batch.masked_sum(aa + pp, layout.row_valid), jnp.sum(layout.row_valid), axis_name
    )


def angular_logits(layout: PairLayout, x: str, y: str, degree: float) -> jax.Array:
    """The angular loss's logit matrix with ``X`` as anchors and ``Y`` as positives:
    ``2 (1 + tan^2) X_i.Y_i`` on the diagonal, ``4 tan^2 (X_i + Y_i).Y_j`` off it."""
    t2 = math.tan(math.radians(degree)) ** 2
    diag = 2.0 * (1.0 + t2) * self_dots(layout, x, y)
    off = 4.0 * t2 * (cross_dots(layout, x, y) + cross_dots(layout, y, y))
    return jnp.where(diagonal(layout), diag[:, None], off)


def _as_row(x):
    return x[:, None] if jnp.ndim(x) else x


def _as_col(x):
    return x[None, :] if jnp.ndim(x) else x


def first_max(values: list[jax.Array]) -> jax.Array:
    """int32: the index of the first of ``values`` (arrays of one shape) that holds their
    element-wise maximum, as ``argmax`` over a stacked axis: one running max and index
    (a strictly greater value takes over, so a tie keeps the earlier index)."""
    best, choice = values[0], jnp.zeros(values[0].shape, jnp.int32)
    for c, value in enumerate(values[1:], start=1):
        better = value > best
        best, choice = jnp.where(better, value, best), jnp.where(better, c, choice)
    return choice


def select(choice: jax.Array, options: list) -> jax.Array:
    """``options[choice]`` per entry (arrays broadcastable to ``choice``, or scalars)."""
    out = options[-1]
    for c in range(len(options) - 2, -1, -1):
        out = jnp.where(choice == c, options[c], out)
    return out


def _in_basis(k, c1, c2):
    """``k0 + k1 c1 + k2 c2`` (``k`` Python floats or arrays), skipping the terms whose weight
    is the Python float 0: a Python float or an array."""
    terms = [k[0]] if _nonzero(k[0]) else []
    terms += [weight * c for weight, c in ((k[1], c1), (k[2], c2)) if _nonzero(weight)]
    return functools.reduce(lambda x, y: x + y, terms) if terms else 0.0


def _nonzero(weight) -> bool:
    return not (isinstance(weight, float) and weight == 0.0)


def _select_constant(choice: jax.Array, options: list[float]):
    """:func:`select` of Python floats; the float itself when all options are equal."""
    return options[0] if len(set(options)) == 1 else select(choice, options)


def max_pair_logits(layout: PairLayout, combos, *, degree: float | None = None) -> jax.Array:
    """The element-wise max over ``combos`` (pairs of :data:`POINTS`) of the logit matrices
    ``X_i . Y_j`` (``degree=None``: N-pair) or of :func:`angular_logits` ``(X, Y)``.

    Every combination is one bilinear form of the layout's four blocks,
    ``U_i u_j aa + U_i v_j ap + V_i u_j pa + V_i v_j pp`` (``X = U a + V p`` per row, ``Y = u a +
    v p`` per column; angular: ``X + Y`` on the row side), whose coefficients are constants
    plus multiples of each pair's two reflection coefficients ``c1``, ``c2``. The maximising
    combination is chosen on constants (the first one on ties); per entry its constants are
    selected, and only ``c1``, ``c2`` and the blocks are differentiated: the gradient is a few
    ``[n, N]`` passes and four reductions whatever the number of combinations (differentiating
    each combination's coefficients costs a reduction per combination). Float32 ``[n, N]``.
    """
    rows = [reflection_coefficient(layout.row_dots[1], layout.row_dots[0]),
            reflection_coefficient(layout.row_dots[1], layout.row_dots[2])]
    cols = [reflection_coefficient(layout.col_dots[1], layout.col_dots[0]),
            reflection_coefficient(layout.col_dots[1], layout.col_dots[2])]
    rows, cols = [_as_row(c) for c in rows], [_as_col(c) for c in cols]
    forms = []  # (U, V, u, v) per combination, each a triple in the basis (1, c1, c2)
    for x, y in combos:
        big_u, big_v = _BASIS[x]
        if degree is not None:  # (X_i + Y_i) . Y_j
            big_u = tuple(a + b for a, b in zip(big_u, _BASIS[y][0], strict=True))
            big_v = tuple(a + b for a, b in zip(big_v, _BASIS[y][1], strict=True))
        forms.append((big_u, big_v, *_BASIS[y]))
    sides = (rows, rows, cols, cols)

    def bilinear(big_u, big_v, u, v, blocks):
        aa, ap, pa, pp = blocks
        return big_u * u * aa + big_u * v * ap + big_v * u * pa + big_v * v * pp

    blocks = (layout.aa, layout.ap, layout.pa, layout.pp)
    const_sides, const_blocks = jax.lax.stop_gradient((sides, blocks))
    values = [
        bilinear(*[_in_basis(k, *c) for k, c in zip(f, const_sides, strict=True)], const_blocks)
        for f in forms
    ]
    choice = first_max(values)
    picked = [  # the chosen combination's constants per entry, then the differentiable c1, c2
        _in_basis(tuple(_select_constant(choice, [f[slot][t] for f in forms])
                        for t in range(3)), *c)
        for slot, c in enumerate(sides)
    ]
    logits = bilinear(*picked, blocks)
    if degree is None:
        return logits
    t2 = math.tan(math.radians(degree)) ** 2
    # An element-wise maximum (ties split evenly); a max over a stacked axis gave NaN
    # gradients on ties when differentiated through an inner jit.
    diag = functools.reduce(jnp.maximum, [self_dots(layout, x, y) for x, y in combos])
    return jnp.where(diagonal(layout), 2.0 * (1.0 + t2) * diag[:, None], 4.0 * t2 * logits)
