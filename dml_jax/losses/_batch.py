"""The pair view of a batch that every loss of :mod:`dml_jax.losses` works on.

A loss sees its *local rows* (anchors, ``[b, D]``) against the *global columns* (``[B, D]``):
without ``axis_name`` both are the whole batch; inside ``shard_map``/``pmap`` the rows are this
device's shard and the columns the gathered global batch (see :mod:`dml_jax.parallel`). Every
mask excludes the diagonal (``i == j`` by global index) and rows or columns whose ``where`` is
False, so padding takes no part at all.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dml_jax import _checks, distances, parallel

# Stand-in for -inf in masked log-sum-exps: finite, so masked terms never produce NaN gradients.
NEG_LARGE = -1e30


class PairBatch(NamedTuple):
    """Local rows against global columns. ``b`` local rows, ``B`` global columns.

    Attributes:
      rows: float32 ``[b, D]`` local embeddings (anchors).
      cols: float32 ``[B, D]`` global embeddings.
      row_labels: int32 ``[b]``.
      col_labels: int32 ``[B]``.
      row_valid: bool ``[b]`` (``where`` of the local rows).
      col_valid: bool ``[B]``.
      pos: bool ``[b, B]``: same label, ``i != j``, both valid.
      neg: bool ``[b, B]``: different label, both valid.
      row_ids: int32 ``[b]`` global index of each local row.
    """

    rows: jax.Array
    cols: jax.Array
    row_labels: jax.Array
    col_labels: jax.Array
    row_valid: jax.Array
    col_valid: jax.Array
    pos: jax.Array
    neg: jax.Array
    row_ids: jax.Array


def pair_batch(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    where: jax.typing.ArrayLike | None,
    axis_name: str | None,
) -> PairBatch:
    """Validates the inputs and builds the :class:`PairBatch` (holds two ``[b, B]`` masks)."""
    rows, row_labels, row_valid = _checks.check_embeddings_labels(embeddings, labels, where)
    cols = parallel.all_gather_rows(rows, axis_name)
    col_labels = parallel.all_gather_rows(row_labels, axis_name)
    col_valid = parallel.all_gather_rows(row_valid, axis_name)
    b = rows.shape[0]
    row_ids = parallel.row_offset(b, axis_name) + jnp.arange(b, dtype=jnp.int32)
    not_self = row_ids[:, None] != jnp.arange(cols.shape[0], dtype=jnp.int32)[None, :]
    both_valid = row_valid[:, None] & col_valid[None, :]
    same = distances.same_label_mask(row_labels, col_labels)
    return PairBatch(
        rows=rows,
        cols=cols,
        row_labels=row_labels,
        col_labels=col_labels,
        row_valid=row_valid,
        col_valid=col_valid,
        pos=same & not_self & both_valid,
        neg=~same & both_valid,
        row_ids=row_ids,
    )


def append_columns(
    batch: PairBatch, cols: jax.Array, labels: jax.Array, valid: jax.Array
) -> PairBatch:
    """``batch`` with ``M`` extra columns after its ``B`` columns (e.g. a cross-batch memory).

    The extra columns are no row of the batch (no diagonal): against local row ``i`` column
    ``k`` is positive when the labels match and both are valid, negative when they differ and
    both are valid. Every loss core then runs unchanged on the ``[b, B + M]`` view.

    Args:
      batch: the batch's :class:`PairBatch` (``[b, B]`` masks).
      cols: float32 ``[M, D]`` (invalid rows already zeroed; pass constants for no gradient).
      labels: int32 ``[M]``.
      valid: bool ``[M]``.

    Returns:
      The widened :class:`PairBatch` (``[b, B + M]`` masks; rows unchanged).
    """
    same = distances.same_label_mask(batch.row_labels, labels)
    both_valid = batch.row_valid[:, None] & valid[None, :]
    return batch._replace(
        cols=jnp.concatenate([batch.cols, cols], axis=0),
        col_labels=jnp.concatenate([batch.col_labels, labels], axis=0),
        col_valid=jnp.concatenate([batch.col_valid, valid], axis=0),
        pos=jnp.concatenate([batch.pos, same & both_valid], axis=1),
        neg=jnp.concatenate([batch.neg, ~same & both_valid], axis=1),
    )


def distances_of(batch: PairBatch) -> jax.Array:
    """Euclidean distances of the local rows to the global columns, float32 ``[b, B]``."""
    return distances.pairwise_distances(batch.rows, batch.cols)


def global_mean(total: jax.Array, count: jax.Array, axis_name: str | None) -> jax.Array:
    """``sum over devices of total / sum over devices of count``; 0 when the count is 0.

    ``total`` is a float scalar carrying the gradient; ``count`` a scalar without one: a number
    of terms, or a sum of (constant) weights, which may lie below 1.
    """
    total = parallel.global_sum(total, axis_name)
    count = parallel.global_count(jnp.asarray(count, jnp.float32), axis_name)
    positive = count > 0
    return jnp.where(positive, total / jnp.where(positive, count, 1.0), 0.0)


def masked_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum of ``values`` where ``mask`` (masked entries may hold inf/NaN: they are dropped)."""
    return jnp.sum(jnp.where(mask, values, 0.0))


def masked_logsumexp(values: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """Log-sum-exp over the masked entries along ``axis``; ``NEG_LARGE`` where none is."""
    x = jnp.where(mask, values, NEG_LARGE)
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(m > NEG_LARGE / 2, m, 0.0))
    s = jnp.sum(jnp.where(mask, jnp.exp(x - m), 0.0), axis=axis)
    any_ = jnp.any(mask, axis=axis)
    return jnp.where(any_, jnp.log(jnp.where(any_, s, 1.0)) + jnp.squeeze(m, axis), NEG_LARGE)


def softplus_of_lse(lse: jax.Array) -> jax.Array:
    """``log(1 + exp(lse))``, exactly 0 (with zero gradient) where ``lse`` is ``NEG_LARGE``."""
    return jnp.where(lse > NEG_LARGE / 2, jnp.logaddexp(0.0, lse), 0.0)
