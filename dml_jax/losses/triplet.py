"""Triplet margin loss with all-triplet, batch-hard and semi-hard mining.

Mining never builds the ``[B, B, B]`` tensor of triplets, and never differentiates through it.
Which hinge terms are active is piecewise constant in the distances, so a mining pass returns a
constant coefficient matrix ``C`` (``[b, B]``) and the number of active terms ``n``, with

    sum over active (a, p, n) of (d_ap - d_an + margin) = sum(C * d) + margin * n

exactly: ``C[a, p]`` counts the active terms using ``d_ap`` and ``C[a, n]`` minus those using
``d_an``. The loss is that sum, so its gradient is ``C`` (the subgradient with ``relu'(0) = 0``),
and only one ``[b, B]`` product is differentiated.

Mining is cheap in class-balanced batches, where an anchor has few positives: the columns are
ordered by label (one ``[B]`` argsort), which makes each anchor's positives a contiguous run,
gathered into ``S`` static slots (``S`` = 2, 8 or 32, the smallest window from each anchor's
first positive that holds all its positives, i.e. about the batch's largest class);
the terms are then decided against every negative in ``O(b S B)`` work, reduced per slot over
transposed ``32 x 32`` blocks of columns in int32 (:func:`_per_slot`: on XLA's CPU backend a
reduction over whole rows materialised the ``[b, S, B]`` terms, and one over more than 1024
columns at once ran 20-40 times slower); the coefficient pass writes the negatives' entries
and the slots' values are added at their columns by one ``[b, S]`` scatter into its output
(:func:`~dml_jax.losses._windows.add_at_columns`; a symmetric view's transposed slots by
one ``[b, S]`` gather, :func:`_slots_transposed`). Semi-hard mining writes no such pass:
an anchor's ``S + 1`` chosen negatives (each positive's closest harder one, and the
farthest) are found by value, and where one negative holds a value, one more reduction
gives its column (:func:`_chosen_columns`), so the coefficients are ``[b, 2 S + 1]``
scatters into zeros (twice for a symmetric view); the few rows whose chosen value several
negatives hold (exact ties, which a float batch of 1024 has a handful of) are mended one at
a time, and with more than ``max(32, b / 16)`` such rows every row takes the dense pass.
A batch with a class of more than 32 rows takes a sort-based path instead (each anchor's
negative distances sorted once, then binary searches: ``O(B^2 log B)`` work, ``O(B^2)``
memory, 128 rows at a time: :func:`_by_row_chunks`). XLA's CPU sort of a ``1024 x 1024``
array costs several times the loss's matmuls, hence the slots.

With a cross-batch memory of ``M`` rows (``W = B + M`` columns) an anchor has many negatives
and a few dozen positives spread over the memory. The memory's columns are then ordered by
label too (an ``[M]`` argsort and an ``[M, D]`` gather of constants), so an anchor's positives
are two runs, one among the batch columns and one among the memory's, found by binary search
in the sorted labels (:func:`~dml_jax.losses._windows.label_runs`). A bucketed path gathers
those runs into ``S`` slots (``S`` = 128 or 512, whichever holds both runs of every anchor)
and sorts them (``[b, S]``, by counting each slot's predecessors: :func:`_stable_order`);
each negative's bucket, the number of sorted positive values (``"all"``: thresholds
``d_ap + margin``) at or below it, comes from ``O(b S W)`` fused comparisons, 32 slots at a
time and only as many chunks as the fullest anchor fills (:func:`_count_below`; ``[b, W]``
memory: on XLA's CPU backend several times faster than a row-wise binary search by gathers
for a few hundred values). ``"all"``: a negative's count of active terms is the number of
thresholds above its bucket, a positive's the number of negatives in the buckets below it (one
flat ``[b, W]`` scatter-add into a per-row ``[b, S + 1]`` histogram, then a cumulative sum).
``"semi_hard"``: the per-bucket minima (one scatter-min), whose reverse cumulative minimum is
each positive's closest harder negative; the chosen negatives' columns come from a second
scatter-min, of the columns of the negatives at their bucket's minimum (one gather marks them),
so an exactly tied chosen value gives its term's coefficient to one column (the first; the last
at the farthest negative), as the sort-based path does, where the slotted paths share it. Its
coefficients are then ``[b, 2 S]`` entries, each positive and its chosen negative. The sorted
slots' own values (``"all"``) are added at their columns by one ``[b, S]`` scatter into the
coefficient pass's output (:func:`~dml_jax.losses._windows.add_at_columns`): ``O(b S W)``
comparisons and ``O(b W)`` scatters and gathers, a few ``[b, W]`` arrays, no ``[b, W]`` sort.
Only an anchor whose two runs span more than 512 columns (a class with that many rows in the
batch and memory), or columns not sorted by label, send the view to the sort-based path
(``O(b W log W)``, several ``[b, W]`` arrays). On one device (no ``axis_name``) the loss's value
and gradient come from the mining pass, with no ``[b, W]`` pass summing ``C * d`` or forming the
distances' cotangent ``C / d``: ``"all"``'s coefficient pass writes ``C / d`` and
:func:`~dml_jax.losses._batch.mined_distance_sum` runs the backward products;
``"semi_hard"``'s value is a sum over its entries and its gradient reaches the memory's rows by
gathers (:func:`~dml_jax.losses._batch.sparse_mined_gradient`), where its ``[b, W]``
coefficients took a ``[b, M] @ [M, D]`` product.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dml_jax import _checks, distances
from dml_jax.losses import _batch, _windows
from dml_jax.losses.memory import XBMState, with_memory

MINING = ("all", "batch_hard", "semi_hard")
# index [b] -> each row's distance [b] to its column index[a], differentiable.
DistanceTo = Callable[[jax.Array], jax.Array]
# Thresholds compared per fused reduction in `_count_below` (XLA's CPU reductions over a
# short minor axis of booleans vectorise; wider ones, or float sums, are many times slower).
_COMPARE_CHUNK = 32
# Interleaved copies of each row's table in the per-row bucket scatters (see `_row_buckets`).
_BUCKET_COPIES = 4
# The slotted miners' reductions over an anchor's columns (see `_per_slot`): lanes per chunk,
# and columns per block (at most _COLUMN_CHUNK chunks).
_COLUMN_CHUNK = 32
_BLOCK_COLUMNS = _COLUMN_CHUNK * _COLUMN_CHUNK
# Rows with tied semi-hard negatives mended one at a time (see `_tied_row_limit`).
_TIED_ROWS = 32
# Rows per step of the sort-based fallback miners (see `_by_row_chunks`).
_FALLBACK_ROWS = 128


def _searchsorted_rows(sorted_rows: jax.Array, queries: jax.Array, side: str) -> jax.Array:
    """Row-wise ``searchsorted``: ``[b, B]`` sorted rows, ``[b, Q]`` queries -> int ``[b, Q]``."""
    return jax.vmap(lambda a, v: jnp.searchsorted(a, v, side=side, method="scan"))(
        sorted_rows, queries
    )


def _slots_transposed(values: jax.Array, start: jax.Array, cols: jax.Array,
                      filled: jax.Array) -> jax.Array:
    """The slot values of the transposed pairs: ``out[a, s] = values[n, a - start[n]]`` for
    the window's column ``n = cols[a, s]`` where ``filled[a, s]`` (``n`` a positive of ``a``,
    so ``a`` one of ``n``'s, in its window; ``b == B``), else 0. ``[b, S]``, one gather."""
    rows, slots = values.shape
    offset = jnp.where(filled, jnp.arange(rows, dtype=jnp.int32)[:, None] - start[cols], 0)
    picked = values.reshape(-1).at[cols * slots + offset].get(mode="promise_in_bounds")
    return jnp.where(filled, picked, 0.0)


def _symmetrised(coef: jax.Array) -> jax.Array:
    """``(C + C^T) / 2`` of a square coefficient matrix
    (:func:`~dml_jax.losses._batch.transpose_sum`)."""
    return 0.5 * _batch.transpose_sum(coef)


def _pack_positives(d, batch, start, slots):
    """Each row's positives in ``slots`` slots, columns ``start + s``: ``(d_ap [b, S], filled
    [b, S], cols [b, S])`` (an unfilled slot's ``d_ap`` is arbitrary; ``cols`` as
    :func:`~dml_jax.losses._windows.window`'s).

    A row's positives must lie in the ``slots`` columns from ``start``, its first positive
    (true with label-sorted columns when no label has more than ``slots`` valid rows).
    """
    cols, filled = _windows.window(batch.pos, start, slots)
    return jnp.take_along_axis(d, cols, axis=1), filled, cols


def _column_blocks(x: jax.Array, fill: float) -> list[jax.Array]:
    """``x`` ``[b, W]`` as blocks of at most :data:`_BLOCK_COLUMNS` columns, each ``[b, c, n]``
    with ``c = _COLUMN_CHUNK`` lanes and ``n <= c`` chunks (column ``k c + l`` of a block at
    ``[:, l, k]``; ``W`` padded with ``fill`` to a multiple of ``c``)."""
    rows, width = x.shape
    pad = -width % _COLUMN_CHUNK
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad)), constant_values=fill)
    return [
        x[:, lo:lo + _BLOCK_COLUMNS].reshape(rows, -1, _COLUMN_CHUNK).transpose(0, 2, 1)
        for lo in range(0, x.shape[1], _BLOCK_COLUMNS)
    ]


def _per_slot(op, compare, thresholds, blocks, with_columns=False):
    """``op`` (``"sum"`` counts, ``"min"``) over the columns of each slot's ``[b, W]`` row,
    ``[b, S]``: per block of :func:`_column_blocks`, ``compare(thresholds [b, S, 1, 1], block
    [b, 1, c, n])`` gives the ``[b, S, c, n]`` terms, reduced over both axes in int32, and
    the blocks' results are combined. On XLA's CPU backend these fused integer reductions of
    at most ``32 x 32`` terms per slot vectorise; a reduction over whole rows, over the
    untransposed chunks, or over more than 1024 columns at once made it materialise or
    scalarise the terms (3 times slower at ``W = 1024``, 20-40 times from ``W = 2048``), as
    does any float min. ``"min"`` takes non-negative floats (or ``+inf``), whose bit
    patterns order as int32 as the floats do. ``with_columns``: ``compare`` also takes the
    block's column indices (int32 ``[1, 1, c, n]``), its terms are int32 and so is the
    ``"sum"``."""
    def reduce(block, lo):
        extra = ()
        if with_columns:  # column lo + k c + l at [l, k], from iotas: as a transposed
            # arange, or a constant, they made the reduction 2-5 times slower
            shape = (1, 1, *block.shape[1:])
            extra = (lo + jax.lax.broadcasted_iota(jnp.int32, shape, 3) * _COLUMN_CHUNK
                     + jax.lax.broadcasted_iota(jnp.int32, shape, 2),)
        terms = compare(thresholds[:, :, None, None], block[:, None], *extra)
        if op == "sum":
            return jnp.sum(terms, axis=(2, 3), dtype=jnp.int32)
        return jnp.min(jax.lax.bitcast_convert_type(terms, jnp.int32), axis=(2, 3))

    combine = jnp.add if op == "sum" else jnp.minimum
    out = functools.reduce(
        combine, [reduce(block, i * _BLOCK_COLUMNS) for i, block in enumerate(blocks)]
    )
    if with_columns:
        return out
    if op == "sum":
        return out.astype(jnp.float32)
    return jax.lax.bitcast_convert_type(out, jnp.float32)


def _all_slotted(d, batch, start, margin, slots, symmetric=False):
    d_ap, filled, cols = _pack_positives(d, batch, start, slots)
    threshold = jnp.where(filled, d_ap + margin, -jnp.inf)  # an empty slot is never active
    neg_d = jnp.where(batch.neg, d, jnp.inf)  # a non-negative never is
    per_positive = _per_slot(  # [b, S]: each positive's active negatives
        "sum", jnp.greater, threshold, _column_blocks(neg_d, jnp.inf)
    )

    def count_negative(thresholds):  # [b, B]: the S slots unrolled, counted in int32
        return functools.reduce(jnp.add, [(t > neg_d).astype(jnp.int32) for t in thresholds])

    negative = count_negative([threshold[:, s:s + 1] for s in range(slots)])  # each row's, [b, 1]
    positive = per_positive
    if symmetric:  # (C + C^T) / 2 without a transpose: C^T's entry (a, n) is C's (n, a), whose
        # negative count compares the same neg_d[a, n] (d and neg symmetric) with column n's
        # thresholds, [1, B] rows of their transpose, written apart (read as columns of [b, S]
        # inside the pass, at a stride of S floats, they took a tenth of the step); a positive
        # pair's is slot a - start[n] of row n
        column = _batch.transposed(threshold)  # [S, B]
        negative = 0.5 * (negative + count_negative([column[s][None, :] for s in range(slots)]))
        positive = 0.5 * (positive + _slots_transposed(per_positive, start, cols, filled))
    negative = negative.astype(jnp.float32)
    # The positives' entries of -negative are 0: the slots (0 where unfilled, so also at a
    # clipped column) are added there. Selecting each entry's slot inside the pass instead
    # (S compares and selects per entry, twice for a symmetric view) took half its time.
    return _windows.add_at_columns(-negative, cols, positive), jnp.sum(per_positive)


def _all_sorted(d, batch, margin):
    width = d.shape[1]
    sorted_neg = jnp.sort(jnp.where(batch.neg, d, jnp.inf), axis=1)
    threshold = d + margin
    per_positive = _searchsorted_rows(sorted_neg, threshold, side="left")  # negatives below
    per_positive = jnp.where(batch.pos, per_positive, 0).astype(jnp.float32)
    sorted_threshold = jnp.sort(jnp.where(batch.pos, threshold, -jnp.inf), axis=1)
    not_above = _searchsorted_rows(sorted_threshold, d, side="right")  # thresholds <= d_an
    per_negative = jnp.where(batch.neg, width - not_above, 0).astype(jnp.float32)
    return per_positive - per_negative, jnp.sum(per_positive)


def _semi_hard_slotted(d, batch, start, margin, slots, symmetric=False):
    d_ap, filled, cols = _pack_positives(d, batch, start, slots)
    neg_d = jnp.where(batch.neg, d, -jnp.inf)  # a non-negative is never harder
    blocks = _column_blocks(neg_d, -jnp.inf)
    closest = _per_slot(  # [b, S]: the closest negative farther than each positive (> 0,
        # as d_ap >= 0: distances, so a valid "min" of _per_slot)
        "min", lambda t, x: jnp.where(x > t, x, jnp.inf), d_ap, blocks
    )
    found = jnp.isfinite(closest)
    farthest = jnp.max(jnp.where(batch.neg, d, -jnp.inf), axis=1)  # [b]
    d_an = jnp.where(found, closest, farthest[:, None])
    has_neg = batch.neg_count[:, None] > 0  # sum(neg, 1), counted from the labels
    active = filled & has_neg & (d_ap - d_an + margin > 0)  # [b, S]
    # The chosen negatives by value (plain min/max reductions are much faster on CPU than
    # argmin): each slot's closest harder one (when found: finite and above d_ap, so held by
    # negatives only), taken by the active terms, and the farthest, by the active terms
    # that found none; exactly tied negatives share them (the loss's value is the same).
    # Two groups, [b, S] and [b, 1]: the pass reads their columns, and an [b, S + 1] array's
    # 9-float stride made it 1.8 times slower than the 8-float one.
    groups = [
        (closest, jnp.where(active & found, 1.0, 0.0)),
        (farthest[:, None], jnp.sum(jnp.where(active & ~found, 1.0, 0.0), axis=1, keepdims=True)),
    ]
    counted = [_chosen_columns(values, blocks) for values, _ in groups]
    weights = [uses / jnp.maximum(ties, 1).astype(jnp.float32)
               for (_, uses), (ties, _) in zip(groups, counted, strict=True)]
    positive = active.astype(jnp.float32)

    def by_values(_):
        """Every entry compared with its row's chosen values (and, for a symmetric view, its
        column's): ``O(b S W)``, one ``[b, W]`` pass."""
        def negative_coef(transposed):
            return sum(_chosen_coef(neg_d, values, weight, transposed)
                       for (values, _), weight in zip(groups, weights, strict=True))

        negative = negative_coef(False)
        pos = positive
        if symmetric:  # (C + C^T) / 2 without a transpose: C^T's entry (a, n) is C's
            # (n, a), the same neg_d[a, n] against column n's values, [1, B]
            negative = 0.5 * (negative + negative_coef(True))
            pos = 0.5 * (pos + _slots_transposed(pos, start, cols, filled))
        # The positives' entries of -negative are 0: the slots are added there (as "all").
        return _windows.add_at_columns(-negative, cols, pos)

    # sum(C * d) from the slots: each active term's chosen negatives (tied ones share its
    # weight) all lie at its d_an; a symmetric view's (C + C^T) / 2 has the same sum.
    value = jnp.sum(jnp.where(active, d_ap - d_an, 0.0))
    if counted[0][1] is None:
        return by_values(None), jnp.sum(positive), value
    half = 0.5 if symmetric else 1.0  # (C + C^T) / 2 for a symmetric view
    single = [ties == 1 for ties, _ in counted]
    tied = [(uses > 0) & ~one for (_, uses), one in zip(groups, single, strict=True)]
    tied_rows = jnp.any(tied[0], axis=1) | tied[1][:, 0]  # [b]
    n_tied = jnp.sum(tied_rows)

    def at_columns(_):
        """The coefficients scattered at their columns (``[b, 2 S + 1]`` updates, and as
        many transposed ones for a symmetric view), then each tied row's values by a pass
        over its row (and column), one row at a time."""
        # One scatter per group and direction: concatenating the column index with `cols`
        # took the reduction producing it into the concatenation's fusion (1.25 ms, not 0.35).
        rows = jnp.arange(d.shape[0], dtype=jnp.int32)[:, None]
        coef = _windows.scatter_rows(half * positive, cols, d.shape[1])
        if symmetric:  # C^T: the same values at the transposed entries
            coef = coef.at[cols, rows].add(half * positive, mode="promise_in_bounds")
        for one, (_, column), weight in zip(single, counted, weights, strict=True):
            at = jnp.where(one, column, 0)
            negative = -half * jnp.where(one, weight, 0.0)
            coef = _windows.add_at_columns(coef, at, negative)
            if symmetric:
                coef = coef.at[at, rows].add(negative, mode="promise_in_bounds")
        picked = jnp.nonzero(tied_rows, size=_tied_row_limit(d.shape[0]), fill_value=0)[0]

        def add_tied_row(i, coef):
            a = picked[i]
            values = -half * sum(  # [1, W]
                _chosen_coef(neg_d[a][None], chosen[a][None],
                             jnp.where(row_tied[a], weight[a], 0.0)[None])
                for (chosen, _), weight, row_tied in zip(groups, weights, tied, strict=True)
            )
            coef = jax.lax.dynamic_update_slice(
                coef, jax.lax.dynamic_slice(coef, (a, 0), values.shape) + values, (a, 0))
            if symmetric:  # and column a (a strided [W] slice; a [K, W] scatter of the
                # columns of every possible tied row cost a third of the pass it replaces)
                col = jax.lax.dynamic_slice(coef, (0, a), values.T.shape) + values.T
                coef = jax.lax.dynamic_update_slice(coef, col, (0, a))
            return coef

        return jax.lax.fori_loop(0, n_tied, add_tied_row, coef)

    few = n_tied <= _tied_row_limit(d.shape[0])
    return jax.lax.cond(few, at_columns, by_values, None), jnp.sum(positive), value


def _chosen_columns(chosen, blocks):
    """How many entries of ``blocks`` (:func:`_column_blocks` of a ``[b, W]`` array, padding
    included) hold each of a row's ``chosen`` values ``[b, K]``, and where one does, its
    column: ``(ties, column)``, int32 ``[b, K]`` each (``column`` meaningful where ``ties ==
    1``), from one :func:`_per_slot` sum of ``column << m | 1`` over the entries at the value
    (``m`` bits hold any count up to the padded width ``W' < 2^m``, so the count is exact even
    where the columns' sum wraps around). ``column`` is None when a column's bits do not fit
    beside them (``W'`` past ``2^15``); ``ties`` then comes from counts alone."""
    width = sum(block.shape[1] * block.shape[2] for block in blocks)  # W', padded
    low = width.bit_length()
    if (width - 1) << low >= 2**31:
        return _per_slot("sum", jnp.equal, chosen, blocks).astype(jnp.int32), None
    packed = _per_slot("sum", lambda t, x, col: jnp.where(x == t, (col << low) | 1, 0),
                       chosen, blocks, with_columns=True)
    return packed & ((1 << low) - 1), packed >> low


def _tied_row_limit(rows: int) -> int:
    """The most rows with tied chosen negatives that :func:`_semi_hard_slotted` mends one
    at a time (``O(W S)`` each); with more, every row takes the dense pass."""
    return min(rows, max(_TIED_ROWS, rows // 16))


def _chosen_coef(neg_d, chosen, weight, transposed=False):
    """``sum over k of weight[:, k] where neg_d == chosen[:, k]``: the negatives'
    coefficients ``[b, W]`` of a group of :func:`_semi_hard_slotted`'s chosen values ``[b,
    K]`` (``transposed``: of each column's values, ``[1, B]`` slices of ``[B, K]``, for the
    transposed pairs; transposing the arrays put the transposes into the pass, 3.5 times
    slower, and writing them apart, `_batch.transposed`, gave nothing), the values
    unrolled."""
    def part(x, k):
        return x[None, :, k] if transposed else x[:, k:k + 1]

    return functools.reduce(jnp.add, [
        jnp.where(neg_d == part(chosen, k), part(weight, k), 0.0)
        for k in range(chosen.shape[1])
    ])


def _semi_hard_sorted(d, batch, margin):
    width = d.shape[1]
    order = jnp.argsort(jnp.where(batch.neg, d, jnp.inf), axis=1)  # [b, B]
    sorted_neg = jnp.take_along_axis(jnp.where(batch.neg, d, jnp.inf), order, axis=1)
    num_neg = jnp.sum(batch.neg, axis=1, keepdims=True)
    first_harder = _searchsorted_rows(sorted_neg, d, side="right")
    rank = jnp.clip(jnp.where(first_harder < num_neg, first_harder, num_neg - 1), 0, width - 1)
    neg_cols = jnp.take_along_axis(order, rank, axis=1)  # [b, B]: chosen negative per column
    d_an = jnp.take_along_axis(d, neg_cols, axis=1)
    has_neg = jnp.any(batch.neg, axis=1, keepdims=True)
    active = (batch.pos & has_neg & (d - d_an + margin > 0)).astype(jnp.float32)
    # Each positive's term sits at its own column: the coefficients are `active` with the
    # chosen negatives' -1s added, one [b, B] scatter into it.
    return _windows.add_at_columns(active, neg_cols, -active), jnp.sum(active)


def _count_below(sorted_vals, d, strict, start=None):
    """``#{j : sorted_vals[a, j] < d[a, n]}`` (``<=`` unless ``strict``), int32 ``[b, W]``,
    plus ``start`` (int32 ``[b, W]``) when given: the counts' loop then ends with them
    added (:func:`_bucket_offsets`, so that its result is a scatter's index).

    Compares against every value in chunks of ``_COMPARE_CHUNK``: on XLA's CPU backend this is
    several times faster than a row-wise binary search (gathers) for a few hundred values.
    Each row of ``sorted_vals`` ``[b, S]`` is sorted, ``+inf`` last: only the chunks that
    hold some row's finite value are compared, in a loop whose trip count is known at run
    time (anchors with at most 70 positives in 128 slots cost three chunks, not four). A
    skipped ``+inf`` would count only against ``d = +inf`` (``<=``).
    """
    below = jnp.less if strict else jnp.less_equal
    width = sorted_vals.shape[1]
    padded = jnp.pad(sorted_vals, ((0, 0), (0, -width % _COMPARE_CHUNK)),
                     constant_values=jnp.inf)

    def count(part):  # [b, _COMPARE_CHUNK] values -> [b, W], one fused reduction
        return jnp.sum(below(part[:, None, :], d[:, :, None]), axis=2, dtype=jnp.int32)

    def add_chunk(k, total):
        return total + count(
            jax.lax.dynamic_slice_in_dim(padded, k * _COMPARE_CHUNK, _COMPARE_CHUNK, axis=1)
        )

    finite = jnp.max(jnp.sum(sorted_vals < jnp.inf, axis=1, dtype=jnp.int32))
    chunks = (finite + _COMPARE_CHUNK - 1) // _COMPARE_CHUNK
    first = count(padded[:, :_COMPARE_CHUNK])
    return jax.lax.fori_loop(1, chunks, add_chunk, first if start is None else first + start)


def _chunked_count(width: int, counted: Callable[[int, int], jax.Array]) -> jax.Array:
    """``sum over j < width of counted(j)``, int32 ``[b, W]``, where ``counted(lo, hi)`` gives
    the booleans ``[b, W, hi - lo]`` of ``j`` in ``[lo, hi)``: in chunks of ``_COMPARE_CHUNK``,
    each one fused reduction over its short minor axis (which XLA's CPU backend vectorises;
    wider ones, or float sums, are many times slower)."""
    count = None
    for lo in range(0, width, _COMPARE_CHUNK):
        part = jnp.sum(counted(lo, min(lo + _COMPARE_CHUNK, width)), axis=2, dtype=jnp.int32)
        count = part if count is None else count + part
    return count


def _flat_index(index: jax.Array, width: int) -> jax.Array:
    """Row ``a``'s column ``index[a, n]`` of a ``[b, width]`` array as an index into its
    flattened ``[b * width]`` copy: int32 ``[b, n]``. XLA's CPU backend runs one-index
    gathers and scatters faster than two-index ones, for which it builds ``[b, n, 2]`` index
    arrays (7 ms at ``[1024, 9216]``)."""
    return index + width * jnp.arange(index.shape[0], dtype=jnp.int32)[:, None]


def _row_gather(table: jax.Array, index: jax.Array) -> jax.Array:
    """``table[a, index[a, n]]``: ``[b, K]`` table, in-range int32 ``[b, W]`` indices ->
    ``[b, W]``, one flat gather (:func:`_flat_index`)."""
    flat = _flat_index(index, table.shape[1])
    return table.reshape(-1).at[flat].get(mode="promise_in_bounds")


def _row_scatter(table: jax.Array, index: jax.Array, values: jax.Array) -> jax.Array:
    """``table`` ``[b, K]`` with ``table[a, index[a, s]] = values[a, s]`` (in-range int32
    ``[b, S]`` indices, no two equal in a row). One flat scatter (:func:`_flat_index`; the
    two-index one's ``[b S, 2]`` index array also took in the indices' producer, 5 ms for
    :func:`_stable_order`'s positions at ``[1024, 128]``)."""
    rows, size = table.shape
    flat = _flat_index(index, size)
    return table.reshape(-1).at[flat.reshape(-1)].set(
        values.reshape(-1), mode="promise_in_bounds", unique_indices=True
    ).reshape(rows, size)


def _bucket_offsets(shape: tuple[int, int], width: int) -> jax.Array:
    """Where entry ``[a, n]`` of a ``[b, W]`` array finds its row's bucket 0 in
    :func:`_row_buckets`' flat tables: ``a * copies * width + (n % copies) * width``, int32
    ``[b, W]`` (an expression of indices, fused into its consumers)."""
    copy = (jnp.arange(shape[1], dtype=jnp.int32) % _BUCKET_COPIES) * width
    return _flat_index(jnp.broadcast_to(copy, shape), _BUCKET_COPIES * width)


def _counted_buckets(sorted_vals, d, strict):
    """Each entry's :func:`_count_below` count as its bucket among ``S + 1`` (``sorted_vals``
    ``[b, S]``), and that bucket's index into :func:`_row_buckets`' tables: ``(bucket,
    index)``, int32 ``[b, W]`` each (``index`` the counts' own buffer, ``bucket`` an
    expression of it)."""
    offsets = _bucket_offsets(d.shape, sorted_vals.shape[1] + 1)
    index = _count_below(sorted_vals, d, strict, start=offsets)
    return index - offsets, index


def _row_buckets(op, values, index, width, init):
    """``out[a, k] = op over n with bucket[a, n] == k of values[a, n]``: ``[b, width]``
    (``init`` where none), for ``index = bucket + _bucket_offsets(...)`` int32 ``[b, W]``
    (the miners' counts end with the offsets added, so the index array is the counts' own
    buffer: computing it after the counts wrote another ``[b, W]`` array, 2 ms at ``[1024,
    9216]``). One flat ``lax`` scatter (``jnp``'s indexing adds a select for negative indices,
    which XLA fused into a copy of the index) into :data:`_BUCKET_COPIES` interleaved copies
    of each row's table (column ``n`` updates copy ``n % copies``), combined after: XLA's CPU
    scatter updates one entry after the other, and when neighbouring columns fall in the same
    bucket (every negative in bucket 0 when all are active) each update waits for the
    previous one's store; spread over the copies, consecutive updates are independent (30 ->
    21 ms at ``[1024, 9216]`` into 129 buckets with one bucket taking 90-100% of the entries,
    on a Xeon; the same for random buckets)."""
    rows = values.shape[0]
    numbers = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(0,), scatter_dims_to_operand_dims=(0,)
    )
    scatter = {"add": jax.lax.scatter_add, "min": jax.lax.scatter_min}[op]
    out = scatter(
        jnp.full((rows * _BUCKET_COPIES * width,), init, values.dtype), index.reshape(-1, 1),
        values.reshape(-1), numbers, mode=jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS,
    )
    combine = {"add": jnp.sum, "min": jnp.min}[op]
    return combine(out.reshape(rows, _BUCKET_COPIES, width), axis=1)


def _pack_runs(d, batch, runs, slots):
    """Each row's positives, in ``slots`` slots taken from its two runs (``runs``: see
    :func:`~dml_jax.losses._windows.label_runs`), sorted by distance: ``(d_ap [b, S], filled
    [b, S], cols [b, S])`` (unfilled: ``inf``; ``cols``: each sorted slot's column, clipped to
    the last one past both runs).

    A row's positives must lie in its two runs, and the runs' spans sum to at most ``slots``
    (true for label-sorted batch and memory columns when no label has that many positives).
    """
    cols, filled = _windows.run_window(batch.pos, runs, slots)
    d_ap = jnp.where(filled, jnp.take_along_axis(d, cols, axis=1), jnp.inf)
    order = _stable_order(d_ap)
    d_ap = jnp.take_along_axis(d_ap, order, axis=1, mode="promise_in_bounds")
    filled = jnp.take_along_axis(filled, order, axis=1, mode="promise_in_bounds")
    return d_ap, filled, _row_gather(cols, order)


def _stable_order(values: jax.Array) -> jax.Array:
    """The permutation ``[b, S]`` that sorts each row of ``values`` ``[b, S]`` ascending, ties
    in index order (as a stable ``lax.sort``; ``-0.0`` and ``0.0`` count as equal, and a NaN
    row gives some in-range indices, not a permutation).

    Each entry's position is the number of entries before it (smaller, or equal at a smaller
    index), from ``O(b S^2)`` comparisons fused in chunks of ``_COMPARE_CHUNK`` (as
    :func:`_count_below`), then one ``[b, S]`` scatter: XLA's CPU sort took 11-14 ms for
    ``[1024, 128]`` slots with their indices, and 54 ms for 512 slots.
    """
    rows, n = values.shape
    index = jnp.arange(n, dtype=jnp.int32)
    mine = values[:, :, None]  # [b, S, 1]

    def before(lo, hi):  # slot j in [lo, hi) precedes slot s: [b, S, hi - lo]
        other = values[:, None, lo:hi]
        earlier = index[None, None, lo:hi] < index[None, :, None]
        return (other < mine) | ((other == mine) & earlier)

    position = _chunked_count(n, before)
    return _row_scatter(jnp.zeros((rows, n), jnp.int32), position,
                        jnp.broadcast_to(index, (rows, n)))


def _all_bucketed(d, batch, margin, runs, slots, per_distance=False):
    """``"all"`` with an anchor's positives sorted in ``slots`` slots: each negative's count
    of active thresholds by comparison, each positive's count of active negatives from a
    per-row histogram of those counts. ``O(b S W)`` comparisons, one ``[b, W]`` scatter.
    ``per_distance``: the coefficients divided by the distances
    (:func:`~dml_jax.losses._batch.over_distances`, in the coefficient pass), as
    :func:`~dml_jax.losses._batch.mined_distance_sum` takes them."""
    d_ap, filled, cols = _pack_runs(d, batch, runs, slots)
    threshold = jnp.where(filled, d_ap + margin, jnp.inf)  # sorted: d_ap is, inf last
    # below: #thresholds <= d_an, the inactive ones
    below, index = _counted_buckets(threshold, d, strict=False)
    count = jnp.sum(filled, axis=1, keepdims=True, dtype=jnp.int32)
    per_negative = jnp.where(batch.neg, count - below, 0).astype(jnp.float32)
    # Negative n is active with the j-th smallest threshold iff below[n] <= j.
    hist = _row_buckets("add", batch.neg.astype(jnp.int32), index, slots + 1, 0)
    per_positive = jnp.where(filled, jnp.cumsum(hist, axis=1)[:, :slots], 0)
    per_positive = per_positive.astype(jnp.float32)
    # The positives' entries of -per_negative are 0: the sorted slots are added there, where
    # gathering each entry's value from its offset in its run cost the pass a gather.
    n_active = jnp.sum(per_positive)
    if per_distance:
        per_negative = _batch.over_distances(per_negative, d)
        per_positive = _batch.over_distances(per_positive, d_ap)
    coef = _windows.add_at_columns(-per_negative, cols, per_positive)
    return coef, n_active


class _ChosenTerms(NamedTuple):
    """The semi-hard terms of :func:`_semi_hard_bucketed` as ``E = 2 S`` entries a row: each
    slot's positive, then its chosen negative.

    Attributes:
      cols: int32 ``[b, E]``, the entries' columns (repeated columns add up).
      coef: float32 ``[b, E]``: ``C`` there, 1 for an active term's positive and -1 for its
        negative, else 0.
      dist: float32 ``[b, E]``: ``d`` there.
      entries: int32 scalar: every entry past it is 0 in every row (2 x the most positives
        a row has).
      n_active: float32 scalar, the number of active terms.
      value: float32 scalar, ``sum(C * d)`` (over the active terms, ``d_ap - d_an``).
    """

    cols: jax.Array
    coef: jax.Array
    dist: jax.Array
    entries: jax.Array
    n_active: jax.Array
    value: jax.Array


def _semi_hard_bucketed(d, batch, margin, runs, slots):
    """``"semi_hard"`` with an anchor's positives sorted in ``slots`` slots: each negative's
    bucket (how many positives are closer), per-bucket minima (a scatter-min), the closest
    harder negative of each positive as a reverse cumulative minimum over the buckets above
    it. The chosen negative's column comes from a second scatter-min, of the columns of the
    negatives at their bucket's minimum: the first of exactly tied negatives (the farthest
    negative, for a positive with no harder one: the last), as in the sort-based path
    :func:`_semi_hard_sorted`. ``O(b S W)`` comparisons, two ``[b, W]`` scatters and one
    ``[b, W]`` gather; the terms as :class:`_ChosenTerms` (``[b, 2 S]``), no ``[b, W]``
    coefficient array."""
    width = d.shape[1]
    d_ap, filled, cols = _pack_runs(d, batch, runs, slots)
    bucket, index = _counted_buckets(d_ap, d, strict=True)  # #positives with d_ap < d_an
    neg_d = jnp.where(batch.neg, d, jnp.inf)
    bucket_min = _row_buckets("min", neg_d, index, slots + 1, jnp.inf)  # [b, S + 1]
    # Negative n is harder than the j-th closest positive iff bucket[n] > j.
    closest = jax.lax.cummin(bucket_min, axis=1, reverse=True)[:, 1:]  # [b, S]
    found = jnp.isfinite(closest)
    column = jnp.arange(width, dtype=jnp.int32)[None, :]
    is_min = batch.neg & (d == _row_gather(bucket_min, bucket))  # [b, W]
    first_at_min = _row_buckets("min", jnp.where(is_min, column, width), index, slots + 1,
                                width)  # [b, S + 1]: the first column at each bucket's min
    has_neg = batch.neg_count[:, None] > 0  # sum(neg, 1), counted from the labels

    # Only a positive with no harder negative takes the farthest negative: a few rows of a
    # random batch (each positive is its row's farthest candidate with odds 1 in W), fewer
    # in a trained one. Those rows are done one at a time.
    needs = jnp.any(filled & ~found & has_neg, axis=1)  # [b]
    farthest, last_farthest = _farthest_negatives(d, batch.neg, needs)
    d_an = jnp.where(found, closest, farthest[:, None])
    active = filled & has_neg & (d_ap - d_an + margin > 0)  # [b, S]
    # A closest value is its bucket's minimum: bucket #(d_ap < value).
    target = _searchsorted_rows(d_ap, jnp.where(found, closest, 0.0), side="left")
    neg_cols = jnp.where(found, jnp.take_along_axis(first_at_min, target, axis=1),
                         last_farthest[:, None])
    neg_cols = jnp.minimum(neg_cols, width - 1)  # in range where the term is inactive
    sign = active.astype(jnp.float32)

    def interleave(a, b):  # [b, S] each -> [b, 2 S]: slot s's positive, then its negative
        return jnp.stack([a, b], axis=2).reshape(a.shape[0], -1)

    return _ChosenTerms(
        cols=interleave(cols, neg_cols), coef=interleave(sign, -sign),
        dist=interleave(jnp.where(filled, d_ap, 0.0), d_an),
        entries=2 * jnp.max(jnp.sum(filled, axis=1, dtype=jnp.int32)),
        n_active=jnp.sum(sign), value=jnp.sum(jnp.where(active, d_ap - d_an, 0.0)),
    )


def _farthest_negatives(d, neg, needs):
    """Each row's farthest negative in ``d`` ``[b, W]`` (``neg`` ``[b, W]``), its distance
    ``[b]`` and the last column at it ``[b]``, for the rows where ``needs`` ``[b]`` (the
    others: ``-inf`` and 0): a ``[W]`` pass per such row, one at a time, up to
    :func:`_tied_row_limit` of them (else two ``[b, W]`` passes and their reductions, 4-5 ms
    at ``[1024, 9216]``)."""
    rows, width = d.shape
    column = jnp.arange(width, dtype=jnp.int32)
    count = jnp.sum(needs, dtype=jnp.int32)
    limit = _tied_row_limit(rows)

    def farthest_of(d, neg):  # over the last axis
        far = jnp.max(jnp.where(neg, d, -jnp.inf), axis=-1)
        last = jnp.max(jnp.where(neg & (d == far[..., None]), column, 0), axis=-1)
        return far, last

    def every_row(_):
        far, last = farthest_of(d, neg)
        return jnp.where(needs, far, -jnp.inf), jnp.where(needs, last, 0)

    def row_by_row(_):
        picked = jnp.nonzero(needs, size=max(limit, 1), fill_value=0)[0]

        def add_row(i, out):
            a = picked[i]
            far, last = farthest_of(d[a], neg[a])
            return out[0].at[a].set(far), out[1].at[a].set(last)

        # like `needs` (under shard_map, typed as varying across devices, as the rows are)
        start = (jnp.full_like(needs, -jnp.inf, jnp.float32), jnp.zeros_like(needs, jnp.int32))
        return jax.lax.fori_loop(0, count, add_row, start)

    return jax.lax.cond(count <= limit, row_by_row, every_row, None)


def _semi_hard_bucketed_dense(d, batch, margin, runs, slots):
    """:func:`_semi_hard_bucketed`'s terms as ``(C [b, W], n_active, sum(C * d))``, ``C`` one
    ``[b, 2 S]`` scatter into zeros."""
    terms = _semi_hard_bucketed(d, batch, margin, runs, slots)
    coef = _windows.scatter_rows(terms.coef, terms.cols, d.shape[1])
    return coef, terms.n_active, terms.value


def _semi_hard_memory(d, batch, margin, rows, memory):
    """The single-device semi-hard total with a memory, ``sum over active terms of (d_ap -
    d_an + margin)``, and its gradient for ``rows``: the bucketed miner's few terms a row
    (:func:`_semi_hard_bucketed`) reach the memory's rows by gathers
    (:func:`~dml_jax.losses._batch.sparse_mined_gradient`), where a dense coefficient array
    would take a ``[b, W] @ [W, D]`` product; the sort-based fallback's dense ``C / d`` its
    products (:func:`~dml_jax.losses._batch.mined_gradient`). ``d`` ``[b, W]`` constant;
    ``rows`` ``[B, D]``; ``memory`` ``[M, D]`` constant."""
    split = d.shape[1] - memory.shape[0]
    points = jax.lax.stop_gradient(rows)
    runs, index = _windows.run_choice(  # len(sizes) -> the fallback
        batch.row_labels, batch.row_valid, batch.col_labels, batch.col_valid, split,
        _windows.RUN_SIZES,
    )

    def with_masks(b):  # the masks as expressions of the labels inside each branch: as
        # the switch's operands they were two materialised [b, W] arrays
        pos, neg = _batch.pair_masks(b.row_labels, b.row_valid, b.row_ids, b.col_labels,
                                     b.col_valid, b.col_ids)
        return b._replace(pos=pos, neg=neg)

    def bucketed(d, b, runs, slots):
        terms = _semi_hard_bucketed(d, with_masks(b), margin, runs, slots)
        k = _batch.over_distances(terms.coef, terms.dist)
        grad = _batch.sparse_mined_gradient(k, terms.cols, terms.entries, points, memory)
        return terms.value, grad, terms.n_active

    def fallback(d, b, runs):
        coef, active = _by_row_chunks(_semi_hard_sorted, d, with_masks(b), margin)
        value, grad = _batch.mined_gradient(_batch.over_distances(coef, d), points, memory)
        return value, grad, active

    branches = [functools.partial(bucketed, slots=s) for s in _windows.RUN_SIZES]
    value, grad, active = jax.lax.switch(index, [*branches, fallback],
                                         jax.lax.stop_gradient(d),
                                         batch._replace(pos=None, neg=None), runs)
    return _batch.value_with_gradient(value, rows, grad) + margin * active


def _by_row_chunks(fallback, d, batch, margin):
    """``fallback(d, batch, margin)`` (a sort-based miner: ``(C [b, W], n_active)``, each row
    mined on its own from ``d`` and the masks) over steps of :data:`_FALLBACK_ROWS` rows
    (``lax.map``; padded rows have no pairs): the same coefficients and count, with the
    miner's sorts and searches holding ``[_FALLBACK_ROWS, W]`` temporaries instead of
    ``[b, W]``. Only ``d`` and the masks are cut into steps: a fallback must read nothing
    else of ``batch`` per row (its counts, labels and points keep all ``b`` rows). XLA sizes
    one temporary buffer for every branch of the miners' switch, so a fallback on whole rows
    made the common slotted branch's buffer several times larger (50 MB instead of 10 at
    ``B = 1024``), and on CPU a buffer past glibc's ``mmap`` threshold (32 MB) is mapped
    afresh, page by page, on every call."""
    rows, width = d.shape
    size = min(_FALLBACK_ROWS, rows)
    pad = -rows % size

    def steps(x, fill):
        return jnp.pad(x, ((0, pad), (0, 0)), constant_values=fill).reshape(-1, size, width)

    def step(chunk):
        d_c, pos_c, neg_c = chunk
        return fallback(d_c, batch._replace(pos=pos_c, neg=neg_c), margin)

    coef, active = jax.lax.map(
        step, (steps(d, 0.0), steps(batch.pos, False), steps(batch.neg, False))
    )
    return coef.reshape(-1, width)[:rows], jnp.sum(active)


def _mined_total(d, batch, margin, slotted, fallback, bucketed=None, symmetric=False,
                 mined_sum=None):
    """``sum over active terms of (d_ap - d_an + margin) = sum(C * d) + margin * n_active``.

    ``C`` and ``n_active`` come, without a memory, from ``slotted(d, batch, start, margin,
    slots)`` with the smallest slot count whose window from each row's first positive holds
    all its positives; with a memory, from ``bucketed(d, batch, margin, runs, slots)`` with
    the smallest of ``_windows.RUN_SIZES`` that holds every row's two runs of same-label
    columns (:func:`~dml_jax.losses._windows.run_choice`: batch and memory columns); else
    from ``fallback(d, batch, margin)``. The mining runs on constants: the gradient is ``C``,
    through the one ``[b, B]`` product. ``symmetric``: ``d`` is the batch against itself
    (symmetric); ``sum(C * d)`` then equals ``sum((C + C^T) / 2 * d)``, whose symmetric
    cotangent lets the distances take their one-product gradient
    (:func:`dml_jax.losses._batch.self_distances`) instead of a second, transposed product.
    The ``"all"`` slotted path builds ``C^T`` entry by entry (column thresholds, a transposed
    scatter); the others transpose ``C`` (one strided ``[B, B]`` pass).

    ``mined_sum``: ``(sq, rows, memory)`` of a single-device view with a memory (``d`` then a
    constant, ``sqrt(sq)``): the miners give ``C / d`` and the sum is
    :func:`~dml_jax.losses._batch.mined_distance_sum`'s of those, whose gradient reaches
    ``rows``. Otherwise a miner may give ``sum(C * d)`` as a third output, from its slots
    (:func:`_valued`); the others' is a ``[b, W]`` reduction.
    """
    const = jax.lax.stop_gradient(d)
    split = d.shape[1] - batch.memory.shape[0]  # the batch columns; the memory's after
    if bucketed is not None and split < d.shape[1]:
        sizes = _windows.RUN_SIZES
        runs, index = _windows.run_choice(  # len(sizes) -> the fallback
            batch.row_labels, batch.row_valid, batch.col_labels, batch.col_valid, split, sizes
        )
        if mined_sum is not None:  # the miners write C / d (only "all" comes here so)
            bucketed = functools.partial(bucketed, per_distance=True)
        branches = [lambda d, b, runs, s=s: bucketed(d, b, margin, runs, s) for s in sizes]
        where_from = runs
    else:
        where_from = _windows.first_same_label(batch)  # the first positives
        index = _windows.slot_choice(
            batch.pos, batch.pos_count, _windows.SLOT_SIZES, where_from
        )
        branches = [
            functools.partial(slotted, margin=margin, slots=s, symmetric=symmetric)
            for s in _windows.SLOT_SIZES
        ]

    def fallback_branch(d, b, where_from):
        coef, active = _by_row_chunks(fallback, d, b, margin)
        coef = _symmetrised(coef) if symmetric else coef
        return (coef if mined_sum is None else _batch.over_distances(coef, d)), active

    branches.append(fallback_branch)  # the last index
    if mined_sum is not None:
        coef, active = jax.lax.switch(index, branches, const, batch, where_from)
        return _batch.mined_distance_sum(coef, *mined_sum) + margin * active
    coef, active, value = jax.lax.switch(index, [_valued(b) for b in branches], const, batch,
                                         where_from)
    # `value`, which the miners vouch is sum(C * d), with that sum's gradient C: a miner that
    # has the sum from its [b, S] slots spares the [b, W] reduction (in-batch semi-hard at
    # B = 1024: 0.984x the step, A/B).
    return _batch.value_with_gradient(value, d, coef) + margin * active


def _valued(miner):
    """``miner`` (``(d, ...) -> (C, n_active)``, or ``(C, n_active, sum(C * d))`` for a miner
    that has the sum from its slots) as one that always gives the sum, the mined terms'
    total less their margins."""
    def run(d, *args):
        out = miner(d, *args)
        return out if len(out) == 3 else (*out, jnp.sum(out[0] * d))

    return run


def _all_triplets(d, batch, margin, symmetric=False, mined_sum=None):
    total = _mined_total(
        d, batch, margin, _all_slotted, _all_sorted, _all_bucketed, symmetric=symmetric,
        mined_sum=mined_sum,
    )
    num_triplets = jnp.sum(batch.pos_count * batch.neg_count)
    return total, num_triplets


def _semi_hard(d, batch, margin, symmetric=False, mined_sum=None):
    if mined_sum is not None:
        _, rows, memory = mined_sum  # (sq, rows, memory); the miner reads d = sqrt(sq)
        total = _semi_hard_memory(d, batch, margin, rows, memory)
    else:
        total = _mined_total(
            d, batch, margin, _semi_hard_slotted, _semi_hard_sorted,
            _semi_hard_bucketed_dense, symmetric=symmetric,
        )
    count = jnp.sum(jnp.where(batch.neg_count > 0, batch.pos_count, 0.0))
    return total, count


def _batch_hard(d, batch, margin, distance_to=None):
    valid = (batch.pos_count > 0) & (batch.neg_count > 0)
    if distance_to is not None:
        return _batch_hard_sparse(d, batch, margin, distance_to, valid)
    hardest_pos = jnp.max(jnp.where(batch.pos, d, -jnp.inf), axis=1)
    hardest_neg = jnp.min(jnp.where(batch.neg, d, jnp.inf), axis=1)
    terms = jax.nn.relu(
        jnp.where(valid, hardest_pos, 0.0) - jnp.where(valid, hardest_neg, 0.0) + margin
    )
    return _batch.masked_sum(terms, valid), jnp.sum(valid, dtype=jnp.float32)


def distance_from_dot(row_sq: jax.Array, others: jax.Array, dot: jax.Array) -> jax.Array:
    """``|x_a - y_a|`` ``[b]`` in the Gram form of the dense distances, ``|x|^2 + |y|^2 - 2 x.y``
    (so its gradient is theirs), from the rows' ``|x|^2`` ``[b]``, points ``others`` ``[b, D]``
    whose norms are the ``y``'s, and ``dot = x.y`` ``[b]``."""
    sq = row_sq + jnp.sum(others * others, axis=1) - 2.0 * dot
    return distances.safe_sqrt(jnp.maximum(sq, 0.0))


def gathered_distances(rows: jax.Array, points: jax.Array) -> DistanceTo:
    """The ``distance_to`` of plain columns: ``index [b] -> |rows[a] - points[index[a]]|``
    ``[b]`` (:func:`distance_from_dot`). ``rows`` ``[b, D]``, ``points`` ``[M, D]``; holds
    ``[b, D]``."""
    row_sq = jnp.sum(rows * rows, axis=1)

    def distance_to(index):
        other = points[index]
        return distance_from_dot(row_sq, other, jnp.sum(rows * other, axis=1))

    return distance_to


def _first_column(hit: jax.Array) -> jax.Array:
    """The first True column of each row of ``hit`` ``[b, W]``, int32 ``[b]`` (``W - 1`` for a
    row without one; :func:`~dml_jax.losses._windows.first_true`, faster on CPU than an
    argmax)."""
    return jnp.minimum(_windows.first_true(hit), hit.shape[1] - 1)


def _batch_hard_sparse(d, batch, margin, distance_to, valid):
    """Batch-hard whose gradient reaches only the two chosen columns of each anchor.

    The mining runs on the dense ``d`` as constants; the value is the dense one. Its gradient
    is that of ``d(x_a, x_p) - d(x_a, x_n)`` for the hardest positive and negative, recomputed
    by ``distance_to`` from the gathered points (``[b, D]`` work), so no ``[b, W]`` gradient or
    product is formed: the Gram matrix's backward is skipped. At exact ties the gradient goes
    to the first hardest column (as pytorch-metric-learning's ``BatchHardMiner``'s index),
    where autodiff of a max would split it among the tied columns: both are subgradients.
    """
    const = jax.lax.stop_gradient(d)
    pos_d = jnp.where(batch.pos, const, -jnp.inf)
    neg_d = jnp.where(batch.neg, const, jnp.inf)
    hardest_pos = jnp.max(pos_d, axis=1)
    hardest_neg = jnp.min(neg_d, axis=1)
    terms = jnp.where(valid, hardest_pos - hardest_neg + margin, 0.0)
    active = valid & (terms > 0)  # relu'(0) = 0, as jax.nn.relu
    p = _first_column(pos_d == hardest_pos[:, None])
    n = _first_column(neg_d == hardest_neg[:, None])
    moving = distance_to(p) - distance_to(n)  # value ~0 after the subtraction below
    gradient_only = jnp.where(active, moving - jax.lax.stop_gradient(moving), 0.0)
    total = _batch.masked_sum(jnp.maximum(terms, 0.0), valid) + jnp.sum(gradient_only)
    return total, jnp.sum(valid, dtype=jnp.float32)


MINERS = {"all": _all_triplets, "batch_hard": _batch_hard, "semi_hard": _semi_hard}


def triplet_from_distances(
    d: jax.Array,
    batch: _batch.PairBatch,
    *,
    margin: float,
    mining: str,
    axis_name: str | None,
    distance_to: DistanceTo | None = None,
    symmetric: bool = False,
) -> jax.Array:
    """The triplet loss from distances ``d`` ``[b, M]`` and the view's ``pos``/``neg``
    ``[b, M]`` masks: the global mean of the ``mining`` rule's terms. ``symmetric``: ``d`` is a
    symmetric ``[B, B]`` (the batch against itself, symmetric masks) and takes a symmetric
    cotangent (``"all"``, ``"semi_hard"``; see :func:`_mined_total`).

    Exact for any column order; the ``"all"`` and ``"semi_hard"`` miners are fastest when
    each row's positive columns are close together (``pair_batch(sort_by_label=True)``).
    ``distance_to``: ``index [b] -> d[a, index[a]]`` ``[b]`` recomputed from the points behind
    those columns, with the dense ``d``'s gradient (e.g. :func:`gathered_distances`); given,
    ``"batch_hard"`` differentiates only the chosen pairs (see :func:`_batch_hard_sparse`).
    """
    if mining == "batch_hard":
        total, count = _batch_hard(d, batch, margin, distance_to)
    else:
        total, count = MINERS[mining](d, batch, margin, symmetric)
    return _batch.global_mean(total, count, axis_name)


@functools.partial(jax.jit, static_argnames=("mining", "axis_name"))
@_checks.propagate_nonfinite()
def triplet_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    margin: float = 0.2,
    mining: str = "all",
    memory: XBMState | None = None,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Triplet margin loss ``relu(d_ap - d_an + margin)`` with in-batch mining.

    * ``"all"``: mean over every valid triplet ``(a, p, n)`` (``a != p`` same label, ``n``
      another label) of ``relu(d_ap - d_an + margin)``.
    * ``"batch_hard"`` (Hermans et al. 2017): per anchor with at least one positive and one
      negative, ``relu(max_p d_ap - min_n d_an + margin)``; mean over those anchors. Only
      the chosen pairs are differentiated (no ``[B, B]`` backward); at an exact tie the
      gradient goes to the first tied column.
    * ``"semi_hard"`` (Schroff et al. 2015): per positive pair ``(a, p)`` whose anchor has a
      negative, ``n*`` is the closest negative with ``d_an > d_ap``, or the farthest negative if
      none is; ``relu(d_ap - d_an* + margin)``, mean over those pairs.

    A loss with no valid term is 0. Distances are Euclidean, not squared; no normalisation.

    Args:
      embeddings: float ``[B, D]`` (float32 or bfloat16; arithmetic in float32).
      labels: int ``[B]``.
      margin: the margin. Default 0.2.
      mining: ``"all"`` (default), ``"batch_hard"`` or ``"semi_hard"``.
      memory: optional cross-batch memory (:class:`~dml_jax.losses.XBMState`, ``M`` slots):
        its valid rows join every anchor's candidate positives and negatives (no gradient);
        None (default) is the plain loss.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis; mining then sees the global batch (see
        :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` (with ``memory``: ``[b, B + M]``) matrices
      per device, never ``[B, B, B]``.

    References:
      Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015; Hermans, Beyer, Leibe, "In Defense
      of the Triplet Loss for Person Re-Identification", arXiv 1703.07737.
    """
    _checks.check_choice(mining, "mining", MINING)
    batch = _batch.pair_batch(
        embeddings, labels, where, axis_name, sort_by_label=mining != "batch_hard"
    )
    batch = with_memory(batch, memory, sort_by_label=mining != "batch_hard")
    return triplet_of_view(batch, margin=margin, mining=mining, axis_name=axis_name)


def triplet_of_view(batch: _batch.PairBatch, *, margin: float, mining: str,
                    axis_name: str | None) -> jax.Array:
    """:func:`triplet_loss` of a pair view (:func:`~dml_jax.losses._batch.pair_batch`, with a
    memory appended or not): the distances, then :func:`triplet_from_distances`.

    Without ``axis_name`` the columns are the rows: ``"all"`` and ``"semi_hard"`` then take a
    symmetric cotangent (see :func:`_mined_total`), or, with a memory, their miners write the
    coefficients over the distances and :func:`~dml_jax.losses._batch.mined_distance_sum`
    sums them (no ``[b, B + M]`` pass for the value or for the distances' cotangent).
    """
    mined = mining != "batch_hard"
    has_memory = batch.memory.shape[0] > 0
    if mined and has_memory and axis_name is None:
        rows, memory = batch.rows, batch.memory  # the columns are the rows
        sq = jax.lax.stop_gradient(
            _batch.augmented_squared_distances(rows, rows, memory)
        )
        total, count = MINERS[mining](distances.safe_sqrt(sq), batch, margin,
                                      mined_sum=(sq, rows, memory))
        return _batch.global_mean(total, count, axis_name)
    points = batch.cols
    if has_memory:
        points = jnp.concatenate([points, batch.memory])
    symmetric = axis_name is None and not has_memory and mined
    d = _batch.distances_of(batch, axis_name, symmetric=symmetric)
    return triplet_from_distances(
        d, batch, margin=margin, mining=mining, axis_name=axis_name,
        distance_to=gathered_distances(batch.rows, points), symmetric=symmetric,
    )
