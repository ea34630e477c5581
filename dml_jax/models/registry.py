"""Models by name: :func:`build_model`, :func:`create_backbone`, :func:`backbone_from_torch`.

GoogLeNet and BN-Inception live in ``googlenet.py`` / ``bninception.py`` and are imported
lazily, only when asked for.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flax import nnx

from dml_jax.models._torch_state import load_state_dict
from dml_jax.models.batchnorm import freeze_batchnorm
from dml_jax.models.embedding import EmbeddingModel
from dml_jax.models.heads import Classifier, EmbeddingHead, MultiLevelHead

# name -> "module:constructor" (constructor(**kwargs, rngs=...) -> backbone)
_BACKBONES: dict[str, str] = {
    "small_cnn": "dml_jax.models.small_cnn:SmallCNN",
    "resnet18": "dml_jax.models.resnet:resnet18",
    "resnet34": "dml_jax.models.resnet:resnet34",
    "resnet50": "dml_jax.models.resnet:resnet50",
    "resnet101": "dml_jax.models.resnet:resnet101",
    "googlenet": "dml_jax.models.googlenet:GoogLeNet",
    "bninception": "dml_jax.models.bninception:BNInception",
    "vit_small_patch16_224": "dml_jax.models.vit:vit_small_patch16_224",
    "vit_base_patch16_224": "dml_jax.models.vit:vit_base_patch16_224",
    "audio_cnn2d": "dml_jax.models.audio_encoder:AudioCNN2D",
    "audio_tcn1d": "dml_jax.models.audio_encoder:AudioTCN1D",
}

# arch -> "module:converter" (converter(state: dict[str, np.ndarray], **options) -> backbone)
_CONVERTERS: dict[str, str] = {
    "resnet18": "dml_jax.models.resnet:resnet_from_torch",
    "resnet34": "dml_jax.models.resnet:resnet_from_torch",
    "resnet50": "dml_jax.models.resnet:resnet_from_torch",
    "resnet101": "dml_jax.models.resnet:resnet_from_torch",
    "googlenet": "dml_jax.models.googlenet:googlenet_from_torch",
    "bninception": "dml_jax.models.bninception:bninception_from_torch",
    "vit_small_patch16_224": "dml_jax.models.vit:vit_from_torch",
    "vit_base_patch16_224": "dml_jax.models.vit:vit_from_torch",
}

# Converters that take the architecture name as their ``arch`` keyword.
_TAKES_ARCH = {"resnet18", "resnet34", "resnet50", "resnet101"} | {
    "vit_small_patch16_224",
    "vit_base_patch16_224",
}


def _resolve(spec: str) -> Callable[..., Any]:
    module, attr = spec.split(":")
    return getattr(importlib.import_module(module), attr)


def register_backbone(name: str, constructor: str | Callable[..., nnx.Module]) -> None:
    """Adds a backbone to :func:`build_model`'s registry.

    ``constructor`` is a callable ``(**kwargs, rngs=nnx.Rngs) -> nnx.Module`` or a lazy
    ``"package.module:attribute"`` string naming one. The backbone must follow the zoo's
    contract: ``backbone(x) -> [B, F]``, ``backbone.features(x) -> dict`` (stage maps and
    ``"pooled"``) and ``backbone.num_features``.
    """
    if isinstance(constructor, str):
        _BACKBONES[name] = constructor
    else:
        key = f"_registered_{name}"
        globals()[key] = constructor
        _BACKBONES[name] = f"{__name__}:{key}"


def available_backbones() -> tuple[str, ...]:
    """Names accepted by :func:`create_backbone` and :func:`build_model` (``name``)."""
    return tuple(_BACKBONES)


def _check_name(name: str, known: Mapping[str, str], what: str) -> None:
    if name not in known:
        raise ValueError(f"Unknown {what} {name!r}; known: {', '.join(sorted(known))}.")


def create_backbone(name: str, *, rngs: nnx.Rngs, **kwargs: Any) -> nnx.Module:
    """A randomly initialised backbone by name (``kwargs`` go to its constructor).

    Raises:
      ValueError: unknown ``name`` (the message lists the known ones).
    """
    _check_name(name, _BACKBONES, "backbone")
    return _resolve(_BACKBONES[name])(rngs=rngs, **kwargs)


def backbone_from_torch(
    arch: str, state_dict: Mapping[str, Any] | str | os.PathLike, **options: Any
) -> nnx.Module:
    """An NNX backbone for ``arch`` with the weights of a PyTorch state dict.

    Args:
      arch: ``resnet18``, ``resnet34``, ``resnet50``, ``resnet101`` (torchvision key names),
        ``googlenet`` (torchvision), ``bninception`` (Cadene ``pretrainedmodels``),
        ``vit_small_patch16_224``, ``vit_base_patch16_224`` (timm).
      state_dict: ``{name: torch tensor or np.ndarray}``, or a path to a ``.pth``/``.pt``
        (read with ``torch.load(weights_only=True)``) or ``.safetensors`` file.
      **options: passed to the converter, e.g. ``transform_input=True`` for GoogLeNet,
        ``attention_after=("layer3",)`` and ``rngs`` for ResNets.

    Returns:
      A module in eval mode whose call on float32 NHWC images ``[B, H, W, 3]`` returns the
      globally pooled features ``[B, F]`` of the torch model without its classifier (timm's
      pre-logits features for the ViTs). The classifier weights (``fc.*``, ``head.*``,
      ``last_linear.*``) are allowed in the state dict and ignored.

    Raises:
      ValueError: unknown ``arch``; unexpected or mis-shaped keys (named in the message).
      KeyError: a missing key (named in the message).
    """
    _check_name(arch, _CONVERTERS, "architecture")
    state = load_state_dict(state_dict)
    convert = _resolve(_CONVERTERS[arch])
    if arch in _TAKES_ARCH:
        model = convert(state, arch=arch, **options)
    else:
        model = convert(state, **options)
    model.eval()
    return model


_DEFAULTS: dict[str, Any] = {
    "embedding_dim": 128,
    "pooling": "avg",
    "head_batchnorm": False,
    "l2_normalize": True,
    "num_classes": None,
    "freeze_bn": False,
    "attention_after": (),
    "pretrained": None,
    "in_channels": None,
    "classifier_input": "embedding",
    "classifier_normalized": False,
    "multi_level": (),
    "return_stages": False,
    "backbone_kwargs": {},
}


def _as_dict(config: Any) -> dict[str, Any]:
    if hasattr(config, "to_dict"):  # ml_collections.ConfigDict
        return dict(config.to_dict())
    if isinstance(config, Mapping):
        return dict(config)
    raise TypeError(f"config must be a mapping or ConfigDict, got {type(config)}.")


def build_model(config: Any, *, rngs: nnx.Rngs) -> EmbeddingModel:
    """Builds an :class:`EmbeddingModel` from a config (``ml_collections.ConfigDict`` or mapping).

    Keys (defaults in brackets):

    * ``name``: backbone name, one of :func:`available_backbones` (required);
    * ``embedding_dim`` [128]: embedding size; ``None``/0: no linear layer;
    * ``pooling`` ["avg"]: ``"avg"``, ``"max"`` or ``"avgmax"``;
    * ``head_batchnorm`` [False]: BatchNorm on the pooled features before the linear layer;
    * ``l2_normalize`` [True]: L2-normalise the embedding;
    * ``num_classes`` [None]: adds a classifier, ``aux["logits"]`` ``[B, num_classes]``;
    * ``classifier_input`` ["embedding"]: the classifier reads the embedding, or
      ``"features"`` (the pooled backbone features); ``classifier_normalized`` [False]:
      a cosine classifier;
    * ``freeze_bn`` [False]: :func:`~dml_jax.models.freeze_batchnorm` on the backbone
      (the head's own BatchNorm stays trainable);
    * ``attention_after`` [()]: stage names (e.g. ``["layer3", "layer4"]``) after which a
      :class:`~dml_jax.models.attention.MixedAttention` block is inserted (ResNets);
    * ``pretrained`` [None]: path to a torch state dict for the backbone
      (see :func:`backbone_from_torch`);
    * ``in_channels`` [None: 1 for ``small_cnn``, 3 otherwise];
    * ``multi_level`` [()]: stage names for a :class:`MultiLevelHead` (e.g.
      ``["layer2", "layer3", "layer4"]``); the embedding is then the concatenation;
    * ``return_stages`` [False]: put every stage map in ``aux`` as ``"stage/<name>"``;
    * ``backbone_kwargs`` [{}]: extra constructor/converter options (e.g.
      ``{"transform_input": True}`` for GoogLeNet, ``{"widths": (32, 64, 64)}`` for small_cnn).

    Raises:
      ValueError: unknown ``name`` (listing the known ones), or unknown keys in ``config``.
    """
    cfg = _as_dict(config)
    if "name" not in cfg:
        raise ValueError(f"config needs a 'name'; known: {', '.join(sorted(_BACKBONES))}.")
    name = cfg.pop("name")
    unknown = sorted(set(cfg) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown model config keys {unknown}; known: {sorted(_DEFAULTS)}.")
    c = {**_DEFAULTS, **cfg}
    _check_name(name, _BACKBONES, "backbone")

    kwargs: dict[str, Any] = dict(c["backbone_kwargs"] or {})
    attention_after = tuple(c["attention_after"] or ())
    if attention_after:
        kwargs["attention_after"] = attention_after
    if c["pretrained"] is not None:
        if name not in _CONVERTERS:
            raise ValueError(f"No torch weights converter for {name!r}.")
        if attention_after:
            kwargs["rngs"] = rngs
        backbone = backbone_from_torch(name, c["pretrained"], **kwargs)
    else:
        in_channels = c["in_channels"]
        if in_channels is None:
            in_channels = 1 if name == "small_cnn" else 3
        if name == "small_cnn" or in_channels != 3:
            kwargs["in_channels"] = in_channels
        backbone = create_backbone(name, rngs=rngs, **kwargs)

    if c["freeze_bn"]:
        freeze_batchnorm(backbone)

    num_features = int(backbone.num_features)
    head = EmbeddingHead(
        num_features,
        c["embedding_dim"],
        pooling=c["pooling"],
        batchnorm=bool(c["head_batchnorm"]),
        l2_normalize=bool(c["l2_normalize"]),
        rngs=rngs,
    )
    multi = None
    levels: Sequence[str] = tuple(c["multi_level"] or ())
    if levels:
        channels = getattr(backbone, "stage_channels", {})
        missing = [s for s in levels if s not in channels]
        if missing:
            raise ValueError(
                f"multi_level stages {missing} unknown for {name!r}; known: {sorted(channels)}."
            )
        multi = MultiLevelHead(
            {s: channels[s] for s in levels},
            c["embedding_dim"],
            pooling=c["pooling"],
            batchnorm=bool(c["head_batchnorm"]),
            l2_normalize=bool(c["l2_normalize"]),
            rngs=rngs,
        )
        head = None
    classifier = None
    if c["num_classes"]:
        if c["classifier_input"] == "features":
            cls_in = num_features
        else:
            cls_in = multi.embedding_dim if multi is not None else head.embedding_dim
        classifier = Classifier(
            cls_in, int(c["num_classes"]), normalized=bool(c["classifier_normalized"]), rngs=rngs
        )
    return EmbeddingModel(
        backbone,
        head,
        classifier,
        multi_level_head=multi,
        classifier_input=c["classifier_input"],
        return_stages=bool(c["return_stages"]),
    )
