"""Evaluation: retrieval, clustering, person re-ID and classification metrics.

Heavy work (distance tiles, k-means) runs on the accelerator, or on faiss when it is installed
and JAX runs on CPU; bookkeeping is float64 NumPy on the host. Memory is O(block x N), never
O(N^2). See ``docs/evaluation.md``.
"""

from dml_jax.evaluation.classification import classification_metrics, knn_classify
from dml_jax.evaluation.clustering import (
    clustering_metrics,
    kmeans,
    normalized_mutual_info,
    pairwise_f1,
)
from dml_jax.evaluation.knn import knn
from dml_jax.evaluation.reid import reid_metrics
from dml_jax.evaluation.retrieval import retrieval_metrics

__all__ = [
    "classification_metrics",
    "clustering_metrics",
    "kmeans",
    "knn",
    "knn_classify",
    "normalized_mutual_info",
    "pairwise_f1",
    "reid_metrics",
    "retrieval_metrics",
]
