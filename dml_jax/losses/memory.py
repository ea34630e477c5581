"""Cross-batch memory (XBM; Wang, Zhang, Huang & Scott, "Cross-Batch Memory for Embedding
Learning", CVPR 2020).

A ring buffer of past embeddings and their labels, held as a pytree (:class:`XBMState`) and
updated functionally by :func:`xbm_update`. The pair losses that accept ``memory=``
(``contrastive_loss``, ``triplet_loss``, ``multi_similarity_loss``, ``ranked_list_loss``) then
compare their anchors, the batch rows, against the batch columns (``j != i``) *and* the memory's
valid rows: :func:`with_memory` appends those rows to the loss's pair view as constant columns,
and the loss's own core runs unchanged on the wider ``[b, B + M]`` view (see
``docs/losses.md``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dml_jax import _checks, parallel
from dml_jax.losses import _batch


class XBMState(NamedTuple):
    """A cross-batch memory of ``M`` slots of dimension ``D`` (a pytree).

    Attributes:
      embeddings: float32 ``[M, D]``; rows whose ``valid`` is False hold nothing meaningful.
      labels: int32 ``[M]``.
      valid: bool ``[M]``: slot written at least once.
      next: int32 ``[]``: the slot the next enqueued row goes to (the oldest entry once full).
    """

    embeddings: jax.Array
    labels: jax.Array
    valid: jax.Array
    next: jax.Array


def xbm_init(size: int, dim: int) -> XBMState:
    """An empty memory of ``size`` slots (``M``) of ``dim`` (``D``) floats.

    Memory: ``M * (4 D + 5)`` bytes.

    Raises:
      ValueError: ``size`` or ``dim`` is not a positive integer.
    """
    for name, value in (("size", size), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer; got {value!r}.")
    return XBMState(
        embeddings=jnp.zeros((size, dim), jnp.float32),
        labels=jnp.zeros((size,), jnp.int32),
        valid=jnp.zeros((size,), jnp.bool_),
        next=jnp.zeros((), jnp.int32),
    )


def check_memory(memory: XBMState, dim: int | None = None) -> XBMState:
    """Validates a memory (and its width against ``dim``); returns it with canonical dtypes.

    Raises:
      ValueError: naming the field and its shape or dtype when ``memory`` is not an
        :class:`XBMState` of ``embeddings`` float ``[M, D]``, ``labels`` int ``[M]``, ``valid``
        bool ``[M]`` and a scalar ``next``, or when ``D != dim``.
    """
    if not isinstance(memory, XBMState):
        raise ValueError(
            f"`memory` must be an XBMState (from xbm_init); got {type(memory).__name__}."
        )
    e, labels, valid, nxt = (jnp.asarray(x) for x in memory)
    if e.ndim != 2 or not jnp.issubdtype(e.dtype, jnp.floating):
        raise ValueError(
            f"`memory.embeddings` must be a float [M, D] array; got {e.dtype} {e.shape}."
        )
    size = e.shape[0]
    if labels.shape != (size,) or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(
            f"`memory.labels` must be an int [{size}] array; got {labels.dtype} {labels.shape}."
        )
    if valid.shape != (size,) or valid.dtype != jnp.bool_:
        raise ValueError(
            f"`memory.valid` must be a bool [{size}] array; got {valid.dtype} {valid.shape}."
        )
    if nxt.shape != () or not jnp.issubdtype(nxt.dtype, jnp.integer):
        raise ValueError(f"`memory.next` must be an int scalar; got {nxt.dtype} {nxt.shape}.")
    if dim is not None and e.shape[1] != dim:
        raise ValueError(
            f"`memory.embeddings` has shape {e.shape} but the embeddings have {dim} columns: "
            "the memory must hold embeddings of the same dimension."
        )
    return XBMState(e.astype(jnp.float32), labels.astype(jnp.int32), valid,
                    nxt.astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("axis_name",))
def xbm_update(
    state: XBMState,
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> XBMState:
    """Enqueues the global batch into the memory, overwriting the oldest entries first.

    The rows whose ``where`` is True are written in global row order (all devices' shards
    concatenated in device order under ``axis_name``, so the memory stays replicated), as
    constants (``stop_gradient``), to slots ``next, next + 1, ...`` modulo ``M``; rows with
    ``where`` False are skipped (the others close up). A batch of more than ``M`` such rows
    keeps its last ``M``. The valid entries are always the last ``min(M, n)`` rows enqueued.

    Args:
      state: the memory (``M`` slots of ``D`` floats).
      embeddings: float ``[B, D]`` (this device's ``[b, D]`` shard under ``axis_name``).
      labels: int ``[B]``.
      where: optional bool ``[B]``; False rows are not enqueued.
      axis_name: mesh/pmap axis: every device then enqueues the gathered global batch.

    Returns:
      The new :class:`XBMState`, equal on every device (typed replicated under
      ``shard_map(check_vma=True)``, which costs one all-reduce of the state). Memory: the
      state plus the gathered ``[B, D]`` batch.
    """
    state = check_memory(state)
    size, dim = state.embeddings.shape
    rows, row_labels, row_valid = _checks.check_embeddings_labels(embeddings, labels, where)
    if rows.shape[1] != dim:
        raise ValueError(
            f"`embeddings` has shape {rows.shape} but the memory holds {dim}-d rows "
            f"(memory.embeddings {state.embeddings.shape})."
        )
    rows = jax.lax.stop_gradient(parallel.all_gather_rows(rows, axis_name))
    row_labels = parallel.all_gather_rows(row_labels, axis_name)
    row_valid = parallel.all_gather_rows(row_valid, axis_name)
    rank = jnp.cumsum(row_valid.astype(jnp.int32)) - 1  # position among the enqueued rows
    count = jnp.sum(row_valid.astype(jnp.int32))
    kept = row_valid & (rank >= count - size)  # the last min(M, count) enqueued rows
    slot = jnp.where(kept, (state.next + rank) % size, size)  # `size`: dropped
    new = XBMState(
        embeddings=state.embeddings.at[slot].set(rows, mode="drop"),
        labels=state.labels.at[slot].set(row_labels, mode="drop"),
        valid=state.valid.at[slot].set(True, mode="drop"),
        next=((state.next + count) % size).astype(jnp.int32),
    )
    return XBMState(*(parallel.as_replicated(x, axis_name) for x in new))


def with_memory(
    batch: _batch.PairBatch, memory: XBMState | None, *, sort_by_label: bool = False
) -> _batch.PairBatch:
    """The pair view of ``batch`` widened by the memory's rows (``batch`` itself when None).

    The memory's valid rows become ``M`` constant columns after the batch's ``B``
    (``[b, B + M]`` masks); its invalid rows take no part whatever they hold. With
    ``sort_by_label`` the memory columns are ordered by label (invalid rows last; stable), so
    each anchor's memory positives are one run of columns; only the order of the constant
    columns changes (an ``[M, D]`` gather), never a sum over them.
    """
    if memory is None:
        return batch
    memory = check_memory(memory, batch.rows.shape[1])
    labels, valid = memory.labels, memory.valid
    # Masked before the reordering: the same expression as the non-finite guard's, which XLA
    # then computes once for both.
    cols = jax.lax.stop_gradient(_checks.mask_rows(memory.embeddings, valid))
    if sort_by_label:
        order = _batch.label_order(labels, valid)
        cols, labels, valid = cols[order], labels[order], valid[order]
    return _batch.append_memory(batch, cols, labels, valid, presorted=sort_by_label)
