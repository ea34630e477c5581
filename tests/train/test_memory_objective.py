"""The cross-batch memory as a training objective: warm-up, enqueueing, step counter, refusals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax import losses, objectives


def _config(name="triplet", **extra):
    return {"name": name, "kwargs": {"mining": "batch_hard"} if name == "triplet" else {},
            "classifier_weight": 0.0, **extra}


def _batch(seed):
    rng = np.random.default_rng(seed)
    e = rng.normal(size=(12, 8)).astype(np.float32)
    return e / np.linalg.norm(e, axis=1, keepdims=True), np.repeat(np.arange(6), 2) + seed


@pytest.mark.parametrize("name", objectives.MEMORY_LOSSES)
def test_memory_is_used_and_filled_from_the_start_step(name):
    config = _config(name, memory_size=16, memory_start_step=2)
    state = objectives.init_loss_state(config, 10, 8)
    assert state["xbm_embeddings"].shape == (16, 8) and int(state["xbm_step"]) == 0
    fn = {"contrastive": losses.contrastive_loss, "triplet": losses.triplet_loss,
          "multi_similarity": losses.multi_similarity_loss,
          "ranked_list": losses.ranked_list_loss}[name]
    step = jax.jit(lambda e, y, s: objectives.compute(config, e, y, None, {}, s))
    memory = losses.xbm_init(16, 8)
    for k in range(4):
        e, y = _batch(k)
        total, _, state = step(e, y, state)
        if k < 2:  # warm-up: the plain loss, nothing enqueued
            np.testing.assert_allclose(total, fn(e, y, **config["kwargs"]), rtol=1e-6)
            assert not np.any(state["xbm_valid"])
        else:  # the memory of the batches before this one, then this batch enqueued
            expected = fn(e, y, memory=memory, **config["kwargs"])
            np.testing.assert_allclose(total, expected, rtol=1e-6)
            memory = losses.xbm_update(memory, e, y)
            for field, value in zip(("embeddings", "labels", "valid", "next"), memory):
                np.testing.assert_array_equal(state[f"xbm_{field}"], value)
        assert int(state["xbm_step"]) == k + 1
    assert int(np.sum(state["xbm_valid"])) == 16  # two batches of 12 wrapped around 16 slots
    assert not np.isclose(float(total), float(fn(e, y, **config["kwargs"])))


def test_memory_gradient_reaches_only_the_batch():
    config = _config("contrastive", memory_size=8)
    state = objectives.init_loss_state(config, 10, 8)
    e, y = _batch(0)
    _, _, state = objectives.compute(config, e, y, None, {}, state)
    g = jax.grad(lambda x: objectives.compute(config, x, y, None, {}, state)[0])(jnp.asarray(e))
    assert np.all(np.isfinite(g)) and np.any(np.asarray(g) != 0)


@pytest.mark.parametrize("extra, message", [
    ({"name": "lifted_structure", "memory_size": 8}, "takes no cross-batch memory"),
    ({"memory_size": -1}, ">= 0"),
    ({"memory_size": 8, "memory_start_step": -2}, ">= 0"),
])
def test_bad_memory_settings_are_refused(extra, message):
    config = {**_config(), **extra}
    with pytest.raises(ValueError, match=message):
        objectives.init_loss_state(config, 10, 8)
