"""``cars196`` (Stanford Cars) from its original archives, without TensorFlow.

Reads ``cars_train.tgz`` (``cars_train/00001.jpg`` ...), ``cars_test.tgz`` (``cars_test/...``),
``car_devkit.tgz`` (``devkit/cars_train_annos.mat``, ``devkit/cars_meta.mat``) and
``cars_test_annos_withlabels.mat``. Same name, version (2.1.0), features, splits and example
keys as TFDS's own builder:

* ``image``: the JPEG file bytes; ``id``: the file name without extension (``00001``, also the
  example key);
* ``label``: ``ClassLabel`` with the 196 names of ``cars_meta.mat`` (``class_names``), the
  annotation's 1-based ``class`` minus one;
* ``bbox``: the annotation's pixel ``bbox_x1, bbox_y1, bbox_x2, bbox_y2`` divided by the image
  width/height as TFDS does, as ``[ymin, xmin, ymax, xmax]`` (clipped to ``[0, 1]``);
* splits ``train`` (``cars_train_annos.mat``, 8,144 images) and ``test``
  (``cars_test_annos_withlabels.mat``, 8,041).

Annotation records are read by position, as TFDS does: ``bbox_x1, bbox_y1, bbox_x2, bbox_y2,
class, fname``.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import tensorflow_datasets as tfds

from dml_jax.data.builders import _archive, _base

NUM_CLASSES = 196
_TRAIN_ANNOS = "devkit/cars_train_annos.mat"
_META = "devkit/cars_meta.mat"
_TEST_ANNOS = "cars_test_annos_withlabels.mat"


class _Annotation(NamedTuple):
    label: int
    box: tuple[float, float, float, float]  # pixels x1, y1, x2, y2


def _loadmat(data: bytes, name: str) -> dict:
    from scipy import io as sio

    try:
        return sio.loadmat(io.BytesIO(data))
    except (ValueError, TypeError, OSError) as err:
        raise ValueError(f"Cannot read MATLAB file {name}: {err}") from err


def class_names(meta: bytes, name: str = _META) -> list[str]:
    """The 196 class names of ``cars_meta.mat`` (``class_names``), in class-id order.

    Raises:
      ValueError: naming the file when it has no ``class_names`` or not 196 of them.
    """
    mat = _loadmat(meta, name)
    if "class_names" not in mat:
        raise ValueError(f"{name} has no `class_names` variable.")
    names = [str(np.asarray(x).item()) for x in np.asarray(mat["class_names"]).ravel()]
    if len(names) != NUM_CLASSES:
        raise ValueError(f"{name} has {len(names)} class names; expected {NUM_CLASSES}.")
    return names


def annotations(data: bytes, name: str) -> dict[str, _Annotation]:
    """``{file stem: annotation}`` of a Cars annotation ``.mat`` (``annotations`` struct array).

    Raises:
      ValueError: naming the file when it has no ``annotations`` or a class is out of range.
    """
    mat = _loadmat(data, name)
    if "annotations" not in mat:
        raise ValueError(f"{name} has no `annotations` variable.")
    out = {}
    for record in np.asarray(mat["annotations"]).ravel():
        stem = str(np.asarray(record[-1]).item()).split(".")[0]
        label = int(np.asarray(record[4]).item()) - 1
        if not 0 <= label < NUM_CLASSES:
            raise ValueError(f"{name}: image {stem} has class {label + 1}, outside 1..196.")
        box = tuple(float(np.asarray(record[k]).item()) for k in range(4))
        out[stem] = _Annotation(label, box)
    return out


def normalised_box(box: tuple[float, float, float, float], width: int, height: int
                   ) -> tfds.features.BBox:
    """Pixel ``(x1, y1, x2, y2)`` as TFDS's ``[ymin, xmin, ymax, xmax]`` (divided by W / H)."""
    x1, y1, x2, y2 = box
    return tfds.features.BBox(
        ymin=_base.clip_unit(y1 / height), xmin=_base.clip_unit(x1 / width),
        ymax=_base.clip_unit(y2 / height), xmax=_base.clip_unit(x2 / width),
    )


class Cars196(_base.ManualBuilder, skip_registration=True):
    """Stanford Cars (196 classes) from the images and devkit archives."""

    name = "cars196"
    VERSION = tfds.core.Version("2.1.0")
    ARCHIVES = ("cars_train.tgz", "cars_test.tgz", "car_devkit.tgz", _TEST_ANNOS)
    DOWNLOAD_PAGE = ("https://ai.stanford.edu/~jkrause/cars/car_dataset.html (dead link; "
                     "archived copies are listed in docs/data.md)")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Stanford Cars: 16,185 images of 196 car models (make, model, year), "
            "with bounding boxes (prepared without TensorFlow).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                # The names are read from the devkit's cars_meta.mat when preparing.
                "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "bbox": tfds.features.BBoxFeature(),
                "id": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://ai.stanford.edu/~jkrause/cars/car_dataset.html",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        paths = self.archive_paths(dl_manager.manual_dir)
        devkit = _archive.read_members(paths["car_devkit.tgz"], [_TRAIN_ANNOS, _META])
        names = class_names(devkit[_META], f"car_devkit.tgz:{_META}")
        self.info.features["label"].names = names
        train = annotations(devkit[_TRAIN_ANNOS], f"car_devkit.tgz:{_TRAIN_ANNOS}")
        test = annotations(paths[_TEST_ANNOS].read_bytes(), _TEST_ANNOS)
        return {
            "train": self._generate_examples(paths["cars_train.tgz"], "cars_train", train),
            "test": self._generate_examples(paths["cars_test.tgz"], "cars_test", test),
        }

    def _generate_examples(self, archive: Path, folder: str, annos: dict[str, _Annotation]
                           ) -> Iterator[tuple[str, dict]]:
        """Streams the archive once; holds one image's bytes at a time."""

        def stem_of(name: str) -> str | None:
            head, base = posixpath.split(name)
            stem = base.split(".")[0]
            return stem if head == folder and stem in annos else None

        seen = set()
        for name, data in _archive.iter_members(archive, lambda n: stem_of(n) is not None):
            stem = stem_of(name)
            seen.add(stem)
            width, height = _base.image_size(data, f"{archive}:{name}")
            yield stem, {
                "image": _base.storable_image(data, f"{archive}:{name}"),
                "label": annos[stem].label,
                "bbox": normalised_box(annos[stem].box, width, height),
                "id": stem,
            }
        missing = sorted(annos.keys() - seen)
        if missing:
            raise FileNotFoundError(f"{archive} lacks {len(missing)} annotated image(s), "
                                    f"e.g. {folder}/{missing[0]}.jpg.")
