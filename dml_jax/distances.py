"""Pairwise distances, similarities and label masks.

All functions compute in float32 whatever the input dtype (bfloat16 inputs are upcast), and hold
one ``[N, M]`` matrix. Euclidean distances come from the Gram matrix,
``||x||^2 + ||y||^2 - 2 x.y``, clamped at 0 before a square root whose gradient is defined
(and zero) at ``d = 0``; in float32 the Gram form's rounding error on a squared distance is
about ``1e-7 * (||x||^2 + ||y||^2)``, so two identical rows may be reported at a distance of
order ``3e-4 * ||x||`` rather than exactly 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Squared distances at or below this are treated as 0 (distance < 1e-6): their square root's
# gradient would otherwise be unbounded.
_SQ_DIST_FLOOR = 1e-12
# Norms below this count as this in a normalisation (a zero vector scales to zero).
_NORM_FLOOR = 1e-12


def _f32(x: jax.typing.ArrayLike) -> jax.Array:
    return jnp.asarray(x).astype(jnp.float32)


def l2_normalize(x: jax.typing.ArrayLike, axis: int = -1, eps: float = _NORM_FLOOR) -> jax.Array:
    """Scales ``x`` to unit L2 norm along ``axis``; a zero vector stays zero (finite gradient).

    Args:
      x: float array, e.g. ``[B, D]``.
      axis: the axis to normalise.
      eps: norms below ``eps`` are treated as ``eps``.

    Returns:
      float32 array of ``x``'s shape.
    """
    x = _f32(x)
    return x * _inverse_norms(x, axis, eps, keepdims=True)


def _inverse_norms(
    x: jax.Array, axis: int = -1, eps: float = _NORM_FLOOR, *, keepdims: bool = False
) -> jax.Array:
    """``1 / max(||x||, eps)`` along ``axis``, float32 (a zero vector scales to zero)."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    return jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def normalized_squared_norms(x: jax.typing.ArrayLike, eps: float = _NORM_FLOOR) -> jax.Array:
    """The squared norms of :func:`l2_normalize`'s rows, ``||x_i||^2 / max(||x_i||, eps)^2 =
    min(||x_i||^2 / eps^2, 1)``, exactly: 1 for every row of norm at least ``eps``, with zero
    gradient there, as in exact arithmetic (summing the normalised row's squares rounds to
    ``1 +- 1e-7``, and its gradient is that rounding's), less for a shorter row, 0 for a zero
    row.

    Args:
      x: float ``[N, D]``.
      eps: as :func:`l2_normalize`'s.

    Returns:
      float32 ``[N]``.
    """
    x = _f32(x)
    return jnp.minimum(jnp.sum(x * x, axis=-1) / (eps * eps), 1.0)


def dot_products(x: jax.typing.ArrayLike, y: jax.typing.ArrayLike | None = None) -> jax.Array:
    """``x @ y.T`` in float32, full precision: ``x`` ``[N, D]``, ``y`` ``[M, D]`` -> ``[N, M]``."""
    x = _f32(x)
    y = x if y is None else _f32(y)
    return jnp.matmul(x, y.T, precision=jax.lax.Precision.HIGHEST)


def pairwise_squared_distances(
    x: jax.typing.ArrayLike, y: jax.typing.ArrayLike | None = None
) -> jax.Array:
    """Squared Euclidean distances ``||x_i - y_j||^2``, clamped at 0.

    Args:
      x: ``[N, D]``.
      y: ``[M, D]``; ``x`` when None.

    Returns:
      float32 ``[N, M]``.
    """
    x = _f32(x)
    y = x if y is None else _f32(y)
    sq_x = jnp.sum(x * x, axis=-1)
    sq_y = jnp.sum(y * y, axis=-1)
    sq = sq_x[:, None] + sq_y[None, :] - 2.0 * dot_products(x, y)
    return jnp.maximum(sq, 0.0)


@jax.custom_jvp
def safe_sqrt(sq: jax.Array) -> jax.Array:
    """``sqrt(sq)`` with value and gradient 0 where ``sq <= 1e-12`` (never NaN or inf).

    The value is one chain ending in the square root, ``sqrt(where(sq > 1e-12, sq, 0))``,
    which XLA computes once into a buffer; written as a select around the root (the plain
    way to keep the gradient finite), the select was fused into each consumer, which then
    read ``sq`` as well as the roots. The derivative is the square root's,
    ``0.5 / sqrt(sq)``, where ``sq > 1e-12`` and 0 elsewhere.
    """
    return jnp.sqrt(jnp.where(sq > _SQ_DIST_FLOOR, sq, 0.0))


@safe_sqrt.defjvp
def _safe_sqrt_jvp(primals, tangents):
    (sq,), (t,) = primals, tangents
    root = safe_sqrt(sq)
    # As autodiff of where(sq > floor, sqrt(sq), 0): the tangent times 0.5 / root there.
    return root, jnp.where(sq > _SQ_DIST_FLOOR, t * (0.5 / jnp.where(root > 0, root, 1.0)), 0.0)


def pairwise_distances(
    x: jax.typing.ArrayLike, y: jax.typing.ArrayLike | None = None
) -> jax.Array:
    """Euclidean distances ``d_ij = ||x_i - y_j||_2`` (not squared), finite gradient at 0.

    Args:
      x: ``[N, D]``.
      y: ``[M, D]``; ``x`` when None.

    Returns:
      float32 ``[N, M]``. Memory: one ``[N, M]`` matrix (plus its gradient).
    """
    return safe_sqrt(pairwise_squared_distances(x, y))


def cosine_similarity(
    x: jax.typing.ArrayLike, y: jax.typing.ArrayLike | None = None
) -> jax.Array:
    """Cosine similarities ``x_i.y_j / (||x_i|| ||y_j||)``; 0 for a zero vector.

    The value and gradient are those of ``l2_normalize(x) @ l2_normalize(y).T`` (norms below
    1e-12 count as 1e-12), computed without normalised copies: the product of the raw rows
    is scaled by the inverse norms, so the backward pass is the two products of the scaled
    cotangent plus a per-row correction (no ``[N, D]`` / ``[M, D]`` temporaries beside the
    gradients).

    Args:
      x: ``[N, D]``.
      y: ``[M, D]``; ``x`` when None.

    Returns:
      float32 ``[N, M]`` in ``[-1, 1]`` (up to rounding).
    """
    x = _f32(x)
    y = x if y is None else _f32(y)
    return dot_products(x, y) * _inverse_norms(x)[:, None] * _inverse_norms(y)[None, :]


def same_label_mask(
    labels_a: jax.typing.ArrayLike, labels_b: jax.typing.ArrayLike | None = None
) -> jax.Array:
    """``labels_a[i] == labels_b[j]`` as bool ``[N, M]`` (``labels_b = labels_a`` when None)."""
    labels_a = jnp.asarray(labels_a)
    labels_b = labels_a if labels_b is None else jnp.asarray(labels_b)
    return labels_a[:, None] == labels_b[None, :]
