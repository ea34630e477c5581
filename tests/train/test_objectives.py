"""Every loss the training loop can select by name runs, with what it needs, and trains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax import objectives


@pytest.mark.parametrize("name", sorted(objectives.LOSSES))
def test_every_objective_gives_a_finite_loss_and_gradient(name):
    rng = np.random.default_rng(0)
    num_classes, dim = 6, 8
    # P x K = 6 x 2: consecutive anchor/positive pairs, as the pair losses require.
    y = jnp.repeat(jnp.arange(num_classes), 2)
    e = jnp.asarray(rng.normal(size=(12, dim)), jnp.float32)
    e = e / jnp.linalg.norm(e, axis=1, keepdims=True)
    logits = jnp.asarray(rng.normal(size=(12, num_classes)), jnp.float32)
    config = {"name": name, "kwargs": {}, "classifier_weight": 1.0}
    params = objectives.init_loss_params(config, num_classes, dim)
    state = objectives.init_loss_state(config, num_classes, dim)
    spec = objectives.get_spec(name)

    def total(e, logits, params):
        loss, parts, new_state = objectives.compute(
            config, e, y, logits if spec.needs_logits else None, params, state
        )
        return loss, (parts, new_state)

    (loss, (parts, new_state)), grads = jax.jit(
        jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)
    )(e, logits, params)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert np.any(np.asarray(grads[0]) != 0), "no gradient reaches the embeddings"
    if spec.needs_logits:
        assert np.any(np.asarray(grads[1]) != 0), "no gradient reaches the logits"
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    for leaf in jax.tree.leaves(grads[2]):  # learned centers / proxies get a gradient
        assert np.any(np.asarray(leaf) != 0)
    if "centers" in state:  # moved centers move
        assert not np.allclose(new_state["centers"], state["centers"])
    # A loss with its own cross-entropy gets no second one.
    assert ("ce_loss" in parts) == (spec.needs_logits and not spec.has_ce)


def test_unknown_loss_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"known: .*osm_caa"):
        objectives.get_spec("no_such_loss")
