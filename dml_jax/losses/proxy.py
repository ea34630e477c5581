"""Proxy-based losses: Proxy-Anchor, ProxyNCA and SoftTriple (learned class proxies/centers).

Each takes the learned parameter array as an argument (trained by the caller, e.g. as a loss
parameter of :mod:`dml_jax.objectives`) and equals pytorch-metric-learning 2.9's class of the
same name with its default distance and reducer. None of them needs the other devices' rows:
under ``axis_name`` only sums over rows are global (see :mod:`dml_jax.losses._class_batch`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks, distances, parallel
from dml_jax.losses import _batch, _class_batch, _classify


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite(whole=("proxies",))
def proxy_anchor_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    proxies: jax.typing.ArrayLike,
    *,
    margin: float = 0.1,
    alpha: float = 32.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Proxy-Anchor loss (Kim et al. 2020), as pytorch-metric-learning's ``ProxyAnchorLoss``.

    With ``s_ic`` the cosine similarity of row ``i`` and proxy ``c``, ``P_c`` the valid rows of
    class ``c`` and ``N_c`` the other valid rows:

    .. math::
       L = \frac1{|C^+|}\sum_{c\in C^+} \log\Big(1 + \sum_{i\in P_c} e^{-\alpha(s_{ic} - m)}\Big)
         + \frac1{C}\sum_{c=1}^{C} \log\Big(1 + \sum_{i\in N_c} e^{\alpha(s_{ic} + m)}\Big)

    ``C^+`` is the set of proxies with at least one positive row in the (global) batch; the first
    term is 0 when it is empty. The reduction is PML's default ``DivisorReducer`` with these two
    divisors (no reducer swap is needed). Embeddings and proxies are L2-normalised internally
    (cosine similarity, PML's default distance). The row sums are exact log-sum-exps.

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]`` in ``[0, C)``; a row with a label outside takes no part.
      proxies: float ``[C, D]``, one learned proxy per class.
      margin: ``m``. Default 0.1.
      alpha: the scale ``alpha``. Default 32.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`). The
        ``proxies`` gradient under ``shard_map`` (``check_vma=True``, the default) is the full
        gradient on every device; under ``pmap`` or ``check_vma=False`` each device gets its
        rows' share: ``psum`` it, as for any data-parallel parameter.

    Returns:
      float32 scalar. Memory: a few ``[b, C]`` matrices per device.

    References:
      Kim, Kim, Cho, Kwak, "Proxy Anchor Loss for Deep Metric Learning", CVPR 2020.
    """
    batch = _class_batch.class_batch(embeddings, labels, proxies, "proxies", where)
    num = batch.params.shape[0]
    s = distances.cosine_similarity(batch.rows, batch.params)
    same = _class_batch.one_hot(batch.labels, num)
    pos = same & batch.valid[:, None]
    neg = ~same & batch.valid[:, None]
    pos_lse = _class_batch.logsumexp_over_rows(-alpha * (s - margin), pos, axis_name)
    neg_lse = _class_batch.logsumexp_over_rows(alpha * (s + margin), neg, axis_name)
    with_pos = parallel.global_count(jnp.sum(pos, axis=0, dtype=jnp.float32), axis_name) > 0
    num_with_pos = jnp.sum(with_pos, dtype=jnp.float32)
    pos_loss = jnp.sum(_batch.softplus_of_lse(pos_lse)) / jnp.maximum(num_with_pos, 1.0)
    neg_loss = jnp.sum(_batch.softplus_of_lse(neg_lse)) / num
    return pos_loss + neg_loss


@functools.partial(jax.jit, static_argnames=("axis_name",))
@_checks.propagate_nonfinite(whole=("proxies",))
def proxy_nca_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    proxies: jax.typing.ArrayLike,
    *,
    softmax_scale: float = 1.0,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""ProxyNCA loss (Movshovitz-Attias et al. 2017), as pytorch-metric-learning's
    ``ProxyNCALoss``.

    With ``d_ic = ||f_i/||f_i|| - p_c/||p_c|| ||^2`` (squared Euclidean distance of the
    L2-normalised row and proxy: PML's default ``LpDistance(power=2)``) and ``t`` the
    ``softmax_scale``:

    .. math::
       L_i = -\log \frac{e^{-t\, d_{i y_i}}}{\sum_{c=1}^{C} e^{-t\, d_{ic}}}

    averaged over the valid rows (PML's default ``MeanReducer``; no swap needed). PML computes
    the softmax probability and drops a row whose probability underflows to exactly 0; dml_jax
    computes the log-probability directly, so such a row (only possible with a large
    ``softmax_scale``) keeps its large, finite loss.

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]`` in ``[0, C)``; a row with a label outside takes no part (PML drops it
        too: it has no same-label proxy).
      proxies: float ``[C, D]``, one learned proxy per class.
      softmax_scale: ``t``. Default 1.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`); the
        ``proxies`` gradient behaves as in :func:`proxy_anchor_loss`.

    Returns:
      float32 scalar (0 without a valid row). Memory: a few ``[b, C]`` matrices per device.

    References:
      Movshovitz-Attias, Toshev, Leung, Ioffe, Singh, "No Fuss Distance Metric Learning using
      Proxies", ICCV 2017.
    """
    batch = _class_batch.class_batch(embeddings, labels, proxies, "proxies", where)
    # -t d_ic = -t |r_i|^2 - t |p_c|^2 + 2t r_i.p_c on the normalised rows and proxies; the
    # first term is the same for every class of row i, and a softmax does not see a per-row
    # constant: it is left out, which saves a [b, D] pass and its gradient.
    unit_sq = distances.normalized_squared_norms(batch.params)  # [C]
    logits = (2.0 * softmax_scale) * distances.cosine_similarity(
        batch.rows, batch.params
    ) - softmax_scale * unit_sq[None, :]
    return _classify.cross_entropy(logits, batch.labels, batch.valid, axis_name)


@functools.partial(jax.jit, static_argnames=("centers_per_class", "axis_name"))
@_checks.propagate_nonfinite(whole=("centers",))
def soft_triple_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    centers: jax.typing.ArrayLike,
    *,
    centers_per_class: int = 10,
    la: float = 20.0,
    gamma: float = 0.1,
    margin: float = 0.01,
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""SoftTriple loss (Qian et al. 2019), as pytorch-metric-learning's ``SoftTripleLoss``.

    Each class ``c`` has ``K = centers_per_class`` centers, rows ``c*K + k`` of ``centers``.
    With ``s_ick`` the cosine similarity of row ``i`` and center ``k`` of class ``c``:

    .. math::
       S_{ic} = \sum_k \frac{e^{s_{ick}/\gamma}}{\sum_{k'} e^{s_{ick'}/\gamma}}\, s_{ick},\qquad
       L_i = -\log \frac{e^{\lambda (S_{iy_i} - \delta)}}
                        {e^{\lambda (S_{iy_i} - \delta)} + \sum_{c\ne y_i} e^{\lambda S_{ic}}}

    averaged over the valid rows (PML's default ``MeanReducer``; no swap needed), with
    ``lambda = la`` and ``delta = margin``. Like PML's class with its default (no) weight
    regulariser, the paper's center-merging regulariser is not included.

    Args:
      embeddings: float ``[B, D]``.
      labels: int ``[B]`` in ``[0, C)``; a row with a label outside takes no part.
      centers: float ``[C*K, D]``; row ``c*K + k`` is center ``k`` of class ``c`` (PML's
        ``fc.T``).
      centers_per_class: ``K`` (static). Default 10.
      la: ``lambda``, the logit scale. Default 20.
      gamma: the softmax temperature over a class's centers. Default 0.1.
      margin: ``delta``. Default 0.01.
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`); the
        ``centers`` gradient behaves as in :func:`proxy_anchor_loss`.

    Returns:
      float32 scalar (0 without a valid row). Memory: a few ``[b, C*K]`` matrices per device.

    References:
      Qian, Shang, Sun, Hu, Li, Jin, "SoftTriple Loss: Deep Metric Learning Without Triplet
      Sampling", ICCV 2019.
    """
    if not isinstance(centers_per_class, int) or centers_per_class < 1:
        raise ValueError(
            f"`centers_per_class` must be a positive int; got {centers_per_class!r}."
        )
    num_centers = jnp.shape(centers)[0] if jnp.ndim(centers) == 2 else 0
    if num_centers % centers_per_class:
        raise ValueError(
            f"`centers` has {num_centers} rows, not a multiple of `centers_per_class` = "
            f"{centers_per_class}: it must have shape [C * centers_per_class, D]."
        )
    rows, labels_, valid, params = _class_batch.class_batch(
        embeddings, labels, centers, "centers", where
    )
    num = params.shape[0] // centers_per_class
    valid = valid & (labels_ < num)
    # The centers reordered k-major (row k*C + c): a class's K similarities are then the same
    # entry of K [b, C] slices, and the softmax over them is element-wise (as a reduction over
    # a minor axis of length K, XLA's CPU backend materialised broadcasts of [b, C, K]).
    by_center = params.reshape(num, centers_per_class, -1).swapaxes(0, 1).reshape(
        params.shape
    )
    s = distances.cosine_similarity(rows, by_center)
    # split (whose gradient is one concatenate), not K slices (K padded adds)
    logits = _softmax_weighted_mean(jnp.split(s, centers_per_class, axis=1), 1.0 / gamma)
    logits = la * (logits - margin * _class_batch.one_hot(labels_, num))
    return _classify.cross_entropy(logits, labels_, valid, axis_name)


def _softmax_weighted_mean(values: list[jax.Array], scale: float) -> jax.Array:
    """``sum_k softmax_k(scale * v_k) v_k`` over the list of same-shaped arrays ``v_k``,
    element-wise (the softmax shifted by the element-wise max, which takes no gradient).

    The max is materialised (:func:`dml_jax.losses._batch.materialise`): fused into each of
    the ``K`` exponentials and their gradients, it read all ``K`` arrays in each (SoftTriple
    at ``B = 1024``, ``C = 128``, ``K = 10``: 24.3 -> 23.3 ms per step, same-process A/B)."""
    top = jax.lax.stop_gradient(_batch.materialise(functools.reduce(jnp.maximum, values)))
    weights = [jnp.exp(scale * (v - top)) for v in values]
    total = functools.reduce(jnp.add, weights)
    return functools.reduce(jnp.add, [w * v for w, v in zip(weights, values, strict=True)]) / total
