"""``caltech_birds2011`` (CUB-200-2011) from ``CUB_200_2011.tgz``, without TensorFlow.

Same name, version (0.2.0), features, splits and example keys as TFDS's own builder:

* ``image``: the JPEG file bytes; ``image/filename``: the archive path
  (``CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg``,
  also the example key);
* ``label``: ``ClassLabel(num_classes=200)``, the class id of ``image_class_labels.txt``
  minus one; ``label_name``: the class folder name after the number, lower-cased
  (``black_footed_albatross``);
* ``bbox``: ``bounding_boxes.txt`` (pixels ``x y width height``) normalised by the image
  size to ``[ymin, xmin, ymax, xmax]``, clipped to 1;
* ``segmentation_mask``: ``Image(shape=(None, None, 1))`` from ``segmentations.tgz`` when that
  archive is in the manual dir too, otherwise all zeros (``info.metadata["segmentation_masks"]``
  says which);
* splits ``train`` (``train_test_split.txt`` flag 1, 5,994 images) and ``test`` (5,794).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import tensorflow_datasets as tfds

from dml_jax.data.builders import _archive, _base

_ROOT = "CUB_200_2011"
_SEGMENTATIONS = "segmentations.tgz"
_METADATA = ("images.txt", "image_class_labels.txt", "train_test_split.txt",
             "bounding_boxes.txt", "classes.txt")


class _Image(NamedTuple):
    relpath: str  # "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
    label: int
    label_name: str
    is_train: bool
    box: tuple[float, float, float, float]  # pixels x, y, width, height


def _rows(text: bytes, filename: str, width: int) -> dict[str, list[str]]:
    """``{first column: other columns}`` of a whitespace-separated metadata file."""
    out = {}
    for lineno, line in enumerate(text.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split()
        if len(cols) != width:
            raise ValueError(f"{_ROOT}/{filename} line {lineno}: expected {width} columns, "
                             f"got {line!r}.")
        out[cols[0]] = cols[1:]
    return out


def parse_metadata(files: dict[str, bytes]) -> list[_Image]:
    """The images of CUB's metadata files (``{file name: bytes}``), in ``images.txt`` order.

    Raises:
      ValueError: naming the file when a row is malformed or an image id is missing.
    """
    images = _rows(files["images.txt"], "images.txt", 2)
    labels = _rows(files["image_class_labels.txt"], "image_class_labels.txt", 2)
    split = _rows(files["train_test_split.txt"], "train_test_split.txt", 2)
    boxes = _rows(files["bounding_boxes.txt"], "bounding_boxes.txt", 5)
    classes = _rows(files["classes.txt"], "classes.txt", 2)
    out = []
    for image_id, (relpath,) in images.items():
        for table, filename in ((labels, "image_class_labels.txt"),
                                (split, "train_test_split.txt"), (boxes, "bounding_boxes.txt")):
            if image_id not in table:
                raise ValueError(f"{_ROOT}/{filename} has no row for image id {image_id}.")
        class_id = labels[image_id][0]
        if class_id not in classes:
            raise ValueError(f"{_ROOT}/classes.txt has no class {class_id}.")
        folder = classes[class_id][0]  # "001.Black_footed_Albatross"
        out.append(_Image(
            relpath=relpath,
            label=int(class_id) - 1,
            label_name=folder.split(".", 1)[-1].lower(),
            is_train=split[image_id][0] == "1",
            box=tuple(float(v) for v in boxes[image_id]),
        ))
    return out


def normalised_box(box: tuple[float, float, float, float], width: int, height: int
                   ) -> tfds.features.BBox:
    """CUB's pixel ``(x, y, w, h)`` as TFDS's normalised ``[ymin, xmin, ymax, xmax]``."""
    x, y, w, h = box
    return tfds.features.BBox(
        ymin=_base.clip_unit(y / height), xmin=_base.clip_unit(x / width),
        ymax=_base.clip_unit((y + h) / height), xmax=_base.clip_unit((x + w) / width),
    )


def _stem(path: str) -> str:
    return posixpath.basename(path).split(".")[0]


class CaltechBirds2011(_base.ManualBuilder, skip_registration=True):
    """CUB-200-2011 from ``CUB_200_2011.tgz`` (+ optional ``segmentations.tgz``)."""

    name = "caltech_birds2011"
    VERSION = tfds.core.Version("0.2.0")
    ARCHIVES = ("CUB_200_2011.tgz",)
    DOWNLOAD_PAGE = "https://www.vision.caltech.edu/datasets/cub_200_2011/"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Caltech-UCSD Birds-200-2011: 11,788 photos of 200 bird species, "
            "with bounding boxes and segmentation masks (prepared without TensorFlow).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "image/filename": tfds.features.Text(),
                "label": tfds.features.ClassLabel(num_classes=200),
                "label_name": tfds.features.Text(),
                "bbox": tfds.features.BBoxFeature(),
                "segmentation_mask": tfds.features.Image(shape=(None, None, 1)),
            }),
            supervised_keys=("image", "label"),
            homepage=self.DOWNLOAD_PAGE,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        manual_dir = Path(dl_manager.manual_dir)
        archive = self.archive_paths(manual_dir)["CUB_200_2011.tgz"]
        files = _archive.read_members(archive, [f"{_ROOT}/{m}" for m in _METADATA])
        images = parse_metadata({posixpath.basename(k): v for k, v in files.items()})
        masks = _read_masks(manual_dir / _SEGMENTATIONS)
        self.info.metadata["segmentation_masks"] = _SEGMENTATIONS if masks else "zeros"
        return {
            "train": self._generate_examples(archive, [i for i in images if i.is_train], masks),
            "test": self._generate_examples(archive, [i for i in images if not i.is_train],
                                            masks),
        }

    def _generate_examples(self, archive: Path, images: list[_Image],
                           masks: dict[str, bytes]) -> Iterator[tuple[str, dict]]:
        """Streams the archive once; holds one image's bytes at a time (plus ``masks``)."""
        by_relpath = {i.relpath: i for i in images}
        prefix = f"{_ROOT}/images/"

        def wanted(name: str) -> bool:
            return name.startswith(prefix) and name[len(prefix):] in by_relpath

        seen = set()
        for name, data in _archive.iter_members(archive, wanted):
            image = by_relpath[name[len(prefix):]]
            seen.add(image.relpath)
            width, height = _base.image_size(data, name)
            mask = masks.get(_stem(name))
            if mask is None:
                if masks:
                    raise ValueError(f"{_SEGMENTATIONS} has no mask for {name}.")
                mask = _base.blank_mask_png(width, height)
            yield name, {
                "image": _base.storable_image(data, f"{archive}:{name}"),
                "image/filename": name,
                "label": image.label,
                "label_name": image.label_name,
                "bbox": normalised_box(image.box, width, height),
                "segmentation_mask": mask,
            }
        missing = sorted(by_relpath.keys() - seen)
        if missing:
            raise FileNotFoundError(f"{archive} lacks {len(missing)} image(s) listed in "
                                    f"{_ROOT}/images.txt, e.g. {prefix}{missing[0]}.")


def _read_masks(path: Path) -> dict[str, bytes]:
    """``{image stem: single-channel PNG bytes}`` from ``segmentations.tgz``, or ``{}``.

    Holds every mask's PNG bytes in memory (about 40 MB for CUB).
    """
    if not path.is_file():
        return {}
    return {
        _stem(name): _base.storable_image(data, f"{path}:{name}", mode="L")
        for name, data in _archive.iter_members(path, lambda n: n.lower().endswith(".png"))
    }
