"""Symmetrical synthesis (Gu & Ko, AAAI 2020): the public names of
:mod:`dml_jax.losses.symmetric`, where the functions live (kept here so that existing imports
work; see ``docs/losses.md``)."""

from dml_jax.losses.symmetric import (
    ANGULAR_COMBINATIONS as ANGULAR_COMBINATIONS,
)
from dml_jax.losses.symmetric import (
    NPAIR_COMBINATIONS as NPAIR_COMBINATIONS,
)
from dml_jax.losses.symmetric import (
    POSITIVE_RULES,
    SymmetricView,
    reflect,
    symmetric_angular_loss,
    symmetric_contrastive_loss,
    symmetric_hard_negatives,
    symmetric_lifted_structure_loss,
    symmetric_multi_similarity_loss,
    symmetric_npair_loss,
    symmetric_osm_caa_loss,
    symmetric_triplet_loss,
    symmetric_view,
)

__all__ = [
    "POSITIVE_RULES",
    "SymmetricView",
    "reflect",
    "symmetric_angular_loss",
    "symmetric_contrastive_loss",
    "symmetric_hard_negatives",
    "symmetric_lifted_structure_loss",
    "symmetric_multi_similarity_loss",
    "symmetric_npair_loss",
    "symmetric_osm_caa_loss",
    "symmetric_triplet_loss",
    "symmetric_view",
]
