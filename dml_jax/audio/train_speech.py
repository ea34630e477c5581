"""Spoken-word recognition by deep metric learning: training, transfer and evaluation.

A documented reconstruction of Takashima et al. (Interspeech 2020; details of the paper are
not available, see ``docs/speech.md``): an :class:`~dml_jax.models.audio_encoder.AudioEncoder`
is trained on the training speakers with a metric loss of :mod:`dml_jax.objectives` on
class-balanced P x K batches (:class:`dml_jax.data.PKSampler`), then optionally fine-tuned on
the target speaker's few enrolment utterances (``config.finetune.enabled``). Words are
recognised by :mod:`dml_jax.audio.recognise` (nearest enrolled utterances or centroids).
The classifier baseline is the same encoder trained with softmax cross-entropy (and
fine-tuned the same way), predicting by ``argmax``.

Evaluation:

* *unseen speakers*: queries are the held-out speakers' utterances; the DML recogniser's
  enrolled utterances are the training speakers' (no utterance of the test speaker is used);
* *target speaker*: ``config.data.shots`` utterances per word of the target are enrolled,
  the rest are queries.

The train step is one jitted pure function over ``(params, batch stats, optimizer state,
padded batch, frame mask, labels, key)``; batches are cropped to their longest utterance
(rounded up to 16 frames), so only a few shapes are compiled.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dml_jax import objectives
from dml_jax.audio import recognise
from dml_jax.audio.augment import spec_augment
from dml_jax.audio.batching import source_features
from dml_jax.audio.sources import (
    AudioSource,
    audio_folder,
    audio_manifest,
    few_shot_split,
    speaker_split,
)
from dml_jax.data.sampler import PKSampler
from dml_jax.models.audio_encoder import AudioEncoder, build_audio_encoder

Data = dict[str, np.ndarray]  # features [N, F, M], mask [N, F], labels [N], speakers [N]
_FRAME_BUCKET = 16


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default) if hasattr(config, key) else default


def _source(data_cfg: Any) -> AudioSource:
    """The configured source: the embedded set (generated if missing), a folder or a CSV."""
    kind = data_cfg.source
    opts = {"max_seconds": _get(data_cfg, "max_seconds"),
            "resample": bool(_get(data_cfg, "resample", False)),
            "mix_stereo": bool(_get(data_cfg, "mix_stereo", False))}
    if kind == "embedded":
        from dml_jax.audio.spoken_words import SpokenWordsSpec, generate_spoken_words

        spec_kw = dict(_get(data_cfg, "spec", {}) or {})
        if "words" in spec_kw:
            spec_kw["words"] = tuple(spec_kw["words"])
        root = generate_spoken_words(data_cfg.data_dir, SpokenWordsSpec(**spec_kw))
        return audio_folder(root, **opts)
    if kind == "folder":
        return audio_folder(data_cfg.root, **opts)
    if kind == "manifest":
        return audio_manifest(data_cfg.manifest, **opts)
    raise ValueError(f"config.data.source must be 'embedded', 'folder' or 'manifest'; "
                     f"got {kind!r}.")


def load_splits(config: Any) -> tuple[dict[str, Data], tuple[str, ...]]:
    """Features of the splits ``train``, ``unseen``, ``target_enrol``, ``target_query``.

    ``config.data``: ``unseen_speakers`` (list), ``target_speaker`` (or ""), ``shots``,
    ``seed``. Returns ``(splits, word names)``; splits that would be empty are left out.
    Holds every split's features.
    """
    d = config.data
    source = _source(d)
    target = _get(d, "target_speaker", "") or ""
    held = list(_get(d, "unseen_speakers", ()) or ()) + ([target] if target else [])
    train, held_src = speaker_split(source, held)
    f = config.features
    feat = lambda s: source_features(s, n_mels=f.n_mels, n_fft=f.n_fft, hop_length=f.hop_length)
    splits = {"train": feat(train)}
    unseen_idx = np.flatnonzero(held_src.speakers != target)
    if unseen_idx.size:
        splits["unseen"] = feat(held_src.subset(unseen_idx))
    if target:
        enrol, query = few_shot_split(source, target, shots=int(d.shots),
                                      seed=int(_get(d, "seed", 0)))
        splits["target_enrol"] = feat(enrol)
        if len(query):
            splits["target_query"] = feat(query)
    return splits, source.classes


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """One training phase (pre-training or fine-tuning).

    ``objective``: ``"metric"`` (``loss_config`` through :func:`dml_jax.objectives.compute`)
    or ``"classifier"`` (softmax cross-entropy on the encoder's logits).
    """

    objective: str
    loss_config: Mapping[str, Any]
    steps: int
    classes_per_batch: int
    samples_per_class: int
    learning_rate: float
    weight_decay: float = 1e-4
    warmup_steps: int = 0
    augment: Mapping[str, Any] | None = None
    seed: int = 0
    log_every: int = 0


def _optimizer(spec: TrainSpec) -> optax.GradientTransformation:
    steps = max(spec.steps, 2)
    warmup = min(max(spec.warmup_steps, 1), steps - 1)
    lr = optax.warmup_cosine_decay_schedule(
        0.0, spec.learning_rate, warmup, steps, end_value=0.01 * spec.learning_rate)
    return optax.adamw(lr, weight_decay=spec.weight_decay)


def _loss(objective: str, loss_config: Mapping[str, Any]) -> Callable:
    def loss_fn(emb, aux, y):
        if objective == "classifier":
            ce = optax.losses.softmax_cross_entropy_with_integer_labels(aux["logits"], y)
            return jnp.mean(ce)
        total, _, _ = objectives.compute(loss_config, emb, y, aux.get("logits"), {}, {})
        return total

    return loss_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, spec: TrainSpec) -> Callable:
    """The jitted step ``(params, rest, opt_state, x, mask, y, key) -> (params, rest,
    opt_state, loss)``: SpecAugment (if configured), forward in training mode, gradient,
    optimizer update. ``x`` ``[B, T, M]``, ``mask`` ``[B, T]``, ``y`` ``[B]``."""
    loss_fn = _loss(spec.objective, dict(spec.loss_config))
    aug = dict(spec.augment or {})
    use_aug = bool(aug.pop("enabled", False))

    def forward(params, rest, x, mask, y):
        model = nnx.merge(graphdef, params, rest, copy=True)  # fresh variables in this trace
        emb, aux = model(x, mask)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return loss_fn(emb, aux, y), new_rest

    @jax.jit
    def step(params, rest, opt_state, x, mask, y, key):
        if use_aug:
            x = spec_augment(key, x, mask, **aug)
        (loss, rest), grads = jax.value_and_grad(forward, has_aux=True)(params, rest, x, mask, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss

    return step


def _crop(data: Data, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mask = data["mask"][idx]
    longest = int(mask.sum(axis=1).max())
    frames = min(mask.shape[1], -(-longest // _FRAME_BUCKET) * _FRAME_BUCKET)
    return data["features"][idx, :frames], mask[:, :frames], data["labels"][idx]


def train_encoder(model: AudioEncoder, data: Data, spec: TrainSpec,
                  log: Callable[[str], None] | None = None) -> AudioEncoder:
    """Trains ``model`` on ``data`` for ``spec.steps`` P x K steps; returns the trained model.

    The batch of step ``t`` is ``PKSampler(labels, P, K, seed).batch_indices(t)``; the
    augmentation key is ``fold_in(PRNGKey(seed), t)``. ``model`` is not modified. Holds the
    model, its optimizer state and one batch.

    Raises:
      FloatingPointError: the loss became NaN or inf (naming the step).
    """
    model = nnx.clone(model)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = _optimizer(spec)
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, tx, spec)
    sampler = PKSampler(data["labels"], spec.classes_per_batch, spec.samples_per_class,
                        seed=spec.seed)
    key = jax.random.PRNGKey(spec.seed)
    for t in range(spec.steps):
        x, mask, y = _crop(data, sampler.batch_indices(t))
        params, rest, opt_state, loss = step_fn(params, rest, opt_state, x, mask, y,
                                                jax.random.fold_in(key, t))
        if (spec.log_every and (t + 1) % spec.log_every == 0) or t == spec.steps - 1:
            value = float(loss)
            if not np.isfinite(value):
                raise FloatingPointError(f"{spec.objective} loss is {value} at step {t}.")
            if log is not None and spec.log_every:
                log(f"  {spec.objective} step {t + 1}/{spec.steps}: loss {value:.4f}")
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model


def embed(model: AudioEncoder, data: Data, *, batch_size: int = 128
          ) -> tuple[np.ndarray, np.ndarray | None]:
    """Embeddings ``[N, E]`` (and logits ``[N, C]`` or None) of ``data`` in eval mode.

    Holds the outputs plus one batch.
    """
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def fwd(state, x, mask):
        emb, aux = nnx.merge(graphdef, state, copy=True)(x, mask)
        return emb, aux.get("logits")

    embs, logits = [], []
    n = data["labels"].shape[0]
    for s in range(0, n, batch_size):
        idx = np.arange(s, min(n, s + batch_size))
        idx = np.concatenate([idx, np.full(batch_size - idx.size, idx[0])])  # one shape
        x, mask, _ = _crop(data, idx)
        e, lg = fwd(state, x, mask)
        keep = min(batch_size, n - s)
        embs.append(np.asarray(e)[:keep])
        if lg is not None:
            logits.append(np.asarray(lg)[:keep])
    return np.concatenate(embs), (np.concatenate(logits) if logits else None)


def _spec(config: Any, objective: str, *, finetune: bool) -> TrainSpec:
    ft = config.finetune
    return TrainSpec(
        objective=objective,
        loss_config=config.loss.to_dict() if hasattr(config.loss, "to_dict") else config.loss,
        steps=int(ft.steps if finetune else config.num_steps),
        classes_per_batch=int(ft.classes_per_batch if finetune else config.classes_per_batch),
        samples_per_class=int(config.data.shots if finetune else config.samples_per_class),
        learning_rate=float(ft.learning_rate if finetune else config.learning_rate),
        weight_decay=float(config.weight_decay),
        warmup_steps=0 if finetune else int(config.warmup_steps),
        augment=config.augment.to_dict() if hasattr(config.augment, "to_dict")
        else config.augment,
        seed=int(config.seed) + (1 if finetune else 0),
        log_every=int(_get(config, "log_every", 0)),
    )


def _dml_accuracy(model, gallery: Data, queries: Data, num_classes: int, rec: Any
                  ) -> dict[str, float]:
    g, _ = embed(model, gallery)
    q, _ = embed(model, queries)
    scores = recognise.class_scores(q, g, gallery["labels"], num_classes=num_classes,
                                    method=rec.method, k=int(rec.k))
    return recognise.word_accuracy(scores, queries["labels"])


def _clf_accuracy(model, queries: Data) -> dict[str, float]:
    _, logits = embed(model, queries)
    return recognise.word_accuracy(logits, queries["labels"])


def run_speech_experiment(config: Any, workdir: str | os.PathLike | None = None,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Loads the data, trains the DML encoder and the classifier baseline, evaluates.

    Returns ``{"dml": {...}, "classifier": {...}, "seconds": float}``, each of ``"dml"`` /
    ``"classifier"`` holding ``{"unseen": {"top1", "top5"}, "target": ...,
    "target_pretrained": ...}`` for the splits that exist (``"target"`` is after fine-tuning
    when ``config.finetune.enabled``, else equal to ``"target_pretrained"``). Writes
    ``results.json`` into ``workdir`` when given.
    """
    t0 = time.time()
    splits, words = load_splits(config)
    c = len(words)
    log(f"speech: {c} words; " + ", ".join(
        f"{k} {v['labels'].shape[0]} utterances" for k, v in splits.items()))
    mcfg = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    mcfg["n_mels"] = int(config.features.n_mels)
    rec = config.recognition
    results: dict[str, Any] = {"dml": {}, "classifier": {}}
    runs = [("dml", "metric")] + ([("classifier", "classifier")] if config.baseline else [])
    for name, objective in runs:
        needs_logits = objective == "classifier" or (
            objectives.get_spec(config.loss.name).needs_logits
            or float(_get(config.loss, "classifier_weight", 0.0)) > 0)
        model = build_audio_encoder({**mcfg, "num_classes": c if needs_logits else None},
                                    rngs=nnx.Rngs(int(config.seed)))
        log(f"{name}: pre-training on {splits['train']['labels'].shape[0]} utterances")
        model = train_encoder(model, splits["train"], _spec(config, objective, finetune=False),
                              log)
        acc = (lambda m, g, q: _dml_accuracy(m, g, q, c, rec)) if objective == "metric" else (
            lambda m, g, q: _clf_accuracy(m, q))
        out = results[name]
        if "unseen" in splits:
            out["unseen"] = acc(model, splits["train"], splits["unseen"])
        if "target_query" in splits:
            enrol, query = splits["target_enrol"], splits["target_query"]
            out["target_pretrained"] = acc(model, enrol, query)
            out["target"] = out["target_pretrained"]
            if config.finetune.enabled:
                log(f"{name}: fine-tuning on the target's {enrol['labels'].shape[0]} "
                    "enrolment utterances")
                tuned = train_encoder(model, enrol, _spec(config, objective, finetune=True), log)
                out["target"] = acc(tuned, enrol, query)
    results["seconds"] = time.time() - t0
    if workdir is not None:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        (Path(workdir) / "results.json").write_text(json.dumps(results, indent=2))
    return results


def summary_line(results: Mapping[str, Any]) -> str:
    """``speech: unseen speakers DML <acc> (classifier <acc>), target speaker DML <acc>
    (classifier <acc>)``: top-1 word accuracies (``nan`` where a split or model is absent)."""
    def top1(model: str, split: str) -> str:
        v = results.get(model, {}).get(split, {}).get("top1", float("nan"))
        return f"{v:.4f}"

    return (f"speech: unseen speakers DML {top1('dml', 'unseen')} (classifier "
            f"{top1('classifier', 'unseen')}), target speaker DML {top1('dml', 'target')} "
            f"(classifier {top1('classifier', 'target')})")


def format_table(results: Mapping[str, Any]) -> str:
    """A small table of top-1 / top-5 word accuracy per split and model."""
    rows = [("unseen speakers", "unseen"), ("target, pre-trained only", "target_pretrained"),
            ("target, after fine-tuning", "target")]
    lines = [f"{'word accuracy (top-1 / top-5)':<30}{'DML':>16}{'classifier':>16}"]
    for title, key in rows:
        cells = []
        for model in ("dml", "classifier"):
            r = results.get(model, {}).get(key)
            cells.append(f"{r['top1']:.4f} / {r['top5']:.4f}" if r else "-")
        lines.append(f"{title:<30}{cells[0]:>16}{cells[1]:>16}")
    return "\n".join(lines)
