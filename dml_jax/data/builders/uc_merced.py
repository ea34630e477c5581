"""``uc_merced`` (UC Merced Land Use) from ``UCMerced_LandUse.zip``, without TensorFlow.

Same name, version (2.0.0), features, split and example keys as TFDS's own builder: one
``train`` split of the 2,100 ``UCMerced_LandUse/Images/<class>/<class>NN.tif`` files, keyed
by file name:

* ``image``: the TIFF decoded by PIL, as RGB, stored as lossless PNG (TFDS's builder also
  stores PNG: TFDS cannot store TIFF, so this is the one data set whose pixels are re-encoded,
  without any change to their values);
* ``label``: ``ClassLabel`` with the 21 class names (``agricultural`` ... ``tenniscourt``),
  from the class folder;
* ``filename``: the file name (``agricultural00.tif``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from dml_jax.data.builders import _archive, _base

LABELS = ("agricultural", "airplane", "baseballdiamond", "beach", "buildings", "chaparral",
          "denseresidential", "forest", "freeway", "golfcourse", "harbor", "intersection",
          "mediumresidential", "mobilehomepark", "overpass", "parkinglot", "river", "runway",
          "sparseresidential", "storagetanks", "tenniscourt")
_ARCHIVE = "UCMerced_LandUse.zip"
_IMAGES = "UCMerced_LandUse/Images"


class UcMerced(_base.ManualBuilder, skip_registration=True):
    """UC Merced Land Use: 21 classes of 100 aerial images."""

    name = "uc_merced"
    VERSION = tfds.core.Version("2.0.0")
    ARCHIVES = (_ARCHIVE,)
    DOWNLOAD_PAGE = "http://weegee.vision.ucmerced.edu/datasets/landuse.html"

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="UC Merced Land Use: 2,100 aerial images (0.3 m per pixel) of 21 land "
            "use classes (prepared without TensorFlow).",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "label": tfds.features.ClassLabel(names=list(LABELS)),
                "filename": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage=self.DOWNLOAD_PAGE,
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        archive = self.archive_paths(dl_manager.manual_dir)[_ARCHIVE]
        return {"train": self._generate_examples(archive)}

    def _generate_examples(self, archive: Path) -> Iterator[tuple[str, dict]]:
        """Reads the ``.tif`` files in archive order; holds one decoded image at a time."""

        def wanted(name: str) -> bool:
            head, base = posixpath.split(name)
            return posixpath.dirname(head) == _IMAGES and base.lower().endswith(".tif")

        count = 0
        for name, data in _archive.iter_members(archive, wanted):
            label = posixpath.basename(posixpath.dirname(name))
            if label not in LABELS:
                raise ValueError(f"{archive}:{name}: unknown class folder {label!r}; "
                                 f"expected one of {LABELS}.")
            count += 1
            filename = posixpath.basename(name)
            yield filename, {
                "image": _base.storable_image(data, f"{archive}:{name}"),
                "label": label,
                "filename": filename,
            }
        if count == 0:
            raise FileNotFoundError(f"{archive} has no {_IMAGES}/<class>/*.tif image.")
