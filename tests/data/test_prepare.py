"""TF-free builders: tiny archives in the real layouts, prepared, read back with tfds."""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import tarfile
import textwrap
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dml_jax.data import builders, prepare
from tests._subprocess import REPO_ROOT

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- tiny files and archives


def image_bytes(size, *, mode="RGB", fmt="JPEG"):
    """An encoded random image of ``size`` (width, height) in ``mode``."""
    w, h = size
    channels = {"RGB": 3, "L": 1, "CMYK": 4, "RGBA": 4}[mode]
    pixels = RNG.integers(0, 256, (h, w, channels), dtype=np.uint8)
    im = Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def decoded(data):
    """What an image file decodes to, as uint8 [H, W, 3] RGB."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def write_tar(path, files):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def write_zip(path, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)


def read_split(name, split, data_dir, key):
    """``{record[key]: record}`` of a prepared split, read with ``tfds.data_source``."""
    source = tfds.data_source(name, split=split, data_dir=os.fspath(data_dir))
    records = [source[i] for i in range(len(source))]
    out = {}
    for r in records:
        k = r[key]
        out[k.decode() if isinstance(k, bytes) else k] = r
    assert len(out) == len(records)
    return out


def raw_images(name, split, data_dir):
    """The stored image bytes of every record, in record order (no decoding)."""
    source = builders.open_prepared(name, data_dir).as_data_source(
        split, decoders={"image": tfds.decode.SkipDecoding()})
    return [source[i]["image"] for i in range(len(source))]


def official_features(name, tmp_path):
    """The features TFDS's own (registered) builder of ``name`` declares."""
    return tfds.builder(name, data_dir=os.fspath(tmp_path / "official")).info.features


# ---------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = {1: "001.Black_footed_Albatross", 2: "002.Laysan_Albatross",
               200: "200.Common_Yellowthroat"}
# (class id, file name, train flag, (width, height), mode, box x y w h)
CUB_IMAGES = [
    (1, "Black_Footed_Albatross_0046_18.jpg", 1, (20, 16), "RGB", (2.0, 3.0, 10.0, 8.0)),
    (1, "Black_Footed_Albatross_0009_34.jpg", 0, (18, 22), "L", (0.0, 0.0, 18.0, 22.0)),
    (2, "Laysan_Albatross_0002_1027.jpg", 1, (24, 12), "CMYK", (5.0, 1.0, 30.0, 4.0)),
    (2, "Laysan_Albatross_0003_1033.jpg", 0, (16, 16), "RGB", (1.5, 2.5, 3.0, 4.0)),
    (200, "Common_Yellowthroat_0055_190967.jpg", 1, (14, 20), "RGB", (4.0, 6.0, 5.0, 7.0)),
]


def make_cub(manual_dir, *, masks):
    images, files, seg = {}, {}, {}
    rows = {k: [] for k in ("images", "labels", "split", "boxes")}
    for i, (cls, fname, train, size, mode, box) in enumerate(CUB_IMAGES, 1):
        rel = f"{CUB_CLASSES[cls]}/{fname}"
        images[rel] = image_bytes(size, mode=mode)
        files[f"CUB_200_2011/images/{rel}"] = images[rel]
        rows["images"].append(f"{i} {rel}")
        rows["labels"].append(f"{i} {cls}")
        rows["split"].append(f"{i} {train}")
        rows["boxes"].append(f"{i} " + " ".join(str(v) for v in box))
        if masks:
            seg[f"segmentations/{CUB_CLASSES[cls]}/{fname[:-4]}.png"] = image_bytes(
                size, mode="L", fmt="PNG")
    for key, fname in (("images", "images.txt"), ("labels", "image_class_labels.txt"),
                       ("split", "train_test_split.txt"), ("boxes", "bounding_boxes.txt")):
        files[f"CUB_200_2011/{fname}"] = ("\n".join(rows[key]) + "\n").encode()
    files["CUB_200_2011/classes.txt"] = "".join(
        f"{k} {v}\n" for k, v in CUB_CLASSES.items()).encode()
    files["CUB_200_2011/images/._hidden.jpg"] = b"not an image"  # skipped like TFDS does
    files["attributes.txt"] = b"1 has_bill_shape::curved\n"
    write_tar(manual_dir / "CUB_200_2011.tgz", files)
    if masks:
        write_tar(manual_dir / "segmentations.tgz", seg)
    return images, seg


@pytest.mark.parametrize("masks", [True, False])
def test_cub(tmp_path, masks):
    manual, data = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    images, seg = make_cub(manual, masks=masks)
    builder = builders.prepare("cub", manual, data)
    assert builder.info.splits["train"].num_examples == 3
    assert builder.info.splits["test"].num_examples == 2
    assert builder.info.features.to_json() == official_features(
        "caltech_birds2011", tmp_path).to_json()
    expect_masks = "segmentations.tgz" if masks else "zeros"
    assert builders.open_prepared("cub", data).info.metadata["segmentation_masks"] == expect_masks
    for split, flag in (("train", 1), ("test", 0)):
        got = read_split("caltech_birds2011", split, data, "image/filename")
        want = [im for im in CUB_IMAGES if im[2] == flag]
        assert len(got) == len(want)
        for cls, fname, _, (w, h), _, (x, y, bw, bh) in want:
            rel = f"{CUB_CLASSES[cls]}/{fname}"
            r = got[f"CUB_200_2011/images/{rel}"]
            assert r["label"] == cls - 1
            assert r["label_name"] == CUB_CLASSES[cls].split(".", 1)[1].lower().encode()
            np.testing.assert_array_equal(r["image"], decoded(images[rel]))
            box = [y / h, x / w, (y + bh) / h, (x + bw) / w]
            np.testing.assert_allclose(r["bbox"], np.minimum(box, 1.0), rtol=1e-6)
            mask_key = f"segmentations/{CUB_CLASSES[cls]}/{fname[:-4]}.png"
            want_mask = (np.asarray(Image.open(io.BytesIO(seg[mask_key])))[..., None] if masks
                         else np.zeros((h, w, 1), np.uint8))
            np.testing.assert_array_equal(r["segmentation_mask"], want_mask)
    # RGB and grey JPEGs are stored byte for byte; the CMYK one as an RGB PNG.
    stored = raw_images("caltech_birds2011", "train", data) + raw_images(
        "caltech_birds2011", "test", data)
    originals = {mode: images[f"{CUB_CLASSES[c]}/{f}"] for c, f, _, _, mode, _ in CUB_IMAGES}
    assert originals["L"] in stored and originals["RGB"] in stored
    assert originals["CMYK"] not in stored
    assert sum(s.startswith(b"\x89PNG") for s in stored) == 1


def test_cub_missing_image_is_named(tmp_path):
    make_cub(tmp_path, masks=False)
    with tarfile.open(tmp_path / "CUB_200_2011.tgz") as tf:
        files = {m.name: tf.extractfile(m).read() for m in tf if m.isfile()}
    del files["CUB_200_2011/images/002.Laysan_Albatross/Laysan_Albatross_0003_1033.jpg"]
    write_tar(tmp_path / "CUB_200_2011.tgz", files)
    with pytest.raises(FileNotFoundError, match=r"Laysan_Albatross_0003_1033\.jpg"):
        builders.prepare("cub", tmp_path, tmp_path / "data")


# ---------------------------------------------------------------- Cars196


def cars_names():
    from tensorflow_datasets.image_classification import cars196

    return list(cars196._NAMES)


def annotations_mat(rows):
    from scipy import io as sio

    dtype = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    arr = np.array([tuple(r) for r in rows], dtype=dtype).reshape(1, -1)
    buffer = io.BytesIO()
    sio.savemat(buffer, {"annotations": arr})
    return buffer.getvalue()


# split -> [(file name, (width, height), (x1, y1, x2, y2), class 1..196)]
CARS = {
    "train": [("00001.jpg", (20, 12), (1, 2, 15, 10), 14), ("00002.jpg", (16, 18), (3, 1, 16, 18),
               196), ("00003.jpg", (12, 12), (0, 0, 6, 6), 1)],
    "test": [("00001.jpg", (10, 14), (2, 2, 9, 13), 14), ("00002.jpg", (22, 10), (5, 3, 20, 9),
              77)],
}


def make_cars(manual_dir):
    from scipy import io as sio

    images = {}
    for split, rows in CARS.items():
        files = {}
        for fname, size, _, _ in rows:
            images[split, fname[:-4]] = files[f"cars_{split}/{fname}"] = image_bytes(size)
        files[f"cars_{split}/extra_unannotated.jpg"] = image_bytes((8, 8))
        write_tar(manual_dir / f"cars_{split}.tgz", files)
    ann = {s: annotations_mat([(*box, cls, f) for f, _, box, cls in rows])
           for s, rows in CARS.items()}
    meta = io.BytesIO()
    sio.savemat(meta, {"class_names": np.array(cars_names(), dtype=object).reshape(1, -1)})
    write_tar(manual_dir / "car_devkit.tgz", {
        "devkit/cars_train_annos.mat": ann["train"], "devkit/cars_meta.mat": meta.getvalue(),
        "devkit/README.txt": b"devkit"})
    (manual_dir / "cars_test_annos_withlabels.mat").write_bytes(ann["test"])
    return images


def test_cars196(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    images = make_cars(manual)
    builder = builders.prepare("cars196", manual, data)
    assert builder.info.features.to_json() == official_features("cars196", tmp_path).to_json()
    assert builders.open_prepared("cars196", data).info.features["label"].names == cars_names()
    for split, rows in CARS.items():
        got = read_split("cars196", split, data, "id")
        assert sorted(got) == sorted(f[:-4] for f, _, _, _ in rows)
        for fname, (w, h), (x1, y1, x2, y2), cls in rows:
            r = got[fname[:-4]]
            assert r["label"] == cls - 1
            np.testing.assert_array_equal(r["image"], decoded(images[split, fname[:-4]]))
            np.testing.assert_allclose(r["bbox"], [y1 / h, x1 / w, y2 / h, x2 / w], rtol=1e-6)
        assert sorted(raw_images("cars196", split, data)) == sorted(
            images[split, f[:-4]] for f, _, _, _ in rows)


def test_cars196_missing_archive_is_named(tmp_path, capsys):
    make_cars(tmp_path)
    (tmp_path / "cars_test.tgz").unlink()
    status = prepare.main(["cars196", "--manual_dir", os.fspath(tmp_path),
                           "--data_dir", os.fspath(tmp_path / "data")])
    err = capsys.readouterr().err
    assert status == 2
    assert "'cars_test.tgz'" in err and "'cars_train.tgz'" not in err
    assert os.fspath(tmp_path) in err and "docs/data.md" in err and "stanford.edu" in err
    assert not (tmp_path / "data" / "cars196").exists()


# ---------------------------------------------------------------- Stanford Online Products

# split -> [(class_id, super_class_id, path)]
SOP = {
    "train": [(1, 1, "bicycle_final/111085122871_0.JPG"),
              (1, 1, "bicycle_final/111085122871_1.JPG"), (2, 12, "toaster_final/2217_0.JPG")],
    "test": [(22634, 5, "fan_final/361_0.JPG"), (3, 5, "fan_final/99_0.JPG"),
             (3, 5, "fan_final/99_1.JPG")],
}


def make_sop(manual_dir):
    files, images, image_id = {}, {}, 1
    for split, rows in SOP.items():
        lines = ["image_id class_id super_class_id path"]
        for cls, sup, path in rows:
            images[path] = files[f"Stanford_Online_Products/{path}"] = image_bytes(
                (12 + image_id, 10))
            lines.append(f"{image_id} {cls} {sup} {path}")
            image_id += 1
        files[f"Stanford_Online_Products/Ebay_{split}.txt"] = ("\n".join(lines) + "\n").encode()
    files["Stanford_Online_Products/Ebay_info.txt"] = b"image_id class_id super_class_id path\n"
    write_zip(manual_dir / "Stanford_Online_Products.zip", files)
    return images


def test_sop(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    images = make_sop(manual)
    builder = builders.prepare("sop", manual, data)
    assert builder.info.features.to_json() == official_features(
        "stanford_online_products", tmp_path).to_json()
    supers = builder.info.features["super_class_id"].names
    for split, rows in SOP.items():
        source = tfds.data_source("stanford_online_products", split=split,
                                  data_dir=os.fspath(data))
        got = [source[i] for i in range(len(source))]
        assert len(got) == len(rows)
        # Records are matched to rows by their (unique) image sizes.
        by_width = {r["image"].shape[1]: r for r in got}
        for cls, sup, path in rows:
            want = decoded(images[path])
            r = by_width[want.shape[1]]
            np.testing.assert_array_equal(r["image"], want)
            assert r["class_id"] == cls - 1
            assert r["super_class_id"] == r["super_class_id/num"] == sup - 1
            assert supers[sup - 1] == path.split("_final")[0]


# ---------------------------------------------------------------- UC Merced


def make_uc_merced(manual_dir):
    files, images = {}, {}
    for label, mode in (("airplane", "RGB"), ("tenniscourt", "RGBA"), ("beach", "RGB")):
        for k in range(2):
            name = f"{label}{k:02d}.tif"
            images[name] = image_bytes((9 + k, 7), mode=mode, fmt="TIFF")
            files[f"UCMerced_LandUse/Images/{label}/{name}"] = images[name]
    write_zip(manual_dir / "UCMerced_LandUse.zip", files)
    return images


def test_uc_merced(tmp_path):
    manual, data = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    images = make_uc_merced(manual)
    builder = builders.prepare("uc_merced", manual, data)
    assert builder.info.features.to_json() == official_features("uc_merced", tmp_path).to_json()
    assert list(builder.info.splits) == ["train"]
    names = builder.info.features["label"].names
    got = read_split("uc_merced", "train", data, "filename")
    assert sorted(got) == sorted(images)
    for name, data_bytes in images.items():
        assert names[got[name]["label"]] == name[:-6]
        np.testing.assert_array_equal(got[name]["image"], decoded(data_bytes))


def test_unknown_name_and_bad_uc_merced_folder(tmp_path):
    with pytest.raises(ValueError, match="'imagenet'"):
        builders.prepared_dir("imagenet")
    write_zip(tmp_path / "UCMerced_LandUse.zip",
              {"UCMerced_LandUse/Images/volcano/volcano00.tif": image_bytes((4, 4), fmt="TIFF")})
    with pytest.raises(ValueError, match="volcano"):
        builders.prepare("uc_merced", tmp_path, tmp_path / "data")


# ---------------------------------------------------------------- the command, without TensorFlow


def test_command_prepares_and_reads_without_tensorflow(tmp_path):
    manual, data = tmp_path / "manual", os.fspath(tmp_path / "data")
    manual.mkdir()
    make_uc_merced(manual)
    code = textwrap.dedent(f"""
        import sys
        from dml_jax.data import builders, prepare
        assert prepare.main(["uc_merced", "--manual_dir", {os.fspath(manual)!r},
                             "--data_dir", {data!r}]) == 0
        import tensorflow_datasets as tfds
        src = tfds.data_source("uc_merced", split="train", data_dir={data!r})
        assert src[0]["image"].shape[-1] == 3
        assert len(builders.open_prepared("uc_merced", {data!r}).as_data_source("train")) == 6
        print("tensorflow imported:", "tensorflow" in sys.modules)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "train: 6 examples" in proc.stdout
    assert "uc_merced/2.0.0" in proc.stdout
    assert "tensorflow imported: False" in proc.stdout


def test_a_prepared_cub_reads_through_tfds_source_and_the_registry(tmp_path):
    """What `python -m dml_jax.data.prepare cub` writes is what the training loop reads."""
    from dml_jax import data as dml_data

    manual, prepared = tmp_path / "manual", tmp_path / "data"
    manual.mkdir()
    make_cub(manual, masks=False)
    builders.prepare("cub", manual, prepared)
    # The protocol's train split is classes 0-99 (here: every class of the tiny archive that
    # is < 100, from TFDS's train then test split).
    source = dml_data.get_source({"name": "caltech_birds2011", "data_dir": str(prepared)},
                                 "train")
    want = [im for im in CUB_IMAGES if im[0] - 1 < 100]
    assert len(source) == len(want)
    assert list(source.classes) == sorted({cls - 1 for cls, *_ in want})
    record = source[0]
    assert record["image"].dtype == np.uint8 and record["image"].shape[-1] == 3
    cropped = dml_data.tfds_source("caltech_birds2011", "train", data_dir=str(prepared),
                                   crop="bbox")
    expected = []
    for _, _, _, (w, h), _, (x, y, bw, bh) in want:
        # TFDS stores the normalised box as float32; the crop rule applies to those values.
        ymin, xmin = float(np.float32(y / h)), float(np.float32(x / w))
        ymax = float(np.float32(min((y + bh) / h, 1.0)))
        xmax = float(np.float32(min((x + bw) / w, 1.0)))
        rows = math.ceil(ymax * h) - math.floor(ymin * h)
        cols = math.ceil(xmax * w) - math.floor(xmin * w)
        expected.append((rows, cols))
    got = sorted(cropped[i]["image"].shape[:2] for i in range(len(cropped)))
    assert got == sorted(expected)
    assert got != sorted(source[i]["image"].shape[:2] for i in range(len(source)))
