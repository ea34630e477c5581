"""The embedding model: backbone + embedding head (+ classifier, + multi-level heads)."""

from __future__ import annotations

import jax
from flax import nnx

from dml_jax.models.heads import Classifier, EmbeddingHead, MultiLevelHead


def last_feature_map(backbone: nnx.Module, feats: dict[str, jax.Array]) -> jax.Array | None:
    """The backbone's last spatial map ``[B, H, W, F]`` in ``feats``, or ``None`` if it has none.

    Uses ``backbone.last_stage`` when the backbone defines it, else the last 4-D entry of
    ``feats`` (``features()`` dicts are ordered from the input to the output).
    """
    name = getattr(backbone, "last_stage", None)
    if name is not None and name in feats:
        return feats[name]
    maps = [v for k, v in feats.items() if k != "pooled" and getattr(v, "ndim", 0) == 4]
    return maps[-1] if maps else None


class EmbeddingModel(nnx.Module):
    """A backbone followed by an :class:`EmbeddingHead` and optional heads.

    ``model(x)`` returns ``(embedding [B, E], aux)``; ``aux`` holds

    * ``"features"``: the backbone features pooled with the head's pooling, ``[B, F]``
      (equal to ``backbone(x)`` for ``pooling="avg"``);
    * ``"logits"``: ``[B, C]``, when a classifier is present. By default the classifier reads
      the (L2-normalised, if so configured) embedding (``classifier_input="embedding"``); with
      ``classifier_input="features"`` it reads ``aux["features"]`` instead;
    * ``"embedding/<stage>"``: ``[B, E_s]`` per level when a :class:`MultiLevelHead` is given;
      the main embedding is then the concatenation ``[B, sum E_s]`` (RLL-(L,M,H));
    * ``"stage/<name>"``: every stage map of ``backbone.features(x)`` when ``return_stages``.

    Backbones without a spatial map (ViTs) feed their pooled features to the head, which then
    only supports ``pooling="avg"`` (meaning: the backbone's own pooling).
    """

    def __init__(
        self,
        backbone: nnx.Module,
        head: EmbeddingHead | None,
        classifier: Classifier | None = None,
        *,
        multi_level_head: MultiLevelHead | None = None,
        classifier_input: str = "embedding",
        return_stages: bool = False,
    ):
        if classifier_input not in ("embedding", "features"):
            raise ValueError(
                f"classifier_input must be 'embedding' or 'features', got {classifier_input!r}."
            )
        if head is None and multi_level_head is None:
            raise ValueError("EmbeddingModel needs a head or a multi_level_head.")
        self.backbone = backbone
        self.head = head
        self.classifier = classifier
        self.multi_level_head = multi_level_head
        self.classifier_input = classifier_input
        self.return_stages = return_stages
        self.num_features = int(backbone.num_features)
        self.embedding_dim = (
            multi_level_head.embedding_dim if multi_level_head is not None else head.embedding_dim
        )

    def __call__(self, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``x`` ``[B, H, W, C]`` float32 -> ``(embedding [B, E], aux)`` (see the class doc)."""
        feats = self.backbone.features(x)
        fmap = last_feature_map(self.backbone, feats)
        pooling = self.head.pooling if self.head is not None else "avg"
        if fmap is None:
            if pooling != "avg":
                raise ValueError(
                    f"{type(self.backbone).__name__} has no spatial feature map; only "
                    f"pooling='avg' (its own pooled features) is supported, not {pooling!r}."
                )
            pooled = feats["pooled"]
        elif pooling == "avg":
            pooled = feats["pooled"]
        else:
            pooled = self.head.pool(fmap)
        aux: dict[str, jax.Array] = {"features": pooled}
        if self.multi_level_head is not None:
            emb, levels = self.multi_level_head(feats)
            aux.update({f"embedding/{k}": v for k, v in levels.items()})
        else:
            emb = self.head(pooled)
        if self.classifier is not None:
            src = emb if self.classifier_input == "embedding" else pooled
            aux["logits"] = self.classifier(src)
        if self.return_stages:
            aux.update({f"stage/{k}": v for k, v in feats.items() if k != "pooled"})
        return emb, aux
