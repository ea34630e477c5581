"""Proxy, margin-softmax and pair-softmax losses (pytorch-metric-learning semantics) against
NumPy loop references and against pytorch-metric-learning itself: values, gradients for the
embeddings and the learned parameters, edge cases, padding, bfloat16, vmap, bad input.

Compile time dominates, so every test reuses the same shapes (8 x 4 rows, 3 classes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax import losses
from tests.losses import reference as ref
from tests.losses import reference_proxy as rp

VALUE_TOL = {"rtol": 1e-4, "atol": 1e-5}
GRAD_TOL = {"rtol": 2e-3, "atol": 2e-4}
B, D, C, K = 8, 4, 3, 2

# name -> (loss, loop reference, every float hyper-parameter at its default, static ones)
LOSSES = {
    "proxy_anchor": (losses.proxy_anchor_loss, rp.proxy_anchor,
                     {"margin": 0.1, "alpha": 32.0}, {}),
    "proxy_nca": (losses.proxy_nca_loss, rp.proxy_nca, {"softmax_scale": 1.0}, {}),
    "arcface": (losses.arcface_loss, rp.arcface, {"margin": 28.6, "scale": 64.0}, {}),
    "cosface": (losses.cosface_loss, rp.cosface, {"margin": 0.35, "scale": 64.0}, {}),
    "soft_triple": (losses.soft_triple_loss, rp.soft_triple,
                    {"la": 20.0, "gamma": 0.1, "margin": 0.01}, {"centers_per_class": K}),
    "supcon": (losses.supcon_loss, rp.supcon, {"temperature": 0.1}, {}),
    "circle": (losses.circle_loss, rp.circle, {"m": 0.4, "gamma": 80.0}, {}),
}
PARAM_ROWS = {"proxy_anchor": C, "proxy_nca": C, "arcface": C, "cosface": C,
              "soft_triple": C * K, "supcon": 0, "circle": 0}

# (id, loss name, hyper-parameters other than the defaults)
CASES = [
    ("proxy_anchor", "proxy_anchor", {}),
    ("proxy_anchor_set", "proxy_anchor", {"margin": 0.3, "alpha": 8.0}),
    ("proxy_nca", "proxy_nca", {}),
    ("proxy_nca_scaled", "proxy_nca", {"softmax_scale": 5.0}),
    ("arcface", "arcface", {}),
    ("arcface_set", "arcface", {"margin": 10.0, "scale": 8.0}),
    ("cosface", "cosface", {}),
    ("soft_triple", "soft_triple", {}),
    ("soft_triple_set", "soft_triple", {"la": 5.0, "gamma": 0.5, "margin": 0.2}),
    ("supcon", "supcon", {}),
    ("supcon_t", "supcon", {"temperature": 0.5}),
    ("circle", "circle", {}),
    ("circle_set", "circle", {"m": 0.25, "gamma": 16.0}),
]
IDS = [c[0] for c in CASES]
# One case per loss (defaults) for the dtype / vmap / PML / edge checks.
ONE_EACH = [c for c in CASES if c[0] == c[1]]
ONE_EACH_IDS = [c[0] for c in ONE_EACH]


def has_param(name):
    return PARAM_ROWS[name] > 0


def _loss_call(name, e, y, p, where, kw):
    fn, _, _, static = LOSSES[name]
    args = (e, y, p) if has_param(name) else (e, y)
    return fn(*args, where=where, **kw, **static)


@functools.cache
def _compiled(name, masked, batched=False):
    """Jitted value and (embeddings, parameter) gradients; hyper-parameters are traced, so one
    compilation serves every setting of a loss (compile time dominates this file)."""

    def f(e, y, p, w, kw):
        return _loss_call(name, e, y, p, w if masked else None, kw)

    vg = jax.value_and_grad(f, argnums=(0, 2))
    return jax.jit(jax.vmap(vg) if batched else vg)


def grads(name, e, y, p, where=None, **overrides):
    """``(value, (embeddings gradient, parameter gradient))`` of loss ``name``."""
    kw = {k: jnp.float32(v) for k, v in {**LOSSES[name][2], **overrides}.items()}
    w = np.ones(len(y), bool) if where is None else where
    return _compiled(name, where is not None)(e, y, p, w, kw)


def reference(name, e, y, p, where=None, weights_at=None, **overrides):
    """The loop reference of loss ``name`` (float64)."""
    _, ref_fn, defaults, static = LOSSES[name]
    kw = {**defaults, **overrides, **static}
    if weights_at is not None:
        kw["weights_at"] = weights_at
    if has_param(name):
        return ref_fn(e, y, p, where=where, **kw)
    return ref_fn(e, y, where=where, **kw)


def batch(seed, name=None, b=B, d=D):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(b, d)).astype(np.float32)
    y = rng.integers(0, C, size=b).astype(np.int32)
    rows = PARAM_ROWS[name] if name is not None and has_param(name) else C
    p = rng.normal(size=(rows, d)).astype(np.float32)
    return e, y, p


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_value_and_gradients_match_loop_reference(case):
    _, name, kw = case
    e, y, p = batch(0, name)
    where = np.ones(B, bool)
    where[[2, 5]] = False
    for w in (None, where):
        value, (g_e, g_p) = grads(name, e, y, p, where=w, **kw)
        np.testing.assert_allclose(value, reference(name, e, y, p, where=w, **kw), **VALUE_TOL)
        # circle's weights are stop-gradient constants: finite differences freeze them at e.
        at = e if name == "circle" else None
        expected_e = ref.numerical_grad(
            lambda x, w=w, at=at: reference(name, x, y, p, where=w, weights_at=at, **kw), e)
        np.testing.assert_allclose(g_e, expected_e, **GRAD_TOL)
        assert np.max(np.abs(expected_e)) > 1e-3, "degenerate case: no gradient"
        if has_param(name):
            expected_p = ref.numerical_grad(
                lambda q, w=w: reference(name, e, y, q, where=w, **kw), p)
            np.testing.assert_allclose(g_p, expected_p, **GRAD_TOL)
            assert np.max(np.abs(expected_p)) > 1e-3
        else:
            assert not np.any(g_p)


# --------------------------------------------------------------------------------------------
# pytorch-metric-learning: its classes with their default distance and reducer, except
# MeanReducer for SupConLoss and CircleLoss (whose default is AvgNonZeroReducer).


def _pml(name, num_classes, dim):
    """``(loss object, attribute holding the parameter, whether it is stored transposed)``."""
    pl = pytest.importorskip("pytorch_metric_learning.losses")
    from pytorch_metric_learning import reducers

    if name == "proxy_anchor":
        return pl.ProxyAnchorLoss(num_classes, dim), "proxies", False
    if name == "proxy_nca":
        return pl.ProxyNCALoss(num_classes, dim), "proxies", False
    if name == "arcface":
        return pl.ArcFaceLoss(num_classes, dim), "W", True
    if name == "cosface":
        return pl.CosFaceLoss(num_classes, dim), "W", True
    if name == "soft_triple":
        return pl.SoftTripleLoss(num_classes, dim, centers_per_class=K), "fc", True
    if name == "supcon":
        return pl.SupConLoss(reducer=reducers.MeanReducer()), None, False
    if name == "circle":
        return pl.CircleLoss(reducer=reducers.MeanReducer()), None, False
    raise AssertionError(name)


def pml_value_and_grads(name, e, y, p):
    """float64 torch value, embeddings gradient and parameter gradient (None without one)."""
    torch = pytest.importorskip("torch")
    obj, attr, transposed = _pml(name, C, e.shape[1])
    obj = obj.double()
    if attr is not None:
        p64 = np.asarray(p, np.float64)
        with torch.no_grad():
            getattr(obj, attr).copy_(torch.from_numpy(p64.T.copy() if transposed else p64))
    et = torch.tensor(np.asarray(e, np.float64), requires_grad=True)
    loss = obj(et, torch.from_numpy(np.asarray(y, np.int64)))
    loss.backward()
    g_p = None
    if attr is not None:
        g_p = getattr(obj, attr).grad.numpy()
        g_p = g_p.T if transposed else g_p
    return float(loss.detach()), et.grad.numpy(), g_p


@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_EACH_IDS)
@pytest.mark.parametrize("seed", [1, 2])
def test_matches_pytorch_metric_learning(case, seed):
    name = case[1]
    e, y, p = batch(seed, name)
    if seed == 2:  # a unit-norm batch, as a model head gives, and a class with one sample
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        y = np.array([0, 0, 0, 1, 1, 1, 1, 2], np.int32)
    v_ref, ge_ref, gp_ref = pml_value_and_grads(name, e, y, p)
    value, (g_e, g_p) = grads(name, e, y, p)
    np.testing.assert_allclose(value, v_ref, **VALUE_TOL)
    np.testing.assert_allclose(g_e, ge_ref, **GRAD_TOL)
    assert np.max(np.abs(ge_ref)) > 1e-3
    if has_param(name):
        np.testing.assert_allclose(g_p, gp_ref, **GRAD_TOL)
        assert np.max(np.abs(gp_ref)) > 1e-3


# --------------------------------------------------------------------------------------------
# Edge cases: finite value and gradients, and still the reference's value.

LARGE = {  # the largest scales in use, with their margins
    "proxy_anchor": {"alpha": 64.0, "margin": 0.5},
    "proxy_nca": {"softmax_scale": 64.0},
    "arcface": {"scale": 64.0, "margin": 28.6},
    "cosface": {"scale": 64.0, "margin": 0.5},
    "soft_triple": {"la": 64.0, "gamma": 0.01},
    "supcon": {"temperature": 0.01},
    "circle": {"gamma": 256.0},
}


def edge_batch(kind, name):
    e, y, p = batch(3, name)
    per_class = PARAM_ROWS[name] // C if has_param(name) else 1  # parameter rows per class
    if kind == "one_class":
        y = np.zeros(B, np.int32)
    elif kind == "singletons":  # a class with one sample (pair losses: all but one class)
        y = np.array([0, 0, 0, 1, 1, 1, 1, 2]) if has_param(name) else np.arange(B) % 7
        y = y.astype(np.int32)
    elif kind == "duplicates":  # repeated rows, and rows exactly along (or against) their
        e[1], e[3] = e[0], e[2]  # class's parameter row
        y[1], y[3] = y[0], y[2]
        e[4] = p[y[4] * per_class]
        e[5] = -p[y[5] * per_class]
    elif kind == "zeros":  # zero embeddings and a zero parameter row
        e[[0, 6]] = 0.0
        p[1] = 0.0
    elif kind == "saturated":  # every row 50x a parameter row: a saturated softmax
        rows = np.arange(B) % p.shape[0]
        e = 50.0 * p[rows]
        y = (rows // per_class).astype(np.int32)
    return e, y, p


@pytest.mark.parametrize("kind", ["one_class", "singletons", "duplicates", "zeros", "saturated"])
@pytest.mark.parametrize("large", [False, True], ids=["default", "large_scale"])
@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_EACH_IDS)
def test_edge_cases_are_finite_and_exact(case, large, kind):
    name = case[1]
    kw = LARGE[name] if large else {}
    e, y, p = edge_batch(kind, name)
    value, (g_e, g_p) = grads(name, e, y, p, **kw)
    assert np.isfinite(value)
    assert np.all(np.isfinite(g_e)) and np.all(np.isfinite(g_p))
    # float32 cosines of exactly aligned rows round by ~1e-7, which the scale multiplies.
    np.testing.assert_allclose(value, reference(name, e, y, p, **kw), rtol=1e-4,
                               atol=1e-4 * (64 if large else 1))
    if kind == "one_class" and not has_param(name):  # no negative pair: PML's losses give 0
        assert value == 0.0 and not np.any(g_e)


# --------------------------------------------------------------------------------------------
# Padding, labels outside [0, C), bfloat16, vmap.


@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_EACH_IDS)
def test_masked_rows_take_no_part(case):
    name = case[1]
    e, y, p = batch(4, name)
    where = np.ones(B, bool)
    where[[1, 6]] = False
    e[1] = 1e3  # garbage in the padding rows
    e[6] = e[0]
    y[6] = y[0]
    keep = np.flatnonzero(where)
    value, (g_e, g_p) = grads(name, e, y, p, where=where)
    v_kept, (ge_kept, gp_kept) = grads(name, e[keep], y[keep], p)
    np.testing.assert_allclose(value, v_kept, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(g_e[keep], ge_kept, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_p, gp_kept, rtol=1e-5, atol=1e-6)
    assert not np.any(g_e[~where])
    assert np.max(np.abs(ge_kept)) > 1e-3
    if has_param(name):  # a label outside [0, C) is dropped like a masked row
        y_out = y.copy()
        y_out[[1, 6]] = [-1, 99]
        v_out, (ge_out, gp_out) = grads(name, e, y_out, p)
        np.testing.assert_allclose(v_out, v_kept, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(gp_out, gp_kept, rtol=1e-5, atol=1e-6)
        assert not np.any(ge_out[~where])


@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_EACH_IDS)
def test_every_row_masked_gives_zero(case):
    name = case[1]
    e, y, p = batch(5, name)
    value, (g_e, g_p) = grads(name, e, y, p, where=np.zeros(B, bool))
    assert value == 0.0
    assert not np.any(g_e) and not np.any(g_p)


@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_EACH_IDS)
def test_nonfinite_input_gives_nan_unless_masked(case):
    name = case[1]
    e, y, p = batch(8, name)
    where = np.ones(B, bool)
    where[3] = False
    clean_value, (clean_ge, clean_gp) = grads(name, e, y, p, where=where)
    for bad in (np.nan, np.inf):
        e_bad = e.copy()
        e_bad[3] = bad  # a masked row takes no part, whatever it holds
        value, (g_e, g_p) = grads(name, e_bad, y, p, where=where)
        assert float(value) == float(clean_value)
        np.testing.assert_array_equal(g_e, clean_ge)
        np.testing.assert_array_equal(g_p, clean_gp)
        e_bad[3] = e[3]
        e_bad[5, 1] = bad  # a valid row does not
        assert not np.isfinite(grads(name, e_bad, y, p, where=where)[0])
        if has_param(name):
            p_bad = p.copy()
            p_bad[1, 0] = bad
            assert not np.isfinite(grads(name, e, y, p_bad, where=where)[0])


@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_EACH_IDS)
def test_bfloat16_input_computes_in_float32(case):
    name = case[1]
    e, y, p = batch(6, name)
    e16, p16 = jnp.asarray(e, jnp.bfloat16), jnp.asarray(p, jnp.bfloat16)
    value, (g_e, g_p) = grads(name, e16, y, p16)
    assert value.dtype == jnp.float32
    assert g_e.dtype == jnp.bfloat16 and g_p.dtype == jnp.bfloat16
    expected = reference(name, np.asarray(e16, np.float64), y, np.asarray(p16, np.float64))
    np.testing.assert_allclose(value, expected, **VALUE_TOL)
    assert np.all(np.isfinite(np.asarray(g_e, np.float32)))


@pytest.mark.parametrize("case", ONE_EACH, ids=ONE_EACH_IDS)
def test_vmap_over_batches_equals_a_loop(case):
    name = case[1]
    es, ys, ps = (np.stack(a) for a in zip(*(batch(10 + k, name) for k in range(3))))
    kw = {k: jnp.full(3, v, jnp.float32) for k, v in LOSSES[name][2].items()}
    values, (g_e, g_p) = _compiled(name, False, batched=True)(es, ys, ps, np.ones((3, B), bool),
                                                              kw)
    for k in range(3):
        v, (ge, gp) = grads(name, es[k], ys[k], ps[k])
        np.testing.assert_allclose(values[k], v, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g_e[k], ge, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g_p[k], gp, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input.

PARAM_FNS = [losses.proxy_anchor_loss, losses.proxy_nca_loss, losses.arcface_loss,
             losses.cosface_loss]


@pytest.mark.parametrize("fn", PARAM_FNS, ids=lambda f: f.__name__)
def test_bad_parameter_arrays_are_named(fn):
    e, y, p = batch(7)
    name = "proxies" if "proxy" in fn.__name__ else "weights"
    with pytest.raises(ValueError, match=rf"`{name}` must have shape \[C, D\].*D = 4"):
        fn(e, y, p[:, :3])
    with pytest.raises(ValueError, match=rf"`{name}` must have shape"):
        fn(e, y, p[0])
    with pytest.raises(ValueError, match=rf"`{name}` must be a floating array"):
        fn(e, y, p.astype(np.int32))
    with pytest.raises(ValueError, match=r"`where` must have shape"):
        fn(e, y, p, where=np.ones(B - 1, bool))
    with pytest.raises(ValueError, match=r"`labels` must be an integer array"):
        fn(e, y.astype(np.float32), p)


def test_soft_triple_checks_its_centers():
    e, y, p = batch(7)
    with pytest.raises(ValueError, match=r"`centers` has 3 rows, not a multiple of "
                                         r"`centers_per_class` = 2"):
        losses.soft_triple_loss(e, y, p, centers_per_class=2)
    with pytest.raises(ValueError, match=r"`centers_per_class` must be a positive int"):
        losses.soft_triple_loss(e, y, p, centers_per_class=0)
    with pytest.raises(ValueError, match=r"`centers` must have shape \[C, D\]"):
        losses.soft_triple_loss(e, y, p[:, :2], centers_per_class=1)


@pytest.mark.parametrize("fn", [losses.supcon_loss, losses.circle_loss],
                         ids=lambda f: f.__name__)
def test_pair_losses_check_their_batch(fn):
    e, y, _ = batch(7)
    with pytest.raises(ValueError, match=r"`embeddings` must have shape \[B, D\]"):
        fn(e[0], y)
    with pytest.raises(ValueError, match=r"`labels` has shape"):
        fn(e, y[:-1])


# --------------------------------------------------------------------------------------------
# 8 devices: value, per-device embedding-gradient rows and parameter gradient equal one device.

CROSS_DEVICE = r"""
import json
import jax, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from dml_jax import losses

n = jax.device_count()
assert n == 8, n
mesh = Mesh(np.array(jax.devices()), ("d",))
rng = np.random.default_rng(0)
B, D, C, K = 32, 6, 5, 2
e = rng.normal(size=(B, D)).astype(np.float32)
y = rng.integers(0, C, size=B).astype(np.int32)
where = np.ones(B, bool); where[[3, 17, 30]] = False
CASES = {
    "proxy_anchor": (losses.proxy_anchor_loss, C, {}),
    "proxy_nca": (losses.proxy_nca_loss, C, {"softmax_scale": 3.0}),
    "arcface": (losses.arcface_loss, C, {"scale": 16.0}),
    "cosface": (losses.cosface_loss, C, {"scale": 16.0}),
    "soft_triple": (losses.soft_triple_loss, C * K, {"centers_per_class": K}),
    "supcon": (losses.supcon_loss, 0, {}),
    "circle": (losses.circle_loss, 0, {}),
}
report = {}
for name, (fn, rows, kw) in CASES.items():
    p = rng.normal(size=(max(rows, 1), D)).astype(np.float32)

    def loss(e, y, w, p, axis_name=None, fn=fn, rows=rows, kw=kw):
        args = (e, y, p) if rows else (e, y)
        return fn(*args, where=w, axis_name=axis_name, **kw)

    ref_v, (ref_ge, ref_gp) = jax.value_and_grad(loss, argnums=(0, 3))(e, y, where, p)

    def local(e_l, y_l, w_l, p, loss=loss):
        return jax.value_and_grad(
            lambda e, p: loss(e, y_l, w_l, p, axis_name="d"), argnums=(0, 1))(e_l, p)

    specs = dict(mesh=mesh, in_specs=(P("d"), P("d"), P("d"), P()))
    # check_vma=True (the default): the loss and the replicated parameter's gradient are
    # typed replicated, and that gradient is the full one on every device.
    f = jax.shard_map(local, out_specs=(P(), (P("d"), P())), **specs)
    v, (ge, gp) = jax.jit(f)(e, y, where, p)
    out = {"vma": (np.full(n, float(v)), np.asarray(ge), np.asarray(gp))}
    # check_vma=False (as pmap): each device gets its rows' share of the parameter gradient.
    f = jax.shard_map(
        lambda *a, local=local: (lambda r: (r[0][None], (r[1][0], r[1][1][None])))(local(*a)),
        out_specs=(P("d"), (P("d"), P("d"))), check_vma=False, **specs)
    v, (ge, gp) = jax.jit(f)(e, y, where, p)
    out["no_vma"] = (np.asarray(v), np.asarray(ge), np.asarray(gp).sum(axis=0))
    report[name] = {
        mode: [float(np.max(np.abs(v - ref_v))), float(np.max(np.abs(ge - ref_ge))),
               float(np.max(np.abs(gp - ref_gp))), float(abs(ref_v)),
               float(np.max(np.abs(ref_ge))), float(np.max(np.abs(ref_gp)))]
        for mode, (v, ge, gp) in out.items()
    }
print("REPORT" + json.dumps(report))
"""


@pytest.mark.multidevice
def test_eight_devices_equal_one():
    import json

    from tests._subprocess import run_with_devices

    report = json.loads(run_with_devices(CROSS_DEVICE).split("REPORT", 1)[1])
    assert set(report) == set(LOSSES)
    for name, modes in report.items():
        assert set(modes) == {"vma", "no_vma"}
        for mode, (dv, dge, dgp, v, ge, gp) in modes.items():
            # The same float32 terms summed in another order: a few ulps of the scale.
            assert dv <= 1e-5 * max(1.0, v), (name, mode, dv, v)
            assert dge <= 1e-5 * max(1e-2, ge), (name, mode, dge, ge)
            assert ge > 1e-3, (name, "degenerate: zero reference gradient")
            if has_param(name):
                assert dgp <= 1e-5 * max(1e-2, gp), (name, mode, dgp, gp)
                assert gp > 1e-3, (name, "degenerate: zero parameter gradient")
