"""Augmentation geometry of the DML protocol, as pure functions of a NumPy generator.

Train: a random resized crop (torchvision's ``RandomResizedCrop`` sampling: area share in
``scale``, log-uniform aspect ratio in ``ratio``, 10 tries then a centre crop of clamped
ratio) or resize-then-random-crop, plus a horizontal flip with probability 1/2. Eval: resize
the shorter side to ``resize`` then centre-crop ``size``. Boxes are planned in the coordinates
of the region being augmented (the whole image, or its ``crop="bbox"`` box) and returned as
``(left, top, right, bottom)`` floats, so the image is decoded and resized once.

Every random draw comes from the generator passed in; the pipeline seeds one per
``(seed, step, row)``, so a resumed run augments bit for bit like an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

Box = tuple[float, float, float, float]

CROPS = ("random_resized", "resize_random")


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation options.

    Attributes:
      crop: ``"random_resized"`` (default) or ``"resize_random"`` (resize the shorter side to
        ``round(size * resize_ratio)``, then a random ``size`` crop).
      scale: area share range of the random resized crop.
      ratio: aspect-ratio (width / height) range of the random resized crop.
      flip: random horizontal flip.
      resize_ratio: shorter side / output side for ``"resize_random"`` and for evaluation
        (256 / 224 by default).
    """

    crop: str = "random_resized"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    resize_ratio: float = 256 / 224

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"`crop` must be one of {CROPS}; got {self.crop!r}.")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"`scale` must satisfy 0 < lo <= hi <= 1; got {self.scale}.")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"`ratio` must satisfy 0 < lo <= hi; got {self.ratio}.")
        if self.resize_ratio < 1:
            raise ValueError(f"`resize_ratio` must be >= 1; got {self.resize_ratio}.")


def random_resized_crop(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Box:
    """A random crop box of an ``height x width`` image (torchvision's sampling rule)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return float(left), float(top), float(left + w), float(top + h)
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return float(left), float(top), float(left + w), float(top + h)


def _resized_crop_box(height: int, width: int, size: int, resize: int,
                      offset_y: int, offset_x: int) -> Box:
    """The source box of a ``size`` crop at ``offset`` after resizing the shorter side."""
    factor = resize / min(height, width)
    side = size / factor
    top, left = offset_y / factor, offset_x / factor
    return left, top, left + side, top + side


def _resized_shape(height: int, width: int, resize: int) -> tuple[int, int]:
    if height <= width:
        return resize, max(resize, round(width * resize / height))
    return max(resize, round(height * resize / width)), resize


def center_crop(height: int, width: int, size: int, resize: int) -> Box:
    """Source box of: shorter side resized to ``resize``, then the centre ``size`` crop."""
    if resize < size:
        raise ValueError(f"`resize` ({resize}) must be >= `size` ({size}).")
    rh, rw = _resized_shape(height, width, resize)
    return _resized_crop_box(height, width, size, resize, (rh - size) // 2, (rw - size) // 2)


def resize_random_crop(rng: np.random.Generator, height: int, width: int, size: int,
                       resize: int) -> Box:
    """Source box of: shorter side resized to ``resize``, then a random ``size`` crop."""
    if resize < size:
        raise ValueError(f"`resize` ({resize}) must be >= `size` ({size}).")
    rh, rw = _resized_shape(height, width, resize)
    oy = int(rng.integers(0, rh - size + 1))
    ox = int(rng.integers(0, rw - size + 1))
    return _resized_crop_box(height, width, size, resize, oy, ox)


def eval_resize(size: int, augment: Augment) -> int:
    """The shorter side before the centre crop: ``round(size * resize_ratio)``."""
    return round(size * augment.resize_ratio)


def train_plan(rng: np.random.Generator, height: int, width: int, size: int,
               augment: Augment) -> tuple[Box, bool]:
    """``(box, flip)`` of one training view of an ``height x width`` region."""
    if augment.crop == "random_resized":
        box = random_resized_crop(rng, height, width, augment.scale, augment.ratio)
    else:
        box = resize_random_crop(rng, height, width, size, eval_resize(size, augment))
    flip = bool(rng.random() < 0.5) if augment.flip else False
    return box, flip
