"""Training objectives: a loss of :mod:`dml_jax.losses` chosen by name, with what it needs.

An objective is configured as data (``config.loss``)::

    name: str                    # a key of LOSSES
    kwargs: dict                 # the loss's hyper-parameters
    classifier_weight: float     # weight of the softmax cross-entropy on the model's logits
    memory_size: int             # optional: cross-batch memory slots (0 or absent: none)
    memory_start_step: int       # optional: first step that uses and fills the memory (0)

It says whether the model needs a classifier head (``needs_logits``), initialises the loss's
own parameters (trained with the model, e.g. learned class centers, proxies or classifier
weights) and state (updated by the loss, e.g. centers moved by ``update_centers``), and computes
``total = metric loss + classifier_weight * CE`` (losses that hold a cross-entropy of their
own, the DeMAL hybrid and the center-structured loss, get no second one).

**Cross-batch memory** (XBM, Wang et al. CVPR 2020; ``contrastive``, ``triplet``,
``multi_similarity`` and ``ranked_list``): with ``memory_size = M > 0`` the loss state holds an
:class:`~dml_jax.losses.XBMState` of ``M`` embeddings and a step counter. Before
``memory_start_step`` the loss is the plain one and nothing is enqueued (the paper's warm-up:
early embeddings drift too fast to be worth remembering); from that step on, the loss takes
``memory=`` and each batch is enqueued *after* its loss (so the memory holds past batches only;
the batch's own rows are already its columns). The counter counts the steps whose update was
committed (the train step keeps the old loss state on a non-finite step), and it lives in the
checkpointed loss state, so a resumed run continues bit-exactly.

Losses on anchor/positive pairs (``npair``, ``angular`` and the ``symmetric_*`` losses of
:mod:`dml_jax.synthesis`) need ``samples_per_class = 2``: the P x K sampler then lays the batch
out as consecutive pairs.
"""

from __future__ import annotations

from dml_jax import _extras

_extras.require("dml_jax.objectives", "train", "optax")

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from dml_jax import losses, synthesis

LossState = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """How the training loop calls one loss.

    Attributes:
      fn: ``fn(embeddings, labels, logits, params, state, **kwargs) -> (loss, new_state)``.
      needs_logits: the loss reads the classifier's logits (the model gets a classifier).
      has_ce: the loss already holds a classification cross-entropy.
      init_params: ``init_params(num_classes, embedding_dim, kwargs) -> LossState``: arrays
        trained with the model.
      init_state: ``init_state(num_classes, embedding_dim, kwargs) -> LossState``: arrays the
        loss updates itself.
    """

    fn: Callable[..., tuple[jax.Array, LossState]]
    needs_logits: bool = False
    has_ce: bool = False
    init_params: Callable[[int, int, Mapping[str, Any]], LossState] = lambda c, d, kw: {}
    init_state: Callable[[int, int, Mapping[str, Any]], LossState] = lambda c, d, kw: {}


def _plain(fn: Callable[..., jax.Array]) -> LossSpec:
    def call(e, y, logits, params, state, **kwargs):
        return fn(e, y, **kwargs), state

    return LossSpec(call)


def _with_logits(fn: Callable[..., jax.Array], *, has_ce: bool = False) -> LossSpec:
    def call(e, y, logits, params, state, **kwargs):
        return fn(e, y, logits, **kwargs), state

    return LossSpec(call, needs_logits=True, has_ce=has_ce)


def _zero_centers(num_classes: int, dim: int, kwargs: Mapping[str, Any]) -> LossState:
    return {"centers": jnp.zeros((num_classes, dim), jnp.float32)}


def _moved_centers(centers, e, y, alpha: float) -> LossState:
    """Wen et al.'s moving update of the centers from this batch (no gradient)."""
    return {"centers": losses.update_centers(centers, jax.lax.stop_gradient(e), y, alpha=alpha)}


def _center(e, y, logits, params, state, *, alpha: float = 0.5, **kwargs):
    """Wen et al.: center loss on the embeddings, centers moved by ``update_centers``."""
    centers = state["centers"]
    return losses.center_loss(e, y, centers, **kwargs), _moved_centers(centers, e, y, alpha)


def _center_structured(e, y, logits, params, state, *, learn_centers: bool = True,
                       alpha: float = 0.5, **kwargs):
    """Gong et al. (reconstruction): centers learned with the model, or moved (Wen et al.)."""
    if learn_centers:
        loss = losses.center_structured_loss(e, y, logits, params["centers"], **kwargs)
        return loss, state
    centers = state["centers"]
    loss = losses.center_structured_loss(e, y, logits, centers, learn_centers=False, **kwargs)
    return loss, _moved_centers(centers, e, y, alpha)


def _centers_if(learned: bool):
    def init(num_classes, dim, kwargs):
        wanted = bool(kwargs.get("learn_centers", True)) == learned
        return _zero_centers(num_classes, dim, kwargs) if wanted else {}

    return init


def _with_param(fn: Callable[..., jax.Array], key: str) -> Callable[..., Any]:
    """``fn(e, y, params[key], **kwargs)``: a loss on a learned parameter array."""

    def call(e, y, logits, params, state, **kwargs):
        return fn(e, y, params[key], **kwargs), state

    return call


# Learned class parameters start as pytorch-metric-learning's inits, drawn from a fixed key.
_INIT_KEY = 0


def _normal_params(key: str, std: Callable[[int], float]):
    """``{key: N(0, std(C)^2) [C, D]}``."""

    def init(num_classes, dim, kwargs):
        noise = jax.random.normal(jax.random.key(_INIT_KEY), (num_classes, dim), jnp.float32)
        return {key: std(num_classes) * noise}

    return init


def _soft_triple_centers(num_classes, dim, kwargs):
    """PML's ``kaiming_uniform_(a=sqrt(5))`` of ``fc [D, C*K]``: U(-1/sqrt(CK), 1/sqrt(CK))."""
    rows = num_classes * int(kwargs.get("centers_per_class", 10))
    bound = 1.0 / float(rows) ** 0.5
    centers = jax.random.uniform(
        jax.random.key(_INIT_KEY), (rows, dim), jnp.float32, -bound, bound
    )
    return {"centers": centers}


def _unit(num_classes: int) -> float:
    return 1.0


def _normal_param_loss(
    fn: Callable[..., jax.Array], key: str, std: Callable[[int], float]
) -> LossSpec:
    """A loss on one learned ``[C, D]`` array ``params[key]``, initialised N(0, std(C)^2)."""
    return LossSpec(_with_param(fn, key), init_params=_normal_params(key, std))


LOSSES: dict[str, LossSpec] = {
    "contrastive": _plain(losses.contrastive_loss),
    "triplet": _plain(losses.triplet_loss),
    "lifted_structure": _plain(losses.lifted_structure_loss),
    "multi_similarity": _plain(losses.multi_similarity_loss),
    "ranked_list": _plain(losses.ranked_list_loss),
    "npair": _plain(losses.npair_loss),
    "angular": _plain(losses.angular_loss),
    "symmetric_triplet": _plain(synthesis.symmetric_triplet_loss),
    "symmetric_lifted_structure": _plain(synthesis.symmetric_lifted_structure_loss),
    "symmetric_contrastive": _plain(synthesis.symmetric_contrastive_loss),
    "symmetric_multi_similarity": _plain(synthesis.symmetric_multi_similarity_loss),
    "symmetric_npair": _plain(synthesis.symmetric_npair_loss),
    "symmetric_angular": _plain(synthesis.symmetric_angular_loss),
    "osm_caa": _with_logits(losses.osm_caa_loss),
    "symmetric_osm_caa": _with_logits(synthesis.symmetric_osm_caa_loss),
    "demal_hybrid": _with_logits(losses.demal_hybrid_loss, has_ce=True),
    "center": LossSpec(_center, needs_logits=False, init_state=_zero_centers),
    "center_structured": LossSpec(
        _center_structured,
        needs_logits=True,
        has_ce=True,
        init_params=_centers_if(True),
        init_state=_centers_if(False),
    ),
    # Proxy / margin-softmax losses: their class parameters are trained with the model.
    # Proxy-Anchor: kaiming normal, fan_out = C; the others: standard normal (PML's inits).
    "proxy_anchor": _normal_param_loss(
        losses.proxy_anchor_loss, "proxies", lambda c: (2 / c) ** 0.5
    ),
    "proxy_nca": _normal_param_loss(losses.proxy_nca_loss, "proxies", _unit),
    "arcface": _normal_param_loss(losses.arcface_loss, "weights", _unit),
    "cosface": _normal_param_loss(losses.cosface_loss, "weights", _unit),
    "soft_triple": LossSpec(
        _with_param(losses.soft_triple_loss, "centers"), init_params=_soft_triple_centers
    ),
    "supcon": _plain(losses.supcon_loss),
    "circle": _plain(losses.circle_loss),
}


# Losses on anchor/positive pairs (rows 2k, 2k+1): the P x K batch needs K = 2.
PAIR_LAYOUT_LOSSES = ("npair", "angular", "symmetric_triplet", "symmetric_lifted_structure",
                      "symmetric_contrastive", "symmetric_multi_similarity", "symmetric_npair",
                      "symmetric_angular", "symmetric_osm_caa")

MEMORY_LOSSES = ("contrastive", "triplet", "multi_similarity", "ranked_list")
_MEMORY_KEYS = ("embeddings", "labels", "valid", "next")  # XBMState fields, as "xbm_<field>"


def memory_settings(loss_config: Mapping[str, Any]) -> tuple[int, int]:
    """``(memory_size, memory_start_step)`` of ``config.loss`` (``(0, 0)`` when absent).

    Raises:
      ValueError: a negative value, or a memory for a loss that does not take one.
    """
    size = int(loss_config.get("memory_size", 0) or 0)
    start = int(loss_config.get("memory_start_step", 0) or 0)
    if size < 0 or start < 0:
        raise ValueError(
            "config.loss.memory_size and config.loss.memory_start_step must be >= 0; got "
            f"{size} and {start}."
        )
    if size and loss_config["name"] not in MEMORY_LOSSES:
        raise ValueError(
            f"config.loss.memory_size={size} but the loss {loss_config['name']!r} takes no "
            f"cross-batch memory; use one of {', '.join(MEMORY_LOSSES)}, or memory_size=0."
        )
    return size, start


def _split_memory(state: LossState) -> tuple[losses.XBMState, jax.Array, LossState]:
    """The loss state's memory, its step counter, and the rest of the state."""
    memory = losses.XBMState(*(state[f"xbm_{k}"] for k in _MEMORY_KEYS))
    rest = {k: v for k, v in state.items() if not k.startswith("xbm_")}
    return memory, state["xbm_step"], rest


def _join_memory(rest: LossState, memory: losses.XBMState, step: jax.Array) -> LossState:
    return {**rest, **{f"xbm_{k}": v for k, v in zip(_MEMORY_KEYS, memory)}, "xbm_step": step}


def _compute_with_memory(spec, start, embeddings, labels, logits, params, state, kwargs):
    """``spec.fn`` with the loss state's memory from step ``start`` on; enqueues the batch."""
    memory, step, rest = _split_memory(state)
    on = step >= start

    def with_memory():
        return spec.fn(embeddings, labels, logits, params, rest, memory=memory, **kwargs)

    def without():
        return spec.fn(embeddings, labels, logits, params, rest, **kwargs)

    metric_loss, rest = jax.lax.cond(on, with_memory, without)
    updated = losses.xbm_update(memory, embeddings, labels)
    memory = jax.tree.map(lambda new, old: jnp.where(on, new, old), updated, memory)
    return metric_loss, _join_memory(rest, memory, step + 1)


def get_spec(name: str) -> LossSpec:
    """The :class:`LossSpec` of ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in LOSSES:
        raise ValueError(
            f"Unknown loss {name!r} in config.loss.name; known: {', '.join(sorted(LOSSES))}."
        )
    return LOSSES[name]


def init_loss_params(loss_config: Mapping[str, Any], num_classes: int, dim: int) -> LossState:
    """The loss's trainable parameters (empty for most losses)."""
    spec = get_spec(loss_config["name"])
    return spec.init_params(num_classes, dim, dict(loss_config.get("kwargs", {})))


def init_loss_state(loss_config: Mapping[str, Any], num_classes: int, dim: int) -> LossState:
    """The loss's own state (empty for most losses), with an empty cross-batch memory and a
    step counter 0 (``xbm_*`` entries) when ``memory_size > 0``.

    Raises:
      ValueError: see :func:`memory_settings`.
    """
    spec = get_spec(loss_config["name"])
    state = spec.init_state(num_classes, dim, dict(loss_config.get("kwargs", {})))
    size, _ = memory_settings(loss_config)
    if size:
        state = _join_memory(state, losses.xbm_init(size, dim), jnp.zeros((), jnp.int32))
    return state


def compute(
    loss_config: Mapping[str, Any],
    embeddings: jax.Array,
    labels: jax.Array,
    logits: jax.Array | None,
    params: LossState,
    state: LossState,
) -> tuple[jax.Array, dict[str, jax.Array], LossState]:
    """Total training loss, its parts, and the new loss state.

    Args:
      loss_config: ``config.loss`` (see the module docstring).
      embeddings: ``[B, E]`` from the model.
      labels: int ``[B]``.
      logits: ``[B, C]`` from the model's classifier, or None.
      params: the loss's trainable parameters.
      state: the loss's state (with the cross-batch memory when ``memory_size > 0``).

    Returns:
      ``(total, {"metric_loss", "ce_loss", "accuracy"?}, new_state)``.
    """
    spec = get_spec(loss_config["name"])
    kwargs = dict(loss_config.get("kwargs", {}))
    size, start = memory_settings(loss_config)
    if size:
        metric_loss, new_state = _compute_with_memory(
            spec, start, embeddings, labels, logits, params, state, kwargs
        )
    else:
        metric_loss, new_state = spec.fn(embeddings, labels, logits, params, state, **kwargs)
    parts = {"metric_loss": metric_loss}
    total = metric_loss
    weight = float(loss_config.get("classifier_weight", 0.0))
    if logits is not None and weight > 0 and not spec.has_ce:
        ce = optax.losses.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels
        ).mean()
        parts["ce_loss"] = ce
        parts["accuracy"] = jnp.mean(jnp.argmax(logits, axis=-1) == labels)
        total = total + weight * ce
    return total, parts, new_state
