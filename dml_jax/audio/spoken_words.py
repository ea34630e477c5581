"""The embedded spoken-word set: synthetic isolated command words from eSpeak NG, no download.

:func:`generate_spoken_words` writes, once, ``data_dir/<word>/<speaker>_<repetition>.wav``
(16 kHz mono PCM-16, the layout :func:`dml_jax.audio.audio_folder` reads) and
``data_dir/manifest.csv`` (``path,word,speaker``), then a stamp file ``.complete`` holding the
spec and the generator version; a second call with the same spec does nothing. The files are
byte-identical on every run (see :class:`dml_jax.audio.espeak.Espeak`).

* Speakers ``s01, s02, ...`` are eSpeak voices (an English accent + a voice variant), each with
  its own base rate, pitch and pitch range. Each says every word ``repetitions`` times with
  deterministic per-repetition changes: rate +-15 %, pitch +-8, pitch range +-10, a word gap
  setting, leading/trailing silence 0-150 ms and gain 0.5-1.0.
* The ``target`` speaker stands in for atypical (e.g. dysarthric) speech: another voice,
  spoken very slowly with an extreme pitch, then reverberated (an exponentially decaying
  noise impulse response, RT60 ~0.5 s) and mixed with white noise at 10 dB SNR, all seeded.

This is synthetic speech: see ``docs/speech.md`` for what it does and does not test.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
STAMP = ".complete"
GENERATOR_VERSION = 2  # bump when the files written for a spec change (2: eSpeak's noise
# generator seeded, no longer from the wall clock)
TARGET_SPEAKER = "target"

WORDS = (
    "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go",
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "forward", "backward", "follow", "learn", "bed", "bird", "cat", "dog", "happy", "house",
)

# (voice, base rate wpm, base pitch, base range) per speaker s01, s02, ...
VOICES = (
    ("en-us+m1", 165, 45, 50), ("en-us+f2", 175, 60, 60), ("en+m3", 155, 40, 40),
    ("en+f4", 185, 65, 55), ("en-gb-scotland+m2", 160, 35, 45), ("en-029+f1", 170, 55, 70),
    ("en-gb-x-rp+m4", 150, 50, 35), ("en-us-nyc+f3", 180, 58, 50), ("en-us+klatt", 170, 48, 50),
    ("en+m6", 160, 42, 60), ("en-gb-x-gbclan+f5", 175, 62, 45), ("en-us+m7", 190, 38, 55),
    ("en-029+m5", 165, 52, 40), ("en-gb-x-rp+f1", 160, 66, 65), ("en-us+klatt2", 175, 44, 45),
    ("en-gb-scotland+f2", 170, 57, 50),
)
# The target: a voice no other speaker uses, slow, with an extreme pitch.
TARGET_VOICE = ("en-us+klatt4", 85, 95, 90)


@dataclasses.dataclass(frozen=True)
class SpokenWordsSpec:
    """What :func:`generate_spoken_words` writes (the stamp holds it as JSON).

    Attributes:
      words: the vocabulary.
      num_speakers: speakers ``s01..`` taken from :data:`VOICES` (at most its length).
      repetitions: utterances of each word per speaker.
      target_repetitions: utterances of each word by the ``target`` speaker (0: none).
      target_snr_db: the target's signal-to-noise ratio.
      seed: the seed of every random choice.
    """

    words: tuple[str, ...] = WORDS
    num_speakers: int = 16
    repetitions: int = 4
    target_repetitions: int = 6
    target_snr_db: float = 10.0
    seed: int = 0

    def speakers(self) -> tuple[str, ...]:
        """The non-target speaker names, ``s01, s02, ...``."""
        return tuple(f"s{i + 1:02d}" for i in range(self.num_speakers))


def _check_spec(spec: SpokenWordsSpec) -> None:
    if not 1 <= spec.num_speakers <= len(VOICES):
        raise ValueError(f"num_speakers must be in [1, {len(VOICES)}]; got {spec.num_speakers}.")
    if spec.repetitions < 1 or spec.target_repetitions < 0:
        raise ValueError("repetitions must be >= 1 and target_repetitions >= 0; got "
                         f"{spec.repetitions}, {spec.target_repetitions}.")
    bad = [w for w in spec.words if not w or "/" in w or w != w.strip()]
    if bad or len(set(spec.words)) != len(spec.words) or not spec.words:
        raise ValueError(f"words must be distinct, non-empty folder names; got {spec.words}.")


def to_16k(samples: np.ndarray, rate: int) -> np.ndarray:
    """int16 or float samples ``[T]`` at ``rate`` -> float32 ``[T']`` in [-1, 1] at 16 kHz."""
    from scipy.signal import resample_poly

    x = np.asarray(samples, np.float64)
    if np.issubdtype(np.asarray(samples).dtype, np.integer):
        x = x / 32768.0
    if rate != SAMPLE_RATE:
        g = math.gcd(int(rate), SAMPLE_RATE)
        x = resample_poly(x, SAMPLE_RATE // g, int(rate) // g)
    return x.astype(np.float32)


def degrade(audio: np.ndarray, rng: np.random.Generator, *, snr_db: float,
            rt60: float = 0.5) -> np.ndarray:
    """Reverberation (decaying-noise impulse response, ``rt60`` s) + white noise at ``snr_db``.

    ``audio`` float ``[T]`` at 16 kHz -> float32 ``[T + len(ir) - 1]``, peak 0.9.
    """
    from scipy.signal import fftconvolve

    n = int(rt60 * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)  # -60 dB at rt60
    ir[0] = 1.0 / 0.3
    ir *= 0.3
    wet = fftconvolve(audio, ir)
    power = np.mean(np.square(wet))
    wet = wet + rng.standard_normal(wet.size) * np.sqrt(power / 10 ** (snr_db / 10))
    return (0.9 * wet / np.max(np.abs(wet))).astype(np.float32)


def _utterance(engine, word: str, base: tuple, rng: np.random.Generator, *,
               jitter: bool) -> np.ndarray:
    voice, rate, pitch, prange = base
    if jitter:
        rate = round(rate * rng.uniform(0.85, 1.15))
        pitch = int(np.clip(pitch + rng.integers(-8, 9), 0, 99))
        prange = int(np.clip(prange + rng.integers(-10, 11), 0, 99))
    wav = engine.synthesize(word, voice=voice, rate=rate, pitch=pitch, pitch_range=prange,
                            wordgap=int(rng.integers(0, 4)))
    audio = to_16k(wav, engine.sample_rate)
    lead = np.zeros(int(rng.integers(0, 150)) * SAMPLE_RATE // 1000, np.float32)
    tail = np.zeros(int(rng.integers(0, 150)) * SAMPLE_RATE // 1000, np.float32)
    gain = rng.uniform(0.5, 1.0)
    return np.concatenate([lead, gain * audio / max(np.max(np.abs(audio)), 1e-6), tail])


def _plan(spec: SpokenWordsSpec) -> list[tuple[str, str, int, tuple]]:
    """(word, speaker, repetition, voice tuple) of every utterance, in writing order."""
    plan = []
    for s, speaker in enumerate(spec.speakers()):
        for word in spec.words:
            for r in range(spec.repetitions):
                plan.append((word, speaker, r, VOICES[s]))
    for word in spec.words:
        for r in range(spec.target_repetitions):
            plan.append((word, TARGET_SPEAKER, r, TARGET_VOICE))
    return plan


def generate_spoken_words(
    data_dir: str | os.PathLike, spec: SpokenWordsSpec | None = None
) -> Path:
    """Writes the spoken-word set into ``data_dir`` unless its stamp already matches ``spec``.

    Every utterance's randomness comes from ``np.random.default_rng([seed, speaker, word,
    repetition])``, so the files are the same on every run and independent of the order of
    writing. Holds one utterance at a time.

    Returns:
      ``Path(data_dir)``.

    Raises:
      ValueError: a bad spec. ImportError: espeakng-loader, soundfile or scipy is missing.
    """
    spec = SpokenWordsSpec() if spec is None else spec
    _check_spec(spec)
    root = Path(data_dir)
    stamp = root / STAMP
    wanted = json.dumps({"version": GENERATOR_VERSION, **dataclasses.asdict(spec)},
                        sort_keys=True)
    if stamp.is_file() and stamp.read_text() == wanted:
        return root
    import soundfile as sf

    from dml_jax.audio.espeak import Espeak

    engine = Espeak()
    root.mkdir(parents=True, exist_ok=True)
    if stamp.exists():
        stamp.unlink()
    speaker_ids = {s: i for i, s in enumerate((*spec.speakers(), TARGET_SPEAKER))}
    rows = []
    for word, speaker, rep, voice in _plan(spec):
        rng = np.random.default_rng(
            [spec.seed, speaker_ids[speaker], spec.words.index(word), rep]
        )
        is_target = speaker == TARGET_SPEAKER
        audio = _utterance(engine, word, voice, rng, jitter=True)
        if is_target:
            audio = degrade(audio, rng, snr_db=spec.target_snr_db)
        rel = Path(word) / f"{speaker}_{rep:02d}.wav"
        (root / word).mkdir(exist_ok=True)
        sf.write(os.fspath(root / rel), audio, SAMPLE_RATE, subtype="PCM_16")
        rows.append((rel.as_posix(), word, speaker))
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "word", "speaker"])
        writer.writerows(rows)
    stamp.write_text(wanted)
    return root
