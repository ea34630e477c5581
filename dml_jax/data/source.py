"""The source protocol, views of sources, and the registry that picks a source by name.

A *source* is a random-access data set: ``len(source)``; ``source[i]`` is a dict with at least
``"image"`` (uint8 ``[H, W, 3]``, RGB) or ``"audio"`` (float32 ``[T]``) and ``"label"`` (int);
``source.labels`` is int32 ``[N]``, read without decoding any image; labels are contiguous
``0..C-1``; ``source.classes`` (length ``C``) holds the data set's own class id of each label.

A source may also offer ``source.read(i)``: the same record with ``"image"`` left as an
:class:`~dml_jax.data.images.ImageRef` (encoded bytes or a path, plus an optional box), so the
input pipeline can decode, crop and resize in one step (see ``docs/data_pipeline.md``).

Families register a factory under a name (big_vision style)::

    @register("digits")
    def _digits(split, **kwargs): ...

    source = get_source(config.dataset, "train")   # config.dataset.name selects the factory
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Source(Protocol):
    """What the input pipeline needs from a data set (see the module docstring)."""

    labels: np.ndarray
    classes: Sequence[Any]

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...


def contiguous_labels(ids: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """Maps class ids to contiguous labels in ascending id order.

    Args:
      ids: ``[N]`` class ids (ints or strings) of the records.

    Returns:
      ``(labels int32 [N], classes)`` with ``classes[labels[i]] == ids[i]``; ``classes`` is the
      sorted list of distinct ids (length ``C``).
    """
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"`ids` must have shape [N]; got {ids.shape}.")
    classes, labels = np.unique(ids, return_inverse=True)
    return labels.astype(np.int32).reshape(-1), [c.item() for c in classes]


def check_index(index: int, length: int, name: str) -> int:
    """``index`` as a non-negative int below ``length``; negative indices count from the end.

    Raises:
      IndexError: naming the source ``name`` and its length.
    """
    i = int(index)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"{name}: index {index} out of range for {length} records.")
    return i


class ArraySource:
    """A source held in memory: images ``[N, H, W, 3]`` uint8 and int labels ``[N]``.

    Holds the arrays it is given (no copy); ``labels`` are made contiguous and ``classes``
    holds the original ids.

    Args:
      images: uint8 ``[N, H, W, 3]``.
      ids: int ``[N]`` class ids of the records.
      name: used in error messages.
    """

    def __init__(self, images: np.ndarray, ids: np.ndarray, *, name: str = "ArraySource"):
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"`images` must be uint8 [N, H, W, 3]; got {images.dtype} {images.shape}."
            )
        if len(ids) != len(images):
            raise ValueError(f"`ids` has {len(ids)} entries but `images` {len(images)}.")
        self.images = images
        self.labels, self.classes = contiguous_labels(ids)
        self.name = name

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(index, len(self), self.name)
        return {"image": self.images[i], "label": int(self.labels[i])}

    def __repr__(self) -> str:
        return f"{self.name}({len(self)} records, {len(self.classes)} classes)"


class Subset:
    """The records ``indices`` of ``source``, relabelled contiguously.

    Holds the index array and the labels ``[M]``; records are read from ``source`` on demand.
    ``classes`` are the parent's class ids of the labels present, in the parent's label order.

    Args:
      source: any source.
      indices: int ``[M]`` positions in ``source`` (any order, repeats allowed).
    """

    def __init__(self, source: Any, indices: np.ndarray):
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(source)):
            raise ValueError(
                f"`indices` must lie in [0, {len(source)}); got [{indices.min()}, "
                f"{indices.max()}]."
            )
        self.source = source
        self.indices = indices
        parent_labels = np.asarray(source.labels)[indices]
        self.labels, kept = contiguous_labels(parent_labels)
        self.classes = [source.classes[k] for k in kept]

    def __len__(self) -> int:
        return len(self.indices)

    def _relabel(self, record: dict[str, Any], i: int) -> dict[str, Any]:
        return {**record, "label": int(self.labels[i])}

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = check_index(index, len(self), repr(self))
        return self._relabel(self.source[int(self.indices[i])], i)

    def read(self, index: int) -> dict[str, Any]:
        """The record with its image undecoded where the parent offers ``read``."""
        i = check_index(index, len(self), repr(self))
        parent = self.source
        reader = getattr(parent, "read", parent.__getitem__)
        return self._relabel(reader(int(self.indices[i])), i)

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} records)"


# ----------------------------------------------------------------------------- registry

# name -> factory(split, **kwargs) -> source. Filled by the family modules below when imported.
_FACTORIES: dict[str, Callable[..., Any]] = {}

# Modules that register sources; imported on the first lookup.
FAMILY_MODULES: tuple[str, ...] = (
    "dml_jax.data.digits",
    "dml_jax.data.folders",
    "dml_jax.data.tfds_sources",
    "dml_jax.data.reid",
)


def register(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``factory(split, **kwargs) -> source`` under ``name``.

    Raises:
      ValueError: ``name`` is already registered to another factory.
    """

    def decorator(factory: Callable[..., Any]) -> Callable[..., Any]:
        known = _FACTORIES.get(name)
        if known is not None and known is not factory:
            raise ValueError(f"A source named {name!r} is already registered ({known}).")
        _FACTORIES[name] = factory
        return factory

    return decorator


def _load_families() -> None:
    for module in FAMILY_MODULES:
        importlib.import_module(module)


def available_sources() -> tuple[str, ...]:
    """The registered names, sorted (``tfds:<builder>`` reaches any other TFDS data set)."""
    _load_families()
    return tuple(sorted(_FACTORIES))


def get_source(config_or_name: str | Mapping[str, Any], split: str, **kwargs: Any) -> Any:
    """The source of ``split`` of the data set a config (or a name) selects.

    Args:
      config_or_name: a registered name, ``"tfds:<builder>"`` for any other TFDS image data
        set, or a mapping / ``ConfigDict`` with ``name`` whose other entries are passed to the
        factory as keyword arguments (e.g. ``config.dataset`` with ``data_dir``, ``crop``).
      split: ``"train"`` or ``"test"`` (what else a family accepts is in its docstring).
      **kwargs: more keyword arguments for the factory; they override the config's.

    Raises:
      ValueError: the name is not registered (the message lists the registered names).
    """
    if isinstance(config_or_name, str):
        name, options = config_or_name, {}
    else:
        options = dict(config_or_name.items())
        if "name" not in options:
            raise ValueError(f"`config_or_name` has no `name` entry: {sorted(options)}.")
        name = options.pop("name")
    options.update(kwargs)
    _load_families()
    if name.startswith("tfds:"):
        from dml_jax.data.tfds_sources import tfds_source

        return tfds_source(name[len("tfds:"):], split, **options)
    if name not in _FACTORIES:
        raise ValueError(
            f"Unknown data set {name!r}; registered: {sorted(_FACTORIES)} "
            "(or 'tfds:<builder>' for another TFDS image data set)."
        )
    return _FACTORIES[name](split, **options)
