"""Training and evaluation batches of a source: P x K sampling, decoding, augmentation, grain.

:func:`train_batches` yields the batches of steps ``start_step, start_step + 1, ...``; the
global batch of a step (which records, and how each is augmented) is a pure function of
``(source, seed, step)``: records from :class:`~dml_jax.data.sampler.PKSampler`, augmentation
from a generator seeded with ``(seed, step, row)``. Process ``i`` of ``N`` decodes only its
rows ``[i·n, (i+1)·n)``, ``n = P·K / N``. :func:`eval_batches` yields every record once, in
index order, in fixed-shape batches with ``"mask"`` and ``"index"``.

Decoding and augmentation run in grain: in ``threads`` threads of this process
(``worker_count=0``) or in ``worker_count`` worker processes, each preparing whole batches
ahead (``prefetch`` per worker). Images leave as uint8; :func:`~dml_jax.data.normalize.normalize`
converts them on the device. The returned :class:`BatchIterator` is resumable (start a new one
at any step: nothing else is needed) and must be closed (or used as a context manager) to shut
the workers down. Details: ``docs/data_pipeline.md``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from dml_jax.data import images, transforms
from dml_jax.data.sampler import PKSampler
from dml_jax.data.source import ArraySource

log = logging.getLogger(__name__)

_MAX_SUBSTITUTES = 10
_FOREVER = 1 << 62


def _process_share(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"`process_index` must be in [0, {process_count}); got {process_index}."
        )
    return process_index, process_count


def _check_size(image_size: int | None) -> None:
    if image_size is not None and (not isinstance(image_size, int | np.integer)
                                   or image_size < 1):
        raise ValueError(f"`image_size` must be a positive int or None; got {image_size!r}.")


def read_image(source: Any, index: int) -> images.ImageRef:
    """The undecoded image of record ``index`` (``source.read`` when the source offers it)."""
    reader = getattr(source, "read", None)
    record = reader(index) if reader is not None else source[index]
    if "image" not in record:
        raise ValueError(f"{source!r} record {index} has no 'image' (keys {sorted(record)}): "
                         "the batch pipeline reads image sources.")
    ref = record["image"]
    if isinstance(ref, images.ImageRef):
        return ref
    return images.ImageRef(np.asarray(ref), f"{source!r} record {index}")


def load_view(
    source: Any,
    index: int,
    image_size: int | None,
    plan: Callable[[int, int], tuple[transforms.Box, bool]] | None,
    *,
    draft: bool = True,
) -> np.ndarray:
    """Record ``index``'s image: as stored (``image_size=None``) or the view ``plan`` picks.

    ``plan(height, width) -> (box, flip)`` gets the size of the region (the whole image or its
    box) and returns a ``(left, top, right, bottom)`` box in it; the view is that box resized
    to ``image_size``. Holds one decoded image.

    A record whose image is a clip, uint8 ``[T, H, W, 3]`` (a video re-ID tracklet), gives
    ``[T, image_size, image_size, 3]``: ``plan`` is called once and every frame gets the same
    box and flip. Holds the clip.

    Raises:
      images.ImageReadError: naming the source, index and path when the image is unreadable.
    """
    ref = read_image(source, index)
    clip = isinstance(ref.data, np.ndarray) and ref.data.ndim == 4
    refs = ([images.ImageRef(frame, f"{ref.origin} frame {t}", ref.bbox)
             for t, frame in enumerate(ref.data)] if clip else [ref])
    if image_size is None:
        views = [images.decode(r) for r in refs]
    else:
        opened = [images.open_image(r) for r in refs]
        top, left, bottom, right = images.bbox_region(ref.bbox, opened[0].height,
                                                      opened[0].width)
        (x0, y0, x1, y1), flip = plan(bottom - top, right - left)
        box = (x0 + left, y0 + top, x1 + left, y1 + top)
        views = [images.render(image, box, image_size, flip=flip, origin=r.origin, draft=draft)
                 for image, r in zip(opened, refs)]
    return np.stack(views) if clip else views[0]


def _stack(views: list[np.ndarray], source: Any) -> np.ndarray:
    shapes = {v.shape for v in views}
    if len(shapes) > 1:
        raise ValueError(
            f"{source!r}: images of different sizes {sorted(shapes)} cannot form a batch with "
            "image_size=None; set image_size."
        )
    return np.stack(views)


class _TrainStep:
    """Picklable ``step -> batch`` of this process's rows (runs in the grain workers)."""

    def __init__(self, source, sampler: PKSampler, rows: tuple[int, int], image_size,
                 augment: transforms.Augment, seed: int, skip_corrupt: bool, draft: bool):
        self.source, self.sampler, self.rows = source, sampler, rows
        self.image_size, self.augment, self.seed = image_size, augment, seed
        self.skip_corrupt, self.draft = skip_corrupt, draft
        self._warned = False
        self._gather = isinstance(source, ArraySource) and image_size is None

    def _view(self, index: int, step: int, row: int, attempt: int) -> np.ndarray:
        key = [self.seed, step, row, 1] + ([attempt] if attempt else [])
        rng = np.random.default_rng(key)
        size = self.image_size
        plan = lambda h, w: transforms.train_plan(rng, h, w, size, self.augment)
        return load_view(self.source, index, size, plan, draft=self.draft)

    def _row(self, index: int, step: int, row: int) -> tuple[np.ndarray, int]:
        try:
            return self._view(index, step, row, 0), 0
        except images.ImageReadError as err:
            if not self.skip_corrupt:
                raise
            first = err
        if not self._warned:
            log.warning("Skipping a corrupt image (further skips are only counted): %s", first)
            self._warned = True
        label = int(self.source.labels[index])
        pool = self.sampler.members(label)
        order = np.random.default_rng([self.seed, step, row, 2]).permutation(pool.size)
        candidates = [int(pool[k]) for k in order if pool[k] != index][:_MAX_SUBSTITUTES]
        for attempt, other in enumerate(candidates, start=1):
            try:
                return self._view(other, step, row, attempt), attempt
            except images.ImageReadError:
                continue
        raise images.ImageReadError(
            f"{first} -- and no readable substitute among {len(candidates)} other records "
            f"of label {label}."
        ) from first

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        step = int(step)
        lo, hi = self.rows
        indices = self.sampler.batch_indices(step)[lo:hi]
        labels = np.asarray(self.source.labels, np.int32)[indices]
        if self._gather:
            return {"image": self.source.images[indices], "label": labels,
                    "skipped": np.int32(0)}
        views, skipped = [], 0
        for row, index in zip(range(lo, hi), indices):
            view, skips = self._row(int(index), step, row)
            views.append(view)
            skipped += skips
        return {"image": _stack(views, self.source), "label": labels,
                "skipped": np.int32(skipped)}


class _EvalBatch:
    """Picklable ``batch number -> batch`` of this process's rows (runs in the grain workers)."""

    def __init__(self, source, batch_size: int, rows: tuple[int, int], image_size,
                 resize: int | None, skip_corrupt: bool, draft: bool):
        self.source, self.batch_size, self.rows = source, batch_size, rows
        self.image_size, self.resize = image_size, resize
        self.skip_corrupt, self.draft = skip_corrupt, draft
        self._warned = False

    def _plan(self, height: int, width: int) -> tuple[transforms.Box, bool]:
        return transforms.center_crop(height, width, self.image_size, self.resize), False

    def __call__(self, number: int) -> dict[str, np.ndarray]:
        lo, hi = self.rows
        source = self.source
        index = np.arange(int(number) * self.batch_size + lo, int(number) * self.batch_size + hi)
        mask = index < len(source)
        index = np.where(mask, index, -1).astype(np.int32)
        labels = np.full(index.shape, -1, np.int32)
        labels[mask] = np.asarray(source.labels)[index[mask]]
        if isinstance(source, ArraySource) and self.image_size is None:
            batch = np.zeros((index.size, *source.images.shape[1:]), np.uint8)
            batch[mask] = source.images[index[mask]]
            return {"image": batch, "label": labels, "index": index, "mask": mask,
                    "skipped": np.int32(0)}
        views = {}
        for k in np.flatnonzero(mask):
            try:
                views[k] = load_view(source, int(index[k]), self.image_size, self._plan,
                                     draft=self.draft)
            except images.ImageReadError as err:
                if not self.skip_corrupt:
                    raise
                if not self._warned:
                    log.warning("Masking a corrupt image out (further ones are only "
                                "counted): %s", err)
                    self._warned = True
                mask[k] = False
        size = self.image_size or 1
        shape = next(iter(views.values())).shape if views else (size, size, 3)
        pad = np.zeros(shape, np.uint8)
        batch = _stack([views.get(k, pad) for k in range(index.size)], source)
        skipped = int(np.count_nonzero(index >= 0)) - len(views)
        return {"image": batch, "label": labels, "index": index, "mask": mask,
                "skipped": np.int32(skipped)}


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Batches from a grain pipeline; counts skipped corrupt images; closes the workers.

    Attributes:
      step: the step (train) or batch number (eval) of the next batch.
      skipped: corrupt images replaced (train) or masked out (eval) so far.
    """

    def __init__(self, dataset: Any, first: int):
        self._iterator = iter(dataset)
        self.step = first
        self.skipped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        batch = dict(next(self._iterator))
        self.skipped += int(batch.pop("skipped"))
        self.step += 1
        return batch

    def close(self) -> None:
        """Stops the worker processes (if any); the iterator is unusable afterwards."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _grain_iterator(fn: Callable[[int], dict], start: int, stop: int, *, worker_count: int,
                    threads: int | None, prefetch: int) -> BatchIterator:
    import grain

    if worker_count < 0 or prefetch < 1:
        raise ValueError(f"`worker_count` must be >= 0 and `prefetch` >= 1; got "
                         f"{worker_count}, {prefetch}.")
    threads = 2 if threads is None else threads
    dataset = grain.MapDataset.range(start, stop).map(fn).to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    if worker_count:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=worker_count, per_worker_buffer_size=prefetch))
    return BatchIterator(dataset, start)


def train_batches(
    source: Any,
    *,
    classes_per_batch: int,
    samples_per_class: int,
    image_size: int | None = 224,
    seed: int = 0,
    start_step: int = 0,
    num_steps: int | None = None,
    augment: transforms.Augment | None = None,
    worker_count: int = 0,
    threads: int | None = None,
    prefetch: int = 2,
    skip_corrupt: bool = False,
    jpeg_draft: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """The training batches of steps ``start_step, start_step + 1, ...``.

    Each batch: ``"image"`` uint8 ``[n, image_size, image_size, 3]``, ``"label"`` int32 ``[n]``,
    this process's rows ``[i·n, (i+1)·n)`` of the global P x K batch of the step. Clip records
    (uint8 ``[T, H, W, 3]``, video re-ID tracklets) give ``"image"`` ``[n, T, image_size,
    image_size, 3]``, all ``T`` frames of a row with the same crop box and flip.

    Args:
      source: any source (``labels`` and ``__getitem__``; ``read`` for lazy decoding).
      classes_per_batch: ``P`` (distinct labels per global batch; the source must have >= P).
      samples_per_class: ``K`` consecutive rows per label (drawn with replacement for a
        class with fewer than ``K`` records).
      image_size: output side; None keeps the stored size with no augmentation (the digits).
      seed: sampling and augmentation seed.
      start_step: the first step yielded (resume from a checkpoint's step).
      num_steps: stop after this many batches (default: never).
      augment: training augmentation (default :class:`~dml_jax.data.transforms.Augment`()).
      worker_count: grain worker processes (0: threads of this process).
      threads: decoding threads per process (default 2: PIL decodes without the GIL).
      prefetch: batches prepared ahead per worker.
      skip_corrupt: replace an unreadable image by another record of its class (chosen from
        ``(seed, step, row)``, logged once, counted in ``iterator.skipped``); default: raise.
      jpeg_draft: decode JPEGs at a reduced DCT scale when the crop allows it.
      process_index, process_count: default ``jax.process_index()`` / ``process_count()``.

    Holds in memory the source's labels, the sampler's class index, and up to
    ``prefetch`` (per worker) batches.

    Raises:
      ValueError: ``P`` larger than the number of labels, ``P·K`` not divisible by the
        process count, or a bad option.
    """
    _check_size(image_size)
    if start_step < 0:
        raise ValueError(f"`start_step` must be >= 0; got {start_step}.")
    sampler = PKSampler(np.asarray(source.labels), classes_per_batch, samples_per_class, seed)
    index, count = _process_share(process_index, process_count)
    if sampler.batch_size % count:
        raise ValueError(
            f"The global batch P·K = {sampler.batch_size} does not split evenly over "
            f"{count} processes."
        )
    n = sampler.batch_size // count
    fn = _TrainStep(source, sampler, (index * n, (index + 1) * n), image_size,
                    augment or transforms.Augment(), seed, skip_corrupt, jpeg_draft)
    stop = _FOREVER if num_steps is None else start_step + num_steps
    return _grain_iterator(fn, start_step, stop, worker_count=worker_count, threads=threads,
                           prefetch=prefetch)


def eval_batches(
    source: Any,
    *,
    batch_size: int,
    image_size: int | None = 224,
    resize_ratio: float = 256 / 224,
    worker_count: int = 0,
    threads: int | None = None,
    prefetch: int = 2,
    skip_corrupt: bool = False,
    jpeg_draft: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
) -> BatchIterator:
    """Every record exactly once, in index order, in fixed-shape batches.

    Each batch: ``"image"`` uint8 ``[n, image_size, image_size, 3]`` (shorter side resized to
    ``round(image_size · resize_ratio)``, then the centre crop), ``"label"`` int32,
    ``"index"`` int32 (position in the source), ``"mask"`` bool (False on padding rows,
    whose index and label are -1 and image zeros). ``batch_size`` is the global batch:
    process ``i`` of ``N`` gets its rows ``[i·n, (i+1)·n)``, ``n = batch_size / N`` (all of
    them in one process). Clip records give ``"image"`` ``[n, T, image_size, image_size, 3]``
    (each frame resized and centre-cropped). ``skip_corrupt=True`` masks an unreadable image
    out (counted in ``iterator.skipped``) instead of raising. Other options as
    :func:`train_batches`.

    Holds up to ``prefetch`` (per worker) batches.
    """
    _check_size(image_size)
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1; got {batch_size}.")
    index, count = _process_share(process_index, process_count)
    if batch_size % count:
        raise ValueError(f"`batch_size` {batch_size} does not split evenly over {count} "
                         "processes.")
    n = batch_size // count
    resize = None if image_size is None else round(image_size * resize_ratio)
    if resize is not None and resize < image_size:
        raise ValueError(f"`resize_ratio` must be >= 1; got {resize_ratio}.")
    fn = _EvalBatch(source, batch_size, (index * n, (index + 1) * n), image_size, resize,
                    skip_corrupt, jpeg_draft)
    num_batches = math.ceil(len(source) / batch_size)
    return _grain_iterator(fn, 0, num_batches, worker_count=worker_count, threads=threads,
                           prefetch=prefetch)
