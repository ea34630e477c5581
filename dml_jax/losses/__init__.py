"""Pure, jit-compiled metric-learning losses.

Every loss takes ``(embeddings [B, D], labels [B], *, <hyper-parameters>, where=None,
axis_name=None)`` and returns a float32 scalar; see ``docs/losses.md`` and each docstring.
A NaN or inf in a valid input row makes the loss NaN
(see :func:`dml_jax._checks.propagate_nonfinite`).
"""

from dml_jax.losses.center import center_loss, center_structured_loss, update_centers
from dml_jax.losses.circle import circle_loss
from dml_jax.losses.hybrid import demal_hybrid_loss
from dml_jax.losses.lifted import lifted_structure_loss
from dml_jax.losses.margin_softmax import arcface_loss, cosface_loss
from dml_jax.losses.memory import XBMState, xbm_init, xbm_update
from dml_jax.losses.multi_similarity import multi_similarity_loss
from dml_jax.losses.npair import angular_loss, npair_loss
from dml_jax.losses.osm_caa import osm_caa_loss
from dml_jax.losses.pair import contrastive_loss
from dml_jax.losses.proxy import proxy_anchor_loss, proxy_nca_loss, soft_triple_loss
from dml_jax.losses.ranked_list import ranked_list_loss
from dml_jax.losses.supcon import supcon_loss
from dml_jax.losses.triplet import triplet_loss

__all__ = [
    "contrastive_loss",
    "lifted_structure_loss",
    "multi_similarity_loss",
    "triplet_loss",
]

__all__ += [
    "angular_loss",
    "center_loss",
    "center_structured_loss",
    "demal_hybrid_loss",
    "npair_loss",
    "osm_caa_loss",
    "ranked_list_loss",
    "update_centers",
]

# Proxy and margin-softmax losses (pytorch-metric-learning semantics).
__all__ += [
    "arcface_loss",
    "circle_loss",
    "cosface_loss",
    "proxy_anchor_loss",
    "proxy_nca_loss",
    "soft_triple_loss",
    "supcon_loss",
]
__all__ += ["XBMState", "xbm_init", "xbm_update"]
