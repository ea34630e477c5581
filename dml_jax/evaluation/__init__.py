"""Evaluation: retrieval, clustering, person re-ID and classification metrics.

Every function here works on host NumPy copies of the embeddings for bookkeeping and runs the
heavy search on the accelerator (or faiss on CPU); memory is O(block x N), never O(N^2).
"""

from dml_jax.evaluation.knn import knn
from dml_jax.evaluation.retrieval import retrieval_metrics

__all__ = ["knn", "retrieval_metrics"]
