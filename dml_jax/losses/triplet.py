"""Triplet margin loss with all-triplet, batch-hard and semi-hard mining.

Mining never builds the ``[B, B, B]`` tensor of triplets. In class-balanced batches an anchor
has few positives, so each anchor's positive distances are first packed into ``S`` static slots
(``[b, S]``, ``S`` = 8 or 32, whichever fits the batch's largest positive set), and the
``"all"`` and ``"semi_hard"`` terms are computed against every negative in ``O(b S B)`` work and
memory. A batch with more than 32 positives per anchor takes a sort-based path instead: each
anchor's negative distances are sorted once (``[b, B]``), and, for every positive pair ``(a, p)``,

* ``"all"``: the negatives with ``d_an < d_ap + margin`` are a prefix of that sorted row, so
  ``sum_n relu(d_ap - d_an + margin) = c (d_ap + margin) - (sum of the first c)`` with ``c``
  found by binary search and the sum read from a prefix sum;
* ``"semi_hard"``: the closest negative farther than ``d_ap`` is the entry just after
  ``d_ap``'s position in the sorted row.

Work is then ``O(B^2 log B)`` and memory ``O(B^2)`` per device. (XLA's CPU sort of a
``1024 x 1024`` array costs several times the loss's matmuls, hence the slots.)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks
from dml_jax.losses import _batch

MINING = ("all", "batch_hard", "semi_hard")


def _searchsorted_rows(sorted_rows: jax.Array, queries: jax.Array, side: str) -> jax.Array:
    """Row-wise ``searchsorted``: ``[b, B]`` sorted rows, ``[b, Q]`` queries -> int ``[b, Q]``."""
    return jax.vmap(lambda a, v: jnp.searchsorted(a, v, side=side, method="scan"))(
        sorted_rows, queries
    )


def _sorted_negatives(d: jax.Array, neg: jax.Array) -> jax.Array:
    """Each row's negative distances in ascending order, non-negatives as +inf, ``[b, B]``."""
    return jnp.sort(jnp.where(neg, d, jnp.inf), axis=1)


SLOT_SIZES = (8, 32)


def _pack_positives(d: jax.Array, pos: jax.Array, slots: int) -> tuple[jax.Array, jax.Array]:
    """Each row's positive distances in its first ``slots`` slots: ``([b, S], bool [b, S])``.

    Only exact when no row has more than ``slots`` positives. The packing is a one-hot
    contraction, so the gradient flows back to ``d``.
    """
    rank = jnp.cumsum(pos, axis=1) - 1  # [b, B] slot of each positive
    one_hot = pos[:, :, None] & (rank[:, :, None] == jnp.arange(slots)[None, None, :])
    packed = jnp.einsum("bn,bns->bs", d, one_hot.astype(d.dtype))
    filled = jnp.arange(slots)[None, :] < jnp.sum(pos, axis=1, keepdims=True)
    return packed, filled


def _by_slot_count(d, batch, slotted, fallback):
    """Runs ``slotted(d, batch, S)`` with the smallest ``S`` that fits, else ``fallback``."""
    most = jnp.max(jnp.sum(batch.pos, axis=1))
    index = jnp.searchsorted(jnp.asarray(SLOT_SIZES), most)  # len(SLOT_SIZES) -> fallback
    branches = [functools.partial(slotted, slots=s) for s in SLOT_SIZES] + [fallback]
    return jax.lax.switch(index, branches, d, batch)


def _all_triplets_slotted(d, batch, margin, slots):
    d_ap, filled = _pack_positives(d, batch.pos, slots)
    hinge = jax.nn.relu(d_ap[:, :, None] + margin - d[:, None, :])  # [b, S, B]
    mask = filled[:, :, None] & batch.neg[:, None, :]
    return _batch.masked_sum(hinge, mask)


def _semi_hard_slotted(d, batch, margin, slots):
    d_ap, filled = _pack_positives(d, batch.pos, slots)
    harder = batch.neg[:, None, :] & (d[:, None, :] > d_ap[:, :, None])  # [b, S, B]
    closest = jnp.min(jnp.where(harder, d[:, None, :], jnp.inf), axis=2)  # [b, S]
    farthest = jnp.max(jnp.where(batch.neg, d, -jnp.inf), axis=1, keepdims=True)  # [b, 1]
    has_neg = jnp.any(batch.neg, axis=1, keepdims=True)
    valid = filled & has_neg
    d_an = jnp.where(jnp.isfinite(closest), closest, farthest)
    terms = jax.nn.relu(d_ap - jnp.where(valid, d_an, 0.0) + margin)
    return _batch.masked_sum(terms, valid)


def _all_triplets_sorted(d, batch, margin):
    sorted_neg = _sorted_negatives(d, batch.neg)
    finite = jnp.isfinite(sorted_neg)
    prefix = jnp.cumsum(jnp.where(finite, sorted_neg, 0.0), axis=1)
    prefix = jnp.pad(prefix, ((0, 0), (1, 0)))  # prefix[:, c] = sum of the c smallest
    threshold = d + margin
    count = _searchsorted_rows(sorted_neg, jax.lax.stop_gradient(threshold), side="left")
    below = jnp.take_along_axis(prefix, count, axis=1)
    hinge_sums = count.astype(jnp.float32) * threshold - below
    return _batch.masked_sum(hinge_sums, batch.pos)


def _all_triplets(d, batch, margin):
    total = _by_slot_count(
        d,
        batch,
        lambda d, batch, slots: _all_triplets_slotted(d, batch, margin, slots),
        lambda d, batch: _all_triplets_sorted(d, batch, margin),
    )
    num_triplets = jnp.sum(
        jnp.sum(batch.pos, axis=1).astype(jnp.float32) * jnp.sum(batch.neg, axis=1)
    )
    return total, num_triplets


def _batch_hard(d, batch, margin):
    hardest_pos = jnp.max(jnp.where(batch.pos, d, -jnp.inf), axis=1)
    hardest_neg = jnp.min(jnp.where(batch.neg, d, jnp.inf), axis=1)
    valid = jnp.any(batch.pos, axis=1) & jnp.any(batch.neg, axis=1)
    terms = jax.nn.relu(
        jnp.where(valid, hardest_pos, 0.0) - jnp.where(valid, hardest_neg, 0.0) + margin
    )
    return _batch.masked_sum(terms, valid), jnp.sum(valid)


def _semi_hard_sorted(d, batch, margin):
    sorted_neg = _sorted_negatives(d, batch.neg)
    num_neg = jnp.sum(batch.neg, axis=1, keepdims=True)  # [b, 1]
    first_harder = _searchsorted_rows(sorted_neg, jax.lax.stop_gradient(d), side="right")
    chosen = jnp.where(first_harder < num_neg, first_harder, num_neg - 1)
    chosen = jnp.clip(chosen, 0, d.shape[1] - 1)
    d_an = jnp.take_along_axis(sorted_neg, chosen, axis=1)
    valid = batch.pos & (num_neg > 0)
    d_an = jnp.where(valid, d_an, 0.0)
    terms = jax.nn.relu(d - d_an + margin)
    return _batch.masked_sum(terms, valid)


def _semi_hard(d, batch, margin):
    total = _by_slot_count(
        d,
        batch,
        lambda d, batch, slots: _semi_hard_slotted(d, batch, margin, slots),
        lambda d, batch: _semi_hard_sorted(d, batch, margin),
    )
    count = jnp.sum(batch.pos & jnp.any(batch.neg, axis=1, keepdims=True))
    return total, count


@functools.partial(jax.jit, static_argnames=("mining", "axis_name"))
def triplet_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    margin: float = 0.2,
    mining: str = "all",
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Triplet margin loss ``relu(d_ap - d_an + margin)`` with in-batch mining.

    * ``"all"``: mean over every valid triplet ``(a, p, n)`` (``a != p`` same label, ``n``
      another label) of ``relu(d_ap - d_an + margin)``.
    * ``"batch_hard"`` (Hermans et al. 2017): per anchor with at least one positive and one
      negative, ``relu(max_p d_ap - min_n d_an + margin)``; mean over those anchors.
    * ``"semi_hard"`` (Schroff et al. 2015): per positive pair ``(a, p)`` whose anchor has a
      negative, ``n*`` is the closest negative with ``d_an > d_ap``, or the farthest negative if
      none is; ``relu(d_ap - d_an* + margin)``, mean over those pairs.

    A loss with no valid term is 0. Distances are Euclidean, not squared; no normalisation.

    Args:
      embeddings: float ``[B, D]`` (float32 or bfloat16; arithmetic in float32).
      labels: int ``[B]``.
      margin: the margin. Default 0.2.
      mining: ``"all"`` (default), ``"batch_hard"`` or ``"semi_hard"``.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis; mining then sees the global batch (see
        :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device, never ``[B, B, B]``.

    References:
      Schroff, Kalenichenko, Philbin, "FaceNet", CVPR 2015; Hermans, Beyer, Leibe, "In Defense
      of the Triplet Loss for Person Re-Identification", arXiv 1703.07737.
    """
    _checks.check_choice(mining, "mining", MINING)
    batch = _batch.pair_batch(embeddings, labels, where, axis_name)
    d = _batch.distances_of(batch)
    total, count = {"all": _all_triplets, "batch_hard": _batch_hard, "semi_hard": _semi_hard}[
        mining
    ](d, batch, margin)
    return _batch.global_mean(total, count, axis_name)
