"""``stanford_online_products`` from ``Stanford_Online_Products.zip``, without TensorFlow.

Same name, version (1.0.0), features, splits and example keys as TFDS's own builder. Each row
``image_id class_id super_class_id path`` of ``Stanford_Online_Products/Ebay_train.txt``
(split ``train``, 59,551 images of 11,318 products) or ``Ebay_test.txt`` (``test``, 60,502
images of the other 11,316 products) gives one example, keyed by its 0-based row number:

* ``image``: the JPEG file bytes of ``Stanford_Online_Products/<path>``;
* ``class_id``: ``ClassLabel(num_classes=22634)``, the product id minus one;
* ``super_class_id/num``: ``ClassLabel(num_classes=12)``, the super-class id minus one;
* ``super_class_id``: the same as a ``ClassLabel`` named ``bicycle`` ... ``toaster``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import tensorflow_datasets as tfds

from dml_jax.data.builders import _base

NUM_CLASSES = 22634
SUPER_CLASSES = ("bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp",
                 "mug", "sofa", "stapler", "table", "toaster")
_ROOT = "Stanford_Online_Products"
_ARCHIVE = "Stanford_Online_Products.zip"
_SPLITS = {"train": "Ebay_train.txt", "test": "Ebay_test.txt"}


class _Row(NamedTuple):
    class_id: int  # 0-based
    super_class_id: int  # 0-based
    path: str  # relative to Stanford_Online_Products/


def parse_list(text: str, filename: str) -> list[_Row]:
    """The rows of ``Ebay_train.txt`` / ``Ebay_test.txt`` (header ``image_id class_id
    super_class_id path``), in file order.

    Raises:
      ValueError: naming the file and line of a malformed row or an id out of range.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].split() != ["image_id", "class_id", "super_class_id", "path"]:
        raise ValueError(f"{filename}: expected the header 'image_id class_id super_class_id "
                         "path'.")
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        cols = line.split()
        try:
            row = _Row(int(cols[1]) - 1, int(cols[2]) - 1, cols[3])
        except (IndexError, ValueError) as err:
            raise ValueError(f"{filename} line {lineno}: malformed row {line!r}.") from err
        if not (0 <= row.class_id < NUM_CLASSES and 0 <= row.super_class_id < 12):
            raise ValueError(f"{filename} line {lineno}: id out of range in {line!r}.")
        rows.append(row)
    return rows


class StanfordOnlineProducts(_base.ManualBuilder, skip_registration=True):
    """Stanford Online Products (22,634 products, 12 super-classes)."""

    name = "stanford_online_products"
    VERSION = tfds.core.Version("1.0.0")
    ARCHIVES = (_ARCHIVE,)
    DOWNLOAD_PAGE = "https://cvgl.stanford.edu/projects/lifted_struct/"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Stanford Online Products: 120,053 images of 22,634 online products "
            "in 12 super-classes (prepared without TensorFlow).",
            features=tfds.features.FeaturesDict({
                "class_id": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
                "super_class_id/num": tfds.features.ClassLabel(num_classes=len(SUPER_CLASSES)),
                "super_class_id": tfds.features.ClassLabel(names=list(SUPER_CLASSES)),
                "image": tfds.features.Image(),
            }),
            homepage=self.DOWNLOAD_PAGE,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        archive = self.archive_paths(dl_manager.manual_dir)[_ARCHIVE]
        return {split: self._generate_examples(archive, filename)
                for split, filename in _SPLITS.items()}

    def _generate_examples(self, archive: Path, filename: str) -> Iterator[tuple[int, dict]]:
        """Reads the list, then each image by random access; holds one image at a time."""
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError) as err:
            raise ValueError(f"Cannot read archive {archive}: {err}") from err
        with zf:
            rows = parse_list(_read(zf, archive, f"{_ROOT}/{filename}").decode("utf-8"),
                              f"{archive}:{_ROOT}/{filename}")
            for i, row in enumerate(rows):
                member = f"{_ROOT}/{row.path}"
                yield i, {
                    "class_id": row.class_id,
                    "super_class_id/num": row.super_class_id,
                    "super_class_id": row.super_class_id,
                    "image": _base.storable_image(_read(zf, archive, member),
                                                  f"{archive}:{member}"),
                }


def _read(zf: zipfile.ZipFile, archive: Path, member: str) -> bytes:
    try:
        return zf.read(member)
    except KeyError as err:
        raise FileNotFoundError(f"{archive} has no member {member}.") from err
