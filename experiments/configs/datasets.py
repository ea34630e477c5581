"""The seed papers' data sets: one function per data set, returning its ``config.dataset`` and
the protocol's defaults (``{"dataset", "evals", "eval_ks"}``).

A paper's config takes ``dataset``, ``evals`` and ``eval_ks`` from here and sets the rest.
Where the data come from and how to prepare them: ``docs/data.md``. The folder data sets are
not in TFDS: the user puts the images in the layout each docstring gives and points
``--config.dataset.root`` at it (the defaults are paths under ``data/`` relative to the
working directory).

Pipeline entries (``image_size``, ``resize_ratio``, ``worker_count``, ``skip_corrupt``) are
documented in ``base.py``; the other entries of ``dataset`` go to the source factory
(``dml_jax.data.get_source``).
"""

import ml_collections
from ml_collections import config_dict

# Recall@K ranks the papers report.
KS_CUB_CARS = (1, 2, 4, 8, 16, 32)  # OSM+CAA reports up to 32; the others stop at 8
KS_SOP = (1, 10, 100, 1000)
KS_MARS = (1, 5, 20)  # CMC ranks of the MARS tables


def _pipeline(image_size: int, resize_ratio: float) -> dict:
    return {"image_size": image_size, "resize_ratio": resize_ratio, "worker_count": 4,
            "skip_corrupt": False}


def _tfds(name: str, image_size: int, resize_ratio: float, **options) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "name": name,
        # TFDS data directory (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
        "data_dir": config_dict.placeholder(str),
        **options,
        **_pipeline(image_size, resize_ratio),
    })


def _protocol(dataset, evals, eval_ks) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"dataset": dataset, "evals": evals, "eval_ks": eval_ks})


def cub(*, crop: bool = False, image_size: int = 224,
        resize_ratio: float = 256 / 224) -> ml_collections.ConfigDict:
    """CUB-200-2011 (TFDS ``caltech_birds2011``): train on classes 1-100, test on 101-200
    (5,864 / 5,924 images), Recall@K on the test classes. ``crop=True``: every image cropped
    to its bounding box (OSM+CAA's "cropped" setting), train and test."""
    crop_value = "bbox" if crop else config_dict.placeholder(str)
    return _protocol(_tfds("caltech_birds2011", image_size, resize_ratio, crop=crop_value),
                     ("retrieval",), KS_CUB_CARS)


def cars(*, crop: bool = False, image_size: int = 224,
         resize_ratio: float = 256 / 224) -> ml_collections.ConfigDict:
    """Cars196 (TFDS ``cars196``): train on classes 1-98, test on 99-196 (8,054 / 8,131
    images). ``crop=True``: images cropped to their bounding boxes."""
    crop_value = "bbox" if crop else config_dict.placeholder(str)
    return _protocol(_tfds("cars196", image_size, resize_ratio, crop=crop_value),
                     ("retrieval",), KS_CUB_CARS)


def sop(*, image_size: int = 224, resize_ratio: float = 256 / 224) -> ml_collections.ConfigDict:
    """Stanford Online Products (TFDS ``stanford_online_products``): TFDS's class-disjoint
    train (11,318 classes, 59,551 images) and test (11,316 classes, 60,502 images)."""
    return _protocol(_tfds("stanford_online_products", image_size, resize_ratio),
                     ("retrieval",), KS_SOP)


def uc_merced(*, image_size: int = 224,
              resize_ratio: float = 256 / 224) -> ml_collections.ConfigDict:
    """UC Merced Land Use (TFDS ``uc_merced``, 21 classes x 100 images of 256 x 256): per class
    a stratified 80 % (seed 0) for training, the other 20 % for testing; overall accuracy."""
    return _protocol(_tfds("uc_merced", image_size, resize_ratio), ("classification",), (1,))


def _folder(root: str, image_size: int, resize_ratio: float,
            split_dirs: dict | None = None) -> ml_collections.ConfigDict:
    options = {"name": "image_folder", "root": root}
    if split_dirs is not None:
        options["split_dirs"] = split_dirs
    return ml_collections.ConfigDict({**options, **_pipeline(image_size, resize_ratio)})


def coffee(*, root: str = "data/brazilian_coffee_scenes", image_size: int = 224,
           resize_ratio: float = 1.0) -> ml_collections.ConfigDict:
    """Brazilian Coffee Scenes (2,876 tiles of 64 x 64, classes coffee / noncoffee), an image
    folder. Layout the user makes: ``root/train/<class>/*.jpg`` and ``root/test/<class>/*``;
    the data set ships 5 folds: put folds 1-4 in ``train`` and fold 5 in ``test`` (rotate for
    the paper's 5-fold cross-validation). The tiles' bands are (G, R, NIR) and are read as the
    three channels as stored; they are upsampled to ``image_size``."""
    return _protocol(_folder(root, image_size, resize_ratio), ("classification",), (1,))


def siri_whu(*, root: str = "data/siri_whu", image_size: int = 224,
             resize_ratio: float = 1.0) -> ml_collections.ConfigDict:
    """SIRI-WHU ("Google data set": 12 classes x 200 images of 200 x 200), an image folder.
    Layout: ``root/train/<class>/*.tif`` and ``root/test/<class>/*.tif``; the paper's split is
    UNVERIFIED: use 80 % / 20 % per class (as UC Merced)."""
    return _protocol(_folder(root, image_size, resize_ratio), ("classification",), (1,))


def isic2016(*, root: str = "data/isic2016", image_size: int = 224,
             resize_ratio: float = 256 / 224) -> ml_collections.ConfigDict:
    """ISIC 2016 Part 3 (melanoma vs benign; 900 train / 379 test), an image folder.
    Layout: ``root/train/{benign,malignant}/*.jpg`` and ``root/test/{benign,malignant}/*.jpg``
    (from the challenge's ground-truth CSV); ``malignant`` sorts second, so it is label 1, the
    positive class of sensitivity, specificity, AUC and AP."""
    return _protocol(_folder(root, image_size, resize_ratio), ("classification",), (1,))


def isic2017(*, root: str = "data/isic2017", image_size: int = 224,
             resize_ratio: float = 256 / 224) -> ml_collections.ConfigDict:
    """ISIC 2017 Part 3 (melanoma / nevus / seborrheic keratosis; 2,000 train / 150 validation /
    600 test), an image folder. Layout: ``root/train/<class>/*.jpg``,
    ``root/test/<class>/*.jpg`` with the classes ``melanoma``, ``nevus``,
    ``seborrheic_keratosis`` (the validation images may go into ``train``). Three classes:
    the classification evaluation reports accuracy only (sensitivity etc. are binary)."""
    return _protocol(_folder(root, image_size, resize_ratio), ("classification",), (1,))


def ph2(*, root: str = "data/dermoscopy", image_size: int = 224,
        resize_ratio: float = 256 / 224) -> ml_collections.ConfigDict:
    """PH2 as a generalisation test: train on ISIC 2016, test on all 200 PH2 images.

    Layout: ``root/isic2016/train/{benign,malignant}/*.jpg`` (ISIC 2016's training set) and
    ``root/ph2/{benign,malignant}/*.bmp`` with PH2's 80 common and 80 atypical nevi in
    ``benign`` and its 40 melanomas in ``malignant`` (same class names, so the labels agree).
    """
    return _protocol(
        _folder(root, image_size, resize_ratio,
                split_dirs={"train": "isic2016/train", "test": "ph2"}),
        ("classification",), (1,))


def mars(*, root: str = "data/mars", num_frames: int = 8, image_size: int = 224,
         resize_ratio: float = 1.0) -> ml_collections.ConfigDict:
    """MARS (video re-ID, ``dml_jax.data.reid.mars``): ``root/bbox_train``, ``root/bbox_test``
    and ``root/info`` exactly as distributed (docs/data.md). Train on the 625 training
    identities' tracklets (``num_frames`` frames drawn per tracklet, restricted random
    sampling); evaluate on the 1,980 query tracklets against the gallery (evenly spaced
    frames), CMC rank-1/5/20 and mAP (MARS junk rule).

    Not yet trainable end to end: the training loop's source registry has no ``mars`` entry
    and its pipeline takes single images, not ``[T, H, W, 3]`` tracklets (see the README's
    OSM + CAA section).
    """
    dataset = ml_collections.ConfigDict({
        "name": "mars", "root": root, "num_frames": num_frames,
        **_pipeline(image_size, resize_ratio)})
    return _protocol(dataset, ("reid",), KS_MARS)
