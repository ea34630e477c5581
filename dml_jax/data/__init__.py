"""Data sources and class-balanced batch sampling."""

from dml_jax.data.digits import Split, load_digits
from dml_jax.data.sampler import PKSampler

__all__ = ["PKSampler", "Split", "load_digits"]
