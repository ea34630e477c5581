"""Padded waveform batches, and the normalised log-mel features of a whole source."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dml_jax.audio.frontend import frame_mask, log_mel, normalize_utterance


def pad_waveforms(
    waveforms: Sequence[np.ndarray], *, length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pads waveforms at the end to a common length.

    Args:
      waveforms: ``B`` float arrays ``[T_b]``.
      length: the padded length ``T`` (default: the longest); must be ``>= max T_b`` (a batch
        never truncates; crop in the source with ``max_seconds``).

    Returns:
      ``(audio float32 [B, T], lengths int32 [B])``. Holds the padded batch.

    Raises:
      ValueError: no waveforms, a waveform that is not ``[T]``, or ``length`` too short.
    """
    if len(waveforms) == 0:
        raise ValueError("pad_waveforms needs at least one waveform.")
    lengths = np.asarray([np.shape(w)[0] if np.ndim(w) == 1 else -1 for w in waveforms])
    if np.any(lengths < 0):
        raise ValueError("every waveform must have shape [T].")
    t = int(lengths.max()) if length is None else int(length)
    if t < lengths.max():
        raise ValueError(f"length={t} is shorter than the longest waveform "
                         f"({lengths.max()} samples); crop it in the source instead.")
    out = np.zeros((len(waveforms), t), np.float32)
    for i, w in enumerate(waveforms):
        out[i, : lengths[i]] = w
    return out, lengths.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("n_mels", "n_fft", "hop_length", "sample_rate"))
def _features(audio, lengths, *, n_mels, n_fft, hop_length, sample_rate):
    feats = log_mel(audio, sample_rate=sample_rate, n_mels=n_mels, n_fft=n_fft,
                    hop_length=hop_length)
    mask = frame_mask(lengths, audio.shape[-1], hop_length=hop_length)
    return normalize_utterance(feats, mask), mask


def source_features(
    source,
    *,
    n_mels: int = 40,
    n_fft: int = 400,
    hop_length: int = 160,
    frames_multiple: int = 16,
    batch_size: int = 64,
) -> dict[str, np.ndarray]:
    """Decodes every record and returns its normalised log-mel features, padded.

    Args:
      source: an audio source (``len``, ``source[i]["audio"]``, ``labels``, ``speakers``,
        ``sample_rate``).
      n_mels, n_fft, hop_length: the :func:`~dml_jax.audio.log_mel` options.
      frames_multiple: the padded frame count is a multiple of this (fewer compiled shapes).
      batch_size: records per jitted log-mel call.

    Returns:
      ``{"features": float32 [N, F, n_mels]`` (per-utterance normalised, 0 on padding),
      ``"mask": bool [N, F]``, ``"labels": int32 [N]``, ``"speakers": str [N]}``. Holds all
      of them plus one padded waveform batch.
    """
    n = len(source)
    if n == 0:
        raise ValueError("source_features: the source is empty.")
    audio = [source[i]["audio"] for i in range(n)]
    longest = max(a.shape[0] for a in audio)
    # (frames - 1) * hop >= longest, so no waveform is cut
    frames = -(-(2 + longest // hop_length) // frames_multiple) * frames_multiple
    t = (frames - 1) * hop_length
    feats = np.zeros((n, frames, n_mels), np.float32)
    masks = np.zeros((n, frames), bool)
    for s in range(0, n, batch_size):
        chunk = audio[s : s + batch_size]
        batch, lengths = pad_waveforms(chunk + [chunk[0]] * (batch_size - len(chunk)), length=t)
        f, m = _features(jnp.asarray(batch), jnp.asarray(lengths), n_mels=n_mels, n_fft=n_fft,
                         hop_length=hop_length, sample_rate=int(source.sample_rate))
        feats[s : s + len(chunk)] = np.asarray(f)[: len(chunk)]
        masks[s : s + len(chunk)] = np.asarray(m)[: len(chunk)]
    return {"features": feats, "mask": masks, "labels": np.asarray(source.labels, np.int32),
            "speakers": np.asarray(source.speakers)}
