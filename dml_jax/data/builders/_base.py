"""What every TF-free builder shares: the manual-dir archive check and storable image bytes.

The builders subclass :class:`ManualBuilder`, a ``tfds.core.GeneratorBasedBuilder`` that is
never registered in TFDS's registry (TFDS already registers its own builders under the same
names), reads the data set's original archives from the manual directory and yields image
*file bytes*, which TFDS stores unchanged. Writing them as ``array_record`` needs neither
TensorFlow nor Apache Beam.
"""

from __future__ import annotations

import inspect
import io
import os
from pathlib import Path
from typing import ClassVar

import tensorflow_datasets as tfds
from etils import epath
from PIL import Image, UnidentifiedImageError

DOCS = "docs/data.md"

# Formats and modes that TFDS's NumPy decoders (OpenCV or PIL) turn into uint8 [H, W, 3]
# (grey images are repeated to 3 channels); anything else is converted losslessly to RGB PNG.
_KEPT_FORMATS = ("JPEG", "PNG")
_KEPT_MODES = ("RGB", "L")


class MissingArchiveError(FileNotFoundError):
    """An archive the builder needs is not in the manual directory."""


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders that read the original archives from ``manual_dir``.

    Subclasses set ``name``, ``VERSION`` (TFDS's version of the same data set), ``ARCHIVES``
    (file names that must be in the manual dir), ``DOWNLOAD_PAGE`` and implement ``_info``,
    ``_split_generators`` and ``_generate_examples``; each must pass
    ``skip_registration=True`` in its class statement.
    """

    ARCHIVES: ClassVar[tuple[str, ...]] = ()
    DOWNLOAD_PAGE: ClassVar[str] = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put the data set's original archives there ({DOCS})."

    # TFDS's default looks the module up with importlib_resources (an extra package); the
    # file defining the class is all it needs.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))

    @classmethod
    def archive_paths(cls, manual_dir: str | os.PathLike) -> dict[str, Path]:
        """``{file name: path}`` of ``ARCHIVES`` in ``manual_dir``.

        Raises:
          MissingArchiveError: naming every missing file, the directory searched and where
            to download them.
        """
        manual_dir = Path(manual_dir).expanduser()
        paths = {name: manual_dir / name for name in cls.ARCHIVES}
        missing = [name for name, path in paths.items() if not path.is_file()]
        if missing:
            raise MissingArchiveError(missing_message(cls.name, missing, manual_dir,
                                                      cls.DOWNLOAD_PAGE))
        return paths


def missing_message(dataset: str, missing: list[str], manual_dir: Path, page: str) -> str:
    """The error text for archives missing from ``manual_dir``."""
    files = ", ".join(repr(m) for m in missing)
    return (
        f"{dataset}: expected {files} in the manual directory {os.fspath(manual_dir)} "
        f"(searched, not found). Download it from {page} and put it there unchanged "
        f"(see {DOCS})."
    )


def image_size(data: bytes, name: str) -> tuple[int, int]:
    """``(width, height)`` from the image header (no full decode).

    Raises:
      ValueError: naming ``name`` when the bytes are not an image PIL can read.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Cannot read image {name}: {err}") from err


def storable_image(data: bytes, name: str, *, mode: str = "RGB") -> bytes:
    """Image bytes TFDS can store and decode to ``uint8 [H, W, 3]`` (``mode="L"``: ``[H, W, 1]``).

    JPEG/PNG files already in RGB or grey (``L``) come back unchanged (the usual case: no
    re-encoding); any other format or mode (TIFF, CMYK, palette, 16-bit, RGBA...) is decoded,
    converted to ``mode`` and encoded as lossless PNG. Holds one decoded image at most.

    Raises:
      ValueError: naming ``name`` when the bytes are not an image PIL can decode.
    """
    kept_modes = _KEPT_MODES if mode == "RGB" else (mode,)
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format in _KEPT_FORMATS and im.mode in kept_modes:
                return data
            converted = im.convert(mode)
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"Cannot read image {name}: {err}") from err
    buffer = io.BytesIO()
    converted.save(buffer, format="PNG")
    return buffer.getvalue()


def blank_mask_png(width: int, height: int) -> bytes:
    """An all-zero single-channel PNG of the given size (holds one ``[height, width]`` mask)."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 0).save(buffer, format="PNG")
    return buffer.getvalue()


def clip_unit(value: float) -> float:
    """``value`` clipped to ``[0, 1]`` (TFDS's boxes must lie there)."""
    return min(max(float(value), 0.0), 1.0)
