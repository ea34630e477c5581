"""TFDS sources: the DML split protocols on mock data, crops, real array_record files, errors."""

from __future__ import annotations

import inspect
import io
import math

import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from dml_jax.data import get_source, images, tfds_sources
from dml_jax.data.tfds_sources import DatasetNotPreparedError, tfds_source

NUM_MOCK = 40


def _raw(name: str, split: str, key: str = "label") -> list[dict]:
    """The mock records of a TFDS split, read directly (ids as ints)."""
    ds = tfds.data_source(name, split=split)
    return [{**ds[i], "_id": int(ds[i][key])} for i in range(len(ds))]


def _check_contiguous(source) -> None:
    labels = np.asarray(source.labels)
    assert labels.dtype == np.int32 and labels.shape == (len(source),)
    np.testing.assert_array_equal(np.unique(labels), np.arange(len(source.classes)))
    assert list(source.classes) == sorted(source.classes)


@pytest.mark.parametrize("name,num_classes", [("caltech_birds2011", 200), ("cars196", 196)])
def test_class_disjoint_protocol(name, num_classes):
    boundary = num_classes // 2
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        train = tfds_source(name, "train")
        test = tfds_source(name, "test")
        raw = _raw(name, "train") + _raw(name, "test")  # TFDS train then test
    ids = np.array([r["_id"] for r in raw])
    for source, keep in ((train, ids < boundary), (test, ids >= boundary)):
        _check_contiguous(source)
        expected = ids[keep]
        assert len(source) == keep.sum() > 0
        # classes[label] is each record's TFDS id, in TFDS order (train part, then test part).
        np.testing.assert_array_equal(np.asarray(source.classes)[source.labels], expected)
        kept = [r for r, k in zip(raw, keep) if k]
        for i in (0, len(source) - 1):
            np.testing.assert_array_equal(source[i]["image"], kept[i]["image"])
            assert source[i]["label"] == int(source.labels[i])
    assert max(train.classes) < boundary <= min(test.classes)
    assert not set(train.classes) & set(test.classes)


def test_sop_uses_class_id_and_tfds_splits():
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        train = tfds_source("stanford_online_products", "train")
        raw = _raw("stanford_online_products", "train", key="class_id")
    _check_contiguous(train)
    assert len(train) == NUM_MOCK
    ids = [r["_id"] for r in raw]
    assert [train.classes[y] for y in train.labels] == ids
    assert max(ids) >= 200  # class_id spans 22,634 ids, not the 12 super classes


def test_uc_merced_stratified_split():
    with tfds.testing.mock_data(num_examples=300):
        train = tfds_source("uc_merced", "train")
        test = tfds_source("uc_merced", "test")
        again = tfds_source("uc_merced", "train")
        raw = _raw("uc_merced", "train")
    ids = np.array([r["_id"] for r in raw])
    train_ids = np.asarray(train.classes)[train.labels]
    test_ids = np.asarray(test.classes)[test.labels]
    assert len(train) + len(test) == len(raw)
    for c in np.unique(ids):
        n = int((ids == c).sum())
        assert (train_ids == c).sum() == round(0.8 * n)
        assert (test_ids == c).sum() == n - round(0.8 * n)
    # Records keep TFDS order, and the split is a fixed function of seed 0.
    np.testing.assert_array_equal(train._local, np.sort(train._local))
    np.testing.assert_array_equal(train._local, again._local)
    assert not set(train._local.tolist()) & set(test._local.tolist())
    other = tfds_sources.stratified_split(ids, 0.8, seed=1)
    assert not np.array_equal(other, tfds_sources.stratified_split(ids, 0.8, seed=0))


def _expected_crop(image: np.ndarray, bbox) -> np.ndarray:
    h, w = image.shape[:2]
    ymin, xmin, ymax, xmax = (float(v) for v in bbox)
    top, bottom = max(math.floor(ymin * h), 0), min(math.ceil(ymax * h), h)
    left, right = max(math.floor(xmin * w), 0), min(math.ceil(xmax * w), w)
    if bottom <= top or right <= left:
        return image
    return image[top:bottom, left:right]


def test_bbox_crop_geometry_on_mock():
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        source = tfds_source("caltech_birds2011", "train", crop="bbox")
        raw = [r for r in _raw("caltech_birds2011", "train") if r["_id"] < 100]
    inverted = cropped = 0
    for i, record in enumerate(raw):
        expected = _expected_crop(record["image"], record["bbox"])
        np.testing.assert_array_equal(source[i]["image"], expected)
        inverted += expected is record["image"]
        cropped += expected is not record["image"]
    assert inverted and cropped  # mock boxes include both kinds


@pytest.mark.parametrize("bbox,shape,region", [
    ((0.125, 0.25, 0.625, 0.875), (16, 32), (2, 8, 10, 28)),
    ((0.1, 0.3, 0.55, 0.95), (10, 10), (1, 3, 6, 10)),
    ((0.0, 0.0, 1.0, 1.0), (7, 9), (0, 0, 7, 9)),
    ((0.5, 0.5, 0.5, 0.9), (10, 10), (0, 0, 10, 10)),    # empty -> whole image
    ((0.8, 0.1, 0.2, 0.9), (10, 10), (0, 0, 10, 10)),    # inverted -> whole image
    ((-0.125, 0.9375, 1.25, 1.5), (8, 16), (0, 15, 8, 16)),  # clipped
])
def test_bbox_region_rule(bbox, shape, region):
    assert images.bbox_region(np.float32(bbox), *shape) == region


class _Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A tiny data set with PNG images, 6 classes and boxes, written as array_record."""

    name = "dml_test_shapes"
    VERSION = tfds.core.Version("1.0.0")

    # TFDS's default finds the module with importlib_resources (not installed); the file
    # defining the class is all it needs.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=6),
            "bbox": tfds.features.BBoxFeature(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0), "test": self._generate_examples(1)}

    def _generate_examples(self, part):
        for i in range(9):
            yield f"{part}-{i}", {"image": _png(part, i), "label": (i * 5 + part) % 6,
                                  "bbox": tfds.features.BBox(0.1, 0.2, 0.6, 0.9)}


def _png(part: int, i: int) -> bytes:
    array = np.random.default_rng([part, i]).integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    _Shapes(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
    return str(data_dir)


def test_real_array_record_reads_labels_without_decoding(shapes_dir, monkeypatch):
    raw = {s: tfds.data_source("dml_test_shapes", split=s, data_dir=shapes_dir)
           for s in ("train", "test")}
    expected_ids = [int(raw[s][j]["label"]) for s in ("train", "test") for j in range(9)]

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    with monkeypatch.context() as patch:
        patch.setattr(Image, "open", no_decoding)
        source = tfds_source("dml_test_shapes", "train", data_dir=shapes_dir, crop="bbox",
                             split_by="classes", tfds_splits=("train", "test"))
        labels = np.asarray(source.labels)
        record = source.read(0)
    assert isinstance(record["image"].data, bytes)  # undecoded until the pipeline decodes
    keep = [k for k, c in enumerate(expected_ids) if c < 3]
    assert len(source) == len(keep) and source.classes == [0, 1, 2]
    np.testing.assert_array_equal(labels, np.asarray(expected_ids)[keep])
    for i in (0, len(source) - 1):
        part, j = divmod(keep[i], 9)
        full = raw[("train", "test")[part]][j]["image"]
        np.testing.assert_array_equal(source[i]["image"], _expected_crop(full, raw["train"][0]
                                                                          ["bbox"]))


def test_generic_tfds_split_and_config(shapes_dir):
    source = get_source({"name": "tfds:dml_test_shapes", "data_dir": shapes_dir}, "test")
    assert len(source) == 9 and source.classes == sorted({(i * 5 + 1) % 6 for i in range(9)})
    stratified = tfds_source("dml_test_shapes", "train", data_dir=shapes_dir,
                             split_by="samples", train_fraction=0.5)
    assert len(stratified) == sum(round(0.5 * n) for n in np.bincount(
        [(i * 5) % 6 for i in range(9)]) if n)


def test_missing_dataset_names_it_the_directory_and_the_command(tmp_path):
    with pytest.raises(DatasetNotPreparedError) as info:
        tfds_source("cars196", "train", data_dir=str(tmp_path))
    message = str(info.value)
    assert "'cars196'" in message and str(tmp_path) in message
    assert "python -m dml_jax.data.prepare cars196 --manual_dir DIR" in message


@pytest.mark.parametrize("kwargs,match", [
    ({"crop": "box"}, "crop"),
    ({"split_by": "random"}, "split_by"),
    ({"train_fraction": 1.5}, "train_fraction"),
])
def test_bad_arguments(kwargs, match):
    with tfds.testing.mock_data(num_examples=4), pytest.raises(ValueError, match=match):
        tfds_source("caltech_birds2011", "train", **kwargs)


def test_bad_split_and_missing_bbox_feature():
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match="split"):
            tfds_source("cars196", "validation")
        with pytest.raises(ValueError, match="bbox"):
            tfds_source("uc_merced", "train", crop="bbox")
