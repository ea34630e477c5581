"""Classifier-side helpers shared by the losses that also see logits: validation, softmax
probabilities of the true class, and a ``where``/``axis_name``-aware cross-entropy."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dml_jax import _checks
from dml_jax.losses import _batch, _class_batch


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
    picked, in_range = _true_class_logit(logits, labels)
    return jnp.where(in_range, -_negative_log_softmax(logits, picked), _batch.NEG_LARGE)


def _true_class_logit(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(logits[i, y_i], y_i in [0, C))``, ``[B]`` each (0 for a label outside)."""
    one_hot = _class_batch.one_hot(labels, logits.shape[1])
    return jnp.sum(jnp.where(one_hot, logits, 0.0), axis=1), jnp.any(one_hot, axis=1)


def _negative_log_softmax(logits: jax.Array, true_logit: jax.Array) -> jax.Array:
    """``logsumexp(logits_i) - true_logit_i``, float32 ``[B]``, computed as ``log sum_c
    exp(z_ic - m_i) - (t_i - m_i)`` with ``m_i`` the row's max (as ``log_softmax``: exact 0
    for a saturated row), without a ``[B, C]`` log-probability array."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=1))
    return jnp.log(jnp.sum(jnp.exp(logits - top[:, None]), axis=1)) - (true_logit - top)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    row_valid: jax.Array,
    axis_name: str | None,
    *,
    true_logit: jax.Array | None = None,
) -> jax.Array:
    """Mean over the valid rows of the global batch of ``-log softmax(logits_i)[y_i]``.

    ``true_logit`` ``[b]``: ``logits[i, y_i]`` when the caller has it (saves a ``[b, C]``
    pass); it must equal that entry (one of the row's logits), or the max shift is wrong.

    A label outside ``[0, C)`` is a caller error; such a row contributes ``-NEG_LARGE``-sized
    terms, so the caller must mask it with ``where``.
    """
    if true_logit is None:
        picked, in_range = _true_class_logit(logits, labels)
        true_logit = jnp.where(in_range, picked, _batch.NEG_LARGE)
    nll = _negative_log_softmax(logits, true_logit)
    return _batch.global_mean(_batch.masked_sum(nll, row_valid), jnp.sum(row_valid), axis_name)
