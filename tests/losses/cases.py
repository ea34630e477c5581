"""The baseline losses under test, each paired with its loop reference and settings."""

from __future__ import annotations

import functools

from dml_jax import losses
from tests.losses import reference as ref

# (id, jax loss with its keyword settings, reference with the same settings)
BASELINE = [
    ("contrastive", losses.contrastive_loss, ref.contrastive, {}),
    ("contrastive_margins", losses.contrastive_loss, ref.contrastive,
     {"pos_margin": 0.3, "neg_margin": 2.5}),
    ("triplet_all", losses.triplet_loss, ref.triplet, {"mining": "all", "margin": 0.5}),
    ("triplet_batch_hard", losses.triplet_loss, ref.triplet, {"mining": "batch_hard"}),
    ("triplet_semi_hard", losses.triplet_loss, ref.triplet, {"mining": "semi_hard", "margin": 1.0}),
    ("lifted", losses.lifted_structure_loss, ref.lifted, {}),
    ("lifted_margins", losses.lifted_structure_loss, ref.lifted,
     {"neg_margin": 2.0, "pos_margin": 0.5}),
    ("multi_similarity", losses.multi_similarity_loss, ref.multi_similarity, {}),
    ("multi_similarity_mined", losses.multi_similarity_loss, ref.multi_similarity,
     {"epsilon": 0.1, "alpha": 2.0, "beta": 10.0}),
]

IDS = [c[0] for c in BASELINE]


def bind(case):
    """Returns ``(jax_fn(e, y, where=None), ref_fn(e, y, where=None))`` for a case."""
    _, fn, reference, kwargs = case
    return functools.partial(fn, **kwargs), functools.partial(reference, **kwargs)
