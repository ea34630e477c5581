"""Reading a PyTorch state dict a user has on disk, without unpickling arbitrary objects.

Shared by every ``*_from_torch`` converter of :mod:`dml_jax.models`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    detach = getattr(value, "detach", None)
    if detach is not None:  # a torch tensor
        tensor = detach().cpu()
        if str(tensor.dtype) == "torch.bfloat16":
            tensor = tensor.float()
        return tensor.numpy()
    return np.asarray(value)


def load_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    """Returns ``{name: np.ndarray}`` from a mapping or a ``.pth``/``.pt``/``.safetensors`` path.

    ``.pth`` files are read with ``torch.load(..., weights_only=True)`` (needs the ``convert``
    extra); ``.safetensors`` files with ``safetensors.numpy`` (no torch). A checkpoint that wraps
    its weights as ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped, and a leading
    ``module.`` (from ``DataParallel``) is stripped from every key.

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: the file type is unknown, or the content is not a mapping of arrays.
      ImportError: a ``.pth`` file is given but torch is not installed.
    """
    if isinstance(state_dict, (str, os.PathLike)):
        path = os.fspath(state_dict)
        if not os.path.exists(path):
            raise FileNotFoundError(f"No state dict file at {path!r}.")
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            raw: Mapping[str, Any] = load_file(path)
        elif path.endswith((".pth", ".pt", ".bin", ".ckpt")):
            try:
                import torch
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(
                    f"Reading {path!r} needs torch: pip install 'dml_jax[convert]', or convert "
                    "the file to .safetensors."
                ) from e
            raw = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ValueError(
                f"Unknown state dict file type {path!r}: expected .pth, .pt or .safetensors."
            )
    else:
        raw = state_dict
    if not isinstance(raw, Mapping):
        raise ValueError(f"A state dict must be a mapping of names to arrays; got {type(raw)}.")
    for wrapper in ("state_dict", "model"):
        if wrapper in raw and isinstance(raw[wrapper], Mapping):
            raw = raw[wrapper]
    out = {}
    for key, value in raw.items():
        name = key[len("module.") :] if key.startswith("module.") else key
        out[name] = _to_numpy(value)
    return out


class StateDictReader:
    """Takes tensors out of a state dict by name, checking shapes and what is left over.

    Usage::

        reader = StateDictReader(load_state_dict(path), arch="resnet50")
        w = reader.take("conv1.weight", (64, 3, 7, 7))
        ...
        reader.finish(ignore=("fc.",))   # raises if a key was never taken

    Every error names the key, the architecture, and the expected and found shapes.
    """

    def __init__(self, state: Mapping[str, np.ndarray], arch: str):
        self._state = dict(state)
        self._taken: set[str] = set()
        self.arch = arch

    def has(self, key: str) -> bool:
        """Whether ``key`` is in the state dict."""
        return key in self._state

    def take(self, key: str, shape: Iterable[int] | None = None) -> np.ndarray:
        """Returns the array under ``key`` as float32 (or its own integer type), marking it used.

        Raises:
          KeyError: ``key`` is missing.
          ValueError: its shape is not ``shape``.
        """
        if key not in self._state:
            raise KeyError(f"{self.arch}: missing key {key!r} in the state dict.")
        value = self._state[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"{self.arch}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}."
            )
        self._taken.add(key)
        if np.issubdtype(value.dtype, np.floating):
            return value.astype(np.float32)
        return value

    def skip(self, key: str) -> None:
        """Marks ``key`` as deliberately unused (e.g. BatchNorm's ``num_batches_tracked``)."""
        self._taken.add(key)

    def finish(self, ignore: Iterable[str] = ()) -> None:
        """Raises ``ValueError`` naming every key never taken, except those starting with
        a prefix in ``ignore`` and BatchNorm's ``num_batches_tracked`` counters."""
        prefixes = tuple(ignore)
        left = sorted(
            k
            for k in self._state
            if k not in self._taken
            and not k.endswith("num_batches_tracked")
            and not (prefixes and k.startswith(prefixes))
        )
        if left:
            shown = ", ".join(repr(k) for k in left[:20])
            more = f" (and {len(left) - 20} more)" if len(left) > 20 else ""
            raise ValueError(f"{self.arch}: unexpected keys in the state dict: {shown}{more}.")
