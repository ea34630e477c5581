"""Spoken-word recognition by deep metric learning (a reconstruction of Takashima et al. 2020).

    python experiments/speech_words.py --config experiments/configs/speech_words.py
    python experiments/speech_words.py --config experiments/configs/speech_words.py:folder \
        --config.data.root=/path/to/words --config.data.unseen_speakers='("bob","eve")' \
        --config.data.target_speaker=carol

Rows (``--config ...speech_words.py:<row>``):

* ``embedded`` (default): the synthetic eSpeak NG set (30 words, 16 voices x 4 repetitions,
  an altered ``target`` voice x 6), generated into ``data.data_dir`` on first use; speakers
  s13-s16 are unseen; the target enrols 2 utterances per word.
* ``folder``: your own ``root/<word>/<speaker>_<n>.wav`` recordings (16 kHz mono; set
  ``data.resample`` / ``data.mix_stereo`` to accept other files); name the held-out and
  target speakers.

A 1-D temporal conv encoder with attentive statistics pooling, multi-similarity loss on
P x K = 16 x 4 batches, SpecAugment; fine-tuning on the target's enrolment utterances; the
classifier baseline is the same encoder with cross-entropy. See docs/speech.md.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The ``embedded`` (default) or ``folder`` configuration."""
    row = arg or "embedded"
    if row not in ("embedded", "folder"):
        raise ValueError(f"Unknown row {row!r}; expected 'embedded' or 'folder'.")
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict({
        "source": row,
        "data_dir": "workdirs/data/spoken_words",  # embedded: where the set is generated
        "root": "",  # folder: root/<word>/<speaker>_<n>.wav
        "manifest": "",  # source="manifest": a CSV path,word,speaker
        "unseen_speakers": ("s13", "s14", "s15", "s16") if row == "embedded" else (),
        "target_speaker": "target" if row == "embedded" else "",
        "shots": 2,  # target enrolment utterances per word
        "seed": 0,
        "max_seconds": 3.0,
        "resample": False,
        "mix_stereo": False,
        "spec": {},  # embedded: SpokenWordsSpec overrides (num_speakers, repetitions, ...)
    })
    c.features = ml_collections.ConfigDict({"n_mels": 40, "n_fft": 400, "hop_length": 160})
    c.model = ml_collections.ConfigDict({
        "name": "audio_tcn1d",  # audio_cnn2d: the 2-D CNN (about 4x slower on CPU)
        "widths": (96, 96, 96),
        "pooling": "attentive_stats",
        "embedding_dim": 128,
    })
    c.loss = ml_collections.ConfigDict({
        "name": "multi_similarity",
        "kwargs": {},
        "classifier_weight": 0.0,
    })
    c.classes_per_batch = 16  # P
    c.samples_per_class = 4  # K
    c.num_steps = 400
    c.learning_rate = 3e-3
    c.weight_decay = 1e-4
    c.warmup_steps = 30
    c.augment = ml_collections.ConfigDict({
        "enabled": True,
        "num_time_masks": 2,
        "max_time_width": 8,
        "num_freq_masks": 2,
        "max_freq_width": 6,
    })
    c.finetune = ml_collections.ConfigDict({
        "enabled": True,  # transfer: pre-train on the training speakers, fine-tune on the target
        "steps": 40,
        "learning_rate": 5e-4,
        "classes_per_batch": 16,
    })
    c.recognition = ml_collections.ConfigDict({"method": "knn", "k": 1})
    c.baseline = True  # also train the classifier baseline
    c.log_every = 100
    return c
