"""Helpers shared by the torch-equivalence tests of the Inception backbones (need torch)."""

from __future__ import annotations

import jax
import numpy as np
import torch
from flax import nnx
from torch import nn as tnn


def randomise(model: tnn.Module, seed: int) -> tnn.Module:
    """Random weights everywhere: convolutions (and their biases, if any), BatchNorm affine
    parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, tnn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(1.0 + 0.2 * torch.randn(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def np_state(model: tnn.Module) -> dict[str, np.ndarray]:
    """A copy of ``model``'s state dict as NumPy arrays."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@nnx.jit
def features(model: nnx.Module, x: jax.Array) -> dict[str, jax.Array]:
    """``model.features(x)``, jitted whole: eager NNX compiles every op per shape."""
    return model.features(x)


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Max absolute error relative to the largest reference value."""
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))
