"""Seed-paper losses against NumPy loop references: values, gradients (with the stop-gradient
weights frozen), edge cases, bfloat16, padding, invariances, vmap, bad input; and the
symmetrical-synthesis geometry on hand-built 2-D cases.

Compile time dominates, so every test reuses the same few shapes (12 x 5 and 10 x 5).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dml_jax import losses, synthesis
from tests.losses import reference as ref
from tests.losses.cases import (
    SEED,
    SEED_IDS,
    SEED_PAIR_IDS,
    SEED_PAIRS,
    SEED_RELABEL_INVARIANT,
    centers_for,
    logits_of,
)

VALUE_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 2e-3, "atol": 2e-4}
B, D = 12, 5


def bind(case):
    _, fn, reference, kwargs = case
    return functools.partial(fn, **kwargs), functools.partial(reference, **kwargs)


def has_frozen_weights(case):
    name = case[0]
    return name.startswith(("osm", "ranked", "symm_osm"))


def grad_reference(case, reference, e):
    if has_frozen_weights(case):
        return lambda x, y, **kw: reference(x, y, weights_at=e, **kw)
    return reference


def random_batch(seed, b=B, d=D, num_classes=4):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(b, d)).astype(np.float32)
    y = rng.integers(0, num_classes, size=b).astype(np.int32)
    return e, y


def pair_batch(seed, b=B, d=D, num_classes=4):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(b, d)).astype(np.float32)
    y = np.repeat(rng.integers(0, num_classes, size=b // 2), 2).astype(np.int32)
    return e, y


ALL = [(c, random_batch) for c in SEED] + [(c, pair_batch) for c in SEED_PAIRS]
ALL_IDS = SEED_IDS + SEED_PAIR_IDS
# One case per family for the dtype / padding / invariance / vmap checks (compile time
# dominates this suite; values and gradients of every case are checked above).
REPRESENTATIVE = {"osm_caa_logits_official", "ranked_list_official", "center_structured",
                  "demal_hybrid", "npair", "symm_npair_original", "symm_angular",
                  "symm_triplet_semi_hard", "symm_lifted", "symm_osm_caa"}
SOME = [c for c in ALL if c[0][0] in REPRESENTATIVE]
SOME_IDS = [c[0][0] for c in SOME]


@pytest.mark.parametrize(("case", "make"), ALL, ids=ALL_IDS)
def test_value_and_gradient_match_loop_reference(case, make):
    fn, reference = bind(case)
    e, y = make(0)
    where = np.ones(B, bool)
    where[[4, 5]] = False
    for w in (None, where):
        value, grad = jax.value_and_grad(lambda x, w=w: fn(x, y, where=w))(e)
        np.testing.assert_allclose(value, reference(e, y, where=w), **VALUE_TOL)
        g_ref = grad_reference(case, reference, e)
        expected = ref.numerical_grad(lambda x, w=w, g_ref=g_ref: g_ref(x, y, where=w), e)
        np.testing.assert_allclose(grad, expected, **GRAD_TOL)
        assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("t_p,t_n", [(0.0, 10.0), (1.0, 10.0), (0.0, 40.0)])
def test_ranked_list_weight_shifts_match_loop_reference(t_p, t_n):
    """Both ways of shifting the weights: fixed (T_p = 0; |T_n alpha| = 24 <= 80) and the row
    maxima (T_p = 1; T_n alpha = 96)."""
    e, y = random_batch(3)
    kw = {"alpha": 2.4, "margin": 0.8, "t_p": t_p, "t_n": t_n}
    value, grad = jax.value_and_grad(lambda x: losses.ranked_list_loss(x, y, **kw))(e)
    np.testing.assert_allclose(value, ref.ranked_list(e, y, **kw), **VALUE_TOL)
    expected = ref.numerical_grad(lambda x: ref.ranked_list(x, y, weights_at=e, **kw), e)
    np.testing.assert_allclose(grad, expected, **GRAD_TOL)
    assert np.abs(grad).max() > 1e-3


@pytest.mark.parametrize("class_size,t_p", [(2, 1.0), (5, 0.0), (20, 1.0), (33, 0.0)])
def test_ranked_list_every_positive_set_size_matches_reference(class_size, t_p):
    """The positive lists are summed on each row's window of 2, 8 or 32 label-ordered columns
    (the smallest that holds the largest class, the row itself included), or over whole rows
    for a class of 33: each path, with uniform and exponential positive weights, against the
    loop reference. The rows come shuffled, so only the label order makes a class one run."""
    rng = np.random.default_rng(class_size)
    y = np.concatenate([np.zeros(class_size), [1, 1, 2, 2, 3]]).astype(np.int32)
    e, y = rng.normal(size=(len(y), 2)).astype(np.float32), y[rng.permutation(len(y))]
    kw = {"alpha": 2.4, "margin": 1.6, "t_p": t_p}
    value, grad = jax.value_and_grad(lambda x: losses.ranked_list_loss(x, y, **kw))(e)
    np.testing.assert_allclose(value, ref.ranked_list(e, y, **kw), **VALUE_TOL)
    expected = ref.numerical_grad(lambda x: ref.ranked_list(x, y, weights_at=e, **kw), e)
    np.testing.assert_allclose(grad, expected, **GRAD_TOL)


OSM_LAYOUTS = {  # labels in batch order: each class one run of columns, except "split"
    "pairs": [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5],  # windows of 2
    "class_5": [0] * 5 + [1, 1, 2, 2, 3],  # 8
    "class_20": [1, 1] + [0] * 20 + [2, 2, 3],  # 32
    "class_33": [0] * 33 + [1, 1, 2, 2, 3],  # more than 32: whole rows
    "split": [0, 0, 0, 1, 1, 0, 2, 2, 3, 3],  # label 0 in two runs: whole rows
}


@pytest.mark.parametrize("layout", sorted(OSM_LAYOUTS))
def test_osm_caa_every_positive_run_matches_reference(layout):
    """OSM + CAA sums its positive pairs on each row's window of 2, 8 or 32 columns when every
    label is one run of consecutive columns (as in a P x K batch), else over whole rows: each
    path, with attention from logits and a padding row inside a run, against the loop
    reference."""
    y = np.asarray(OSM_LAYOUTS[layout], np.int32)
    rng = np.random.default_rng(len(y))
    e = rng.normal(size=(len(y), 3)).astype(np.float32)
    logits = rng.normal(size=(len(y), 6)).astype(np.float32)
    where = np.ones(len(y), bool)
    where[1] = False
    value, grad = jax.value_and_grad(
        lambda x: losses.osm_caa_loss(x, y, logits, where=where)
    )(e)
    reference = functools.partial(ref.osm_caa, y=y, logits=logits, where=where)
    np.testing.assert_allclose(value, reference(e), **VALUE_TOL)
    expected = ref.numerical_grad(lambda x: reference(x, weights_at=e), e)
    np.testing.assert_allclose(grad, expected, **GRAD_TOL)


@pytest.mark.parametrize(
    "case", [c for c in SEED + SEED_PAIRS if has_frozen_weights(c)],
    ids=[c[0] for c in SEED + SEED_PAIRS if has_frozen_weights(c)],
)
def test_weights_are_constants(case):
    """The gradient equals that of the loss with its weights frozen at their current values,
    and differs from the gradient with the weights flowing."""
    fn, reference = bind(case)
    make = pair_batch if case in SEED_PAIRS else random_batch
    e, y = make(1)
    e = 0.5 * e  # keep negatives inside the margins so that weights matter
    grad = jax.grad(lambda x: fn(x, y))(e)
    g_frozen = ref.numerical_grad(lambda x: reference(x, y, weights_at=e), e)
    g_flowing = ref.numerical_grad(lambda x: reference(x, y), e)
    np.testing.assert_allclose(grad, g_frozen, **GRAD_TOL)
    assert np.max(np.abs(g_flowing - g_frozen)) > 1e-2


@pytest.mark.parametrize(("case", "make"), SOME, ids=SOME_IDS)
def test_bfloat16_input_computes_in_float32(case, make):
    fn, reference = bind(case)
    e, y = make(5)
    e16 = jnp.asarray(e, jnp.bfloat16)
    value, grad = jax.value_and_grad(fn)(e16, y)
    assert value.dtype == jnp.float32
    assert grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(value, reference(np.asarray(e16, np.float64), y), **VALUE_TOL)
    assert np.all(np.isfinite(np.asarray(grad, np.float32)))


EDGE_LABELS = {
    "one_class": np.zeros(B, np.int32),
    "all_distinct": np.arange(B),
    "singletons": np.array([0, 0, 0, 1, 2, 2, 2, 3, 3, 3, 3, 4]),
}
PAIR_EDGE_LABELS = {
    "one_class": np.zeros(B, np.int32),
    "all_distinct_pairs": np.repeat(np.arange(B // 2), 2),
}


@pytest.mark.parametrize(("case", "make"), ALL, ids=ALL_IDS)
def test_label_edge_cases_and_degenerate_points(case, make):
    fn, reference = bind(case)
    e, _ = make(3)
    table = PAIR_EDGE_LABELS if make is pair_batch else EDGE_LABELS
    for y in table.values():
        y = y.astype(np.int32)
        if case[0].startswith(("center", "demal")):  # labels must index logits / centers
            y = y % 8
        value, grad = jax.value_and_grad(fn)(e, y)
        np.testing.assert_allclose(value, reference(e, y), **VALUE_TOL)
        g_ref = grad_reference(case, reference, e)
        np.testing.assert_allclose(
            grad, ref.numerical_grad(lambda x, y=y, g_ref=g_ref: g_ref(x, y), e), **GRAD_TOL
        )
    # Duplicates, a zero vector and a batch of identical points stay finite.
    e2, y2 = make(4)
    e2 = e2 / np.linalg.norm(e2, axis=1, keepdims=True)
    e2[1] = e2[0]
    e2[6] = e2[0]
    e2[7] = 0.0
    for x in (e2, np.ones_like(e2)):
        value, grad = jax.value_and_grad(fn)(x, y2)
        assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize(("case", "make"), SOME, ids=SOME_IDS)
def test_padding_rows_take_no_part(case, make):
    fn, _ = bind(case)
    e, y = make(6)
    e10, y10 = e[:10], y[:10]
    pad_e = e.copy()
    pad_e[10:] = 100.0
    pad_y = y.copy()
    pad_y[10:] = y[0]
    where = np.arange(B) < 10
    v0, g0 = jax.value_and_grad(fn)(e10, y10)
    v1, g1 = jax.value_and_grad(fn)(pad_e, pad_y, where=where)
    np.testing.assert_allclose(v1, v0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g1[:10], g0, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(g1[10:], 0.0)
    v2, g2 = jax.value_and_grad(fn)(pad_e, pad_y, where=np.zeros(B, bool))
    if case[0] != "center_structured":  # its center-separation term does not see the rows
        assert v2 == 0.0
    np.testing.assert_array_equal(g2, 0.0)


@pytest.mark.parametrize(("case", "make"), SOME, ids=SOME_IDS)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_permutation_and_relabelling_invariance(case, make, data):
    fn, _ = bind(case)
    e, y = make(data.draw(st.integers(0, 10_000)))
    if make is pair_batch:  # permute whole pairs
        order = np.asarray(data.draw(st.permutations(list(range(B // 2)))))
        perm = np.stack([2 * order, 2 * order + 1], axis=1).reshape(-1)
    else:
        perm = np.asarray(data.draw(st.permutations(list(range(B)))))
    base = fn(e, y)
    np.testing.assert_allclose(fn(e[perm], y[perm]), base, rtol=1e-5, atol=1e-6)
    if case[0] in SEED_RELABEL_INVARIANT or make is pair_batch:
        mapping = np.asarray(data.draw(st.permutations(list(range(4))))) * 7 + 3
        np.testing.assert_allclose(fn(e, mapping[y]), base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("case", "make"), SOME, ids=SOME_IDS)
def test_vmap_equals_python_loop(case, make):
    fn, _ = bind(case)
    batches = [make(s) for s in range(3)]
    es = np.stack([b[0] for b in batches])
    ys = np.stack([b[1] for b in batches])
    where = np.ones(ys.shape, bool)
    where[1, -2:] = False
    looped = [fn(es[i], ys[i], where=where[i]) for i in range(3)]
    vmapped = jax.vmap(lambda e, y, w: fn(e, y, where=w))(es, ys, where)
    np.testing.assert_allclose(vmapped, looped, rtol=1e-5, atol=1e-7)


def test_bad_input_raises_clear_errors():
    e, y = random_batch(0)
    lg = logits_of(e)
    for fn in (losses.osm_caa_loss, losses.ranked_list_loss, losses.npair_loss,
               synthesis.symmetric_triplet_loss):
        with pytest.raises(ValueError, match=r"embeddings.*\[B, D\]"):
            fn(e[:, 0], y)
        with pytest.raises(ValueError, match="integer"):
            fn(e, y.astype(np.float32))
        with pytest.raises(ValueError, match="where"):
            fn(e, y, where=np.ones(5, bool))
    with pytest.raises(ValueError, match=r"logits.*\(11, 8\)"):
        losses.osm_caa_loss(e, y, lg[:11])
    with pytest.raises(ValueError, match=r"logits.*\[B, C\]"):
        losses.demal_hybrid_loss(e, y, lg[:, 0])
    with pytest.raises(ValueError, match="kernel"):
        losses.osm_caa_loss(e, y, kernel="gauss")
    with pytest.raises(ValueError, match="attention"):
        losses.osm_caa_loss(e, y, lg, attention="prob")
    with pytest.raises(ValueError, match="query_weighting"):
        losses.ranked_list_loss(e, y, query_weighting="pairs")
    with pytest.raises(ValueError, match=r"centers.*D = 5.*\(8, 4\)"):
        losses.center_loss(e, y, np.zeros((8, 4), np.float32))
    with pytest.raises(ValueError, match="centers"):
        losses.update_centers(np.zeros((8,), np.float32), e, y)
    with pytest.raises(ValueError, match="mining"):
        synthesis.symmetric_triplet_loss(e, y, mining="hardest")
    with pytest.raises(ValueError, match="positive"):
        synthesis.symmetric_npair_loss(e, y, positive="diag")
    with pytest.raises(ValueError, match=r"pairs.*even.*11"):
        losses.angular_loss(e[:11], y[:11])


def test_osm_caa_with_explicit_logits_both_kernels():
    e, y = random_batch(7)
    lg = np.random.default_rng(7).normal(size=(B, 4)).astype(np.float32) * 2
    for kw in ({}, {"kernel": "official"}, {"attention": "gaussian"}):
        v, g = jax.value_and_grad(lambda x, kw=kw: losses.osm_caa_loss(x, y, lg, **kw))(e)
        np.testing.assert_allclose(v, ref.osm_caa(e, y, lg, **kw), **VALUE_TOL)
        expected = ref.numerical_grad(
            lambda x, kw=kw: ref.osm_caa(x, y, lg, weights_at=e, **kw), e)
        np.testing.assert_allclose(g, expected, **GRAD_TOL)
    # No gradient reaches the classifier through the attention weights.
    g_logits = jax.grad(lambda z: losses.osm_caa_loss(e, y, z))(lg)
    np.testing.assert_array_equal(g_logits, 0.0)


def test_ranked_list_no_nontrivial_positive_is_not_nan():
    e = np.array([[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]], np.float32)
    y = np.array([0, 0, 1, 1], np.int32)
    value, grad = jax.value_and_grad(losses.ranked_list_loss)(e, y)
    assert value == 0.0 and np.all(grad == 0.0)
    for qw in ("uniform", "official"):
        big = jax.value_and_grad(
            lambda x, qw=qw: losses.ranked_list_loss(x, y, t_p=50.0, t_n=50.0,
                                                     query_weighting=qw))(10.0 * e)
        assert np.isfinite(big[0]) and np.all(np.isfinite(big[1]))


def test_update_centers_matches_reference_and_moves_toward_class_mean():
    e, y = random_batch(8)
    c = centers_for(D)
    where = np.ones(B, bool)
    where[2] = False
    new = losses.update_centers(c, e, y, alpha=0.3, where=where)
    np.testing.assert_allclose(new, ref.update_centers(c, e, y, alpha=0.3, where=where),
                               rtol=1e-5, atol=1e-6)
    absent = [j for j in range(c.shape[0]) if j not in set(y[where])]
    np.testing.assert_array_equal(np.asarray(new)[absent], c[absent])
    gc = jax.grad(lambda cc: losses.center_loss(e, y, cc))(c)
    np.testing.assert_allclose(
        gc, ref.numerical_grad(lambda cc: ref.center(e, y, cc), c), **GRAD_TOL)


def test_center_structured_moving_centers_get_no_gradient():
    e, y = random_batch(9)
    c = centers_for(D)
    g = jax.grad(lambda cc: losses.center_structured_loss(
        e, y, logits_of(e), cc, learn_centers=False))(c)
    np.testing.assert_array_equal(g, 0.0)


# --- Symmetrical synthesis geometry. ----------------------------------------------------------


def test_reflection_properties():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(20, 7)).astype(np.float32)
    a = rng.normal(size=(20, 7)).astype(np.float32)
    q = synthesis.reflect(p, a)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), np.linalg.norm(p, axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.sum(q * a, 1), np.sum(p * a, 1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(synthesis.reflect(q, a), p, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(synthesis.reflect(a, a), a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(synthesis.reflect([[0.0, 1.0]], [[2.0, 0.0]]), [[0.0, -1.0]],
                               atol=1e-7)
    np.testing.assert_allclose(synthesis.reflect([[0.0, 1.0]], [[0.6, 0.8]]), [[0.96, 0.28]],
                               atol=1e-6)
    # A zero axis gives -p, finite, with a finite gradient.
    np.testing.assert_allclose(synthesis.reflect([[1.0, 2.0]], [[0.0, 0.0]]), [[-1.0, -2.0]])
    g = jax.grad(lambda x: jnp.sum(synthesis.reflect(p[:1], x)))(np.zeros((1, 7), np.float32))
    assert np.all(np.isfinite(g))


def test_first_max_is_argmax_with_ties_to_the_first():
    """The similarity-max losses pick each entry's combination of points by `first_max`: the
    first maximum, as argmax over the stacked values (ties are common: coinciding points)."""
    from dml_jax.losses._pairs import first_max

    rng = np.random.default_rng(0)
    values = rng.integers(0, 3, size=(12, 40, 30)).astype(np.float32)  # many exact ties
    values[:, 0, 0] = -np.inf
    np.testing.assert_array_equal(first_max([jnp.asarray(v) for v in values]),
                                  np.argmax(values, axis=0))


def test_mined_negative_is_the_hardest_of_four_on_hand_built_2d_cases():
    # Pair 0 (class 0): (1, 0), (1, 0.1). Pair 1 (class 1): x_k = (0, 1), x_l = (0.6, 0.8):
    #   x'_k = reflect(x_k about x_l) = (0.96, 0.28), x'_l = reflect(x_l about x_k) = (-0.6, 0.8).
    #   From (1, 0): d(x_k) = 1.414, d(x_l) = 0.894, d(x'_k) = sqrt(0.08) = 0.283, d(x'_l) = 1.789.
    # Pair 2 (class 2): x_k = (0.9, 0.1), x_l = (0, -1): x'_k = (-0.9, 0.1), x'_l = (-0.22, 0.98)
    #   From (1, 0): d(x_k) = sqrt(0.02) = 0.141 is the hardest (an original point).
    e = np.array([[1, 0], [1, 0.1], [0, 1], [0.6, 0.8], [0.9, 0.1], [0, -1]], np.float32)
    y = np.array([0, 0, 1, 1, 2, 2], np.int32)
    dist, choice, mask = synthesis.symmetric_hard_negatives(e, y)
    np.testing.assert_array_equal(mask, np.array([[0, 1, 1]] * 2 + [[1, 0, 1]] * 2
                                                 + [[1, 1, 0]] * 2, bool))
    assert choice[0, 1] == 2 and choice[0, 2] == 0
    np.testing.assert_allclose(dist[0, 1], np.sqrt(0.08), rtol=1e-4)
    np.testing.assert_allclose(dist[0, 2], np.sqrt(0.02), rtol=1e-4)
    # Every entry against brute force over the four explicit candidate points.
    for i in range(6):
        for k in range(3):
            if not mask[i, k]:
                continue
            xk, xl = e[2 * k], e[2 * k + 1]
            cands = [xk, xl, ref.reflect(xk, xl), ref.reflect(xl, xk)]
            ds = [np.linalg.norm(e[i] - c) for c in cands]
            assert choice[i, k] == int(np.argmin(ds)), (i, k, ds)
            np.testing.assert_allclose(dist[i, k], min(ds), rtol=1e-4, atol=1e-6)


def test_symmetric_losses_reduce_to_plain_ones_when_synthesis_cannot_help():
    """With one point per class pair far away, symmetric triplet(all) equals the plain loss
    restricted to the mined negatives: checked through the reference on random data instead."""
    e, y = pair_batch(11)
    for fn, reference in ((synthesis.symmetric_triplet_loss, ref.symmetric_triplet),
                          (synthesis.symmetric_contrastive_loss, ref.symmetric_contrastive)):
        np.testing.assert_allclose(fn(e, y), reference(e, y), **VALUE_TOL)
