"""Each row's positive columns as one window of a static size: the slotted paths of the
triplet miners, the lifted structured loss, the ranked list loss and OSM + CAA.

With columns ordered by label (``pair_batch(sort_by_label=True)``) or a class-balanced batch's
own order, a row's positives are one run of columns. The window of ``S`` columns from the
row's first positive then holds all of them whenever the batch's classes are small, and a
loss can do its per-positive work on ``[b, S]`` slots instead of on the whole ``[b, W]`` row.
:func:`slot_choice` picks the smallest of :data:`SLOT_SIZES` that holds every row's positives
(a loss falls back to its dense form when none does), :func:`window` gives the slots' columns,
and :func:`add_at_columns` / :func:`scatter_rows` put per-slot values back at those columns.

A row's positives can also be found from the labels alone, without a pass over the mask:
with label-ordered columns they are the row's run of its label among the batch columns and,
with a cross-batch memory ordered by label too, a second run among the memory's.
:func:`label_runs` finds both by binary search in the sorted labels (the memory's run is
empty without one), :func:`run_choice` picks the smallest of the given sizes
(:data:`SLOT_SIZES` without a memory, :data:`RUN_SIZES` with one) that holds both runs of
every row, and :func:`run_window` gives their columns as ``[b, S]`` slots;
:func:`first_same_label` gives the first positive of each row for :func:`slot_choice`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Static window sizes a slotted path is compiled for (one branch each, plus a fallback).
SLOT_SIZES = (2, 8, 32)
# Static bounds on a row's two runs of positives (batch and memory columns), likewise.
RUN_SIZES = (128, 512)


class Runs(NamedTuple):
    """Each row's runs of same-label columns, int32 ``[b]``: ``first_batch``, ``span_batch``
    among the batch columns, ``first_memory``, ``span_memory`` among the memory's (a span is
    0 for an invalid row; the batch run may hold the row itself, which is no positive)."""

    first_batch: jax.Array
    span_batch: jax.Array
    first_memory: jax.Array
    span_memory: jax.Array


def window(pos: jax.Array, start: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """The ``slots`` columns from each row's ``start``: ``(cols [b, S]`` clipped to the last
    column, ``filled [b, S]``: inside the row and positive``)`` of the mask ``pos``
    ``[b, W]``."""
    width = pos.shape[1]
    cols = start[:, None] + jnp.arange(slots, dtype=jnp.int32)[None, :]
    inside = cols < width
    cols = jnp.minimum(cols, width - 1)
    return cols, inside & jnp.take_along_axis(pos, cols, axis=1)


def first_true(mask: jax.Array) -> jax.Array:
    """Each row's first True column of ``mask`` ``[b, W]``, int32 ``[b]`` (``W`` without
    one): a min-reduction of column indices over the mask (argmax's variadic reduction runs
    scalar on XLA's CPU backend)."""
    width = mask.shape[1]
    return jnp.min(jnp.where(mask, jnp.arange(width, dtype=jnp.int32)[None, :], width), axis=1)


def first_positive(pos: jax.Array) -> jax.Array:
    """Each row's first positive column in the mask ``pos`` ``[b, W]``, int32 ``[b]`` (0
    without one, as argmax): :func:`first_true`."""
    first = first_true(pos)
    return jnp.where(first < pos.shape[1], first, 0)


def first_same_label(batch) -> jax.Array:
    """:func:`first_positive` of ``batch.pos`` ``[b, W]`` for a
    :class:`~dml_jax.losses._batch.PairBatch` without a memory, whose positives are the
    same-label valid columns other than the row itself (``row_ids != col_ids``), without the
    ``[b, W]`` pass when the columns are ordered by label (invalid ones last, as
    ``pair_batch(sort_by_label=True)`` leaves them): each row's label run then starts where
    :func:`label_runs` finds it, and its first positive is that column, or the next one where
    the row itself comes first. ``O((b + W) log W)`` work; other column orders take the
    mask's pass (one ``lax.cond``).

    The slotted paths check that a window holds every positive (:func:`slot_choice`), so a
    start that is not the first positive (a valid label equal to int32's largest, which
    sorts among the invalid columns) costs speed, never exactness.
    """
    width = batch.pos.shape[1]
    runs, ordered = label_runs(
        batch.row_labels, batch.row_valid, batch.col_labels, batch.col_valid, width
    )

    def searched(pos):
        del pos
        run = runs.first_batch  # in [0, W) for a row with positives (its run is not empty)
        self_first = (batch.col_ids[run] == batch.row_ids).astype(jnp.int32)
        return jnp.where(batch.pos_count > 0, jnp.minimum(run + self_first, width - 1), 0)

    return jax.lax.cond(ordered, searched, first_positive, batch.pos)


def slot_choice(
    pos: jax.Array, pos_count: jax.Array, sizes: tuple[int, ...], start: jax.Array
) -> jax.Array:
    """The index of the smallest of ``sizes`` (ascending) whose window ``[start, start + S)``
    from each row's ``start`` ``[b]`` (its first positive column, :func:`first_positive` or
    :func:`first_same_label`; any column at or before it is exact) holds every row's positives
    (``len(sizes)`` when none does).

    A window holds a row's positives iff it holds ``pos_count`` of them (``sum(pos, 1)``,
    ``[b]``), so the start and a ``[b, max(sizes)]`` gather decide, instead of the span
    between each row's first and last positive (a second reduction over the mask).
    """
    _, hits = window(pos, start, max(sizes))
    within = jnp.pad(  # [b, max + 1]: column s holds the positives in [start, start + s)
        jnp.cumsum(hits, axis=1, dtype=jnp.int32), ((0, 0), (1, 0))
    )
    count = pos_count.astype(jnp.int32)
    fits = jnp.stack([jnp.all(within[:, size] == count) for size in sizes])
    return jnp.argmax(jnp.append(fits, True)).astype(jnp.int32)


def add_at_columns(dense: jax.Array, cols: jax.Array, values: jax.Array) -> jax.Array:
    """``dense`` ``[b, W]`` plus ``values[a, s]`` at ``[a, cols[a, s]]`` (in-range int32
    ``[b, S]`` columns; repeated ones add up): one ``[b, S]`` scatter-add into ``dense``'s
    buffer. Two-index: a flat scatter would make the fusion writing ``dense`` produce it flat,
    and on XLA's CPU backend that fusion then recovers each entry's row and column by
    division (a coefficient pass went from 0.8 to 2.5 ms at ``[1024, 1024]``)."""
    row = jnp.arange(dense.shape[0], dtype=jnp.int32)[:, None]
    return dense.at[row, cols].add(values, mode="promise_in_bounds")


def scatter_rows(values: jax.Array, cols: jax.Array, width: int) -> jax.Array:
    """``out[a, cols[a, s]] += values[a, s]``: ``[b, S]`` -> ``[b, width]`` (in-range ``cols``)."""
    return add_at_columns(jnp.zeros((values.shape[0], width), jnp.float32), cols, values)


def no_runs(rows: int) -> tuple[Runs, jax.Array]:
    """Empty :class:`Runs` for ``rows`` rows and the index 0, which with no window sizes
    selects the dense form in :func:`on_windows`."""
    zeros = jnp.zeros((rows,), jnp.int32)
    return Runs(zeros, zeros, zeros, zeros), jnp.zeros((), jnp.int32)


def on_windows(index: jax.Array, sizes: tuple[int, ...], windowed: Callable, dense: Callable,
               *operands):
    """``windowed(*operands, slots=sizes[index])``, or ``dense(*operands)`` when ``index ==
    len(sizes)``: one ``lax.switch`` (both return the same shapes)."""
    branches = [functools.partial(windowed, slots=s) for s in sizes]
    branches.append(dense)  # the last index
    return jax.lax.switch(index, branches, *operands)


def label_runs(row_labels, row_valid, col_labels, col_valid, split) -> tuple[Runs, jax.Array]:
    """Each row's :class:`Runs` among the label-sorted batch columns ``[0, split)`` and memory
    columns ``[split, W)`` (no ``[b, W]`` pass), and ``ordered``, a bool scalar: both parts'
    valid labels are sorted (invalid columns last), so every positive of a row lies in its
    runs. Rows: labels and validity ``[b]``; columns: ``[W]``. ``O((b + W) log W)`` work,
    where scanning the ``[b, W]`` mask for each row's first and last positive took three
    passes over it."""
    top = jnp.iinfo(jnp.int32).max
    key = jnp.where(col_valid, col_labels, top)

    def run(part, offset):
        lo = jnp.searchsorted(part, row_labels, side="left").astype(jnp.int32)
        hi = jnp.searchsorted(part, row_labels, side="right").astype(jnp.int32)
        span = jnp.where(row_valid, hi - lo, 0)
        return offset + jnp.where(span > 0, lo, 0), span, jnp.all(part[1:] >= part[:-1])

    first_b, span_b, sorted_b = run(key[:split], 0)
    first_m, span_m, sorted_m = run(key[split:], split)
    return Runs(first_b, span_b, first_m, span_m), sorted_b & sorted_m


def run_choice(
    row_labels, row_valid, col_labels, col_valid, split, sizes: tuple[int, ...]
) -> tuple[Runs, jax.Array]:
    """:func:`label_runs` and the index of the smallest of ``sizes`` (ascending) that holds
    every row's two runs (``len(sizes)`` when none does, or the columns are not sorted)."""
    runs, ordered = label_runs(row_labels, row_valid, col_labels, col_valid, split)
    need = jnp.searchsorted(jnp.asarray(sizes), jnp.max(runs.span_batch + runs.span_memory))
    return runs, jnp.where(ordered, need, len(sizes)).astype(jnp.int32)


def run_window(pos: jax.Array, runs: Runs, slots: int) -> tuple[jax.Array, jax.Array]:
    """Each row's two runs as ``slots`` slots, the batch run's columns first: ``(cols [b, S]``
    (the slots past both runs clipped to the last column), ``filled [b, S]``: inside a run and
    positive in ``pos`` ``[b, W]``). The runs' spans must sum to at most ``slots``."""
    width = pos.shape[1]
    slot = jnp.arange(slots, dtype=jnp.int32)[None, :]
    span_b = runs.span_batch[:, None]
    cols = jnp.where(slot < span_b, runs.first_batch[:, None] + slot,
                     runs.first_memory[:, None] + slot - span_b)
    cols = jnp.clip(cols, 0, width - 1)
    inside = slot < span_b + runs.span_memory[:, None]
    return cols, inside & jnp.take_along_axis(pos, cols, axis=1)
