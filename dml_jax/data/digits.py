"""scikit-learn's digits: the embedded real data set (ships inside scikit-learn, no download).

1,797 grey-scale 8x8 images of the digits 0-9 (about 180 per class), split by samples into a
stratified train/test partition with a fixed seed, so retrieval is evaluated on held-out images
of the same classes.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Split(NamedTuple):
    """One partition: ``images`` float32 ``[N, H, W, C]`` in [0, 1], ``labels`` int32 ``[N]``."""

    images: np.ndarray
    labels: np.ndarray

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return int(np.unique(self.labels).size)


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
    from sklearn.model_selection import train_test_split

    data = _sk_load()
    images = (data.images.astype(np.float32) / 16.0)[..., None]
    labels = data.target.astype(np.int32)
    idx_train, idx_test = train_test_split(
        np.arange(labels.size), test_size=test_fraction, stratify=labels, random_state=seed
    )
    idx_train.sort()
    idx_test.sort()
    return Split(images[idx_train], labels[idx_train]), Split(images[idx_test], labels[idx_test])
