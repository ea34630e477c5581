"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

Data flows one way: config -> data -> model -> loss -> train step -> evaluation -> metrics and
plots. The train step is a pure function under ``jax.jit`` over a ``Mesh`` of every device with
a ``('data',)`` axis: the batch is sharded over it, the state replicated, and the loss (and
BatchNorm statistics) computed on the global batch by XLA. The state is donated.

The state is a plain pytree::

    {"step": int32 [], "params": {"model": nnx.State, "loss": dict (e.g. learned centers)},
     "rest": nnx.State (BatchNorm statistics, frozen parameters), "opt_state": optax state,
     "loss_state": dict (e.g. moved centers), "rng": uint32 [2]}

Checkpoints (orbax) hold it whole; the P x K sampler's position is the step, so a resumed run
continues exactly where it stopped.
"""

from __future__ import annotations

from dml_jax import _extras

_extras.require("dml_jax.train", "train", "flax", "optax", "orbax", "ml_collections", "tqdm",
                "tensorboardX")

import json
import math
import os
import signal
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dml_jax import checkpoint, evaluation, objectives
from dml_jax.data import PKSampler, Split, load_digits
from dml_jax.models import build_model

# Keys a resumed run may change (everything else must match the checkpoints' config).
RESUMABLE_KEYS = ("num_steps", "eval_every", "log_every", "checkpoint_every", "progress_bar",
                  "plots", "eval_raw_baseline", "nan_policy", "nan_max_consecutive_skips")


# --------------------------------------------------------------------------------------------
# Configuration checks


def validate_config(config: ml_collections.ConfigDict, train: Split, num_devices: int) -> None:
    """Refuses a bad configuration before any training, saying what to change.

    Raises:
      ValueError: unknown loss, ``P * K`` not divisible by the device count, more classes per
        batch than the data has, non-positive step counts, or an unknown ``nan_policy``.
    """
    objectives.get_spec(config.loss.name)
    batch = config.classes_per_batch * config.samples_per_class
    if batch % num_devices:
        raise ValueError(
            f"The batch of classes_per_batch * samples_per_class = {config.classes_per_batch} * "
            f"{config.samples_per_class} = {batch} rows cannot be split over {num_devices} "
            f"devices: choose P and K so that P * K is a multiple of {num_devices}."
        )
    if config.classes_per_batch > train.num_classes:
        raise ValueError(
            f"classes_per_batch={config.classes_per_batch} but the training data has only "
            f"{train.num_classes} classes: set config.classes_per_batch <= {train.num_classes}."
        )
    for key in ("num_steps", "eval_every", "log_every", "checkpoint_every"):
        if int(config[key]) <= 0:
            raise ValueError(f"config.{key} must be > 0; got {config[key]}.")
    NonFiniteGuard(config.get("nan_policy", "stop"), config.get("nan_max_consecutive_skips", 10))


def load_data(config: ml_collections.ConfigDict) -> tuple[Split, Split]:
    """The ``(train, test)`` splits named by ``config.dataset``."""
    if config.dataset.name == "digits":
        return load_digits(test_fraction=config.dataset.test_fraction, seed=config.dataset.seed)
    raise ValueError(f"Unknown dataset {config.dataset.name!r}; known: 'digits'.")


# --------------------------------------------------------------------------------------------
# State


def make_mesh() -> Mesh:
    """A 1-D mesh ``('data',)`` over every device of every process."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW (or SGD with momentum) with linear warm-up and cosine decay."""
    opt = config.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=opt.learning_rate,
        warmup_steps=min(opt.warmup_steps, max(config.num_steps - 1, 1)),
        decay_steps=config.num_steps,
        end_value=opt.learning_rate * opt.final_lr_fraction,
    )
    if opt.name == "adamw":
        tx = optax.adamw(schedule, weight_decay=opt.weight_decay)
    elif opt.name == "sgd":
        tx = optax.chain(
            optax.add_decayed_weights(opt.weight_decay), optax.sgd(schedule, momentum=0.9)
        )
    else:
        raise ValueError(f"Unknown optimizer {opt.name!r}; known: 'adamw', 'sgd'.")
    if opt.get("grad_clip_norm"):
        tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
    return tx


def _model_config(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    model_cfg = dict(config.model.to_dict())
    spec = objectives.get_spec(config.loss.name)
    if spec.needs_logits or config.loss.classifier_weight > 0:
        model_cfg["num_classes"] = num_classes
    return model_cfg


def create_state(config, num_classes: int, tx: optax.GradientTransformation):
    """Builds the model and the initial train state.

    Returns:
      ``(graphdefs, state)``: ``graphdefs`` = ``{"train": ..., "eval": ...}`` (the model's
      structure in each mode) and the state pytree of the module docstring.
    """
    model = build_model(_model_config(config, num_classes), rngs=nnx.Rngs(config.seed))
    model.eval()
    graphdef_eval = nnx.graphdef(model)
    model.train()
    graphdef_train, model_params, rest = nnx.split(model, nnx.Param, ...)
    dim = model.embedding_dim
    params = {
        "model": model_params,
        "loss": objectives.init_loss_params(config.loss, num_classes, dim),
    }
    loss_state = objectives.init_loss_state(config.loss, num_classes, dim)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "rest": rest,
        "opt_state": tx.init(params),
        "loss_state": loss_state,
        "rng": jax.random.PRNGKey(config.seed + 1),
    }
    return {"train": graphdef_train, "eval": graphdef_eval}, state


# --------------------------------------------------------------------------------------------
# Steps


def all_finite(tree: Any) -> jax.Array:
    """Whether every floating entry of ``tree`` is finite: a bool scalar, one fused pass."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not leaves:
        return jnp.bool_(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def make_train_step(graphdef, loss_config: Mapping[str, Any], tx: optax.GradientTransformation):
    """``train_step(state, images [B, H, W, C], labels [B]) -> (state, metrics)`` (pure).

    A step whose loss, global gradient norm or updated state is not finite is not committed:
    the returned state is the input state with only ``step`` advanced, and
    ``metrics["finite"]`` is False (the loop then stops or skips, as ``config.nan_policy``
    says). So a non-finite update never reaches the parameters, the optimizer state or the
    BatchNorm statistics, and no checkpoint can hold one.
    """

    def train_step(state, images, labels):
        def loss_fn(params):
            model = nnx.merge(graphdef, params["model"], state["rest"], copy=True)
            embeddings, aux = model(images)
            total, parts, loss_state = objectives.compute(
                loss_config, embeddings, labels, aux.get("logits"), params["loss"],
                state["loss_state"],
            )
            rest = nnx.state(model, nnx.Not(nnx.Param))
            return total, (parts, rest, loss_state)

        (loss, (parts, rest, loss_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.global_norm(grads)
        update = {"params": params, "rest": rest, "opt_state": opt_state,
                  "loss_state": loss_state}
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(update)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), update,
                            {k: state[k] for k in update})
        new_state = {"step": state["step"] + 1, **kept, "rng": state["rng"]}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **parts}
        return new_state, metrics

    return train_step


def make_embed_fn(graphdef):
    """``embed(params, rest, images) -> embeddings [B, E]`` in eval mode (pure)."""

    def embed(params, rest, images):
        model = nnx.merge(graphdef, params, rest, copy=True)
        return model(images)[0]

    return embed


def shard_batch(mesh: Mesh, array: np.ndarray) -> jax.Array:
    """Places this process's rows of a global batch on the mesh, sharded over ``'data'``.

    Every process computes the same global batch (the sampler is deterministic) and contributes
    the rows of its own devices.
    """
    sharding = NamedSharding(mesh, P("data"))
    n_proc, proc = jax.process_count(), jax.process_index()
    rows = array.shape[0] // n_proc
    local = array[proc * rows : (proc + 1) * rows]
    return jax.make_array_from_process_local_data(sharding, local, array.shape)


def embed_dataset(embed, state, mesh: Mesh, images: np.ndarray, batch_size: int) -> np.ndarray:
    """Embeddings ``[N, E]`` of ``images`` in fixed-size padded batches (one compilation)."""
    n = images.shape[0]
    batch_size = int(math.ceil(batch_size / mesh.size) * mesh.size)
    out = []
    for start in range(0, n, batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - chunk.shape[0]
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        emb = embed(state["params"]["model"], state["rest"], shard_batch(mesh, chunk))
        out.append(np.asarray(jax.device_get(emb))[: batch_size - pad])
    return np.concatenate(out)


# --------------------------------------------------------------------------------------------
# Logging


def json_line(step: int, values: Mapping[str, float]) -> str:
    """One strict-JSON line ``{"step": step, **values}``.

    A non-finite value is written as ``null`` and named, as text, under ``"nonfinite"``
    (e.g. ``{"loss": null, "nonfinite": {"loss": "nan"}}``), so any JSON reader can read it.
    """
    row: dict[str, Any] = {"step": int(step)}
    nonfinite = {}
    for k, v in values.items():
        v = float(v)
        if math.isfinite(v):
            row[k] = v
        else:
            row[k] = None
            nonfinite[k] = str(v)
    if nonfinite:
        row["nonfinite"] = nonfinite
    return json.dumps(row, allow_nan=False)


class MetricsLog:
    """Appends JSON lines to ``<workdir>/metrics.jsonl`` and scalars to TensorBoard."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, values: Mapping[str, float], prefix: str) -> None:
        """One JSON line ``{"step": step, **values}`` and one TensorBoard scalar per value."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json_line(step, values) + "\n")
        for k, v in values.items():
            if not math.isfinite(float(v)):  # metrics.jsonl names it; TensorBoard skips it
                continue
            tag = k.replace("@", "_at_")  # TensorBoard tags allow [A-Za-z0-9_./-]
            self._tb.add_scalar(f"{prefix}/{tag}", float(v), int(step))
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes TensorBoard."""
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, float]]:
    """The rows of ``<workdir>/metrics.jsonl``."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------
# Non-finite steps

NAN_POLICIES = ("stop", "skip")


class NonFiniteGuard:
    """What the loop does with a step whose loss, gradient or update is not finite.

    The train step has already refused to commit such an update (see
    :func:`make_train_step`); this decides whether the run goes on. ``"stop"`` raises at once;
    ``"skip"`` drops the step (its batch is not trained on) and counts it, raising only after
    ``max_consecutive`` skipped steps in a row.

    Args:
      policy: ``"stop"`` or ``"skip"``.
      max_consecutive: consecutive skipped steps tolerated under ``"skip"``.
    """

    def __init__(self, policy: str, max_consecutive: int):
        if policy not in NAN_POLICIES:
            raise ValueError(f"config.nan_policy must be one of {NAN_POLICIES}; got {policy!r}.")
        if int(max_consecutive) < 1:
            raise ValueError(
                f"config.nan_max_consecutive_skips must be >= 1; got {max_consecutive}.")
        self.policy = policy
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.consecutive = 0

    def check(self, metrics: Mapping[str, jax.Array]) -> str:
        """``"ok"`` when the step was committed, ``"skip"`` when it is dropped and the run goes
        on, ``"stop"`` when the run must end (raise :meth:`error`)."""
        if bool(metrics["finite"]):
            self.consecutive = 0
            return "ok"
        self.skipped += 1
        self.consecutive += 1
        if self.policy == "skip" and self.consecutive <= self.max_consecutive:
            return "skip"
        return "stop"

    def error(self, step: int, metrics: Mapping[str, jax.Array], last_good: int | None,
              directory: str) -> FloatingPointError:
        """The error that ends the run: names the step, the loss and gradient norm, and the
        last good checkpoint."""
        kept = (f"The last good checkpoint (step {last_good}) is kept in {directory}"
                if last_good is not None else "No checkpoint was saved yet")
        again, advice = "", ", or set config.nan_policy='skip'"
        if self.policy == "skip":
            again = f" after {self.consecutive} non-finite steps in a row (nan_policy='skip')"
            advice = ""
        return FloatingPointError(
            f"Non-finite training step at step {step} (loss={float(metrics['loss'])}, "
            f"grad_norm={float(metrics['grad_norm'])}){again}; the update was not applied "
            f"and training stops. {kept}. Lower the learning rate or clip gradients "
            f"(config.optimizer.grad_clip_norm){advice}."
        )


# --------------------------------------------------------------------------------------------
# Main loop


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption saves
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def evaluate(embed, state, mesh, test: Split, config,
             step: int) -> tuple[dict[str, float], np.ndarray]:
    """Retrieval metrics of the held-out split against itself (self excluded), and the
    held-out embeddings ``[N, E]`` they were computed from.

    Raises:
      FloatingPointError: the model produced non-finite embeddings (naming the step).
    """
    emb = embed_dataset(embed, state, mesh, test.images, config.eval_batch_size)
    bad = ~np.all(np.isfinite(emb), axis=1)
    if bad.any():
        raise FloatingPointError(
            f"The model produced non-finite embeddings at step {step} ({int(bad.sum())} of "
            f"{len(emb)} held-out rows have NaN or inf); its parameters are finite, so look at "
            "the model's arithmetic (e.g. a normalisation of a zero vector) or its inputs."
        )
    return evaluation.retrieval_metrics(emb, test.labels, ks=tuple(config.eval_ks)), emb


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Trains a metric-learning model as ``config`` says, evaluating and checkpointing in
    ``workdir``; rerunning the same command resumes from the latest checkpoint.

    ``stop_at_step`` interrupts the run there as a preemption would (checkpoint, return with
    ``"preempted": True``); calling again continues the same run, e.g. to train in chunks from
    a notebook. SIGTERM does the same at the end of the current step.

    Writes ``metrics.jsonl`` (one JSON line per log and evaluation, with ``"step"``),
    TensorBoard events under ``tensorboard/``, checkpoints under ``checkpoints/``, and at the
    end ``training_curves.png`` and ``embeddings_2d.png``.

    Returns:
      ``{"step", "baseline": metrics of the raw inputs (when ``config.eval_raw_baseline``,
      else None), "final": metrics of the trained
      embedding, "preempted": bool}``.

    Raises:
      ValueError: a bad configuration (before training).
      checkpoint.ConfigMismatchError: ``workdir`` holds another configuration's checkpoints.
      FloatingPointError: a non-finite loss, gradient or update under ``nan_policy="stop"``
        (or more than ``nan_max_consecutive_skips`` in a row under ``"skip"``), or non-finite
        embeddings in evaluation; the state of the failed step is never committed, so every
        checkpoint on disk is finite and the last good one is kept.
    """
    train, test = load_data(config)
    mesh = make_mesh()
    validate_config(config, train, mesh.size)
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    checkpoint.check_workdir_config(workdir, config.to_dict(), may_change=RESUMABLE_KEYS,
                                    write=is_main)

    tx = make_optimizer(config)
    graphdefs, state = create_state(config, train.num_classes, tx)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, state)
        if is_main:
            print(f"Resumed from the checkpoint of step {start} in {ckpt.directory}.")
    step = int(state["step"])

    train_step = jax.jit(
        make_train_step(graphdefs["train"], config.loss.to_dict(), tx),
        in_shardings=(replicated, NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data"))),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    embed = jax.jit(make_embed_fn(graphdefs["eval"]), out_shardings=replicated)
    sampler = PKSampler(train.labels, config.classes_per_batch, config.samples_per_class,
                        seed=config.seed)
    metrics_log = MetricsLog(workdir, enabled=is_main)
    baseline = None
    if config.get("eval_raw_baseline", False):  # retrieval on the flattened inputs themselves
        baseline = evaluation.retrieval_metrics(
            test.images.reshape(len(test.labels), -1), test.labels, ks=tuple(config.eval_ks)
        )

    from tqdm.auto import tqdm

    bar = tqdm(total=config.num_steps, initial=step, disable=not (is_main and config.progress_bar),
               desc="train", unit="step", dynamic_ncols=True)
    history: list[float] = []
    last_good = ckpt.latest_step()
    tick, tick_step = time.perf_counter(), step
    preempted = False
    final: dict[str, float] = {}
    final_emb = None
    nan_guard = NonFiniteGuard(config.get("nan_policy", "stop"),
                               config.get("nan_max_consecutive_skips", 10))
    try:
        with _Preemption() as preemption:
            while step < config.num_steps:
                idx = sampler.batch_indices(step)
                images = shard_batch(mesh, train.images[idx])
                state, metrics = train_step(state, images, shard_batch(mesh, train.labels[idx]))
                step += 1
                status = nan_guard.check(metrics)
                if status == "ok":
                    history.append(float(metrics["loss"]))
                bar.update(1)
                if step % config.log_every == 0 or step == config.num_steps or status == "stop":
                    now = time.perf_counter()
                    rate = (step - tick_step) * sampler.batch_size / max(now - tick, 1e-9)
                    tick, tick_step = now, step
                    values = {k: float(v) for k, v in metrics.items() if k != "finite"}
                    values["loss"] = float(np.mean(history)) if history else float("nan")
                    values["images_per_sec"] = rate
                    values["skipped_steps"] = nan_guard.skipped
                    history.clear()
                    metrics_log.write(step, values, "train")
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:.0f}")
                if status == "stop":
                    raise nan_guard.error(step, metrics, last_good, ckpt.directory)
                if step % config.eval_every == 0 or step == config.num_steps:
                    final, final_emb = evaluate(embed, state, mesh, test, config, step)
                    metrics_log.write(step, final, "eval")
                    bar.write(f"step {step}: " + ", ".join(
                        f"{k}={v:.4f}" for k, v in final.items() if k != "num_queries"))
                if step % config.checkpoint_every == 0 or step == config.num_steps:
                    ckpt.save(step, state)
                    last_good = step
                if preemption.requested or step == stop_at_step:
                    if last_good != step:
                        ckpt.save(step, state, force=True)
                    ckpt.wait()
                    last_good = step
                    preempted = True
                    why = "SIGTERM" if preemption.requested else "stop_at_step"
                    bar.write(f"{why}: saved a checkpoint at step {step} and stopped.")
                    break
    finally:
        bar.close()
        ckpt.close()
        metrics_log.close()

    if not preempted and not final:  # the run was already complete: evaluate it again
        final, final_emb = evaluate(embed, state, mesh, test, config, step)
    if is_main and not preempted and config.plots:
        from dml_jax import plots

        plots.training_curves(read_metrics(workdir), os.path.join(workdir, "training_curves.png"))
        plots.embedding_map(final_emb, test.labels, os.path.join(workdir, "embeddings_2d.png"),
                            seed=config.seed)
    return {"step": step, "baseline": baseline, "final": final, "preempted": preempted}


def summary_table(baseline: Mapping[str, float], trained: Mapping[str, float],
                  keys: tuple[str, ...] = ("recall@1", "map@r", "r_precision")) -> str:
    """A plain-text table of raw-input vs trained retrieval metrics."""
    lines = [f"{'held-out digits':<18}{'raw pixels':>12}{'trained':>12}"]
    for k in keys:
        lines.append(f"{k:<18}{baseline[k]:>12.4f}{trained[k]:>12.4f}")
    return "\n".join(lines)
