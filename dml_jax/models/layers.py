"""Building blocks shared by the model zoo: torch-compatible BatchNorm, convolutions, pooling.

All tensors are NHWC (``[B, H, W, C]``); all BatchNorm layers are :class:`BatchNorm`, a
subclass of :class:`flax.nnx.BatchNorm` whose defaults and running-variance update match
``torch.nn.BatchNorm2d`` (so converted models behave like the torch originals in training too).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

#: flax momentum 0.9 == torch momentum 0.1 (flax keeps ``momentum`` of the old statistic).
TORCH_BN_MOMENTUM = 0.9
TORCH_BN_EPSILON = 1e-5

POOLINGS = ("avg", "max", "avgmax")


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` with torch's defaults and torch's running-variance update.

    Differences from plain ``nnx.BatchNorm``: ``momentum=0.9`` and ``epsilon=1e-5`` by default
    (torch's ``momentum=0.1, eps=1e-5``), exact (two-pass) variance, and, when
    ``unbiased_running_var`` is true (default), the running variance is updated with the
    *unbiased* batch variance ``var * n / (n - 1)`` (``n`` = elements per channel), as torch
    does; the batch itself is still normalised with the biased variance, as in both libraries.
    It is an ``nnx.BatchNorm``, so ``model.train()/eval()``, ``nnx.view`` and
    :func:`dml_jax.models.freeze_batchnorm` treat it like any other.

    Shapes: ``x`` ``[..., num_features]`` -> same shape.
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = TORCH_BN_MOMENTUM,
        epsilon: float = TORCH_BN_EPSILON,
        unbiased_running_var: bool = True,
        rngs: nnx.Rngs,
        **kwargs,
    ):
        kwargs.setdefault("use_fast_variance", False)
        super().__init__(num_features, momentum=momentum, epsilon=epsilon, rngs=rngs, **kwargs)
        self.unbiased_running_var = unbiased_running_var

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        """Normalises ``x``; in training mode also updates the running statistics."""
        use_ra = self.use_running_average if use_running_average is None else use_running_average
        if use_ra or not self.unbiased_running_var or mask is not None:
            return super().__call__(x, use_running_average, mask=mask)
        old_var = self.var[...]
        y = super().__call__(x, use_running_average, mask=mask)
        n = 1
        for i in range(x.ndim - 1):
            n *= x.shape[i]
        if n > 1:
            m = self.momentum
            # super() stored m*old + (1-m)*v; rescale the (1-m)*v part to (1-m)*v*n/(n-1).
            self.var[...] = m * old_var + (self.var[...] - m * old_var) * (n / (n - 1))
        return y


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int,
    *,
    stride: int = 1,
    padding: int | None = None,
    use_bias: bool = False,
    groups: int = 1,
    kernel_init: nnx.Initializer | None = None,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """A 2-D convolution with torch-style symmetric integer padding (default ``k // 2``).

    Shapes: ``[B, H, W, in_features]`` -> ``[B, H', W', out_features]``; kernel
    ``[k, k, in_features // groups, out_features]`` (torch's ``[O, I, k, k]`` transposed).
    Initialised like torch (Kaiming normal, fan-out) for ReLU networks unless ``kernel_init``
    is given.
    """
    pad = kernel_size // 2 if padding is None else padding
    if kernel_init is None:
        kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
    return nnx.Conv(
        in_features,
        out_features,
        (kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        feature_group_count=groups,
        kernel_init=kernel_init,
        rngs=rngs,
    )


class ConvBNReLU(nnx.Module):
    """Conv -> :class:`BatchNorm` -> ReLU, the unit of the Inception backbones.

    Attributes ``conv`` and ``bn`` hold what torch stores as the unit's convolution and
    BatchNorm (the running variance updated like torch's, see :class:`BatchNorm`).

    Shapes: ``[B, H, W, in_features]`` -> ``[B, H', W', out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        use_bias: bool = False,
        epsilon: float = TORCH_BN_EPSILON,
        bn_momentum: float = TORCH_BN_MOMENTUM,
        kernel_init: nnx.Initializer | None = None,
        rngs: nnx.Rngs,
    ):
        self.conv = conv(
            in_features,
            out_features,
            kernel_size,
            stride=stride,
            padding=padding,
            use_bias=use_bias,
            kernel_init=kernel_init,
            rngs=rngs,
        )
        self.bn = BatchNorm(out_features, momentum=bn_momentum, epsilon=epsilon, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in] -> [B, H', W', out]``."""
        return nnx.relu(self.bn(self.conv(x)))


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """Max pooling like ``torch.nn.MaxPool2d(window, stride, padding)`` (pads with -inf).

    Shapes: ``[B, H, W, C]`` -> ``[B, H', W', C]``.
    """
    return nnx.max_pool(
        x, (window, window), strides=(stride, stride), padding=((padding, padding),) * 2
    )


def global_pool(x: jax.Array, mode: str = "avg") -> jax.Array:
    """Global spatial pooling of an NHWC map.

    ``mode``: ``"avg"`` (mean), ``"max"``, or ``"avgmax"`` (the *sum* of mean and max, so the
    feature size stays ``C``). Shapes: ``[B, H, W, C]`` -> ``[B, C]``; a ``[B, C]`` input is
    returned unchanged.
    """
    if mode not in POOLINGS:
        raise ValueError(f"Unknown pooling {mode!r}; expected one of {POOLINGS}.")
    if x.ndim == 2:
        return x
    axes = tuple(range(1, x.ndim - 1))
    if mode == "avg":
        return jnp.mean(x, axis=axes)
    if mode == "max":
        return jnp.max(x, axis=axes)
    return jnp.mean(x, axis=axes) + jnp.max(x, axis=axes)


def count_params(module: nnx.Module, exclude: Sequence[str] = ()) -> int:
    """Number of scalars in the module's trainable-type (``nnx.Param``) variables.

    Frozen BatchNorm scale/bias (see :func:`~dml_jax.models.freeze_batchnorm`) are counted too;
    BatchNorm running statistics are not (as torch's ``parameters()``). Works on abstract
    modules from ``nnx.eval_shape``. Path components in ``exclude`` are skipped.
    """
    from dml_jax.models.batchnorm import FrozenParam

    state = nnx.state(module, nnx.Any(nnx.Param, FrozenParam))
    total = 0
    for path, leaf in nnx.to_flat_state(state):
        if any(str(p) in exclude for p in path):
            continue
        size = 1
        for d in leaf.shape if hasattr(leaf, "shape") else leaf.value.shape:
            size *= int(d)
        total += size
    return total
