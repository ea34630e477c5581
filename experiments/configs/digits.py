"""The main job: metric learning on scikit-learn's digits (embedded, no download).

    python experiments/main.py --config experiments/configs/digits.py --workdir workdirs/digits
    python experiments/main.py --config experiments/configs/digits.py --workdir /tmp/ms \
        --config.loss.name=multi_similarity --config.loss.kwargs='{}' --config.num_steps=300

Default loss: OSM + CAA (Wang et al., AAAI 2019) with the classifier's cross-entropy, on a small
CNN with an L2-normalised 64-d embedding; P x K = 10 classes x 8 samples.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The digits configuration."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.dataset = ml_collections.ConfigDict({"name": "digits", "test_fraction": 0.3, "seed": 0})
    c.model = ml_collections.ConfigDict({
        "name": "small_cnn",
        "embedding_dim": 64,
        "pooling": "avg",
        "l2_normalize": True,
        "backbone_kwargs": {"widths": (32, 64)},
    })
    c.loss = ml_collections.ConfigDict({
        "name": "osm_caa",
        "kwargs": {"margin": 1.2, "sigma": 0.8, "lam": 0.5},
        "classifier_weight": 1.0,
    })
    c.classes_per_batch = 10  # P
    c.samples_per_class = 8  # K
    c.optimizer = ml_collections.ConfigDict({
        "name": "adamw",
        "learning_rate": 3e-3,
        "weight_decay": 1e-4,
        "warmup_steps": 50,
        "final_lr_fraction": 0.01,
        "grad_clip_norm": 0.0,
    })
    c.num_steps = 600
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
    c.keep_checkpoints = 3
    c.eval_batch_size = 256
    c.eval_ks = (1, 2, 4, 8)
    c.eval_raw_baseline = True  # also report retrieval on the raw pixels, for comparison
    # A step with a non-finite loss, gradient or update is never applied. "stop": end the run
    # naming the step and the last good checkpoint; "skip": drop that step and go on, stopping
    # after nan_max_consecutive_skips such steps in a row.
    c.nan_policy = "stop"
    c.nan_max_consecutive_skips = 10
    c.progress_bar = True
    c.plots = True
    return c
