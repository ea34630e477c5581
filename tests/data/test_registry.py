"""The source registry, views of sources, the digits source and the P x K sampler."""

from __future__ import annotations

import ml_collections
import numpy as np
import pytest

from dml_jax.data import (
    ArraySource,
    PKSampler,
    Source,
    Subset,
    available_sources,
    digits_source,
    get_source,
    load_digits,
    register,
)


def test_registry_lookup_and_errors():
    names = available_sources()
    for name in ("digits", "image_folder", "caltech_birds2011", "cars196",
                 "stanford_online_products", "uc_merced"):
        assert name in names
    config = ml_collections.ConfigDict({"name": "digits", "test_fraction": 0.5, "seed": 3})
    train = get_source(config, "train")
    assert isinstance(train, Source) and len(train) == 898
    assert len(get_source("digits", "test", test_fraction=0.5, seed=3)) == 1797 - 898
    with pytest.raises(ValueError, match=r"registered: .*digits"):
        get_source("imagenet_typo", "train")
    with pytest.raises(ValueError, match="name"):
        get_source({"data_dir": "/x"}, "train")
    with pytest.raises(ValueError, match="already registered"):
        register("digits")(lambda split: None)


def test_digits_source_matches_load_digits():
    train, test = load_digits()
    for split, reference in (("train", train), ("test", test)):
        source = digits_source(split)
        assert source.images.shape == (len(reference.labels), 8, 8, 3)
        assert source.images.dtype == np.uint8 and source.classes == list(range(10))
        np.testing.assert_array_equal(source.labels, reference.labels)
        unit = source.images.astype(np.float32) / 255
        assert (unit == unit[..., :1]).all()
        np.testing.assert_allclose(unit[..., :1], reference.images, atol=1 / 510 + 1e-7)
    with pytest.raises(ValueError, match="split"):
        digits_source("validation")


def test_subset_relabels_and_reads_through():
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    parent = ArraySource(images, np.array([7, 3, 7, 9, 3, 9]))
    assert parent.classes == [3, 7, 9]
    np.testing.assert_array_equal(parent.labels, [1, 0, 1, 2, 0, 2])
    sub = Subset(parent, [3, 0, 2])
    assert sub.classes == [7, 9]  # parent class ids of the labels present, in label order
    np.testing.assert_array_equal(sub.labels, [1, 0, 0])
    np.testing.assert_array_equal(sub[0]["image"], images[3])
    assert sub[0]["label"] == 1 and sub.read(2)["label"] == 0
    with pytest.raises(IndexError, match="out of range"):
        sub[3]
    with pytest.raises(ValueError, match="indices"):
        Subset(parent, [6])


def test_sampler_members_and_unchanged_batches():
    labels = np.random.default_rng(0).integers(0, 12, 200)
    sampler = PKSampler(labels, 4, 3, seed=2)
    for c in range(12):
        np.testing.assert_array_equal(sampler.members(c), np.flatnonzero(labels == c))
    # The same draws as drawing from np.flatnonzero(labels == c) (the sampler's old index).
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for step in range(5):
        rng = np.random.default_rng([2, step])
        chosen = rng.choice(12, size=4, replace=False)
        want = np.concatenate([rng.choice(members[c], size=3, replace=members[c].size < 3)
                               for c in chosen])
        np.testing.assert_array_equal(sampler.batch_indices(step), want)
    with pytest.raises(ValueError, match="label"):
        sampler.members(12)
