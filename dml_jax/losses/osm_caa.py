"""OSM + CAA weighted contrastive loss (Wang, Hua, Kodirov, Hu & Robertson, AAAI 2019)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dml_jax import _checks, distances, parallel
from dml_jax.losses import _batch, _classify, _windows

KERNELS = ("paper", "official")
ATTENTIONS = ("softmax", "gaussian")
# The official code's Gaussian re-weighting of the true-class probability (``attention/prob3``).
GAUSSIAN_ATTENTION_MU = 1.0
GAUSSIAN_ATTENTION_SIGMA = 0.68


def class_aware_attention(
    logits: jax.Array | None, labels: jax.Array, attention: str = "softmax"
) -> jax.Array:
    """CAA score ``a_i`` of each row, float32 ``[B]``, as a constant (no gradient).

    ``"softmax"``: ``a_i = softmax(logits_i)[y_i]`` (the paper). ``"gaussian"``: the official
    code's ``exp(-(p_i - 1)^2 / (2 * 0.68^2))`` of that probability ``p_i`` (its
    ``1/sqrt(2 pi sigma^2)`` factor cancels in the loss's normalisations). ``logits=None``
    gives ``a_i = 1``. A label outside ``[0, C)`` gives ``a_i = 0``.
    """
    if logits is None:
        return jnp.ones(labels.shape, jnp.float32)
    log_p = jax.lax.stop_gradient(_classify.true_class_log_probability(logits, labels))
    in_range = log_p > _batch.NEG_LARGE / 2
    p = jnp.exp(jnp.where(in_range, log_p, -jnp.inf))
    if attention == "gaussian":
        z = (p - GAUSSIAN_ATTENTION_MU) / GAUSSIAN_ATTENTION_SIGMA
        p = jnp.exp(-0.5 * z * z)
    return jnp.where(in_range, p, 0.0)


def _positive_weights(sq, mask, a_rows, a_cols, width):
    """The constant OSM weights ``w+ = exp(-d^2 / width) min(a_i, a_j)`` where ``mask``, else
    0: elementwise over the broadcast shape of ``sq`` ``[b, K]``, ``a_rows`` ``[b, 1]`` and
    ``a_cols`` (``[1, K]`` or ``[b, K]``)."""
    return jnp.where(mask, jnp.exp(-sq / width) * jnp.minimum(a_rows, a_cols), 0.0)


def _dense_positive_sums(sq, pos, a_rows, a_cols, width, runs):
    del runs
    w = _positive_weights(sq, pos, a_rows[:, None], a_cols[None, :], width)
    return _batch.masked_sum(w * sq, pos), jnp.sum(w)


def _window_positive_sums(sq, pos, a_rows, a_cols, width, runs, *, slots):
    cols, filled = _windows.run_window(pos, runs, slots)
    sq = jnp.take_along_axis(sq, cols, axis=1)
    w = _positive_weights(sq, filled, a_rows[:, None], a_cols[cols], width)
    return _batch.masked_sum(w * sq, filled), jnp.sum(w)


def _positive_sums_fwd(sq, pos, a_rows, a_cols, width, runs, run_index, sizes):
    sums = _windows.on_windows(run_index, sizes, _window_positive_sums, _dense_positive_sums,
                               sq, pos, a_rows, a_cols, width, runs)
    return sums, (sq, pos, a_rows, a_cols, width)


def _positive_sums_bwd(sizes, residuals, cotangents):
    sq, pos, a_rows, a_cols, width = residuals
    w = _positive_weights(sq, pos, a_rows[:, None], a_cols[None, :], width)
    # The weights are constants: only the first sum has a gradient, the weights themselves.
    return (cotangents[0] * w, None, None, None, jnp.zeros_like(width), None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _positive_sums(sq, pos, a_rows, a_cols, width, runs, run_index, sizes):
    """``(sum over P of w+ d^2, sum over P of w+)`` of squared distances ``sq`` ``[b, B]``,
    positives ``pos`` and attention ``a_rows`` ``[b]`` / ``a_cols`` ``[B]``, the weights
    ``w+`` (:func:`_positive_weights`) constants. A row's positives are a few of its ``B``
    columns: when one window of them holds every row's (``runs``, ``run_index`` into
    ``sizes``: :func:`dml_jax.losses._windows.run_choice`), the sums are taken there
    (``[b, S]``); otherwise over whole rows. The gradient, ``w+`` on ``P``, is one
    elementwise expression that XLA fuses into the distances' cotangent pass."""
    return _positive_sums_fwd(sq, pos, a_rows, a_cols, width, runs, run_index, sizes)[0]


_positive_sums.defvjp(_positive_sums_fwd, _positive_sums_bwd)


def osm_caa_from_squared_distances(
    sq: jax.Array,
    pos: jax.Array,
    neg: jax.Array,
    a_rows: jax.Array,
    a_cols: jax.Array,
    *,
    margin: float,
    sigma: float,
    lam: float,
    kernel: str,
    axis_name: str | None,
    positive_runs: tuple[_windows.Runs, jax.Array] | None = None,
    run_sizes: tuple[int, ...] = (),
) -> jax.Array:
    """The OSM+CAA loss from squared distances ``sq`` ``[b, M]`` of unit-norm embeddings,
    masks ``pos``/``neg`` ``[b, M]`` and attention ``a_rows [b]``, ``a_cols [M]``.

    ``positive_runs``: each row's run of columns that holds its positives and the index of
    the smallest of ``run_sizes`` that holds them
    (:func:`dml_jax.losses._windows.run_choice`): the positive sums are then taken on those
    windows; without them, on whole rows. Shared with :mod:`dml_jax.losses.symmetric`, whose
    columns include mined synthetic negatives.
    """
    d = distances.safe_sqrt(sq)
    a_rows, a_cols = jax.lax.stop_gradient(a_rows), jax.lax.stop_gradient(a_cols)
    a_pair = jnp.minimum(a_rows[:, None], a_cols[None, :])
    width = jnp.asarray(sigma * sigma if kernel == "paper" else 2.0 * sigma * sigma,
                        jnp.float32)
    hinge = jax.nn.relu(margin - d)
    w_neg = jnp.where(neg, jax.lax.stop_gradient(hinge) * a_pair, 0.0)
    if positive_runs is None:  # the dense form only
        positive_runs, run_sizes = _windows.no_runs(sq.shape[0]), ()
    runs, run_index = positive_runs
    total_p, w_total_p = _positive_sums(
        sq, pos, a_rows, a_cols, width, runs, jnp.asarray(run_index, jnp.int32),
        tuple(run_sizes),
    )
    loss_p = _batch.global_mean(0.5 * total_p, w_total_p, axis_name)
    loss_n = _batch.global_mean(
        0.5 * _batch.masked_sum(w_neg * jnp.square(hinge), neg), jnp.sum(w_neg), axis_name
    )
    return (1.0 - lam) * loss_p + lam * loss_n


def prepare_attention(
    logits: jax.typing.ArrayLike | None,
    batch: _batch.PairBatch,
    attention: str,
    axis_name: str | None,
) -> tuple[jax.Array, jax.Array]:
    """Validated CAA scores of the batch's local rows ``[b]`` (``logits`` ``[b, C]`` in the
    caller's row order, brought into the batch's by ``batch.row_order``) and of its columns
    ``[B]`` (gathered, in the columns' order ``batch.col_ids``)."""
    if logits is not None:
        logits = _classify.check_logits(logits, batch.row_labels)[batch.row_order]
        logits = _checks.mask_rows(logits, batch.row_valid)
    a_rows = class_aware_attention(logits, batch.row_labels, attention)
    return a_rows, parallel.all_gather_rows(a_rows, axis_name)[batch.col_ids]


@functools.partial(jax.jit, static_argnames=("kernel", "attention", "axis_name"))
@_checks.propagate_nonfinite(rows=("embeddings", "logits"))
def osm_caa_loss(
    embeddings: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    logits: jax.typing.ArrayLike | None = None,
    *,
    margin: float = 1.2,
    sigma: float = 0.8,
    lam: float = 0.5,
    kernel: str = "paper",
    attention: str = "softmax",
    where: jax.typing.ArrayLike | None = None,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Online soft mining (OSM) + class-aware attention (CAA) weighted contrastive loss.

    The embeddings are L2-normalised internally (as the paper's features are), so
    ``d_ij = ||f_i - f_j||`` lies in ``[0, 2]``. Over the ordered pairs ``i != j``:

    .. math::
       s^+_{ij} = e^{-d_{ij}^2/\sigma^2}\ (\texttt{kernel="official"}: e^{-d_{ij}^2/(2\sigma^2)}),
       \quad s^-_{ij} = [m - d_{ij}]_+,\quad a_{ij} = \min(a_i, a_j),
       \quad w^\pm_{ij} = \mathrm{sg}(s^\pm_{ij} a_{ij})

       L_P = \tfrac12 \frac{\sum_P w^+ d^2}{\sum_P w^+},\quad
       L_N = \tfrac12 \frac{\sum_N w^- [m - d]_+^2}{\sum_N w^-},\quad
       L = (1 - \lambda) L_P + \lambda L_N

    ``a_i`` is the softmax probability of the true class from ``logits`` (``attention=
    "gaussian"``: the official code's Gaussian of it, mu = 1, sigma = 0.68), 1 when ``logits``
    is None. The weights are constants (``stop_gradient``), as in the official Caffe layer,
    which only rescales the contrastive gradients; no gradient reaches ``logits``. A set with
    no pair, or whose weights sum to 0, contributes 0.

    Args:
      embeddings: float ``[B, D]`` (float32 or bfloat16; arithmetic in float32).
      labels: int ``[B]``; with ``logits``, class indices into its columns (a label outside
        ``[0, C)`` gets attention 0).
      logits: optional float ``[B, C]`` classifier logits of the same rows (sharded like
        ``embeddings`` under ``axis_name``).
      margin: ``m`` (the paper's alpha). Default 1.2.
      sigma: ``sigma_OSM`` (> 0). Default 0.8.
      lam: ``lambda``, the weight of ``L_N``. Default 0.5.
      kernel: ``"paper"`` (default, ``exp(-d^2/sigma^2)``, the poster's equation) or
        ``"official"`` (``exp(-d^2/(2 sigma^2))``, the official code).
      attention: ``"softmax"`` (default, the paper) or ``"gaussian"`` (the official code).
      where: optional bool ``[B]``; False rows take no part.
      axis_name: mesh/pmap axis for a global-batch loss (see :mod:`dml_jax.parallel`); the
        weight sums are global.

    Returns:
      float32 scalar. Memory: a few ``[b, B]`` matrices per device.

    References:
      Wang, Hua, Kodirov, Hu, Robertson, "Deep Metric Learning by Online Soft Mining and
      Class-Aware Attention", AAAI 2019 (arXiv 1811.01459).
    """
    _checks.check_choice(kernel, "kernel", KERNELS)
    _checks.check_choice(attention, "attention", ATTENTIONS)
    # Label-ordered columns put each row's positives in one run of columns, on whose window
    # the positive sums are taken (see `_positive_sums`).
    batch = _batch.pair_batch(embeddings, labels, where, axis_name, sort_by_label=True)
    # Every weight is symmetric in the pair, so is the gradient of the [B, B] block.
    sq = _batch.squared_distances_of(batch, axis_name, normalize=True, symmetric=True)
    a_rows, a_cols = prepare_attention(logits, batch, attention, axis_name)
    positive_runs = _windows.run_choice(
        batch.row_labels, batch.row_valid, batch.col_labels, batch.col_valid,
        batch.col_labels.shape[0], _windows.SLOT_SIZES,
    )
    return osm_caa_from_squared_distances(
        sq, batch.pos, batch.neg, a_rows, a_cols,
        margin=margin, sigma=sigma, lam=lam, kernel=kernel, axis_name=axis_name,
        positive_runs=positive_runs, run_sizes=_windows.SLOT_SIZES,
    )
