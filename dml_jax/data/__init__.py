"""Data sources, the name registry, class-balanced batch sampling and the input pipeline."""

from dml_jax.data.digits import Split, digits_source, load_digits
from dml_jax.data.folders import ImageFolder, image_folder
from dml_jax.data.images import ImageReadError, ImageRef
from dml_jax.data.normalize import normalize
from dml_jax.data.pipeline import BatchIterator, eval_batches, train_batches
from dml_jax.data.sampler import PKSampler
from dml_jax.data.source import (
    ArraySource,
    Source,
    Subset,
    available_sources,
    get_source,
    register,
)
from dml_jax.data.tfds_sources import DatasetNotPreparedError, TfdsSource, tfds_source
from dml_jax.data.transforms import Augment

__all__ = [
    "ArraySource",
    "Augment",
    "BatchIterator",
    "DatasetNotPreparedError",
    "ImageFolder",
    "ImageReadError",
    "ImageRef",
    "PKSampler",
    "Source",
    "Split",
    "Subset",
    "TfdsSource",
    "available_sources",
    "digits_source",
    "eval_batches",
    "get_source",
    "image_folder",
    "load_digits",
    "normalize",
    "register",
    "tfds_source",
    "train_batches",
]
