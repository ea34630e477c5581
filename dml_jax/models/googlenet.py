"""GoogLeNet (Inception v1 with BatchNorm) as in torchvision, in Flax NNX, with weight import.

The architecture is torchvision's ``googlenet``: every convolution is followed by a BatchNorm
(``eps=1e-3``) and a ReLU; the "5x5" branch of each Inception block uses a 3x3 kernel (a known
torchvision quirk, kept so that its ImageNet weights load); max-pools use ``ceil_mode=True``. The
classifier (``fc``), its dropout and the auxiliary classifiers (``aux1``, ``aux2``) are not part
of this module: it returns the 1024-d globally average-pooled features.

Layout is NHWC throughout; torch ``OIHW`` kernels are transposed to ``HWIO`` on import.

This file also holds the two pooling helpers that reproduce torch's ``MaxPool2d``/``AvgPool2d``
exactly (``ceil_mode``, ``count_include_pad``); :mod:`dml_jax.models.bninception` uses them too.
"""

from __future__ import annotations

import os
import types
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dml_jax.models._torch_state import StateDictReader, load_state_dict
from dml_jax.models.layers import ConvBNReLU

__all__ = [
    "BasicConv2d",
    "GoogLeNet",
    "Inception",
    "avg_pool2d_torch",
    "check_all_loaded",
    "googlenet_from_torch",
    "init_conv_kernels",
    "load_batchnorm_torch",
    "load_conv_torch",
    "max_pool2d_torch",
]

# torchvision's GoogLeNet Inception blocks: name -> (in, 1x1, 3x3 reduce, 3x3, "5x5" reduce,
# "5x5" (a 3x3 kernel in torchvision), pool projection).
_INCEPTION_CFG: dict[str, tuple[int, int, int, int, int, int, int]] = {
    "inception3a": (192, 64, 96, 128, 16, 32, 32),
    "inception3b": (256, 128, 128, 192, 32, 96, 64),
    "inception4a": (480, 192, 96, 208, 16, 48, 64),
    "inception4b": (512, 160, 112, 224, 24, 64, 64),
    "inception4c": (512, 128, 128, 256, 24, 64, 64),
    "inception4d": (512, 112, 144, 288, 32, 64, 64),
    "inception4e": (528, 256, 160, 320, 32, 128, 128),
    "inception5a": (832, 256, 160, 320, 32, 128, 128),
    "inception5b": (832, 384, 192, 384, 48, 128, 128),
}

# torchvision's transform_input: x_c * (std_c / 0.5) + (mean_c - 0.5) / 0.5, which maps an
# ImageNet-normalised image to the [-1, 1] scaling the ported TensorFlow weights expect.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------
# torch-exact pooling
# --------------------------------------------------------------------------------------------


def _pool_geometry(
    size: int, kernel: int, stride: int, padding: int, ceil_mode: bool
) -> tuple[int, int]:
    """Returns ``(out_size, high_padding)`` of one spatial axis as torch computes them."""
    span = size + 2 * padding - kernel
    if span < 0:
        raise ValueError(
            f"Pooling window {kernel} (padding {padding}) is larger than the input size {size}."
        )
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # torch: the last window must start inside the input or the left padding.
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    high = max((out - 1) * stride + kernel - size - padding, 0)
    return out, high


def max_pool2d_torch(
    x: jax.Array, kernel: int, stride: int, padding: int = 0, ceil_mode: bool = False
) -> jax.Array:
    """``torch.nn.MaxPool2d(kernel, stride, padding, ceil_mode=ceil_mode)`` on NHWC input.

    Padding (and the extra windows of ``ceil_mode``) count as ``-inf``, as in torch.

    Args:
      x: ``[B, H, W, C]``.
      kernel, stride, padding: square window size, stride and symmetric padding.
      ceil_mode: round the output size up, as torch does.

    Returns:
      ``[B, H', W', C]`` with torch's output size.
    """
    (oh, hh), (ow, hw) = (
        _pool_geometry(x.shape[1], kernel, stride, padding, ceil_mode),
        _pool_geometry(x.shape[2], kernel, stride, padding, ceil_mode),
    )
    y = jax.lax.reduce_window(
        x,
        -jnp.inf,
        jax.lax.max,
        (1, kernel, kernel, 1),
        (1, stride, stride, 1),
        ((0, 0), (padding, hh), (padding, hw), (0, 0)),
    )
    return y[:, :oh, :ow, :]


def _avg_divisor(
    size: int, out: int, kernel: int, stride: int, padding: int, count_include_pad: bool
) -> np.ndarray:
    """Per-output-position window sizes along one axis, as torch's ``avg_pool2d`` divides."""
    start = np.arange(out) * stride - padding
    end = np.minimum(start + kernel, size + padding)
    if not count_include_pad:
        start = np.maximum(start, 0)
        end = np.minimum(end, size)
    return (end - start).astype(np.float32)


def avg_pool2d_torch(
    x: jax.Array,
    kernel: int,
    stride: int,
    padding: int = 0,
    ceil_mode: bool = False,
    count_include_pad: bool = True,
) -> jax.Array:
    """``torch.nn.AvgPool2d(kernel, stride, padding, ceil_mode, count_include_pad)`` on NHWC.

    As in torch, with ``count_include_pad=True`` the divisor counts the zero padding but not the
    extra positions a ``ceil_mode`` window reaches beyond it; with ``False`` it counts only input
    positions.

    Args:
      x: ``[B, H, W, C]``.
      kernel, stride, padding: square window size, stride and symmetric padding.
      ceil_mode: round the output size up, as torch does.
      count_include_pad: whether zero padding counts in the divisor.

    Returns:
      ``[B, H', W', C]`` with torch's output size.
    """
    h, w = x.shape[1], x.shape[2]
    (oh, hh), (ow, hw) = (
        _pool_geometry(h, kernel, stride, padding, ceil_mode),
        _pool_geometry(w, kernel, stride, padding, ceil_mode),
    )
    summed = jax.lax.reduce_window(
        x,
        np.zeros((), x.dtype),  # concrete: reduce_window_sum, which is differentiable
        jax.lax.add,
        (1, kernel, kernel, 1),
        (1, stride, stride, 1),
        ((0, 0), (padding, hh), (padding, hw), (0, 0)),
    )[:, :oh, :ow, :]
    div = np.outer(
        _avg_divisor(h, oh, kernel, stride, padding, count_include_pad),
        _avg_divisor(w, ow, kernel, stride, padding, count_include_pad),
    )
    return summed / jnp.asarray(div, x.dtype)[None, :, :, None]


# --------------------------------------------------------------------------------------------
# modules
# --------------------------------------------------------------------------------------------


def init_conv_kernels(module: nnx.Module, key: jax.Array, distribution: str) -> None:
    """Re-initialises every ``nnx.Conv`` kernel inside ``module`` from ONE random draw.

    Drawing each kernel with its own ``jax.random`` call compiles one XLA program per kernel
    shape when run eagerly (about a second each on a small CPU, so most of a minute for an
    Inception net); one flat draw sliced into the kernels compiles once. Works eagerly and
    under ``nnx.jit``/``nnx.eval_shape``.

    Args:
      module: the module whose convolutions are filled (in ``nnx.iter_modules`` order).
      key: a PRNG key.
      distribution: ``"truncated_normal_0.01"`` (torchvision's GoogLeNet: normal with
        std 0.01 truncated at 2 std) or ``"fan_in_uniform"`` (torch's default ``Conv2d``
        init: uniform in ``+-1/sqrt(fan_in)``).
    """
    convs = [m for _, m in nnx.iter_modules(module) if isinstance(m, nnx.Conv)]
    sizes = [int(np.prod(c.kernel.shape)) for c in convs]
    total = sum(sizes)
    if distribution == "truncated_normal_0.01":
        flat = 0.01 * jax.random.truncated_normal(key, -2.0, 2.0, (total,), jnp.float32)
    elif distribution == "fan_in_uniform":
        flat = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)
    else:
        raise ValueError(f"Unknown distribution {distribution!r}.")
    xp: Any = jnp
    if not isinstance(flat, jax.core.Tracer):
        flat, xp = np.asarray(flat), np  # slice on the host: no per-shape compilations
    offset = 0
    for conv, size in zip(convs, sizes):
        shape = conv.kernel.shape
        w = xp.reshape(flat[offset : offset + size], shape)
        offset += size
        if distribution == "fan_in_uniform":
            w = w * (1.0 / np.sqrt(shape[0] * shape[1] * shape[2]))
        conv.kernel.set_value(jnp.asarray(w, conv.kernel.dtype))


class BasicConv2d(ConvBNReLU):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU: torchvision's ``BasicConv2d``.

    Attributes ``conv`` and ``bn`` hold what torch stores under ``<prefix>.conv.*`` and
    ``<prefix>.bn.*``. Kernels start at zero: :class:`GoogLeNet` draws them all at once.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        bn_momentum: float = 0.9,
        rngs: nnx.Rngs,
    ):
        super().__init__(
            in_features,
            out_features,
            kernel_size,
            stride=stride,
            padding=padding,
            use_bias=False,
            epsilon=1e-3,
            bn_momentum=bn_momentum,
            kernel_init=nnx.initializers.zeros,
            rngs=rngs,
        )


class Inception(nnx.Module):
    """torchvision's GoogLeNet Inception block (four branches, concatenated on channels).

    ``branch1``: 1x1; ``branch2``: 1x1 -> 3x3; ``branch3``: 1x1 -> 3x3 (torchvision's "5x5");
    ``branch4``: 3x3/1 max-pool (ceil mode, padding 1) -> 1x1 projection. ``branch2``/``branch3``
    are ``nnx.List``s (torch ``branchN.0``/``branchN.1``); ``branch4`` is the projection only
    (torch ``branch4.1``, since ``branch4.0`` is the parameter-free pool).
    """

    def __init__(
        self,
        in_features: int,
        ch1x1: int,
        ch3x3red: int,
        ch3x3: int,
        ch5x5red: int,
        ch5x5: int,
        pool_proj: int,
        *,
        bn_momentum: float = 0.9,
        rngs: nnx.Rngs,
    ):
        kw: dict[str, Any] = {"bn_momentum": bn_momentum, "rngs": rngs}
        self.branch1 = BasicConv2d(in_features, ch1x1, 1, **kw)
        self.branch2 = nnx.List(
            [
                BasicConv2d(in_features, ch3x3red, 1, **kw),
                BasicConv2d(ch3x3red, ch3x3, 3, padding=1, **kw),
            ]
        )
        self.branch3 = nnx.List(
            [
                BasicConv2d(in_features, ch5x5red, 1, **kw),
                BasicConv2d(ch5x5red, ch5x5, 3, padding=1, **kw),
            ]
        )
        self.branch4 = BasicConv2d(in_features, pool_proj, 1, **kw)
        self.out_features = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in] -> [B, H, W, out_features]``."""
        b1 = self.branch1(x)
        b2 = self.branch2[1](self.branch2[0](x))
        b3 = self.branch3[1](self.branch3[0](x))
        b4 = self.branch4(max_pool2d_torch(x, 3, 1, padding=1, ceil_mode=True))
        return jnp.concatenate([b1, b2, b3, b4], axis=-1)


class GoogLeNet(nnx.Module):
    """torchvision's GoogLeNet backbone (classifier and auxiliary heads removed).

    Input: float32 NHWC images ``[B, H, W, 3]``, RGB, normalised with the ImageNet mean/std as
    for every torchvision model. With ``transform_input=True`` the module first applies
    torchvision's per-channel re-normalisation ``x_c * std_c / 0.5 + (mean_c - 0.5) / 0.5``
    (torchvision's pretrained ``googlenet`` enables it: its weights were ported from TensorFlow
    and expect ``[-1, 1]`` inputs). Any ``H, W >= 32`` works (the last max-pool needs a 2x2 map).

    Output of ``__call__``: ``[B, 1024]`` globally average-pooled features (torchvision's
    ``avgpool`` + ``flatten``; the dropout before ``fc`` is dropped).

    BatchNorm layers are plain ``nnx.BatchNorm`` (``momentum=0.9`` == torch's 0.1, ``eps=1e-3``):
    ``model.train()`` uses batch statistics and updates the running ones, ``model.eval()`` uses
    the running ones. A newly constructed model is in train mode, like a torch module.

    Attributes:
      num_features: 1024, the size of the pooled features.
      stage_channels: ``{stage: channels}`` of the maps :meth:`features` returns (for
        ``build_model(multi_level=...)``).
      transform_input: whether the torchvision input re-normalisation is applied.
    """

    num_features: int = 1024
    stage_channels: Mapping[str, int] = types.MappingProxyType({
        "conv3": 192, "inception3a": 256, "inception3b": 480, "inception4a": 512,
        "inception4b": 512, "inception4c": 512, "inception4d": 528, "inception4e": 832,
        "inception5a": 832, "inception5b": 1024,
    })

    def __init__(
        self,
        *,
        transform_input: bool = False,
        bn_momentum: float = 0.9,
        rngs: nnx.Rngs,
    ):
        """Builds a randomly initialised GoogLeNet.

        Convolutions are drawn as torchvision does (normal, std 0.01, truncated at 2 std; see
        :func:`init_conv_kernels`), BatchNorm scale 1 and bias 0.

        Args:
          transform_input: apply torchvision's ``transform_input`` re-normalisation first.
          bn_momentum: flax BatchNorm momentum (0.9 is torch's default momentum 0.1).
          rngs: random keys for the initialisation.
        """
        kw: dict[str, Any] = {"bn_momentum": bn_momentum, "rngs": rngs}
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(3, 64, 7, stride=2, padding=3, **kw)
        self.conv2 = BasicConv2d(64, 64, 1, **kw)
        self.conv3 = BasicConv2d(64, 192, 3, padding=1, **kw)
        self.inception3a = Inception(*_INCEPTION_CFG["inception3a"], **kw)
        self.inception3b = Inception(*_INCEPTION_CFG["inception3b"], **kw)
        self.inception4a = Inception(*_INCEPTION_CFG["inception4a"], **kw)
        self.inception4b = Inception(*_INCEPTION_CFG["inception4b"], **kw)
        self.inception4c = Inception(*_INCEPTION_CFG["inception4c"], **kw)
        self.inception4d = Inception(*_INCEPTION_CFG["inception4d"], **kw)
        self.inception4e = Inception(*_INCEPTION_CFG["inception4e"], **kw)
        self.inception5a = Inception(*_INCEPTION_CFG["inception5a"], **kw)
        self.inception5b = Inception(*_INCEPTION_CFG["inception5b"], **kw)
        init_conv_kernels(self, rngs.params(), "truncated_normal_0.01")

    def _transform(self, x: jax.Array) -> jax.Array:
        if not self.transform_input:
            return x
        scale = jnp.asarray([s / 0.5 for s in _IMAGENET_STD], x.dtype)
        shift = jnp.asarray([(m - 0.5) / 0.5 for m in _IMAGENET_MEAN], x.dtype)
        return x * scale + shift

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """Named stage outputs (NHWC, after ReLU), for multi-level heads.

        Args:
          x: ``[B, H, W, 3]`` float32 images.

        Returns:
          ``{"conv3": [B, H/4, W/4, 192], "inception3a": [.., H/8, W/8, 256],
          "inception3b": [.., 480], "inception4a": [.., H/16, W/16, 512], "inception4b": 512,
          "inception4c": 512, "inception4d": 528, "inception4e": 832,
          "inception5a": [.., H/32, W/32, 832], "inception5b": 1024, "pooled": [B, 1024]}``
          (spatial sizes for ``H, W`` multiples of 32; others follow torch's ceil-mode pools).
          torchvision's ``aux1``/``aux2`` heads read ``inception4a``/``inception4d``.
        """
        out: dict[str, jax.Array] = {}
        x = self._transform(x)
        x = self.conv1(x)
        x = max_pool2d_torch(x, 3, 2, ceil_mode=True)
        x = self.conv2(x)
        x = self.conv3(x)
        out["conv3"] = x
        x = max_pool2d_torch(x, 3, 2, ceil_mode=True)
        x = out["inception3a"] = self.inception3a(x)
        x = out["inception3b"] = self.inception3b(x)
        x = max_pool2d_torch(x, 3, 2, ceil_mode=True)
        x = out["inception4a"] = self.inception4a(x)
        x = out["inception4b"] = self.inception4b(x)
        x = out["inception4c"] = self.inception4c(x)
        x = out["inception4d"] = self.inception4d(x)
        x = out["inception4e"] = self.inception4e(x)
        x = max_pool2d_torch(x, 2, 2, ceil_mode=True)
        x = out["inception5a"] = self.inception5a(x)
        x = out["inception5b"] = self.inception5b(x)
        out["pooled"] = jnp.mean(x, axis=(1, 2))
        return out

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3]`` float32 images -> ``[B, 1024]`` pooled features."""
        return self.features(x)["pooled"]


# --------------------------------------------------------------------------------------------
# torch import
# --------------------------------------------------------------------------------------------


def load_conv_torch(
    reader: StateDictReader, key: str, conv: nnx.Conv, *, bias_key: str | None = None
) -> None:
    """Copies a torch ``Conv2d`` weight ``[O, I, kh, kw]`` (and bias ``[O]``) into ``conv``.

    Args:
      reader: the state dict being read.
      key: the torch weight key, e.g. ``"conv1.conv.weight"``.
      conv: the ``nnx.Conv`` to fill (kernel ``[kh, kw, I, O]``).
      bias_key: the torch bias key when the conv has a bias.

    Raises:
      KeyError / ValueError: a key is missing or mis-shaped (named in the message).
    """
    kh, kw, cin, cout = conv.kernel.shape
    w = reader.take(key, (cout, cin, kh, kw))
    conv.kernel.set_value(jnp.asarray(np.transpose(w, (2, 3, 1, 0))))
    if bias_key is not None:
        conv.bias.set_value(jnp.asarray(reader.take(bias_key, (cout,))))


def load_batchnorm_torch(reader: StateDictReader, prefix: str, bn: nnx.BatchNorm) -> None:
    """Copies torch ``BatchNorm2d`` tensors ``<prefix>.{weight,bias,running_mean,running_var}``.

    ``<prefix>.num_batches_tracked`` is not needed (flax has no counter) and is left to
    ``StateDictReader.finish``, which ignores it.

    Raises:
      KeyError / ValueError: a key is missing or mis-shaped (named in the message).
    """
    n = (bn.num_features,)
    bn.scale.set_value(jnp.asarray(reader.take(f"{prefix}.weight", n)))
    bn.bias.set_value(jnp.asarray(reader.take(f"{prefix}.bias", n)))
    bn.mean.set_value(jnp.asarray(reader.take(f"{prefix}.running_mean", n)))
    bn.var.set_value(jnp.asarray(reader.take(f"{prefix}.running_var", n)))


def check_all_loaded(model: nnx.Module, arch: str) -> None:
    """Raises ``RuntimeError`` if a variable of ``model`` was never given a concrete value.

    Converters build their model with ``nnx.eval_shape``; this guards against a variable the
    key mapping forgot (a bug in the converter, not in the user's state dict).
    """
    for path, value in jax.tree.leaves_with_path(nnx.state(model)):
        if isinstance(value, jax.ShapeDtypeStruct):
            raise RuntimeError(f"{arch}: converter left {jax.tree_util.keystr(path)} unset.")


def _googlenet_units(model: GoogLeNet) -> list[tuple[str, BasicConv2d]]:
    """``(torch prefix, module)`` for every conv+BN unit of ``model``."""
    units: list[tuple[str, BasicConv2d]] = [
        ("conv1", model.conv1),
        ("conv2", model.conv2),
        ("conv3", model.conv3),
    ]
    for name in _INCEPTION_CFG:
        block: Inception = getattr(model, name)
        units += [
            (f"{name}.branch1", block.branch1),
            (f"{name}.branch2.0", block.branch2[0]),
            (f"{name}.branch2.1", block.branch2[1]),
            (f"{name}.branch3.0", block.branch3[0]),
            (f"{name}.branch3.1", block.branch3[1]),
            (f"{name}.branch4.1", block.branch4),
        ]
    return units


def googlenet_from_torch(
    state: Mapping[str, Any] | str | os.PathLike,
    *,
    transform_input: bool = False,
) -> GoogLeNet:
    """Builds a :class:`GoogLeNet` from a torchvision ``googlenet`` state dict.

    Args:
      state: ``{name: tensor or np.ndarray}`` with torchvision's key names
        (``conv1.conv.weight``, ``conv1.bn.running_mean``, ``inception3a.branch2.0.conv.weight``,
        ...), or a path to a ``.pth``/``.safetensors`` file. ``fc.*``, ``aux1.*`` and
        ``aux2.*`` (classifier and auxiliary heads) may be present and are ignored.
      transform_input: apply torchvision's input re-normalisation. torchvision's
        ``googlenet(weights=...)`` turns it on for its ImageNet weights; pass ``True`` to
        reproduce that model on ImageNet-normalised input.

    Returns:
      The model in eval mode (running BatchNorm statistics); call ``.train()`` to fine-tune.

    Raises:
      KeyError: a key the model needs is missing (the message names it).
      ValueError: a key has the wrong shape, or an unexpected key is present (named).
    """
    reader = StateDictReader(load_state_dict(state), arch="googlenet")
    # Abstract construction (no random init); every variable is then filled from ``state``.
    model = nnx.eval_shape(lambda: GoogLeNet(transform_input=transform_input, rngs=nnx.Rngs(0)))
    for prefix, unit in _googlenet_units(model):
        load_conv_torch(reader, f"{prefix}.conv.weight", unit.conv)
        load_batchnorm_torch(reader, f"{prefix}.bn", unit.bn)
    reader.finish(ignore=("fc.", "aux1.", "aux2."))
    check_all_loaded(model, "googlenet")
    model.eval()
    return model
