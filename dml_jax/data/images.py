"""Image decoding: an undecoded image reference, its crop region, RGB conversion.

An :class:`ImageRef` is what a source's ``read(i)`` returns in place of pixels: encoded bytes,
a file path, or an already decoded array, plus an optional normalised box (the ``crop="bbox"``
region) and an ``origin`` string that every error message names. The input pipeline opens it
with :func:`open_image` (PIL reads only the header), plans its crop in the region's
coordinates and decodes once with :func:`render`; :func:`decode` is the plain full decode that
``source[i]`` uses.

Colour rules: RGB images are kept as stored; grey, palette, RGBA, CMYK and other 8-bit modes
come back as RGB (alpha dropped). Modes with more than 8 bits per channel are refused.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)

# 8-bit modes PIL converts to RGB without loss of meaning.
_TO_RGB = {"L", "LA", "La", "P", "PA", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "1"}


class ImageReadError(ValueError):
    """An image could not be read or decoded; the message names its origin."""


class ImageRef(NamedTuple):
    """An undecoded image.

    Attributes:
      data: encoded bytes, a file path, or a decoded uint8 array ``[H, W, C]``.
      origin: where it comes from (source, index, path): named in every error.
      bbox: optional float ``[4]`` normalised ``[ymin, xmin, ymax, xmax]`` region to keep.
    """

    data: Any
    origin: str
    bbox: Any = None


def bbox_region(bbox: Any, height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel region ``(top, left, bottom, right)`` (end exclusive) of a normalised box.

    Rows ``floor(ymin·H)`` to ``ceil(ymax·H)``, columns ``floor(xmin·W)`` to ``ceil(xmax·W)``,
    clipped to the image; an empty region (or ``bbox=None``) gives the whole image.
    """
    if bbox is None:
        return 0, 0, height, width
    ymin, xmin, ymax, xmax = (float(v) for v in np.asarray(bbox, np.float64).reshape(4))
    top = min(max(math.floor(ymin * height), 0), height)
    bottom = min(max(math.ceil(ymax * height), 0), height)
    left = min(max(math.floor(xmin * width), 0), width)
    right = min(max(math.ceil(xmax * width), 0), width)
    if bottom <= top or right <= left:
        return 0, 0, height, width
    return top, left, bottom, right


def open_image(ref: ImageRef) -> Image.Image:
    """The image of ``ref`` opened lazily (PIL reads the header; pixels on first use).

    Raises:
      ImageReadError: naming ``ref.origin`` when the data is not an image.
    """
    data = ref.data
    try:
        if isinstance(data, np.ndarray):
            if data.dtype != np.uint8 or data.ndim not in (2, 3):
                raise ValueError(f"expected a uint8 [H, W(, C)] array, got {data.dtype} "
                                 f"{data.shape}")
            return Image.fromarray(data[..., 0] if data.ndim == 3 and data.shape[-1] == 1
                                   else data)
        if isinstance(data, bytes | bytearray | memoryview):
            return Image.open(io.BytesIO(data))
        if isinstance(data, str | os.PathLike):
            return Image.open(data)
        raise TypeError(f"unsupported image data of type {type(data).__name__}")
    except Exception as err:
        raise ImageReadError(f"Cannot read the image of {ref.origin}: {err}") from err


def to_rgb(image: Image.Image, origin: str) -> Image.Image:
    """``image`` in RGB mode (see the module docstring's colour rules); decodes it.

    Raises:
      ImageReadError: naming ``origin`` for truncated data or a mode beyond 8 bits.
    """
    try:
        image.load()
        if image.mode == "RGB":
            return image
        if image.mode in _TO_RGB:
            return image.convert("RGB")
    except Exception as err:
        raise ImageReadError(f"Cannot decode the image of {origin}: {err}") from err
    raise ImageReadError(
        f"The image of {origin} has mode {image.mode!r} (more than 8 bits per channel); "
        "convert it to 8-bit RGB."
    )


def decode(ref: ImageRef) -> np.ndarray:
    """Decodes ``ref`` to uint8 ``[H, W, 3]`` RGB, cropped to its box when it has one.

    Holds one decoded image in memory.
    """
    image = to_rgb(open_image(ref), ref.origin)
    top, left, bottom, right = bbox_region(ref.bbox, image.height, image.width)
    array = np.asarray(image)
    if (top, left, bottom, right) != (0, 0, image.height, image.width):
        array = array[top:bottom, left:right]
    return np.ascontiguousarray(array)


def render(
    image: Image.Image,
    box: tuple[float, float, float, float],
    size: int,
    *,
    flip: bool = False,
    origin: str = "image",
    draft: bool = True,
) -> np.ndarray:
    """Decodes the region ``box`` of ``image`` resized to ``[size, size, 3]`` uint8 RGB.

    One bilinear (antialiased) resize from source pixels; JPEGs are decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that still leaves at least ``size`` pixels across the region when
    ``draft`` is True. Holds one decoded image.

    Args:
      image: an image from :func:`open_image` (not yet decoded).
      box: ``(left, top, right, bottom)`` in the image's pixel coordinates.
      size: output side.
      flip: mirror left-right.
      origin: named in errors.
      draft: allow reduced-scale JPEG decoding.
    """
    left, top, right, bottom = box
    width, height = image.size
    if draft and image.format == "JPEG" and image.mode in ("RGB", "L", "CMYK"):
        scale = size / max(min(right - left, bottom - top), 1e-9)
        try:
            image.draft(image.mode, (math.ceil(width * scale), math.ceil(height * scale)))
        except Exception as err:
            raise ImageReadError(f"Cannot decode the image of {origin}: {err}") from err
        sx, sy = image.size[0] / width, image.size[1] / height
        left, right, top, bottom = left * sx, right * sx, top * sy, bottom * sy
    image = to_rgb(image, origin)
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, right, bottom))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)
