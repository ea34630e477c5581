"""train_batches / eval_batches: P x K structure, determinism, resume, process shares, eval
coverage, crop geometry, clips (video tracklets), corrupt images, grain workers."""

from __future__ import annotations

import multiprocessing
import re
import time

import jax
import numpy as np
import pytest
from PIL import Image

from dml_jax.data import (
    ArraySource,
    ImageReadError,
    ImageRef,
    PKSampler,
    digits_source,
    eval_batches,
    image_folder,
    train_batches,
)
from dml_jax.data.transforms import Augment

SIZE = 12


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """5 classes of 1-4 PNG/JPEG images of assorted sizes (class c4 holds one image)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c, count in enumerate((4, 3, 4, 2, 1)):
        (root / f"c{c}").mkdir()
        for i in range(count):
            array = rng.integers(0, 256, (20 + 3 * i, 16 + 5 * c, 3), dtype=np.uint8)
            suffix = ".jpg" if (c + i) % 2 else ".png"
            Image.fromarray(array).save(root / f"c{c}" / f"{i}{suffix}")
    return root


def _take(iterator, n):
    with iterator as it:
        return [next(it) for _ in range(n)]


def _equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_train_batch_structure(folder):
    source = image_folder(folder)
    for batch in _take(train_batches(source, classes_per_batch=3, samples_per_class=2,
                                     image_size=SIZE), 4):
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (6, SIZE, SIZE, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32
        groups = batch["label"].reshape(3, 2)
        assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == 3


def test_deterministic_resume_and_seed(folder):
    source = image_folder(folder)
    kwargs = dict(classes_per_batch=2, samples_per_class=3, image_size=SIZE)
    full = _take(train_batches(source, **kwargs), 5)
    again = _take(train_batches(source, **kwargs), 5)
    resumed = _take(train_batches(source, start_step=3, **kwargs), 2)
    for a, b in zip(full, again):
        _equal(a, b)
    for a, b in zip(full[3:], resumed):
        _equal(a, b)
    other = _take(train_batches(source, seed=1, **kwargs), 5)
    assert any(not np.array_equal(a["image"], b["image"]) for a, b in zip(full, other))
    # Augmentation differs between steps, and the step's records are the sampler's.
    sampler = PKSampler(source.labels, 2, 3, seed=0)
    for step, batch in enumerate(full):
        np.testing.assert_array_equal(batch["label"],
                                      source.labels[sampler.batch_indices(step)])


def test_class_smaller_than_k_and_too_few_classes(folder):
    source = image_folder(folder)
    batches = _take(train_batches(source, classes_per_batch=5, samples_per_class=3,
                                  image_size=SIZE), 2)
    rows = batches[0]["image"][batches[0]["label"] == 4]  # one record, three augmented views
    assert rows.shape[0] == 3 and len({r.tobytes() for r in rows}) > 1
    with pytest.raises(ValueError, match="classes_per_batch=6"):
        train_batches(source, classes_per_batch=6, samples_per_class=2)


def test_two_processes_share_the_global_batch(folder, monkeypatch):
    source = image_folder(folder)
    kwargs = dict(classes_per_batch=2, samples_per_class=2, image_size=SIZE, start_step=7)
    single = _take(train_batches(source, **kwargs), 2)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    shares = []
    for index in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda index=index: index)
        shares.append(_take(train_batches(source, **kwargs), 2))
    for step in range(2):
        assert shares[0][step]["image"].shape[0] == 2
        for key in ("image", "label"):
            np.testing.assert_array_equal(
                np.concatenate([shares[0][step][key], shares[1][step][key]]),
                single[step][key])
    with pytest.raises(ValueError, match="split evenly"):
        train_batches(source, classes_per_batch=3, samples_per_class=1)


def test_eval_covers_every_record_once(folder, monkeypatch):
    source = image_folder(folder)
    with eval_batches(source, batch_size=4, image_size=SIZE) as it:
        batches = list(it)
    assert len(batches) == 4  # 14 records
    index = np.concatenate([b["index"] for b in batches])
    mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(index[mask], np.arange(len(source)))
    assert (~mask).sum() == 2 and (index[~mask] == -1).all()
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels[mask], source.labels)
    for b in batches:
        assert b["image"].shape == (4, SIZE, SIZE, 3) and b["mask"].dtype == bool
        assert not b["image"][~b["mask"]].any()
    again = list(eval_batches(source, batch_size=4, image_size=SIZE))
    for a, b in zip(batches, again):
        _equal(a, b)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    shares = []
    for p in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda p=p: p)
        shares.append(list(eval_batches(source, batch_size=4, image_size=SIZE)))
    for k, batch in enumerate(batches):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([shares[0][k][key], shares[1][k][key]]), batch[key])


def test_eval_geometry_is_resize_and_centre_crop():
    rng = np.random.default_rng(1)
    square = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    source = ArraySource(square, np.arange(3))
    batch = next(eval_batches(source, batch_size=3, image_size=SIZE, resize_ratio=1.0))
    np.testing.assert_array_equal(batch["image"], square)  # already the output size
    wide = np.zeros((1, SIZE, 3 * SIZE, 3), np.uint8)
    wide[:, :, SIZE:2 * SIZE] = 200  # the centre third is bright
    source = ArraySource(wide, [0])
    batch = next(eval_batches(source, batch_size=1, image_size=SIZE, resize_ratio=1.0))
    assert (batch["image"] == 200).all()


class _BoxSource:
    """A source whose records carry a box: inside it colour 50, outside 250."""

    def __init__(self):
        image = np.full((40, 48, 3), 250, np.uint8)
        image[8:32, 12:36] = 50
        self.image = image
        self.labels = np.array([0, 1], np.int32)
        self.classes = [0, 1]

    def __len__(self):
        return 2

    def read(self, i):
        return {"image": ImageRef(self.image, f"box #{i}", np.float32([0.2, 0.25, 0.8, 0.75])),
                "label": i}

    def __getitem__(self, i):
        raise AssertionError("the pipeline must use read()")


def test_train_views_stay_inside_the_box():
    batches = _take(train_batches(_BoxSource(), classes_per_batch=2, samples_per_class=4,
                                  image_size=SIZE), 6)
    inner = np.stack([b["image"] for b in batches])[..., 1:-1, 1:-1, :]
    assert (inner == 50).all()


def test_image_size_none_keeps_stored_pixels():
    source = digits_source("train")
    sampler = PKSampler(source.labels, 4, 3, seed=5)
    batches = _take(train_batches(source, classes_per_batch=4, samples_per_class=3,
                                  image_size=None, seed=5), 3)
    for step, batch in enumerate(batches):
        np.testing.assert_array_equal(batch["image"],
                                      source.images[sampler.batch_indices(step)])
    test = digits_source("test")
    batch = next(eval_batches(test, batch_size=len(test), image_size=None))
    np.testing.assert_array_equal(batch["image"], test.images)



class _ClipSource:
    """Video re-ID style records: ``"image"`` uint8 ``[T, H, W, 3]``."""

    def __init__(self, clips):
        self.clips = clips
        self.labels = np.arange(len(clips), dtype=np.int32) % 2
        self.classes = [0, 1]

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, i):
        return {"image": self.clips[i], "label": int(self.labels[i])}


def test_clip_frames_share_the_crop_and_flip():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 256, (4, 20, 17, 3), dtype=np.uint8)
    source = _ClipSource(np.repeat(frame[:, None], 3, axis=1))  # 4 clips of 3 equal frames
    batches = _take(train_batches(source, classes_per_batch=2, samples_per_class=3,
                                  image_size=SIZE), 4)
    views = np.stack([b["image"] for b in batches])  # [steps, n, T, S, S, 3]
    assert views.shape == (4, 6, 3, SIZE, SIZE, 3) and views.dtype == np.uint8
    for t in (1, 2):  # equal frames and one plan per clip: equal views
        np.testing.assert_array_equal(views[:, :, t], views[:, :, 0])
    rows = views[:, :, 0].reshape(-1, SIZE * SIZE * 3)
    assert len(np.unique(rows, axis=0)) > 1  # the plans do differ between rows


def test_clip_eval_is_every_frame_resized_and_centre_cropped():
    rng = np.random.default_rng(4)
    clips = rng.integers(0, 256, (3, 2, 20, 17, 3), dtype=np.uint8)
    batch = next(eval_batches(_ClipSource(clips), batch_size=4, image_size=SIZE))
    assert batch["image"].shape == (4, 2, SIZE, SIZE, 3)
    assert batch["mask"].tolist() == [True, True, True, False]
    for t in range(2):
        frames = next(eval_batches(ArraySource(clips[:, t], np.arange(3)), batch_size=4,
                                   image_size=SIZE))
        np.testing.assert_array_equal(batch["image"][:, t], frames["image"])


def _corrupt_folder(tmp_path):
    rng = np.random.default_rng(2)
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (14, 15, 3), dtype=np.uint8)).save(
                tmp_path / f"c{c}" / f"{i}.jpg")
    bad = tmp_path / "c1" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    return image_folder(tmp_path), str(bad)


def test_corrupt_image_raises_naming_its_path(tmp_path):
    source, bad = _corrupt_folder(tmp_path)
    bad_index = source.paths.index(bad)
    sampler = PKSampler(source.labels, 2, 2)
    step = next(t for t in range(100) if bad_index in sampler.batch_indices(t))
    with pytest.raises(ImageReadError, match=re.escape(bad)) as info:
        _take(train_batches(source, classes_per_batch=2, samples_per_class=2,
                            image_size=SIZE, start_step=step), 1)
    assert f"record {bad_index}" in str(info.value) and "image_folder" in str(info.value)
    with pytest.raises(ImageReadError, match=re.escape(bad)):
        list(eval_batches(source, batch_size=4, image_size=SIZE))


def test_skip_corrupt_substitutes_the_same_class(tmp_path):
    source, bad = _corrupt_folder(tmp_path)
    bad_index = source.paths.index(bad)
    sampler = PKSampler(source.labels, 2, 2)
    steps = [t for t in range(40) if bad_index in sampler.batch_indices(t)][:3]
    kwargs = dict(classes_per_batch=2, samples_per_class=2, image_size=SIZE,
                  skip_corrupt=True)
    runs = []
    for _ in range(2):
        it = train_batches(source, start_step=steps[0], **kwargs)
        with it:
            got = {}
            while it.step <= steps[-1]:
                step = it.step
                got[step] = next(it)
        runs.append(got)
        assert it.skipped == sum(int((sampler.batch_indices(t) == bad_index).sum())
                                 for t in range(steps[0], steps[-1] + 1))
    for step in steps:
        _equal(runs[0][step], runs[1][step])
        np.testing.assert_array_equal(runs[0][step]["label"],
                                      source.labels[sampler.batch_indices(step)])
    with eval_batches(source, batch_size=4, image_size=SIZE, skip_corrupt=True) as it:
        batches = list(it)
    mask = np.concatenate([b["mask"] for b in batches])
    index = np.concatenate([b["index"] for b in batches])
    assert it.skipped == 1 and not mask[bad_index] and index[bad_index] == bad_index
    assert mask[:len(source)].sum() == len(source) - 1


@pytest.mark.slow
def test_grain_workers_give_the_same_batches(folder):
    source = image_folder(folder)
    kwargs = dict(classes_per_batch=2, samples_per_class=2, image_size=SIZE, start_step=2)
    local = _take(train_batches(source, **kwargs), 3)
    it = train_batches(source, worker_count=2, **kwargs)
    remote = _take(it, 3)
    for a, b in zip(local, remote):
        _equal(a, b)
    it.close()  # closing twice is harmless
    deadline = time.monotonic() + 10
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()  # the workers have shut down


def test_bad_options(folder):
    source = image_folder(folder)
    with pytest.raises(ValueError, match="image_size"):
        train_batches(source, classes_per_batch=2, samples_per_class=2, image_size=0)
    with pytest.raises(ValueError, match="start_step"):
        train_batches(source, classes_per_batch=2, samples_per_class=2, start_step=-1)
    with pytest.raises(ValueError, match="batch_size"):
        eval_batches(source, batch_size=0)
    with pytest.raises(ValueError, match="crop"):
        Augment(crop="center")
