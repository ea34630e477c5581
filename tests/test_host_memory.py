"""dml_jax.host_memory: glibc keeps freed memory, so XLA:CPU's per-call buffers stop faulting."""

from __future__ import annotations

import json
import subprocess
import sys

from dml_jax import host_memory

# A jitted gradient whose temporary buffer (the [2048, 8192] float32 product and its cotangent,
# 64 MB) is past glibc's mmap threshold; prints the median minor page faults of a call after a
# warm-up.
SCRIPT = r"""
import json, resource, sys
from dml_jax import host_memory
applied = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else None
import jax, jax.numpy as jnp
x = jax.random.normal(jax.random.key(0), (2048, 64))
y = jax.random.normal(jax.random.key(1), (8192, 64))
step = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sqrt(jnp.maximum(x @ y.T, 0.0)))))
for _ in range(3):
    step(x).block_until_ready()
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = sorted(faults)[len(faults) // 2]  # median: the heap still grows now and then
temp = step.lower(x).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"applied": applied, "faults": faults, "temp": temp}))
"""


def _faults_per_call(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]  # the child's traceback, if it failed
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_retain_freed_memory_applies_on_glibc_and_is_idempotent():
    # In a child process: the setting is process-wide, and this one runs the other tests.
    out = subprocess.run(
        [sys.executable, "-c", "from dml_jax import host_memory as h; "
         "print(h.retain_freed_memory(), h.retain_freed_memory())"],
        capture_output=True, text=True, check=True, timeout=120,
    )
    expected = str(host_memory._glibc() is not None)
    assert out.stdout.split() == [expected, expected]


def test_retained_memory_stops_the_per_call_page_faults():
    default, retained = _faults_per_call("default"), _faults_per_call("retain")
    assert default["temp"] > 40 * 2**20  # the buffer is past glibc's 32 MB mmap threshold
    if retained["applied"] is False:  # not glibc: nothing to compare
        assert host_memory._glibc() is None
        return
    assert retained["applied"] is True
    # Without: the buffer is mapped afresh per call (16k faults at 4 KB pages; fewer with
    # transparent huge pages). With: the same pages are reused.
    assert retained["faults"] < max(64.0, default["faults"] / 4), (default, retained)
