"""Checkpoints: orbax's ``CheckpointManager`` behind one small interface.

A run's checkpoints live in ``<workdir>/checkpoints/<step>``; the config that made them is kept
beside them in ``<workdir>/config.json`` so a different configuration is refused instead of
silently resuming from weights it did not make.
"""

from __future__ import annotations

from dml_jax import _extras

_extras.require("dml_jax.checkpoint", "train", "orbax")

import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp


class ConfigMismatchError(ValueError):
    """The workdir holds checkpoints of another configuration."""


def check_workdir_config(
    workdir: str, config: Mapping[str, Any], *, may_change: Iterable[str] = (), write: bool = True
) -> None:
    """Records ``config`` in ``workdir/config.json``, or checks it against the recorded one.

    Args:
      workdir: the run's directory.
      config: the configuration as a JSON-able mapping.
      may_change: top-level keys allowed to differ on resume (e.g. ``num_steps``).
      write: record ``config`` (one process of a multi-host run does; the file is replaced
        atomically, so the others never read half of it).

    Raises:
      ConfigMismatchError: naming each differing key with its old and new value.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    current = json.loads(json.dumps(dict(config), sort_keys=True, default=str))
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        skip = set(may_change)
        keys = (set(saved) | set(current)) - skip
        diffs = [k for k in sorted(keys) if saved.get(k) != current.get(k)]
        if diffs:
            lines = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in diffs)
            raise ConfigMismatchError(
                f"{workdir!r} holds checkpoints of a different configuration ({lines}). "
                "Use another --workdir, or delete this one to start afresh."
            )
    if write:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(current, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


class Checkpointer:
    """Saves and restores a pytree of arrays by step, keeping the last ``max_to_keep``, or,
    with ``best_metric``, the ``max_to_keep`` best by that metric.

    Args:
      directory: where the step folders go.
      max_to_keep: how many checkpoints to keep (oldest, or worst, removed first).
      best_metric: keep the best checkpoints by this metric (passed to :meth:`save` as
        ``metrics``) instead of the latest; orbax records the metrics with each step, so the
        ranking survives a restart.
      best_mode: ``"max"`` (default) or ``"min"``.
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, best_metric: str | None = None,
                 best_mode: str = "max"):
        self.directory = os.path.abspath(directory)
        self.best_metric = best_metric
        if best_mode not in ("max", "min"):
            raise ValueError(f"`best_mode` must be 'max' or 'min'; got {best_mode!r}.")
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        if best_metric:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, best_mode=best_mode,
                best_fn=lambda metrics: float(metrics[best_metric]),
                keep_checkpoints_without_metrics=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest saved step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, ascending."""
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, *, force: bool = False,
             metrics: Mapping[str, float] | None = None) -> None:
        """Saves ``state`` under ``step`` (asynchronously; see :meth:`wait`).

        Raises:
          ValueError: ``best_metric`` is set but missing from ``metrics`` (naming the keys),
            or is not a finite number (a NaN is never "best").
        """
        if self.best_metric:
            if metrics is None or self.best_metric not in metrics:
                raise ValueError(
                    f"best_metric {self.best_metric!r} is not among the evaluation's metrics "
                    f"{sorted(metrics or {})}: set config.best_metric to one of them.")
            value = float(metrics[self.best_metric])
            if not math.isfinite(value):
                return
            metrics = {self.best_metric: value}
        self._manager.save(step, args=ocp.args.StandardSave(state), force=force,
                           metrics=None if metrics is None else dict(metrics))

    def restore(self, step: int, like: Any) -> Any:
        """Restores step ``step`` into the structure, dtypes and shardings of ``like``."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
