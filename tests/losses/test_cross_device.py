"""The axis_name contract on 8 simulated devices: shard_map (both vma modes), pmap, sharded jit.

Each mode's value and per-device gradient must equal the single-device loss of the global batch
and its gradient rows.
"""

from __future__ import annotations

import json

import pytest

from tests._subprocess import run_with_devices

CODE = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tests.losses.cases import BASELINE, bind

n = jax.device_count()
assert n == 8, n
mesh = Mesh(np.array(jax.devices()), ("d",))
rng = np.random.default_rng(0)
B = 32
e = rng.normal(size=(B, 6)).astype(np.float32)
y = np.repeat(np.arange(8), 4)[rng.permutation(B)].astype(np.int32)
where = np.ones(B, bool); where[[3, 17, 30]] = False

report = {}
for case in BASELINE:
    name = case[0]
    fn, _ = bind(case)
    ref_v, ref_g = jax.value_and_grad(lambda e: fn(e, y, where=where))(e)
    out = {}

    def local(e_l, y_l, w_l):
        return jax.value_and_grad(lambda x: fn(x, y_l, where=w_l, axis_name="d"))(e_l)

    for check_vma in (False,):
        f = jax.shard_map(
            lambda e_l, y_l, w_l: (lambda vg: (vg[0][None], vg[1]))(local(e_l, y_l, w_l)),
            mesh=mesh, in_specs=(P("d"), P("d"), P("d")), out_specs=(P("d"), P("d")),
            check_vma=check_vma)
        v, g = jax.jit(f)(e, y, where)
        out[f"shard_map_vma{check_vma}"] = (np.asarray(v), np.asarray(g))
    # With check_vma the loss is typed replicated and can be returned with out_specs=P().
    f = jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P("d"), P("d")),
                      out_specs=(P(), P("d")))
    v, g = jax.jit(f)(e, y, where)
    out["shard_map_replicated"] = (np.full(n, float(v)), np.asarray(g))
    v, g = jax.pmap(local, axis_name="d")(
        e.reshape(n, -1, 6), y.reshape(n, -1), where.reshape(n, -1))
    out["pmap"] = (np.asarray(v), np.asarray(g).reshape(B, 6))
    sharded = NamedSharding(mesh, P("d"))
    es, ys, ws = (jax.device_put(a, sharded) for a in (e, y, where))
    v, g = jax.jit(jax.value_and_grad(lambda e, y, w: fn(e, y, where=w)))(es, ys, ws)
    out["sharded_jit"] = (np.full(n, float(v)), np.asarray(g))
    report[name] = {
        mode: [float(np.max(np.abs(v - ref_v))), float(np.max(np.abs(g - ref_g))),
               float(abs(ref_v)), float(np.max(np.abs(ref_g)))]
        for mode, (v, g) in out.items()
    }
print("REPORT" + json.dumps(report))
"""


@pytest.mark.multidevice
def test_axis_name_contract_on_eight_devices():
    stdout = run_with_devices(CODE, num_devices=8)
    report = json.loads(stdout.split("REPORT", 1)[1])
    assert set(report) >= {"contrastive", "triplet_all", "lifted", "multi_similarity"}
    for loss, modes in report.items():
        assert set(modes) == {
            "shard_map_vmaFalse", "shard_map_replicated", "pmap",
            "sharded_jit",
        }
        for mode, (dv, dg, v, g) in modes.items():
            # Same float32 terms summed in another order: agreement to a few ulps of the scale.
            assert dv <= 1e-5 * max(1.0, v), (loss, mode, dv, v)
            assert dg <= 1e-5 * max(1e-2, g), (loss, mode, dg, g)
            assert g > 0, (loss, "degenerate test: zero reference gradient")
