"""The pair view's hand-written pieces (Gram gradient, row permutation, label counts, sparse
batch-hard gradient) against the plain computations they replace."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax import distances
from dml_jax.losses import _batch


def _batch_of(x, labels, memory=None):
    batch = _batch.pair_batch(x, labels, None, None)
    if memory is not None:
        batch = _batch.append_memory(
            batch, memory, jnp.zeros(memory.shape[0], jnp.int32),
            jnp.ones(memory.shape[0], bool),
        )
    return batch


@pytest.mark.parametrize("with_memory", [False, True])
def test_gram_gradient_matches_autodiff_of_the_plain_products(with_memory):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
    memory = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32) if with_memory else None
    labels = jnp.arange(12) % 3
    width = 12 + (7 if with_memory else 0)
    w = jnp.asarray(rng.normal(size=(12, width)), jnp.float32)  # a non-symmetric cotangent
    hi = jax.lax.Precision.HIGHEST

    def ours(x):
        g, row_sq, col_sq = _batch.gram(_batch_of(x, labels, memory), None)
        return jnp.sum(w * g) + jnp.sum(row_sq) + 2.0 * jnp.sum(col_sq)

    def plain(x):
        cols = x if memory is None else jnp.concatenate([x, jax.lax.stop_gradient(memory)])
        g = jnp.matmul(x, cols.T, precision=hi)
        return jnp.sum(w * g) + jnp.sum(x * x) + 2.0 * jnp.sum(cols * cols)

    v1, g1 = jax.value_and_grad(ours)(x)
    v2, g2 = jax.value_and_grad(plain)(x)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-5)


def test_symmetric_gram_gradient_on_a_symmetric_cotangent():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)
    w = w + w.T
    g_sym = jax.grad(lambda x: jnp.sum(w * _batch.self_gram(x, True)))(x)
    g_gen = jax.grad(lambda x: jnp.sum(w * _batch.self_gram(x, False)))(x)
    g_ref = jax.grad(lambda x: jnp.sum(w * (x @ x.T)))(x)
    np.testing.assert_allclose(g_sym, g_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g_gen, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("squared", [False, True])
def test_self_distances_gradient_on_a_symmetric_cotangent(squared):
    """The one-product gradient of the batch's distances against autodiff of the plain ones,
    with duplicate rows (distance 0: zero gradient, never NaN) and a zero row. Small integer
    entries make every dot product exact, so a duplicate's distance is exactly 0 both ways."""
    rng = np.random.default_rng(4)
    x = rng.integers(-3, 4, size=(16, 6)).astype(np.float32)
    x[5] = x[2]
    x[9] = 0.0
    x = jnp.asarray(x)
    w = jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)
    w = w + w.T

    def plain(x):
        sq = jnp.sum(x * x, axis=1)
        g = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
        d = jnp.maximum(sq[:, None] + sq[None] - 2 * g, 0)
        return jnp.sum(w * (d if squared else distances.safe_sqrt(d)))

    v1, g1 = jax.value_and_grad(lambda x: jnp.sum(w * _batch.self_distances(x, squared)))(x)
    v2, g2 = jax.value_and_grad(plain)(x)
    assert np.all(np.isfinite(g1))
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    # float32 rounding of sums of ~100 terms: measured <= 1.6e-7 of the largest entry
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-6 * np.abs(np.asarray(g2)).max())
    assert np.abs(np.asarray(g1)).max() > 0.1


@pytest.mark.parametrize("squared", [False, True, None])  # None: the Gram matrix
@pytest.mark.parametrize("shared", [True, False])
def test_memory_blocks_against_autodiff(squared, shared):
    """``memory_distances`` / ``memory_gram`` (rows against batch columns and constant memory
    rows) against autodiff of the plain computation, with the columns the rows themselves (the
    single-device view: both gradients reach one array) or a separate array (the gathered
    columns under ``axis_name``); a duplicate of a row in the memory, a zero row, and a
    non-symmetric cotangent. The memory's gradient is zero."""
    rng = np.random.default_rng(6)
    x = rng.integers(-3, 4, size=(10, 5)).astype(np.float32)
    x[4] = 0.0
    cols = x if shared else rng.integers(-3, 4, size=(14, 5)).astype(np.float32)
    memory = rng.integers(-3, 4, size=(7, 5)).astype(np.float32)
    memory[2] = x[1]
    x, cols, memory = (jnp.asarray(a) for a in (x, cols, memory))
    w = jnp.asarray(rng.normal(size=(10, cols.shape[0] + 7)), jnp.float32)

    def plain(x, c, m):
        every = jnp.concatenate([c, m])
        g = jnp.matmul(x, every.T, precision=jax.lax.Precision.HIGHEST)
        if squared is None:
            return jnp.sum(w * g)
        sq = jnp.sum(x * x, axis=1)[:, None] + jnp.sum(every * every, axis=1)[None] - 2 * g
        d = jnp.maximum(sq, 0)
        return jnp.sum(w * (d if squared else distances.safe_sqrt(d)))

    def custom(x, c, m):
        if squared is None:
            return jnp.sum(w * _batch.memory_gram(x, c, m))
        return jnp.sum(w * _batch.memory_distances(x, c, m, squared))

    def run(fn):
        if shared:
            return jax.value_and_grad(lambda x, m: fn(x, x, m), argnums=(0, 1))(x, memory)
        return jax.value_and_grad(fn, argnums=(0, 1, 2))(x, cols, memory)

    (v1, g1), (v2, g2) = run(custom), run(plain)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    for a, b in zip(g1[:-1], g2[:-1]):
        assert np.all(np.isfinite(a))
        # float32 rounding: measured <= 1.5e-7 of the largest entry
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(np.asarray(b)).max())
        assert np.abs(np.asarray(a)).max() > 0.1
    np.testing.assert_array_equal(g1[-1], 0.0)  # the memory: constants


@pytest.mark.parametrize("squared", [False, True])
def test_memory_distances_symmetric_batch_block_against_autodiff(squared):
    """With ``symmetric`` (the columns are the rows, and the cotangent's batch block is
    symmetric, as the contrastive loss's) ``memory_distances`` folds the columns' gradient
    into one product: the points get autodiff's gradient of the plain computation, through
    both the rows and the columns (a zero row and a memory row equal to a batch row)."""
    rng = np.random.default_rng(7)
    x = rng.integers(-3, 4, size=(10, 5)).astype(np.float32)
    x[4] = 0.0
    memory = rng.integers(-3, 4, size=(7, 5)).astype(np.float32)
    memory[2] = x[1]
    x, memory = jnp.asarray(x), jnp.asarray(memory)
    w = rng.normal(size=(10, 17)).astype(np.float32)
    w[:, :10] = w[:, :10] + w[:, :10].T  # a symmetric batch block
    w = jnp.asarray(w)

    def plain(x):
        every = jnp.concatenate([x, memory])
        g = jnp.matmul(x, every.T, precision=jax.lax.Precision.HIGHEST)
        sq = jnp.maximum(
            jnp.sum(x * x, axis=1)[:, None] + jnp.sum(every * every, axis=1)[None] - 2 * g, 0
        )
        return jnp.sum(w * (sq if squared else distances.safe_sqrt(sq)))

    def custom(x):
        return jnp.sum(w * _batch.memory_distances(x, x, memory, squared, True))

    (v1, g1), (v2, g2) = jax.value_and_grad(custom)(x), jax.value_and_grad(plain)(x)
    np.testing.assert_allclose(v1, v2, rtol=1e-5)
    assert np.all(np.isfinite(g1)) and np.abs(np.asarray(g2)).max() > 0.1
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-6 * np.abs(np.asarray(g2)).max())


@pytest.mark.parametrize("integer", [True, False])
def test_mined_distance_sum_against_autodiff(integer):
    """``mined_distance_sum`` (the triplet miners' sum with a memory) against autodiff of
    ``sum(C * d)`` for a constant, non-symmetric ``C`` with positive and negative entries:
    the value (undifferentiated, and from the products under differentiation) and the
    rows' gradient through both the rows and the batch columns; zero distances (the
    zero row, and with integer points a memory row equal to a batch row and a
    repeated row) take none. The memory gets no gradient. (Equal float points are left out:
    their distance comes out of the expansion as rounding, about 1e-3 here, in the plain
    sum too, which then misses the exact value by more than the mined sum does.)"""
    rng = np.random.default_rng(8)
    if integer:
        x = rng.integers(-3, 4, size=(10, 5)).astype(np.float32)
        memory = rng.integers(-3, 4, size=(7, 5)).astype(np.float32)
        x[6] = x[2]
        memory[2] = x[1]
    else:
        x = rng.normal(size=(10, 5)).astype(np.float32)
        memory = rng.normal(size=(7, 5)).astype(np.float32)
    x[4] = 0.0
    x, memory = jnp.asarray(x), jnp.asarray(memory)
    c = rng.normal(size=(10, 17)).astype(np.float32)
    np.fill_diagonal(c, 0.0)  # as every mask: a pair (i, i) takes no part
    c = jnp.asarray(c)

    def plain(x, m):
        every = jnp.concatenate([x, m])
        g = jnp.matmul(x, every.T, precision=jax.lax.Precision.HIGHEST)
        sq = jnp.maximum(
            jnp.sum(x * x, axis=1)[:, None] + jnp.sum(every * every, axis=1)[None] - 2 * g, 0
        )
        return jnp.sum(c * distances.safe_sqrt(sq))

    def mined(x, m):
        sq = jax.lax.stop_gradient(
            _batch.augmented_squared_distances(x, x, m)
        )
        d = distances.safe_sqrt(sq)
        k = jnp.where(d > 0, c / jnp.where(d > 0, d, 1.0), 0.0)
        return _batch.mined_distance_sum(k, sq, x, m)

    (v1, g1), (v2, g2) = (jax.value_and_grad(f, argnums=(0, 1))(x, memory)
                          for f in (mined, plain))
    scale = float(jnp.sum(jnp.abs(c) * jnp.sqrt(jnp.maximum(  # sum |C| d: the value's scale
        _batch.augmented_squared_distances(x, x, memory), 0))))
    # float32 rounding of the distances' expansion: measured <= 4.5e-8 of sum |C| d
    np.testing.assert_allclose(v1, v2, atol=3e-7 * scale)
    np.testing.assert_allclose(jax.jit(mined)(x, memory), v2, atol=3e-7 * scale)
    assert np.all(np.isfinite(g1[0])) and np.abs(np.asarray(g2[0])).max() > 0.1
    np.testing.assert_allclose(g1[0], g2[0], rtol=1e-6,
                               atol=1e-6 * np.abs(np.asarray(g2[0])).max())
    np.testing.assert_array_equal(g1[1], 0.0)


@pytest.mark.parametrize("width,entries", [(9, 9), (20, 13), (32, 32), (40, 7), (0, 0)])
def test_sparse_mined_gradient_against_autodiff(width, entries):
    """``sparse_mined_gradient`` (semi-hard's gradient with a memory) and
    ``value_with_gradient`` against autodiff of ``sum C_ij d_ij`` with ``C`` given as
    ``[b, E]`` entries: batch and memory columns, a column repeated in a row (its entries add
    up), zero entries, entry counts below ``E`` (the later entries 0) and widths that are no
    multiple of the loop's step. The memory gets no gradient. (A row's own column, which no
    miner gives, is left out: its distance comes out of the expansion as rounding, as in
    ``test_mined_distance_sum_against_autodiff``.)"""
    rng = np.random.default_rng(width)
    b, m, dim = 10, 12, 5
    x = jnp.asarray(rng.normal(size=(b, dim)), jnp.float32)
    memory = jnp.asarray(rng.normal(size=(m, dim)), jnp.float32)
    cols = rng.integers(0, b + m - 1, size=(b, width)).astype(np.int32)
    cols += cols >= np.arange(b)[:, None]  # never the row itself
    coef = rng.normal(size=(b, width)).astype(np.float32)
    coef[:, entries:] = 0.0
    if width:
        coef[rng.random((b, width)) < 0.2] = 0.0
        cols[:, -1] = cols[:, 0]  # repeated columns
    cols, coef = jnp.asarray(cols), jnp.asarray(coef)
    dense = jnp.zeros((b, b + m)).at[jnp.arange(b)[:, None], cols].add(coef)

    def plain(x, mem):
        return jnp.sum(dense * jnp.sqrt(jnp.maximum(
            _batch.augmented_squared_distances(x, x, mem), 1e-30)))

    def sparse(x, mem):
        sq = jax.lax.stop_gradient(_batch.augmented_squared_distances(x, x, mem))
        d = distances.safe_sqrt(sq)
        dist = jnp.take_along_axis(d, cols, axis=1)
        k = _batch.over_distances(coef, dist)
        grad = _batch.sparse_mined_gradient(k, cols, jnp.int32(entries),
                                            jax.lax.stop_gradient(x), mem)
        return _batch.value_with_gradient(jnp.sum(coef * dist), x, grad)

    (v1, g1), (v2, g2) = (jax.value_and_grad(f, argnums=(0, 1))(x, memory)
                          for f in (sparse, plain))
    # float32 rounding, measured: the value to 6.1e-7 of itself, the gradient to 2.1e-7 of
    # its largest entry
    np.testing.assert_allclose(v1, v2, rtol=2e-6)
    scale = max(float(np.abs(np.asarray(g2[0])).max()), 1e-6)
    np.testing.assert_allclose(g1[0], g2[0], rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_array_equal(g1[1], 0.0)
    if entries:
        assert np.abs(np.asarray(g2[0])).max() > 0.1


def test_row_logsumexp_gives_the_points_the_plain_gradient():
    """Its symmetric cotangent against autodiff of the plain masked log-sum-exp, through a
    symmetric function of the points; one row without a masked entry (NEG_LARGE, zero
    gradient)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)
    mask = rng.random((12, 12)) < 0.4
    mask = mask | mask.T
    mask[3, :] = mask[:, 3] = False
    mask = jnp.asarray(mask)
    w = jnp.asarray(rng.normal(size=12), jnp.float32)

    def loss(x, symmetric):
        values = 3.0 * jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
        lse = _batch.masked_logsumexp(values, mask, symmetric=symmetric)
        return jnp.sum(w * jnp.where(lse > _batch.NEG_LARGE / 2, lse, 0.0)), lse

    (v1, lse1), g1 = jax.value_and_grad(loss, has_aux=True)(x, True)
    (v2, lse2), g2 = jax.value_and_grad(loss, has_aux=True)(x, False)
    assert lse1[3] == _batch.NEG_LARGE
    np.testing.assert_array_equal(lse1, lse2)
    assert v1 == v2
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(g1)).max() > 0.1


def test_the_self_gram_is_symmetric_bit_for_bit():
    """What the symmetric shortcut of the contrastive and OSM+CAA losses relies on."""
    rng = np.random.default_rng(2)
    for n, d in [(64, 32), (1000, 128), (257, 65)]:
        x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
        g = np.asarray(jax.jit(lambda x: _batch.self_gram(x))(x))
        assert np.array_equal(g, g.T), (n, d)


def test_permute_rows_gradient_is_the_inverse_permutation():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    order = jnp.asarray(rng.permutation(9))
    w = jnp.asarray(rng.normal(size=(9, 4)), jnp.float32)
    g1 = jax.grad(lambda x: jnp.sum(w * _batch.permute_rows(x, order)))(x)
    g2 = jax.grad(lambda x: jnp.sum(w * x[order]))(x)
    np.testing.assert_array_equal(g1, g2)


@pytest.mark.parametrize("n", [1, 7, 1000, 8192])
@pytest.mark.parametrize("labels", ["classes", "negative", "int32 wide", "int32 largest",
                                    "int32 smallest", "none valid"])
def test_label_order_is_the_stable_argsort_with_invalid_rows_last(n, labels):
    # NumPy's stable order, invalid rows last, for labels anywhere in int32 (its largest, the
    # invalid rows' key, included): an unstable sort or another key for the invalid rows
    # fails it.
    rng = np.random.default_rng(n)
    top, bottom = np.iinfo(np.int32).max, np.iinfo(np.int32).min
    draw = {
        "classes": lambda: rng.integers(0, 50, n),
        "negative": lambda: rng.integers(-30, 30, n),
        "int32 wide": lambda: rng.integers(bottom, top, n, dtype=np.int64),
        "int32 largest": lambda: rng.choice([top, top - 1, top - 3], n),
        "int32 smallest": lambda: rng.choice([bottom, bottom + 1, bottom + 3], n),
        "none valid": lambda: rng.integers(0, 5, n),
    }
    y = draw[labels]().astype(np.int32)
    valid = rng.random(n) < (0.0 if labels == "none valid" else 0.8)
    expected = np.argsort(np.where(valid, y, top), kind="stable")
    got = jax.jit(_batch.label_order)(jnp.asarray(y), jnp.asarray(valid))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, expected)


def _batch_hard_both_ways(e, y, where=None):
    """batch-hard's loss with the sparse gradient (the public path) and with the dense one."""
    from dml_jax.losses import triplet

    def dense(e):
        batch = _batch.pair_batch(e, y, where, None)
        return triplet.triplet_from_distances(
            _batch.distances_of(batch, None), batch, margin=0.2, mining="batch_hard",
            axis_name=None,
        )

    def sparse(e):
        batch = _batch.pair_batch(e, y, where, None)
        return triplet.triplet_from_distances(
            _batch.distances_of(batch, None), batch, margin=0.2, mining="batch_hard",
            axis_name=None, distance_to=triplet.gathered_distances(batch.rows, batch.cols),
        )

    return jax.value_and_grad(sparse)(e), jax.value_and_grad(dense)(e)


def test_batch_hard_sparse_gradient_equals_the_dense_one():
    rng = np.random.default_rng(4)
    e = jnp.asarray(rng.normal(size=(24, 6)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, size=24), jnp.int32)
    where = jnp.arange(24) < 21
    for w in (None, where):
        (v1, g1), (v2, g2) = _batch_hard_both_ways(e, y, w)
        assert v1 == v2
        np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)


def test_batch_hard_sparse_gradient_on_tied_columns():
    """Duplicated rows tie as hardest columns: the sparse path gives the first the whole
    gradient where autodiff splits it; the anchors' gradients and each tied group's sum agree."""
    rng = np.random.default_rng(5)
    e = rng.normal(size=(12, 4)).astype(np.float32)
    e[6] = e[7] = 1.01 * e[0]  # anchor 0's hardest negative, twice
    y = jnp.asarray([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], jnp.int32)
    (v1, g1), (v2, g2) = _batch_hard_both_ways(jnp.asarray(e), y)
    g1, g2 = np.asarray(g1), np.asarray(g2)
    assert not np.allclose(g1[6], g2[6])  # the tie is real: the paths share it differently
    np.testing.assert_allclose(v1, v2, rtol=1e-6)
    assert np.all(np.isfinite(g1))
    others = [i for i in range(12) if i not in (6, 7)]
    np.testing.assert_allclose(g1[others], g2[others], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1[6] + g1[7], g2[6] + g2[7], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sort_by_label", [False, True])
def test_pos_and_neg_counts_equal_the_mask_sums(sort_by_label):
    rng = np.random.default_rng(6)
    e = jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, size=20), jnp.int32).at[3].set(jnp.iinfo(jnp.int32).max)
    where = jnp.asarray(rng.random(20) > 0.2)
    batch = _batch.pair_batch(e, y, where, None, sort_by_label=sort_by_label)
    mem_labels = jnp.asarray(rng.integers(0, 5, size=9), jnp.int32).at[2].set(y[3])
    mem_valid = jnp.asarray(rng.random(9) > 0.3).at[2].set(True)
    wide = _batch.append_memory(batch, jnp.zeros((9, 3)), mem_labels, mem_valid)
    order = _batch.label_order(mem_labels, mem_valid)  # as with_memory(sort_by_label=True)
    wide_sorted = _batch.append_memory(
        batch, jnp.zeros((9, 3)), mem_labels[order], mem_valid[order], presorted=True
    )
    for view in (batch, wide, wide_sorted):
        np.testing.assert_array_equal(view.pos_count, np.sum(np.asarray(view.pos), axis=1))
        np.testing.assert_array_equal(view.neg_count, np.sum(np.asarray(view.neg), axis=1))


def test_symmetric_view_neg_count_is_the_mask_sum():
    from dml_jax.losses import symmetric

    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(20, 3)), jnp.float32)
    labels = jnp.asarray(np.repeat(rng.integers(0, 4, size=10), 2), jnp.int32)
    where = jnp.asarray(np.arange(20) % 7 != 3)
    view = symmetric.symmetric_view(x, labels, where=where)
    np.testing.assert_array_equal(view.neg_count, np.sum(np.asarray(view.neg), axis=1))
    assert float(jnp.min(view.neg_count)) == 0 and float(jnp.max(view.neg_count)) > 0
    # One mined column per negative pair, in the column of the point it was made from, and
    # marked synthetic exactly when the choice is x'_k or x'_l.
    neg, synthetic, choice = (np.asarray(a) for a in (view.neg, view.synthetic, view.choice))
    pair_neg = neg[:, 0::2] | neg[:, 1::2]
    assert not np.any(neg[:, 0::2] & neg[:, 1::2]) and not np.any(synthetic & ~neg)
    np.testing.assert_array_equal(neg[:, 1::2], pair_neg & (choice % 2 == 1))
    np.testing.assert_array_equal(synthetic[:, 0::2] | synthetic[:, 1::2], pair_neg & (choice >= 2))
    assert np.any(pair_neg & (choice >= 2)) and np.any(pair_neg & (choice < 2))


@pytest.mark.parametrize("scale", [10.0, 100.0])  # bound 15 (fixed shift) and 150 (row maxima)
def test_row_logsumexp_with_a_bound_matches_the_plain_one(scale):
    rng = np.random.default_rng(7)
    s = jnp.asarray(rng.uniform(-1, 1, size=(9, 13)), jnp.float32)
    mask = jnp.asarray(rng.random((9, 13)) < 0.5).at[4].set(False)
    w = jnp.asarray(rng.normal(size=9), jnp.float32)

    def loss(s, bound):
        lse = _batch.masked_logsumexp(scale * (s - 0.5), mask, bound=bound)
        return jnp.sum(w * _batch.softplus_of_lse(lse)), lse

    (v1, lse1), g1 = jax.value_and_grad(loss, has_aux=True)(s, scale * 1.5)
    (v2, lse2), g2 = jax.value_and_grad(loss, has_aux=True)(s, None)
    assert lse1[4] == _batch.NEG_LARGE and lse2[4] == _batch.NEG_LARGE
    # log(sum) + shift: an absolute error of a few float32 ulps of the shift (15 or 150 here).
    ulps = 8 * np.finfo(np.float32).eps * scale * 1.5
    np.testing.assert_allclose(lse1, lse2, rtol=1e-6, atol=ulps)
    np.testing.assert_allclose(v1, v2, rtol=1e-6, atol=ulps)
    np.testing.assert_allclose(g1, g2, rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(g1)).max() > 0.1


def test_a_row_whose_terms_all_underflow_under_the_fixed_shift_counts_as_empty():
    values = jnp.array([[-95.0, -99.0], [-1.0, -2.0]])  # bound 0: exp(-95) underflows
    lse = _batch.masked_logsumexp(values, jnp.ones((2, 2), bool), bound=0.0)
    assert lse[0] == _batch.NEG_LARGE
    np.testing.assert_allclose(lse[1], np.logaddexp(-1.0, -2.0), rtol=1e-6)
    g = jax.grad(lambda v: jnp.sum(_batch.softplus_of_lse(
        _batch.masked_logsumexp(v, jnp.ones((2, 2), bool), bound=0.0))))(values)
    assert np.all(np.isfinite(g)) and np.all(np.asarray(g)[0] == 0)


@pytest.mark.parametrize("same", [False, True], ids=["x_y", "x_x"])
def test_cosine_similarity_equals_the_normalised_product(same):
    """The folded cosine (raw product scaled by inverse norms) has the value and gradient of
    ``l2_normalize(x) @ l2_normalize(y).T``, with a zero row and a row below the norm floor."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 5)).astype(np.float32) * rng.uniform(0.1, 3.0, size=(9, 1))
    x[2], x[5] = 0.0, 1e-14
    y = x if same else rng.normal(size=(6, 5)).astype(np.float32)
    if not same:
        y[4] = 0.0
    w = rng.normal(size=(9, 9 if same else 6)).astype(np.float32)

    def plain(x, y):
        return distances.dot_products(distances.l2_normalize(x), distances.l2_normalize(y))

    def folded(x, y):
        return distances.cosine_similarity(x, None if same else y)

    assert np.all(np.isfinite(np.asarray(folded(x, y))))
    # float32 rounding of a few operations: observed 1.2e-7 on values, 2.3e-7 x the largest
    # entry on gradients.
    np.testing.assert_allclose(folded(x, y), plain(x, y), rtol=0, atol=5e-7)
    argnums = (0,) if same else (0, 1)  # x_x: y takes no part
    loss_folded = jax.grad(lambda x, y: jnp.sum(w * folded(x, y)), argnums=argnums)
    loss_plain = jax.grad(lambda x, y: jnp.sum(w * (plain(x, x) if same else plain(x, y))),
                          argnums=argnums)
    for got, want in zip(loss_folded(x, y), loss_plain(x, y), strict=True):
        assert np.all(np.isfinite(np.asarray(got)))
        scale = np.abs(np.asarray(want)).max()
        assert scale > 0
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("first", [0.5, np.nan, np.inf])
def test_transpose_sum_is_exactly_h_plus_its_transpose(first):
    # The identity dynamic_update_slice must leave h untouched whatever h[0, 0] holds (its
    # offset is computed from it), jitted and under vmap, where the offset is batched.
    h = np.random.default_rng(0).normal(size=(3, 6, 6)).astype(np.float32)
    h[1, 0, 0] = first
    want = h + np.swapaxes(h, 1, 2)
    np.testing.assert_array_equal(jax.jit(_batch.transpose_sum)(jnp.asarray(h[1])), want[1])
    np.testing.assert_array_equal(jax.jit(jax.vmap(_batch.transpose_sum))(jnp.asarray(h)), want)


@pytest.mark.parametrize("shape", [(5,), (4, 3), (2, 3, 4)])
@pytest.mark.parametrize("first", [0.5, np.nan, -np.inf])
def test_materialise_is_the_identity_in_value_and_gradient(shape, first):
    h = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    h.reshape(-1)[0] = first
    np.testing.assert_array_equal(jax.jit(_batch.materialise)(jnp.asarray(h)), h)
    w = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(_batch.materialise(x) * w)))(jnp.asarray(h))
    np.testing.assert_array_equal(grad, w)


@pytest.mark.parametrize("first", [0.5, np.nan])
def test_transposed_is_the_transpose_in_value_and_gradient(first):
    # The cond's predicate is computed from h[0, 0] and must be True whatever it holds,
    # jitted and under vmap (where it is batched).
    h = np.random.default_rng(3).normal(size=(2, 4, 7)).astype(np.float32)
    h[0, 0, 0] = first
    np.testing.assert_array_equal(jax.jit(_batch.transposed)(jnp.asarray(h[0])), h[0].T)
    np.testing.assert_array_equal(
        jax.jit(jax.vmap(_batch.transposed))(jnp.asarray(h)), np.swapaxes(h, 1, 2)
    )
    w = np.random.default_rng(4).normal(size=(7, 4)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(_batch.transposed(x) * w)))(jnp.asarray(h[1]))
    np.testing.assert_array_equal(grad, w.T)


@pytest.mark.parametrize("sort_by_label", [False, True])
def test_first_same_label_is_the_first_positive(sort_by_label):
    from dml_jax.losses import _windows

    rng = np.random.default_rng(8)
    top = jnp.iinfo(jnp.int32).max
    # Classes of 1 to 5 rows (a row alone has no positive), invalid rows, and a valid label
    # equal to int32's largest, which sorts among the invalid columns.
    y = np.repeat(np.arange(6), [1, 2, 3, 5, 4, 5])[rng.permutation(20)].astype(np.int32)
    where = np.arange(20) % 6 != 4
    for labels in (y, np.where(np.arange(20) % 5 == 1, top, y).astype(np.int32)):
        batch = _batch.pair_batch(
            jnp.asarray(rng.normal(size=(20, 3)), jnp.float32), jnp.asarray(labels),
            jnp.asarray(where), None, sort_by_label=sort_by_label,
        )
        got = np.asarray(jax.jit(_windows.first_same_label)(batch))
        want = np.asarray(_windows.first_positive(batch.pos))
        plain = np.asarray(batch.row_labels) != top
        assert np.any(plain & (np.asarray(batch.pos_count) > 0))
        np.testing.assert_array_equal(got[plain], want[plain])
        # Rows of the largest label: a start at or before the first positive, which the
        # slotted paths' window check makes exact.
        assert np.all(got <= want) and np.all(got >= 0)
        if sort_by_label:  # some row comes first in its label run: its first positive is
            # the next column (rows are columns, in the same order, without axis_name)
            own = np.asarray(batch.row_ids)
            assert np.any((want == own + 1) & (np.asarray(batch.pos_count) > 0) & plain)


def test_safe_sqrt_value_and_derivatives():
    sq = np.array([-1.0, 0.0, 1e-13, 1e-12, 2e-12, 1e-6, 0.25, 1.0, 4.0, 1e30], np.float32)
    positive = sq > 1e-12
    root = np.where(positive, np.sqrt(np.where(positive, sq, 1.0)), 0.0).astype(np.float32)
    np.testing.assert_array_equal(jax.jit(distances.safe_sqrt)(jnp.asarray(sq)), root)
    slope = np.where(positive, 0.5 / np.where(positive, root, 1.0), 0.0).astype(np.float32)
    grad = jax.jit(jax.vmap(jax.grad(distances.safe_sqrt)))(jnp.asarray(sq))
    np.testing.assert_array_equal(grad, slope)  # reverse mode: 0 at and below the floor
    forward = jax.jit(jax.vmap(jax.jacfwd(distances.safe_sqrt)))(jnp.asarray(sq))
    np.testing.assert_array_equal(forward, slope)
    second = jax.vmap(jax.grad(jax.grad(distances.safe_sqrt)))(jnp.asarray(sq))
    want = np.where(positive, -0.25 * np.where(positive, sq, 1.0) ** -1.5, 0.0)
    assert np.all(np.isfinite(np.asarray(second)))
    np.testing.assert_allclose(second, want, rtol=1e-5)


def test_normalized_squared_norms_are_those_of_l2_normalize_exactly():
    """1 with zero gradient for a row of norm >= 1e-12 (where summing the normalised row's
    squares rounds), ||x||^2 / 1e-24 below it, 0 for a zero row; no NaN for huge rows."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(6, 7)).astype(np.float32) * np.float32([[1.0], [1e-3], [1e3], [1.0],
                                                                  [1.0], [1.0]])
    x[3] = 0.0
    x[4] *= 1e-13 / np.linalg.norm(x[4])  # below the norm floor: l2_normalize leaves it short
    x[5] *= 1e30 / np.linalg.norm(x[5])  # its squared norm overflows float32
    norms = distances.normalized_squared_norms(x)
    np.testing.assert_array_equal(np.asarray(norms)[[0, 1, 2, 5]], 1.0)
    assert norms[3] == 0.0
    np.testing.assert_allclose(norms[4], 1e-2, rtol=1e-6)
    plain = jnp.sum(jnp.square(distances.l2_normalize(x[:5])), axis=1)
    np.testing.assert_allclose(norms[:5], plain, rtol=1e-6)
    w = jnp.asarray(rng.normal(size=6), jnp.float32)
    grad = jax.grad(lambda x: jnp.sum(w * distances.normalized_squared_norms(x)))(x)
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(np.asarray(grad)[[0, 1, 2, 3, 5]], 0.0)
    np.testing.assert_allclose(grad[4], 2 * w[4] * x[4] / 1e-24, rtol=1e-6)


def test_augmented_squared_distances_stacks_every_block():
    # One, two and three blocks of different widths (the same array twice among them, an
    # empty last block): each column is that block row's squared distance, in block order.
    rng = np.random.default_rng(11)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    a = rng.normal(size=(3, 7)).astype(np.float32)
    b = rng.normal(size=(6, 7)).astype(np.float32)
    empty = np.zeros((0, 7), np.float32)
    for blocks in ((a,), (x, x), (a, x, b), (x, a, x), (a, b, empty)):
        got = np.asarray(jax.jit(_batch.augmented_squared_distances)(x, *blocks))
        every = np.concatenate(blocks).astype(np.float64)
        want = np.sum((x[:, None, :].astype(np.float64) - every[None]) ** 2, axis=-1)
        assert got.shape == want.shape
        # float32's expansion |x|^2 + |y|^2 - 2 x.y: measured <= 1.7e-7 of |x|^2 + |y|^2
        scale = np.sum(x.astype(np.float64) ** 2, 1)[:, None] + np.sum(every ** 2, 1)[None]
        assert np.all(np.abs(got - want) <= 4e-7 * scale), np.max(np.abs(got - want) / scale)
