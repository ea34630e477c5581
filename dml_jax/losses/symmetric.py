"""Symmetrical synthesis (Gu & Ko, AAAI 2020): synthetic points by reflection, and hard-negative
mining over {original, synthetic} points for every pair-based loss of :mod:`dml_jax.losses`.

Batches use the *pair layout* of :mod:`dml_jax.losses._pairs`: rows ``2k`` and ``2k + 1`` are the
two samples (anchor, positive) of pair ``k``, of class ``labels[2k]`` (the paper's batches are
64 classes x 2 images); ``B`` even, and each device's shard holds whole pairs.

Two families:

* **Mined-negative losses** (triplet, lifted structure, contrastive, multi-similarity,
  OSM+CAA). For each anchor row ``i`` and each pair ``(x_k, x_l)`` of another class, the two
  synthetic points ``x'_k = reflect(x_k about x_l)`` and ``x'_l = reflect(x_l about x_k)``
  join the originals, and the hardest of the four — the closest to ``x_i`` — is that pair's
  single negative for ``i`` (:func:`symmetric_hard_negatives`). Positives stay the original
  same-class rows. The loss is then the base loss over these positives and mined negatives.
  This rule is a **reconstruction** from the paper's Figure 1 caption (UNVERIFIED:
  the official code releases only the N-pair and angular variants); the paper
  reports it for triplet and lifted structure, and applying it to contrastive,
  multi-similarity and OSM+CAA is dml_jax's extension.
* **Similarity-max losses** (N-pair, angular), as in the official code: the logit between pairs
  ``i`` and ``j`` is the max over combinations of the points ``{a, p, s1, s2}`` of each pair,
  with ``s1 = reflect(p about a)``, ``s2 = reflect(a about p)``.

Gradients flow through the synthetic points (as in the official TensorFlow code); which point
is chosen is a constant. Every point is a per-pair linear combination of its pair's two rows,
so all similarities come from the one ``[b, B]`` Gram matrix: nothing is cubic in ``B``, and
each loss holds a few ``[b, B]`` matrices per device.
"""

from __future__ import annotations

import functools
import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dml_jax import _checks, distances
from dml_jax.losses import _batch, _windows
from dml_jax.losses._pairs import (
    POINTS,
    PairLayout,
    angular_logits,
    check_pairs,
    l2_regulariser,
    max_pair_logits,
    pair_layout,
    reflection_coefficient,
    same_class,
    softmax_cross_entropy,
)
from dml_jax.losses.lifted import lifted_from_distances
from dml_jax.losses.multi_similarity import multi_similarity_from_similarities
from dml_jax.losses.osm_caa import (
    ATTENTIONS,
    KERNELS,
    osm_caa_from_squared_distances,
    prepare_attention,
)
from dml_jax.losses.pair import contrastive_from_distances
from dml_jax.losses.triplet import (
    MINING,
    DistanceTo,
    distance_from_dot,
    triplet_from_distances,
)

__all__ = [
    "POSITIVE_RULES",
    "SymmetricView",
    "reflect",
    "symmetric_angular_loss",
    "symmetric_contrastive_loss",
    "symmetric_hard_negatives",
    "symmetric_lifted_structure_loss",
    "symmetric_multi_similarity_loss",
    "symmetric_npair_loss",
    "symmetric_osm_caa_loss",
    "symmetric_triplet_loss",
    "symmetric_view",
]


def reflect(points: jax.typing.ArrayLike, axes: jax.typing.ArrayLike) -> jax.Array:
    r"""Reflection of each point about the line through the origin and its axis point.

    .. math:: \mathrm{reflect}(p, a) = 2 (p^\top \hat a)\, \hat a - p,\qquad
              \hat a = a / \|a\|

    Preserves ``||p||`` and ``a.p``; reflecting twice gives ``p`` back. A zero axis gives
    ``-p`` (``a_hat = 0``). The official code's ``tf_get_symmetric_point(A, P)`` with
    ``symm_ratio = 2``, ``symm_norm_ratio = 1``.

    Args:
      points: float ``[..., D]``.
      axes: float ``[..., D]``, broadcastable against ``points``.

    Returns:
      float32 array of the broadcast shape.
    """
    p = jnp.asarray(points).astype(jnp.float32)
    unit = distances.l2_normalize(axes)
    return 2.0 * jnp.sum(p * unit, axis=-1, keepdims=True) * unit - p


def partners(x: jax.Array, axis: int = -1) -> jax.Array:
    """Each entry's pair partner along ``axis``: entries ``2k`` and ``2k + 1`` of ``x``
    swapped (an even length). An index permutation XLA fuses into its consumers."""
    axis = axis % x.ndim
    pairs = x.reshape(*x.shape[:axis], x.shape[axis] // 2, 2, *x.shape[axis + 1:])
    return jnp.flip(pairs, axis + 1).reshape(x.shape)


class SymmetricView(NamedTuple):
    """Local rows against the ``B`` columns of the pair layout, with each mined negative in place.

    Pair ``k``'s two columns ``2k``, ``2k + 1`` hold the original points ``x_k``, ``x_l``. For a
    row ``i`` of another class, the mined point of the pair (the closest of ``x_k``, ``x_l``,
    ``x'_k``, ``x'_l``) replaces the column it was made from (``x_k`` or ``x'_k``: column
    ``2k``; ``x_l`` or ``x'_l``: column ``2k + 1``), which alone is marked ``neg``; the other
    column of that pair is in neither mask. Same-class columns are the original points.

    Attributes:
      batch: the original :class:`~dml_jax.losses._batch.PairBatch`.
      sq: float32 ``[b, B]`` squared distances (of L2-normalised points if ``normalize``).
      dots: float32 ``[b, B]`` the matching dot products.
      pos: bool ``[b, B]``: original same-class columns (``batch.pos``).
      neg: bool ``[b, B]``: the mined column of every valid pair of another class.
      synthetic: bool ``[b, B]``: the mined columns that hold a synthetic point (``x'_k`` in
        column ``2k``, ``x'_l`` in ``2k + 1``).
      choice: int32 ``[b, N]`` (``N = B / 2``): the mined point of each pair: 0 ``x_k``, 1 ``x_l``,
        2 ``x'_k = reflect(x_k about x_l)``, 3 ``x'_l = reflect(x_l about x_k)``.
      mined_sq: float32 ``[b, N]``: the squared distance to the mined point of each pair
        (differentiable, as ``sq``).
      neg_count: float32 ``[b]``: each row's number of mined negatives (``sum(neg, 1)``),
        counted from the sorted pair labels, not from the ``[b, B]`` mask.
    """

    batch: _batch.PairBatch
    sq: jax.Array
    dots: jax.Array
    pos: jax.Array
    neg: jax.Array
    synthetic: jax.Array
    choice: jax.Array
    mined_sq: jax.Array
    neg_count: jax.Array


def symmetric_view(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    normalize: bool = False,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> SymmetricView:
    """The generic mining step: any pair-based loss can consume the :class:`SymmetricView`.

    For anchor ``i`` and column pair ``k`` (points ``x_k = cols[2k]``, ``x_l = cols[2k+1]``)
    the candidates are ``{x_k, x_l, x'_k, x'_l}``; the chosen one minimises
    ``||x_i - x||^2`` (on L2-normalised points when ``normalize``, i.e. maximises cosine
    similarity), compared as ``||x||^2 - 2 x_i.x`` in float32; exact ties go to the first of
    ``x_k, x'_k, x_l, x'_l``. Computed from the Gram matrix, column by column:
    ``x_i.x'_k = 2 (x_k.x_l)(x_i.x_l)/||x_l||^2 - x_i.x_k`` takes column ``2k`` and its
    partner's, and ``||x'_k|| = ||x_k||``. Memory: a few ``[b, B]`` matrices; the mined
    negatives take their pairs' columns, so nothing is ``[b, B + N]``.
    """
    batch = _batch.pair_batch(embeddings, labels, where, axis_name)
    check_pairs(batch.rows.shape[0])
    cols = _batch.points(batch, axis_name, normalize=normalize)[1]
    g, n_rows, n_cols = _batch.gram(batch, axis_name, normalize=normalize)  # [b, B], [b], [B]

    def squared(dots):  # |x_i - y|^2 for a point y of each column's norm, from x_i . y [b, B]
        return jnp.maximum(n_rows[:, None] + n_cols[None, :] - 2.0 * dots, 0.0)

    # Column j's synthetic point x'_j = reflect(x_j about its partner p) = c_j x_p - x_j has
    # x_j's norm, so of the two points of column j the closer to x_i has the larger dot, and
    # of the pair's two columns the closer has the smaller |y|^2 - 2 x_i.y (x_i's norm is the
    # same for both). The choice is a constant.
    coef = reflection_coefficient(jnp.sum(cols * partners(cols, 0), axis=1), partners(n_cols))
    synthetic = coef[None, :] * partners(g) - g  # x_i . x'_j, [b, B]
    use_synthetic = jax.lax.stop_gradient(synthetic > g)  # ties: the original point
    mined = jnp.where(use_synthetic, synthetic, g)  # the closer point of each column
    score = jax.lax.stop_gradient(n_cols[None, :] - 2.0 * mined)
    even = (jnp.arange(g.shape[1]) % 2 == 0)[None, :]
    chosen = jnp.where(even, score <= partners(score), score < partners(score))  # ties: x_k
    pair_labels = jnp.repeat(batch.col_labels[0::2], 2)  # [B]: the label of each column's pair
    pair_valid = batch.col_valid & partners(batch.col_valid)
    pair_negative = (
        (batch.row_labels[:, None] != pair_labels[None, :])
        & batch.row_valid[:, None]
        & pair_valid[None, :]
    )
    neg = pair_negative & chosen
    dots = jnp.where(neg, mined, g)
    same_pairs = _batch.label_counts(batch.row_labels, pair_labels[0::2], pair_valid[0::2])
    neg_count = jnp.where(
        batch.row_valid, jnp.sum(pair_valid[0::2], dtype=jnp.int32) - same_pairs, 0
    ).astype(jnp.float32)
    first = chosen[:, 0::2]  # [b, N]: the pair's mined point is in its first column
    mined_sq = squared(mined)  # [b, N] below: unused by the losses, so never computed there
    return SymmetricView(
        batch=batch,
        sq=squared(dots),
        dots=dots,
        pos=batch.pos,
        neg=neg,
        synthetic=neg & use_synthetic,
        choice=jnp.where(first, 0, 1) + 2 * jnp.where(
            first, use_synthetic[:, 0::2], use_synthetic[:, 1::2]
        ).astype(jnp.int32),
        mined_sq=jnp.where(first, mined_sq[:, 0::2], mined_sq[:, 1::2]),
        neg_count=neg_count,
    )


@functools.partial(jax.jit, static_argnames=("normalize", "axis_name"))
def symmetric_hard_negatives(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    normalize: bool = False,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gu & Ko's hard negative of every (local row, pair of another class).

    Args:
      embeddings: float ``[B, D]`` in the pair layout.
      labels: int ``[B]``.
      normalize: mine on L2-normalised points (cosine). Default False (Euclidean).
      where: optional bool ``[B]``.
      axis_name: mesh/pmap axis; the pairs are then those of the global batch.

    Returns:
      ``(distance [b, N], choice [b, N], mask [b, N])``: the Euclidean distance from row ``i``
      to the mined point of pair ``k``, which point it is (0 ``x_k``, 1 ``x_l``, 2 ``x'_k``,
      3 ``x'_l``) and whether pair ``k`` is a valid negative of row ``i``.
    """
    view = symmetric_view(
        embeddings, labels, normalize=normalize, where=where, axis_name=axis_name
    )
    return (
        distances.safe_sqrt(view.mined_sq),
        view.choice,
        view.neg[:, 0::2] | view.neg[:, 1::2],
    )


def _mined_distances(view: SymmetricView) -> DistanceTo:
    """``index [b] -> sqrt(view.sq[a, index[a]])`` recomputed from the gathered column and its
    partner (``[b, D]`` work) in the view's Gram form, so with the same gradient (Euclidean
    views; for :func:`~dml_jax.losses.triplet.triplet_from_distances`' sparse batch-hard)."""
    rows, cols = view.batch.rows, view.batch.cols
    row_sq = jnp.sum(rows * rows, axis=1)

    def distance_to(index):
        own, partner = cols[index], cols[index ^ 1]
        coef = reflection_coefficient(
            jnp.sum(own * partner, axis=1), jnp.sum(partner * partner, axis=1)
        )
        own_dot = jnp.sum(rows * own, axis=1)
        synthetic = jnp.take_along_axis(view.synthetic, index[:, None], axis=1)[:, 0]
        dot = jnp.where(synthetic, coef * jnp.sum(rows * partner, axis=1) - own_dot, own_dot)
        return distance_from_dot(row_sq, own, dot)  # |x'_j| = |x_j|

    return distance_to


def _view_batch(view: SymmetricView) -> _batch.PairBatch:
    return view.batch._replace(  # the view's positives are the batch's: pos_count holds
        pos=view.pos, neg=view.neg, neg_count=view.neg_count
    )


@functools.partial(jax.jit, static_argnames=("mining", "axis_name"))
@_checks.propagate_nonfinite()
def symmetric_triplet_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    margin: float = 0.2,
    mining: str = "all",
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Symm + triplet: :func:`~dml_jax.losses.triplet_loss` over the original positives and
    the symmetric hard negatives (one per pair of another class) — a **reconstruction** (see
    the module docstring). ``mining`` (``"all"``, ``"batch_hard"``, ``"semi_hard"``) then acts
    on those candidates exactly as in ``triplet_loss``. Pair layout; other arguments and
    defaults as ``triplet_loss``. Memory: a few ``[b, B]`` matrices.
    """
    _checks.check_choice(mining, "mining", MINING)
    view = symmetric_view(embeddings, labels, where=where, axis_name=axis_name)
    # The view's columns keep each anchor's partner (its one positive) next to it, so the
    # triplet miners' 2-slot path applies.
    return triplet_from_distances(
        distances.safe_sqrt(view.sq), _view_batch(view), margin=margin, mining=mining,
        axis_name=axis_name, distance_to=_mined_distances(view),
    )


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite()
def symmetric_lifted_structure_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    neg_margin: float = 1.0,
    pos_margin: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Symm + lifted structure: :func:`~dml_jax.losses.lifted_structure_loss` with each row's
    negative set ``N_i`` replaced by its symmetric hard negatives — a **reconstruction** (see
    the module docstring). Pair layout; arguments and defaults as ``lifted_structure_loss``.
    """
    view = symmetric_view(embeddings, labels, where=where, axis_name=axis_name)
    return lifted_from_distances(
        distances.safe_sqrt(view.sq), view.neg, view.batch.pos,
        neg_margin=neg_margin, pos_margin=pos_margin, axis_name=axis_name,
        pos_count=view.batch.pos_count, first_positive=_windows.first_same_label(view.batch),
    )


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite()
def symmetric_contrastive_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    pos_margin: float = 0.0,
    neg_margin: float = 1.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Symm + contrastive (dml_jax's extension; not in the paper): mean over positive pairs of
    ``relu(d - pos_margin)`` + mean over (row, negative pair) of ``relu(neg_margin - d~)`` with
    ``d~`` the distance to the symmetric hard negative. Pair layout; defaults as
    :func:`~dml_jax.losses.contrastive_loss`.
    """
    view = symmetric_view(embeddings, labels, where=where, axis_name=axis_name)
    return contrastive_from_distances(
        distances.safe_sqrt(view.sq), view.pos, view.neg,
        pos_margin=pos_margin, neg_margin=neg_margin, axis_name=axis_name,
        counts=(jnp.sum(view.batch.pos_count), jnp.sum(view.neg_count)),
    )


@functools.partial(jax.jit, static_argnames=("epsilon", "axis_name"))
@_checks.propagate_nonfinite()
def symmetric_multi_similarity_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float = 2.0,
    beta: float = 50.0,
    base: float = 0.5,
    epsilon: float | None = None,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Symm + multi-similarity (dml_jax's extension; not in the paper):
    :func:`~dml_jax.losses.multi_similarity_loss` with each anchor's negatives replaced by its
    symmetric hard negatives, mined on cosine similarity (the most similar of the four points).
    Pair layout; arguments, defaults and the optional ``epsilon`` pair mining as
    ``multi_similarity_loss``.
    """
    view = symmetric_view(
        embeddings, labels, normalize=True, where=where, axis_name=axis_name
    )
    return multi_similarity_from_similarities(
        view.dots, view.pos, view.neg, view.batch.row_valid,
        alpha=alpha, beta=beta, base=base, epsilon=epsilon, axis_name=axis_name,
    )


@functools.partial(jax.jit, static_argnames=("kernel", "attention", "axis_name"))
@_checks.propagate_nonfinite(rows=("embeddings", "logits"))
def symmetric_osm_caa_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    logits: jax.typing.ArrayLike | None = None,
    *,
    margin: float = 1.2,
    sigma: float = 0.8,
    lam: float = 0.5,
    kernel: str = "paper",
    attention: str = "softmax",
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    """Symm + OSM+CAA (dml_jax's extension; not in the paper): :func:`~dml_jax.losses.
    osm_caa_loss` with the negative pairs replaced by (row, symmetric hard negative), mined on
    the L2-normalised points. A synthetic point ``x'_k`` carries the attention of ``x_k`` it
    was made from. Pair layout; arguments and defaults as ``osm_caa_loss``.
    """
    _checks.check_choice(kernel, "kernel", KERNELS)
    _checks.check_choice(attention, "attention", ATTENTIONS)
    view = symmetric_view(
        embeddings, labels, normalize=True, where=where, axis_name=axis_name
    )
    a_rows, a_cols = prepare_attention(logits, view.batch, attention, axis_name)
    # A mined point sits in the column of the point it reflects and carries its attention.
    return osm_caa_from_squared_distances(
        view.sq, view.pos, view.neg, a_rows, a_cols,
        margin=margin, sigma=sigma, lam=lam, kernel=kernel, axis_name=axis_name,
    )


POSITIVE_RULES = ("max", "original")
NPAIR_COMBINATIONS = tuple(itertools.combinations(POINTS, 2))  # the official code's 6
ANGULAR_COMBINATIONS = tuple(itertools.permutations(POINTS, 2))  # the official code's 12


def _max_logits(layout: PairLayout, combos, original, positive: str, degree=None) -> jax.Array:
    logits = max_pair_logits(layout, combos, degree=degree)
    if positive == "original":
        logits = jnp.where(same_class(layout), original, logits)
    return logits


@functools.partial(jax.jit, static_argnames=("positive", "axis_name"))
@_checks.propagate_nonfinite()
def symmetric_npair_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    l2_reg: float = 0.002,
    positive: str = "max",
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Symm + N-pair, as the official code's ``symm_npair_loss``.

    .. math::
       S_{ij} = \max_{(X, Y)} X_i^\top Y_j,\quad (X, Y) \in \{(a,p), (a,s_1), (a,s_2),
       (p,s_1), (p,s_2), (s_1,s_2)\}

    with ``s1 = reflect(p about a)``, ``s2 = reflect(a about p)`` of each pair, then the
    soft-max cross-entropy and L2 regulariser of :func:`~dml_jax.losses.npair_loss`.
    ``positive="max"`` (default, official code) takes the max on the same-class logits too;
    ``"original"`` keeps ``a_i.p_j`` there (the paper's description: only the negatives are
    synthesised). The official code computes the regulariser only with ``with_l2reg``; the
    default here keeps Sohn's ``0.002``.

    Args:
      embeddings: float ``[B, D]`` in the pair layout; not normalised.
      labels: int ``[B]``.
      l2_reg: ``lambda_reg``. Default 0.002.
      positive: ``"max"`` or ``"original"``.
      where: optional bool ``[B]``; a pair takes part only if both its rows are True.
      axis_name: mesh/pmap axis for a global-batch loss.

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device.

    References:
      Gu, Ko, "Symmetrical Synthesis for Deep Metric Learning", AAAI 2020; official code
      clovaai/symmetrical-synthesis ``losses.py``.
    """
    _checks.check_choice(positive, "positive", POSITIVE_RULES)
    layout = pair_layout(embeddings, labels, where, axis_name)
    logits = _max_logits(layout, NPAIR_COMBINATIONS, layout.ap, positive)
    return softmax_cross_entropy(logits, layout, axis_name) + l2_reg * l2_regulariser(
        layout, axis_name
    )


@functools.partial(jax.jit, static_argnames=("degree", "positive", "axis_name"))
@_checks.propagate_nonfinite()
def symmetric_angular_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    degree: float = 45.0,
    l2_reg: float = 0.0,
    positive: str = "max",
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Symm + angular, as the official code's ``symm_angular_loss``: the element-wise max of
    the angular logit matrices (see :func:`~dml_jax.losses.angular_loss`) over the 12 ordered
    pairs ``(X, Y)`` of distinct points of ``{a, p, s1, s2}`` (X as anchors, Y as positives),
    then the soft-max cross-entropy. ``positive="original"`` keeps the original angular logit
    on the same-class entries; ``"max"`` (default) is the official code.

    Args:
      embeddings: float ``[B, D]`` in the pair layout; not normalised.
      labels: int ``[B]``.
      degree: ``alpha`` in degrees (static). Default 45.
      l2_reg: ``lambda_reg``. Default 0.
      positive: ``"max"`` or ``"original"``.
      where: optional bool ``[B]``.
      axis_name: mesh/pmap axis for a global-batch loss.

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device.

    References:
      Gu, Ko, AAAI 2020; Wang et al., "Deep Metric Learning with Angular Loss", ICCV 2017.
    """
    _checks.check_choice(positive, "positive", POSITIVE_RULES)
    layout = pair_layout(embeddings, labels, where, axis_name)
    original = angular_logits(layout, "a", "p", degree)
    logits = _max_logits(layout, ANGULAR_COMBINATIONS, original, positive, degree=degree)
    return softmax_cross_entropy(logits, layout, axis_name) + l2_reg * l2_regulariser(
        layout, axis_name
    )
