"""N-pair loss (Sohn, NeurIPS 2016) and angular loss (Wang, Zhou, Wen, Liu & Lin, ICCV 2017)
on a batch of anchor/positive pairs (the pair layout of :mod:`dml_jax.losses._pairs`, shared
with the symmetrical-synthesis variants of :mod:`dml_jax.losses.symmetric`).

Pair layout: rows ``2k`` (anchor ``a_k``) and ``2k + 1`` (positive ``p_k``) form pair ``k``, of
class ``labels[2k]`` (``labels[2k + 1]`` must equal it). ``where`` drops a pair unless both its
rows are True. Under ``axis_name`` each device's shard must hold whole pairs (an even number of
rows).
"""

from __future__ import annotations

import functools

import jax

from dml_jax import _checks
from dml_jax.losses._pairs import (
    angular_logits,
    l2_regulariser,
    pair_layout,
    softmax_cross_entropy,
)


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite()
def npair_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    l2_reg: float = 0.002,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Multi-class N-pair loss with its L2 embedding regulariser, on anchor/positive pairs.

    .. math::
       L = \frac1N \sum_i \mathrm{CE}\big(\mathrm{softmax}_j(a_i^\top p_j), t_{ij}\big)
         + \frac{\lambda_{reg}}4 \Big(\frac1N\sum_i \|a_i\|^2 + \frac1N\sum_i \|p_i\|^2\Big)

    with ``t_ij = 1[y_i = y_j] / #{j: y_j = y_i}`` (TensorFlow's ``npairs_loss``, used by the
    Symmetrical Synthesis code; with one pair per class this is Sohn's ``log(1 + sum_{j != i}
    exp(a_i.p_j - a_i.p_i))``). Dot products of un-normalised embeddings, as in the paper.

    Args:
      embeddings: float ``[B, D]`` in the pair layout (rows ``2k``, ``2k + 1`` = anchor,
        positive of pair ``k``; ``B`` even).
      labels: int ``[B]``; ``labels[2k]`` is pair ``k``'s class.
      l2_reg: ``lambda_reg``. Default 0.002 (Sohn 2016 / ``npairs_loss``).
      where: optional bool ``[B]``; a pair takes part only if both its rows are True.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device.

    References:
      Sohn, "Improved Deep Metric Learning with Multi-class N-pair Loss Objective", NeurIPS 2016.
    """
    layout = pair_layout(embeddings, labels, where, axis_name)
    ce = softmax_cross_entropy(layout.ap, layout, axis_name)
    return ce + l2_reg * l2_regulariser(layout, axis_name)


@functools.partial(jax.jit, static_argnames=("degree", "axis_name"))
@_checks.propagate_nonfinite()
def angular_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    degree: float = 45.0,
    l2_reg: float = 0.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Angular loss in its N-pair form, on anchor/positive pairs.

    .. math::
       z_{ii} = 2 (1 + \tan^2\alpha)\, a_i^\top p_i,\quad
       z_{ij} = 4 \tan^2\alpha\, (a_i + p_i)^\top p_j\ (j \ne i),\quad
       L = \frac1N\sum_i \mathrm{CE}(\mathrm{softmax}_j z_{ij}, t_{ij})
         + \frac{\lambda_{reg}}4 \Big(\frac1N\sum\|a\|^2 + \frac1N\sum\|p\|^2\Big)

    With one pair per class this is Wang et al.'s
    ``log(1 + sum_{j != i} exp(4 tan^2 (a_i + p_i).p_j - 2 (1 + tan^2) a_i.p_i))``. Targets
    ``t`` as in :func:`npair_loss`; "diagonal" means the own pair, as in the official
    Symmetrical Synthesis code this follows.

    Args:
      embeddings: float ``[B, D]`` in the pair layout (see :func:`npair_loss`).
      labels: int ``[B]``.
      degree: ``alpha`` in degrees (static). Default 45.
      l2_reg: ``lambda_reg``. Default 0 (the official code's ``with_l2reg=False``).
      where: optional bool ``[B]``; a pair takes part only if both its rows are True.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`).

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device.

    References:
      Wang, Zhou, Wen, Liu, Lin, "Deep Metric Learning with Angular Loss", ICCV 2017.
    """
    layout = pair_layout(embeddings, labels, where, axis_name)
    logits = angular_logits(layout, "a", "p", degree)
    return softmax_cross_entropy(logits, layout, axis_name) + l2_reg * l2_regulariser(
        layout, axis_name
    )
