"""Image folders: class layout, colour modes, extensions, unreadable files."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from PIL import Image

from dml_jax.data import ImageReadError, get_source, image_folder


def _rgb(seed: int, h: int = 6, w: int = 5) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture()
def folder(tmp_path):
    """root/{b_cls, a_cls, empty, notes}: PNG, grey, palette, RGBA, TIFF, JPEG, a text file."""
    root = tmp_path / "root"
    a, b = root / "a_cls", root / "b_cls"
    for d in (a, b, root / "empty"):
        d.mkdir(parents=True)
    arrays = {}
    arrays["a_cls/2.png"] = _rgb(0)
    Image.fromarray(arrays["a_cls/2.png"]).save(a / "2.png")
    grey = _rgb(1)[..., 0]
    Image.fromarray(grey, mode="L").save(a / "1.PNG")  # upper-case extension
    arrays["a_cls/1.PNG"] = np.repeat(grey[..., None], 3, axis=-1)
    rgba = np.concatenate([_rgb(2), np.full((6, 5, 1), 7, np.uint8)], axis=-1)
    Image.fromarray(rgba, mode="RGBA").save(b / "x.png")
    arrays["b_cls/x.png"] = rgba[..., :3]
    palette = Image.fromarray(_rgb(3)).quantize(colors=8)
    palette.save(b / "y.gif")
    arrays["b_cls/y.gif"] = np.asarray(palette.convert("RGB"))
    tiff = _rgb(4)
    Image.fromarray(tiff).save(b / "z.tif")
    arrays["b_cls/z.tif"] = tiff
    Image.fromarray(_rgb(5, 16, 16)).save(b / "w.jpg", quality=95)
    (b / "notes.txt").write_text("not an image")
    (b / "nested").mkdir()
    Image.fromarray(_rgb(6)).save(b / "nested" / "ignored.png")
    return root, arrays


def test_layout_order_and_classes(folder):
    root, _ = folder
    source = image_folder(root)
    assert source.classes == ["a_cls", "b_cls"]  # sorted; the empty folder is no class
    names = [os.path.relpath(p, root) for p in source.paths]
    assert names == ["a_cls/1.PNG", "a_cls/2.png", "b_cls/w.jpg", "b_cls/x.png",
                     "b_cls/y.gif", "b_cls/z.tif"]
    np.testing.assert_array_equal(source.labels, [0, 0, 1, 1, 1, 1])
    assert source.labels.dtype == np.int32


def test_modes_come_back_rgb_and_tiff_as_stored(folder):
    root, arrays = folder
    source = image_folder(root)
    for i, path in enumerate(source.paths):
        record = source[i]
        image = record["image"]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
        assert record["label"] == int(source.labels[i])
        key = os.path.relpath(path, root)
        if key in arrays:
            np.testing.assert_array_equal(image, arrays[key], err_msg=key)
    jpeg = source[source.paths.index(str(root / "b_cls" / "w.jpg"))]["image"]
    assert jpeg.shape == (16, 16, 3)


def test_split_subfolder_and_registry(folder, tmp_path):
    root, _ = folder
    split_root = tmp_path / "splits"
    split_root.mkdir()
    (split_root / "train").symlink_to(root, target_is_directory=True)
    assert image_folder(split_root, split="train").classes == ["a_cls", "b_cls"]
    source = get_source({"name": "image_folder", "root": str(split_root)}, "train")
    assert len(source) == 6
    renamed = get_source({"name": "image_folder", "root": str(root),
                          "split_dirs": {"test": None}}, "test")
    assert len(renamed) == 6


def test_unreadable_image_names_its_path(folder):
    root, _ = folder
    bad = root / "a_cls" / "3.jpg"
    good = root / "b_cls" / "w.jpg"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])  # truncated JPEG
    (root / "a_cls" / "4.png").write_bytes(b"garbage")
    source = image_folder(root)
    for path in (bad, root / "a_cls" / "4.png"):
        with pytest.raises(ImageReadError, match=re.escape(str(path))):
            source[source.paths.index(str(path))]


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        image_folder(tmp_path / "missing")
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no class sub-folder"):
        image_folder(tmp_path)
