"""Training and evaluation: ``train_and_evaluate(config, workdir)``.

Data flows one way: config -> data -> model -> loss -> train step -> evaluation -> metrics and
plots. The data come only through :mod:`dml_jax.data` (a source chosen by
``config.dataset.name``, P x K training batches and padded evaluation batches, uint8 images
normalised on the device). The train step is a pure function under ``jax.jit`` over a ``Mesh``
of every device with a ``('data',)`` axis: the batch is sharded over it, the state replicated,
and the loss (and BatchNorm statistics) computed on the global batch by XLA. The state is
donated.

The state is a plain pytree::

    {"step": int32 [], "params": {"model": nnx.State, "loss": dict (e.g. learned centers)},
     "rest": nnx.State (BatchNorm statistics, frozen parameters), "opt_state": optax state,
     "loss_state": dict (e.g. moved centers)}

Checkpoints (orbax) hold it whole; the P x K batch of a step is a pure function of the seed and
the step, so a resumed run continues exactly where it stopped.
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
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dml_jax import checkpoint, data, objectives, optim
from dml_jax.data.normalize import CONVENTIONS
from dml_jax.evaluation import suite
from dml_jax.models import build_model, temporal_average_pool

# Keys a resumed run may change (everything else must match the checkpoints' config).
RESUMABLE_KEYS = ("num_steps", "num_epochs", "eval_every", "log_every", "checkpoint_every",
                  "progress_bar", "plots", "nan_policy", "nan_max_consecutive_skips", "evals",
                  "eval_ks", "eval_batch_size", "best_metric")
# Entries of config.dataset for the input pipeline; the others go to the source's factory.
PIPELINE_KEYS = ("image_size", "skip_corrupt", "worker_count", "threads", "prefetch",
                 "resize_ratio", "augment")
# Entries of config.model for the train step; the others go to build_model.
STEP_KEYS = ("input_convention", "dtype")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# --------------------------------------------------------------------------------------------
# Configuration


def source_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """``config.dataset`` without the pipeline's entries: what the source factory takes."""
    return {k: v for k, v in config.dataset.to_dict().items() if k not in PIPELINE_KEYS}


def pipeline_option(config: ml_collections.ConfigDict, key: str, default: Any) -> Any:
    """An input-pipeline entry of ``config.dataset`` (see ``PIPELINE_KEYS``)."""
    return config.dataset.get(key, default)


def step_option(config: ml_collections.ConfigDict, key: str, default: Any) -> Any:
    """A train-step entry of ``config.model`` (see ``STEP_KEYS``)."""
    return config.model.get(key, default)


def eval_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """``config.evals``, the evaluations to run (default: retrieval)."""
    return tuple(config.get("evals", ("retrieval",)))


def total_steps(config: ml_collections.ConfigDict, num_records: int) -> int:
    """``config.num_steps``, or ``ceil(num_epochs * N / (P * K))`` when ``num_epochs`` is set."""
    epochs = config.get("num_epochs", 0) or 0
    if epochs:
        batch = config.classes_per_batch * config.samples_per_class
        return max(1, math.ceil(float(epochs) * num_records / batch))
    return int(config.num_steps)


def validate_config(config: ml_collections.ConfigDict, train_source: Any,
                    num_devices: int) -> None:
    """Refuses a bad configuration before any training, saying what to change.

    Raises:
      ValueError: unknown loss, evaluation or input convention; a pair-layout loss without
        ``samples_per_class = 2``; ``P * K`` not divisible by the device count; more classes
        per batch than the data has; non-positive step counts; an unknown ``nan_policy``.
      FileNotFoundError: ``config.model.pretrained`` names a file that does not exist.
    """
    objectives.get_spec(config.loss.name)
    if config.loss.name in objectives.PAIR_LAYOUT_LOSSES and config.samples_per_class != 2:
        raise ValueError(
            f"The {config.loss.name!r} loss works on anchor/positive pairs (rows 2k, 2k+1): "
            f"set config.samples_per_class = 2 (got {config.samples_per_class})."
        )
    batch = config.classes_per_batch * config.samples_per_class
    if batch % num_devices:
        raise ValueError(
            f"The batch of classes_per_batch * samples_per_class = {config.classes_per_batch} * "
            f"{config.samples_per_class} = {batch} rows cannot be split over {num_devices} "
            f"devices: choose P and K so that P * K is a multiple of {num_devices}."
        )
    num_classes = len(train_source.classes)
    if config.classes_per_batch > num_classes:
        raise ValueError(
            f"classes_per_batch={config.classes_per_batch} but the training data has only "
            f"{num_classes} classes: set config.classes_per_batch <= {num_classes}."
        )
    for key in ("eval_every", "log_every", "checkpoint_every"):
        if int(config[key]) <= 0:
            raise ValueError(f"config.{key} must be > 0; got {config[key]}.")
    if not config.get("num_epochs", 0) and int(config.num_steps) <= 0:
        raise ValueError(f"config.num_steps must be > 0; got {config.num_steps}.")
    suite.check(eval_names(config))
    convention = step_option(config, "input_convention", "imagenet")
    if convention not in CONVENTIONS:
        raise ValueError(f"config.model.input_convention must be one of {CONVENTIONS}; "
                         f"got {convention!r}.")
    if step_option(config, "dtype", "float32") not in DTYPES:
        raise ValueError(f"config.model.dtype must be one of {sorted(DTYPES)}; got "
                         f"{step_option(config, 'dtype', 'float32')!r}.")
    if config.loss.get("per_level", False) and not config.model.get("multi_level"):
        raise ValueError("config.loss.per_level = True trains one loss per level of a "
                         "multi-level head: set config.model.multi_level (e.g. three stages).")
    pretrained = config.model.get("pretrained")
    if pretrained and not os.path.exists(pretrained):
        raise FileNotFoundError(
            f"config.model.pretrained = {pretrained!r}: no such file. Nothing is downloaded: "
            "get the backbone's weights as docs/models.md says (torchvision / Cadene / timm "
            "state dicts) and point the config at the file, or set "
            "config.model.pretrained = '' to start from random weights."
        )
    NonFiniteGuard(config.get("nan_policy", "stop"), config.get("nan_max_consecutive_skips", 10))


def load_sources(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sources of ``config.dataset``: ``"train"`` and each split the evaluations need."""
    options = source_options(config)
    names = ("train", *suite.required_splits(eval_names(config)))
    return {split: data.get_source(options, split) for split in dict.fromkeys(names)}


# --------------------------------------------------------------------------------------------
# State


def make_mesh() -> Mesh:
    """A 1-D mesh ``('data',)`` over every device of every process."""
    return Mesh(np.asarray(jax.devices()), ("data",))


def make_optimizer(config: ml_collections.ConfigDict,
                   num_steps: int | None = None) -> optax.GradientTransformation:
    """The optimizer of ``config.optimizer`` over ``num_steps`` (default ``config.num_steps``);
    see :mod:`dml_jax.optim` (groups, multipliers, schedules)."""
    return optim.make_optimizer(config.optimizer.to_dict(),
                                int(config.num_steps if num_steps is None else num_steps))


def _model_config(config: ml_collections.ConfigDict, num_classes: int) -> dict[str, Any]:
    model_cfg = {k: v for k, v in config.model.to_dict().items() if k not in STEP_KEYS}
    if not model_cfg.get("pretrained"):
        model_cfg.pop("pretrained", None)
    spec = objectives.get_spec(config.loss.name)
    evals = eval_names(config)
    if spec.needs_logits or config.loss.classifier_weight > 0 or suite.needs_logits(evals):
        model_cfg["num_classes"] = num_classes
    return model_cfg


def create_state(config, num_classes: int, tx: optax.GradientTransformation):
    """Builds the model (with its pretrained backbone, if configured) and the train state.

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


def _model_input(images: jax.Array, convention: str, dtype: str) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` -> the model's input (normalised on the device, in ``dtype``)."""
    return data.normalize(images, convention).astype(DTYPES[dtype])


def _cast_floats(tree: Any, dtype: Any) -> Any:
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                        else x, tree)


def _embed(model, x: jax.Array,
           l2_normalize: bool) -> tuple[jax.Array, jax.Array | None, dict[str, jax.Array]]:
    """``(embeddings [B, E] f32, logits [B, C] f32 or None, levels)`` of images
    ``x [B, H, W, C]`` or clips ``x [B, T, H, W, C]``; ``levels`` = a multi-level head's
    per-level embeddings ``{"embedding/<stage>": [B, E_s] f32}`` (empty without one).

    A clip's ``T`` frames run through ``model`` as one batch of ``B*T`` images; their
    embeddings (each level's too) and logits are averaged over ``T`` (the embeddings
    re-L2-normalised when ``l2_normalize``, as the model normalises each frame's).
    """
    clip = x.ndim == 5
    if clip:
        b, t = x.shape[:2]
        x = x.reshape(b * t, *x.shape[2:])
    embeddings, aux = model(x)
    embeddings = embeddings.astype(jnp.float32)
    logits = aux.get("logits")
    logits = None if logits is None else logits.astype(jnp.float32)
    levels = {k: v.astype(jnp.float32) for k, v in aux.items() if k.startswith("embedding/")}
    if clip:
        def pool(e):
            return temporal_average_pool(e.reshape(b, t, -1), l2_normalize_output=l2_normalize)

        embeddings = pool(embeddings)
        levels = {k: pool(v) for k, v in levels.items()}
        logits = None if logits is None else jnp.mean(logits.reshape(b, t, -1), axis=1)
    return embeddings, logits, levels


def compute_objective(loss_config: Mapping[str, Any], embeddings: jax.Array,
                      levels: Mapping[str, jax.Array], labels: jax.Array,
                      logits: jax.Array | None, params: Any, state: Any):
    """:func:`dml_jax.objectives.compute` on the embedding ``[B, E]``; with
    ``loss_config["per_level"]``, the sum of one metric loss per level of a multi-level head
    (``levels``, e.g. RLL-(L,M,H)'s three embeddings, as the official code trains them), the
    classifier's cross-entropy counted once.

    Returns ``(total, parts, new_state)`` as ``objectives.compute`` does (``metric_loss`` summed
    over the levels).
    """
    if not loss_config.get("per_level", False):
        return objectives.compute(loss_config, embeddings, labels, logits, params, state)
    total, parts = jnp.float32(0.0), {}
    for i, key in enumerate(levels):
        config = loss_config if i == 0 else {**loss_config, "classifier_weight": 0.0}
        level_total, level_parts, state = objectives.compute(config, levels[key], labels,
                                                             logits, params, state)
        total = total + level_total
        metric = parts.get("metric_loss", 0.0) + level_parts["metric_loss"]
        parts = {**level_parts, **parts, "metric_loss": metric}
    return total, parts, state


def make_train_step(graphdef, loss_config: Mapping[str, Any], tx: optax.GradientTransformation,
                    *, input_convention: str = "unit", dtype: str = "float32",
                    l2_normalize: bool = True):
    """``train_step(state, images uint8 [B, H, W, 3], labels [B]) -> (state, metrics)`` (pure).

    Clips, ``images`` uint8 ``[B, T, H, W, 3]`` (video re-ID tracklets), are embedded frame by
    frame and averaged over ``T`` (logits too; the embeddings re-L2-normalised when
    ``l2_normalize``, i.e. ``config.model.l2_normalize``), so the loss sees ``[B, E]``.

    The images are normalised on the device (``input_convention``, see
    :func:`dml_jax.data.normalize`). With ``dtype="bfloat16"`` the model computes in bfloat16
    from float32 parameters (cast per step; the gradients and the optimizer stay float32, so
    no loss scaling is needed) and the loss arithmetic is float32.

    A step whose loss, global gradient norm or updated state is not finite is not committed:
    the returned state is the input state with only ``step`` advanced, and
    ``metrics["finite"]`` is False (the loop then stops or skips, as ``config.nan_policy``
    says). So a non-finite update never reaches the parameters, the optimizer state or the
    BatchNorm statistics, and no checkpoint can hold one.
    """
    compute_dtype = DTYPES[dtype]

    def train_step(state, images, labels):
        x = _model_input(images, input_convention, dtype)

        def loss_fn(params):
            model_params = _cast_floats(params["model"], compute_dtype)
            model = nnx.merge(graphdef, model_params, state["rest"], copy=True)
            embeddings, logits, levels = _embed(model, x, l2_normalize)
            total, parts, loss_state = compute_objective(
                loss_config, embeddings, levels, labels, logits, params["loss"],
                state["loss_state"],
            )
            rest = nnx.state(model, nnx.Not(nnx.Param))
            return total, (parts, rest, loss_state)

        (loss, (parts, rest, loss_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        rest = jax.tree.map(lambda new, old: new.astype(old.dtype), rest, state["rest"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.global_norm(grads)
        update = {"params": params, "rest": rest, "opt_state": opt_state,
                  "loss_state": loss_state}
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(update)
        kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), update,
                            {k: state[k] for k in update})
        new_state = {"step": state["step"] + 1, **kept}
        metrics = {"loss": loss, "grad_norm": grad_norm, "finite": finite, **parts}
        return new_state, metrics

    return train_step


def make_embed_fn(graphdef, *, input_convention: str = "unit", dtype: str = "float32",
                  l2_normalize: bool = True):
    """``embed(params, rest, images uint8 [B, H, W, 3]) -> (embeddings [B, E] f32, logits
    [B, C] f32 or None)`` in eval mode (pure); clips ``[B, T, H, W, 3]`` are averaged over
    ``T`` as in :func:`make_train_step`."""
    compute_dtype = DTYPES[dtype]

    def embed(params, rest, images):
        x = _model_input(images, input_convention, dtype)
        model = nnx.merge(graphdef, _cast_floats(params, compute_dtype), rest, copy=True)
        embeddings, logits, _ = _embed(model, x, l2_normalize)
        return embeddings, logits

    return embed


def shard_rows(mesh: Mesh, local: np.ndarray) -> jax.Array:
    """This process's rows ``[n, ...]`` of a global batch ``[n * process_count, ...]``, placed
    on the mesh sharded over ``'data'`` (every process contributes its own rows)."""
    sharding = NamedSharding(mesh, P("data"))
    shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
    return jax.make_array_from_process_local_data(sharding, local, shape)


def _eval_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
    size = int(config.get("eval_batch_size", 256))
    return int(math.ceil(size / mesh.size) * mesh.size)


def embed_split(embed, state, mesh: Mesh, source: Any,
                config: ml_collections.ConfigDict) -> suite.EmbeddedSplit:
    """Embeds every record of ``source`` (streamed in fixed-shape padded batches; one
    compilation) and returns them in index order.

    Holds only the ``[N, E]`` embeddings (and ``[N, C]`` logits) on the host.
    """
    emb = logits = None
    with data.eval_batches(
        source, batch_size=_eval_batch_size(config, mesh),
        image_size=pipeline_option(config, "image_size", 224),
        resize_ratio=pipeline_option(config, "resize_ratio", 256 / 224),
        worker_count=pipeline_option(config, "worker_count", 0),
        threads=pipeline_option(config, "threads", None),
        skip_corrupt=pipeline_option(config, "skip_corrupt", False),
    ) as batches:
        for batch in batches:
            e, lg = embed(state["params"]["model"], state["rest"], shard_rows(mesh, batch["image"]))
            # Every process gets the whole batch (replicated out_shardings) and the whole index.
            e = np.asarray(jax.device_get(e))
            index = np.asarray(multihost_gather(mesh, batch["index"]))
            keep = index >= 0
            if emb is None:
                emb = np.zeros((len(source), e.shape[1]), np.float32)
                if lg is not None:
                    logits = np.zeros((len(source), lg.shape[1]), np.float32)
            emb[index[keep]] = e[keep]
            if lg is not None:
                logits[index[keep]] = np.asarray(jax.device_get(lg))[keep]
    return suite.EmbeddedSplit(
        emb, np.asarray(source.labels), logits,
        getattr(source, "person_ids", None), getattr(source, "camera_ids", None))


def multihost_gather(mesh: Mesh, local: np.ndarray) -> np.ndarray:
    """The global ``[n * process_count, ...]`` array of every process's rows, on every
    process (a no-op copy in one process)."""
    if jax.process_count() == 1:
        return np.asarray(local)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))


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


def evaluate(embed, state, mesh: Mesh, sources: Mapping[str, Any],
             config: ml_collections.ConfigDict,
             step: int) -> tuple[dict[str, float], dict[str, suite.EmbeddedSplit]]:
    """Runs ``config.evals`` on the embedded splits they need.

    Returns the metrics and the embedded splits (``"test"`` feeds the final plot).

    Raises:
      FloatingPointError: the model produced non-finite embeddings (naming the step).
    """
    names = eval_names(config)
    splits = {}
    for split in suite.required_splits(names):
        embedded = embed_split(embed, state, mesh, sources[split], config)
        bad = ~np.all(np.isfinite(embedded.embeddings), axis=1)
        if bad.any():
            raise FloatingPointError(
                f"The model produced non-finite embeddings at step {step} ({int(bad.sum())} of "
                f"{len(bad)} {split!r} rows have NaN or inf); its parameters are finite, so "
                "look at the model's arithmetic (e.g. a normalisation of a zero vector) or "
                "its inputs."
            )
        splits[split] = embedded
    options = {"ks": tuple(config.get("eval_ks", (1, 2, 4, 8))), "seed": config.seed}
    return suite.run(names, splits, options), splits


def _best_checkpointer(workdir: str, config: ml_collections.ConfigDict):
    metric = config.get("best_metric", "")
    if not metric:
        return None
    return checkpoint.Checkpointer(os.path.join(workdir, "checkpoints_best"), max_to_keep=1,
                                   best_metric=metric,
                                   best_mode=config.get("best_mode", "max"))


def train_augmentation(config: ml_collections.ConfigDict) -> data.Augment:
    """``config.dataset.augment`` (the fields of :class:`dml_jax.data.Augment`: ``crop`` =
    ``"random_resized"`` or ``"resize_random"``, ``scale``, ``ratio``, ``flip``), with
    ``config.dataset.resize_ratio`` shared with evaluation."""
    options = dict(pipeline_option(config, "augment", {}) or {})
    options.setdefault("resize_ratio", pipeline_option(config, "resize_ratio", 256 / 224))
    for key in ("scale", "ratio"):
        if key in options:
            options[key] = tuple(options[key])
    return data.Augment(**options)


def _train_iterator(config: ml_collections.ConfigDict, source: Any,
                    start_step: int) -> Iterator[dict[str, np.ndarray]]:
    return data.train_batches(
        source, classes_per_batch=config.classes_per_batch,
        samples_per_class=config.samples_per_class,
        image_size=pipeline_option(config, "image_size", 224), seed=config.seed,
        start_step=start_step, augment=train_augmentation(config),
        worker_count=pipeline_option(config, "worker_count", 0),
        threads=pipeline_option(config, "threads", None),
        prefetch=pipeline_option(config, "prefetch", 2),
        skip_corrupt=pipeline_option(config, "skip_corrupt", False))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None
) -> dict[str, Any]:
    """Trains a metric-learning model as ``config`` says, evaluating and checkpointing in
    ``workdir``; rerunning the same command resumes from the latest checkpoint.

    ``stop_at_step`` interrupts the run there as a preemption would (checkpoint, return with
    ``"preempted": True``); calling again continues the same run, e.g. to train in chunks from
    a notebook. SIGTERM does the same at the end of the current step.

    Writes ``metrics.jsonl`` (one strict-JSON line per log and evaluation, with ``"step"``),
    TensorBoard events under ``tensorboard/``, checkpoints under ``checkpoints/`` (and the best
    by ``config.best_metric`` under ``checkpoints_best/``), and at the end
    ``training_curves.png`` and ``embeddings_2d.png``.

    Returns:
      ``{"step", "final": metrics of the last evaluation, "embeddings": the embedded test
      split (an ``EmbeddedSplit``, or None when preempted), "preempted": bool}``.

    Raises:
      ValueError: a bad configuration (before training).
      FileNotFoundError: a missing pretrained-weights file or data set (before training).
      checkpoint.ConfigMismatchError: ``workdir`` holds another configuration's checkpoints.
      FloatingPointError: a non-finite loss, gradient or update under ``nan_policy="stop"``
        (or more than ``nan_max_consecutive_skips`` in a row under ``"skip"``), or non-finite
        embeddings in evaluation; the state of the failed step is never committed, so every
        checkpoint on disk is finite and the last good one is kept.
    """
    sources = load_sources(config)
    mesh = make_mesh()
    validate_config(config, sources["train"], mesh.size)
    num_steps = total_steps(config, len(sources["train"]))
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    checkpoint.check_workdir_config(workdir, config.to_dict(), may_change=RESUMABLE_KEYS,
                                    write=is_main)

    tx = make_optimizer(config, num_steps)
    graphdefs, state = create_state(config, len(sources["train"].classes), tx)
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(state, replicated)
    ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   max_to_keep=config.keep_checkpoints)
    best = _best_checkpointer(workdir, config)
    start = ckpt.latest_step()
    if start is not None:
        state = ckpt.restore(start, state)
        if is_main:
            print(f"Resumed from the checkpoint of step {start} in {ckpt.directory}.")
    step = int(state["step"])

    step_kwargs = {"input_convention": step_option(config, "input_convention", "imagenet"),
                   "dtype": step_option(config, "dtype", "float32"),
                   "l2_normalize": bool(config.model.get("l2_normalize", True))}
    batch_sharding = NamedSharding(mesh, P("data"))
    train_step = jax.jit(
        make_train_step(graphdefs["train"], config.loss.to_dict(), tx, **step_kwargs),
        in_shardings=(replicated, batch_sharding, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    embed = jax.jit(make_embed_fn(graphdefs["eval"], **step_kwargs), out_shardings=replicated)
    batch_size = config.classes_per_batch * config.samples_per_class
    metrics_log = MetricsLog(workdir, enabled=is_main)

    from tqdm.auto import tqdm

    bar = tqdm(total=num_steps, initial=step, disable=not (is_main and config.progress_bar),
               desc="train", unit="step", dynamic_ncols=True)
    history: list[float] = []
    last_good = ckpt.latest_step()
    tick, tick_step = time.perf_counter(), step
    preempted = False
    final: dict[str, float] = {}
    embedded: dict[str, suite.EmbeddedSplit] = {}
    nan_guard = NonFiniteGuard(config.get("nan_policy", "stop"),
                               config.get("nan_max_consecutive_skips", 10))
    batches = _train_iterator(config, sources["train"], step) if step < num_steps else None
    try:
        with _Preemption() as preemption:
            while step < num_steps:
                batch = next(batches)
                state, metrics = train_step(state, shard_rows(mesh, batch["image"]),
                                            shard_rows(mesh, batch["label"]))
                step += 1
                status = nan_guard.check(metrics)
                if status == "ok":
                    history.append(float(metrics["loss"]))
                bar.update(1)
                if step % config.log_every == 0 or step == num_steps or status == "stop":
                    now = time.perf_counter()
                    rate = (step - tick_step) * batch_size / max(now - tick, 1e-9)
                    tick, tick_step = now, step
                    values = {k: float(v) for k, v in metrics.items() if k != "finite"}
                    values["loss"] = float(np.mean(history)) if history else float("nan")
                    values["images_per_sec"] = rate
                    values["skipped_steps"] = nan_guard.skipped
                    values["skipped_images"] = batches.skipped
                    history.clear()
                    metrics_log.write(step, values, "train")
                    bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:.0f}")
                if status == "stop":
                    raise nan_guard.error(step, metrics, last_good, ckpt.directory)
                if step % config.eval_every == 0 or step == num_steps:
                    final, embedded = evaluate(embed, state, mesh, sources, config, step)
                    metrics_log.write(step, final, "eval")
                    bar.write(f"step {step}: " + ", ".join(
                        f"{k}={v:.4f}" for k, v in final.items() if "num_queries" not in k))
                    if best is not None:
                        best.save(step, state, metrics=final)
                if step % config.checkpoint_every == 0 or step == num_steps:
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
        if batches is not None:
            batches.close()
        bar.close()
        ckpt.close()
        if best is not None:
            best.close()
        metrics_log.close()

    if not preempted and not final:  # the run was already complete: evaluate it again
        final, embedded = evaluate(embed, state, mesh, sources, config, step)
    test = embedded.get("test") or next(iter(embedded.values()), None)
    if is_main and not preempted and config.plots and test is not None:
        from dml_jax import plots

        plots.training_curves(read_metrics(workdir), os.path.join(workdir, "training_curves.png"))
        plots.embedding_map(test.embeddings, test.labels,
                            os.path.join(workdir, "embeddings_2d.png"), seed=config.seed)
    return {"step": step, "final": final, "embeddings": None if preempted else test,
            "preempted": preempted}
