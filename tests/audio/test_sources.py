"""Audio sources: folder and manifest layouts, splits, bad audio, cropping, padding."""

import os

import numpy as np
import pytest

from dml_jax.audio import (
    audio_folder,
    audio_manifest,
    few_shot_split,
    load_audio,
    speaker_from_filename,
    speaker_split,
)
from dml_jax.audio.batching import pad_waveforms, source_features

sf = pytest.importorskip("soundfile")

WORDS = ("go", "stop", "yes")
SPEAKERS = ("ann", "bob", "cat", "dan")


def tone(seed, n=1600 + 37):
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(np.arange(n + seed) * 0.05 * (1 + seed % 7))
            + 0.01 * rng.standard_normal(n + seed)).astype(np.float32)


@pytest.fixture
def folder(tmp_path):
    """3 words x 4 speakers x 3 repetitions of tiny 16 kHz mono files."""
    k = 0
    for w in WORDS:
        (tmp_path / w).mkdir()
        for s in SPEAKERS:
            for r in range(3):
                sf.write(tmp_path / w / f"{s}_{r}.wav", tone(k), 16000, subtype="FLOAT")
                k += 1
    (tmp_path / "go" / "notes.txt").write_text("not audio")
    return tmp_path


def test_folder_layout(folder):
    src = audio_folder(folder)
    assert len(src) == 36 and src.classes == WORDS
    assert src.labels.dtype == np.int32 and src.labels.shape == (36,)
    np.testing.assert_array_equal(src.labels, np.repeat([0, 1, 2], 12))
    assert src.speaker_names == SPEAKERS
    rec = src[13]
    assert rec["label"] == 1 and rec["speaker"] == "ann"
    assert rec["audio"].dtype == np.float32 and rec["audio"].ndim == 1
    np.testing.assert_array_equal(rec["audio"], tone(13))
    assert rec["path"].endswith(os.path.join("stop", "ann_1.wav"))


def test_speaker_rule():
    assert speaker_from_filename("/x/yes/alice_03.wav") == "alice"
    assert speaker_from_filename("bob_take_2.flac") == "bob"
    with pytest.raises(ValueError, match=r"noUnderscore\.wav"):
        speaker_from_filename("/x/yes/noUnderscore.wav")


def test_manifest_matches_folder(folder):
    rows = ["path,word,speaker"]
    src = audio_folder(folder)
    for i in range(len(src)):
        rel = os.path.relpath(src.paths[i], folder)
        rows.append(f"{rel},{src.classes[src.labels[i]]},{src.speakers[i]}")
    (folder / "m.csv").write_text("\n".join(rows) + "\n")
    man = audio_manifest(folder / "m.csv")
    np.testing.assert_array_equal(man.labels, src.labels)
    np.testing.assert_array_equal(man.speakers, src.speakers)
    np.testing.assert_array_equal(man[5]["audio"], src[5]["audio"])
    (folder / "bad.csv").write_text("file,word\nx.wav,go\n")
    with pytest.raises(ValueError, match=r"bad\.csv.*path"):
        audio_manifest(folder / "bad.csv")


def test_speaker_split_is_disjoint_and_complete(folder):
    src = audio_folder(folder)
    train, held = speaker_split(src, ["bob", "dan"])
    assert set(train.speakers) == {"ann", "cat"} and set(held.speakers) == {"bob", "dan"}
    assert len(train) + len(held) == len(src)
    assert not set(train.paths) & set(held.paths)
    assert train.classes == held.classes == src.classes
    for sub in (train, held):  # labels keep the parent's ids
        for i in range(len(sub)):
            j = src.paths.index(sub.paths[i])
            assert sub.labels[i] == src.labels[j]
    with pytest.raises(ValueError, match="zed"):
        speaker_split(src, ["zed"])
    with pytest.raises(ValueError, match="every speaker"):
        speaker_split(src, list(SPEAKERS))


def test_few_shot_split(folder):
    src = audio_folder(folder)
    enrol, query = few_shot_split(src, "cat", shots=2, seed=3)
    assert len(enrol) == 6 and len(query) == 3
    assert set(enrol.speakers) == set(query.speakers) == {"cat"}
    np.testing.assert_array_equal(np.bincount(enrol.labels, minlength=3), [2, 2, 2])
    np.testing.assert_array_equal(np.bincount(query.labels, minlength=3), [1, 1, 1])
    assert not set(enrol.paths) & set(query.paths)
    again, _ = few_shot_split(src, "cat", shots=2, seed=3)
    assert again.paths == enrol.paths
    with pytest.raises(ValueError, match="shots=4"):
        few_shot_split(src, "cat", shots=4)


def test_bad_audio_errors_name_the_file(tmp_path):
    bad = tmp_path / "junk_1.wav"
    bad.write_bytes(b"RIFF\x00\x00not really a wav file")
    with pytest.raises(ValueError, match=r"junk_1\.wav"):
        load_audio(bad)
    empty = tmp_path / "empty_1.wav"
    sf.write(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match=r"empty_1\.wav.*empty"):
        load_audio(empty)
    stereo = tmp_path / "stereo_1.wav"
    st = np.stack([tone(1), -tone(1)], axis=1)
    sf.write(stereo, st, 16000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"stereo_1\.wav.*2 channels"):
        load_audio(stereo)
    np.testing.assert_allclose(load_audio(stereo, mix_stereo=True), st.mean(axis=1), atol=1e-7)
    rate = tmp_path / "rate_1.wav"
    sf.write(rate, tone(2, 8000), 8000, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"rate_1\.wav.*8000 Hz"):
        load_audio(rate)
    up = load_audio(rate, resample=True)
    assert up.dtype == np.float32 and up.shape == (2 * tone(2, 8000).size,)
    missing = tmp_path / "nope_1.wav"
    with pytest.raises(ValueError, match=r"nope_1\.wav"):
        load_audio(missing)


def test_long_file_is_cropped_with_a_warning(folder):
    src = audio_folder(folder, max_seconds=0.05)
    with pytest.warns(UserWarning, match="go.ann_0.wav.*cropped"):
        rec = src[0]
    assert rec["audio"].shape == (800,)
    np.testing.assert_array_equal(rec["audio"], tone(0)[:800])


def test_pad_waveforms_never_truncates():
    a, b = tone(0, 100), tone(1, 250)
    batch, lengths = pad_waveforms([a, b])
    assert batch.shape == (2, 251) and list(lengths) == [100, 251]
    np.testing.assert_array_equal(batch[0, :100], a)
    assert np.all(batch[0, 100:] == 0)
    with pytest.raises(ValueError, match="shorter"):
        pad_waveforms([a, b], length=200)


def test_source_features_masks_each_utterance(folder):
    src = audio_folder(folder)
    sub = src.subset([0, 1, 2])
    out = source_features(sub, batch_size=2)
    lengths = [sub[i]["audio"].size for i in range(3)]
    assert out["features"].shape[0] == 3 and out["features"].shape[2] == 40
    np.testing.assert_array_equal(out["mask"].sum(axis=1), [1 + n // 160 for n in lengths])
    assert np.all(out["features"][~out["mask"]] == 0)
    np.testing.assert_array_equal(out["labels"], sub.labels)
