"""Input validation shared by the losses and evaluation: errors at trace time, naming shapes."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
    return embeddings.astype(jnp.float32), labels.astype(jnp.int32), mask


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    """Raises ``ValueError`` if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}; got {value!r}.")
