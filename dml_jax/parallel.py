"""What the losses' ``axis_name`` contract needs: gathers and exact global sums.

Inside ``jax.shard_map`` (or ``jax.pmap``) over ``axis_name``, each device holds its local rows
``[b, D]`` of a global batch ``[B, D]`` (``B = b * n_devices``, shards concatenated in device
order). A loss then

1. gathers the global batch with :func:`all_gather_rows` (the columns of its pair matrix),
2. computes the terms of its *local* rows against every global column,
3. reduces them with :func:`global_sum` and divides by a :func:`global_count`.

The value is the global-batch loss on every device, and ``jax.grad`` taken inside gives each
device exactly its rows of the single-device gradient: the gradient reaching a row through the
gathered columns of every other device is summed back by the transpose of ``all_gather``.

A plain ``psum`` is not enough: its transpose is exact only under ``shard_map`` with
``check_vma=True`` (the default), where JAX tracks which values vary over the axis. Under
``pmap`` and ``check_vma=False`` it is again a ``psum``, and the gradient comes out
``n_devices`` times too large (the world-size bug users report of other libraries).
:func:`global_sum` picks the form that is exact in each case.

With ``axis_name=None`` every function is the identity (single device, or plain ``jax.jit`` on a
sharded batch, where XLA partitions the global computation itself).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _is_tracked(x: jax.Array, axis_name: str) -> bool:
    """Whether JAX's varying-manual-axes typing tracks ``axis_name`` for ``x``."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # jax 0.7-0.9 spelling
    if vma is None:
        mat = getattr(aval, "mat", None)  # jax >= 0.10: manual-axis type
        vma = getattr(mat, "varying", frozenset())
    return axis_name in vma


def all_gather_rows(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Concatenates each device's ``[b, ...]`` block into the global ``[B, ...]`` array."""
    if axis_name is None:
        return x
    return jax.lax.all_gather(x, axis_name, tiled=True)


def row_offset(num_local_rows: int, axis_name: str | None) -> jax.Array:
    """Global index of this device's first row (0 without ``axis_name``)."""
    if axis_name is None:
        return jnp.asarray(0, jnp.int32)
    return (jax.lax.axis_index(axis_name) * num_local_rows).astype(jnp.int32)


def global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Sum of ``x`` over devices, whose gradient is exact under ``shard_map`` and ``pmap``.

    Under ``shard_map(check_vma=True)`` this is ``psum`` (the result is then typed as replicated,
    so it can be returned with ``out_specs=P()``). Elsewhere it is
    ``x + stop_gradient(psum(x) - x)``: the same value, and the gradient flows to this device's
    own term only, the other devices' terms reaching it through the transpose of the gathers.
    """
    if axis_name is None:
        return x
    if _is_tracked(x, axis_name):
        return jax.lax.psum(x, axis_name)
    return x + jax.lax.stop_gradient(jax.lax.psum(x, axis_name) - x)


def global_count(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Sum over devices of a count (no gradient)."""
    x = jax.lax.stop_gradient(x)
    if axis_name is None:
        return x
    return jax.lax.psum(x, axis_name)


def global_max(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Max over devices (no gradient)."""
    x = jax.lax.stop_gradient(x)
    if axis_name is None:
        return x
    return jax.lax.pmax(x, axis_name)


def global_any(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Logical or over devices of a bool (no gradient)."""
    if axis_name is None:
        return x
    return jax.lax.pmax(x.astype(jnp.int32), axis_name) > 0


def as_replicated(x: jax.Array, axis_name: str | None) -> jax.Array:
    """``x``, equal on every device, typed as replicated over ``axis_name``.

    Under ``shard_map(check_vma=True)`` a value computed from gathered rows is typed as varying
    even when every device holds the same one, and cannot be returned with ``out_specs=P()``;
    its ``pmax`` over identical copies is the same value, typed replicated (one all-reduce of
    ``x``; no gradient). Elsewhere (no ``axis_name``, ``pmap``, ``check_vma=False``) ``x`` is
    returned as is.
    """
    if axis_name is None or not _is_tracked(x, axis_name):
        return x
    if x.dtype == jnp.bool_:
        return jax.lax.pmax(x.astype(jnp.int32), axis_name) > 0
    return jax.lax.pmax(jax.lax.stop_gradient(x), axis_name)
