"""The main job: metric learning on scikit-learn's digits (embedded, no download).

    python experiments/digits.py --workdir workdirs/digits          # what `make demo` runs
    python experiments/main.py --config experiments/configs/digits.py --workdir /tmp/ms \
        --config.loss.name=multi_similarity --config.loss.kwargs='{}' --config.num_steps=300

Default loss: OSM + CAA (Wang et al., AAAI 2019) with the classifier's cross-entropy, on a small
CNN with an L2-normalised 64-d embedding; P x K = 10 classes x 8 samples; the 8 x 8 images
are used as stored (no augmentation).
"""

import ml_collections

from experiments.configs import base


def get_config() -> ml_collections.ConfigDict:
    """The digits configuration."""
    c = base.get_config()
    c.dataset = ml_collections.ConfigDict({
        "name": "digits", "test_fraction": 0.3, "seed": 0, "image_size": None,
        "worker_count": 0, "skip_corrupt": False,
    })
    c.model = ml_collections.ConfigDict({
        "name": "small_cnn",
        "embedding_dim": 64,
        "pooling": "avg",
        "l2_normalize": True,
        "in_channels": 3,
        "input_convention": "unit",
        "dtype": "float32",
        "pretrained": "",
        "backbone_kwargs": {"widths": (32, 64)},
    })
    c.loss = ml_collections.ConfigDict({
        "name": "osm_caa",
        "kwargs": {"margin": 1.2, "sigma": 0.8, "lam": 0.5},
        "classifier_weight": 1.0,
        "memory_size": 0,
        "memory_start_step": 0,
    })
    c.classes_per_batch = 10
    c.samples_per_class = 8
    c.optimizer.update({"name": "adamw", "learning_rate": 3e-3, "weight_decay": 1e-4,
                        "warmup_steps": 50, "final_lr_fraction": 0.01})
    c.num_steps = 600
    c.log_every = 50
    c.eval_every = 200
    c.checkpoint_every = 200
    c.evals = ("retrieval",)
    return c
