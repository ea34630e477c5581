"""The axis_name contract of the seed-paper losses on 8 simulated devices, in one fresh process:
shard_map (check_vma=True, replicated out_specs=P()), pmap and sharded jit must each give the
single-device value of the global batch and its gradient rows. (In jax 0.10 ``pmap`` is
``shard_map`` with ``check_vma=False``, so it stands for that mode too; the baseline losses'
test, ``test_cross_device.py``, runs both explicitly.) Also ``update_centers`` over the global
batch."""

from __future__ import annotations

import json

import pytest

from tests._subprocess import run_with_devices

CODE = r"""
import json
import functools
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dml_jax import losses
from tests.losses.cases import SEED, SEED_PAIRS, centers_for

# One case per code path (compile time): center_loss runs inside center_structured, the
# other symmetric wrappers share symmetric_view with symm_lifted / symm_osm_caa (batch-hard:
# its sparse gradient rebuilds the mined points from the gathered columns).
NAMES = {"osm_caa_logits_official", "ranked_list_official", "center_structured",
         "demal_hybrid", "npair", "angular", "symm_npair", "symm_angular_original",
         "symm_triplet_semi_hard", "symm_triplet_batch_hard", "symm_lifted", "symm_osm_caa"}
n = jax.device_count()
assert n == 8, n
mesh = Mesh(np.array(jax.devices()), ("d",))
rng = np.random.default_rng(0)
B, D = 32, 6
e = rng.normal(size=(B, D)).astype(np.float32) * 0.6
y_any = np.repeat(np.arange(8), 4)[rng.permutation(B)].astype(np.int32)
y_pairs = np.repeat(rng.integers(0, 6, size=B // 2), 2).astype(np.int32)
where = np.ones(B, bool); where[[3, 17, 30, 31]] = False

report = {}
for case in SEED + SEED_PAIRS:
    name, fn0, _, kw = case
    if name not in NAMES:
        continue
    fn = functools.partial(fn0, **kw)
    y = y_pairs if case in SEED_PAIRS else y_any
    ref_v, ref_g = jax.value_and_grad(lambda e: fn(e, y, where=where))(e)
    out = {}
    def local(e_l, y_l, w_l):
        return jax.value_and_grad(lambda x: fn(x, y_l, where=w_l, axis_name="d"))(e_l)
    f = jax.shard_map(local, mesh=mesh, in_specs=(P("d"),) * 3, out_specs=(P(), P("d")))
    v, g = jax.jit(f)(e, y, where)
    out["shard_map_replicated"] = (np.full(n, float(v)), np.asarray(g))
    v, g = jax.pmap(local, axis_name="d")(e.reshape(n, -1, D), y.reshape(n, -1),
                                          where.reshape(n, -1))
    out["pmap"] = (np.asarray(v), np.asarray(g).reshape(B, D))
    sh = NamedSharding(mesh, P("d"))
    es, ys, ws = (jax.device_put(a, sh) for a in (e, y, where))
    v, g = jax.jit(jax.value_and_grad(lambda e, y, w: fn(e, y, where=w)))(es, ys, ws)
    out["sharded_jit"] = (np.full(n, float(v)), np.asarray(g))
    report[name] = {m: [float(np.max(np.abs(v - ref_v))), float(np.max(np.abs(g - ref_g))),
                        float(abs(ref_v)), float(np.max(np.abs(ref_g)))]
                    for m, (v, g) in out.items()}

c = centers_for(D)
ref_c = losses.update_centers(c, e, y_any, where=where)
got = jax.pmap(lambda e_l, y_l, w_l: losses.update_centers(c, e_l, y_l, where=w_l, axis_name="d"),
               axis_name="d")(e.reshape(n, -1, D), y_any.reshape(n, -1), where.reshape(n, -1))
report["update_centers"] = float(np.max(np.abs(np.asarray(got) - np.asarray(ref_c)[None])))
print("REPORT" + json.dumps(report))
"""


@pytest.mark.multidevice
def test_seed_losses_axis_name_contract_on_eight_devices():
    stdout = run_with_devices(CODE, num_devices=8)
    report = json.loads(stdout.split("REPORT", 1)[1])
    assert report.pop("update_centers") <= 1e-6
    assert len(report) == 12, sorted(report)
    for loss, modes in report.items():
        assert set(modes) == {"shard_map_replicated", "pmap", "sharded_jit"}
        for mode, (dv, dg, v, g) in modes.items():
            assert dv <= 1e-5 * max(1.0, v), (loss, mode, dv, v)
            assert dg <= 1e-5 * max(1e-2, g), (loss, mode, dg, g)
            assert g > 0, (loss, "degenerate test: zero reference gradient")
