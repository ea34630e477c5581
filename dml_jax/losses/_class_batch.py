"""The view of a batch against learned per-class parameters (proxies, classifier weights).

The proxy and margin-softmax losses compare each local row ``[b, D]`` with ``C`` parameter rows
``[C, D]``; they never need the other devices' rows, only sums over rows: a mean over the valid
rows (:func:`dml_jax.losses._classify.cross_entropy`) or, per class, a log-sum-exp over rows
(:func:`logsumexp_over_rows`).
Under ``axis_name`` those sums are global (see :mod:`dml_jax.parallel`), so the value is the
global-batch loss and each device's gradient is exactly its rows of the single-device one.

A row whose label is outside ``[0, C)`` has no parameter row of its own: it is treated like a
row with ``where`` False and takes no part.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dml_jax import _checks, parallel
from dml_jax.losses import _batch


class ClassBatch(NamedTuple):
    """Local rows and the class parameters. ``b`` local rows, ``C`` parameter rows.

    Attributes:
      rows: float32 ``[b, D]`` local embeddings.
      labels: int32 ``[b]``.
      valid: bool ``[b]``: ``where`` and a label in ``[0, C)``.
      params: float32 ``[C, D]``.
    """

    rows: jax.Array
    labels: jax.Array
    valid: jax.Array
    params: jax.Array


def check_params(params: jax.typing.ArrayLike, name: str, dim: int) -> jax.Array:
    """Validates a floating ``[C, D]`` parameter array; returns it as float32.

    Raises:
      ValueError: naming ``name`` and its shape or dtype.
    """
    params = jnp.asarray(params)
    if params.ndim != 2 or params.shape[1] != dim or params.shape[0] < 1:
        raise ValueError(
            f"`{name}` must have shape [C, D] with C >= 1 and D = {dim} (the embedding size); "
            f"got shape {params.shape}."
        )
    if not jnp.issubdtype(params.dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating array; got dtype {params.dtype}.")
    return params.astype(jnp.float32)


def class_batch(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    params: jax.typing.ArrayLike,
    name: str,
    where: jax.typing.ArrayLike | None,
) -> ClassBatch:
    """Validates the inputs and builds the :class:`ClassBatch` (holds only ``[b]`` vectors)."""
    rows, labels, valid = _checks.check_embeddings_labels(embeddings, labels, where)
    params = check_params(params, name, rows.shape[1])
    in_range = (labels >= 0) & (labels < params.shape[0])
    return ClassBatch(rows=rows, labels=labels, valid=valid & in_range, params=params)


def one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
    """bool ``[b, C]``: ``labels[i] == c``."""
    return labels[:, None] == jnp.arange(num_classes, dtype=labels.dtype)[None, :]


def logsumexp_over_rows(
    values: jax.Array, mask: jax.Array, axis_name: str | None
) -> jax.Array:
    """Per column, the log-sum-exp of ``values`` ``[b, C]`` over the masked rows of the global
    batch: float32 ``[C]``, ``_batch.NEG_LARGE`` for a column without a masked row.

    Stable across devices: every device shifts by the global maximum (a constant) before
    summing, and the sums are :func:`dml_jax.parallel.global_sum`-med.
    """
    x = jnp.where(mask, values, _batch.NEG_LARGE)
    top = parallel.global_max(jnp.max(x, axis=0), axis_name)
    top = jnp.where(top > _batch.NEG_LARGE / 2, top, 0.0)
    total = jnp.sum(jnp.where(mask, jnp.exp(x - top), 0.0), axis=0)
    total = parallel.global_sum(total, axis_name)
    count = parallel.global_count(jnp.sum(mask, axis=0, dtype=jnp.float32), axis_name)
    has = count > 0
    return jnp.where(has, jnp.log(jnp.where(has, total, 1.0)) + top, _batch.NEG_LARGE)

