"""Copying torch tensors into NNX layers (shared by the ``*_from_torch`` converters).

Each helper takes the weights of one torch layer from a
:class:`~dml_jax.models._torch_state.StateDictReader` (which checks names and shapes) and
writes them, transposed to the NHWC/``[in, out]`` layouts of Flax, into the NNX layer.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dml_jax.models._torch_state import StateDictReader


def _set(var: nnx.Variable, value: np.ndarray) -> None:
    var.value = jnp.asarray(value)


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(var.value.shape)


def load_conv(reader: StateDictReader, prefix: str, layer: nnx.Conv) -> None:
    """``{prefix}.weight`` ``[O, I, kh, kw]`` (and ``{prefix}.bias`` if the layer has one)."""
    kh, kw, i, o = _shape(layer.kernel)
    w = reader.take(f"{prefix}.weight", (o, i, kh, kw))
    _set(layer.kernel, w.transpose(2, 3, 1, 0))
    if layer.bias is not None:
        _set(layer.bias, reader.take(f"{prefix}.bias", (o,)))


def load_linear(reader: StateDictReader, prefix: str, layer: nnx.Linear) -> None:
    """``{prefix}.weight`` ``[out, in]`` and ``{prefix}.bias`` ``[out]``."""
    i, o = _shape(layer.kernel)
    _set(layer.kernel, reader.take(f"{prefix}.weight", (o, i)).T)
    if layer.bias is not None:
        _set(layer.bias, reader.take(f"{prefix}.bias", (o,)))


def load_batchnorm(reader: StateDictReader, prefix: str, layer: nnx.BatchNorm) -> None:
    """``{prefix}.weight/bias/running_mean/running_var`` ``[C]`` (torch BatchNorm)."""
    c = layer.num_features
    if layer.scale is not None:
        _set(layer.scale, reader.take(f"{prefix}.weight", (c,)))
    if layer.bias is not None:
        _set(layer.bias, reader.take(f"{prefix}.bias", (c,)))
    _set(layer.mean, reader.take(f"{prefix}.running_mean", (c,)))
    _set(layer.var, reader.take(f"{prefix}.running_var", (c,)))
    reader.skip(f"{prefix}.num_batches_tracked")


def load_layernorm(reader: StateDictReader, prefix: str, layer: nnx.LayerNorm) -> None:
    """``{prefix}.weight`` and ``{prefix}.bias`` ``[D]`` (torch LayerNorm)."""
    d = _shape(layer.scale)
    _set(layer.scale, reader.take(f"{prefix}.weight", d))
    _set(layer.bias, reader.take(f"{prefix}.bias", d))


def load_array(reader: StateDictReader, key: str, var: nnx.Variable) -> None:
    """A tensor copied as is (same shape), e.g. a ViT's ``cls_token`` or ``pos_embed``."""
    _set(var, reader.take(key, _shape(var)))


def assert_all_concrete(module: nnx.Module, arch: str) -> None:
    """Raises if a variable of ``module`` was left abstract (a converter bug)."""
    for path, leaf in nnx.to_flat_state(nnx.state(module)):
        value = getattr(leaf, "value", leaf)
        if not hasattr(value, "devices") and not isinstance(value, np.ndarray):
            name = "/".join(map(str, path))
            raise RuntimeError(f"{arch}: variable {name} was not set by the converter.")
