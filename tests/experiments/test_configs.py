"""Every seed-paper config row: its protocol values, validated on its own source, and a short
end-to-end run (2 steps, an evaluation, a resume) of every distinct (loss, evaluations, kind of
data) combination, shrunk by overrides only (small CNN, 32 px, mock TFDS data, generated
folders)."""

from __future__ import annotations

import importlib
import math

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dml_jax import data, train
from dml_jax.data import reid

FILES = ("osm_caa", "ranked_list", "symmetric", "gong", "demal")
NUM_MOCK = 160  # mock TFDS records per split in the short runs
NUM_MOCK_VALIDATE = 400  # enough classes for P = 64 (CUB and Cars keep half the classes)


def load(file: str):
    return importlib.import_module(f"experiments.configs.{file}")


def all_rows() -> list[tuple[str, str]]:
    return [(f, r) for f in FILES for r in load(f).ROWS]


# What each paper's protocol says (docs: README sections; experiments/configs/<file>.py).
def expected(file: str, row: str) -> dict:
    if file == "osm_caa":
        data_name = "mars" if row == "mars" else {"cub": "caltech_birds2011",
                                                   "cars": "cars196"}[row.split("_")[0]]
        return {"backbone": "bninception", "p": 8, "k": 7, "loss": "osm_caa",
                "evals": ("reid",) if row == "mars" else ("retrieval",),
                "ks": (1, 5, 20) if row == "mars" else (1, 2, 4, 8, 16, 32),
                "convention": "bninception", "optimizer": "sgd", "lr_mult": {"head": 10.0},
                "dim": 1024, "data": data_name, "image_size": 224,
                "crop": "bbox" if row.endswith("crop") else None,
                "lr": 5e-4 if row.startswith("cub") else 1e-3}
    if file == "ranked_list":
        return {"backbone": "bninception", "p": 20, "k": 3, "loss": "ranked_list",
                "evals": ("retrieval",), "ks": (1, 10, 100) if row == "sop" else (1, 2, 4, 8),
                "convention": "bninception", "optimizer": "sgd", "lr_mult": {"head": 100.0},
                "dim": 512, "image_size": 227, "lr": 1e-3,
                "data": {"cub": "caltech_birds2011", "cars": "cars196",
                         "sop": "stanford_online_products"}[row],
                "multi_level": ("inception_3c", "inception_4e", "inception_5b")}
    if file == "symmetric":
        data_row, loss_row = row.split("_", 1)
        return {"backbone": "googlenet", "p": 64, "k": 2,
                "loss": {"triplet": "symmetric_triplet", "semi_hard": "symmetric_triplet",
                         "lifted": "symmetric_lifted_structure", "npair": "symmetric_npair",
                         "angular": "symmetric_angular"}[loss_row],
                "evals": ("retrieval", "clustering"),
                "ks": (1, 10, 100) if data_row == "sop" else (1, 2, 4, 8),
                "convention": "imagenet", "optimizer": "adam", "lr_mult": {"head": 10.0},
                "dim": 512, "image_size": 227, "lr": 1e-4,
                "data": {"cub": "caltech_birds2011", "cars": "cars196",
                         "sop": "stanford_online_products"}[data_row],
                "mining": {"triplet": "all", "semi_hard": "semi_hard"}.get(loss_row)}
    if file == "gong":
        return {"backbone": "resnet50", "loss": "center_structured", "evals": ("classification",),
                "p": {"uc_merced": 16, "coffee": 2, "siri_whu": 12}[row],
                "k": {"uc_merced": 4, "coffee": 32, "siri_whu": 5}[row],
                "convention": "imagenet", "optimizer": "sgd", "dim": 512, "image_size": 224,
                "lr_mult": {"head": 10.0, "loss": 10.0}, "lr": 1e-3,
                "data": "uc_merced" if row == "uc_merced" else "image_folder"}
    assert file == "demal"
    return {"backbone": "resnet50", "loss": "demal_hybrid", "evals": ("classification",),
            "p": 3 if row == "isic2017" else 2, "k": 10 if row == "isic2017" else 16,
            "convention": "imagenet", "optimizer": "sgd", "lr_mult": {"head": 10.0},
            "dim": 128, "image_size": 224, "lr": 1e-3, "data": "image_folder",
            "attention_after": ("layer1", "layer2", "layer3", "layer4")}


REQUIRED_KEYS = ("dataset.name", "loss.name", "loss.kwargs", "model.name", "classes_per_batch",
                 "samples_per_class", "num_steps", "eval_every", "log_every",
                 "checkpoint_every")


# ------------------------------------------------------------------------------ generated data


def _image(path, colour, rng, size=12):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.clip(np.asarray(colour) + rng.integers(-20, 21, (size, size, 3)), 0, 255)
    Image.fromarray(pixels.astype(np.uint8)).save(path)


# Class folders of each folder row, under the row's split sub-folders.
FOLDER_CLASSES = {
    "coffee": ("coffee", "noncoffee"),
    "siri_whu": tuple(f"class{i:02d}" for i in range(12)),
    "isic2016": ("benign", "malignant"),
    "isic2017": ("melanoma", "nevus", "seborrheic_keratosis"),
    "ph2": ("benign", "malignant"),
}


def make_folders(root, row: str, per_class: int = 3) -> str:
    rng = np.random.default_rng(0)
    subdirs = ("isic2016/train", "ph2") if row == "ph2" else ("train", "test")
    classes = FOLDER_CLASSES[row]
    for sub in subdirs:
        for c, name in enumerate(classes):
            colour = (40 + 200 * (c % 2), 40 + 60 * (c % 4), 40 + 17 * c)
            for i in range(per_class):
                _image(root / sub / name / f"{i}.png", colour, rng)
    return str(root)


def make_mars(root, num_train_ids: int = 8, frames: int = 3):
    """A MARS-style root: ``bbox_train``, ``bbox_test`` and ``info`` (as tests/data/test_reid)."""
    from scipy import io as sio

    rng = np.random.default_rng(0)

    def frame(folder, pid, cam, track, f):
        pid_str = f"{pid:04d}"
        name = f"{pid_str}C{cam}T{track:04d}F{f:03d}.jpg"
        _image(root / folder / pid_str / name, (20 * pid % 256, 90, 200 - 15 * pid), rng, 16)
        return name

    for pid in range(1, num_train_ids + 1):
        for cam in (1, 2):
            for f in range(1, frames + 1):
                frame("bbox_train", pid, cam, cam, f)
    names, info = [], []
    # (pid, cam): 24 test tracklets, the first two are the queries (>= 20 in the gallery).
    tracks = [(pid, cam) for cam in (1, 2, 3) for pid in range(20, 28)]
    for t, (pid, cam) in enumerate(tracks, 1):
        first = len(names) + 1
        names += [frame("bbox_test", pid, cam, t, f) for f in range(1, frames + 1)]
        info.append([first, len(names), pid, cam])
    (root / "info").mkdir()
    (root / "info" / "test_name.txt").write_text("\n".join(names) + "\n")
    sio.savemat(root / "info" / "tracks_test_info.mat",
                {"track_test_info": np.array(info, np.float64)})
    sio.savemat(root / "info" / "query_IDX.mat", {"query_IDX": np.array([[1, 2]], np.float64)})
    return str(root)


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    """Generated folders of every folder row, and a MARS root."""
    base = tmp_path_factory.mktemp("config_data")
    roots = {row: make_folders(base / row, row) for row in FOLDER_CLASSES}
    roots["mars"] = make_mars(base / "mars")
    return roots


def point_at_data(config, row: str, roots) -> None:
    """Overrides the data location only: generated folders / MARS root (TFDS rows read the
    mock, which replaces the TFDS reader)."""
    if config.dataset.name in ("image_folder", "mars"):
        config.dataset.root = roots["mars" if config.dataset.name == "mars" else row]


# ------------------------------------------------------------------------------ every row


@pytest.mark.parametrize(("file", "row"), all_rows(), ids=[f"{f}:{r}" for f, r in all_rows()])
def test_row_protocol_and_validation(file, row, data_roots):
    config = load(file).get_config(row)
    want = expected(file, row)
    for key in REQUIRED_KEYS:
        node = config
        for part in key.split("."):
            assert part in node, f"{file}:{row} lacks {key}"
            node = node[part]
    assert config.model.name == want["backbone"]
    assert (config.classes_per_batch, config.samples_per_class) == (want["p"], want["k"])
    assert config.loss.name == want["loss"]
    assert tuple(config.evals) == want["evals"]
    if "ks" in want:
        assert tuple(config.eval_ks) == want["ks"]
    assert config.model.input_convention == want["convention"]
    assert config.model.pretrained == ""
    assert config.model.embedding_dim == want["dim"]
    assert config.optimizer.name == want["optimizer"]
    assert math.isclose(config.optimizer.learning_rate, want["lr"])
    assert dict(config.optimizer.lr_mult) == want["lr_mult"]
    assert config.dataset.name == want["data"]
    assert config.dataset.image_size == want["image_size"]
    if "crop" in want:
        assert config.dataset.get("crop") == want["crop"]
    for key in ("multi_level", "attention_after"):
        if key in want:
            assert tuple(config.model[key]) == want[key]
    if want.get("mining"):
        assert config.loss.kwargs["mining"] == want["mining"]
    assert config.best_metric

    # Validated on its own source (TFDS: mock records; folders / MARS: generated).
    point_at_data(config, row, data_roots)
    if config.dataset.name == "mars":
        source = reid.mars(config.dataset.root, "train", num_frames=config.dataset.num_frames)
    else:
        with tfds.testing.mock_data(num_examples=NUM_MOCK_VALIDATE):
            source = data.get_source(train.source_options(config), "train")
    train.validate_config(config, source, jax.device_count())
    with pytest.raises(ValueError, match="unknown row"):
        load(file).get_config("no_such_row")


# ------------------------------------------------------------------------------ short runs


def shrink(config, *, samples_per_class: int | None = None):
    """Overrides only: tiny model and images, 2 steps, one evaluation, no workers."""
    config.model.name = "small_cnn"
    config.model.in_channels = 3
    config.model.backbone_kwargs = {"widths": (8, 16)}
    config.model.embedding_dim = 16
    if config.model.get("multi_level"):
        config.model.multi_level = ("conv1", "conv2")  # small_cnn's stages: still multi-level
    if config.model.get("attention_after"):
        config.model.attention_after = ()  # ResNet-only block: covered by the full-size test
    config.dataset.image_size = 32
    config.dataset.worker_count = 0
    config.classes_per_batch = min(config.classes_per_batch, 4)
    config.samples_per_class = samples_per_class or min(config.samples_per_class, 3)
    config.num_steps = 2
    config.eval_every = 2
    config.log_every = 1
    config.checkpoint_every = 2
    config.eval_batch_size = 32
    config.progress_bar = False
    config.plots = False
    return config


# (file, row, metrics the row reports): one run per distinct (loss, evals, kind of data).
RUNS = [
    ("osm_caa", "cub_crop", ("recall@1", "recall@32")),
    ("ranked_list", "sop", ("recall@1", "recall@10", "recall@100")),
    ("symmetric", "cub_triplet", ("recall@1", "recall@8", "nmi", "f1")),
    ("symmetric", "cars_semi_hard", ("recall@1", "nmi", "f1")),
    ("symmetric", "sop_lifted", ("recall@1", "recall@100", "nmi", "f1")),
    ("symmetric", "cub_npair", ("recall@1", "nmi", "f1")),
    ("symmetric", "cars_angular", ("recall@1", "nmi", "f1")),
    ("gong", "uc_merced", ("accuracy",)),
    ("gong", "coffee", ("accuracy", "sensitivity", "specificity", "auc")),
    ("demal", "ph2", ("accuracy", "sensitivity", "specificity", "auc")),
    ("demal", "isic2017", ("accuracy",)),
]


@pytest.mark.parametrize(("file", "row", "metrics"), RUNS,
                         ids=[f"{f}:{r}" for f, r, _ in RUNS])
def test_row_trains_evaluates_and_resumes(file, row, metrics, data_roots, tmp_path):
    config = shrink(load(file).get_config(row))
    point_at_data(config, row, data_roots)
    if config.dataset.name == "stanford_online_products":
        # Mock SOP draws class ids from 22,634: no query would have a positive. Its 12
        # super-classes give a retrieval with positives (an override of the source option).
        config.dataset.label_key = "super_class_id"
    workdir = str(tmp_path / "run")
    with tfds.testing.mock_data(num_examples=NUM_MOCK):
        first = train.train_and_evaluate(config, workdir)
        config.num_steps = 3  # a resumable key: the same run, one step further
        again = train.train_and_evaluate(config, workdir)
    assert first["step"] == 2 and again["step"] == 3
    rows = train.read_metrics(workdir)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3]  # resumed at 2, did not start over
    losses = [r["loss"] for r in rows if "loss" in r]
    assert all(v is not None and math.isfinite(v) for v in losses), losses
    for result in (first, again):
        for key in metrics:
            assert key in result["final"], (key, sorted(result["final"]))
        assert math.isfinite(result["final"][metrics[0]])
    assert [r["step"] for r in rows if metrics[0] in r] == [2, 3]


# ------------------------------------------------------------------------------ MARS


def test_mars_row_end_to_end(data_roots, tmp_path):
    """The MARS row through train_and_evaluate: P x K batches of tracklet clips
    ``[B, T, S, S, 3]``, embeddings averaged over the frames, the re-ID evaluation (CMC + mAP)
    of query against gallery tracklets, and a resume."""
    config = shrink(load("osm_caa").get_config("mars"), samples_per_class=2)
    point_at_data(config, "mars", data_roots)
    workdir = str(tmp_path / "run")
    first = train.train_and_evaluate(config, workdir)
    config.num_steps = 3
    again = train.train_and_evaluate(config, workdir)
    assert first["step"] == 2 and again["step"] == 3
    rows = train.read_metrics(workdir)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    for result in (first, again):
        for key in ("cmc@1", "cmc@5", "cmc@20", "map"):
            assert math.isfinite(result["final"][key]), (key, result["final"])
    assert [r["step"] for r in rows if "cmc@1" in r] == [2, 3]
    test = again["embeddings"]
    assert test.embeddings.shape[1] == config.model.embedding_dim
    np.testing.assert_allclose(np.linalg.norm(test.embeddings, axis=1), 1.0, rtol=1e-5)
