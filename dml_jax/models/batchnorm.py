"""Freezing BatchNorm, the standard deep-metric-learning fine-tuning protocol.

:func:`freeze_batchnorm` works on any NNX module tree and on every ``nnx.BatchNorm`` in it
(including subclasses such as :class:`dml_jax.models.layers.BatchNorm`):

* each BatchNorm always normalises with its running statistics, even after ``model.train()``
  or ``nnx.view(model, use_running_average=False)``, so the statistics never change;
* its ``scale`` and ``bias`` are re-typed from ``nnx.Param`` to :class:`FrozenParam`, a
  variable type that is *not* an ``nnx.Param``: ``nnx.grad``/``nnx.value_and_grad`` (which
  differentiate ``nnx.Param`` by default) give them no gradient, and
  ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` (or ``wrt=trainable_filter()``) does not update
  them. Freeze *before* creating the optimizer.
"""

from __future__ import annotations

from typing import Any

from flax import nnx


class FrozenParam(nnx.Variable):
    """A parameter excluded from training (frozen BatchNorm scale and bias)."""


_FROZEN_CLASSES: dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    """A subclass of the BatchNorm class ``cls`` that always uses running statistics."""
    if getattr(cls, "_dml_frozen_bn", False):
        return cls
    if cls not in _FROZEN_CLASSES:
        base_call = cls.__call__

        def __call__(self, x, use_running_average=None, **kwargs):
            del use_running_average
            return base_call(self, x, True, **kwargs)

        def set_view(self, use_running_average=None):
            """Ignores view requests: a frozen BatchNorm stays in running-average mode."""
            del use_running_average

        # Built with the metaclass of ``cls`` and no new instance layout, so that an existing
        # BatchNorm object can be switched to it with ``__class__`` assignment.
        _FROZEN_CLASSES[cls] = type(cls)(
            f"Frozen{cls.__name__}",
            (cls,),
            {
                "__call__": __call__,
                "set_view": set_view,
                "_dml_frozen_bn": True,
                "__module__": __name__,
                "__doc__": f"Frozen version of {cls.__qualname__} (running statistics only).",
            },
        )
    return _FROZEN_CLASSES[cls]


def is_frozen(bn: nnx.Module) -> bool:
    """Whether ``bn`` is a BatchNorm frozen by :func:`freeze_batchnorm`."""
    return bool(getattr(type(bn), "_dml_frozen_bn", False))


def freeze_batchnorm(module: Any) -> Any:
    """Freezes every ``nnx.BatchNorm`` inside ``module`` in place and returns ``module``.

    After this, the BatchNorm layers use their running statistics permanently (also under
    ``.train()``) and their scale/bias are :class:`FrozenParam` variables, which gradients and
    ``nnx.Optimizer(..., wrt=nnx.Param)`` skip. Other layers (Dropout, ...) are unaffected.
    Idempotent. ``module`` may be a single BatchNorm or any module/graph containing some.
    """
    for _, node in nnx.iter_graph(module):
        if isinstance(node, nnx.BatchNorm) and not is_frozen(node):
            object.__setattr__(node, "__class__", _frozen_class(type(node)))
            node.use_running_average = True
            for name in ("scale", "bias"):
                var = getattr(node, name, None)
                if isinstance(var, nnx.Param):
                    setattr(node, name, FrozenParam(var[...]))
    return module


def trainable_filter() -> nnx.filterlib.Filter:
    """The ``wrt`` filter for optimizers and gradients: trainable parameters only.

    Frozen BatchNorm parameters are :class:`FrozenParam`, not ``nnx.Param``, so this is
    ``nnx.Param``; use it as ``nnx.Optimizer(model, tx, wrt=trainable_filter())`` and
    ``nnx.grad(loss_fn, argnums=nnx.DiffState(0, trainable_filter()))``.
    """
    return nnx.Param
