"""Optimizers of the training loop, built from ``config.optimizer`` (data only).

::

    name: "adamw" | "adam" | "sgd"        learning_rate: float     weight_decay: float
    momentum: float (sgd, 0.9)             nesterov: bool (sgd, False)
    schedule: "cosine" | "multistep" | "constant"
    warmup_steps: int                      linear warm-up from 0 (every schedule)
    final_lr_fraction: float               cosine: the last learning rate / learning_rate
    milestones: tuple[int, ...]            multistep: steps at which the rate is multiplied by
    milestone_fractions: tuple[float, ...]   gamma (or the same as fractions of num_steps)
    gamma: float                           multistep factor (0.1)
    grad_clip_norm: float                  0 = no clipping (global norm over every group)
    lr_mult: {"backbone", "head", "loss"}  per-group learning-rate multipliers (1.0)
    weight_decay_mult: {...}               per-group weight-decay multipliers (1.0)

Parameter groups follow the train state's parameter tree (``{"model": ..., "loss": ...}``):
``"backbone"`` = ``params["model"]["backbone"]`` (the pretrained network), ``"head"`` = the
rest of the model (embedding head, classifier, attention blocks outside the backbone),
``"loss"`` = the loss's own parameters (proxies, learned centers). The papers' "10x on new
layers" is ``lr_mult = {"head": 10.0}``; a frozen group is ``lr_mult = {"backbone": 0.0}``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

GROUPS = ("backbone", "head", "loss")
_DEFAULTS = {
    "name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.0, "momentum": 0.9,
    "nesterov": False, "schedule": "cosine", "warmup_steps": 0, "final_lr_fraction": 0.0,
    "milestones": (), "milestone_fractions": (), "gamma": 0.1, "grad_clip_norm": 0.0,
    "lr_mult": {}, "weight_decay_mult": {},
}


def _key_name(key: Any) -> Any:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return key


def param_group(path: tuple[Any, ...]) -> str:
    """The group (``"backbone"``, ``"head"`` or ``"loss"``) of a parameter at ``path``."""
    names = [_key_name(k) for k in path]
    if names and names[0] == "loss":
        return "loss"
    if len(names) > 1 and names[0] == "model" and names[1] == "backbone":
        return "backbone"
    return "head"


def param_groups(params: Any) -> Any:
    """The tree of group names of ``params`` (same structure)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


def schedule(opt: Mapping[str, Any], num_steps: int) -> optax.Schedule:
    """The learning-rate schedule of ``opt`` over ``num_steps`` steps (multiplier 1)."""
    lr = float(opt["learning_rate"])
    warmup = min(int(opt["warmup_steps"]), max(num_steps - 1, 0))
    kind = opt["schedule"]
    if kind == "cosine":
        if warmup == 0:
            return optax.cosine_decay_schedule(lr, max(num_steps, 1),
                                               alpha=float(opt["final_lr_fraction"]))
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, warmup, max(num_steps, warmup + 1),
            end_value=lr * float(opt["final_lr_fraction"]))
    if kind == "multistep":
        steps = [int(s) for s in opt["milestones"]]
        steps += [round(f * num_steps) for f in opt["milestone_fractions"]]
        main = optax.piecewise_constant_schedule(
            lr, {s - warmup: float(opt["gamma"]) for s in sorted(steps) if s > warmup})
    elif kind == "constant":
        main = optax.constant_schedule(lr)
    else:
        raise ValueError(
            f"config.optimizer.schedule must be 'cosine', 'multistep' or 'constant'; got {kind!r}.")
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def _base(opt: Mapping[str, Any], lr: optax.Schedule, weight_decay: float):
    name = opt["name"]
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    if name == "adam":
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay),
                           optax.sgd(lr, momentum=float(opt["momentum"]) or None,
                                     nesterov=bool(opt["nesterov"])))
    raise ValueError(f"Unknown optimizer {name!r}; known: 'adamw', 'adam', 'sgd'.")


def _check_groups(mults: Mapping[str, float], key: str) -> None:
    unknown = sorted(set(mults) - set(GROUPS))
    if unknown:
        raise ValueError(
            f"config.optimizer.{key} has unknown groups {unknown}; known: {list(GROUPS)}.")


def make_optimizer(opt_config: Mapping[str, Any], num_steps: int) -> optax.GradientTransformation:
    """The optimizer of ``config.optimizer`` (see the module docstring) for ``num_steps``.

    One optimizer per parameter group (``optax.multi_transform``), each with the group's
    learning-rate and weight-decay multipliers; a group with multiplier 0 is frozen (its
    updates are exactly 0).

    Raises:
      ValueError: an unknown optimizer, schedule, group or key.
    """
    opt = dict(opt_config)
    unknown = sorted(set(opt) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"Unknown config.optimizer keys {unknown}; known: {sorted(_DEFAULTS)}.")
    opt = {**_DEFAULTS, **opt}
    lr_mult, wd_mult = dict(opt["lr_mult"] or {}), dict(opt["weight_decay_mult"] or {})
    _check_groups(lr_mult, "lr_mult")
    _check_groups(wd_mult, "weight_decay_mult")
    base = schedule(opt, num_steps)
    transforms = {}
    for group in GROUPS:
        mult = float(lr_mult.get(group, 1.0))
        if mult == 0.0:
            transforms[group] = optax.set_to_zero()
            continue
        lr = (lambda count, mult=mult: mult * base(count)) if mult != 1.0 else base
        transforms[group] = _base(opt, lr, float(opt["weight_decay"]) *
                                  float(wd_mult.get(group, 1.0)))
    tx = optax.multi_transform(transforms, param_groups)
    if float(opt["grad_clip_norm"]) > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(opt["grad_clip_norm"])), tx)
    return tx
