"""DeMAL-CNN (He, Wang, Zhao, Yao, Complex & Intelligent Systems 2022): skin lesions.

    python experiments/main.py --config experiments/configs/demal.py:isic2016 --workdir DIR

Rows: ``isic2016`` (melanoma vs benign), ``isic2017`` (melanoma / nevus / seborrheic
keratosis), ``ph2`` (generalisation: trained on ISIC 2016, tested on all of PH2 with its nevi
as ``benign`` and its melanomas as ``malignant``; folder layout in
``experiments/configs/datasets.py``). Metrics: accuracy, and for the two-class rows
sensitivity, specificity, AUC and AP (melanoma positive).

Verified (abstract): weight-shared embedding networks with a mixed (channel + spatial)
attention, triplet loss on the embeddings, weight-shared classification layers, hybrid loss =
triplet + classification. Here: ``demal_hybrid`` (triplet with margin 0.2 over every valid
in-batch triplet + lambda 1 x cross-entropy of one classifier on the embedding: the three
weight-shared heads are one head on the batch) and CBAM-style ``MixedAttention`` after every
ResNet stage (``attention_after``; docs/models.md). UNVERIFIED and chosen as the closest
documented setting: ImageNet ResNet-50 (torchvision input convention), 224 x 224 crops,
128-d L2-normalised embedding, P x K = 2 x 16 (ISIC 2016, PH2) and 3 x 10 (ISIC 2017), SGD
momentum 0.9, lr 1e-3 with 10x on the new layers (head, attention blocks sit in the backbone
and train at 1x), cosine decay over 6,000 steps, weight decay 1e-4.

Weights: ``model.pretrained = ""`` trains from random weights. For the paper's set-up point it
at torchvision's ``resnet50-0676ba61.pth``; ``docs/models.md`` says where to get it (the
attention blocks start from random weights either way).
"""

import ml_collections

from experiments.configs import base, datasets

ROWS = {
    "isic2016": {"data": datasets.isic2016(), "p": 2, "k": 16, "best": "auc"},
    "isic2017": {"data": datasets.isic2017(), "p": 3, "k": 10, "best": "accuracy"},
    "ph2": {"data": datasets.ph2(), "p": 2, "k": 16, "best": "auc"},
}


def get_config(row: str) -> ml_collections.ConfigDict:
    """The configuration of table row ``row`` (a key of ``ROWS``)."""
    if row not in ROWS:
        raise ValueError(f"demal.py: unknown row {row!r}; rows: {sorted(ROWS)} "
                         "(--config experiments/configs/demal.py:<row>).")
    r = ROWS[row]
    c = base.get_config()
    c.dataset = r["data"].dataset
    c.evals = r["data"].evals
    c.eval_ks = r["data"].eval_ks
    c.model = ml_collections.ConfigDict({
        "name": "resnet50",
        "embedding_dim": 128,
        "pooling": "avg",
        "l2_normalize": True,
        "attention_after": ("layer1", "layer2", "layer3", "layer4"),
        "pretrained": "",
        "freeze_bn": False,
        "input_convention": "imagenet",
        "dtype": "float32",
        "backbone_kwargs": {},
    })
    c.loss = ml_collections.ConfigDict({
        "name": "demal_hybrid",
        "kwargs": {"margin": 0.2, "mining": "all", "lam": 1.0},
        "classifier_weight": 0.0,  # the hybrid loss holds its own cross-entropy
    })
    c.classes_per_batch = r["p"]
    c.samples_per_class = r["k"]
    c.optimizer.update({
        "name": "sgd", "learning_rate": 1e-3, "momentum": 0.9, "weight_decay": 1e-4,
        "schedule": "cosine", "warmup_steps": 0, "lr_mult": {"head": 10.0},
    })
    c.num_steps = 6000
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.best_metric = r["best"]
    return c
