"""Center loss (Wen et al. 2016), its moving center update, and the joint center-based
structured metric loss reconstructed from Gong, Zhong, Hu & Hua (Remote Sensing 2019)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks, distances, parallel
from dml_jax.losses import _batch, _classify
from dml_jax.losses.lifted import lifted_structure_loss


def _check_centers(centers: jax.typing.ArrayLike, dim: int) -> jax.Array:
    centers = jnp.asarray(centers)
    if centers.ndim != 2 or centers.shape[1] != dim:
        raise ValueError(
            f"`centers` must have shape [C, D] with D = {dim} (the embedding size); "
            f"got shape {centers.shape}."
        )
    if not jnp.issubdtype(centers.dtype, jnp.floating):
        raise ValueError(f"`centers` must be a floating array; got dtype {centers.dtype}.")
    return centers.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite(whole=("centers",))
def center_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    centers: jax.typing.ArrayLike,
    *,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Center loss: mean over the valid rows of ``1/2 ||f_i - c_{y_i}||^2``.

    Gradients reach both ``embeddings`` and ``centers`` (learned centers); pass
    ``jax.lax.stop_gradient(centers)`` and move them with :func:`update_centers` for Wen et
    al.'s scheme. Under ``axis_name`` with ``pmap`` or ``shard_map(check_vma=False)``, each
    device's gradient for the replicated ``centers`` is its own rows' share: ``psum`` it, as
    for any data-parallel parameter (with ``check_vma=True`` JAX returns the full gradient).

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]`` in ``[0, C)`` (out-of-range labels are clipped to it).
      centers: float ``[C, D]``.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar (0 without a valid row). Memory: ``[b, D]``.

    References:
      Wen, Zhang, Li, Qiao, "A Discriminative Feature Learning Approach for Deep Face
      Recognition", ECCV 2016.
    """
    rows, labels, valid = _checks.check_embeddings_labels(embeddings, labels, where)
    centers = _check_centers(centers, rows.shape[1])
    own = jnp.take(centers, labels, axis=0, mode="clip")
    terms = 0.5 * jnp.sum(jnp.square(rows - own), axis=1)
    return _batch.global_mean(_batch.masked_sum(terms, valid), jnp.sum(valid), axis_name)


@functools.partial(jax.jit, static_argnames=("axis_name",))
def update_centers(
    centers: jax.typing.ArrayLike,
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    alpha: float = 0.5,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Wen et al.'s moving center update over the (global) batch.

    .. math::
       \Delta c_j = \frac{\sum_{i: y_i = j} (c_j - f_i)}{1 + n_j},\qquad
       c_j \leftarrow c_j - \alpha\, \Delta c_j

    with ``n_j`` the number of valid rows of class ``j``; classes absent from the batch keep
    their center. Under ``axis_name`` the counts and sums are over the global batch, so every
    device returns the same centers. No gradient flows through the result.

    Args:
      centers: float ``[C, D]``.
      embeddings: float ``[B, D]``.
      labels: int ``[B]``; labels outside ``[0, C)`` are ignored.
      alpha: the center learning rate. Default 0.5.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis (see :mod:`dml_jax.parallel`).

    Returns:
      float32 ``[C, D]``, the new centers. Memory: ``[C, D]``.

    References:
      Wen, Zhang, Li, Qiao, ECCV 2016 (Algorithm 1).
    """
    rows, labels, valid = _checks.check_embeddings_labels(embeddings, labels, where)
    centers = jax.lax.stop_gradient(_check_centers(centers, rows.shape[1]))
    rows = jax.lax.stop_gradient(jnp.where(valid[:, None], rows, 0.0))
    num = centers.shape[0]
    counts = jax.ops.segment_sum(valid.astype(jnp.float32), labels, num_segments=num)
    sums = jax.ops.segment_sum(rows, labels, num_segments=num)
    counts = parallel.global_count(counts, axis_name)
    sums = parallel.global_count(sums, axis_name)
    delta = (counts[:, None] * centers - sums) / (1.0 + counts[:, None])
    return centers - alpha * delta


def center_separation(centers: jax.Array, center_margin: float) -> jax.Array:
    """Mean over ordered pairs ``k != l`` of ``[m_c - ||c_k - c_l||^2]_+`` (0 if ``C < 2``)."""
    num = centers.shape[0]
    if num < 2:
        return jnp.asarray(0.0, jnp.float32)
    sq = distances.pairwise_squared_distances(centers)
    off = ~jnp.eye(num, dtype=bool)
    return _batch.masked_sum(jax.nn.relu(center_margin - sq), off) / (num * (num - 1))


@functools.partial(jax.jit, static_argnames=("learn_centers", "axis_name"))
@_checks.propagate_nonfinite(rows=("embeddings", "logits"), whole=("centers",))
def center_structured_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    logits: jax.typing.ArrayLike,
    centers: jax.typing.ArrayLike,
    *,
    lam: float = 1.0,
    beta: float = 1.0,
    neg_margin: float = 1.0,
    center_margin: float = 1.0,
    learn_centers: bool = True,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Joint center-based structured metric loss — a **reconstruction** of Gong et al. 2019.

    The paper's formulas could not be retrieved; only its abstract is verified (cross-entropy
    + structured metric loss + a term pulling features to their class center + a term pushing
    centers apart). This is the reconstruction of the paper (see ``docs/losses.md``):

    .. math::
       L = L_{CE} + \lambda \big(L_{lifted} + L_{intra} + \beta L_{inter}\big)

       L_{intra} = \frac1{|V|}\sum_{i\in V} \tfrac12 \|f_i - c_{y_i}\|^2,\qquad
       L_{inter} = \frac1{C(C-1)}\sum_{k\ne l} [m_c - \|c_k - c_l\|^2]_+

    ``L_CE`` is the mean softmax cross-entropy of ``logits`` over the valid rows,
    ``L_lifted`` is :func:`~dml_jax.losses.lifted_structure_loss` (Song et al. 2016, margin
    ``neg_margin``), ``L_intra`` is :func:`center_loss`. dml_jax averages ``L_intra`` and
    ``L_inter`` (the paper writes sums) so that ``lambda`` and ``beta`` do not scale with the
    batch size or the number of classes.

    Centers are either learned (``learn_centers=True``, default: gradients reach ``centers``)
    or moved by :func:`update_centers` (``learn_centers=False``: ``centers`` are constants here
    and ``L_inter`` then has no effect on training). Under ``axis_name`` with ``pmap`` or
    ``shard_map(check_vma=False)`` the ``centers`` gradient of each device is a share to be
    ``psum``-ed (the ``L_inter`` gradient sits on device 0).

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]`` in ``[0, C)``.
      logits: float ``[B, C']`` classifier logits of the same rows.
      centers: float ``[C, D]``.
      lam: ``lambda``, weight of the metric terms. Default 1.
      beta: ``beta``, weight of the center-separation term. Default 1.
      neg_margin: the lifted-structure margin. Default 1.
      center_margin: ``m_c`` on squared center distances. Default 1.
      learn_centers: whether gradients reach ``centers``. Default True.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device plus ``[C, C]``.

    References:
      Gong, Zhong, Hu, Hua, "Joint Learning of the Center Points and Deep Metrics for Land-Use
      Classification in Remote Sensing", Remote Sensing 11(1):76, 2019; Wen et al., ECCV 2016;
      Song et al., CVPR 2016.
    """
    rows, labels_, valid = _checks.check_embeddings_labels(embeddings, labels, where)
    logits = _classify.check_logits(logits, labels_, valid)
    centers = _check_centers(centers, rows.shape[1])
    if not learn_centers:
        centers = jax.lax.stop_gradient(centers)
    ce = _classify.cross_entropy(logits, labels_, valid, axis_name)
    lifted = lifted_structure_loss(
        embeddings, labels, neg_margin=neg_margin, where=where, axis_name=axis_name
    )
    intra = center_loss(embeddings, labels, centers, where=where, axis_name=axis_name)
    inter = center_separation(centers, center_margin)
    if axis_name is not None:
        first = jax.lax.axis_index(axis_name) == 0
        inter = parallel.global_sum(jnp.where(first, inter, 0.0), axis_name)
    return ce + lam * (lifted + intra + beta * inter)
