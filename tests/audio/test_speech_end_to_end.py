"""The embedded spoken-word set and a short end-to-end run on a tiny generated set."""

import re
import time

import numpy as np
import pytest

pytest.importorskip("espeakng_loader")
pytest.importorskip("soundfile")

from dml_jax.audio import audio_folder, audio_manifest
from dml_jax.audio.spoken_words import STAMP, SpokenWordsSpec, generate_spoken_words

TINY = SpokenWordsSpec(words=("yes", "no", "left", "right", "stop", "go"), num_speakers=5,
                       repetitions=3, target_repetitions=4)


def test_generation_is_deterministic_and_idempotent(tmp_path):
    spec = SpokenWordsSpec(words=("up", "down"), num_speakers=2, repetitions=1,
                           target_repetitions=2)
    a = generate_spoken_words(tmp_path / "a", spec)
    time.sleep(1.0)  # b in another second: eSpeak once seeded its noise with the wall clock
    b = generate_spoken_words(tmp_path / "b", spec)
    src = audio_folder(a)
    assert len(src) == 2 * 2 + 2 * 2 and src.classes == ("down", "up")
    assert src.speaker_names == ("s01", "s02", "target")
    for p in src.paths:
        assert (b / p[len(str(a)) + 1 :]).read_bytes() == open(p, "rb").read()
    man = audio_manifest(a / "manifest.csv")
    assert sorted(man.paths) == sorted(src.paths)
    stamp_time = (a / STAMP).stat().st_mtime_ns
    first = a / "up" / "s01_00.wav"
    mtime = first.stat().st_mtime_ns
    generate_spoken_words(a, spec)  # stamp matches: nothing is rewritten
    assert first.stat().st_mtime_ns == mtime and (a / STAMP).stat().st_mtime_ns == stamp_time
    # the target is the altered voice: slower (longer) and noisy (no digital silence)
    rec = [src[i]["audio"] for i in range(len(src))]
    tgt = [r for r, s in zip(rec, src.speakers) if s == "target"]
    other = [r for r, s in zip(rec, src.speakers) if s != "target"]
    assert min(r.size for r in tgt) > max(r.size for r in other)
    assert all(np.mean(r == 0) < 0.01 for r in tgt)


def test_tiny_end_to_end_well_above_chance(tmp_path):
    from dml_jax.audio import train_speech
    from experiments.configs.speech_words import get_config

    c = get_config("embedded")
    c.data.data_dir = str(tmp_path / "words")
    c.data.spec = {"words": TINY.words, "num_speakers": 5, "repetitions": 3,
                   "target_repetitions": 4}
    c.data.unseen_speakers = ("s05",)
    c.model.widths = (32, 32)
    c.model.embedding_dim = 32
    c.classes_per_batch, c.samples_per_class = 6, 3
    c.num_steps, c.warmup_steps = 60, 5
    c.finetune.steps, c.finetune.classes_per_batch = 10, 6
    c.log_every = 0
    results = train_speech.run_speech_experiment(c, tmp_path / "wd", log=lambda s: None)
    chance = 1 / len(TINY.words)
    dml = results["dml"]
    assert dml["unseen"]["top1"] >= 0.6 > 3 * chance - 0.1
    assert dml["target"]["top1"] >= 0.5
    for model in ("dml", "classifier"):
        for split in ("unseen", "target", "target_pretrained"):
            for v in results[model][split].values():
                assert np.isfinite(v) and 0 <= v <= 1
    line = train_speech.summary_line(results)
    assert re.fullmatch(
        r"speech: unseen speakers DML \d\.\d{4} \(classifier \d\.\d{4}\), "
        r"target speaker DML \d\.\d{4} \(classifier \d\.\d{4}\)", line)
    assert (tmp_path / "wd" / "results.json").is_file()


def test_folder_row_splits(tmp_path):
    from dml_jax.audio.train_speech import load_splits
    from experiments.configs.speech_words import get_config

    spec = SpokenWordsSpec(words=("up", "down", "go"), num_speakers=3, repetitions=2,
                           target_repetitions=3)
    root = generate_spoken_words(tmp_path / "w", spec)
    c = get_config("folder")
    c.data.root = str(root)
    c.data.unseen_speakers = ("s03",)
    c.data.target_speaker = "target"
    splits, words = load_splits(c)
    assert words == ("down", "go", "up")
    sizes = {k: v["labels"].shape[0] for k, v in splits.items()}
    assert sizes == {"train": 12, "unseen": 6, "target_enrol": 6, "target_query": 3}
    assert set(splits["train"]["speakers"]) == {"s01", "s02"}
    assert set(splits["unseen"]["speakers"]) == {"s03"}
    with pytest.raises(ValueError, match="row"):
        get_config("nope")
