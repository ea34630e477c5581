"""Image folders as sources: ``root/<class>/<image>`` (or ``root/<split>/<class>/<image>``).

Classes are the sorted names of the sub-folders; a class's images are its files with an image
extension (case-insensitive, :data:`~dml_jax.data.images.IMAGE_EXTENSIONS`), in sorted order,
records ordered class by class; other files and nested folders are ignored. The listing is
read once; images are decoded on access (grey, palette and RGBA come back as RGB; 3-band images
such as RGB TIFFs as stored). An unreadable image raises an error that contains its path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dml_jax.data import images
from dml_jax.data.source import check_index, register


class ImageFolder:
    """The images under ``root`` (see the module docstring); holds the paths and labels.

    Args:
      root: the folder whose sub-folders are the classes.
      extensions: accepted file suffixes (lower case, with the dot).

    Raises:
      FileNotFoundError: ``root`` is not a directory.
      ValueError: ``root`` has no class folder holding an image.
    """

    def __init__(self, root: str | os.PathLike, *,
                 extensions: tuple[str, ...] = images.IMAGE_EXTENSIONS):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image_folder: {str(root)!r} is not a directory.")
        paths: list[str] = []
        ids: list[int] = []
        classes: list[str] = []
        for entry in sorted(p for p in root.iterdir() if p.is_dir()):
            files = sorted(f.name for f in entry.iterdir()
                           if f.is_file() and f.suffix.lower() in extensions)
            if not files:
                continue
            ids.extend([len(classes)] * len(files))
            classes.append(entry.name)
            paths.extend(str(entry / f) for f in files)
        if not paths:
            raise ValueError(
                f"image_folder: no class sub-folder of {str(root)!r} holds an image with an "
                f"extension in {extensions}."
            )
        self.root = str(root)
        self.paths = paths
        self.labels = np.asarray(ids, np.int32)
        self.classes = classes

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> dict[str, Any]:
        """Record ``index`` with its image as an undecoded :class:`~images.ImageRef`."""
        i = check_index(index, len(self), repr(self))
        path = self.paths[i]
        return {"image": images.ImageRef(path, f"{self!r} record {i} ({path})"),
                "label": int(self.labels[i])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.read(index)
        return {**record, "image": images.decode(record["image"])}

    def __repr__(self) -> str:
        return f"image_folder({self.root!r})"


def image_folder(root: str | os.PathLike, *, split: str | None = None) -> ImageFolder:
    """The source of the images under ``root`` (under ``root/<split>`` when ``split`` is given).

    ``classes`` holds the folder names; see :class:`ImageFolder`.
    """
    return ImageFolder(Path(root) / split if split is not None else Path(root))


@register("image_folder")
def _image_folder_factory(split: str | None, *, root: str, split_dirs: dict | None = None,
                          **kwargs: Any) -> ImageFolder:
    """Registry entry: ``config.dataset = {"name": "image_folder", "root": ...}``.

    ``split_dirs`` maps the split to a sub-folder (e.g. ``{"train": "train", "test": "val"}``,
    a value of None reads ``root`` itself); by default the split's own name is the sub-folder.
    """
    if kwargs:
        raise ValueError(f"image_folder: unexpected options {sorted(kwargs)}.")
    sub = split if split_dirs is None else dict(split_dirs).get(split, split)
    return image_folder(root, split=sub)
