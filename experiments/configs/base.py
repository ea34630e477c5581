"""The base configuration every experiment inherits (by import, as the flax examples do).

Every key is documented here, once; an experiment's ``get_config`` starts from
``base.get_config()`` and changes what its protocol needs.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Defaults for every key the training loop reads."""
    c = ml_collections.ConfigDict()
    c.seed = 0  # model init, P x K sampling, augmentation and k-means seeds

    # Data (dml_jax.data): `name` selects a registered source; the other entries are the
    # source's options (data_dir, crop, ...) except these pipeline entries:
    #   image_size: training crop / eval centre-crop side (None: stored size, no augmentation)
    #   resize_ratio: resize of the shorter side = image_size * resize_ratio (eval, and
    #     training with augment.crop = "resize_random")
    #   augment: training augmentation, dml_jax.data.Augment's fields: crop ("random_resized"
    #     or "resize_random": resize 256 + random 224 crop), scale, ratio, flip
    #   worker_count, threads, prefetch: grain decoding processes / threads / batches ahead
    #   skip_corrupt: replace (train) or mask (eval) unreadable images instead of raising
    c.dataset = ml_collections.ConfigDict({
        "name": "digits",
        "image_size": 224,
        "worker_count": 0,
        "skip_corrupt": False,
    })

    # Model (dml_jax.models.build_model): backbone `name`, embedding head, optional
    # classifier, and two train-step entries:
    #   input_convention: "imagenet" | "bninception" | "unit" (normalisation on the device)
    #   dtype: "float32" | "bfloat16" (compute dtype; parameters and the loss stay float32)
    #   pretrained: a torch weights file for the backbone ("" = random init; docs/models.md)
    c.model = ml_collections.ConfigDict({
        "name": "resnet50",
        "embedding_dim": 512,
        "pooling": "avg",
        "l2_normalize": True,
        "pretrained": "",
        "freeze_bn": False,
        "input_convention": "imagenet",
        "dtype": "float32",
        "backbone_kwargs": {},
    })

    # Loss (dml_jax.objectives): `name` of a loss, its `kwargs`, the weight of a softmax
    # cross-entropy on the model's classifier (0 = none; losses with their own CE add none),
    # and a cross-batch memory (XBM) of memory_size past embeddings (0 = none; contrastive,
    # triplet, multi_similarity, ranked_list), used from memory_start_step on; per_level: with
    # a multi-level head (model.multi_level), one loss per level, summed (RLL-(L,M,H)).
    c.loss = ml_collections.ConfigDict({
        "name": "multi_similarity",
        "kwargs": {},
        "classifier_weight": 0.0,
        "memory_size": 0,
        "memory_start_step": 0,
        "per_level": False,
    })

    c.classes_per_batch = 8  # P: distinct classes per global batch
    c.samples_per_class = 4  # K: samples per class (2 for pair-layout losses)

    # Optimizer (dml_jax.optim): name, learning rate, weight decay, schedule ("cosine",
    # "multistep" with milestones / milestone_fractions and gamma, "constant"), warm-up,
    # gradient clipping, and per-group multipliers lr_mult / weight_decay_mult over the groups
    # "backbone", "head", "loss" (e.g. the papers' 10x on new layers: {"head": 10.0}).
    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw",
        "learning_rate": 1e-4,
        "weight_decay": 1e-4,
        "momentum": 0.9,
        "schedule": "cosine",
        "warmup_steps": 0,
        "final_lr_fraction": 0.0,
        "milestones": (),
        "milestone_fractions": (),
        "gamma": 0.1,
        "grad_clip_norm": 0.0,
        "lr_mult": {},
        "weight_decay_mult": {},
    })

    c.num_steps = 1000  # training steps (ignored when num_epochs > 0)
    c.num_epochs = 0.0  # > 0: num_steps = ceil(num_epochs * len(train) / (P * K))
    c.log_every = 50  # steps between train rows of metrics.jsonl
    c.eval_every = 500  # steps between evaluations (and at the end)
    c.checkpoint_every = 500  # steps between checkpoints (and at the end, and on SIGTERM)
    c.keep_checkpoints = 3  # latest checkpoints kept
    # Evaluations (dml_jax.evaluation.suite): retrieval, clustering, classification,
    # knn_accuracy, reid; eval_ks = the Recall@K / CMC ranks the paper reports.
    c.evals = ("retrieval",)
    c.eval_ks = (1, 2, 4, 8)
    c.eval_batch_size = 256
    c.best_metric = ""  # e.g. "map@r": also keep the best checkpoint in checkpoints_best/
    c.best_mode = "max"

    # A step with a non-finite loss, gradient or update is never applied. "stop": end the run
    # naming the step and the last good checkpoint; "skip": drop that step and go on, stopping
    # after nan_max_consecutive_skips such steps in a row.
    c.nan_policy = "stop"
    c.nan_max_consecutive_skips = 10
    c.progress_bar = True
    c.plots = True
    return c
