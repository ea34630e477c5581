"""SpecAugment-style masking of (normalised) log-mel features (Park et al., Interspeech 2019).

Time and frequency masking only (no time warping). Masks are drawn from a JAX key, so the
function is pure and jit-able; masked cells are set to ``fill`` (0, the mean after
:func:`dml_jax.audio.normalize_utterance`). Time masks lie inside each utterance's valid
frames, so padding never changes what is masked.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _band(key, n_masks: int, max_width: int, length: jax.Array, size: int) -> jax.Array:
    """bool ``[B, size]``: the union of ``n_masks`` bands of width ``[0, max_width]`` each,
    starting uniformly in ``[0, length - width]`` (``length`` int ``[B]``)."""
    b = length.shape[0]
    k_w, k_s = jax.random.split(key)
    width = jax.random.randint(k_w, (b, n_masks), 0, max_width + 1)
    width = jnp.minimum(width, length[:, None])
    start = (jax.random.uniform(k_s, (b, n_masks)) * (length[:, None] - width + 1))
    start = jnp.floor(start).astype(jnp.int32)
    pos = jnp.arange(size)[None, None, :]
    inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])
    return jnp.any(inside, axis=1)


def spec_augment(
    key: jax.Array,
    features: jax.Array,
    mask: jax.Array,
    *,
    num_time_masks: int = 2,
    max_time_width: int = 10,
    num_freq_masks: int = 2,
    max_freq_width: int = 8,
    fill: float = 0.0,
) -> jax.Array:
    """Masks random time and frequency bands of each utterance.

    Args:
      key: a JAX PRNG key.
      features: float ``[B, T, M]``.
      mask: bool ``[B, T]``, the valid frames; time masks fall inside them.
      num_time_masks, max_time_width: bands of ``0..max_time_width`` frames per utterance.
      num_freq_masks, max_freq_width: bands of ``0..max_freq_width`` mel bins.
      fill: the value of masked cells.

    Returns:
      ``features`` with the masked cells set to ``fill`` (same shape and dtype). Memory: two
      boolean masks ``[B, T]`` and ``[B, M]``.
    """
    if features.ndim != 3 or mask.shape != features.shape[:2]:
        raise ValueError(f"`features` must be [B, T, M] and `mask` [B, T]; got "
                         f"{features.shape} and {mask.shape}.")
    b, t, m = features.shape
    k_t, k_f = jax.random.split(key)
    lengths = jnp.sum(mask, axis=1).astype(jnp.int32)
    time = _band(k_t, num_time_masks, max_time_width, lengths, t) if num_time_masks else None
    freq = (_band(k_f, num_freq_masks, max_freq_width, jnp.full((b,), m, jnp.int32), m)
            if num_freq_masks else None)
    out = features
    if time is not None:
        out = jnp.where(time[:, :, None], fill, out)
    if freq is not None:
        out = jnp.where(freq[:, None, :], fill, out)
    return out.astype(features.dtype)
