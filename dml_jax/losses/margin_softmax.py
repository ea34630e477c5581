"""Margin-softmax losses on a learned normalised classifier: ArcFace and CosFace.

Both are a softmax cross-entropy over ``scale * cos(theta_ic)`` (cosine of row ``i`` and the
weight row of class ``c``, both L2-normalised), with a margin applied to the true class only.
They equal pytorch-metric-learning 2.9's ``ArcFaceLoss`` / ``CosFaceLoss`` with their default
distance (cosine) and reducer (``MeanReducer``, no swap needed); ``weights`` is PML's ``W.T``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from dml_jax import _checks, distances
from dml_jax.losses import _class_batch, _classify


def _margin_cross_entropy(batch: _class_batch.ClassBatch, target_fn, scale: float,
                          axis_name: str | None) -> jax.Array:
    """The cross-entropy of ``scale * cos`` ``[b, C]`` with the true class's cosine replaced by
    ``target_fn(cos of the true class)``."""
    cos = distances.cosine_similarity(batch.rows, batch.params)
    same = _class_batch.one_hot(batch.labels, cos.shape[1])
    target = scale * target_fn(jnp.sum(jnp.where(same, cos, 0.0), axis=1))
    logits = jnp.where(same, target[:, None], scale * cos)
    return _classify.cross_entropy(logits, batch.labels, batch.valid, axis_name,
                                   true_logit=target)


def _arc_target(cos: jax.Array, margin_rad: jax.Array) -> jax.Array:
    """``cos(theta + m)`` where ``theta <= pi - m``, else ``cos(theta) - m sin(m)``.

    ``sin(theta) = sqrt(1 - cos^2)`` has value and gradient 0 at ``cos = +-1`` (a row pointing
    exactly along its class weight), where ``arccos`` would give an infinite gradient.
    """
    cos = jnp.clip(cos, -1.0, 1.0)
    sin = distances.safe_sqrt(1.0 - cos * cos)
    cos_m, sin_m = jnp.cos(margin_rad), jnp.sin(margin_rad)
    plus_margin = cos * cos_m - sin * sin_m
    return jnp.where(cos >= -cos_m, plus_margin, cos - margin_rad * sin_m)


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite(whole=("weights",))
def arcface_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    weights: jax.typing.ArrayLike,
    *,
    margin: float = 28.6,
    scale: float = 64.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""ArcFace (additive angular margin, Deng et al. 2019), as pytorch-metric-learning's
    ``ArcFaceLoss``.

    With ``theta_ic`` the angle between row ``i`` and weight row ``c`` and ``m`` the margin in
    radians:

    .. math::
       L_i = -\log \frac{e^{s\, \psi(\theta_{iy_i})}}
                        {e^{s\, \psi(\theta_{iy_i})} + \sum_{c\ne y_i} e^{s \cos\theta_{ic}}},
       \qquad \psi(\theta) = \begin{cases} \cos(\theta + m) & \theta \le \pi - m \\
                                          \cos\theta - m \sin m & \text{otherwise}\end{cases}

    averaged over the valid rows (PML's default ``MeanReducer``; no swap needed). The second
    branch keeps the target logit decreasing in ``theta`` (PML's and InsightFace's choice).
    ``cos(theta + m)`` is computed as ``cos theta cos m - sin theta sin m`` (no ``arccos``), so the
    gradient stays finite for a row along its class weight.

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]`` in ``[0, C)``; a row with a label outside takes no part.
      weights: float ``[C, D]``, the classifier's class weights (PML's ``W.T``).
      margin: ``m`` in **degrees** (PML's convention). Default 28.6 (0.5 rad).
      scale: ``s``. Default 64.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`). The
        ``weights`` gradient under ``shard_map`` (``check_vma=True``, the default) is the full
        gradient on every device; under ``pmap`` or ``check_vma=False`` each device gets its
        rows' share: ``psum`` it, as for any data-parallel parameter.

    Returns:
      float32 scalar (0 without a valid row). Memory: a few ``[b, C]`` matrices per device.

    References:
      Deng, Guo, Xue, Zafeiriou, "ArcFace: Additive Angular Margin Loss for Deep Face
      Recognition", CVPR 2019.
    """
    batch = _class_batch.class_batch(embeddings, labels, weights, "weights", where)
    margin_rad = jnp.asarray(margin, jnp.float32) * (math.pi / 180.0)
    return _margin_cross_entropy(batch, lambda c: _arc_target(c, margin_rad), scale, axis_name)


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite(whole=("weights",))
def cosface_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    weights: jax.typing.ArrayLike,
    *,
    margin: float = 0.35,
    scale: float = 64.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""CosFace (large margin cosine loss, Wang et al. 2018), as pytorch-metric-learning's
    ``CosFaceLoss``.

    .. math::
       L_i = -\log \frac{e^{s (\cos\theta_{iy_i} - m)}}
                        {e^{s (\cos\theta_{iy_i} - m)} + \sum_{c\ne y_i} e^{s \cos\theta_{ic}}}

    averaged over the valid rows (PML's default ``MeanReducer``; no swap needed).

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]`` in ``[0, C)``; a row with a label outside takes no part.
      weights: float ``[C, D]``, the classifier's class weights (PML's ``W.T``).
      margin: ``m``, on the cosine. Default 0.35.
      scale: ``s``. Default 64.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`); the
        ``weights`` gradient behaves as in :func:`arcface_loss`.

    Returns:
      float32 scalar (0 without a valid row). Memory: a few ``[b, C]`` matrices per device.

    References:
      Wang, Wang, Zhou, Ji, Gong, Zhou, Li, Liu, "CosFace: Large Margin Cosine Loss for Deep
      Face Recognition", CVPR 2018.
    """
    batch = _class_batch.class_batch(embeddings, labels, weights, "weights", where)
    return _margin_cross_entropy(batch, lambda c: c - margin, scale, axis_name)
