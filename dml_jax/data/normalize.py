"""Pixel normalisation on the device: uint8 batches from the pipeline -> float32 model input.

The input pipeline ships uint8 (a quarter of the bytes of float32); the train / eval step
normalises after the transfer with :func:`normalize`, which is jit-able.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Cadene's BN-Inception: BGR channel order, 0-255 range, per-channel mean (B, G, R), std 1.
BNINCEPTION_BGR_MEAN = (104.0, 117.0, 128.0)

CONVENTIONS = ("imagenet", "bninception", "unit")


def normalize(images: jax.Array, convention: str = "imagenet") -> jax.Array:
    """Normalises RGB images ``[..., H, W, 3]`` (uint8 0-255, or float on the same scale).

    Conventions:
      ``"imagenet"``: ``(x / 255 - mean) / std`` with the ImageNet RGB mean / std
      (torchvision and timm weights).
      ``"bninception"``: channels reversed to BGR, 0-255, minus ``(104, 117, 128)``
      (Cadene's ``pretrainedmodels`` BN-Inception).
      ``"unit"``: ``x / 255`` (the small CNN, the digits demo).

    Returns:
      float32 array of the same shape. Holds one float32 copy of the batch.

    Raises:
      ValueError: unknown ``convention``, or the last axis is not 3.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"`convention` must be one of {CONVENTIONS}; got {convention!r}.")
    if images.shape[-1] != 3:
        raise ValueError(f"`images` must have 3 channels last; got shape {images.shape}.")
    x = jnp.asarray(images).astype(jnp.float32)
    if convention == "unit":
        return x / 255.0
    if convention == "bninception":
        return x[..., ::-1] - jnp.asarray(BNINCEPTION_BGR_MEAN, jnp.float32)
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32) * 255.0
    std = jnp.asarray(IMAGENET_STD, jnp.float32) * 255.0
    return (x - mean) / std
