"""Embedding, classifier, multi-level and temporal heads.

* :class:`EmbeddingHead`: global pooling (avg / max / avg+max) → optional BatchNorm → linear
  to ``embedding_dim`` → optional L2 normalisation.
* :class:`Classifier`: logits for the losses that need them (CAA, center-based, hybrid).
* :class:`MultiLevelHead`: one embedding head per backbone stage (Ranked List Loss's L/M/H
  embeddings), concatenated.
* :func:`temporal_average_pool`: mean of frame embeddings for video re-ID image sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dml_jax.models.layers import POOLINGS, BatchNorm, global_pool


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||_2, eps)`` along ``axis`` (as ``torch.nn.functional.normalize``)."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


class EmbeddingHead(nnx.Module):
    """Pooling → optional BatchNorm → linear → optional L2 normalisation.

    Args:
      in_features: channels ``F`` of the backbone features.
      embedding_dim: output size ``E``; ``None`` skips the linear layer (``E = F``).
      pooling: ``"avg"``, ``"max"`` or ``"avgmax"`` (mean + max, summed) over H, W.
      batchnorm: a BatchNorm on the pooled features before the linear layer.
      l2_normalize: L2-normalise the output.
      rngs: random streams for initialisation.

    Shapes: ``x`` ``[B, H, W, F]`` (pooled here) or ``[B, F]`` (already pooled) -> ``[B, E]``.
    """

    def __init__(
        self,
        in_features: int,
        embedding_dim: int | None = 128,
        *,
        pooling: str = "avg",
        batchnorm: bool = False,
        l2_normalize: bool = True,
        rngs: nnx.Rngs,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"Unknown pooling {pooling!r}; expected one of {POOLINGS}.")
        self.in_features = in_features
        self.pooling = pooling
        self.normalize = l2_normalize
        self.bn = BatchNorm(in_features, rngs=rngs) if batchnorm else None
        self.linear = nnx.Linear(in_features, embedding_dim, rngs=rngs) if embedding_dim else None
        self.embedding_dim = embedding_dim if embedding_dim else in_features

    def pool(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, F]`` -> ``[B, F]`` with this head's pooling (identity on ``[B, F]``)."""
        return global_pool(x, self.pooling)

    def __call__(self, x: jax.Array) -> jax.Array:
        """The embedding ``[B, E]`` of features ``[B, H, W, F]`` or ``[B, F]``."""
        h = self.pool(x)
        if self.bn is not None:
            h = self.bn(h)
        if self.linear is not None:
            h = self.linear(h)
        if self.normalize:
            h = l2_normalize(h)
        return h


class Classifier(nnx.Module):
    """Linear classifier ``[B, D] -> [B, num_classes]`` logits.

    With ``normalized=True`` it is a cosine classifier: ``scale * <x/|x|, w_c/|w_c|>``
    (no bias), the form used by normalised-softmax / proxy-style losses.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        normalized: bool = False,
        scale: float = 16.0,
        rngs: nnx.Rngs,
    ):
        self.in_features = in_features
        self.num_classes = num_classes
        self.normalized = normalized
        self.scale = scale
        self.linear = nnx.Linear(in_features, num_classes, use_bias=not normalized, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[B, num_classes]`` of inputs ``[B, in_features]``."""
        if not self.normalized:
            return self.linear(x)
        w = l2_normalize(self.linear.kernel[...], axis=0)
        return self.scale * (l2_normalize(x) @ w)


class MultiLevelHead(nnx.Module):
    """One :class:`EmbeddingHead` per named backbone stage; outputs their concatenation.

    Ranked List Loss (RLL-(L,M,H)) trains a 512-d L2-normalised embedding on a low, a middle
    and the final stage, each with its own loss, and tests on the concatenation.

    Args:
      in_features: ``{stage name: channels}`` for the stages used, in output order.
      embedding_dim, pooling, batchnorm, l2_normalize: as :class:`EmbeddingHead` (shared).

    Shapes: ``features`` ``{stage: [B, H_s, W_s, F_s]}`` -> ``([B, L * E], {stage: [B, E]})``.
    """

    def __init__(
        self,
        in_features: Mapping[str, int],
        embedding_dim: int | None = 512,
        *,
        pooling: str = "avg",
        batchnorm: bool = False,
        l2_normalize: bool = True,
        rngs: nnx.Rngs,
    ):
        if not in_features:
            raise ValueError("MultiLevelHead needs at least one stage.")
        self.levels = tuple(in_features)
        self.heads = nnx.Dict(
            {
                name: EmbeddingHead(
                    f,
                    embedding_dim,
                    pooling=pooling,
                    batchnorm=batchnorm,
                    l2_normalize=l2_normalize,
                    rngs=rngs,
                )
                for name, f in in_features.items()
            }
        )
        self.embedding_dim = sum(h.embedding_dim for h in self.heads.values())

    def __call__(self, features: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(concatenated embedding [B, sum E], {stage: embedding [B, E]})``."""
        missing = [n for n in self.levels if n not in features]
        if missing:
            raise KeyError(f"MultiLevelHead: stages {missing} not in {sorted(features)}.")
        per_level = {name: self.heads[name](features[name]) for name in self.levels}
        return jnp.concatenate([per_level[n] for n in self.levels], axis=-1), per_level


def temporal_average_pool(
    frames: jax.Array, mask: jax.Array | None = None, *, l2_normalize_output: bool = False
) -> jax.Array:
    """Average of per-frame embeddings, for video re-ID sets (MARS, LPW …).

    Args:
      frames: ``[B, T, E]`` frame embeddings.
      mask: optional ``[B, T]`` (bool or 0/1) marking valid frames; each set needs one.
      l2_normalize_output: L2-normalise the pooled embedding.

    Returns: ``[B, E]``.
    """
    if mask is None:
        out = jnp.mean(frames, axis=1)
    else:
        w = mask.astype(frames.dtype)[..., None]
        out = jnp.sum(frames * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return l2_normalize(out) if l2_normalize_output else out


class TemporalPooling(nnx.Module):
    """Wraps a per-image model so that it embeds sets/clips of ``T`` frames.

    The wrapped ``model(x)`` may return an array or ``(embedding, aux)`` (an
    :class:`~dml_jax.models.EmbeddingModel`). Frames are embedded as one batch of ``B*T``
    images, then averaged over ``T`` (:func:`temporal_average_pool`).

    Shapes: ``x`` ``[B, T, H, W, C]`` -> ``([B, E], {"frame_embeddings": [B, T, E]})``.
    """

    def __init__(self, model: nnx.Module, *, l2_normalize_output: bool = False):
        self.model = model
        self.l2_normalize_output = l2_normalize_output

    def __call__(
        self, x: jax.Array, mask: jax.Array | None = None
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Set embeddings ``[B, E]`` and ``{"frame_embeddings": [B, T, E]}``."""
        b, t = x.shape[:2]
        out = self.model(x.reshape((b * t, *x.shape[2:])))
        emb = out[0] if isinstance(out, tuple) else out
        frames = emb.reshape((b, t, emb.shape[-1]))
        pooled = temporal_average_pool(frames, mask, l2_normalize_output=self.l2_normalize_output)
        return pooled, {"frame_embeddings": frames}


__all__: Sequence[str] = (
    "Classifier",
    "EmbeddingHead",
    "MultiLevelHead",
    "TemporalPooling",
    "l2_normalize",
    "temporal_average_pool",
)
