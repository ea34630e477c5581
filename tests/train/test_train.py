"""The training loop on the embedded digits: learning, resume, devices, refusals, outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dml_jax import checkpoint, objectives, train
from tests._subprocess import REPO_ROOT, run_with_devices

CONFIG_PATH = REPO_ROOT / "experiments" / "configs" / "digits.py"


def tiny_config(**overrides):
    """The digits config, shrunk to a few seconds of training."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_config", CONFIG_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.backbone_kwargs = {"widths": (8, 16)}
    c.model.embedding_dim = 16
    c.loss.name = "contrastive"
    c.loss.kwargs = {"neg_margin": 1.0}
    c.loss.classifier_weight = 0.0
    c.classes_per_batch = 8
    c.samples_per_class = 4
    c.num_steps = 20
    c.log_every = 1
    c.eval_every = 20
    c.checkpoint_every = 100
    c.optimizer.warmup_steps = 5
    c.progress_bar = False
    c.plots = False
    for k, v in overrides.items():
        c[k] = v
    return c


def train_losses(workdir):
    return [r["loss"] for r in train.read_metrics(workdir) if "loss" in r]


def final_state(config, workdir):
    tx = train.make_optimizer(config)
    _, like = train.create_state(config, 10, tx)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    try:
        return ckpt.latest_step(), ckpt.restore(ckpt.latest_step(), like)
    finally:
        ckpt.close()



def test_clips_are_embedded_frame_by_frame_and_averaged():
    """``[B, T, H, W, 3]`` clips: the model runs on ``B*T`` frames, embeddings and logits are
    averaged over ``T``; a clip of ``T`` equal frames is its frame (train step and embed)."""
    config = tiny_config(num_steps=1)
    config.loss.classifier_weight = 1.0  # logits too
    tx = train.make_optimizer(config)
    graphdefs, state = train.create_state(config, 10, tx)
    kwargs = {"input_convention": "unit", "l2_normalize": True}
    embed = jax.jit(train.make_embed_fn(graphdefs["eval"], **kwargs))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    clips = np.repeat(images[:, None], 3, axis=1)  # [8, 3, 16, 16, 3] of equal frames
    params, rest = state["params"]["model"], state["rest"]
    e1, l1 = embed(params, rest, images)
    e3, l3 = embed(params, rest, clips)
    assert e3.shape == (8, 16) and l3.shape == (8, 10)
    np.testing.assert_allclose(e3, e1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l3, l1, rtol=1e-5, atol=1e-5)

    distinct = rng.integers(0, 256, (4, 3, 16, 16, 3), dtype=np.uint8)
    e, lg = embed(params, rest, distinct)
    per_frame = [embed(params, rest, distinct[:, t]) for t in range(3)]
    mean = np.mean([f[0] for f in per_frame], axis=0)
    np.testing.assert_allclose(e, mean / np.linalg.norm(mean, axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lg, np.mean([f[1] for f in per_frame], axis=0),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)

    # Train step: BatchNorm statistics of T copies of each frame are the frames' statistics.
    step = jax.jit(train.make_train_step(graphdefs["train"], config.loss.to_dict(), tx,
                                         **kwargs))
    labels = np.repeat(np.arange(4, dtype=np.int32), 2)
    _, m1 = step(state, images, labels)
    _, m3 = step(state, clips, labels)
    assert bool(m1["finite"]) and bool(m3["finite"])
    np.testing.assert_allclose(m3["loss"], m1["loss"], rtol=1e-4)


def test_short_run_lowers_the_loss_and_writes_metrics_and_plots(tmp_path):
    config = tiny_config(num_steps=40, plots=True, eval_every=20)
    result = train.train_and_evaluate(config, str(tmp_path))
    losses = train_losses(str(tmp_path))
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5])  # ~0.94 -> ~0.76 seen
    rows = train.read_metrics(str(tmp_path))
    evals = [r for r in rows if "map@r" in r]
    assert [r["step"] for r in evals] == [20, 40]
    for key in ("recall@1", "recall@8", "precision@1", "r_precision", "map@r", "num_queries"):
        assert key in evals[-1]
    assert evals[-1]["map@r"] > evals[0]["map@r"]
    assert result["final"]["map@r"] == evals[-1]["map@r"]
    for name in ("training_curves.png", "embeddings_2d.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))


def test_resume_is_bit_exact(tmp_path):
    whole, halves = str(tmp_path / "whole"), str(tmp_path / "halves")
    # checkpoint_every=4: the interruption at step 4 falls on a regular checkpoint step.
    config = tiny_config(num_steps=8, eval_every=8, checkpoint_every=4)
    train.train_and_evaluate(config, whole)
    stopped = train.train_and_evaluate(config, halves, stop_at_step=4)
    assert stopped["preempted"] and stopped["step"] == 4
    train.train_and_evaluate(config, halves)  # same command again: resumes at step 4
    assert train_losses(halves) == train_losses(whole)
    step_a, a = final_state(config, whole)
    step_b, b = final_state(config, halves)
    assert step_a == step_b == 8
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    def poisoned(e, y, logits, params, state, **kwargs):
        loss = jnp.mean(jnp.sum(e * e, axis=1))
        bad = state["calls"] >= 3  # the 4th step's loss is NaN
        return jnp.where(bad, jnp.nan, loss), {"calls": state["calls"] + 1}

    spec = objectives.LossSpec(poisoned, init_state=lambda c, d, kw: {"calls": jnp.int32(0)})
    monkeypatch.setitem(objectives.LOSSES, "poisoned", spec)
    config = tiny_config(num_steps=10, checkpoint_every=2)
    config.loss.name = "poisoned"
    config.loss.kwargs = {}
    with pytest.raises(FloatingPointError, match=r"at step 4.*step 2"):
        train.train_and_evaluate(config, str(tmp_path))
    ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
    assert ckpt.all_steps() == [2]
    ckpt.close()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loss_name": "no_such_loss"}, "Unknown loss 'no_such_loss'"),
        ({"classes_per_batch": 11}, "classes_per_batch <= 10"),
        ({"num_steps": 0}, "num_steps must be > 0"),
    ],
)
def test_bad_configuration_is_refused_before_training(tmp_path, change, message):
    config = tiny_config()
    if "loss_name" in change:
        config.loss.name = change.pop("loss_name")
    for k, v in change.items():
        config[k] = v
    with pytest.raises(ValueError, match=message):
        train.train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_workdir_of_another_config_is_refused(tmp_path):
    train.train_and_evaluate(tiny_config(num_steps=2), str(tmp_path))
    other = tiny_config(num_steps=2)
    other.loss.kwargs = {"neg_margin": 0.5}
    with pytest.raises(checkpoint.ConfigMismatchError, match=r"loss.*neg_margin"):
        train.train_and_evaluate(other, str(tmp_path))


def test_eight_devices_give_the_losses_of_one(tmp_path):
    config = tiny_config(num_steps=6, eval_every=6)
    train.train_and_evaluate(config, str(tmp_path / "one"))
    one = train_losses(str(tmp_path / "one"))
    code = f"""
    import json, jax
    from tests.train.test_train import tiny_config, train_losses
    from dml_jax import train
    assert jax.device_count() == 8
    train.train_and_evaluate(tiny_config(num_steps=6, eval_every=6), {str(tmp_path / "eight")!r})
    print("LOSSES" + json.dumps(train_losses({str(tmp_path / "eight")!r})))
    bad = tiny_config(classes_per_batch=7, samples_per_class=3)
    try:
        train.train_and_evaluate(bad, {str(tmp_path / "bad")!r})
    except ValueError as e:
        print("REFUSED" + str(e))
    """
    out = run_with_devices(code, num_devices=8)
    eight = json.loads(out.split("LOSSES", 1)[1].splitlines()[0])
    # The same global batch; only the order of float32 reductions differs between 1 and 8
    # devices, and six Adam steps do not amplify that beyond a few ulps of the loss.
    np.testing.assert_allclose(eight, one, rtol=1e-5)
    assert "REFUSED" in out and "multiple of 8" in out.split("REFUSED", 1)[1]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    cmd = [sys.executable, str(REPO_ROOT / "experiments" / "main.py"), f"--config={CONFIG_PATH}",
           f"--workdir={workdir}", "--config.num_steps=100000", "--config.log_every=1",
           "--config.eval_every=100000", "--config.checkpoint_every=100000",
           "--config.progress_bar=False", "--config.plots=False",
           "--config.model.backbone_kwargs.widths=(8, 16)"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO_ROOT)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved a checkpoint at step" in out
    step = int(out.split("SIGTERM: saved a checkpoint at step", 1)[1].split()[0])
    ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"))
    assert ckpt.latest_step() == step >= 3
    ckpt.close()
