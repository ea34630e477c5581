"""Flax NNX model zoo for deep metric learning, and PyTorch weight import.

Backbones (``backbone(x) -> [B, F]``, ``backbone.features(x) -> {stage: NHWC map, "pooled"}``,
``backbone.num_features``), all on float32 NHWC images:

* :class:`SmallCNN` (8×8 digits and other tiny images),
* ResNet-18/34/50/101 (:mod:`dml_jax.models.resnet`),
* GoogLeNet and BN-Inception (:mod:`dml_jax.models.googlenet`, :mod:`dml_jax.models.bninception`),
* ViT-S/16 and ViT-B/16 (:mod:`dml_jax.models.vit`).

Heads: :class:`EmbeddingHead`, :class:`Classifier`, :class:`MultiLevelHead`,
:func:`temporal_average_pool` / :class:`TemporalPooling`; attention: :class:`MixedAttention`.
:func:`build_model` builds an :class:`EmbeddingModel` by name from a config;
:func:`backbone_from_torch` converts torchvision / Cadene / timm state dicts;
:func:`freeze_batchnorm` + :func:`trainable_filter` implement frozen BatchNorm.
"""

from dml_jax import _extras

_extras.require("dml_jax.models", "models", "flax")

from dml_jax.models._torch_state import StateDictReader, load_state_dict
from dml_jax.models.batchnorm import FrozenParam, freeze_batchnorm, is_frozen, trainable_filter
from dml_jax.models.embedding import EmbeddingModel
from dml_jax.models.heads import (
    Classifier,
    EmbeddingHead,
    MultiLevelHead,
    TemporalPooling,
    l2_normalize,
    temporal_average_pool,
)
from dml_jax.models.layers import BatchNorm, count_params, global_pool
from dml_jax.models.registry import (
    available_backbones,
    backbone_from_torch,
    build_model,
    create_backbone,
    register_backbone,
)
from dml_jax.models.small_cnn import SmallCNN

__all__ = [
    "BatchNorm",
    "Classifier",
    "EmbeddingHead",
    "EmbeddingModel",
    "FrozenParam",
    "MultiLevelHead",
    "SmallCNN",
    "StateDictReader",
    "TemporalPooling",
    "available_backbones",
    "backbone_from_torch",
    "build_model",
    "count_params",
    "create_backbone",
    "freeze_batchnorm",
    "global_pool",
    "is_frozen",
    "l2_normalize",
    "load_state_dict",
    "register_backbone",
    "temporal_average_pool",
    "trainable_filter",
]
