"""Ranked List Loss (Wang, Hua, Kodirov, Robertson, TPAMI; CVPR 2019): one row per data set.

    python experiments/main.py --config experiments/configs/ranked_list.py:cub --workdir DIR

Rows: ``cub``, ``cars``, ``sop`` (RLL-(L,M,H): Recall@1/2/4/8, SOP Recall@1/10/100).

Protocol (official Caffe config ``CUB_V01/60_n1.4_pn0.2_tp0_tn10``): BN-Inception, 227 x 227
crops, batch 60, SGD momentum 0.9, lr 1e-3 x0.5 at 2k/4k/6k/8k, 10k steps, weight decay 2e-5;
three 512-d linear embeddings with lr_mult 100 (``lr_mult = {"head": 100}``): L on
``inception_3c``, M on ``inception_4e``, H on the final map (``inception_5b``, average-pooled),
each L2-normalised; alpha 1.4, m 0.2, T_p 0, T_n 10, lambda 0.5. Test feature: the 1,536-d
concatenation (RLL-(L,M,H)).

Choices where the paper or its code says otherwise or nothing:

* batch layout 20 classes x 3 images: the official sampler was not read (UNVERIFIED);
* Cars uses CUB's settings (UNVERIFIED); SOP: alpha 1.2, m 0.4, T_n 10 (the CVPR paper's
  SOP setting as recalled, UNVERIFIED);
* the loss: one RLL per level (``loss.per_level = True``), summed, as the official code
  trains L, M and H (each on its own L2-normalised 512-d embedding; loss weights 1,
  UNVERIFIED); the test feature is their concatenation;
* the official heads read the auxiliary branches' pooled maps; here each level's map is
  globally average-pooled before its linear layer (``MultiLevelHead``).

Weights: ``model.pretrained = ""`` trains from random weights. For the paper's set-up point it
at Cadene's ``bn_inception-52deb4733.pth``; ``docs/models.md`` says where to get it.
"""

import ml_collections

from experiments.configs import base, datasets

_CUB_LOSS = {"alpha": 1.4, "margin": 0.2, "t_p": 0.0, "t_n": 10.0, "lam": 0.5}
ROWS = {
    "cub": {"data": datasets.cub(image_size=227, resize_ratio=256 / 227), "loss": _CUB_LOSS,
            "eval_ks": (1, 2, 4, 8)},
    "cars": {"data": datasets.cars(image_size=227, resize_ratio=256 / 227), "loss": _CUB_LOSS,
             "eval_ks": (1, 2, 4, 8)},
    "sop": {"data": datasets.sop(image_size=227, resize_ratio=256 / 227),
            "loss": {"alpha": 1.2, "margin": 0.4, "t_p": 0.0, "t_n": 10.0, "lam": 0.5},
            "eval_ks": (1, 10, 100)},
}


def get_config(row: str) -> ml_collections.ConfigDict:
    """The configuration of table row ``row`` (a key of ``ROWS``)."""
    if row not in ROWS:
        raise ValueError(f"ranked_list.py: unknown row {row!r}; rows: {sorted(ROWS)} "
                         "(--config experiments/configs/ranked_list.py:<row>).")
    r = ROWS[row]
    c = base.get_config()
    c.dataset = r["data"].dataset
    c.evals = r["data"].evals
    c.eval_ks = r["eval_ks"]
    c.model = ml_collections.ConfigDict({
        "name": "bninception",
        "embedding_dim": 512,
        "multi_level": ("inception_3c", "inception_4e", "inception_5b"),
        "pooling": "avg",
        "l2_normalize": True,
        "pretrained": "",
        "freeze_bn": False,
        "input_convention": "bninception",
        "dtype": "float32",
        "backbone_kwargs": {},
    })
    c.loss = ml_collections.ConfigDict({
        "name": "ranked_list", "kwargs": r["loss"], "classifier_weight": 0.0,
        "memory_size": 0, "memory_start_step": 0, "per_level": True})
    c.classes_per_batch = 20
    c.samples_per_class = 3
    c.optimizer.update({
        "name": "sgd", "learning_rate": 1e-3, "momentum": 0.9, "weight_decay": 2e-5,
        "schedule": "multistep", "milestones": (2000, 4000, 6000, 8000), "gamma": 0.5,
        "warmup_steps": 0, "lr_mult": {"head": 100.0},
    })
    c.num_steps = 10000
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.best_metric = "recall@1"
    return c
