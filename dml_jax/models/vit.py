"""Vision Transformers ViT-S/16 and ViT-B/16 (Dosovitskiy et al. 2021), timm layout.

Module names follow timm's ``VisionTransformer`` (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.{i}.norm1/attn.qkv/attn.proj/norm2/mlp.fc1/mlp.fc2``, ``norm``), so
:func:`vit_from_torch` maps timm state dicts one to one. The backbone output is timm's
pre-logits feature: the class token after the final LayerNorm (``head`` not included).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dml_jax.models._torch_state import StateDictReader, load_state_dict
from dml_jax.models.convert import (
    assert_all_concrete,
    load_array,
    load_conv,
    load_layernorm,
    load_linear,
)

#: arch -> (embed_dim, depth, num_heads); all: patch 16, image 224, MLP ratio 4, qkv bias.
CONFIGS: dict[str, tuple[int, int, int]] = {
    "vit_small_patch16_224": (384, 12, 6),
    "vit_base_patch16_224": (768, 12, 12),
}

_LN_EPS = 1e-6  # timm's ViT LayerNorm epsilon


class Attention(nnx.Module):
    """Multi-head self-attention with one ``qkv`` projection. ``[B, N, D]`` -> ``[B, N, D]``."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Attends over the ``N`` tokens of ``x``."""
        b, n, d = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // h) ** -0.5
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """``fc1`` → exact GELU → ``fc2``. ``[B, N, D]`` -> ``[B, N, D]``."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the MLP token-wise."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-norm transformer block. ``[B, N, D]`` -> ``[B, N, D]``."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, epsilon=_LN_EPS, rngs=rngs)
        self.attn = Attention(dim, num_heads, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=_LN_EPS, rngs=rngs)
        self.mlp = Mlp(dim, mlp_hidden, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Applies the block."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nnx.Module):
    """A ViT backbone with a class token; output: the normalised class token.

    Args:
      embed_dim, depth, num_heads: width ``D``, number of blocks, attention heads.
      patch_size: patch side ``P``; img_size: training image side (sets ``pos_embed``).
      mlp_ratio: MLP hidden width / ``D``.
      in_channels: input channels.
      rngs: random streams for initialisation.

    Shapes: ``x`` ``[B, H, W, in_channels]`` -> ``[B, D]``. Inputs of another size than
    ``img_size`` get their position embeddings resized bicubically (``jax.image.resize``;
    close to, but not bit-equal with, timm's ``dynamic_img_size``). ``features(x)`` returns
    ``{"tokens": [B, 1 + N, D] (after the final norm), "pooled": [B, D]}``; there is no
    spatial map, so embedding heads use ``"pooled"``.
    """

    def __init__(
        self,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        *,
        patch_size: int = 16,
        img_size: int = 224,
        mlp_ratio: float = 4.0,
        in_channels: int = 3,
        rngs: nnx.Rngs,
    ):
        self.embed_dim = embed_dim
        self.patch_size = patch_size
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(in_channels, embed_dim, patch_size, rngs=rngs)
        init = nnx.initializers.truncated_normal(0.02)
        self.cls_token = nnx.Param(1e-6 * jax.random.normal(rngs.params(), (1, 1, embed_dim)))
        self.pos_embed = nnx.Param(init(rngs.params(), (1, 1 + self.grid**2, embed_dim)))
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nnx.List(
            [Block(embed_dim, num_heads, hidden, rngs=rngs) for _ in range(depth)]
        )
        self.norm = nnx.LayerNorm(embed_dim, epsilon=_LN_EPS, rngs=rngs)
        self.num_features = embed_dim
        self.stage_channels: dict[str, int] = {}
        self.last_stage = None

    def _pos_embed(self, gh: int, gw: int) -> jax.Array:
        pos = self.pos_embed[...]
        if (gh, gw) == (self.grid, self.grid):
            return pos
        cls_pos, grid = pos[:, :1], pos[:, 1:].reshape(1, self.grid, self.grid, -1)
        grid = jax.image.resize(grid, (1, gh, gw, grid.shape[-1]), "bicubic")
        return jnp.concatenate([cls_pos, grid.reshape(1, gh * gw, -1)], axis=1)

    def features(self, x: jax.Array) -> dict[str, jax.Array]:
        """``{"tokens": [B, 1 + N, D], "pooled": [B, D]}`` (both after the final LayerNorm)."""
        t = self.patch_embed(x)  # [B, gh, gw, D]
        b, gh, gw, d = t.shape
        t = t.reshape(b, gh * gw, d)
        cls = jnp.broadcast_to(self.cls_token[...], (b, 1, d))
        t = jnp.concatenate([cls, t], axis=1) + self._pos_embed(gh, gw)
        for blk in self.blocks:
            t = blk(t)
        t = self.norm(t)
        return {"tokens": t, "pooled": t[:, 0]}

    def __call__(self, x: jax.Array) -> jax.Array:
        """timm's pre-logits features ``[B, D]`` (the normalised class token)."""
        return self.features(x)["pooled"]

    def load_torch(self, reader: StateDictReader) -> None:
        """Copies timm weights (everything but ``head``) from ``reader``."""
        load_conv(reader, "patch_embed.proj", self.patch_embed.proj)
        load_array(reader, "cls_token", self.cls_token)
        load_array(reader, "pos_embed", self.pos_embed)
        for i, blk in enumerate(self.blocks):
            p = f"blocks.{i}"
            load_layernorm(reader, f"{p}.norm1", blk.norm1)
            load_linear(reader, f"{p}.attn.qkv", blk.attn.qkv)
            load_linear(reader, f"{p}.attn.proj", blk.attn.proj)
            load_layernorm(reader, f"{p}.norm2", blk.norm2)
            load_linear(reader, f"{p}.mlp.fc1", blk.mlp.fc1)
            load_linear(reader, f"{p}.mlp.fc2", blk.mlp.fc2)
        load_layernorm(reader, "norm", self.norm)


class _PatchEmbed(nnx.Module):
    """``P × P`` conv with stride ``P``. ``[B, H, W, C]`` -> ``[B, H/P, W/P, D]``."""

    def __init__(self, in_channels: int, dim: int, patch: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Conv(
            in_channels, dim, (patch, patch), strides=(patch, patch), padding="VALID", rngs=rngs
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj(x)


def vit_small_patch16_224(*, rngs: nnx.Rngs, **kwargs) -> VisionTransformer:
    """ViT-S/16 backbone (384 features; 21,665,664 parameters, 22,050,664 with the head)."""
    d, depth, h = CONFIGS["vit_small_patch16_224"]
    return VisionTransformer(d, depth, h, rngs=rngs, **kwargs)


def vit_base_patch16_224(*, rngs: nnx.Rngs, **kwargs) -> VisionTransformer:
    """ViT-B/16 backbone (768 features; 85,798,656 parameters, 86,567,656 with the head)."""
    d, depth, h = CONFIGS["vit_base_patch16_224"]
    return VisionTransformer(d, depth, h, rngs=rngs, **kwargs)


def vit_from_torch(
    state: Mapping[str, Any] | str | os.PathLike,
    arch: str | None = None,
    *,
    num_heads: int | None = None,
) -> VisionTransformer:
    """A :class:`VisionTransformer` with the weights of a timm ViT state dict.

    The architecture is read from the tensors (width, depth, patch size, grid, MLP width);
    the number of heads, which the tensors do not determine, comes from ``arch``
    (``vit_small_patch16_224``: 6, ``vit_base_patch16_224``: 12) or ``num_heads``. ``head.*``
    keys are ignored; any other missing, extra or mis-shaped key raises an error naming it.
    Returned in eval mode.
    """
    state = load_state_dict(state)
    if num_heads is None:
        if arch not in CONFIGS:
            raise ValueError(f"Unknown ViT {arch!r}; known: {sorted(CONFIGS)} (or give num_heads).")
        num_heads = CONFIGS[arch][2]
    name = arch or "vit"
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise KeyError(f"{name}: missing key {key!r} in the state dict.")
    dim = int(state["cls_token"].shape[-1])
    patch = int(state["patch_embed.proj.weight"].shape[-1])
    in_channels = int(state["patch_embed.proj.weight"].shape[1])
    grid = round((state["pos_embed"].shape[1] - 1) ** 0.5)
    hidden = int(state["blocks.0.mlp.fc1.weight"].shape[0])
    depth = 0
    while f"blocks.{depth}.norm1.weight" in state:
        depth += 1
    if arch in CONFIGS and (dim, depth) != CONFIGS[arch][:2]:
        raise ValueError(
            f"{arch}: the state dict has width {dim} and depth {depth}, expected "
            f"{CONFIGS[arch][:2]}."
        )
    model = nnx.eval_shape(
        lambda: VisionTransformer(
            dim,
            depth,
            num_heads,
            patch_size=patch,
            img_size=grid * patch,
            mlp_ratio=hidden / dim,
            in_channels=in_channels,
            rngs=nnx.Rngs(0),
        )
    )
    reader = StateDictReader(state, name)
    model.load_torch(reader)
    reader.finish(ignore=("head.",))
    assert_all_concrete(model, name)
    model.eval()
    return model
