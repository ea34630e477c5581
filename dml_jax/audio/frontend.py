"""Speech front end: log-mel features, frame masks and per-utterance normalisation.

:func:`log_mel` equals librosa's

    power_to_db(melspectrogram(y=w, sr=sample_rate, n_fft=n_fft, hop_length=hop_length,
                               win_length=n_fft, window="hann", center=True,
                               pad_mode="constant", power=2.0, n_mels=n_mels, htk=False,
                               norm="slaney"),
                ref=1.0, amin=1e-10, top_db=None).T

computed in float32 with a periodic Hann window, a real FFT per frame and Slaney's mel
filterbank (:func:`mel_filterbank`, built in NumPy). Padded waveforms: frame ``t`` covers
samples ``[t * hop - n_fft // 2, t * hop + n_fft // 2)``, zero outside the signal, so the
first :func:`num_frames` frames of a zero-padded utterance are computed from the same samples
as the frames of the utterance alone (equal up to float32 rounding, which depends on the
batch's shape); :func:`frame_mask` marks them and :func:`normalize_utterance` normalises over them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

_AMIN = 1e-10


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa ``htk=False``): linear below 1 kHz, logarithmic above."""
    hz = np.asarray(hz, np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_part = min_log_mel + np.log(np.maximum(hz, min_log_hz) / min_log_hz) / logstep
    return np.where(hz >= min_log_hz, log_part, hz / f_sp)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, np.float64)
    f_sp = 200.0 / 3.0
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = np.log(6.4) / 27.0
    log_part = min_log_hz * np.exp(logstep * (np.maximum(mel, min_log_mel) - min_log_mel))
    return np.where(mel >= min_log_mel, log_part, f_sp * mel)


@functools.lru_cache(maxsize=16)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Slaney-normalised triangular mel filters from 0 Hz to ``sample_rate / 2``.

    Returns float32 ``[n_fft // 2 + 1, n_mels]`` (the transpose of librosa's
    ``filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, htk=False, norm="slaney")``;
    computed in float64 and rounded once, as librosa does). Cached per argument triple (a few
    KiB each); treat the result as read-only.
    """
    if sample_rate <= 0 or n_fft <= 0 or n_mels <= 0:
        raise ValueError(
            f"sample_rate, n_fft and n_mels must be positive; got {sample_rate}, {n_fft}, "
            f"{n_mels}."
        )
    fft_freqs = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    mel_pts = np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2.0), n_mels + 2)
    hz_pts = mel_to_hz(mel_pts)  # [n_mels + 2]
    widths = np.diff(hz_pts)  # [n_mels + 1]
    ramps = hz_pts[:, None] - fft_freqs[None, :]  # [n_mels + 2, F]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0.0, np.minimum(lower, upper))  # [n_mels, F]
    weights *= (2.0 / (hz_pts[2:] - hz_pts[:-2]))[:, None]
    out = np.ascontiguousarray(weights.T.astype(np.float32))
    out.flags.writeable = False
    return out


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window ``[n]`` float32 (scipy ``get_window("hann", n)``)."""
    k = np.arange(n, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * k / n)).astype(np.float32)


def num_frames(num_samples: jax.typing.ArrayLike, hop_length: int = 160) -> jax.Array:
    """Frames of a centred STFT of ``num_samples`` samples: ``1 + num_samples // hop_length``."""
    return 1 + jnp.asarray(num_samples) // hop_length


def frame_mask(
    lengths: jax.typing.ArrayLike, num_samples: int, *, hop_length: int = 160
) -> jax.Array:
    """Valid frames of zero-padded waveforms.

    Args:
      lengths: int ``[B]``, each waveform's true length in samples (``<= num_samples``).
      num_samples: ``T``, the padded length.
      hop_length: the STFT hop.

    Returns:
      bool ``[B, 1 + T // hop_length]``: frame ``t`` of row ``b`` is True when
      ``t < 1 + lengths[b] // hop_length``, i.e. the frame exists for the unpadded utterance
      (and :func:`log_mel` gives it the same value as for the unpadded utterance). Holds
      only the mask.
    """
    lengths = jnp.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"`lengths` must have shape [B]; got shape {lengths.shape}.")
    frames = 1 + int(num_samples) // hop_length
    return jnp.arange(frames)[None, :] < num_frames(lengths, hop_length)[:, None]


def _check_waveforms(waveforms: jax.typing.ArrayLike) -> jax.Array:
    w = jnp.asarray(waveforms)
    if w.ndim not in (1, 2):
        raise ValueError(f"`waveforms` must have shape [T] or [B, T]; got shape {w.shape}.")
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"`waveforms` must be a floating array; got dtype {w.dtype}.")
    if w.shape[-1] < 1:
        raise ValueError("`waveforms` has no samples (T = 0).")
    return w.astype(jnp.float32)


def power_spectrogram(
    waveforms: jax.typing.ArrayLike, *, n_fft: int = 400, hop_length: int = 160
) -> jax.Array:
    """``|STFT|^2`` with a periodic Hann window, centred frames, zero padding.

    Args:
      waveforms: float ``[T]`` or ``[B, T]``.

    Returns:
      float32 ``[frames, n_fft // 2 + 1]`` (or ``[B, frames, n_fft // 2 + 1]``),
      ``frames = 1 + T // hop_length``. Memory: the framed signal ``[B, frames, n_fft]``.
    """
    w = _check_waveforms(waveforms)
    if n_fft < 2 or hop_length < 1:
        raise ValueError(f"n_fft must be >= 2 and hop_length >= 1; got {n_fft}, {hop_length}.")
    pad = [(0, 0)] * (w.ndim - 1) + [(n_fft // 2, n_fft // 2)]
    padded = jnp.pad(w, pad)
    frames = 1 + w.shape[-1] // hop_length
    idx = jnp.arange(frames)[:, None] * hop_length + jnp.arange(n_fft)[None, :]
    framed = padded[..., idx] * jnp.asarray(hann_window(n_fft))  # [..., frames, n_fft]
    spec = jnp.fft.rfft(framed, axis=-1)
    return (jnp.square(spec.real) + jnp.square(spec.imag)).astype(jnp.float32)


def log_mel(
    waveforms: jax.typing.ArrayLike,
    *,
    sample_rate: int = 16000,
    n_mels: int = 40,
    n_fft: int = 400,
    hop_length: int = 160,
) -> jax.Array:
    """Log-mel power spectrogram in dB, librosa-exact (see the module docstring).

    Args:
      waveforms: float ``[T]`` or ``[B, T]`` at ``sample_rate``.
      sample_rate, n_mels, n_fft, hop_length: as librosa's (``win_length = n_fft``).

    Returns:
      float32 ``[frames, n_mels]`` (or ``[B, frames, n_mels]``), ``frames = 1 + T // hop``:
      ``10 log10(max(1e-10, mel power))``. Jit-able (the shapes and options are static).
      Memory: the framed signal ``[B, frames, n_fft]`` and its spectrum.
    """
    power = power_spectrogram(waveforms, n_fft=n_fft, hop_length=hop_length)
    fb = jnp.asarray(mel_filterbank(int(sample_rate), int(n_fft), int(n_mels)))
    mel = jnp.einsum("...tf,fm->...tm", power, fb, precision=jax.lax.Precision.HIGHEST)
    return (10.0 * jnp.log10(jnp.maximum(_AMIN, mel))).astype(jnp.float32)


def normalize_utterance(
    features: jax.typing.ArrayLike,
    mask: jax.typing.ArrayLike | None = None,
    *,
    eps: float = 1e-5,
) -> jax.Array:
    """Per-utterance mean/variance normalisation of each feature over the valid frames.

    Args:
      features: float ``[frames, M]`` or ``[B, frames, M]``.
      mask: bool ``[frames]`` or ``[B, frames]`` (None: every frame is valid).
      eps: added to the variance.

    Returns:
      float32, the shape of ``features``: ``(x - mean) / sqrt(var + eps)`` with mean and
      (biased) variance over the valid frames of each utterance, and exactly 0 on invalid
      frames, so an utterance's result does not depend on how much padding follows it. An
      utterance without valid frames is all zeros. Memory: one copy of ``features``.
    """
    x = jnp.asarray(features, jnp.float32)
    if x.ndim not in (2, 3):
        raise ValueError(
            f"`features` must have shape [frames, M] or [B, frames, M]; got {x.shape}."
        )
    if mask is None:
        m = jnp.ones(x.shape[:-1], jnp.float32)
    else:
        mask = jnp.asarray(mask)
        if mask.shape != x.shape[:-1]:
            raise ValueError(f"`mask` must have shape {x.shape[:-1]}; got {mask.shape}.")
        m = mask.astype(jnp.float32)
    m = m[..., None]
    count = jnp.maximum(jnp.sum(m, axis=-2, keepdims=True), 1.0)
    mean = jnp.sum(x * m, axis=-2, keepdims=True) / count
    var = jnp.sum(jnp.square(x - mean) * m, axis=-2, keepdims=True) / count
    return (x - mean) * jax.lax.rsqrt(var + eps) * m
