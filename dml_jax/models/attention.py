"""The mixed (channel + spatial) attention block used for DeMAL-CNN.

The DeMAL-CNN paper (He et al., Complex & Intelligent Systems 2022) says only that its
embedding network has a "mixed attention mechanism (spatial-wise + channel-wise)"; its exact
design is not available. We implement the CBAM design (Woo et al., ECCV 2018), applied
sequentially, channel first:

1. **channel attention**: average- and max-pooled descriptors ``[B, C]`` go through one shared
   MLP ``C → C/r → C`` (ReLU in between); ``a_c = sigmoid(mlp(avg) + mlp(max))``;
   ``x ← x * a_c``.
2. **spatial attention**: the channel-wise mean and max maps ``[B, H, W, 2]`` go through a
   ``k × k`` convolution (``2 → 1``, with bias, padding ``k // 2``);
   ``a_s = sigmoid(conv(...))``; ``x ← x * a_s``.

Defaults: ``reduction=16`` (hidden width at least 1), ``kernel_size=7``. The block keeps the
shape of its input, so it can be inserted after any residual stage
(``build_model(..., attention_after=["layer3", "layer4"])``). With ``residual=True`` the
output is ``x + block(x)`` instead (a gentler insertion into a pretrained network; not CBAM).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class MixedAttention(nnx.Module):
    """CBAM-style channel-then-spatial attention. ``[B, H, W, C]`` -> ``[B, H, W, C]``.

    Args:
      channels: ``C``, channels of the input map.
      reduction: channel-MLP reduction ratio ``r``.
      kernel_size: size of the spatial-attention convolution (odd).
      residual: return ``x + attended(x)`` instead of ``attended(x)``.
      rngs: random streams for initialisation.
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        kernel_size: int = 7,
        residual: bool = False,
        rngs: nnx.Rngs,
    ):
        hidden = max(channels // reduction, 1)
        self.channels = channels
        self.residual = residual
        self.fc1 = nnx.Linear(channels, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, channels, rngs=rngs)
        pad = kernel_size // 2
        self.spatial = nnx.Conv(
            2, 1, (kernel_size, kernel_size), padding=((pad, pad), (pad, pad)), rngs=rngs
        )

    def channel_attention(self, x: jax.Array) -> jax.Array:
        """Channel weights ``[B, 1, 1, C]`` in (0, 1) of ``x`` ``[B, H, W, C]``."""
        mlp = lambda v: self.fc2(nnx.relu(self.fc1(v)))
        a = jax.nn.sigmoid(mlp(jnp.mean(x, axis=(1, 2))) + mlp(jnp.max(x, axis=(1, 2))))
        return a[:, None, None, :]

    def spatial_attention(self, x: jax.Array) -> jax.Array:
        """Spatial weights ``[B, H, W, 1]`` in (0, 1) of ``x`` ``[B, H, W, C]``."""
        s = jnp.concatenate(
            [jnp.mean(x, axis=-1, keepdims=True), jnp.max(x, axis=-1, keepdims=True)], axis=-1
        )
        return jax.nn.sigmoid(self.spatial(s))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x`` ``[B, H, W, C]`` reweighted by channel, then by spatial attention."""
        y = x * self.channel_attention(x)
        y = y * self.spatial_attention(y)
        return x + y if self.residual else y
