"""Training objectives: a loss of :mod:`dml_jax.losses` chosen by name, with what it needs.

An objective is configured as data (``config.loss``)::

    name: str                    # a key of LOSSES
    kwargs: dict                 # the loss's hyper-parameters
    classifier_weight: float     # weight of the softmax cross-entropy on the model's logits

It says whether the model needs a classifier head (``needs_logits``), initialises the loss's
own state (e.g. class centers) and computes ``total = metric loss + classifier_weight * CE``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dml_jax import losses

LossState = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How the training loop calls one loss.

    Attributes:
      fn: ``fn(embeddings, labels, logits, state, **kwargs) -> (loss, new_state)``.
      needs_logits: the loss reads the classifier's logits (the model gets a classifier).
      init_state: ``init_state(num_classes, embedding_dim, kwargs) -> LossState``.
    """

    fn: Callable[..., tuple[jax.Array, LossState]]
    needs_logits: bool = False
    init_state: Callable[[int, int, Mapping[str, Any]], LossState] = lambda c, d, kw: {}


def _plain(name: str) -> LossSpec:
    def fn(e, y, logits, state, **kwargs):
        return getattr(losses, name)(e, y, **kwargs), state

    return LossSpec(fn)


def _osm_caa(e, y, logits, state, **kwargs):
    return losses.osm_caa_loss(e, y, logits, **kwargs), state


def _center(e, y, logits, state, *, alpha: float = 0.5, **kwargs):
    """Wen et al.: center loss on the embeddings, centers moved by ``update_centers``."""
    centers = state["centers"]
    loss = losses.center_loss(e, y, centers, **kwargs)
    new_centers = losses.update_centers(centers, jax.lax.stop_gradient(e), y, alpha=alpha)
    return loss, {"centers": new_centers}


def _zero_centers(num_classes: int, dim: int, kwargs: Mapping[str, Any]) -> LossState:
    return {"centers": jnp.zeros((num_classes, dim), jnp.float32)}


LOSSES: dict[str, LossSpec] = {
    "contrastive": _plain("contrastive_loss"),
    "triplet": _plain("triplet_loss"),
    "lifted_structure": _plain("lifted_structure_loss"),
    "multi_similarity": _plain("multi_similarity_loss"),
    "ranked_list": _plain("ranked_list_loss"),
    "osm_caa": LossSpec(_osm_caa, needs_logits=True),
    "center": LossSpec(_center, needs_logits=True, init_state=_zero_centers),
}


def get_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` of ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in LOSSES:
        raise ValueError(
            f"Unknown loss {name!r} in config.loss.name; known: {', '.join(sorted(LOSSES))}."
        )
    return LOSSES[name]


def init_loss_state(loss_config: Mapping[str, Any], num_classes: int, dim: int) -> LossState:
    """The loss's own state (empty for most losses)."""
    spec = get_spec(loss_config["name"])
    return spec.init_state(num_classes, dim, dict(loss_config.get("kwargs", {})))


def compute(
    loss_config: Mapping[str, Any],
    embeddings: jax.Array,
    labels: jax.Array,
    logits: jax.Array | None,
    state: LossState,
) -> tuple[jax.Array, dict[str, jax.Array], LossState]:
    """Total training loss, its parts, and the new loss state.

    Args:
      loss_config: ``config.loss`` (see the module docstring).
      embeddings: ``[B, E]`` from the model.
      labels: int ``[B]``.
      logits: ``[B, C]`` from the model's classifier, or None.
      state: the loss's state.

    Returns:
      ``(total, {"metric_loss", "ce_loss", "accuracy"?}, new_state)``.
    """
    spec = get_spec(loss_config["name"])
    kwargs = dict(loss_config.get("kwargs", {}))
    metric_loss, new_state = spec.fn(embeddings, labels, logits, state, **kwargs)
    parts = {"metric_loss": metric_loss}
    total = metric_loss
    weight = float(loss_config.get("classifier_weight", 0.0))
    if logits is not None and weight > 0:
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels
        ).mean()
        parts["ce_loss"] = ce
        parts["accuracy"] = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        total = total + weight * ce
    return total, parts, new_state
