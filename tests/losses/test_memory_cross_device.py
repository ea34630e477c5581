"""The cross-batch memory on 8 simulated devices (one fresh process): a replicated memory with
each device's anchors gives the single-device value and per-device gradient rows, and
``xbm_update`` under ``axis_name`` gives the single-device memory of the global batch. The loss
modes: shard_map with ``check_vma=True``, pmap (in jax 0.10 ``shard_map`` with
``check_vma=False``) and sharded jit."""

from __future__ import annotations

import json

import pytest

from tests._subprocess import run_with_devices

CODE = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from dml_jax import losses
from tests.losses.test_memory import CASES

n = jax.device_count()
assert n == 8, n
mesh = Mesh(np.array(jax.devices()), ("d",))
rng = np.random.default_rng(0)
B, D, M = 32, 6, 24
e = rng.normal(size=(B, D)).astype(np.float32)
y = np.repeat(np.arange(8), 4)[rng.permutation(B)].astype(np.int32)
where = np.ones(B, bool); where[[3, 17, 30]] = False
memory = losses.xbm_init(M, D)
for k in range(2):  # 40 rows into 24 slots: wrapped, labels 0..9 (8 and 9 only in memory)
    memory = losses.xbm_update(memory, rng.normal(size=(20, D)).astype(np.float32),
                               rng.integers(0, 10, size=20))

report = {}
for name, fn, _, kwargs in CASES:
    ref_v, ref_g = jax.value_and_grad(lambda e: fn(e, y, where=where, memory=memory, **kwargs))(e)
    out = {}

    def local(e_l, y_l, w_l, m, fn=fn, kwargs=kwargs):
        return jax.value_and_grad(
            lambda x: fn(x, y_l, where=w_l, memory=m, axis_name="d", **kwargs))(e_l)

    specs = (P("d"), P("d"), P("d"), P())
    f = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P("d")))
    v, g = jax.jit(f)(e, y, where, memory)
    out["shard_map_replicated"] = (np.full(n, float(v)), np.asarray(g))
    v, g = jax.pmap(local, axis_name="d", in_axes=(0, 0, 0, None))(
        e.reshape(n, -1, D), y.reshape(n, -1), where.reshape(n, -1), memory)
    out["pmap"] = (np.asarray(v), np.asarray(g).reshape(B, D))
    sharded = NamedSharding(mesh, P("d"))
    es, ys, ws = (jax.device_put(a, sharded) for a in (e, y, where))
    v, g = jax.jit(jax.value_and_grad(
        lambda e, y, w, m: fn(e, y, where=w, memory=m, **kwargs)))(es, ys, ws, memory)
    out["sharded_jit"] = (np.full(n, float(v)), np.asarray(g))
    report[name] = {
        mode: [float(np.max(np.abs(v - ref_v))), float(np.max(np.abs(g - ref_g))),
               float(abs(ref_v)), float(np.max(np.abs(ref_g)))]
        for mode, (v, g) in out.items()
    }

# xbm_update of the global batch, from each device's shard.
expected = losses.xbm_update(memory, e, y, where=where)
upd = lambda e_l, y_l, w_l, m: losses.xbm_update(m, e_l, y_l, where=w_l, axis_name="d")
specs = (P("d"), P("d"), P("d"), P())
got = {
    "shard_map_replicated": jax.jit(jax.shard_map(upd, mesh=mesh, in_specs=specs,
                                                  out_specs=P()))(e, y, where, memory),
    "shard_map_vmaFalse": jax.jit(jax.shard_map(upd, mesh=mesh, in_specs=specs,
                                                out_specs=P(), check_vma=False))(
        e, y, where, memory),
    "pmap": jax.tree.map(lambda a: a[3], jax.pmap(upd, axis_name="d", in_axes=(0, 0, 0, None))(
        e.reshape(n, -1, D), y.reshape(n, -1), where.reshape(n, -1), memory)),
}
update = {mode: all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
                    for a, b in zip(state, expected)) for mode, state in got.items()}
print("REPORT" + json.dumps({"losses": report, "update": update}))
"""


@pytest.mark.multidevice
def test_memory_losses_and_update_on_eight_devices():
    stdout = run_with_devices(CODE, num_devices=8)
    report = json.loads(stdout.split("REPORT", 1)[1])
    assert report["update"] == {
        "shard_map_replicated": True, "shard_map_vmaFalse": True, "pmap": True
    }
    assert len(report["losses"]) == 8
    for loss, modes in report["losses"].items():
        assert set(modes) == {"shard_map_replicated", "pmap", "sharded_jit"}
        for mode, (dv, dg, v, g) in modes.items():
            # Same float32 terms summed in another order: agreement to a few ulps of the scale.
            assert dv <= 1e-5 * max(1.0, v), (loss, mode, dv, v)
            assert dg <= 1e-5 * max(1e-2, g), (loss, mode, dg, g)
            assert g > 0, (loss, "degenerate test: zero reference gradient")
