"""TFDS data sets as sources, read with ``tfds.data_source`` (random access, no TensorFlow).

The papers' data sets follow their DML protocols (:data:`PROTOCOLS`):

| name | ``split="train"`` | ``split="test"`` |
|---|---|---|
| ``caltech_birds2011`` | TFDS ids 0-99 from TFDS ``train`` then ``test`` | ids 100-199, likewise |
| ``cars196`` | ids 0-97 from ``train`` then ``test`` | ids 98-195, likewise |
| ``stanford_online_products`` | TFDS ``train`` (label from ``class_id``) | TFDS ``test`` |
| ``uc_merced`` | per class, a stratified 80 % (seed 0) of TFDS ``train`` | the other 20 % |

Any other TFDS image data set is read by name with the split rule chosen by the arguments
(``split_by="tfds"`` by default: the TFDS split named ``split``). Records keep TFDS order within
a split; labels are contiguous, ``classes`` are the TFDS ids in ascending order.

The data set must be prepared in ``array_record`` format (``python -m dml_jax.data.prepare``,
``docs/data.md``). Images are read as JPEG/PNG bytes (``tfds.decode.SkipDecoding``) and
decoded by the pipeline; labels are read the same way, without decoding any image.
``tfds.testing.mock_data`` cannot skip decoding without TensorFlow, so under it the records
come decoded (tiny random images) and everything else works the same.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from dml_jax.data import images
from dml_jax.data.source import check_index, contiguous_labels, register

PREPARE_COMMAND = "python -m dml_jax.data.prepare {name} --manual_dir DIR"
SPLIT_RULES = ("classes", "samples", "tfds")


@dataclasses.dataclass(frozen=True)
class SplitProtocol:
    """How a data set's ``train`` / ``test`` sources are made from its TFDS splits.

    Attributes:
      split_by: ``"classes"``: class-disjoint, train = TFDS ids below
        ``round(num_classes * train_fraction)``; ``"samples"``: per class, a stratified
        ``train_fraction`` of the records (seeded); ``"tfds"``: the TFDS split named ``split``.
      tfds_splits: the TFDS splits read and concatenated, in order (``classes`` / ``samples``).
      train_fraction: share of the classes or of each class's records in ``train``.
      label_key: the record's class feature.
    """

    split_by: str = "tfds"
    tfds_splits: tuple[str, ...] = ("train",)
    train_fraction: float = 0.5
    label_key: str = "label"


PROTOCOLS: dict[str, SplitProtocol] = {
    "caltech_birds2011": SplitProtocol("classes", ("train", "test"), 0.5),
    "cars196": SplitProtocol("classes", ("train", "test"), 0.5),
    "stanford_online_products": SplitProtocol("tfds", label_key="class_id"),
    "uc_merced": SplitProtocol("samples", ("train",), 0.8),
}


class DatasetNotPreparedError(FileNotFoundError):
    """The TFDS data set is not prepared in the data directory searched."""


def _default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


def _not_prepared(name: str, data_dir: str | None, err: Exception) -> Exception:
    """The one error for a missing data set, or ``err`` itself when the data set is there."""
    import tensorflow_datasets as tfds

    root = data_dir or _default_data_dir()
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if builder.is_prepared():
            return err
        searched = builder.data_dir
    except Exception:
        searched = os.path.join(root, name)
    command = PREPARE_COMMAND.format(name=name)
    if data_dir is not None:
        command += f" --data_dir {data_dir}"
    if name not in PROTOCOLS:
        command = f"TFDS's builder, in array_record format, into {root}"
    return DatasetNotPreparedError(
        f"TFDS data set {name!r} is not prepared: nothing readable in {searched} "
        f"(data_dir {root}). Prepare it with: {command} (see docs/data.md)."
    )


def _open(name: str, split: str, data_dir: str | None, decoders: Any) -> Any:
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                                decoders=decoders)
    except Exception as err:
        raise _not_prepared(name, data_dir, err) from err


def _is_mocked(source: Any) -> bool:
    """Whether ``source`` comes from ``tfds.testing.mock_data`` (its reader is a mock)."""
    from unittest import mock

    return isinstance(getattr(source, "data_source", None), mock.NonCallableMock)


def _image_decoders(name: str, split: str, data_dir: str | None) -> tuple[Any, Any]:
    """``(decoders, features)``: every top-level Image feature left as encoded bytes.

    Under ``tfds.testing.mock_data`` the decoders are None: the mock makes encoded records
    with TensorFlow only, so its (tiny, random) records are read decoded.
    """
    import tensorflow_datasets as tfds

    probe = _open(name, split, data_dir, None)
    features = probe.dataset_info.features
    skip = {key: tfds.decode.SkipDecoding() for key, feature in features.items()
            if isinstance(feature, tfds.features.Image)}
    if not skip or _is_mocked(probe):
        return None, features
    return skip, features


def _ids_of(source: Any, label_key: str) -> np.ndarray:
    """The class id of every record of a TFDS data source ``[N]`` (images left undecoded)."""
    return np.fromiter((int(source[k][label_key]) for k in range(len(source))), np.int64,
                       count=len(source))


def stratified_split(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean ``[N]``: per class, ``round(fraction * n_c)`` of its records, chosen with
    ``np.random.default_rng([seed, class_id])``; holds ``[N]`` booleans."""
    ids = np.asarray(ids)
    keep = np.zeros(ids.shape, bool)
    for c in np.unique(ids):
        members = np.flatnonzero(ids == c)
        n_keep = round(fraction * members.size)
        chosen = np.random.default_rng([seed, int(c)]).permutation(members.size)[:n_keep]
        keep[members[chosen]] = True
    return keep


class TfdsSource:
    """A source over one or more TFDS data sources (see :func:`tfds_source`).

    Holds, per record, its TFDS part and position (int ``[N]`` each) and its label; the
    TFDS data sources are opened once and read on access.
    """

    def __init__(self, name: str, split: str, parts: list[tuple[str, Any]], part: np.ndarray,
                 local: np.ndarray, ids: np.ndarray, *, label_key: str, image_key: str,
                 crop: str | None):
        self.name, self.split = name, split
        self._parts = parts
        self._part = part
        self._local = local
        self.labels, self.classes = contiguous_labels(ids)
        self.label_key, self.image_key, self.crop = label_key, image_key, crop

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, index: int) -> dict[str, Any]:
        """Record ``index`` with its image as an :class:`~images.ImageRef` (bytes or array)."""
        i = check_index(index, len(self), repr(self))
        tfds_split, source = self._parts[self._part[i]]
        j = int(self._local[i])
        origin = f"{self!r} record {i} (TFDS {tfds_split!r} #{j})"
        try:
            record = source[j]
        except Exception as err:
            raise images.ImageReadError(f"Cannot read {origin}: {err}") from err
        bbox = record.get("bbox") if self.crop == "bbox" else None
        return {"image": images.ImageRef(record[self.image_key], origin, bbox),
                "label": int(self.labels[i])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.read(index)
        return {**record, "image": images.decode(record["image"])}

    def __repr__(self) -> str:
        return f"tfds_source({self.name!r}, {self.split!r})"


def tfds_source(
    name: str,
    split: str,
    *,
    data_dir: str | None = None,
    crop: str | None = None,
    split_by: str | None = None,
    tfds_splits: tuple[str, ...] | None = None,
    train_fraction: float | None = None,
    label_key: str | None = None,
    image_key: str = "image",
    seed: int = 0,
) -> TfdsSource:
    """The ``split`` of the TFDS data set ``name`` as a source (see the module docstring).

    Args:
      name: TFDS builder name.
      split: ``"train"`` or ``"test"`` (with ``split_by="tfds"``: any TFDS split string).
      data_dir: TFDS data directory (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
      crop: None, or ``"bbox"``: each image cropped to its ``bbox`` feature: rows
        ``floor(ymin·H)`` to ``ceil(ymax·H)``, columns ``floor(xmin·W)`` to ``ceil(xmax·W)``,
        clipped; an empty box gives the whole image.
      split_by, tfds_splits, train_fraction, label_key: override the data set's
        :class:`SplitProtocol` (the table's protocol for its four names; ``split_by="tfds"``
        with ``label_key="label"`` for any other).
      image_key: the image feature.
      seed: seed of ``split_by="samples"`` (0 for the pinned protocols).

    Holds the labels and record positions ``[N]``; reading them parses every record of the
    TFDS splits involved once (images stay encoded).

    Raises:
      DatasetNotPreparedError: the data set is not prepared under ``data_dir``; the message
        names the directory searched and the command that prepares it.
      ValueError: a bad ``split``, ``crop``, ``split_by`` or fraction, or a missing feature.
    """
    base = PROTOCOLS.get(name, SplitProtocol())
    protocol = SplitProtocol(
        split_by=split_by or base.split_by,
        tfds_splits=tuple(tfds_splits) if tfds_splits is not None else base.tfds_splits,
        train_fraction=train_fraction if train_fraction is not None else base.train_fraction,
        label_key=label_key or base.label_key,
    )
    if protocol.split_by not in SPLIT_RULES:
        raise ValueError(f"`split_by` must be one of {SPLIT_RULES}; got {protocol.split_by!r}.")
    if crop not in (None, "bbox"):
        raise ValueError(f"`crop` must be None or 'bbox'; got {crop!r}.")
    if protocol.split_by != "tfds":
        if split not in ("train", "test"):
            raise ValueError(f"{name}: `split` must be 'train' or 'test'; got {split!r}.")
        if not 0.0 < protocol.train_fraction < 1.0:
            raise ValueError(
                f"`train_fraction` must be in (0, 1); got {protocol.train_fraction}."
            )
    wanted = (split,) if protocol.split_by == "tfds" else protocol.tfds_splits
    decoders, features = _image_decoders(name, wanted[0], data_dir)
    for key, what in ((protocol.label_key, "label_key"), (image_key, "image_key")):
        if key not in features:
            raise ValueError(f"{name} has no feature {key!r} (`{what}`); features: "
                             f"{sorted(features.keys())}.")
    if crop == "bbox" and "bbox" not in features:
        raise ValueError(f"crop='bbox': {name} has no 'bbox' feature.")

    parts = [(s, _open(name, s, data_dir, decoders)) for s in wanted]
    all_ids = [_ids_of(source, protocol.label_key) for _, source in parts]
    part = np.concatenate([np.full(len(ids), k, np.int32) for k, ids in enumerate(all_ids)])
    local = np.concatenate([np.arange(len(ids), dtype=np.int64) for ids in all_ids])
    ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
    if protocol.split_by == "classes":
        num_classes = features[protocol.label_key].num_classes
        boundary = round(num_classes * protocol.train_fraction)
        keep = ids < boundary if split == "train" else ids >= boundary
    elif protocol.split_by == "samples":
        keep = stratified_split(ids, protocol.train_fraction, seed)
        keep = keep if split == "train" else ~keep
    else:
        keep = np.ones(ids.shape, bool)
    return TfdsSource(name, split, parts, part[keep], local[keep], ids[keep],
                      label_key=protocol.label_key, image_key=image_key, crop=crop)


def _register(name: str) -> None:
    register(name)(lambda split, **kwargs: tfds_source(name, split, **kwargs))


for _name in PROTOCOLS:
    _register(_name)
