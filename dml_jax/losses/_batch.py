"""The pair view of a batch that every loss of :mod:`dml_jax.losses` works on.

A loss sees its *local rows* (anchors, ``[b, D]``) against the *global columns* (``[B, D]``):
without ``axis_name`` both are the whole batch; inside ``shard_map``/``pmap`` the rows are this
device's shard and the columns the gathered global batch (see :mod:`dml_jax.parallel`). A
cross-batch memory adds ``M`` constant columns after the ``B`` (:func:`append_memory`). Every
mask excludes the diagonal (``i == j`` by global index) and rows or columns whose ``where`` is
False, so padding takes no part at all.

The similarities of the view come from one place, :func:`gram`. Its gradient takes one
``[b, M] @ [M, D]`` product for the memory columns (constants: none for them) and, without
``axis_name``, where the rows *are* the batch columns, one product ``(G' + G'^T) x`` for the
``[B, B]`` block (:func:`transpose_sum`), or ``2 G' x`` for a loss whose gradient is symmetric
(see :func:`self_gram`).
"""

from __future__ import annotations

import functools
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
      col_ids: int32 ``[B]`` global index of each column (-1 for a memory column).
      memory: float32 ``[M, D]`` constant columns after the ``B`` batch columns (a
        cross-batch memory; ``M = 0`` without one). ``pos``/``neg``/``col_labels``/``col_ids``/
        ``col_valid`` then span all ``B + M`` columns.
      pos_count: float32 ``[b]``: each row's number of positive columns (``sum(pos, 1)``),
        counted from the sorted labels, not from the ``[b, W]`` mask.
      neg_count: float32 ``[b]``: each row's number of negative columns (``sum(neg, 1)``).
      row_order: int32 ``[b]``: each local row's index among the caller's rows (the order
        ``pair_batch(sort_by_label=True)`` gives them without ``axis_name``; ``arange(b)``
        otherwise), to bring per-row inputs (logits) into the rows' order.
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
    col_ids: jax.Array
    memory: jax.Array
    pos_count: jax.Array
    neg_count: jax.Array
    row_order: jax.Array


def pair_batch(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    where: jax.typing.ArrayLike | None,
    axis_name: str | None,
    *,
    sort_by_label: bool = False,
) -> PairBatch:
    """Validates the inputs and builds the :class:`PairBatch` (holds two ``[b, B]`` masks).

    With ``sort_by_label`` the columns are ordered by label (invalid rows last; stable), so
    each anchor's positives are one run of columns. Only the order changes, never a sum over
    the columns. Without ``axis_name`` the rows, which are the columns, take the same order
    (so :func:`gram` still sees one matrix) and ``row_ids`` are positions in that order.
    """
    rows, row_labels, row_valid = _checks.check_embeddings_labels(embeddings, labels, where)
    row_order = jnp.arange(rows.shape[0], dtype=jnp.int32)
    if sort_by_label and axis_name is None:
        row_order = label_order(row_labels, row_valid).astype(jnp.int32)
        rows = permute_rows(rows, row_order)
        row_labels, row_valid = row_labels[row_order], row_valid[row_order]
    cols = parallel.all_gather_rows(rows, axis_name)
    col_labels = parallel.all_gather_rows(row_labels, axis_name)
    col_valid = parallel.all_gather_rows(row_valid, axis_name)
    col_ids = jnp.arange(cols.shape[0], dtype=jnp.int32)
    if sort_by_label and axis_name is not None:
        order = label_order(col_labels, col_valid)
        cols, col_labels, col_valid = cols[order], col_labels[order], col_valid[order]
        col_ids = order
    b = rows.shape[0]
    row_ids = parallel.row_offset(b, axis_name) + jnp.arange(b, dtype=jnp.int32)
    pos, neg = pair_masks(row_labels, row_valid, row_ids, col_labels, col_valid, col_ids)
    # Ordered by label, the columns' keys are already sorted (invalid ones last).
    same_label_count = label_counts(
        row_labels, col_labels, col_valid, presorted=sort_by_label and axis_name is None
    )
    return PairBatch(
        rows=rows,
        cols=cols,
        row_labels=row_labels,
        col_labels=col_labels,
        row_valid=row_valid,
        col_valid=col_valid,
        pos=pos,
        neg=neg,
        row_ids=row_ids,
        col_ids=col_ids,
        memory=jnp.zeros((0, rows.shape[1]), jnp.float32),
        pos_count=jnp.where(row_valid, same_label_count - 1, 0).astype(jnp.float32),
        neg_count=jnp.where(
            row_valid, jnp.sum(col_valid, dtype=jnp.int32) - same_label_count, 0
        ).astype(jnp.float32),
        row_order=row_order,
    )


def pair_masks(
    row_labels: jax.Array, row_valid: jax.Array, row_ids: jax.Array,
    col_labels: jax.Array, col_valid: jax.Array, col_ids: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """``(pos, neg)`` bool ``[b, W]`` of rows ``[b]`` against columns ``[W]``: same label and
    not the same sample (``row_ids != col_ids``), different label; both valid.

    One elementwise expression of the ``[b]`` and ``[W]`` vectors, which XLA fuses into the
    loss's passes instead of materialising the masks (a concatenation of two mask blocks
    would be a copy of its own).
    """
    both_valid = row_valid[:, None] & col_valid[None, :]
    same = distances.same_label_mask(row_labels, col_labels)
    not_self = row_ids[:, None] != col_ids[None, :]
    return same & not_self & both_valid, ~same & both_valid


def label_counts(
    queries: jax.Array, labels: jax.Array, valid: jax.Array, *, presorted: bool = False
) -> jax.Array:
    """For each query label ``[b]``, how many valid ``labels`` ``[M]`` equal it: int32 ``[b]``.

    One ``[M]`` sort and two binary searches per query (``O((M + b) log M)``), where counting
    a ``[b, M]`` mask costs a full pass over it. ``presorted``: the caller vouches that the
    valid labels come first and ascending (as :func:`label_order` leaves them), so the sort
    is skipped.
    """
    top = jnp.iinfo(jnp.int32).max
    keys = jnp.where(valid, labels, top)
    ordered = keys if presorted else jnp.sort(keys)
    num_valid = jnp.sum(valid, dtype=jnp.int32)
    below = jnp.minimum(jnp.searchsorted(ordered, queries, side="left"), num_valid)
    upto = jnp.minimum(jnp.searchsorted(ordered, queries, side="right"), num_valid)
    return (upto - below).astype(jnp.int32)


def label_order(labels: jax.Array, valid: jax.Array) -> jax.Array:
    """The stable order of ``labels`` ``[B]`` with the invalid rows last, int ``[B]``."""
    return jnp.argsort(jnp.where(valid, labels, jnp.iinfo(jnp.int32).max), stable=True)


@jax.custom_vjp
def permute_rows(x: jax.Array, order: jax.Array) -> jax.Array:
    """``x[order]`` for a permutation ``order`` ``[B]``, whose gradient is a gather by the
    inverse permutation rather than a scatter-add."""
    return x[order]


def _permute_rows_fwd(x, order):
    return x[order], order


def _permute_rows_bwd(order, g):
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return g[inverse], None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def append_memory(
    batch: PairBatch, cols: jax.Array, labels: jax.Array, valid: jax.Array, *,
    presorted: bool = False,
) -> PairBatch:
    """``batch`` with ``M`` constant columns after its ``B`` columns (a cross-batch memory).

    The extra columns are no row of the batch (no diagonal): against local row ``i`` column
    ``k`` is positive when the labels match and both are valid, negative when they differ and
    both are valid. Every loss core then runs unchanged on the ``[b, B + M]`` view.

    Args:
      batch: the batch's :class:`PairBatch` (``[b, B]`` masks, no memory yet).
      cols: float32 ``[M, D]`` (invalid rows already zeroed); taken as constants (no gradient).
      labels: int32 ``[M]``.
      valid: bool ``[M]``.
      presorted: the memory's valid labels come first and ascending (:func:`label_order`),
        as :func:`label_counts` may then assume.

    Returns:
      The widened :class:`PairBatch` (``[b, B + M]`` masks; rows unchanged).
    """
    in_memory = label_counts(batch.row_labels, labels, valid, presorted=presorted)
    in_memory = in_memory.astype(jnp.float32)
    col_labels = jnp.concatenate([batch.col_labels, labels], axis=0)
    col_valid = jnp.concatenate([batch.col_valid, valid], axis=0)
    col_ids = jnp.concatenate([batch.col_ids, jnp.full(labels.shape, -1, jnp.int32)])
    pos, neg = pair_masks(
        batch.row_labels, batch.row_valid, batch.row_ids, col_labels, col_valid, col_ids
    )
    return batch._replace(
        memory=jax.lax.stop_gradient(cols.astype(jnp.float32)),
        col_labels=col_labels,
        col_valid=col_valid,
        col_ids=col_ids,
        pos=pos,
        neg=neg,
        pos_count=batch.pos_count + jnp.where(batch.row_valid, in_memory, 0.0),
        neg_count=batch.neg_count + jnp.where(
            batch.row_valid, jnp.sum(valid, dtype=jnp.float32) - in_memory, 0.0
        ),
    )


def materialise(h: jax.Array) -> jax.Array:
    """``h`` ``[N, ...]`` itself (value and gradient), computed once into a buffer of its own.

    XLA's CPU backend fuses a cheap producer into each of its consumers and evaluates it once
    per consumer; when the producer reads several arrays (a max over ten slices, a loss's
    cotangent) and the consumers are many, or read it transposed, that costs more than a
    buffer. Writing ``h``'s row 0 onto itself with a ``dynamic_update_slice`` at an offset the
    compiler cannot fold (always 0) makes XLA evaluate ``h`` once, into the buffer the row is
    written into. Holds one extra buffer of ``h``'s size.
    """
    offset = _unfoldable_zero(h)
    return jax.lax.dynamic_update_slice(h, h[:1], (offset,) + (0,) * (h.ndim - 1))


def _unfoldable_zero(h: jax.Array) -> jax.Array:
    """An int32 scalar that is always 0, computed from ``h``'s first element so that the
    compiler cannot fold it to a constant."""
    return jnp.minimum(jnp.isnan(h.reshape(-1)[0]).astype(jnp.int32), 0)


def _unfoldable_true(h: jax.Array) -> jax.Array:
    """A True bool scalar the compiler cannot fold (:func:`_unfoldable_zero`)."""
    return _unfoldable_zero(h) == 0


def transposed(h: jax.Array) -> jax.Array:
    """``h.T`` of ``h`` ``[N, M]``, ``[M, N]``, computed as an operation of its own.

    XLA's CPU backend fuses a transpose into its consumer, which then reads ``h`` column by
    column (a cache line per element): ``h + h.T`` took 4.5 ms at ``[1024, 1024]``, where the
    transpose alone, emitted as a copy of its own, took 0.3 ms. A ``lax.cond`` on a predicate
    that is always True (:func:`_unfoldable_true`; the other branch, zeros, never runs) keeps
    the transpose out of the consumer's fusion: ``h + transposed(h)`` took 0.6 ms. Holds one
    ``[M, N]`` buffer. On other backends, the plain transpose.
    """
    return jax.lax.platform_dependent(h, cpu=_transpose_apart, default=jnp.transpose)


def _transpose_apart(h: jax.Array) -> jax.Array:
    # CPU only (see `transposed`): other backends emit a fused transpose well, and a
    # conditional may cost them a round trip for its predicate.
    return jax.lax.cond(_unfoldable_true(h), jnp.transpose, lambda h: jnp.zeros_like(h.T), h)


def transpose_sum(h: jax.Array) -> jax.Array:
    """``h + h.T`` of a square ``h`` ``[B, B]``, evaluating ``h`` once.

    Left alone, XLA's CPU backend fuses ``h``'s producers (a loss's cotangent: selects,
    masks, exponentials over several ``[B, B]`` inputs) into the sum and evaluates them twice,
    at ``[i, j]`` and, through strided reads, at ``[j, i]``: about as long as a ``[B, B] @
    [B, D]`` product at ``B = 1024``, ``D = 512``. Here ``h`` is materialised
    (:func:`materialise`) and its transpose made by an operation of its own
    (:func:`transposed`), so the sum reads both in order: measured with a ``[B, B] @ [B, D]``
    product after it, 3.3 ms against 4.9 for the materialised ``h`` plus a fused ``h.T`` (and
    2.7 for the product of ``h`` alone) at ``B = 1024``, ``D = 512``. The result is exactly
    ``h + h.T``. Holds three ``[B, B]`` buffers.
    """
    h = materialise(h)
    return h + transposed(h)


def _self_gram_fwd(x: jax.Array, symmetric: bool):
    return distances.dot_products(x, x), x


def _self_gram_bwd(symmetric: bool, x: jax.Array, g: jax.Array):
    hi = jax.lax.Precision.HIGHEST
    if symmetric:  # the caller vouches that the cotangent is symmetric: g + g^T = 2 g
        return (2.0 * jnp.matmul(g, x, precision=hi),)
    # (G' + G'^T) x as one product: a dot reading G' transposed costs about a second product
    # on XLA's CPU backend, the materialised sum a fraction of one (see `transpose_sum`).
    return (jnp.matmul(transpose_sum(g), x, precision=hi),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def self_gram(x: jax.Array, symmetric: bool = False) -> jax.Array:
    """``x @ x.T`` ``[B, B]`` with a hand-written gradient, ``(G' + G'^T) @ x``.

    The forward is one product and so is the gradient, after one ``[B, B]`` pass that sums
    ``G'`` and its transpose (:func:`transpose_sum`; autodiff of ``x @ x.T`` gives two
    products, one of them reading ``G'`` transposed, about twice the time on XLA's CPU
    backend). With ``symmetric`` the caller vouches that the loss's
    cotangent ``G'`` is symmetric (a loss summing one symmetric function over ordered pairs
    with symmetric masks, as the contrastive and OSM+CAA losses do), and the gradient is the
    one product ``2 G' @ x``. (That needs ``G`` itself symmetric, which the dot kernels
    make it, bit for bit, on CPU; on a kernel that did not, the error would be of the
    order of ``G``'s rounding.)

    Args:
      x: float32 ``[B, D]``.
      symmetric: see above (static).

    Returns:
      float32 ``[B, B]``.
    """
    return distances.dot_products(x, x)


self_gram.defvjp(_self_gram_fwd, _self_gram_bwd)


def _memory_gram_fwd(rows, cols, memory):
    every = jnp.concatenate([cols, memory])
    return distances.dot_products(rows, every), (rows, cols, every)


def _memory_gram_bwd(residuals, h):
    rows, cols, every = residuals
    highest = jax.lax.Precision.HIGHEST
    d_rows = jnp.matmul(h, every, precision=highest)
    d_cols = jnp.matmul(transposed(h[:, :cols.shape[0]]), rows, precision=highest)
    return d_rows, d_cols, jnp.zeros((every.shape[0] - cols.shape[0], every.shape[1]))


@jax.custom_vjp
def memory_gram(rows: jax.Array, cols: jax.Array, memory: jax.Array) -> jax.Array:
    """``rows @ [cols; memory].T`` ``[b, B + M]`` for constant memory rows ``[M, D]``.

    One product forward (against the stacked columns, an ``[B + M, D]`` copy, rather than two
    products and an ``[b, B + M]`` copy of their results) and two backward: ``H @ [cols;
    memory]`` for the rows and ``H[:, :B]^T @ rows`` for the batch columns; the memory takes no
    gradient (zeros), where autodiff would form the whole ``[B + M, D]`` product ``H^T @ rows``
    and slice it.
    """
    return _memory_gram_fwd(rows, cols, memory)[0]


memory_gram.defvjp(_memory_gram_fwd, _memory_gram_bwd)


def points(
    batch: PairBatch, axis_name: str | None, *, normalize: bool = False
) -> tuple[jax.Array, jax.Array]:
    """The view's rows ``[b, D]`` and batch columns ``[B, D]`` (L2-normalised when
    ``normalize``); without ``axis_name`` the columns *are* the rows, the same array."""
    rows = distances.l2_normalize(batch.rows) if normalize else batch.rows
    if axis_name is None:
        return rows, rows
    return rows, distances.l2_normalize(batch.cols) if normalize else batch.cols


def gram(
    batch: PairBatch,
    axis_name: str | None,
    *,
    normalize: bool = False,
    symmetric: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The dot products of the view: ``(G [b, B + M], |row|^2 [b], |col|^2 [B + M])``.

    Args:
      batch: the view.
      axis_name: the loss's axis (None: the rows are the batch columns, see
        :func:`self_gram`).
      normalize: of the L2-normalised rows and columns (cosine similarities).
      symmetric: the loss's gradient with respect to the ``[B, B]`` block is symmetric (see
        :func:`self_gram`); ignored under ``axis_name``.

    Returns:
      float32 arrays. Memory: ``G`` plus its gradient.
    """
    rows, cols = points(batch, axis_name, normalize=normalize)
    row_sq = jnp.sum(rows * rows, axis=1)
    col_sq = jnp.sum(cols * cols, axis=1)
    if batch.memory.shape[0]:
        memory = distances.l2_normalize(batch.memory) if normalize else batch.memory
        g = memory_gram(rows, cols, jax.lax.stop_gradient(memory))
        col_sq = jnp.concatenate([col_sq, jnp.sum(memory * memory, axis=1)])
    elif axis_name is None:
        g = self_gram(rows, symmetric)
    else:
        g = distances.dot_products(rows, cols)
    return g, row_sq, col_sq


def _squared_from_gram(g: jax.Array, row_sq: jax.Array, col_sq: jax.Array) -> jax.Array:
    return jnp.maximum(row_sq[:, None] + col_sq[None, :] - 2.0 * g, 0.0)


def squared_distances_of(
    batch: PairBatch, axis_name: str | None, *, normalize: bool = False,
    symmetric: bool = False,
) -> jax.Array:
    """Squared Euclidean distances of the rows to the columns, clamped at 0, float32
    ``[b, B + M]`` (of the L2-normalised vectors when ``normalize``). ``symmetric``: as in
    :func:`distances_of`."""
    if symmetric and axis_name is None and not batch.memory.shape[0]:
        return self_distances(points(batch, None, normalize=normalize)[0], True)
    if batch.memory.shape[0]:
        return _memory_distances_of(batch, axis_name, normalize, True, symmetric)
    return _squared_from_gram(*gram(batch, axis_name, normalize=normalize, symmetric=symmetric))


def _row_sums(t: jax.Array) -> jax.Array:
    """``sum(t, axis=1)`` of ``t`` ``[b, W]``, ``[b]``, as a matrix-vector product: on XLA's
    CPU backend a row-sum reduction next to the gradient's ``t @ x`` went into the product's
    fusion and cost it ~0.2 ms at ``[1024, 1024]``, more than the product by a vector of ones
    (1-4% of the pair losses' time in A/B runs; the sum's rounding differs)."""
    return jnp.matmul(t, jnp.ones((t.shape[1],), t.dtype), precision=jax.lax.Precision.HIGHEST)


def over_distances(s: jax.Array, d: jax.Array) -> jax.Array:
    """``s / d`` where ``d > 0``, else 0 (as :func:`dml_jax.distances.safe_sqrt`'s gradient):
    a cotangent of the distances ``d`` as one of their squares' expansion."""
    positive = d > 0
    return jnp.where(positive, s / jnp.where(positive, d, 1.0), 0.0)


def _distance_cotangent(s: jax.Array, d: jax.Array, squared: bool) -> tuple[jax.Array, float]:
    """``(T, c)`` with ``dL/dx_i = c sum_j T_ij (x_i - y_j)`` (``x_i``'s part as a row) from the
    cotangent ``s`` of the distances ``d``: ``T = s / d`` (0 where ``d = 0``, as
    ``safe_sqrt``'s gradient) and ``c = 1``; for squared distances ``T = s`` and ``c = 2``.
    The factor 2 goes on the ``[b, D]`` results, not on ``s``: XLA's CPU backend hands the
    ``[b, W]`` operand of a product fusion a materialised array of 2s to multiply by (the same
    values bit for bit, as scaling by 2 is exact)."""
    if squared:
        return s, 2.0
    return over_distances(s, d), 1.0


def _self_distances_fwd(x: jax.Array, squared: bool):
    sq = jnp.sum(x * x, axis=1)
    d = _squared_from_gram(distances.dot_products(x, x), sq, sq)
    d = d if squared else distances.safe_sqrt(d)
    return d, (x, d)


def _self_distances_bwd(squared: bool, residuals, s: jax.Array):
    # d_ij = |x_i - x_j| (squared: d_ij^2) and s symmetric: dx_i = 2 sum_j t_ij (x_i - x_j)
    # with t = s / d (0 where d = 0, as safe_sqrt's gradient; squared: t = 2 s), i.e.
    # 2 (x * rowsum(t) - t @ x): one product.
    x, d = residuals
    t, scale = _distance_cotangent(s, d, squared)
    product = jnp.matmul(t, x, precision=jax.lax.Precision.HIGHEST)
    return ((2.0 * scale) * (x * _row_sums(t)[:, None] - product),)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def self_distances(x: jax.Array, squared: bool = False) -> jax.Array:
    """Euclidean distances (``squared``: squared, clamped at 0) of the rows of ``x``
    ``[B, D]`` to each other, float32 ``[B, B]``, as :func:`distances_of` /
    :func:`squared_distances_of` compute them, for a loss whose cotangent ``S`` of them is
    symmetric (see :func:`self_gram`).

    The gradient is ``2 (x * rowsum(T) - T @ x)`` with ``T = S / d`` (0 where ``d = 0``, as
    :func:`dml_jax.distances.safe_sqrt`'s gradient; for squared distances ``T = 2 S``, computed
    as ``4 (x * rowsum(S) - S @ x)``, see :func:`_distance_cotangent`): one
    elementwise pass, one row sum and one product, where autodiff through the Gram matrix and
    the norms passes over ``[B, B]`` a few times more (the norms' row and column sums, the
    clamp's and the square root's masks).
    """
    return _self_distances_fwd(x, squared)[0]


self_distances.defvjp(_self_distances_fwd, _self_distances_bwd)


def augmented_squared_distances(rows: jax.Array, *cols: jax.Array) -> jax.Array:
    """``|x_i - y_j|^2`` of the rows ``[b, D]`` to the columns, the blocks ``cols`` (each
    ``[W_k, D]``) stacked, float32 ``[b, sum W_k]`` (not clamped: rounding may leave it
    slightly below 0), as one product of augmented vectors ``[-2 x_i, |x_i|^2, 1] . [y_j, 1,
    |y_j|^2]``: the product's output is the squared distance, with no ``[b, W]`` pass to add
    the norms (on XLA's CPU backend the 514-wide product beat the 512-wide one plus that
    pass: 24.2 against 31.4 ms at ``[1024, 9216]``). The blocks are augmented one by one, so
    their plain stack is never formed."""
    # The last (the memory's, the largest) block padded into the whole [W, D + 2] buffer with
    # ones, the others and the norms' column written into it in place: one pass over the
    # block, where two concatenates copied it twice.
    *first, last = cols
    start = sum(y.shape[0] for y in first)
    cols_aug = jax.lax.pad(last, jnp.float32(1.0), ((start, 0, 0), (0, 2, 0)))
    cols_aug = jax.lax.dynamic_update_slice(
        cols_aug, jnp.sum(last * last, axis=1, keepdims=True), (start, last.shape[1] + 1))
    start = 0
    for y in first:
        block = jnp.concatenate([y, jnp.ones((y.shape[0], 1)), jnp.sum(y * y, 1, keepdims=True)], 1)
        cols_aug = jax.lax.dynamic_update_slice(cols_aug, block, (start, 0))
        start += y.shape[0]
    rows_aug = jnp.concatenate(
        [-2.0 * rows, jnp.sum(rows * rows, axis=1, keepdims=True), jnp.ones((rows.shape[0], 1))],
        1,
    )
    return distances.dot_products(rows_aug, cols_aug)


def _memory_distances_fwd(rows, cols, memory, squared, symmetric):
    sq = augmented_squared_distances(rows, cols, memory)
    d = jnp.maximum(sq, 0.0) if squared else distances.safe_sqrt(sq)  # safe_sqrt: 0 for sq <= 0
    return d, (rows, cols, memory, d)


def _memory_distances_bwd(squared, symmetric, residuals, s):
    # d_ij = |x_i - y_j|: dx_i = sum_j t_ij (x_i - y_j), and for a batch column y_j
    # dy_j = sum_i t_ij (y_j - x_i), with t as in `_distance_cotangent`: the row and column
    # sums of t times the points, minus the Gram matrix's gradient for the cotangent t.
    rows, cols, memory, d = residuals
    batch = cols.shape[0]
    hi = jax.lax.Precision.HIGHEST
    every = jnp.concatenate([cols, memory])
    t, scale = _distance_cotangent(s, d, squared)
    if symmetric:  # the columns are the rows and t's batch block is symmetric: the columns'
        # part equals the rows' part of that block, so the block counts twice in one product
        factor = jnp.concatenate([jnp.full((batch,), 2.0), jnp.ones((d.shape[1] - batch,))])
        t = t * factor[None, :]
        g_rows = jnp.matmul(t, every, precision=hi)
        d_cols = jnp.zeros_like(cols)  # the rows' product carries it
    else:
        g_rows, g_cols, _ = _memory_gram_bwd((rows, cols, every), t)
        d_cols = scale * (cols * jnp.sum(t[:, :batch], axis=0)[:, None] - g_cols)
    return scale * (rows * _row_sums(t)[:, None] - g_rows), d_cols, jnp.zeros_like(memory)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def memory_distances(
    rows: jax.Array, cols: jax.Array, memory: jax.Array, squared: bool = False,
    symmetric: bool = False,
) -> jax.Array:
    """Euclidean distances (``squared``: squared, clamped at 0) of the rows ``[b, D]`` to the
    batch columns ``[B, D]`` and the constant memory rows ``[M, D]``, float32 ``[b, B + M]``,
    as :func:`distances_of` computes them.

    One product forward, of augmented vectors ``[-2 x_i, |x_i|^2, 1] . [y_j, 1, |y_j|^2]`` (the
    stacked columns ``[B + M, D + 2]``), whose output is the squared distance. The gradient is
    ``x * rowsum(T) - T @ [cols; memory]`` for the rows and ``y * colsum(T_B) - T_B^T @ rows``
    for the batch columns (``T = S / d`` from the cotangent ``S`` of the distances, as in
    :func:`self_distances`; ``T_B`` its batch block); the memory takes none. Autodiff would
    also form the whole ``[B + M, D]`` product ``T^T @ rows`` and pass over ``[b, B + M]``
    once more for the Gram matrix's cotangent.

    ``symmetric`` (static): ``cols`` is ``rows`` (the batch against itself, no ``axis_name``)
    and the caller vouches that the cotangent's batch block ``S[:, :B]`` is symmetric (a loss
    summing one symmetric function over ordered pairs with symmetric masks, as the
    contrastive loss does). The batch columns' gradient then equals the rows' share of that
    block, and the whole gradient is the one product of the floor, ``x * rowsum(T') - T' @
    [cols; memory]`` with ``T' = [2 T_B, T_M]`` (the doubling fused into the cotangent's
    pass); it goes to ``rows``, and ``cols`` gets zeros. (The batch block of the augmented
    product is symmetric to rounding, not bit for bit: the error is of the order of that
    rounding.) Otherwise ``cols`` may be any array (the gathered batch under
    ``axis_name``). The triplet miners, whose cotangent is a materialised array, take
    :func:`mined_distance_sum` instead.
    """
    return _memory_distances_fwd(rows, cols, memory, squared, symmetric)[0]


memory_distances.defvjp(_memory_distances_fwd, _memory_distances_bwd)


def _rows_gradient(rows: jax.Array, row_sums: jax.Array, q_b: jax.Array,
                   q_m: jax.Array) -> jax.Array:
    """``sum_j k_ij (x_i - y_j)`` as ``x_i r_i - q_b - q_m``: the rows' gradient of ``sum_ij
    C_ij d_ij`` (``k = C / d``) from ``k``'s row sums ``r`` ``[B]`` and its products with the
    batch columns and with the memory, ``[B, D]`` each."""
    return rows * row_sums[:, None] - q_b - q_m


def mined_gradient(k: jax.Array, rows: jax.Array,
                   memory: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(sum_ij C_ij d_ij, its gradient for rows [B, D])`` of :func:`mined_distance_sum`
    (``k = C / d`` ``[B, B + M]``), both from its backward products (see there)."""
    hi = jax.lax.Precision.HIGHEST
    batch = rows.shape[0]
    k_b = transpose_sum(k[:, :batch])  # the rows' and the batch columns' shares of the block
    k_m = k[:, batch:]
    q_b = jnp.matmul(k_b, rows, precision=hi)
    q_m = jnp.matmul(k_m, memory, precision=hi)
    memory_sq = jnp.sum(memory * memory, axis=1)
    m_sums = jnp.matmul(  # [b, 2]: the memory block's row sums of k and of k |y_j|^2
        k_m, jnp.stack([jnp.ones_like(memory_sq), memory_sq], axis=1), precision=hi
    )
    row_sums = _row_sums(k_b) + m_sums[:, 0]
    # sum_ij k_ij |x_i - y_j|^2 = sum_i |x_i|^2 rowsum_i + sum_j |y_j|^2 colsum_j
    # - 2 sum_i x_i . (k y)_i. The batch block's rowsum + colsum is k_b's row sum, and with
    # k_b = K_B + K_B^T its cross term sum_i x_i . (k_b x)_i is already twice K_B's.
    value = (jnp.sum(jnp.sum(rows * rows, axis=1) * row_sums) + jnp.sum(m_sums[:, 1])
             - jnp.sum(rows * q_b) - 2.0 * jnp.sum(rows * q_m))
    return value, _rows_gradient(rows, row_sums, q_b, q_m)


def _mined_distance_sum_fwd(k, sq, rows, memory):
    return mined_gradient(k, rows, memory)


def _mined_distance_sum_bwd(grad_rows, g):
    return None, None, g * grad_rows, None


@jax.custom_vjp
def mined_distance_sum(k: jax.Array, sq: jax.Array, rows: jax.Array,
                       memory: jax.Array) -> jax.Array:
    """``sum_ij C_ij d_ij`` for mined coefficients ``C`` held constant, ``d`` the Euclidean
    distances of the rows ``[B, D]`` to the columns ``[rows; memory]`` (the single-device view
    with a memory of constant rows ``[M, D]``), given ``k = C / d`` ``[B, B + M]`` (0 where
    ``d = 0``) and the squared distances ``sq = d^2`` ``[B, B + M]`` (constants): a float32
    scalar whose gradient for ``rows`` is ``sum_j C_ij (x_i - y_j) / d_ij`` plus, for a batch
    column, ``sum_a C_aj (x_j - x_a) / d_aj`` (``C``'s subgradient; ``memory`` takes none).

    A miner that writes ``k`` in its coefficient pass spares the two ``[B, B + M]`` passes of
    summing ``C * d`` and of forming the distances' cotangent ``C / d``: differentiated, the
    backward products run forward, ``(k_B + k_B^T) @ rows + k_M @ memory`` (``k_B``, ``k_M``:
    the batch and memory blocks; one ``[B, B]`` transpose instead of a product for the batch
    columns' share), and the value comes from them, ``sum_i |x_i|^2 r_i + sum_j |y_j|^2
    c_j - 2 sum_i x_i . (k y)_i`` (``r``, ``c``: ``k``'s row and column sums), with no pass
    over ``[B, B + M]`` (its rounding is that of the distances' own expansion); the backward
    pass scales the ``[B, D]`` result. Undifferentiated, it is ``sum(k * sq)``. Holds ``k``'s
    blocks and a few ``[B, D]`` arrays besides.
    """
    return jnp.sum(k * sq)


mined_distance_sum.defvjp(_mined_distance_sum_fwd, _mined_distance_sum_bwd)


# Entries per step of :func:`sparse_mined_gradient`'s loop over a row's mined entries.
_SPARSE_STEP = 16


def _gathered_products(index: jax.Array, k: jax.Array, entries: jax.Array,
                       memory: jax.Array) -> jax.Array:
    """``sum_e k[i, e] memory[index[i, e]]`` ``[b, D]`` over the first ``entries`` (a traced
    int32, at most ``E``) of the ``[b, E]`` entries, the later ones 0. A loop over steps of
    :data:`_SPARSE_STEP` entries, each a gather of ``[b, D]`` rows and a product-sum per
    entry: at ``b = 1024``, ``D = 512``, 144 entries a row, 5.1 ms (5.6 in steps of 8) against
    23 for the dense ``[b, 8192] @ [8192, D]`` product (a gather of ``[b, E, D]`` reduced over
    ``E`` took 28). Holds two ``[b, D]`` buffers."""
    width = index.shape[1]
    padded = max(_SPARSE_STEP, -(-width // _SPARSE_STEP) * _SPARSE_STEP)
    if padded > width:  # a step's slice must not be shifted back by the bound
        pad = ((0, 0), (0, padded - width))
        index, k = jnp.pad(index, pad), jnp.pad(k, pad)

    def step(n, total):
        at = jax.lax.dynamic_slice_in_dim(index, n * _SPARSE_STEP, _SPARSE_STEP, axis=1)
        weight = jax.lax.dynamic_slice_in_dim(k, n * _SPARSE_STEP, _SPARSE_STEP, axis=1)
        for e in range(_SPARSE_STEP):
            total = total + weight[:, e, None] * memory.at[at[:, e]].get(
                mode="promise_in_bounds")
        return total

    steps = (entries + _SPARSE_STEP - 1) // _SPARSE_STEP
    zeros = jnp.zeros((index.shape[0], memory.shape[1]), memory.dtype)
    return jax.lax.fori_loop(0, steps, step, zeros)


def sparse_mined_gradient(k: jax.Array, cols: jax.Array, entries: jax.Array,
                          rows: jax.Array, memory: jax.Array) -> jax.Array:
    """The gradient for ``rows`` ``[B, D]`` of ``sum C_ij d_ij`` (``d`` the Euclidean distances
    of the rows to the columns ``[rows; memory]``, the single-device view with a memory of
    constant rows ``[M, D]``) when ``C`` is sparse: ``k = C / d`` ``[B, E]`` at the columns
    ``cols`` ``[B, E]`` (repeated columns add up), nonzero only in the first ``entries`` (traced
    int32) of each row: the semi-hard miner's few chosen pairs a row among ``B + M`` columns.

    As :func:`mined_gradient`, ``sum_j k_ij (x_i - y_j)`` plus the batch columns' share
    ``sum_a k_aj (x_j - x_a)``: the batch block scattered into a ``[B, B]`` array, with its
    transpose, by one product; the memory's by gathered rows (:func:`_gathered_products`)
    instead of a ``[B, M] @ [M, D]`` product. Holds a few ``[B, B]`` and ``[B, D]`` arrays.
    """
    batch = rows.shape[0]
    in_batch = cols < batch
    rows_at = jnp.arange(batch, dtype=jnp.int32)[:, None]
    k_b = jnp.zeros((batch, batch), k.dtype).at[rows_at, jnp.where(in_batch, cols, 0)].add(
        jnp.where(in_batch, k, 0.0), mode="promise_in_bounds")
    k_b = transpose_sum(k_b)
    k_m = jnp.where(in_batch, 0.0, k)
    q_m = _gathered_products(jnp.where(in_batch, 0, cols - batch), k_m, entries, memory)
    q_b = jnp.matmul(k_b, rows, precision=jax.lax.Precision.HIGHEST)
    return _rows_gradient(rows, _row_sums(k_b) + _row_sums(k_m), q_b, q_m)


def _value_with_gradient_fwd(value, rows, grad):
    return value, grad


def _value_with_gradient_bwd(grad, g):
    return None, g * grad, None


@jax.custom_vjp
def value_with_gradient(value: jax.Array, rows: jax.Array, grad: jax.Array) -> jax.Array:
    """``value`` (a float32 scalar computed from constants) with ``grad`` (``rows``' shape)
    as its gradient for ``rows``: for a loss whose mining pass has the gradient at hand
    (:func:`sparse_mined_gradient`; a miner's coefficients as the gradient of a sum it took
    from its slots). Neither ``value`` nor ``grad`` is differentiated."""
    return value


value_with_gradient.defvjp(_value_with_gradient_fwd, _value_with_gradient_bwd)


def _memory_distances_of(batch, axis_name, normalize, squared, symmetric=False):
    rows, cols = points(batch, axis_name, normalize=normalize)
    memory = distances.l2_normalize(batch.memory) if normalize else batch.memory
    return memory_distances(
        rows, cols, jax.lax.stop_gradient(memory), squared, symmetric and axis_name is None
    )


def distances_of(
    batch: PairBatch, axis_name: str | None, *, symmetric: bool = False
) -> jax.Array:
    """Euclidean distances of the local rows to the columns, float32 ``[b, B + M]`` (finite
    gradient at 0, see :func:`dml_jax.distances.safe_sqrt`). ``symmetric``: the loss's
    cotangent of the ``[B, B]`` block is symmetric (see :func:`self_gram`); without
    ``axis_name`` and memory the distances then come from :func:`self_distances`. With a
    memory they come from :func:`memory_distances` (its one-product gradient when
    ``symmetric`` and no ``axis_name``)."""
    if symmetric and axis_name is None and not batch.memory.shape[0]:
        return self_distances(points(batch, None)[0], False)
    if batch.memory.shape[0]:
        return _memory_distances_of(batch, axis_name, False, False, symmetric)
    return distances.safe_sqrt(squared_distances_of(batch, axis_name, symmetric=symmetric))


def cosine_of(
    batch: PairBatch, axis_name: str | None, *, symmetric: bool = False
) -> jax.Array:
    """Cosine similarities of the rows to the columns, float32 ``[b, B + M]`` (0 for a zero
    vector). ``symmetric``: as in :func:`gram`."""
    return gram(batch, axis_name, normalize=True, symmetric=symmetric)[0]


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


def masked_logsumexp(
    values: jax.Array, mask: jax.Array, axis: int = -1, *, symmetric: bool = False,
    bound: jax.Array | float | None = None,
) -> jax.Array:
    """Log-sum-exp over the masked entries along ``axis``; ``NEG_LARGE`` where none is.

    ``symmetric``: ``values`` and ``mask`` are symmetric ``[B, B]`` (the batch against itself)
    and the sum runs along rows; the gradient is then the symmetric half-sum of the row and
    column softmax (see :func:`row_logsumexp`). ``bound``: an upper bound on the masked
    ``values`` (see :func:`row_logsumexp`; rows only).
    """
    if symmetric or bound is not None:
        return row_logsumexp(values, mask, bound, symmetric)
    m = jax.lax.stop_gradient(masked_max(values, mask, axis))
    x = jnp.where(mask, values, NEG_LARGE)  # an unmasked entry's exp must not overflow: its
    # zero cotangent times an infinite exp would be NaN
    s = jnp.sum(jnp.where(mask, jnp.exp(x - jnp.expand_dims(m, axis)), 0.0), axis=axis)
    any_ = jnp.any(mask, axis=axis)
    return jnp.where(any_, jnp.log(jnp.where(any_, s, 1.0)) + m, NEG_LARGE)


def masked_max(values: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
    """Max over the masked entries along ``axis``; 0 where none is (a safe shift)."""
    m = jnp.max(jnp.where(mask, values, NEG_LARGE), axis=axis)
    return jnp.where(m > NEG_LARGE / 2, m, 0.0)


# A fixed shift K is used for a row log-sum-exp when the masked values are known to be <= K
# and K <= _FIXED_SHIFT_MAX: every exp(x - K) <= 1 then, and a term it loses to underflow
# (exp(x) < exp(K - 87)) is below exp(-27) absolutely, nothing next to the 1 of a softplus.
_FIXED_SHIFT_MAX = 60.0


def _fixed_shift_lse(values, mask, bound):
    total = jnp.sum(jnp.where(mask, jnp.exp(values - bound), 0.0), axis=1)
    has = total > 0
    return jnp.where(has, jnp.log(jnp.where(has, total, 1.0)) + bound, NEG_LARGE)


def _row_logsumexp_fwd(values, mask, bound, symmetric):
    if bound is None:
        lse = masked_logsumexp(values, mask, axis=1)
    else:
        bound = jnp.asarray(bound, jnp.float32)
        lse = jax.lax.cond(
            bound <= _FIXED_SHIFT_MAX,
            _fixed_shift_lse,
            lambda v, m, _: masked_logsumexp(v, m, axis=1),
            values, mask, bound,
        )
    return lse, (values, mask, lse, bound)


def _row_logsumexp_bwd(symmetric, residuals, g):
    values, mask, lse, bound = residuals

    def softmax(lse):  # exp(x - lse) <= 1 on the mask
        return jnp.exp(jnp.minimum(values - lse, 0.0))

    grad = g[:, None] * softmax(lse[:, None])
    if symmetric:
        grad = 0.5 * (grad + g[None, :] * softmax(lse[None, :]))
    zero = None if bound is None else jnp.zeros_like(bound)
    return jnp.where(mask, grad, 0.0), None, zero


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def row_logsumexp(
    values: jax.Array, mask: jax.Array, bound: jax.Array | None = None, symmetric: bool = False
) -> jax.Array:
    """Each row's log-sum-exp over the masked entries of ``values`` ``[b, W]``, float32 ``[b]``
    (``NEG_LARGE`` for a row without a masked entry), with a hand-written gradient
    ``g_i softmax_i(j)``.

    ``bound``: a scalar with every masked value ``<= bound`` (e.g. from a cosine's range). When
    it is at most 60 the rows are shifted by it instead of by their maxima, which saves a pass
    over ``[b, W]``; a row whose terms all underflow (all ``< exp(bound - 87)``) then counts as
    empty. Meant for log-sum-exps inside a softplus, ``log(1 + sum exp)``, where such terms are
    nothing. A larger bound falls back to the row maxima (exact).

    ``symmetric``: ``values`` and ``mask`` are symmetric ``[B, B]`` (the batch against itself),
    and the cotangent handed back is the symmetric ``(H + H^T) / 2`` of the plain one, evaluated
    per entry with the column's log-sum-exp (no ``[B, B]`` transpose). For ``values`` a
    symmetric function of the points it gives them the same gradient, and lets the Gram matrix
    take its one-product gradient (see :func:`self_gram`, :func:`self_distances`).

    Holds ``[b, W]`` temporaries only.
    """
    return _row_logsumexp_fwd(values, mask, bound, symmetric)[0]


row_logsumexp.defvjp(_row_logsumexp_fwd, _row_logsumexp_bwd)


def softplus_of_lse(lse: jax.Array) -> jax.Array:
    """``log(1 + exp(lse))``, exactly 0 (with zero gradient) where ``lse`` is ``NEG_LARGE``."""
    return jnp.where(lse > NEG_LARGE / 2, jnp.logaddexp(0.0, lse), 0.0)
