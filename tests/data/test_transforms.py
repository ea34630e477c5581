"""Augmentation geometry and device normalisation."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from dml_jax.data import normalize, transforms
from dml_jax.models.bninception import rgb_to_bninception_input


@pytest.mark.parametrize("height,width", [(375, 500), (500, 120), (30, 30)])
def test_random_resized_crop_boxes(height, width):
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    sampled = 0
    for seed in range(200):
        left, top, right, bottom = transforms.random_resized_crop(
            np.random.default_rng(seed), height, width, scale, ratio)
        w, h = right - left, bottom - top
        assert 0 <= left < right <= width and 0 <= top < bottom <= height
        assert all(float(v).is_integer() for v in (left, top, right, bottom))
        # Rounding to whole pixels moves area and ratio a little off the sampled values.
        area = w * h / (height * width)
        if scale[0] * 0.8 <= area and ratio[0] * 0.9 <= w / h <= ratio[1] * 1.1:
            sampled += 1
    assert sampled >= 190  # the fallback (centre crop) is rare for these shapes


def test_random_resized_crop_fallback_is_a_centre_crop():
    # A 1-pixel-high strip: no sampled box fits, so the fallback clamps the ratio.
    box = transforms.random_resized_crop(np.random.default_rng(0), 1, 100, (0.9, 1.0),
                                         (3 / 4, 4 / 3))
    assert box == (49.0, 0.0, 50.0, 1.0)


def test_centre_and_random_crop_after_resize():
    box = transforms.center_crop(300, 400, 224, 256)
    factor = 256 / 300
    assert math.isclose(box[2] - box[0], 224 / factor) and math.isclose(box[3] - box[1],
                                                                        224 / factor)
    assert math.isclose((box[0] + box[2]) / 2, 200, abs_tol=1 / factor)
    assert math.isclose((box[1] + box[3]) / 2, 150, abs_tol=1 / factor)
    for seed in range(20):
        left, top, right, bottom = transforms.resize_random_crop(
            np.random.default_rng(seed), 300, 400, 224, 256)
        assert math.isclose(right - left, 224 / factor) and left >= 0 and top >= 0
        assert right <= 400 + 1e-9 and bottom <= 300 + 1e-9
    with pytest.raises(ValueError, match="resize"):
        transforms.center_crop(10, 10, 8, 4)


def test_train_plan_flip_rate_and_options():
    flips = [transforms.train_plan(np.random.default_rng(s), 50, 60, 16,
                                   transforms.Augment())[1] for s in range(400)]
    assert 150 < sum(flips) < 250
    no_flip = transforms.Augment(flip=False, crop="resize_random")
    assert not any(transforms.train_plan(np.random.default_rng(s), 50, 60, 16, no_flip)[1]
                   for s in range(50))
    for bad in (dict(scale=(0.5, 0.2)), dict(ratio=(0, 1)), dict(resize_ratio=0.5)):
        with pytest.raises(ValueError):
            transforms.Augment(**bad)


def test_normalize_conventions():
    x = np.random.default_rng(0).integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    f = x.astype(np.float64)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    expected = {
        "unit": f / 255,
        "imagenet": (f / 255 - mean) / std,
        "bninception": f[..., ::-1] - np.array([104.0, 117.0, 128.0]),
    }
    jitted = jax.jit(normalize, static_argnames="convention")
    for convention, want in expected.items():
        got = jitted(x, convention=convention)
        assert got.dtype == np.float32 and got.shape == x.shape
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-5)
    # The model zoo's BN-Inception input conversion agrees (it takes RGB in [0, 1]).
    np.testing.assert_allclose(np.asarray(normalize(x, "bninception")),
                               np.asarray(rgb_to_bninception_input(x / 255.0)), atol=1e-4)
    with pytest.raises(ValueError, match="convention"):
        normalize(x, "caffe")
    with pytest.raises(ValueError, match="channels"):
        normalize(x[..., :2], "unit")
