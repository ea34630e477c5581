"""A diverged run never commits a non-finite update nor overwrites a good checkpoint; the
``"skip"`` policy drops a bad step exactly; metrics.jsonl stays strict JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dml_jax import checkpoint, data, objectives, train
from tests._subprocess import REPO_ROOT
from tests.train.test_train import CONFIG_PATH, tiny_config


def _strict_rows(workdir) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"metrics.jsonl holds the non-JSON constant {constant}")

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=refuse) for line in f if line.strip()]


def _restore_all(config, workdir) -> dict[int, dict]:
    tx = train.make_optimizer(config)
    _, like = train.create_state(config, 10, tx)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return {s: ckpt.restore(s, like) for s in ckpt.all_steps()}
    finally:
        ckpt.close()


def _all_finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
               if np.issubdtype(np.asarray(x).dtype, np.inexact))


def test_a_diverging_command_exits_nonzero_and_keeps_finite_checkpoints(tmp_path):
    workdir = tmp_path / "nan"
    cmd = [sys.executable, str(REPO_ROOT / "experiments" / "main.py"), f"--config={CONFIG_PATH}",
           f"--workdir={workdir}", "--config.loss.name=contrastive", "--config.loss.kwargs={}",
           "--config.loss.classifier_weight=0", "--config.optimizer.learning_rate=1e12",
           "--config.optimizer.warmup_steps=1", "--config.num_steps=30",
           "--config.eval_every=25", "--config.checkpoint_every=2", "--config.log_every=1",
           "--config.progress_bar=False",
           "--config.plots=False", "--config.model.backbone_kwargs.widths=(8, 16)"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0, proc.stdout[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: Non-finite training step at step "), proc.stderr[-3000:]
    bad_step = int(message.split("at step ")[1].split(" ")[0])
    rows = _strict_rows(workdir)
    assert rows and max(r["step"] for r in rows) == bad_step
    config = tiny_config()
    config.model.backbone_kwargs = {"widths": (8, 16)}
    config.model.embedding_dim = 64
    states = _restore_all(config, str(workdir))
    assert states, "the run had time to save checkpoints before diverging"
    assert max(states) < bad_step
    assert f"The last good checkpoint (step {max(states)})" in message
    for step, state in states.items():
        assert _all_finite(state), f"checkpoint {step} holds non-finite values"


def _poisoned_objective(config, bad_steps):
    """A loss that is NaN on the batches the sampler draws at ``bad_steps``.

    Keyed on the batch's labels, not on a counter: a skipped step commits no loss state.
    """
    digits = data.digits_source("train")
    sampler = data.PKSampler(digits.labels, config.classes_per_batch, config.samples_per_class,
                             seed=config.seed)
    bad_labels = jnp.asarray(np.stack([digits.labels[sampler.batch_indices(s)]
                                       for s in bad_steps]))

    def poisoned(e, y, logits, params, state, **kwargs):
        loss = jnp.mean(jnp.sum(jnp.square(e - jnp.mean(e, axis=0)), axis=1))
        bad = jnp.any(jnp.all(y[None, :] == bad_labels, axis=1))
        return jnp.where(bad, jnp.nan, -loss), state

    return objectives.LossSpec(poisoned)


def test_skip_policy_survives_a_bad_step_and_counts_it(tmp_path, monkeypatch):
    config = tiny_config(num_steps=8, checkpoint_every=2, eval_every=8, nan_policy="skip")
    monkeypatch.setitem(objectives.LOSSES, "poisoned", _poisoned_objective(config, [3]))
    config.loss.name, config.loss.kwargs = "poisoned", {}
    result = train.train_and_evaluate(config, str(tmp_path))
    assert result["step"] == 8 and np.isfinite(result["final"]["map@r"])
    rows = [r for r in _strict_rows(str(tmp_path)) if "skipped_steps" in r]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 0, 1, 1, 1, 1, 1]
    assert rows[3]["loss"] is None and rows[3]["nonfinite"]["loss"] == "nan"
    assert all(r["loss"] is not None for i, r in enumerate(rows) if i != 3)
    for step, state in _restore_all(config, str(tmp_path)).items():
        assert _all_finite(state), step


def test_skip_policy_stops_after_too_many_bad_steps_in_a_row(tmp_path, monkeypatch):
    config = tiny_config(num_steps=20, checkpoint_every=2, nan_policy="skip",
                         nan_max_consecutive_skips=3)
    monkeypatch.setitem(objectives.LOSSES, "poisoned",
                        _poisoned_objective(config, list(range(2, 20))))
    config.loss.name, config.loss.kwargs = "poisoned", {}
    # Steps 3-5 are skipped (their states, saved at step 4, hold step 2's parameters); the
    # fourth bad step in a row, step 6, ends the run.
    with pytest.raises(FloatingPointError, match=r"at step 6 .*after 4 non-finite steps in a "
                                                 r"row.*checkpoint \(step 4\)"):
        train.train_and_evaluate(config, str(tmp_path))
    states = _restore_all(config, str(tmp_path))
    assert sorted(states) == [2, 4]
    for a, b in zip(jax.tree.leaves(states[2]["params"]), jax.tree.leaves(states[4]["params"]),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_nan_policy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        train.train_and_evaluate(tiny_config(nan_policy="ignore"), str(tmp_path))


def test_a_skipped_batch_leaves_the_state_as_if_it_never_came():
    """Steps on batches (b0, b1, NaN batch, b3) give the state of steps on (b0, b1, b3)."""
    config = tiny_config()
    config.optimizer.name = "adamw"
    tx = train.make_optimizer(config)
    graphdefs, state0 = train.create_state(config, 10, tx)
    mesh = train.make_mesh()
    replicated = NamedSharding(mesh, P())
    step_fn = jax.jit(train.make_train_step(graphdefs["train"], config.loss.to_dict(), tx,
                                            input_convention="unit"))
    digits = data.digits_source("train")
    sampler = data.PKSampler(digits.labels, 8, 4, seed=0)
    batches = [(digits.images[i], digits.labels[i]) for i in map(sampler.batch_indices, range(4))]
    # normalize() takes float images on the 0-255 scale too: a NaN image poisons the step.
    poisoned = (np.full(batches[2][0].shape, np.nan, np.float32), batches[2][1])

    def run(sequence):
        state = jax.device_put(jax.tree.map(jnp.array, state0), replicated)
        flags = []
        for images, labels in sequence:
            state, metrics = step_fn(state, images, labels)
            flags.append(bool(metrics["finite"]))
        return state, flags

    with_bad, flags = run([batches[0], batches[1], poisoned, batches[3]])
    without, clean_flags = run([batches[0], batches[1], batches[3]])
    assert flags == [True, True, False, True] and all(clean_flags)
    assert int(with_bad["step"]) == 4 and int(without["step"]) == 3
    for key in ("params", "rest", "opt_state", "loss_state"):
        for a, b in zip(jax.tree.leaves(with_bad[key]), jax.tree.leaves(without[key]),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=key)


def test_json_line_is_strict_json():
    line = train.json_line(3, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
    row = json.loads(line, parse_constant=lambda c: pytest.fail(c))
    assert row == {"step": 3, "loss": None, "grad_norm": None, "lr": 0.5,
                   "nonfinite": {"loss": "nan", "grad_norm": "inf"}}


def test_evaluation_names_nonfinite_embeddings():
    config = tiny_config()
    sources = {"test": data.digits_source("test")}

    def embed(params, rest, images):  # a model whose output is NaN for every row
        return jnp.full((images.shape[0], 4), jnp.nan), None

    state = {"params": {"model": {}}, "rest": {}}
    with pytest.raises(FloatingPointError, match="non-finite embeddings at step 12"):
        train.evaluate(embed, state, train.make_mesh(), sources, config, 12)
