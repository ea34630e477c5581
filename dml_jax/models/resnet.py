"""ResNet-18/34/50/101 (He et al. 2016), torchvision layout (v1.5: stride in the 3×3 conv).

Layer names follow torchvision (``conv1``, ``bn1``, ``layer1`` … ``layer4``, blocks with
``conv1``/``bn1``/…/``downsample``), so :func:`resnet_from_torch` maps keys one to one.
The classifier ``fc`` is not part of the backbone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from dml_jax.models._torch_state import StateDictReader, load_state_dict
from dml_jax.models.attention import MixedAttention
from dml_jax.models.convert import assert_all_concrete, load_batchnorm, load_conv
from dml_jax.models.layers import BatchNorm, conv, global_pool, max_pool

STAGES = ("layer1", "layer2", "layer3", "layer4")

#: arch -> (block type, blocks per stage)
CONFIGS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
}


class Downsample(nnx.Module):
    """1×1 conv (stride ``s``) + BatchNorm on the shortcut (torchvision ``downsample.0/1``)."""

    def __init__(self, in_features: int, out_features: int, stride: int, *, rngs: nnx.Rngs):
        self.conv = conv(in_features, out_features, 1, stride=stride, padding=0, rngs=rngs)
        self.bn = BatchNorm(out_features, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in]`` -> ``[B, H/s, W/s, out]``."""
        return self.bn(self.conv(x))


class BasicBlock(nnx.Module):
    """Two 3×3 convs with a residual connection. ``[B, H, W, in]`` -> ``[B, H/s, W/s, planes]``."""

    expansion = 1

    def __init__(self, in_features: int, planes: int, stride: int = 1, *, rngs: nnx.Rngs):
        self.conv1 = conv(in_features, planes, 3, stride=stride, rngs=rngs)
        self.bn1 = BatchNorm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, rngs=rngs)
        self.bn2 = BatchNorm(planes, rngs=rngs)
        needs_proj = stride != 1 or in_features != planes
        self.downsample = Downsample(in_features, planes, stride, rngs=rngs) if needs_proj else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        short = x if self.downsample is None else self.downsample(x)
        return nnx.relu(out + short)

    def load_torch(self, reader: StateDictReader, prefix: str) -> None:
        """Copies the torchvision weights under ``prefix`` (e.g. ``"layer1.0"``)."""
        load_conv(reader, f"{prefix}.conv1", self.conv1)
        load_batchnorm(reader, f"{prefix}.bn1", self.bn1)
        load_conv(reader, f"{prefix}.conv2", self.conv2)
        load_batchnorm(reader, f"{prefix}.bn2", self.bn2)
        if self.downsample is not None:
            load_conv(reader, f"{prefix}.downsample.0", self.downsample.conv)
            load_batchnorm(reader, f"{prefix}.downsample.1", self.downsample.bn)


class Bottleneck(nnx.Module):
    """1×1 → 3×3 (stride ``s``) → 1×1 convs with a residual connection.

    Shapes: ``[B, H, W, in]`` -> ``[B, H/s, W/s, 4 * planes]``.
    """

    expansion = 4

    def __init__(self, in_features: int, planes: int, stride: int = 1, *, rngs: nnx.Rngs):
        out = planes * self.expansion
        self.conv1 = conv(in_features, planes, 1, padding=0, rngs=rngs)
        self.bn1 = BatchNorm(planes, rngs=rngs)
        self.conv2 = conv(planes, planes, 3, stride=stride, rngs=rngs)
        self.bn2 = BatchNorm(planes, rngs=rngs)
        self.conv3 = conv(planes, out, 1, padding=0, rngs=rngs)
        self.bn3 = BatchNorm(out, rngs=rngs)
        needs_proj = stride != 1 or in_features != out
        self.downsample = Downsample(in_features, out, stride, rngs=rngs) if needs_proj else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = nnx.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        short = x if self.downsample is None else self.downsample(x)
        return nnx.relu(out + short)

    def load_torch(self, reader: StateDictReader, prefix: str) -> None:
        """Copies the torchvision weights under ``prefix`` (e.g. ``"layer1.0"``)."""
        for i in (1, 2, 3):
            load_conv(reader, f"{prefix}.conv{i}", getattr(self, f"conv{i}"))
            load_batchnorm(reader, f"{prefix}.bn{i}", getattr(self, f"bn{i}"))
        if self.downsample is not None:
            load_conv(reader, f"{prefix}.downsample.0", self.downsample.conv)
            load_batchnorm(reader, f"{prefix}.downsample.1", self.downsample.bn)


class ResNet(nnx.Module):
    """A torchvision-style ResNet backbone without ``fc``.

    Args:
      block: ``"basic"`` (ResNet-18/34) or ``"bottleneck"`` (ResNet-50/101).
      layers: blocks in ``layer1`` … ``layer4``.
      in_channels: input channels (3 for ImageNet weights).
      attention_after: stage names (``"layer1"`` … ``"layer4"``) followed by a
        :class:`~dml_jax.models.attention.MixedAttention` block (attributes ``attn_<stage>``).
      rngs: random streams for initialisation.

    Shapes: ``x`` ``[B, H, W, in_channels]`` -> ``[B, num_features]`` (512 for basic blocks,
    2048 for bottlenecks); ``features(x)`` adds ``"stem"`` ``[B, H/4, W/4, 64]`` and
    ``"layer1"`` … ``"layer4"`` (strides 4, 8, 16, 32).
    """

    def __init__(
        self,
        block: str,
        layers: Sequence[int],
        *,
        in_channels: int = 3,
        attention_after: Sequence[str] = (),
        rngs: nnx.Rngs,
    ):
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}.")
        bad = [s for s in attention_after if s not in STAGES]
        if bad:
            raise ValueError(f"attention_after: unknown stages {bad}; known: {list(STAGES)}.")
        block_cls = BasicBlock if block == "basic" else Bottleneck
        self.block = block
        self.layers = tuple(int(n) for n in layers)
        self.in_channels = in_channels
        self.attention_after = tuple(attention_after)
        self.conv1 = conv(in_channels, 64, 7, stride=2, padding=3, rngs=rngs)
        self.bn1 = BatchNorm(64, rngs=rngs)
        c_in = 64
        self.stage_channels: dict[str, int] = {"stem": 64}
        for i, (name, n) in enumerate(zip(STAGES, self.layers)):
            planes = 64 * 2**i
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(c_in, planes, stride, rngs=rngs))
                c_in = planes * block_cls.expansion
            setattr(self, name, nnx.List(blocks))
            self.stage_channels[name] = c_in
            if name in self.attention_after:
                setattr(self, f"attn_{name}", MixedAttention(c_in, rngs=rngs))
        self.num_features = c_in
        self.last_stage = "layer4"

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """``{"stem", "layer1", …, "layer4": NHWC maps, "pooled": [B, num_features]}``.

        A stage in ``attention_after`` is reported after its attention block.
        """
        out = {}
        x = max_pool(nnx.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        out["stem"] = x
        for name in STAGES:
            for blk in getattr(self, name):
                x = blk(x)
            if name in self.attention_after:
                x = getattr(self, f"attn_{name}")(x)
            out[name] = x
        out["pooled"] = global_pool(x, "avg")
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        """Globally average-pooled features ``[B, num_features]``."""
        return self.features(x)["pooled"]

    def load_torch(self, reader: StateDictReader) -> None:
        """Copies torchvision weights (everything but ``fc``) from ``reader``."""
        load_conv(reader, "conv1", self.conv1)
        load_batchnorm(reader, "bn1", self.bn1)
        for name in STAGES:
            for j, blk in enumerate(getattr(self, name)):
                blk.load_torch(reader, f"{name}.{j}")


def _make(arch: str, rngs: nnx.Rngs, **kwargs) -> ResNet:
    block, layers = CONFIGS[arch]
    return ResNet(block, layers, rngs=rngs, **kwargs)


def resnet18(*, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNet-18 backbone (512 features; 11,176,512 parameters, 11,689,512 with ``fc``)."""
    return _make("resnet18", rngs, **kwargs)


def resnet34(*, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNet-34 backbone (512 features; 21,284,672 parameters, 21,797,672 with ``fc``)."""
    return _make("resnet34", rngs, **kwargs)


def resnet50(*, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNet-50 backbone (2048 features; 23,508,032 parameters, 25,557,032 with ``fc``)."""
    return _make("resnet50", rngs, **kwargs)


def resnet101(*, rngs: nnx.Rngs, **kwargs) -> ResNet:
    """ResNet-101 backbone (2048 features; 42,500,160 parameters, 44,549,160 with ``fc``)."""
    return _make("resnet101", rngs, **kwargs)


def resnet_from_torch(
    state: Mapping[str, Any] | str | os.PathLike,
    arch: str = "resnet50",
    *,
    attention_after: Sequence[str] = (),
    rngs: nnx.Rngs | None = None,
) -> ResNet:
    """A :class:`ResNet` with the weights of a torchvision ``resnet*`` state dict.

    ``fc.weight``/``fc.bias`` may be present and are ignored; any other missing, extra or
    mis-shaped key raises an error naming it. Attention blocks (``attention_after``) are not
    in torchvision checkpoints and are initialised from ``rngs`` (default ``nnx.Rngs(0)``).
    The returned module is in eval mode.
    """
    state = load_state_dict(state)
    if arch not in CONFIGS:
        raise ValueError(f"Unknown ResNet {arch!r}; known: {sorted(CONFIGS)}.")
    # Build abstractly (cheap), fill from the state dict, then initialise the attention
    # blocks, which torchvision checkpoints do not have, for real.
    model = nnx.eval_shape(lambda: _make(arch, nnx.Rngs(0), attention_after=attention_after))
    reader = StateDictReader(state, arch)
    model.load_torch(reader)
    reader.finish(ignore=("fc.",))
    rngs = rngs or nnx.Rngs(0)
    for stage in model.attention_after:
        c = model.stage_channels[stage]
        setattr(model, f"attn_{stage}", MixedAttention(c, rngs=rngs))
    assert_all_concrete(model, arch)
    model.eval()
    return model
