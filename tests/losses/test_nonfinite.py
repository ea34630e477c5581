"""Non-finite input: a NaN or inf in a valid row makes every loss non-finite (so a training loop
that checks the loss sees it), while a row masked out by ``where`` takes no part at all, whatever
it holds. Also under vmap and on 8 devices, where the global batch decides."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax import _checks, losses
from tests._subprocess import run_with_devices
from tests.losses import cases

ALL = cases.BASELINE + cases.SEED + cases.SEED_PAIRS
ALL_IDS = [c[0] for c in ALL]
PAIR_IDS = set(cases.SEED_PAIR_IDS)
B, D, BAD_ROW = 16, 6, 5
BAD_VALUES = [np.nan, np.inf, -np.inf]


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    e = (rng.normal(size=(B, D)) * 0.6).astype(np.float32)
    y = np.repeat(np.arange(B // 2), 2).astype(np.int32)  # pairs (2k, 2k+1): every layout
    return e, y


def _fn(case):
    fn, _ = cases.bind(case)
    return fn


def _masked_rows(case_id: str) -> list[int]:
    # A pair-layout loss drops a whole pair when one of its rows is masked.
    return [BAD_ROW - 1, BAD_ROW] if case_id in PAIR_IDS else [BAD_ROW]


# Each test compiles its loss once and feeds it every bad value (same shapes, same program).
@pytest.mark.parametrize("case", ALL, ids=ALL_IDS)
def test_a_nonfinite_valid_row_gives_a_nonfinite_loss(case):
    fn = jax.jit(_fn(case))
    e, y = _batch()
    assert np.isfinite(float(fn(e, y)))
    for bad in BAD_VALUES:
        e_bad = e.copy()
        e_bad[BAD_ROW, 2] = bad
        value = float(fn(e_bad, y))
        assert not np.isfinite(value), (case[0], bad, value)


@pytest.mark.parametrize("case", ALL, ids=ALL_IDS)
def test_a_masked_nonfinite_row_takes_no_part(case):
    fn = _fn(case)
    e, y = _batch(1)
    where = np.ones(B, bool)
    masked = _masked_rows(case[0])
    where[masked] = False
    vg = jax.jit(jax.value_and_grad(lambda x: fn(x, y, where=where)))
    clean_value, clean_grad = vg(e)
    for bad in BAD_VALUES:
        e_bad = e.copy()
        e_bad[BAD_ROW, :] = bad
        value, grad = vg(e_bad)
        assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad))), (case[0], bad)
        assert float(value) == float(clean_value), (case[0], bad, float(value))
        np.testing.assert_array_equal(np.asarray(grad), np.asarray(clean_grad))
        np.testing.assert_array_equal(np.asarray(grad)[masked], 0.0)


@pytest.mark.parametrize("case", [c for c in ALL if c[0] in
                                  {"contrastive", "triplet_semi_hard", "osm_caa_logits",
                                   "symm_npair", "center_structured"}],
                         ids=lambda c: c[0])
def test_vmap_flags_only_the_nonfinite_batch(case):
    fn = _fn(case)
    e, y = _batch(2)
    bad = e.copy()
    bad[BAD_ROW, 0] = np.nan
    values = np.asarray(jax.jit(jax.vmap(lambda x: fn(x, y)))(jnp.stack([e, bad, e])))
    assert np.isfinite(values[0]) and np.isfinite(values[2]) and not np.isfinite(values[1])
    assert values[0] == values[2]
    np.testing.assert_allclose(values[0], float(fn(e, y)), rtol=1e-6)  # batched rounding


def test_nonfinite_logits_and_centers_give_a_nonfinite_loss():
    e, y = _batch(3)
    logits = np.asarray(cases.logits_of(e))
    centers = cases.centers_for(D)
    for bad_logits, bad_centers in ((True, False), (False, True)):
        lg, c = logits.copy(), centers.copy()
        if bad_logits:
            lg[BAD_ROW, 1] = np.nan
        if bad_centers:
            c[2, 0] = np.inf
        values = {
            "center": losses.center_loss(e, y, c),
            "center_structured": losses.center_structured_loss(e, y, lg, c),
            "osm_caa": losses.osm_caa_loss(e, y, lg),
            "demal_hybrid": losses.demal_hybrid_loss(e, y, lg),
        }
        for name, v in values.items():
            depends = (bad_logits and name != "center") or (
                bad_centers and name.startswith("center"))
            assert np.isfinite(float(v)) != depends, (name, bad_logits, bad_centers, float(v))
    # A masked row's logits take no part either.
    lg = logits.copy()
    lg[BAD_ROW] = np.inf
    where = np.ones(B, bool)
    where[BAD_ROW] = False
    for fn in (losses.osm_caa_loss, losses.demal_hybrid_loss):
        v, g = jax.value_and_grad(lambda x, fn=fn: fn(x, y, lg, where=where))(e)
        v0 = fn(e, y, np.where(where[:, None], logits, 0.0), where=where)
        np.testing.assert_allclose(float(v), float(v0), rtol=1e-6)  # differently fused
        assert np.all(np.isfinite(np.asarray(g)))


def test_any_nonfinite_is_exact_when_squares_overflow():
    # The guard first looks at the rows' sums of squares and takes the exact check only when
    # one is not finite: a finite row whose squares overflow (1e30) must not be flagged.
    rng = np.random.default_rng(4)
    x = rng.normal(size=(6, 5)).astype(np.float32)
    where = np.array([True, True, False, True, True, True])

    def flags(a, w=None):
        return bool(jax.jit(_checks.any_nonfinite)(a, w))

    assert not flags(x) and not flags(x, where)
    huge = x.copy()
    huge[1] *= 1e30
    assert not flags(huge) and not flags(huge, where)
    assert not flags(jnp.asarray(huge, jnp.bfloat16))
    for bad in BAD_VALUES:
        for base in (x, huge):
            a = base.copy()
            a[2, 3] = bad
            assert flags(a) and not flags(a, where), (bad,)
            a[4, 0] = bad
            assert flags(a, where), (bad,)
    assert flags(jnp.asarray(np.where(np.arange(30).reshape(6, 5) == 7, np.inf, x), jnp.bfloat16))
    assert not flags(np.float32(3e30)) and flags(np.float32(np.nan))
    assert not flags(huge.reshape(3, 2, 5)) and flags(np.full((2, 2, 2), np.inf, np.float32))
    assert not flags(np.arange(4))  # integers are never non-finite
    with jax.enable_x64(True):  # the exact check reads x in its own dtype, not float32
        wide = np.full((2, 3), 1e300)
        assert not flags(wide)
        wide[1, 1] = np.inf
        assert flags(wide)
    nan_in_huge = huge.copy()
    nan_in_huge[1, 2] = np.nan
    batched = jax.jit(jax.vmap(_checks.any_nonfinite))(np.stack([x, huge, nan_in_huge]))
    np.testing.assert_array_equal(np.asarray(batched), [False, False, True])
    # A loss on a finite row too long for its squared norm stays finite (not forced to NaN).
    e, y = _batch(5)
    e[BAD_ROW] *= 1e25
    assert np.isfinite(float(losses.cosface_loss(e, y, cases.centers_for(D))))


CODE = r"""
import json, functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from tests.losses import cases

NAMES = {"contrastive", "triplet_all", "triplet_semi_hard", "lifted", "multi_similarity",
         "ranked_list", "osm_caa_logits", "center_structured", "demal_hybrid", "npair",
         "symm_triplet_all", "symm_osm_caa"}
mesh = Mesh(np.array(jax.devices()), ("d",))
n = jax.device_count()
rng = np.random.default_rng(0)
B, D = 32, 6
e = rng.normal(size=(B, D)).astype(np.float32) * 0.6
y = np.repeat(np.arange(B // 2) % 8, 2).astype(np.int32)  # 8 classes: logits/centers have 8
report = {}
for case in cases.BASELINE + cases.SEED + cases.SEED_PAIRS:
    if case[0] not in NAMES:
        continue
    fn, _ = cases.bind(case)
    def per_device(e_l, y_l, w_l, fn=fn):
        return fn(e_l, y_l, where=w_l, axis_name="d")[None]
    f = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("d"),) * 3,
                              out_specs=P("d"), check_vma=False))
    bad = e.copy()
    bad[13, 1] = np.nan  # a row of device 3
    where = np.ones(B, bool)
    valid_nan = np.asarray(f(bad, y, where))
    where[[12, 13]] = False  # masked (the whole pair, for pair-layout losses)
    masked_nan = np.asarray(f(bad, y, where))
    single = float(fn(e, y, where=where))
    report[case[0]] = [int(np.sum(~np.isfinite(valid_nan))), bool(np.all(np.isfinite(masked_nan))),
                       float(np.max(np.abs(masked_nan - single)))]
print("REPORT" + json.dumps(report))
"""


@pytest.mark.multidevice
def test_the_global_batch_decides_on_eight_devices():
    report = json.loads(run_with_devices(CODE).split("REPORT", 1)[1])
    assert len(report) == 12, sorted(report)
    for name, (num_nonfinite, masked_finite, masked_error) in report.items():
        assert num_nonfinite == 8, (name, "every device must return the non-finite value")
        assert masked_finite, name
        assert masked_error <= 1e-5, (name, masked_error)
