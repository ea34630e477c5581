"""Baseline losses against NumPy loop references: values, gradients, edge cases, invariances."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_jax import losses
from dml_jax.losses import _batch
from dml_jax.losses.multi_similarity import _exponent_bound
from tests.losses import reference as ref
from tests.losses.cases import BASELINE, IDS, bind

# float32 arithmetic on O(1) inputs: values agree with a float64 loop to ~1e-6 relative; the
# Gram-matrix distances lose ~1e-7 relative of the squared norms, amplified by at most beta=50
# in the multi-similarity exponent.
VALUE_TOL = {"rtol": 1e-4, "atol": 1e-5}
# Gradients: float32 sums of O(B) terms against float64 central differences (eps 1e-5).
GRAD_TOL = {"rtol": 2e-3, "atol": 2e-4}


def random_batch(seed, b=12, d=5, num_classes=4):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(b, d)).astype(np.float32)
    y = rng.integers(0, num_classes, size=b).astype(np.int32)
    return e, y


@pytest.mark.parametrize("case", BASELINE, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_value_and_gradient_match_loop_reference(case, seed):
    fn, reference = bind(case)
    e, y = random_batch(seed)
    value, grad = jax.value_and_grad(fn)(e, y)
    expected = reference(e, y)
    np.testing.assert_allclose(value, expected, **VALUE_TOL)
    expected_grad = ref.numerical_grad(lambda x: reference(x, y), e)
    np.testing.assert_allclose(grad, expected_grad, **GRAD_TOL)
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("case", BASELINE, ids=IDS)
def test_bfloat16_input_computes_in_float32(case):
    fn, reference = bind(case)
    e, y = random_batch(5)
    e16 = jnp.asarray(e, jnp.bfloat16)
    value, grad = jax.value_and_grad(fn)(e16, y)
    assert value.dtype == jnp.float32
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(value, reference(np.asarray(e16, np.float64), y), **VALUE_TOL)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


EDGE_LABELS = {
    "singleton_classes": np.array([0, 0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 4]),
    "one_class": np.zeros(12, np.int32),
    "all_distinct": np.arange(12),
    "two_classes": np.array([0, 1] * 6),
}


@pytest.mark.parametrize("case", BASELINE, ids=IDS)
@pytest.mark.parametrize("labels", list(EDGE_LABELS), ids=list(EDGE_LABELS))
def test_label_edge_cases(case, labels):
    fn, reference = bind(case)
    e, _ = random_batch(3)
    y = EDGE_LABELS[labels].astype(np.int32)
    value, grad = jax.value_and_grad(fn)(e, y)
    np.testing.assert_allclose(value, reference(e, y), **VALUE_TOL)
    np.testing.assert_allclose(
        grad, ref.numerical_grad(lambda x: reference(x, y), e), **GRAD_TOL
    )


@pytest.mark.parametrize("case", BASELINE, ids=IDS)
def test_identical_embeddings_and_zero_vector_stay_finite(case):
    fn, reference = bind(case)
    e, y = random_batch(4)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    e[1] = e[0]  # exact duplicate within a class or across classes
    e[5] = e[0]
    e[7] = 0.0  # zero vector
    value, grad = jax.value_and_grad(fn)(e, y)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # Duplicates sit at a Gram-form distance of at most ~5e-4 instead of 0 (unit norms), which
    # moves each hinge by as much; the loss is Lipschitz in the distances with constant <= 2.
    np.testing.assert_allclose(value, reference(e, y), rtol=1e-4, atol=2e-3)

    same = np.ones((6, 4), np.float32)
    value, grad = jax.value_and_grad(fn)(same, np.array([0, 0, 1, 1, 2, 2]))
    assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("case", BASELINE, ids=IDS)
def test_padding_rows_take_no_part(case):
    fn, _ = bind(case)
    e, y = random_batch(6, b=10)
    pad_e = np.concatenate([e, 100.0 * np.ones((3, e.shape[1]), np.float32)])
    pad_y = np.concatenate([y, np.array([y[0], y[1], 99], np.int32)])
    where = np.arange(13) < 10
    v0, g0 = jax.value_and_grad(fn)(e, y)
    v1, g1 = jax.value_and_grad(fn)(pad_e, pad_y, where=where)
    np.testing.assert_allclose(v1, v0, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(g1[:10], g0, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(g1[10:], 0.0)

    none = np.zeros(13, bool)
    v2, g2 = jax.value_and_grad(fn)(pad_e, pad_y, where=none)
    assert v2 == 0.0
    np.testing.assert_array_equal(g2, 0.0)


@pytest.mark.parametrize("case", BASELINE, ids=IDS)
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_permutation_and_relabelling_invariance(case, data):
    fn, _ = bind(case)
    seed = data.draw(st.integers(0, 10_000))
    e, y = random_batch(seed, b=10, d=3)
    perm = np.asarray(data.draw(st.permutations(list(range(10)))))
    mapping = np.asarray(data.draw(st.permutations(list(range(4))))) * 7 + 3
    base = fn(e, y)
    np.testing.assert_allclose(fn(e[perm], y[perm]), base, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fn(e, mapping[y]), base, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", BASELINE, ids=IDS)
def test_vmap_and_jit_equal_python_loop(case):
    fn, _ = bind(case)
    batches = [random_batch(s) for s in range(3)]
    es = np.stack([b[0] for b in batches])
    ys = np.stack([b[1] for b in batches])
    where = np.ones(ys.shape, bool)
    where[1, -2:] = False
    looped = [fn(es[i], ys[i], where=where[i]) for i in range(3)]
    vmapped = jax.vmap(lambda e, y, w: fn(e, y, where=w))(es, ys, where)
    jitted = jax.jit(jax.vmap(lambda e, y, w: fn(e, y, where=w)))(es, ys, where)
    np.testing.assert_allclose(vmapped, looped, rtol=1e-6)
    np.testing.assert_allclose(jitted, looped, rtol=1e-6)
    looped_grads = [jax.grad(fn)(es[i], ys[i]) for i in range(3)]
    np.testing.assert_allclose(jax.vmap(jax.grad(fn))(es, ys), looped_grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mining", ["all", "semi_hard"])
@pytest.mark.parametrize("class_size", [3, 8, 9, 20, 27, 33, 40])
def test_triplet_every_positive_set_size_matches_reference(mining, class_size):
    """Covers each slot size and the sort-based fallback for large positive sets; 27 (33
    columns) the slotted path's reductions over two 32-column chunks, one padded."""
    rng = np.random.default_rng(class_size)
    b = class_size + 6
    e = rng.normal(size=(b, 3)).astype(np.float32)
    y = np.concatenate([np.zeros(class_size), rng.integers(1, 4, size=6)]).astype(np.int32)
    value, grad = jax.value_and_grad(
        lambda x: losses.triplet_loss(x, y, mining=mining, margin=0.7)
    )(e)
    reference = lambda x: ref.triplet(x, y, margin=0.7, mining=mining)
    np.testing.assert_allclose(value, reference(e), **VALUE_TOL)
    np.testing.assert_allclose(grad, ref.numerical_grad(reference, e), **GRAD_TOL)


@pytest.mark.parametrize("class_size", [1, 2, 5, 20, 33])
def test_lifted_every_positive_set_size_matches_reference(class_size):
    """The lifted loss evaluates J on each row's window of 2, 8 or 32 label-ordered columns
    (the smallest that holds the largest class), or over all of [B, B] for a class of 33:
    each path against the loop reference. The rows come shuffled, so only the label order
    makes a class one window."""
    rng = np.random.default_rng(class_size)
    y = np.concatenate([np.zeros(class_size), [1, 1, 2, 2, 3]]).astype(np.int32)
    order = rng.permutation(len(y))
    e, y = rng.normal(size=(len(y), 2)).astype(np.float32), y[order]
    value, grad = jax.value_and_grad(
        lambda x: losses.lifted_structure_loss(x, y, neg_margin=1.5, pos_margin=0.2)
    )(e)
    reference = lambda x: ref.lifted(x, y, neg_margin=1.5, pos_margin=0.2)
    np.testing.assert_allclose(value, reference(e), **VALUE_TOL)
    np.testing.assert_allclose(grad, ref.numerical_grad(reference, e), **GRAD_TOL)


@pytest.mark.parametrize("mining,setting,size,steps,big_class", [
    # slotted: 150 columns in three blocks, the last padded (semi-hard: both the "min" and
    # the "sum" reductions of the shared `_per_slot`)
    ("semi_hard", "_BLOCK_COLUMNS", 64, 3, 0),
    # sort-based (a class of 40): three row steps, one padded (the shared `_by_row_chunks`)
    ("all", "_FALLBACK_ROWS", 64, 3, 40),
])
def test_triplet_miners_in_pieces_match_whole(mining, setting, size, steps, big_class,
                                             monkeypatch):
    """The slotted miners reduce over blocks of columns (1024 by default), the sort-based
    fallback runs over steps of rows (128): with smaller pieces, the same value and gradient
    bit for bit as in one piece, and the value of the loop reference. (Two cases: the suite's
    15-minute budget; each piece's helper is shared by both minings.)"""
    from dml_jax.losses import _batch, triplet

    rng = np.random.default_rng(5)
    e = rng.normal(size=(150, 3)).astype(np.float32)
    y = rng.integers(1, 30, size=150).astype(np.int32)
    y[:big_class] = 0

    def unjitted(x):  # triplet_loss without its jit cache, so the patched size is traced
        batch = _batch.pair_batch(x, y, None, None, sort_by_label=True)
        return triplet.triplet_from_distances(
            _batch.distances_of(batch, None, symmetric=True), batch, margin=0.5,
            mining=mining, axis_name=None, symmetric=True,
        )

    whole = jax.value_and_grad(unjitted)(e)
    monkeypatch.setattr(triplet, setting, size)
    assert -(-150 // size) == steps
    pieces = jax.value_and_grad(unjitted)(e)
    np.testing.assert_array_equal(pieces[0], whole[0])
    np.testing.assert_array_equal(pieces[1], whole[1])
    np.testing.assert_allclose(pieces[0], ref.triplet(e, y, margin=0.5, mining=mining),
                               **VALUE_TOL)
    assert np.any(np.asarray(pieces[1]) != 0)


def semi_hard_tied_gradient(e, y, margin):
    """The semi-hard triplet loss's gradient by its documented tie rule, a NumPy loop: each
    active term (a, p) adds +1 to d_ap's coefficient and -1 / t to each of the t negatives
    at its chosen distance (the closest farther than d_ap, else the farthest); the loss is
    their mean, chained through d_ij = |e_i - e_j| (no pair at distance 0)."""
    e = np.asarray(e, np.float64)
    n = len(y)
    dist = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
    coef, terms = np.zeros((n, n)), 0
    for a in range(n):
        pos = [p for p in range(n) if p != a and y[p] == y[a]]
        neg = [k for k in range(n) if y[k] != y[a]]
        if not neg:
            continue
        for p in pos:
            terms += 1
            harder = [dist[a, k] for k in neg if dist[a, k] > dist[a, p]]
            d_an = min(harder) if harder else max(dist[a, k] for k in neg)
            if dist[a, p] - d_an + margin > 0:
                coef[a, p] += 1.0
                tied = [k for k in neg if dist[a, k] == d_an]
                for k in tied:
                    coef[a, k] -= 1.0 / len(tied)
    grad = np.zeros_like(e)
    for i in range(n):
        for j in range(n):
            if coef[i, j]:
                unit = (e[i] - e[j]) / dist[i, j]
                grad[i] += coef[i, j] * unit
                grad[j] -= coef[i, j] * unit
    return grad / max(terms, 1)


def tied_rows(e, y, margin):
    """Anchors with an active semi-hard term whose chosen distance more than one negative
    holds (NumPy)."""
    e = np.asarray(e, np.float64)
    dist = np.sqrt(((e[:, None] - e[None]) ** 2).sum(-1))
    count = 0
    for a in range(len(y)):
        neg = dist[a, y != y[a]]
        pos = [dist[a, p] for p in range(len(y)) if p != a and y[p] == y[a]]
        chosen = [(d_ap, min(neg[neg > d_ap], default=neg.max())) for d_ap in pos]
        count += any(d_ap - d_an + margin > 0 and np.sum(neg == d_an) > 1
                     for d_ap, d_an in chosen)
    return count


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "rows_by_columns"])
@pytest.mark.parametrize("limit,path", [(40, "mended"), (0, "dense")])
def test_semi_hard_tied_negatives_on_each_path(symmetric, limit, path, monkeypatch):
    """Semi-hard mining scatters each chosen negative at the column found by one reduction
    when a single negative holds the chosen distance; rows where several do are mended one
    at a time (``_TIED_ROWS`` of them at most), or every row takes the dense pass. On points
    of an integer grid, whose distances tie exactly, each path gives the loop reference's
    value and the tie rule's gradient, on the symmetric in-batch view and on the rows-by-
    columns one (as under ``axis_name``)."""
    from dml_jax.losses import _batch, triplet

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3), -1).reshape(-1, 3)
    e = grid[rng.choice(len(grid), 40, replace=False)].astype(np.float32)
    y = np.repeat(np.arange(5), 8).astype(np.int32)
    margin = 1.5
    assert tied_rows(e, y, margin) > 2  # more than the dense path's limit (40 // 16)
    monkeypatch.setattr(triplet, "_TIED_ROWS", limit)

    def loss(x):  # triplet_loss without its jit cache, so the patched limit is traced
        batch = _batch.pair_batch(x, y, None, None, sort_by_label=True)
        return triplet.triplet_from_distances(
            _batch.distances_of(batch, None, symmetric=symmetric), batch, margin=margin,
            mining="semi_hard", axis_name=None, symmetric=symmetric,
        )

    value, grad = jax.jit(jax.value_and_grad(loss))(e)
    # float32 against float64 loops; measured: value within 5e-7, gradient within 4e-9 of
    # entries up to 0.03 (a tie rule's mistake moves an entry by ~1e-3)
    np.testing.assert_allclose(value, ref.triplet(e, y, margin=margin, mining="semi_hard"),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, semi_hard_tied_gradient(e, y, margin), rtol=1e-5,
                               atol=1e-8)


def test_chosen_columns_count_ties_and_find_single_columns():
    """``_chosen_columns`` packs each match as ``column << m | 1``: the count in the low
    bits is exact even when the columns' sum wraps around int32 (every column tied, 3,000
    of them), and a value held once gives its column, over two blocks of columns."""
    from dml_jax.losses import triplet

    rng = np.random.default_rng(1)
    width = 3000
    values = rng.permutation(width).astype(np.float32)[None].repeat(3, 0)
    values[2] = 7.0  # every column ties
    chosen = np.array([[values[0, 5], values[0, 2500], -1.0],
                       [values[1, 1023], values[1, 1024], values[1, 2999]],
                       [7.0, 8.0, 7.0]], np.float32)
    blocks = triplet._column_blocks(jnp.asarray(values), -jnp.inf)  # padded to 3,008
    ties, column = triplet._chosen_columns(jnp.asarray(chosen), blocks)
    np.testing.assert_array_equal(ties, [[1, 1, 0], [1, 1, 1], [width, 0, width]])
    np.testing.assert_array_equal(np.asarray(column)[:2], [[5, 2500, 0], [1023, 1024, 2999]])
    # The padding's fill counts too: 4,090 columns padded to 4,096 = 2^12 fill entries, a
    # count that needs the padded width's bits.
    fill = triplet._column_blocks(jnp.full((1, 4090), -jnp.inf), -jnp.inf)
    np.testing.assert_array_equal(
        triplet._chosen_columns(jnp.full((1, 1), -jnp.inf), fill)[0], [[4096]])
    wide = triplet._chosen_columns(
        jnp.asarray(chosen), triplet._column_blocks(jnp.asarray(values.repeat(11, 1)), -jnp.inf))
    assert wide[1] is None
    np.testing.assert_array_equal(wide[0], 11 * np.asarray(ties))


@pytest.mark.parametrize("case", BASELINE, ids=IDS)
def test_bad_input_raises_naming_argument_and_shape(case):
    fn, _ = bind(case)
    e, y = random_batch(0)
    with pytest.raises(ValueError, match=r"embeddings.*\[B, D\].*\(12,\)"):
        fn(e[:, 0], y)
    with pytest.raises(ValueError, match=r"labels.*\(11,\).*\(12, 5\)"):
        fn(e, y[:11])
    with pytest.raises(ValueError, match="integer"):
        fn(e, y.astype(np.float32))
    with pytest.raises(ValueError, match="where"):
        fn(e, y, where=np.ones(5, bool))


def test_unknown_mining_is_refused():
    e, y = random_batch(0)
    with pytest.raises(ValueError, match="mining"):
        losses.triplet_loss(e, y, mining="hardest")


@pytest.mark.parametrize("scale", [-50.0, -2.0, 0.0, 2.0, 50.0])
@pytest.mark.parametrize("base", [-1.5, -0.5, 0.0, 0.5, 1.5])
def test_multi_similarity_exponent_bound_is_the_largest_exponent_over_cosines(scale, base):
    cosines = np.linspace(-1.0, 1.0, 2001)  # holds both ends, where the maximum lies
    largest = np.max(scale * (cosines - base))
    # Every scale, base and their products here are exact in float32: no tolerance.
    assert float(_exponent_bound(scale, base)) == largest


def test_multi_similarity_defaults_take_the_fixed_shift_for_both_sums():
    """With alpha 2, beta 50, base 0.5 the exponents are at most 3 (positives) and 25
    (negatives), under row_logsumexp's fixed-shift limit: no pass for the row maxima."""
    assert float(_exponent_bound(-2.0, 0.5)) == 3.0
    assert float(_exponent_bound(50.0, 0.5)) == 25.0
    assert 25.0 <= _batch._FIXED_SHIFT_MAX < 75.0  # 75: |beta| (1 + |base|), the loose bound


@pytest.mark.parametrize(
    "kwargs", [{}, {"beta": 100.0, "base": -0.5}, {"alpha": 50.0}],
    ids=["both_fixed_shift", "negatives_row_maxima", "positives_row_maxima"],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_multi_similarity_on_each_log_sum_exp_path_matches_loop_reference(kwargs, seed):
    """Bounds 3 / 25, 1 / 150 and 75 / 25 (positives / negatives): the fixed shift where a
    bound is at most 60, the row maxima elsewhere, both against the reference."""
    e, y = random_batch(seed)
    value, grad = jax.value_and_grad(
        lambda x: losses.multi_similarity_loss(x, y, **kwargs))(e)
    np.testing.assert_allclose(value, ref.multi_similarity(e, y, **kwargs), **VALUE_TOL)
    expected_grad = ref.numerical_grad(lambda x: ref.multi_similarity(x, y, **kwargs), e)
    np.testing.assert_allclose(grad, expected_grad, **GRAD_TOL)
    assert np.abs(np.asarray(grad)).max() > 1e-3
