"""Audio sources: isolated spoken words from a folder or a CSV manifest, and their splits.

A source is random-access: ``len(source)``; ``source[i]`` is a dict ``{"audio": float32 [T],
"label": int, "speaker": str, "path": str}``; ``source.labels`` (int32 ``[N]``) and
``source.speakers`` (str ``[N]``, one per record) are read without decoding any audio;
labels are contiguous ``0..C-1`` and ``source.classes`` holds the word names in label order
(sorted). Subsets (:meth:`AudioSource.subset`, the splits below) keep the parent's words and
labels, so a model trained on one split scores words of another with the same label ids.

Audio files are read with ``soundfile`` (WAV, FLAC, OGG, ...). The policy on bad audio, each
an error whose message names the file:

* unreadable or not audio: ``ValueError``;
* empty (no samples) or non-finite samples: ``ValueError``;
* more than one channel: ``ValueError`` by default; with ``mix_stereo=True`` the channels
  are averaged into mono;
* a sample rate other than ``sample_rate``: ``ValueError`` by default; with ``resample=True``
  the file is resampled (polyphase, ``scipy.signal.resample_poly``).

Variable lengths are kept (batches pad and mask them). With ``max_seconds`` set, a longer
file is cropped to its first ``max_seconds`` seconds and a ``UserWarning`` names it; nothing
is ever shortened silently.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".aiff", ".aif")


def speaker_from_filename(path: str | os.PathLike) -> str:
    """The folder layout's speaker rule: the file name's part before the first ``"_"``.

    ``root/yes/alice_003.wav`` -> ``"alice"``. Raises ``ValueError`` naming the file when its
    name has no ``"_"`` (pass ``speaker_fn`` to :func:`audio_folder` for other layouts).
    """
    stem = Path(path).stem
    speaker, sep, _ = stem.partition("_")
    if not sep or not speaker:
        raise ValueError(
            f"Cannot tell the speaker of {os.fspath(path)!r}: the folder layout names files "
            "<speaker>_<anything>.<ext>; rename it or pass speaker_fn=..."
        )
    return speaker


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    from scipy.signal import resample_poly

    g = math.gcd(int(rate), int(target))
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


def load_audio(
    path: str | os.PathLike,
    *,
    sample_rate: int = 16000,
    resample: bool = False,
    mix_stereo: bool = False,
) -> np.ndarray:
    """Reads one file as float32 mono ``[T]`` at ``sample_rate`` (see the module's policy).

    Holds the decoded file (and, when resampling, one resampled copy).

    Raises:
      ValueError: naming ``path``: unreadable, empty, non-finite, multi-channel (unless
        ``mix_stereo``), or another sample rate (unless ``resample``).
    """
    import soundfile as sf

    name = os.fspath(path)
    try:
        audio, rate = sf.read(name, dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError, RuntimeError, OSError...
        raise ValueError(f"Cannot read audio file {name!r}: {e}") from e
    if audio.shape[0] == 0:
        raise ValueError(f"Audio file {name!r} is empty (0 samples).")
    if audio.shape[1] != 1:
        if not mix_stereo:
            raise ValueError(
                f"Audio file {name!r} has {audio.shape[1]} channels; expected mono "
                "(pass mix_stereo=True to average the channels)."
            )
        audio = audio.mean(axis=1, keepdims=True)
    audio = np.ascontiguousarray(audio[:, 0])
    if not np.all(np.isfinite(audio)):
        raise ValueError(f"Audio file {name!r} has NaN or inf samples.")
    if rate != sample_rate:
        if not resample:
            raise ValueError(
                f"Audio file {name!r} is sampled at {rate} Hz; expected {sample_rate} Hz "
                "(pass resample=True to resample it)."
            )
        audio = _resample(audio, rate, sample_rate)
    return audio


class AudioSource:
    """Random-access spoken-word records (see the module docstring).

    Args:
      paths: ``[N]`` audio files.
      words: ``[N]`` word (class) names.
      speakers: ``[N]`` speaker names.
      classes: the word names in label order; default: the sorted distinct ``words``.
      sample_rate: the rate ``audio`` is returned at.
      max_seconds: crop longer files to this many seconds (with a warning); None: never.
      resample, mix_stereo: the bad-audio policy (module docstring).

    Holds only the paths, labels and speakers; audio is decoded on access.
    """

    def __init__(
        self,
        paths: Sequence[str],
        words: Sequence[str],
        speakers: Sequence[str],
        *,
        classes: Sequence[str] | None = None,
        sample_rate: int = 16000,
        max_seconds: float | None = None,
        resample: bool = False,
        mix_stereo: bool = False,
    ):
        if not len(paths) == len(words) == len(speakers):
            raise ValueError(
                f"paths, words and speakers must have the same length; got {len(paths)}, "
                f"{len(words)}, {len(speakers)}."
            )
        self.classes = tuple(sorted(set(words))) if classes is None else tuple(classes)
        index = {w: i for i, w in enumerate(self.classes)}
        unknown = sorted(set(words) - set(index))
        if unknown:
            raise ValueError(f"words {unknown} are not in classes {list(self.classes)}.")
        self.paths = tuple(os.fspath(p) for p in paths)
        self.labels = np.asarray([index[w] for w in words], np.int32).reshape(-1)
        self.speakers = np.asarray(list(speakers), dtype=str).reshape(-1)
        self.sample_rate = int(sample_rate)
        self.max_seconds = max_seconds
        self.resample = resample
        self.mix_stereo = mix_stereo

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def speaker_names(self) -> tuple[str, ...]:
        """The distinct speakers, sorted."""
        return tuple(sorted(set(self.speakers.tolist())))

    def __getitem__(self, i: int) -> dict:
        """Record ``i``: ``{"audio": float32 [T], "label": int, "speaker": str, "path": str}``."""
        path = self.paths[i]
        audio = load_audio(path, sample_rate=self.sample_rate, resample=self.resample,
                           mix_stereo=self.mix_stereo)
        if self.max_seconds is not None:
            limit = round(self.max_seconds * self.sample_rate)
            if audio.shape[0] > limit:
                warnings.warn(
                    f"Audio file {path!r} lasts {audio.shape[0] / self.sample_rate:.2f} s; "
                    f"cropped to its first {self.max_seconds} s (max_seconds).",
                    UserWarning,
                    stacklevel=2,
                )
                audio = audio[:limit]
        return {"audio": audio, "label": int(self.labels[i]),
                "speaker": str(self.speakers[i]), "path": path}

    def subset(self, indices: Sequence[int] | np.ndarray) -> AudioSource:
        """The records at ``indices`` (in that order), with the same words and labels."""
        idx = np.asarray(indices, np.int64).reshape(-1)
        return AudioSource(
            [self.paths[i] for i in idx],
            [self.classes[self.labels[i]] for i in idx],
            [str(self.speakers[i]) for i in idx],
            classes=self.classes,
            sample_rate=self.sample_rate,
            max_seconds=self.max_seconds,
            resample=self.resample,
            mix_stereo=self.mix_stereo,
        )


def audio_folder(
    root: str | os.PathLike,
    *,
    speaker_fn: Callable[[str], str] = speaker_from_filename,
    **kwargs,
) -> AudioSource:
    """Records of ``root/<word>/<file>`` (files with an audio extension), word by word.

    Words are the sorted sub-folder names; a word's files are in sorted order; the speaker of
    a file is ``speaker_fn(path)`` (default :func:`speaker_from_filename`). ``kwargs`` go to
    :class:`AudioSource`.

    Raises:
      FileNotFoundError: ``root`` is not a folder. ValueError: no audio files under it.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"Audio folder {os.fspath(root)!r} does not exist.")
    paths, words, speakers = [], [], []
    for word_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for f in sorted(word_dir.iterdir()):
            if f.is_file() and f.suffix.lower() in AUDIO_EXTENSIONS:
                paths.append(os.fspath(f))
                words.append(word_dir.name)
                speakers.append(speaker_fn(os.fspath(f)))
    if not paths:
        raise ValueError(
            f"No audio files ({', '.join(AUDIO_EXTENSIONS)}) under {os.fspath(root)!r}/<word>/."
        )
    return AudioSource(paths, words, speakers, **kwargs)


def audio_manifest(csv_path: str | os.PathLike, **kwargs) -> AudioSource:
    """Records of a CSV manifest with a header and the columns ``path,word,speaker``.

    Relative paths are relative to the manifest's folder; records keep the file's order;
    ``kwargs`` go to :class:`AudioSource`.

    Raises:
      FileNotFoundError: no such manifest. ValueError: missing columns or no rows (naming
      the manifest).
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"Manifest {os.fspath(csv_path)!r} does not exist.")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "word", "speaker"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"Manifest {os.fspath(csv_path)!r} lacks the column(s) {sorted(missing)}; "
                "expected a header path,word,speaker."
            )
        rows = list(reader)
    if not rows:
        raise ValueError(f"Manifest {os.fspath(csv_path)!r} has no rows.")
    base = csv_path.parent
    paths = [os.fspath(base / r["path"]) for r in rows]
    return AudioSource(paths, [r["word"] for r in rows], [r["speaker"] for r in rows],
                       **kwargs)


def speaker_split(
    source: AudioSource, held_out: Sequence[str]
) -> tuple[AudioSource, AudioSource]:
    """Speaker-disjoint split: ``(records of the other speakers, records of held_out)``.

    Raises:
      ValueError: a held-out speaker is not in the source, or nothing is left to train on.
    """
    held = set(held_out)
    unknown = sorted(held - set(source.speakers.tolist()))
    if unknown:
        raise ValueError(f"held_out speakers {unknown} are not in the source; it has "
                         f"{list(source.speaker_names)}.")
    is_held = np.isin(source.speakers, sorted(held))
    if is_held.all():
        raise ValueError("held_out covers every speaker: no training speakers are left.")
    return source.subset(np.flatnonzero(~is_held)), source.subset(np.flatnonzero(is_held))


def few_shot_split(
    source: AudioSource, speaker: str, *, shots: int, seed: int = 0
) -> tuple[AudioSource, AudioSource]:
    """A target speaker's enrolment and query sets: ``shots`` utterances per word, the rest.

    For every word the speaker says, ``shots`` of its utterances (chosen by a permutation
    seeded with ``seed``) go to the enrolment set and the others to the query set; both keep
    the source's record order. Words the speaker never says are absent from both.

    Raises:
      ValueError: unknown ``speaker``, ``shots < 1``, or a word with fewer than ``shots``
        utterances (named).
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1; got {shots}.")
    mine = np.flatnonzero(source.speakers == speaker)
    if mine.size == 0:
        raise ValueError(f"speaker {speaker!r} is not in the source; it has "
                         f"{list(source.speaker_names)}.")
    rng = np.random.default_rng(seed)
    enrol = []
    for label in np.unique(source.labels[mine]):
        members = mine[source.labels[mine] == label]
        if members.size < shots:
            raise ValueError(
                f"speaker {speaker!r} says {source.classes[label]!r} {members.size} time(s); "
                f"shots={shots} needs at least {shots}."
            )
        enrol.extend(rng.permutation(members)[:shots].tolist())
    enrol_idx = np.sort(np.asarray(enrol, np.int64))
    query_idx = np.setdiff1d(mine, enrol_idx)
    return source.subset(enrol_idx), source.subset(query_idx)
