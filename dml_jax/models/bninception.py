"""BN-Inception (Inception v2 as used in deep metric learning) in Flax NNX, with weight import.

The architecture and key names are those of ``bninception`` in Cadene's ``pretrainedmodels``
package (a port of the Caffe ``googlenet_bn`` / BN-Inception model used by most DML papers,
e.g. Ranked List Loss and OSM+CAA): every convolution has a bias and is followed by a
BatchNorm (``eps=1e-5``) and a ReLU; max-pools use ``ceil_mode=True``; the pooling branch of the
non-reducing blocks is a 3x3/1 average pool with ``ceil_mode=True, count_include_pad=True``
(a 3x3/1 max pool in ``inception_5b``); ``inception_3c`` and ``inception_4e`` halve the
resolution. The classifier ``last_linear`` is not part of this module.

Input convention (Cadene's ``pretrained_settings``): **BGR** channel order, range **0-255**,
minus the per-channel mean ``[104, 117, 128]`` (B, G, R), std 1 -- not the torchvision
ImageNet normalisation. :func:`rgb_to_bninception_input` converts RGB images in ``[0, 1]``.

BatchNorm momentum: Cadene's BatchNorm layers are built with torch ``momentum=0.9``, i.e. the
running statistics move 90% of the way to each batch's statistics (an artefact of the Caffe
port). The default ``bn_momentum=0.1`` (flax convention: weight of the old value) reproduces
that exactly; pass ``bn_momentum=0.9`` for the usual torch-default behaviour. Most DML recipes
freeze BatchNorm when fine-tuning BN-Inception, which makes the choice moot.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dml_jax.models._torch_state import StateDictReader, load_state_dict
from dml_jax.models.googlenet import (
    avg_pool2d_torch,
    check_all_loaded,
    init_conv_kernels,
    load_batchnorm_torch,
    load_conv_torch,
    max_pool2d_torch,
)
from dml_jax.models.layers import ConvBNReLU

__all__ = [
    "BGR_MEAN",
    "BNInception",
    "ConvBN",
    "bninception_from_torch",
    "rgb_to_bninception_input",
]

BGR_MEAN = (104.0, 117.0, 128.0)
"""Cadene's BN-Inception input mean, in its (B, G, R) channel order, on the 0-255 scale."""

# Inception blocks: name -> (in, 1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3,
# pool projection, pool). A 1x1 / projection width of 0 means the branch is absent; the
# "max_s2" blocks (3c, 4e) halve the resolution: their 3x3 and second double-3x3 convolutions
# have stride 2 and their pooling branch is a 3x3/2 max pool without projection.
_BLOCKS: dict[str, tuple[int, int, int, int, int, int, int, str]] = {
    "inception_3a": (192, 64, 64, 64, 64, 96, 32, "avg"),
    "inception_3b": (256, 64, 64, 96, 64, 96, 64, "avg"),
    "inception_3c": (320, 0, 128, 160, 64, 96, 0, "max_s2"),
    "inception_4a": (576, 224, 64, 96, 96, 128, 128, "avg"),
    "inception_4b": (576, 192, 96, 128, 96, 128, 128, "avg"),
    "inception_4c": (576, 160, 128, 160, 128, 160, 128, "avg"),
    "inception_4d": (608, 96, 128, 192, 160, 192, 128, "avg"),
    "inception_4e": (608, 0, 128, 192, 192, 256, 0, "max_s2"),
    "inception_5a": (1056, 352, 192, 320, 160, 224, 128, "avg"),
    "inception_5b": (1024, 352, 192, 320, 192, 224, 128, "max"),
}


def rgb_to_bninception_input(images: jax.Array) -> jax.Array:
    """RGB images in ``[0, 1]`` ``[..., 3]`` -> BGR, 0-255, mean-subtracted (Cadene's input).

    Args:
      images: float array ``[..., H, W, 3]``, RGB, values in ``[0, 1]``.

    Returns:
      float32 array of the same shape: ``255 * images[..., ::-1] - BGR_MEAN``.
    """
    x = jnp.asarray(images, jnp.float32)[..., ::-1] * 255.0
    return x - jnp.asarray(BGR_MEAN, jnp.float32)


class ConvBN(ConvBNReLU):
    """Conv (with bias) -> BatchNorm(eps=1e-5) -> ReLU, one unit of Cadene's BN-Inception.

    A unit named ``n`` holds torch's ``n.{weight,bias}`` in ``conv`` and
    ``n_bn.{weight,bias,running_mean,running_var}`` in ``bn``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        bn_momentum: float = 0.1,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            kernel_size,
            stride=stride,
            padding=padding,
            use_bias=True,
            epsilon=1e-5,
            bn_momentum=bn_momentum,
            kernel_init=nnx.initializers.zeros,  # BNInception.__init__ draws the kernels
            rngs=rngs,
        )


class BNInception(nnx.Module):
    """Cadene's BN-Inception backbone (classifier removed), NHWC.

    Input: float32 ``[B, H, W, 3]`` in Cadene's convention -- BGR, 0-255, minus
    ``BGR_MEAN`` (see :func:`rgb_to_bninception_input`). ``H`` and ``W`` must give even
    feature-map sizes at the inputs of ``inception_3c`` and ``inception_4e`` (true for 224,
    227 and multiples of 32), as in the torch model, whose strided-conv and ceil-mode pool
    branches would otherwise disagree.

    Output of ``__call__``: ``[B, 1024]``, the spatial mean of ``inception_5b``. Cadene's
    ``global_pool`` is a fixed 7x7 average pool, which is this mean for 224x224 inputs (7x7
    maps); for other sizes this module still pools globally (as DML code bases do by swapping
    in adaptive pooling).

    BatchNorm layers are plain ``nnx.BatchNorm``; ``model.train()``/``model.eval()`` switch
    between batch and running statistics. A new model is in train mode, like a torch module.

    Attributes:
      num_features: 1024, the size of the pooled features.
      stage_channels: ``{stage: channels}`` of the maps :meth:`features` returns (for
        ``build_model(multi_level=...)``, e.g. Ranked List Loss's ``inception_3c``,
        ``inception_4e``, ``inception_5b``).
      unit_names: the torch names of the conv+BN units, in forward order (``"conv1_7x7_s2"``,
        ``"conv2_3x3_reduce"``, ..., ``"inception_5b_pool_proj"``); each is an attribute.
    """

    num_features: int = 1024
    stage_channels: Mapping[str, int] = types.MappingProxyType({
        "conv2_3x3": 192, "inception_3a": 256, "inception_3b": 320, "inception_3c": 576,
        "inception_4a": 576, "inception_4b": 576, "inception_4c": 608, "inception_4d": 608,
        "inception_4e": 1056, "inception_5a": 1024, "inception_5b": 1024,
    })

    def __init__(self, *, bn_momentum: float = 0.1, rngs: nnx.Rngs):
        """Builds a randomly initialised BN-Inception.

        Convolution kernels are drawn from torch's default ``Conv2d`` distribution (uniform in
        ``+-1/sqrt(fan_in)``, see
        :func:`~dml_jax.models.googlenet.init_conv_kernels`); conv biases are 0, BatchNorm
        scale 1 and bias 0.

        Args:
          bn_momentum: flax BatchNorm momentum. The default 0.1 equals the torch
            ``momentum=0.9`` of Cadene's model; 0.9 gives torch's usual default.
          rngs: random keys for the initialisation.
        """
        names: list[str] = []

        def unit(name: str, cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> None:
            layer = ConvBN(
                cin, cout, k, stride=stride, padding=pad, bn_momentum=bn_momentum, rngs=rngs
            )
            setattr(self, name, layer)
            names.append(name)

        unit("conv1_7x7_s2", 3, 64, 7, stride=2, pad=3)
        unit("conv2_3x3_reduce", 64, 64, 1)
        unit("conv2_3x3", 64, 192, 3, pad=1)
        for block, (cin, c1, c3r, c3, cdr, cd, cp, pool) in _BLOCKS.items():
            s = 2 if pool == "max_s2" else 1
            if c1:
                unit(f"{block}_1x1", cin, c1, 1)
            unit(f"{block}_3x3_reduce", cin, c3r, 1)
            unit(f"{block}_3x3", c3r, c3, 3, stride=s, pad=1)
            unit(f"{block}_double_3x3_reduce", cin, cdr, 1)
            unit(f"{block}_double_3x3_1", cdr, cd, 3, pad=1)
            unit(f"{block}_double_3x3_2", cd, cd, 3, stride=s, pad=1)
            if cp:
                unit(f"{block}_pool_proj", cin, cp, 1)
        self.unit_names = tuple(names)
        init_conv_kernels(self, rngs.params(), "fan_in_uniform")

    def _block(self, name: str, x: jax.Array) -> jax.Array:
        _, c1, _, _, _, _, cp, pool = _BLOCKS[name]
        u = lambda suffix: getattr(self, f"{name}_{suffix}")
        outs = []
        if c1:
            outs.append(u("1x1")(x))
        outs.append(u("3x3")(u("3x3_reduce")(x)))
        outs.append(u("double_3x3_2")(u("double_3x3_1")(u("double_3x3_reduce")(x))))
        if pool == "avg":
            pooled = avg_pool2d_torch(x, 3, 1, padding=1, ceil_mode=True, count_include_pad=True)
        elif pool == "max":
            pooled = max_pool2d_torch(x, 3, 1, padding=1, ceil_mode=True)
        else:
            pooled = max_pool2d_torch(x, 3, 2, ceil_mode=True)
        outs.append(u("pool_proj")(pooled) if cp else pooled)
        if len({o.shape[1:3] for o in outs}) != 1:
            raise ValueError(
                f"BNInception.{name}: input map {x.shape[1:3]} gives branch outputs of sizes "
                f"{[o.shape[1:3] for o in outs]}; the torch model needs even map sizes here "
                "(use e.g. 224, 227 or a multiple of 32 as the image size)."
            )
        return jnp.concatenate(outs, axis=-1)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Named stage outputs (NHWC, after ReLU), for multi-level heads.

        Args:
          x: ``[B, H, W, 3]`` float32 images (BGR, 0-255, mean-subtracted).

        Returns:
          ``{"conv2_3x3": [B, H/4, W/4, 192], "inception_3a": [.., H/8, W/8, 256],
          "inception_3b": 320, "inception_3c": [.., H/16, W/16, 576], "inception_4a": 576,
          "inception_4b": 576, "inception_4c": 608, "inception_4d": 608,
          "inception_4e": [.., H/32, W/32, 1056], "inception_5a": 1024, "inception_5b": 1024,
          "pooled": [B, 1024]}`` (spatial sizes for multiples of 32; torch's ceil-mode rounding
          otherwise). Ranked List Loss's multi-level embeddings read ``inception_3c`` and
          ``inception_4e`` (its auxiliary branches) and ``pooled``.
        """
        out: dict[str, jax.Array] = {}
        x = self.conv1_7x7_s2(x)
        x = max_pool2d_torch(x, 3, 2, ceil_mode=True)
        x = self.conv2_3x3(self.conv2_3x3_reduce(x))
        out["conv2_3x3"] = x
        x = max_pool2d_torch(x, 3, 2, ceil_mode=True)
        for name in _BLOCKS:
            x = out[name] = self._block(name, x)
        out["pooled"] = jnp.mean(x, axis=(1, 2))
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` float32 images (BGR, 0-255, mean-subtracted) -> ``[B, 1024]``."""
        return self.features(x)["pooled"]


def bninception_from_torch(
    state: Mapping[str, Any] | str | os.PathLike,
    *,
    bn_momentum: float = 0.1,
) -> BNInception:
    """Builds a :class:`BNInception` from a Cadene ``pretrainedmodels`` ``bninception`` state dict.

    Args:
      state: ``{name: tensor or np.ndarray}`` with Cadene's key names (``conv1_7x7_s2.weight``,
        ``conv1_7x7_s2.bias``, ``conv1_7x7_s2_bn.running_mean``, ``inception_3a_1x1.weight``,
        ...), or a path to a ``.pth``/``.safetensors`` file. ``last_linear.*`` (the
        classifier) may be present and is ignored.
      bn_momentum: flax BatchNorm momentum for later training; the default 0.1 matches
        Cadene's torch ``momentum=0.9`` (see the module docstring).

    Returns:
      The model in eval mode (running BatchNorm statistics); call ``.train()`` to fine-tune.

    Raises:
      KeyError: a key the model needs is missing (the message names it).
      ValueError: a key has the wrong shape, or an unexpected key is present (named).
    """
    reader = StateDictReader(load_state_dict(state), arch="bninception")
    # Abstract construction (no random init); every variable is then filled from ``state``.
    model = nnx.eval_shape(lambda: BNInception(bn_momentum=bn_momentum, rngs=nnx.Rngs(0)))
    for name in model.unit_names:
        layer: ConvBN = getattr(model, name)
        load_conv_torch(reader, f"{name}.weight", layer.conv, bias_key=f"{name}.bias")
        load_batchnorm_torch(reader, f"{name}_bn", layer.bn)
    reader.finish(ignore=("last_linear.",))
    check_all_loaded(model, "bninception")
    model.eval()
    return model
