"""Utterance encoders over log-mel frames, padding-invariant, for spoken-word metric learning.

Inputs are normalised log-mel features ``x`` float32 ``[B, T, M]`` (frames x mel bands) with a
frame mask ``mask`` bool ``[B, T]`` (True on an utterance's frames, False on padding; see
:func:`dml_jax.audio.frame_mask`). Two backbones:

* :class:`AudioCNN2D`: 3x3 conv -> BatchNorm -> ReLU -> 2x2 max-pool blocks over (time, mel);
  the last map's mel and channel axes are flattened into per-frame features.
* :class:`AudioTCN1D`: 1-D temporal convolutions (kernel 5, dilations 1, 2, 4, ...) over the
  mel vectors, without downsampling.

**Padding invariance.** An utterance's output does not depend on how many padded frames follow
it in the batch (in eval mode; BatchNorm in training mode computes its statistics over the
valid frames only, so those too ignore padding): every layer zeroes the padded frames, convs
use fixed explicit padding (so frame ``t`` always sees the same neighbours, zeros beyond the
utterance), and a 2x pooling keeps frame ``t'`` valid only when both of its input frames are
(``t' < L // 2``), exactly the frames a batch without padding keeps. Pooling over time
(:class:`MaskedPooling`) then reads valid frames only.

Both backbones follow the zoo's contract (``backbone(x) -> [B, F]``, ``backbone.features(x)``,
``backbone.num_features``; the mask is optional there, default: every frame is valid), so
``dml_jax.models.create_backbone("audio_cnn2d", ...)`` works; :func:`build_audio_encoder`
builds the full :class:`AudioEncoder` (backbone + masked pooling + L2-normalised embedding +
optional classifier) that the speech training uses.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dml_jax.models.heads import Classifier, l2_normalize
from dml_jax.models.layers import BatchNorm

POOLINGS = ("mean", "attentive_stats")


def _mask_or_ones(x: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.ones(x.shape[:2], bool)
    mask = jnp.asarray(mask)
    if mask.shape != x.shape[:2]:
        raise ValueError(f"`mask` must have shape {x.shape[:2]} ([B, T]); got {mask.shape}.")
    return mask.astype(bool)


def _zero_padding(h: jax.Array, mask: jax.Array) -> jax.Array:
    """``h`` ``[B, T, ...]`` with the frames where ``mask`` ``[B, T]`` is False set to 0."""
    m = mask.reshape(mask.shape + (1,) * (h.ndim - 2))
    return jnp.where(m, h, 0.0)


def _masked_bn(bn: BatchNorm, h: jax.Array, mask: jax.Array) -> jax.Array:
    m = jnp.broadcast_to(mask.reshape(mask.shape + (1,) * (h.ndim - 2)), h.shape)
    return bn(h, mask=m)


def masked_mean(frames: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of ``frames`` ``[B, T, C]`` over the frames where ``mask`` ``[B, T]`` is True.

    Returns ``[B, C]`` (zeros for an utterance without valid frames).
    """
    m = mask.astype(frames.dtype)[..., None]
    return jnp.sum(frames * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class MaskedPooling(nnx.Module):
    """Temporal pooling over valid frames: ``"mean"`` or ``"attentive_stats"``.

    Attentive statistics pooling (Okabe et al., Interspeech 2018): per-frame scores
    ``e_t = v . tanh(W h_t + b)``, ``alpha = softmax`` over the valid frames, output the
    weighted mean and standard deviation ``[mu, sqrt(sum alpha h^2 - mu^2 + 1e-5)]``.

    Shapes: ``frames`` ``[B, T, C]``, ``mask`` ``[B, T]`` -> ``[B, C]`` (mean) or ``[B, 2C]``.
    """

    def __init__(self, channels: int, mode: str = "mean", *, hidden: int = 64,
                 rngs: nnx.Rngs):
        if mode not in POOLINGS:
            raise ValueError(f"Unknown pooling {mode!r}; expected one of {POOLINGS}.")
        self.mode = mode
        self.out_features = channels if mode == "mean" else 2 * channels
        if mode == "attentive_stats":
            self.attention = nnx.Linear(channels, hidden, rngs=rngs)
            self.score = nnx.Linear(hidden, 1, rngs=rngs)

    def __call__(self, frames: jax.Array, mask: jax.Array) -> jax.Array:
        """Pooled features ``[B, out_features]``."""
        if self.mode == "mean":
            return masked_mean(frames, mask)
        e = self.score(jnp.tanh(self.attention(frames)))[..., 0]  # [B, T]
        e = jnp.where(mask, e, -jnp.inf)
        alpha = jax.nn.softmax(e, axis=1)
        alpha = jnp.where(mask, alpha, 0.0)[..., None]  # rows without valid frames: 0
        mu = jnp.sum(alpha * frames, axis=1)
        var = jnp.sum(alpha * jnp.square(frames), axis=1) - jnp.square(mu)
        return jnp.concatenate([mu, jnp.sqrt(jnp.maximum(var, 0.0) + 1e-5)], axis=-1)


class AudioCNN2D(nnx.Module):
    """2-D CNN over (time, mel): ``len(widths)`` blocks of 3x3 conv, BN, ReLU, 2x2 max-pool.

    Args:
      n_mels: mel bands ``M`` (divisible by ``2 ** len(widths)`` is not required; the mel axis
        is floor-halved per block).
      widths: output channels of each block.

    ``features(x, mask)`` returns ``{"frames": [B, T', F], "frame_mask": [B, T'],
    "pooled": [B, F]}`` with ``T' = T // 2**len(widths)``, ``F = num_features =
    widths[-1] * (M // 2**len(widths))``; ``pooled`` is the masked mean over frames.
    """

    def __init__(self, n_mels: int = 40, widths: Sequence[int] = (32, 64, 128), *,
                 rngs: nnx.Rngs):
        widths = tuple(int(w) for w in widths)
        if not widths or n_mels >> len(widths) < 1:
            raise ValueError(f"widths {widths} downsample n_mels={n_mels} below one band.")
        chans = (1, *widths)
        self.convs = nnx.List([
            nnx.Conv(chans[i], chans[i + 1], (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                     rngs=rngs)
            for i in range(len(widths))
        ])
        self.bns = nnx.List([BatchNorm(w, rngs=rngs) for w in widths])
        self.n_mels = n_mels
        self.num_features = widths[-1] * (n_mels >> len(widths))

    def features(self, x: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """See the class docstring. ``x`` ``[B, T, M]``, ``mask`` ``[B, T]`` or None."""
        mask = _mask_or_ones(x, mask)
        if x.ndim != 3 or x.shape[-1] != self.n_mels:
            raise ValueError(f"`x` must have shape [B, T, {self.n_mels}]; got {x.shape}.")
        h = _zero_padding(x, mask)[..., None]  # [B, T, M, 1]
        for conv, bn in zip(self.convs, self.bns):
            h = jax.nn.relu(_masked_bn(bn, conv(h), mask))
            h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="VALID")
            length = jnp.sum(mask, axis=1) // 2
            mask = jnp.arange(h.shape[1])[None, :] < length[:, None]
            h = _zero_padding(h, mask)
        frames = h.reshape(h.shape[0], h.shape[1], -1)
        return {"frames": frames, "frame_mask": mask, "pooled": masked_mean(frames, mask)}

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Masked-mean pooled features ``[B, num_features]``."""
        return self.features(x, mask)["pooled"]


class AudioTCN1D(nnx.Module):
    """1-D temporal convolutions (kernel 5, dilations 1, 2, 4, ...) over mel vectors.

    ``features(x, mask)`` returns ``{"frames": [B, T, F], "frame_mask": [B, T],
    "pooled": [B, F]}``, ``F = num_features = widths[-1]``.
    """

    def __init__(self, n_mels: int = 40, widths: Sequence[int] = (128, 128, 128), *,
                 kernel_size: int = 5, rngs: nnx.Rngs):
        widths = tuple(int(w) for w in widths)
        if not widths or kernel_size % 2 != 1:
            raise ValueError(f"need >= 1 width and an odd kernel_size; got {widths}, "
                             f"{kernel_size}.")
        chans = (n_mels, *widths)
        convs = []
        for i in range(len(widths)):
            d = 2**i
            p = d * (kernel_size - 1) // 2
            convs.append(nnx.Conv(chans[i], chans[i + 1], (kernel_size,), padding=((p, p),),
                                  kernel_dilation=(d,), use_bias=False, rngs=rngs))
        self.convs = nnx.List(convs)
        self.bns = nnx.List([BatchNorm(w, rngs=rngs) for w in widths])
        self.n_mels = n_mels
        self.num_features = widths[-1]

    def features(self, x: jax.Array, mask: jax.Array | None = None) -> dict[str, jax.Array]:
        """See the class docstring. ``x`` ``[B, T, M]``, ``mask`` ``[B, T]`` or None."""
        mask = _mask_or_ones(x, mask)
        if x.ndim != 3 or x.shape[-1] != self.n_mels:
            raise ValueError(f"`x` must have shape [B, T, {self.n_mels}]; got {x.shape}.")
        h = _zero_padding(x, mask)
        for conv, bn in zip(self.convs, self.bns):
            h = _zero_padding(jax.nn.relu(_masked_bn(bn, conv(h), mask)), mask)
        return {"frames": h, "frame_mask": mask, "pooled": masked_mean(h, mask)}

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """Masked-mean pooled features ``[B, num_features]``."""
        return self.features(x, mask)["pooled"]


class AudioEncoder(nnx.Module):
    """Backbone -> :class:`MaskedPooling` -> linear -> L2 normalisation (+ classifier).

    ``encoder(x, mask)`` with ``x`` ``[B, T, M]``, ``mask`` ``[B, T]`` returns
    ``(embedding [B, E], aux)``; ``aux["features"]`` is the pooled ``[B, P]`` and
    ``aux["logits"]`` ``[B, C]`` when a classifier is present (it reads the embedding).
    """

    def __init__(self, backbone: nnx.Module, *, pooling: str = "attentive_stats",
                 embedding_dim: int = 128, l2_normalize: bool = True,
                 num_classes: int | None = None, classifier_normalized: bool = False,
                 rngs: nnx.Rngs):
        self.backbone = backbone
        self.pool = MaskedPooling(int(backbone.num_features), pooling, rngs=rngs)
        self.linear = nnx.Linear(self.pool.out_features, embedding_dim, rngs=rngs)
        self.normalize = l2_normalize
        self.embedding_dim = embedding_dim
        self.classifier = (
            Classifier(embedding_dim, int(num_classes), normalized=classifier_normalized,
                       rngs=rngs)
            if num_classes else None
        )

    def __call__(self, x: jax.Array, mask: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(embedding [B, E], aux)`` (see the class docstring)."""
        feats = self.backbone.features(x, mask)
        pooled = self.pool(feats["frames"], feats["frame_mask"])
        emb = self.linear(pooled)
        if self.normalize:
            emb = l2_normalize(emb)
        aux = {"features": pooled}
        if self.classifier is not None:
            aux["logits"] = self.classifier(emb)
        return emb, aux


_ENCODER_DEFAULTS: dict[str, Any] = {
    "n_mels": 40,
    "widths": None,
    "pooling": "attentive_stats",
    "embedding_dim": 128,
    "l2_normalize": True,
    "num_classes": None,
    "classifier_normalized": False,
}


def build_audio_encoder(config: Mapping[str, Any] | Any, *, rngs: nnx.Rngs) -> AudioEncoder:
    """An :class:`AudioEncoder` from a config (mapping or ``ConfigDict``).

    Keys (defaults in brackets): ``name`` (``"audio_cnn2d"`` or ``"audio_tcn1d"``, any
    backbone registered in :mod:`dml_jax.models.registry`), ``n_mels`` [40], ``widths``
    [the backbone's default], ``pooling`` ["attentive_stats"] or ``"mean"``,
    ``embedding_dim`` [128], ``l2_normalize`` [True], ``num_classes`` [None: no classifier],
    ``classifier_normalized`` [False].

    Raises:
      ValueError: unknown keys or backbone name.
    """
    from dml_jax.models.registry import create_backbone

    cfg = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    if "name" not in cfg:
        raise ValueError("audio encoder config needs a 'name' (e.g. 'audio_cnn2d').")
    name = cfg.pop("name")
    unknown = sorted(set(cfg) - set(_ENCODER_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown audio encoder config keys {unknown}; known: "
                         f"{sorted(_ENCODER_DEFAULTS)}.")
    c = {**_ENCODER_DEFAULTS, **cfg}
    kwargs: dict[str, Any] = {"n_mels": int(c["n_mels"])}
    if c["widths"]:
        kwargs["widths"] = tuple(c["widths"])
    backbone = create_backbone(name, rngs=rngs, **kwargs)
    return AudioEncoder(backbone, pooling=c["pooling"], embedding_dim=int(c["embedding_dim"]),
                        l2_normalize=bool(c["l2_normalize"]), num_classes=c["num_classes"],
                        classifier_normalized=bool(c["classifier_normalized"]), rngs=rngs)
