"""Classifier-side helpers shared by the losses that also see logits: validation, softmax
probabilities of the true class, and a ``where``/``axis_name``-aware cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dml_jax import _checks
from dml_jax.losses import _batch


def check_logits(logits: jax.typing.ArrayLike, labels: jax.Array,
                 row_valid: jax.Array | None = None) -> jax.Array:
    """Validates ``logits`` float ``[B, C]`` against ``labels`` ``[B]``; returns float32 logits,
    with the rows whose ``row_valid`` ``[B]`` is False set to 0 (they take no part, even when
    they hold NaN or inf).

    Raises:
      ValueError: naming ``logits`` and its shape.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"`logits` must have shape [B, C]; got shape {logits.shape}.")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"`logits` must be a floating array; got dtype {logits.dtype}.")
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"`logits` has shape {logits.shape} but `labels` has shape {labels.shape}: "
            "their leading (batch) dimensions must match."
        )
    logits = logits.astype(jnp.float32)
    return logits if row_valid is None else _checks.mask_rows(logits, row_valid)


def true_class_log_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``log softmax(logits_i)[y_i]``, float32 ``[B]``; ``-inf``-free: a label outside
    ``[0, C)`` gives ``_batch.NEG_LARGE`` (probability 0)."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    one_hot = labels[:, None] == jnp.arange(logits.shape[1])[None, :]
    in_range = jnp.any(one_hot, axis=1)
    picked = jnp.sum(jnp.where(one_hot, log_p, 0.0), axis=1)
    return jnp.where(in_range, picked, _batch.NEG_LARGE)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, row_valid: jax.Array, axis_name: str | None
) -> jax.Array:
    """Mean over the valid rows of the global batch of ``-log softmax(logits_i)[y_i]``.

    A label outside ``[0, C)`` is a caller error; such a row contributes ``-NEG_LARGE``-sized
    terms, so the caller must mask it with ``where``.
    """
    nll = -true_class_log_probability(logits, labels)
    return _batch.global_mean(_batch.masked_sum(nll, row_valid), jnp.sum(row_valid), axis_name)
