"""The k-NN/k-means backends under test; faiss cases skip (with the reason) where it is absent."""

from __future__ import annotations

import importlib.util

import pytest

HAS_FAISS = importlib.util.find_spec("faiss") is not None
NEEDS_FAISS = pytest.mark.skipif(
    not HAS_FAISS, reason="faiss backend: pip install faiss-cpu (in the test extra)"
)
BACKENDS = ["jax", pytest.param("faiss", marks=NEEDS_FAISS)]
AVAILABLE = ["jax", "faiss"] if HAS_FAISS else ["jax"]
