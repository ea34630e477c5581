"""Center-based structured metric learning (Gong, Zhong, Hu, Hua, Remote Sensing 2019).

    python experiments/main.py --config experiments/configs/gong.py:uc_merced --workdir DIR

Rows: ``uc_merced``, ``coffee`` (Brazilian Coffee Scenes), ``siri_whu`` (the paper's "Google
data set"): overall classification accuracy of the jointly trained classifier.

Only the abstract is verified: cross-entropy + a structured metric loss + centers (features
pulled to their class center, centers pushed apart), trained jointly. The loss is the
library's reconstruction ``center_structured`` (lifted structure + center + center-push + CE,
learned centers; docs/losses.md). Everything below is UNVERIFIED and chosen as the closest
documented setting of the authors' related work: ImageNet ResNet-50 (torchvision input
convention), 224 x 224 crops, 512-d L2-normalised embedding, SGD momentum 0.9, lr 1e-3 with
10x on the new layers, x0.1 at 50 % and 75 % of 5,000 steps, weight decay 5e-4; batch layouts
16 x 4 (UC Merced, 21 classes), 2 x 32 (Coffee, 2 classes), 12 x 5 (SIRI-WHU, 12 classes).

Weights: ``model.pretrained = ""`` trains from random weights. For the paper's set-up point it
at torchvision's ``resnet50-0676ba61.pth``; ``docs/models.md`` says where to get it.
"""

import ml_collections

from experiments.configs import base, datasets

ROWS = {
    "uc_merced": {"data": datasets.uc_merced(), "p": 16, "k": 4},
    "coffee": {"data": datasets.coffee(), "p": 2, "k": 32},
    "siri_whu": {"data": datasets.siri_whu(), "p": 12, "k": 5},
}


def get_config(row: str) -> ml_collections.ConfigDict:
    """The configuration of table row ``row`` (a key of ``ROWS``)."""
    if row not in ROWS:
        raise ValueError(f"gong.py: unknown row {row!r}; rows: {sorted(ROWS)} "
                         "(--config experiments/configs/gong.py:<row>).")
    r = ROWS[row]
    c = base.get_config()
    c.dataset = r["data"].dataset
    c.evals = r["data"].evals
    c.eval_ks = r["data"].eval_ks
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
    c.loss = ml_collections.ConfigDict({
        "name": "center_structured",
        "kwargs": {"lam": 1.0, "beta": 1.0, "neg_margin": 1.0, "center_margin": 1.0,
                   "learn_centers": True},
        "classifier_weight": 0.0,  # the loss holds its own cross-entropy
    })
    c.classes_per_batch = r["p"]
    c.samples_per_class = r["k"]
    c.optimizer.update({
        "name": "sgd", "learning_rate": 1e-3, "momentum": 0.9, "weight_decay": 5e-4,
        "schedule": "multistep", "milestone_fractions": (0.5, 0.75), "gamma": 0.1,
        "warmup_steps": 0, "lr_mult": {"head": 10.0, "loss": 10.0},
    })
    c.num_steps = 5000
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.best_metric = "accuracy"
    return c
