"""1 device vs 8 simulated CPU devices: identical neighbours and metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dml_jax.evaluation import knn, retrieval_metrics
from tests._subprocess import run_with_devices

_DATA = """
import numpy as np
rng = np.random.default_rng(11)
x = rng.standard_normal((517, 16)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
x[100:110] = x[5]  # exact duplicates: ties resolved by index
y = rng.integers(0, 30, 517)
"""


@pytest.mark.multidevice
@pytest.mark.slow
def test_eight_devices_match_one():
    code = _DATA + """
import json, jax
from dml_jax.evaluation import knn, retrieval_metrics
assert len(jax.local_devices()) == 8, jax.local_devices()
idx, _ = knn(x, k=25, backend="jax", query_block=16, reference_block=64)
m = retrieval_metrics(x, y, backend="jax")
print(json.dumps({"idx": idx.tolist(), "m": m}))
"""
    out = json.loads(run_with_devices(code, num_devices=8).strip().splitlines()[-1])
    scope: dict = {}
    exec(_DATA, scope)
    x, y = scope["x"], scope["y"]
    idx, _ = knn(x, k=25, backend="jax", query_block=16, reference_block=64)
    np.testing.assert_array_equal(np.asarray(out["idx"]), idx)
    assert out["m"] == retrieval_metrics(x, y, backend="jax")
