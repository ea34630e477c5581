"""Input validation shared by the losses and evaluation: errors at trace time, naming shapes,
and the losses' non-finite guard (a non-finite valid input gives a non-finite loss)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from dml_jax import parallel


def check_embeddings_labels(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    where: jax.typing.ArrayLike | None = None,
    *,
    name: str = "embeddings",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Validates a batch; returns ``(embeddings f32 [B, D], labels int32 [B], where bool [B])``.

    Raises:
      ValueError: naming the argument and its shape when ``embeddings`` is not a floating
        ``[B, D]`` array, ``labels`` not an integer ``[B]`` array, or ``where`` not a ``[B]``
        boolean mask.
    """
    embeddings = jnp.asarray(embeddings)
    labels = jnp.asarray(labels)
    if embeddings.ndim != 2:
        raise ValueError(f"`{name}` must have shape [B, D]; got shape {embeddings.shape}.")
    if not jnp.issubdtype(embeddings.dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating array; got dtype {embeddings.dtype}.")
    if labels.ndim != 1:
        raise ValueError(f"`labels` must have shape [B]; got shape {labels.shape}.")
    if not (jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == jnp.bool_):
        raise ValueError(
            f"`labels` must be an integer array; got dtype {labels.dtype}. "
            "Cast class ids with labels.astype(jnp.int32)."
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"`labels` has shape {labels.shape} but `{name}` has shape {embeddings.shape}: "
            "their leading (batch) dimensions must match."
        )
    if where is None:
        mask = jnp.ones(labels.shape, jnp.bool_)
    else:
        mask = jnp.asarray(where)
        if mask.shape != labels.shape:
            raise ValueError(
                f"`where` must have shape {labels.shape} (one flag per row of `{name}`); "
                f"got shape {mask.shape}."
            )
        mask = mask.astype(jnp.bool_)
    return mask_rows(embeddings.astype(jnp.float32), mask), labels.astype(jnp.int32), mask


def mask_rows(x: jax.Array, where: jax.Array) -> jax.Array:
    """``x`` ``[B, ...]`` with the rows whose ``where`` ``[B]`` is False set to 0.

    A masked row then takes no part even when it holds NaN or inf (a ``0 * inf`` would
    otherwise reach the value or the gradient), and receives a zero gradient.
    """
    keep = where.reshape(where.shape + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jnp.zeros((), x.dtype))


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    """Raises ``ValueError`` if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")


def any_nonfinite(x: jax.typing.ArrayLike, where: jax.typing.ArrayLike | None = None) -> jax.Array:
    """Whether any entry of ``x`` ``[B, ...]`` in a row whose ``where`` ``[B]`` is True (every
    row when ``where`` is None) is NaN or inf; a bool scalar without gradient.

    Non-float ``x`` (labels, masks) is never non-finite. First the sum of the squared entries
    of the rows (``where`` False rows set to 0, float32): finite exactly when every entry is
    finite, unless a square overflows. Only when it is not finite does a ``lax.cond`` take the
    exact check of ``x`` in its own dtype (a float sum of ``x - x``, NaN exactly when an entry
    is NaN or inf; under ``vmap`` both run). The squares are the expression the losses' norms
    compute (:func:`mask_rows` of the float32 rows, then ``sum(x * x, axis=-1)``), which XLA
    computes once for both: the guard then adds no pass over ``x`` of its own.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros((), jnp.bool_)
    x = jax.lax.stop_gradient(x)
    if where is not None and x.ndim >= 1 and jnp.shape(where) == x.shape[:1]:
        where = jnp.asarray(where, jnp.bool_)
    else:
        where = None

    def masked(v):
        return v if where is None else mask_rows(v, where)

    rows = masked(x.astype(jnp.float32))
    squares = jnp.sum(rows * rows, axis=-1) if rows.ndim else rows * rows
    # A max, not a sum: XLA would merge two sums into one reduction of the squares, which
    # then could no longer be shared with the loss's norms.
    finite = jnp.isfinite(jnp.max(squares))
    # The first branch returns ``~finite`` (False there), not a constant: under shard_map both
    # branches must vary over the same mesh axes as ``x``.
    return jax.lax.cond(finite, lambda v, f: ~f, lambda v, f: _exact_nonfinite(masked(v)),
                        x, finite)


def _exact_nonfinite(x: jax.Array) -> jax.Array:
    """Whether any entry of ``x`` is NaN or inf: a float sum of ``x - x`` (0, or NaN where an
    entry is not finite; one vectorised reduction, where ``any(~isfinite(x))`` materialises a
    bool array first, twice the time on CPU)."""
    return jnp.isnan(jnp.sum(x - x))


def propagate_nonfinite(*, rows: tuple[str, ...] = ("embeddings",),
                        whole: tuple[str, ...] = (),
                        memories: tuple[str, ...] = ("memory",)) -> Callable[[Callable], Callable]:
    """Decorator: the loss returns NaN when a valid input is non-finite.

    Masks and ``where``-selects let a loss drop the terms of a NaN or inf row from its value
    while its gradient turns NaN: a training loop that checks the loss would then commit a
    NaN update unnoticed. Under this decorator the value is NaN as soon as any row of the
    arguments named in ``rows`` (per-row inputs: embeddings, logits) whose ``where`` is True,
    or any entry of the arguments named in ``whole`` (parameters: centers, proxies), is NaN or
    inf, or any valid row (``valid`` True) of a cross-batch memory passed as one of
    ``memories`` (an object with ``embeddings [M, D]`` and ``valid [M]``, e.g. an
    ``XBMState``; skipped when the function has no such argument or it is None). With
    ``axis_name`` the global batch decides: every device returns NaN when any device
    holds such a row. Rows with ``where`` False take no part; finite input is unchanged (the
    guard adds an exact 0, so values and gradients are bit-for-bit those of the loss).

    The decorated function must take its arrays by the given names and ``where`` /
    ``axis_name`` keywords; apply ``jax.jit`` on top of it.
    """

    def decorate(loss_fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
        signature = inspect.signature(loss_fn)

        @functools.wraps(loss_fn)
        def guarded(*args, **kwargs):
            value = loss_fn(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = bound.arguments
            where = arguments.get("where")
            bad = jnp.zeros((), jnp.bool_)
            for name in rows:
                if arguments.get(name) is not None:
                    bad = bad | any_nonfinite(arguments[name], where)
            for name in whole:
                if arguments.get(name) is not None:
                    bad = bad | any_nonfinite(arguments[name])
            for name in memories:
                memory = arguments.get(name)
                if memory is not None:
                    bad = bad | any_nonfinite(memory.embeddings, memory.valid)
            bad = parallel.global_any(bad, arguments.get("axis_name"))
            return value + jnp.where(bad, jnp.nan, 0.0).astype(value.dtype)

        return guarded

    return decorate
