"""log_mel against librosa, frame masks, masked normalisation, SpecAugment."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax.audio import frame_mask, log_mel, mel_filterbank, normalize_utterance, num_frames
from dml_jax.audio.augment import spec_augment

librosa = pytest.importorskip("librosa")


def librosa_log_mel(w, sr=16000, n_mels=40, n_fft=400, hop=160):
    s = librosa.feature.melspectrogram(
        y=w, sr=sr, n_fft=n_fft, hop_length=hop, win_length=n_fft, window="hann", center=True,
        pad_mode="constant", power=2.0, n_mels=n_mels, htk=False, norm="slaney")
    return librosa.power_to_db(s, ref=1.0, amin=1e-10, top_db=None).T


def chirp_noise(seconds=0.9, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    y = 0.5 * np.sin(2 * np.pi * (150 * t + 2000 * t**2)) + 0.05 * rng.standard_normal(t.size)
    return y.astype(np.float32)


@functools.lru_cache(maxsize=1)
def espeak_words():
    """Two eSpeak NG words at 16 kHz (real synthetic speech with silences)."""
    pytest.importorskip("espeakng_loader")
    from dml_jax.audio.espeak import Espeak
    from dml_jax.audio.spoken_words import to_16k

    e = Espeak()
    return [to_16k(e.synthesize(w, voice="en-us+m3"), e.sample_rate) for w in ("seven", "left")]


def assert_matches_librosa(ours, ref):
    """Float32 agreement with librosa, in two statements.

    Everywhere: a mel-power error below 1e-6 of the frame's total mel power. Float32 FFT
    rounding is relative to the frame's energy (librosa's own float32 result differs from its
    float64 one by up to ~4e-7 of it on these signals), so this is the exactness statement
    that holds for bins far below the frame's peak too (there a tiny power error is a visible
    dB error: ~1e-4 dB at 60 dB below the peak).
    On the frame's loud bins (within 20 dB of its peak): equal within 1e-4 dB.
    """
    ours = np.asarray(ours, np.float64)
    assert ours.shape == ref.shape
    assert np.all(np.isfinite(ours))
    p_ours, p_ref = 10.0 ** (ours / 10), 10.0 ** (ref / 10)
    assert np.all(np.abs(p_ours - p_ref) <= 1e-6 * p_ref.sum(axis=-1, keepdims=True))
    loud = ref > ref.max(axis=-1, keepdims=True) - 20.0
    np.testing.assert_allclose(ours[loud], ref[loud], atol=1e-4, rtol=0)


def test_filterbank_equals_librosa():
    for sr, n_fft, n_mels in [(16000, 400, 40), (16000, 512, 80), (22050, 1024, 64)]:
        ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, htk=False, norm="slaney")
        np.testing.assert_allclose(mel_filterbank(sr, n_fft, n_mels), ref.T, rtol=1e-6,
                                   atol=1e-9)


@pytest.mark.parametrize("which", ["chirp", "espeak"])
def test_log_mel_single_batch_and_jit_match_librosa(which):
    waves = [chirp_noise(0.9, 0), chirp_noise(0.5, 1)] if which == "chirp" else espeak_words()
    fn = jax.jit(log_mel)
    for w in waves:
        ref = librosa_log_mel(w)
        assert_matches_librosa(log_mel(w), ref)
        assert_matches_librosa(fn(w), ref)
        assert log_mel(w).dtype == jnp.float32
    n = min(w.size for w in waves)
    batch = np.stack([w[:n] for w in waves])
    ours = fn(batch)
    assert ours.shape == (2, 1 + n // 160, 40)
    for b in range(2):
        assert_matches_librosa(ours[b], librosa_log_mel(batch[b]))


def test_log_mel_other_options_match_librosa():
    w = chirp_noise(0.4, 2)
    ours = log_mel(w, sample_rate=16000, n_mels=64, n_fft=512, hop_length=128)
    assert_matches_librosa(ours, librosa_log_mel(w, n_mels=64, n_fft=512, hop=128))


def test_padded_frames_equal_unpadded_and_mask_marks_them():
    w = chirp_noise(0.37, 3)
    padded = np.concatenate([w, np.zeros(3000, np.float32)])
    mask = frame_mask(jnp.array([w.size, padded.size]), padded.size)
    n = int(num_frames(w.size))
    assert mask.shape == (2, 1 + padded.size // 160)
    assert int(mask[0].sum()) == n and bool(mask[1].all())
    np.testing.assert_allclose(np.asarray(log_mel(padded))[:n], np.asarray(log_mel(w)), atol=1e-4,
                               rtol=0)  # same samples; the FFT batch shape changes rounding


def test_normalize_utterance_uses_valid_frames_only():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (2, 30, 5)).astype(np.float32)
    mask = np.arange(30)[None] < np.array([[17], [30]])
    x_junk = x.copy()
    x_junk[0, 17:] = 1e4  # padding content must not matter
    out = np.asarray(normalize_utterance(x_junk, mask))
    valid = x[0, :17].astype(np.float64)
    expect = (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5)
    np.testing.assert_allclose(out[0, :17], expect, atol=1e-5)
    assert np.all(out[0, 17:] == 0)
    np.testing.assert_allclose(out[1], np.asarray(normalize_utterance(x[1])), atol=1e-6)


def test_spec_augment_masks_inside_valid_frames_deterministically():
    x = jnp.ones((4, 50, 20))
    mask = jnp.arange(50)[None] < jnp.array([[50], [20], [35], [5]])
    fn = jax.jit(functools.partial(spec_augment, num_time_masks=2, max_time_width=6,
                                   num_freq_masks=1, max_freq_width=4))
    a = np.asarray(fn(jax.random.PRNGKey(1), x, mask))
    np.testing.assert_array_equal(a, np.asarray(fn(jax.random.PRNGKey(1), x, mask)))
    assert not np.array_equal(a, np.asarray(fn(jax.random.PRNGKey(2), x, mask)))
    zero_t = np.all(a == 0, axis=2)  # fully masked frames (time masks)
    assert np.all(~zero_t | np.asarray(mask))  # only inside the valid frames
    assert zero_t.sum(axis=1).max() <= 12
    zero_f = np.all(a == 0, axis=1)  # fully masked bins (frequency masks)
    assert zero_f.sum(axis=1).max() <= 4
    assert set(np.unique(a)) <= {0.0, 1.0}
    assert (a == 0).any()
