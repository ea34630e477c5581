"""scikit-learn's digits: the embedded real data set (ships inside scikit-learn, no download).

1,797 grey-scale 8x8 images of the digits 0-9 (about 180 per class), split by samples into a
stratified train/test partition with a fixed seed, so retrieval is evaluated on held-out images
of the same classes.

Two views of the same split: :func:`load_digits` (float32 ``[N, 8, 8, 1]`` in [0, 1], what the
digits demo has always trained on) and :func:`digits_source`, a source like every other
(uint8 ``[8, 8, 3]`` RGB, grey repeated). Its pixel is ``round(v * 255 / 16)`` for the stored
0-16 value ``v``, so ``normalize(x, "unit")[..., :1]`` equals ``load_digits``'s image to within
1/510. Feed it to the pipeline with ``image_size=None``: the 8x8 images are kept as stored (no
upsampling, no augmentation) and gathered in NumPy, which keeps the demo at its speed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dml_jax.data.source import ArraySource, register


class Split(NamedTuple):
    """One partition: ``images`` float32 ``[N, H, W, C]`` in [0, 1], ``labels`` int32 ``[N]``."""

    images: np.ndarray
    labels: np.ndarray

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return int(np.unique(self.labels).size)


def _split_indices(labels: np.ndarray, test_fraction: float, seed: int):
    from sklearn.model_selection import train_test_split

    idx_train, idx_test = train_test_split(
        np.arange(labels.size), test_size=test_fraction, stratify=labels, random_state=seed
    )
    return np.sort(idx_train), np.sort(idx_test)


def load_digits(*, test_fraction: float = 0.3, seed: int = 0) -> tuple[Split, Split]:
    """Returns ``(train, test)`` splits of the digits, stratified by class.

    Args:
      test_fraction: share of each class held out for evaluation (default 0.3).
      seed: seed of the split (the same seed always gives the same split).

    Returns:
      Two :class:`Split` with images ``[N, 8, 8, 1]`` scaled to [0, 1].
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1); got {test_fraction}.")
    from sklearn.datasets import load_digits as _sk_load

    data = _sk_load()
    images = (data.images.astype(np.float32) / 16.0)[..., None]
    labels = data.target.astype(np.int32)
    idx_train, idx_test = _split_indices(labels, test_fraction, seed)
    return Split(images[idx_train], labels[idx_train]), Split(images[idx_test], labels[idx_test])


@register("digits")
def digits_source(split: str, *, test_fraction: float = 0.3, seed: int = 0) -> ArraySource:
    """The ``"train"`` or ``"test"`` split of :func:`load_digits` as a source.

    Holds the split's images in memory: uint8 ``[N, 8, 8, 3]`` (grey repeated to RGB, pixel
    ``round(v * 255 / 16)``), labels = the digit, ``classes = [0, ..., 9]``.

    Raises:
      ValueError: ``split`` is not ``"train"`` or ``"test"``, or a bad ``test_fraction``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"digits: `split` must be 'train' or 'test'; got {split!r}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1); got {test_fraction}.")
    from sklearn.datasets import load_digits as _sk_load

    data = _sk_load()
    labels = data.target.astype(np.int32)
    pixels = np.rint(data.images * (255.0 / 16.0)).astype(np.uint8)
    idx = _split_indices(labels, test_fraction, seed)[0 if split == "train" else 1]
    rgb = np.repeat(pixels[idx, :, :, None], 3, axis=-1)
    return ArraySource(rgb, labels[idx], name=f"digits[{split}]")
