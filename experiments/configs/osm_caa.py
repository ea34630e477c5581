"""OSM + CAA (Wang, Hua, Kodirov, Hu, Robertson, AAAI 2019): one row per table entry.

    python experiments/main.py --config experiments/configs/osm_caa.py:cub_crop --workdir DIR

Rows: ``cub_raw``, ``cub_crop``, ``cars_raw``, ``cars_crop`` (poster Table 2, Recall@1..32)
and ``mars`` (Table 1, CMC-1/5/20 + mAP).

Protocol (official Caffe configs ``CUB_V01`` / ``CARS196_V01``): BN-Inception, 224 x 224
crops, P x K = 8 classes x 7 images (batch 56), the OSM + CAA weighted contrastive loss
(margin 1.2, sigma_OSM 0.8, lambda 0.5) with a softmax classifier (C = training classes)
whose true-class probability is the CAA score, SGD momentum 0.9; CUB: lr 5e-4, x0.5 at
500/1000/1500/1501/2000/2001, weight decay 3e-4, 3,000 steps; Cars: lr 1e-3, x0.5 at
1500/3000/4500/6000, weight decay 5e-5, 10,000 steps.

Choices where the paper or its code says otherwise or nothing (docs/losses.md has the loss):

* embedding: the official feature is a 1,024-d FC + BN + ReLU on the auxiliary branch; here a
  1,024-d linear layer on BN-Inception's pooled features, L2-normalised;
* CAA: ``attention="softmax"`` (the poster's equation); the official code re-weights the
  probability with a Gaussian (``attention="gaussian"``); its three weighted-softmax heads are
  one plain cross-entropy here (``classifier_weight = 1``);
* the 10x learning rate on the new layers (``lr_mult = {"head": 10}``) is UNVERIFIED for
  this paper (the Caffe convention for new layers); BatchNorm is trained (UNVERIFIED);
* MARS: the official ``MARS_V01`` config was not read (UNVERIFIED): same network, loss and
  batch layout, 8 frames per tracklet averaged (temporal pooling), Cars' schedule; re-ID
  crops are usually 256 x 128, the pipeline's crops are square (224).

Weights: ``model.pretrained = ""`` trains from random weights. For the paper's set-up point it
at Cadene's ``bn_inception-52deb4733.pth`` (``--config.model.pretrained=/path/...``);
``docs/models.md`` says where to get it.
"""

import ml_collections

from experiments.configs import base, datasets

# Solver of each data set (official configs), then the rows: data + solver.
_CUB = {"lr": 5e-4, "weight_decay": 3e-4, "milestones": (500, 1000, 1500, 1501, 2000, 2001),
        "num_steps": 3000, "best": "recall@1"}
_CARS = {"lr": 1e-3, "weight_decay": 5e-5, "milestones": (1500, 3000, 4500, 6000),
         "num_steps": 10000, "best": "recall@1"}
ROWS = {
    "cub_raw": {"data": datasets.cub(crop=False), **_CUB},
    "cub_crop": {"data": datasets.cub(crop=True), **_CUB},
    "cars_raw": {"data": datasets.cars(crop=False), **_CARS},
    "cars_crop": {"data": datasets.cars(crop=True), **_CARS},
    "mars": {"data": datasets.mars(num_frames=8), **_CARS, "best": "cmc@1"},
}


def get_config(row: str) -> ml_collections.ConfigDict:
    """The configuration of table row ``row`` (a key of ``ROWS``)."""
    if row not in ROWS:
        raise ValueError(f"osm_caa.py: unknown row {row!r}; rows: {sorted(ROWS)} "
                         "(--config experiments/configs/osm_caa.py:<row>).")
    r = ROWS[row]
    c = base.get_config()
    c.dataset = r["data"].dataset
    c.evals = r["data"].evals
    c.eval_ks = r["data"].eval_ks
    c.model = ml_collections.ConfigDict({
        "name": "bninception",
        "embedding_dim": 1024,
        "pooling": "avg",
        "l2_normalize": True,
        "pretrained": "",
        "freeze_bn": False,
        "input_convention": "bninception",
        "dtype": "float32",
        "backbone_kwargs": {},
    })
    c.loss = ml_collections.ConfigDict({
        "name": "osm_caa",
        "kwargs": {"margin": 1.2, "sigma": 0.8, "lam": 0.5, "kernel": "paper",
                   "attention": "softmax"},
        "classifier_weight": 1.0,
    })
    c.classes_per_batch = 8
    c.samples_per_class = 7
    c.optimizer.update({
        "name": "sgd", "learning_rate": r["lr"], "momentum": 0.9,
        "weight_decay": r["weight_decay"], "schedule": "multistep",
        "milestones": r["milestones"], "gamma": 0.5, "warmup_steps": 0,
        "lr_mult": {"head": 10.0},
    })
    c.num_steps = r["num_steps"]
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.best_metric = r["best"]
    return c
