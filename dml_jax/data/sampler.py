"""Class-balanced P x K batch sampling, deterministic and resumable.

The batch of step ``t`` is a pure function of ``(seed, t)``: ``P`` distinct classes, then ``K``
samples of each (without replacement where the class has ``K`` samples, with replacement
otherwise). The sampler's position is therefore just the training step, which the checkpoint
holds: a resumed run draws exactly the batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import numpy as np


class PKSampler:
    """Draws ``P`` classes x ``K`` samples per batch from ``labels``.

    Args:
      labels: int ``[N]`` labels of the data set the indices refer to.
      classes_per_batch: ``P``.
      samples_per_class: ``K``.
      seed: the sampler's seed.

    Raises:
      ValueError: ``P`` exceeds the number of classes, or ``P``/``K`` are not positive.
    """

    def __init__(self, labels: np.ndarray, classes_per_batch: int, samples_per_class: int,
                 seed: int = 0):
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"`labels` must have shape [N]; got {labels.shape}.")
        if classes_per_batch < 1 or samples_per_class < 1:
            raise ValueError(
                f"P and K must be >= 1; got P={classes_per_batch}, K={samples_per_class}."
            )
        self.classes = np.unique(labels)
        if classes_per_batch > self.classes.size:
            raise ValueError(
                f"classes_per_batch={classes_per_batch} but the data has only "
                f"{self.classes.size} classes: lower P (config.classes_per_batch)."
            )
        order = np.argsort(labels, kind="stable")
        starts = np.searchsorted(labels[order], self.classes, side="left")
        self._members = np.split(order, starts[1:])
        self.classes_per_batch = classes_per_batch
        self.samples_per_class = samples_per_class
        self.seed = seed

    @property
    def batch_size(self) -> int:
        """``P * K``."""
        return self.classes_per_batch * self.samples_per_class

    def members(self, label: int) -> np.ndarray:
        """Indices (ascending) of the records with ``label``."""
        pos = int(np.searchsorted(self.classes, label))
        if pos >= self.classes.size or self.classes[pos] != label:
            raise ValueError(f"`label` {label} is not a label of the data.")
        return self._members[pos]

    def batch_indices(self, step: int) -> np.ndarray:
        """Indices ``[P * K]`` of the batch of ``step``, grouped by class."""
        rng = np.random.default_rng([self.seed, int(step)])
        chosen = rng.choice(self.classes.size, size=self.classes_per_batch, replace=False)
        out = []
        for c in chosen:
            members = self._members[c]
            replace = members.size < self.samples_per_class
            out.append(rng.choice(members, size=self.samples_per_class, replace=replace))
        return np.concatenate(out)
