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


# ---------------------------------------------------------------------------------------------
# Seed-paper losses. Losses that need more than ``(e, y)`` get it from fixed row-wise functions
# of the embeddings (logits) or of the embedding size (centers), so every case is a function
# ``fn(e, y, *, where=None, axis_name=None)`` that shards like the embeddings.

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dml_jax import synthesis  # noqa: E402

NUM_LOGIT_CLASSES = 8


def logits_of(e):
    """Row-wise logits ``[B, 8]`` (any backend: NumPy or jax arrays)."""
    if isinstance(e, np.ndarray):  # float64 in the references (finite differences need it)
        s = np.sum(np.asarray(e, np.float64), axis=1, keepdims=True)
        return 2.0 * np.sin(s * np.arange(1, NUM_LOGIT_CLASSES + 1))
    e = jnp.asarray(e, jnp.float32)
    # Non-finite entries read as 0 here, so that a masked NaN row's gradient is not poisoned
    # by this test helper itself (identical values and gradients for finite input).
    s = jnp.sum(jnp.where(jnp.isfinite(e), e, 0.0), axis=1, keepdims=True)
    return 2.0 * jnp.sin(s * jnp.arange(1, NUM_LOGIT_CLASSES + 1, dtype=jnp.float32))


def centers_for(dim, num=NUM_LOGIT_CLASSES):
    return np.random.default_rng(dim).normal(size=(num, dim)).astype(np.float32) * 0.5


def _with_logits(fn):
    def wrapped(e, y, **kw):
        return fn(e, y, logits_of(e), **kw)
    return wrapped


def _with_logits_ref(reference):
    def wrapped(e, y, **kw):
        at = kw.get("weights_at", e)  # frozen weights freeze the attention's logits too
        return reference(e, y, logits_of(np.asarray(at, np.float64)), **kw)
    return wrapped


def _with_centers(fn, with_logits=False):
    def wrapped(e, y, **kw):
        c = centers_for(e.shape[1])
        if with_logits:
            return fn(e, y, logits_of(e), c, **kw)
        return fn(e, y, c, **kw)
    return wrapped


def _with_centers_ref(reference, with_logits=False):
    def wrapped(e, y, **kw):
        c = centers_for(np.shape(e)[1])
        if with_logits:
            return reference(e, y, logits_of(np.asarray(e, np.float64)), c, **kw)
        return reference(e, y, c, **kw)
    return wrapped


# (id, jax loss, reference, settings). Weighted losses' references take ``weights_at``.
SEED = [
    ("osm_caa", losses.osm_caa_loss, ref.osm_caa, {}),
    ("osm_caa_official_kernel", losses.osm_caa_loss, ref.osm_caa,
     {"kernel": "official", "margin": 1.0, "lam": 0.3}),
    ("osm_caa_logits", _with_logits(losses.osm_caa_loss), _with_logits_ref(ref.osm_caa), {}),
    ("osm_caa_logits_official", _with_logits(losses.osm_caa_loss),
     _with_logits_ref(ref.osm_caa), {"kernel": "official", "attention": "gaussian"}),
    ("ranked_list", losses.ranked_list_loss, ref.ranked_list, {"alpha": 2.0, "margin": 0.6}),
    ("ranked_list_official", losses.ranked_list_loss, ref.ranked_list,
     {"alpha": 2.4, "margin": 0.8, "t_p": 1.0, "query_weighting": "official"}),
    ("center", _with_centers(losses.center_loss), _with_centers_ref(ref.center), {}),
    ("center_structured", _with_centers(losses.center_structured_loss, True),
     _with_centers_ref(ref.center_structured, True), {"lam": 0.5, "beta": 2.0}),
    ("demal_hybrid", _with_logits(losses.demal_hybrid_loss), _with_logits_ref(ref.demal_hybrid),
     {"mining": "semi_hard", "margin": 1.0, "lam": 0.5}),
]
SEED_IDS = [c[0] for c in SEED]
# Cases whose value does not depend on which integers name the classes.
SEED_RELABEL_INVARIANT = {"osm_caa", "osm_caa_official_kernel", "ranked_list",
                          "ranked_list_official"}

# Losses on the pair layout (rows 2k, 2k+1 = anchor, positive of pair k).
SEED_PAIRS = [
    ("npair", losses.npair_loss, ref.npair, {}),
    ("angular", losses.angular_loss, ref.angular, {"l2_reg": 0.01}),
    ("symm_npair", synthesis.symmetric_npair_loss, ref.symmetric_npair, {}),
    ("symm_npair_original", synthesis.symmetric_npair_loss, ref.symmetric_npair,
     {"positive": "original"}),
    ("symm_angular", synthesis.symmetric_angular_loss, ref.symmetric_angular, {}),
    ("symm_angular_original", synthesis.symmetric_angular_loss, ref.symmetric_angular,
     {"positive": "original", "degree": 40.0}),
    ("symm_triplet_all", synthesis.symmetric_triplet_loss, ref.symmetric_triplet,
     {"margin": 0.5}),
    ("symm_triplet_batch_hard", synthesis.symmetric_triplet_loss, ref.symmetric_triplet,
     {"mining": "batch_hard"}),
    ("symm_triplet_semi_hard", synthesis.symmetric_triplet_loss, ref.symmetric_triplet,
     {"mining": "semi_hard", "margin": 1.0}),
    ("symm_lifted", synthesis.symmetric_lifted_structure_loss, ref.symmetric_lifted, {}),
    ("symm_contrastive", synthesis.symmetric_contrastive_loss, ref.symmetric_contrastive,
     {"neg_margin": 2.5}),
    ("symm_multi_similarity", synthesis.symmetric_multi_similarity_loss,
     ref.symmetric_multi_similarity, {"beta": 10.0}),
    ("symm_osm_caa", synthesis.symmetric_osm_caa_loss, ref.symmetric_osm_caa, {}),
]
SEED_PAIR_IDS = [c[0] for c in SEED_PAIRS]
