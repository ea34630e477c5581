"""Speech: log-mel front end, spoken-word sources and splits, word recognition by metric learning.

* :mod:`dml_jax.audio.frontend` -- :func:`log_mel` (librosa-exact), frame masks, normalisation.
* :mod:`dml_jax.audio.augment` -- SpecAugment-style time/frequency masking.
* :mod:`dml_jax.audio.sources` -- folder / CSV-manifest sources, speaker and few-shot splits.
* :mod:`dml_jax.audio.batching` -- padded batches and whole-source features.
* :mod:`dml_jax.audio.recognise` -- word recognition by nearest enrolled utterances / centroids.
* :mod:`dml_jax.audio.spoken_words` -- the embedded synthetic spoken-word set (eSpeak NG).
* :mod:`dml_jax.audio.train_speech` -- training and the speech experiment.

See ``docs/speech.md``.
"""

from dml_jax.audio.frontend import (
    frame_mask,
    log_mel,
    mel_filterbank,
    normalize_utterance,
    num_frames,
    power_spectrogram,
)
from dml_jax.audio.sources import (
    AudioSource,
    audio_folder,
    audio_manifest,
    few_shot_split,
    load_audio,
    speaker_from_filename,
    speaker_split,
)

__all__ = [
    "AudioSource",
    "audio_folder",
    "audio_manifest",
    "few_shot_split",
    "frame_mask",
    "load_audio",
    "log_mel",
    "mel_filterbank",
    "normalize_utterance",
    "num_frames",
    "power_spectrogram",
    "speaker_from_filename",
    "speaker_split",
]
