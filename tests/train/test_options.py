"""The training loop's protocol options: optimizer groups and schedules, evaluations by name,
the best checkpoint, bfloat16 compute, epochs, and the refusals that come before training."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dml_jax import checkpoint, data, optim, train
from dml_jax.evaluation import suite
from tests.train.test_train import tiny_config

# --------------------------------------------------------------------------------- optimizer


def _params():
    return {"model": {"backbone": {"w": jnp.ones((3,))}, "head": {"w": jnp.ones((2,))}},
            "loss": {"proxies": jnp.ones((4,))}}


def test_param_groups_follow_the_state_tree():
    groups = optim.param_groups(_params())
    assert groups == {"model": {"backbone": {"w": "backbone"}, "head": {"w": "head"}},
                      "loss": {"proxies": "loss"}}


def test_lr_multipliers_scale_each_group_and_zero_freezes():
    opt = {"name": "sgd", "learning_rate": 0.1, "momentum": 0.0, "schedule": "constant",
           "lr_mult": {"backbone": 0.0, "head": 10.0}}
    tx = optim.make_optimizer(opt, 10)
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(updates["model"]["backbone"]["w"], 0.0)
    np.testing.assert_allclose(updates["model"]["head"]["w"], -1.0, rtol=1e-6)  # 10 x 0.1
    np.testing.assert_allclose(updates["loss"]["proxies"], -0.1, rtol=1e-6)


def test_multistep_schedule_with_warmup():
    lr = optim.schedule({**optim._DEFAULTS, "learning_rate": 1.0, "schedule": "multistep",
                         "warmup_steps": 2, "milestones": (5,), "milestone_fractions": (0.8,),
                         "gamma": 0.1}, 10)
    got = [float(lr(t)) for t in range(10)]
    np.testing.assert_allclose(got, [0, 0.5, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01], atol=1e-7)


def test_unknown_optimizer_keys_and_groups_are_refused():
    with pytest.raises(ValueError, match=r"Unknown config\.optimizer keys"):
        optim.make_optimizer({"learning_rat": 1.0}, 10)
    with pytest.raises(ValueError, match="unknown groups"):
        optim.make_optimizer({"lr_mult": {"classifier": 2.0}}, 10)
    with pytest.raises(ValueError, match="schedule"):
        optim.make_optimizer({"schedule": "linear"}, 10)


# -------------------------------------------------------------------------------- evaluations


def test_evaluation_suite_runs_by_name_and_prefixes_shared_keys():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(4), 10)
    emb = (np.eye(4)[y] * 3 + rng.normal(size=(40, 4)) * 0.1).astype(np.float32)
    logits = np.eye(4)[y].astype(np.float32)
    test = suite.EmbeddedSplit(emb, y, logits, y, np.arange(40) % 2)
    metrics = suite.run(["retrieval", "clustering", "classification", "knn_accuracy", "reid"],
                        {"test": test, "train": test, "query": test, "gallery": test})
    assert metrics["map@r"] == pytest.approx(1.0) and metrics["nmi"] == pytest.approx(1.0)
    assert metrics["accuracy"] == 1.0 and metrics["knn_accuracy"] == 1.0
    assert "reid/num_queries" in metrics and metrics["cmc@1"] == 1.0
    assert suite.required_splits(["retrieval", "knn_accuracy", "reid"]) == (
        "test", "train", "query", "gallery")
    with pytest.raises(ValueError, match="Unknown evaluations"):
        suite.check(["recall"])


def test_configured_evaluations_and_best_checkpoint(tmp_path):
    config = tiny_config(num_steps=6, eval_every=2, checkpoint_every=6, best_metric="map@r",
                         evals=("retrieval", "clustering", "classification"))
    config.loss.classifier_weight = 0.5  # a classifier for the classification evaluation
    result = train.train_and_evaluate(config, str(tmp_path))
    for key in ("map@r", "recall@1", "nmi", "f1", "accuracy"):
        assert np.isfinite(result["final"][key]), key
    evals = [r for r in train.read_metrics(str(tmp_path)) if "map@r" in r]
    best_step = max(evals, key=lambda r: r["map@r"])["step"]
    best = checkpoint.Checkpointer(str(tmp_path / "checkpoints_best"))
    try:
        assert best.all_steps() == [best_step]
    finally:
        best.close()


def test_best_metric_must_be_a_reported_metric(tmp_path):
    config = tiny_config(num_steps=2, eval_every=2, best_metric="accuracy")
    with pytest.raises(ValueError, match="best_metric 'accuracy' is not among"):
        train.train_and_evaluate(config, str(tmp_path))


# ------------------------------------------------------------------------------ compute, epochs


def test_bfloat16_compute_keeps_float32_parameters_and_trains(tmp_path):
    config = tiny_config(num_steps=12, eval_every=12)
    config.model.dtype = "bfloat16"
    result = train.train_and_evaluate(config, str(tmp_path))
    losses = [r["loss"] for r in train.read_metrics(str(tmp_path)) if "loss" in r]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert np.isfinite(result["final"]["map@r"])
    tx = train.make_optimizer(config)
    _, like = train.create_state(config, 10, tx)
    ckpt = checkpoint.Checkpointer(os.path.join(tmp_path, "checkpoints"))
    try:
        state = ckpt.restore(ckpt.latest_step(), like)
    finally:
        ckpt.close()
    dtypes = {x.dtype for x in jax.tree.leaves(state["params"])}
    assert dtypes == {jnp.dtype(jnp.float32)}


def test_num_epochs_sets_the_number_of_steps(tmp_path):
    config = tiny_config(num_epochs=0.25, eval_every=100)
    n = len(data.digits_source("train"))
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == int(np.ceil(0.25 * n / 32))


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"loss": "npair", "samples_per_class": 4}, ValueError, "samples_per_class = 2"),
        ({"evals": ("recall",)}, ValueError, "Unknown evaluations"),
        ({"pretrained": "/nonexistent/weights.pth"}, FileNotFoundError,
         "weights.pth.*docs/models.md"),
        ({"input_convention": "rgb"}, ValueError, "input_convention"),
        ({"dtype": "float16"}, ValueError, "dtype"),
    ],
)
def test_protocol_errors_come_before_training(tmp_path, change, error, message):
    config = tiny_config()
    if "loss" in change:
        config.loss.name, config.loss.kwargs = change.pop("loss"), {}
    for key in ("pretrained", "input_convention", "dtype"):
        if key in change:
            config.model[key] = change.pop(key)
    for k, v in change.items():
        config[k] = v
    with pytest.raises(error, match=message):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_optax_sgd_group_update_matches_plain_sgd():
    """With every multiplier 1 the grouped optimizer is the plain one."""
    opt = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9, "schedule": "constant",
           "weight_decay": 0.01}
    params = _params()
    grads = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params)
    grouped = optim.make_optimizer(opt, 10)
    plain = optax.chain(optax.add_decayed_weights(0.01), optax.sgd(0.05, momentum=0.9))
    a, _ = grouped.update(grads, grouped.init(params), params)
    b, _ = plain.update(grads, plain.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)


def test_training_augmentation_comes_from_the_config():
    config = tiny_config()
    assert train.train_augmentation(config) == data.Augment()
    config.dataset.augment = {"crop": "resize_random", "flip": False}
    config.dataset.resize_ratio = 1.25
    assert train.train_augmentation(config) == data.Augment(crop="resize_random", flip=False,
                                                            resize_ratio=1.25)
    config.dataset.augment = {"crop": "center"}
    with pytest.raises(ValueError, match="crop"):
        train.train_augmentation(config)


def test_per_level_loss_sums_one_loss_per_level_with_the_classifier_once():
    from dml_jax import losses

    rng = np.random.default_rng(0)
    y = jnp.asarray(np.repeat(np.arange(4), 3))
    levels = {f"embedding/s{i}": jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
              for i in range(3)}
    logits = jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)
    config = {"name": "ranked_list", "kwargs": {}, "classifier_weight": 0.5, "per_level": True}
    concat = jnp.concatenate(list(levels.values()), axis=1)
    total, parts, _ = train.compute_objective(config, concat, levels, y, logits, {}, {})
    per_level = sum(float(losses.ranked_list_loss(e, y)) for e in levels.values())
    ce = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    np.testing.assert_allclose(float(parts["metric_loss"]), per_level, rtol=1e-6)
    np.testing.assert_allclose(float(total), per_level + 0.5 * ce, rtol=1e-6)
    plain, _, _ = train.compute_objective({**config, "per_level": False}, concat, levels, y,
                                          logits, {}, {})
    np.testing.assert_allclose(float(plain), float(losses.ranked_list_loss(concat, y)) + 0.5 * ce,
                               rtol=1e-6)


def test_per_level_needs_a_multi_level_head(tmp_path):
    config = tiny_config()
    config.loss.per_level = True
    with pytest.raises(ValueError, match="multi_level"):
        train.train_and_evaluate(config, str(tmp_path))
