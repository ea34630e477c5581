"""The view's Gram matrix: its hand-written gradient against autodiff of the plain products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
