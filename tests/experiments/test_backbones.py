"""Each seed-paper row's real network: parameter counts (cheap, abstract shapes only) and, under
the ``full_size`` marker (``make test-slow``), one training step at the paper's input size and
batch.

The backbones themselves are tied to their torch references in ``tests/models`` (ResNet-50
23,508,032 and GoogLeNet 5,599,904 parameters without the classifier, the published
torchvision figures; BN-Inception against Cadene's module); here each row adds exactly its
head, classifier and attention blocks on top.
"""

from __future__ import annotations

import importlib
import math

import jax
import numpy as np
import pytest
from flax import nnx

from dml_jax import train
from dml_jax.models import build_model
from dml_jax.models.bninception import BNInception

# One row per distinct network: (file, row, number of training classes of its data set).
ROWS = [
    ("osm_caa", "cub_raw", 100),
    ("ranked_list", "cub", 100),
    ("symmetric", "cub_npair", 100),
    ("gong", "uc_merced", 21),
    ("demal", "isic2016", 2),
]
PUBLISHED = {"resnet50": 23_508_032, "googlenet": 6_624_904 - (1024 * 1000 + 1000)}
RESNET50_STAGES = {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}


def row_config(file: str, row: str):
    return importlib.import_module(f"experiments.configs.{file}").get_config(row)


def count(module) -> int:
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))


def linear(n_in: int, n_out: int, bias: bool = True) -> int:
    return n_in * n_out + (n_out if bias else 0)


def expected_extra(config, num_classes: int) -> int:
    """Parameters a row adds to its backbone: embedding head(s), classifier, attention."""
    m = config.model
    if m.get("multi_level"):
        channels = dict(BNInception.stage_channels)
        extra = sum(linear(channels[s], m.embedding_dim) for s in m.multi_level)
        dim = m.embedding_dim * len(m.multi_level)
    else:
        extra = linear(1024 if m.name != "resnet50" else 2048, m.embedding_dim)
        dim = m.embedding_dim
    if "num_classes" in train._model_config(config, num_classes):
        extra += linear(dim, num_classes)
    for stage in m.get("attention_after", ()):
        c = RESNET50_STAGES[stage]
        extra += linear(c, c // 16) + linear(c // 16, c) + linear(2 * 7 * 7, 1)
    return extra


@pytest.mark.parametrize(("file", "row", "num_classes"), ROWS,
                         ids=[f"{f}:{r}" for f, r, _ in ROWS])
def test_row_network_parameter_count(file, row, num_classes):
    config = row_config(file, row)
    model_cfg = train._model_config(config, num_classes)
    model = nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    backbone = count(model.backbone)
    if config.model.get("attention_after"):  # the blocks sit inside the backbone
        backbone -= sum(count(getattr(model.backbone, f"attn_{s}"))
                        for s in config.model.attention_after)
    if config.model.name in PUBLISHED:
        assert backbone == PUBLISHED[config.model.name]
    assert count(model) - backbone == expected_extra(config, num_classes)


@pytest.mark.full_size
@pytest.mark.parametrize(("file", "row", "num_classes"), ROWS,
                         ids=[f"{f}:{r}" for f, r, _ in ROWS])
def test_one_training_step_at_full_size(file, row, num_classes):
    """The row's real backbone, input size and P x K batch: one finite training step."""
    config = row_config(file, row)
    size = config.dataset.image_size
    batch = config.classes_per_batch * config.samples_per_class
    tx = train.make_optimizer(config, config.num_steps)
    graphdefs, state = train.create_state(config, num_classes, tx)
    step = jax.jit(train.make_train_step(
        graphdefs["train"], config.loss.to_dict(), tx,
        input_convention=config.model.input_convention, dtype=config.model.dtype))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    labels = np.repeat(rng.permutation(num_classes)[:config.classes_per_batch],
                       config.samples_per_class).astype(np.int32)
    before = jax.tree.map(np.asarray, state["params"]["model"])
    state, metrics = step(state, images, labels)
    assert bool(metrics["finite"]) and math.isfinite(float(metrics["loss"]))
    assert int(state["step"]) == 1
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in
             zip(jax.tree.leaves(before), jax.tree.leaves(state["params"]["model"]))]
    assert any(moved)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bninception_average_pool_is_differentiable_under_jit(dtype):
    """BN-Inception's ceil-mode average pool must take a gradient inside jit (the train step):
    the gradient equals torch's ``avg_pool2d`` backward."""
    import jax.numpy as jnp
    import torch
    import torch.nn.functional as F

    from dml_jax.models.googlenet import avg_pool2d_torch

    x = np.random.default_rng(0).standard_normal((2, 9, 9, 3)).astype(np.float32)
    pool = lambda v: avg_pool2d_torch(v.astype(dtype), 3, 1, padding=1, ceil_mode=True,
                                      count_include_pad=True).astype(jnp.float32)
    grad = jax.jit(jax.grad(lambda v: jnp.sum(pool(v) ** 2)))(jnp.asarray(x))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    (F.avg_pool2d(xt, 3, 1, 1, ceil_mode=True, count_include_pad=True) ** 2).sum().backward()
    want = xt.grad.permute(0, 2, 3, 1).numpy()
    tol = 1e-5 if dtype == "float32" else 5e-2
    np.testing.assert_allclose(np.asarray(grad), want, rtol=tol, atol=tol)
