"""Seed-paper losses for the loss benchmark: ``SEED_LOSSES`` maps a name to ``fn(e, y)``.

Run directly to time ``jax.jit(jax.value_and_grad(...))`` at B=1024, D=512 against the plain
contrastive loss: ``python -m benchmarks.losses_seed``. Batches are pair-layout friendly
(rows 2k, 2k+1 share a class), so every loss below accepts them.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from dml_jax import losses, synthesis

NUM_CLASSES = 100


def _logits(e):
    return e[:, :NUM_CLASSES]


SEED_LOSSES = {
    "osm_caa": lambda e, y: losses.osm_caa_loss(e, y),
    "osm_caa_logits": lambda e, y: losses.osm_caa_loss(e, y, _logits(e)),
    "ranked_list": lambda e, y: losses.ranked_list_loss(e, y),
    "ranked_list_official": lambda e, y: losses.ranked_list_loss(e, y, query_weighting="official"),
    "center": lambda e, y: losses.center_loss(e, y, e[:NUM_CLASSES]),
    "center_structured": lambda e, y: losses.center_structured_loss(
        e, y, _logits(e), e[:NUM_CLASSES]),
    "demal_hybrid": lambda e, y: losses.demal_hybrid_loss(e, y, _logits(e)),
    "npair": lambda e, y: losses.npair_loss(e, y),
    "angular": lambda e, y: losses.angular_loss(e, y),
    "symm_triplet_all": lambda e, y: synthesis.symmetric_triplet_loss(e, y),
    "symm_triplet_semi_hard": lambda e, y: synthesis.symmetric_triplet_loss(
        e, y, mining="semi_hard"),
    "symm_triplet_batch_hard": lambda e, y: synthesis.symmetric_triplet_loss(
        e, y, mining="batch_hard"),
    "symm_lifted": lambda e, y: synthesis.symmetric_lifted_structure_loss(e, y),
    "symm_contrastive": lambda e, y: synthesis.symmetric_contrastive_loss(e, y),
    "symm_multi_similarity": lambda e, y: synthesis.symmetric_multi_similarity_loss(e, y),
    "symm_osm_caa": lambda e, y: synthesis.symmetric_osm_caa_loss(e, y),
    "symm_npair": lambda e, y: synthesis.symmetric_npair_loss(e, y),
    "symm_angular": lambda e, y: synthesis.symmetric_angular_loss(e, y),
}


def batch(b: int = 1024, d: int = 512, seed: int = 0):
    """A pair-layout batch: ``b // 2`` pairs of ``NUM_CLASSES`` classes."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(b, d)).astype(np.float32) / np.sqrt(d)
    y = np.repeat(rng.integers(0, NUM_CLASSES, size=b // 2), 2).astype(np.int32)
    return e, y


def time_loss(fn, e, y, repeats: int = 5) -> float:
    """Median seconds of one jitted value-and-gradient call (after compilation)."""
    step = jax.jit(jax.value_and_grad(fn))
    jax.block_until_ready(step(e, y))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(step(e, y))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main(names=None, b: int = 1024, d: int = 512) -> dict[str, float]:
    e, y = batch(b, d)
    base = time_loss(lambda e, y: losses.contrastive_loss(e, y), e, y)
    print(f"contrastive: {base * 1e3:.1f} ms")
    ratios = {}
    for name, fn in SEED_LOSSES.items():
        if names and name not in names:
            continue
        t = time_loss(fn, e, y)
        ratios[name] = t / base
        print(f"{name}: {t * 1e3:.1f} ms  ratio {t / base:.2f}")
    return ratios


if __name__ == "__main__":
    main()
