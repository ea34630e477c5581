"""NMI / pairwise F1 against scikit-learn and pair enumeration; k-means reproducibility."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from dml_jax.evaluation import clustering_metrics, kmeans, normalized_mutual_info, pairwise_f1
from tests.evaluation.backends import BACKENDS


def _pair_f1(yt, yp):
    tp = fp = fn = 0
    for i, j in itertools.combinations(range(len(yt)), 2):
        same_c, same_y = yp[i] == yp[j], yt[i] == yt[j]
        tp += same_c and same_y
        fp += same_c and not same_y
        fn += same_y and not same_c
    if tp == 0:
        return 0.0
    p, r = tp / (tp + fp), tp / (tp + fn)
    return 2 * p * r / (p + r)


def test_nmi_matches_sklearn():
    rng = np.random.default_rng(0)
    for n, a, b in [(50, 3, 4), (400, 20, 15), (1000, 2, 50)]:
        yt = rng.integers(0, a, n) * 7 - 3  # arbitrary (negative, sparse) label values
        yp = rng.integers(0, b, n)
        assert normalized_mutual_info(yt, yp) == pytest.approx(
            normalized_mutual_info_score(yt, yp), abs=1e-12
        )
    y = rng.integers(0, 5, 100)
    assert normalized_mutual_info(y, y + 10) == pytest.approx(1.0, abs=1e-12)
    assert normalized_mutual_info([1, 1, 1], [0, 0, 0]) == normalized_mutual_info_score(
        [1, 1, 1], [0, 0, 0]
    )
    assert normalized_mutual_info([0, 1, 2], [0, 0, 0]) == pytest.approx(0.0)


def test_pairwise_f1_hand_built_and_enumerated():
    # classes {0,1,2 | 3,4}, clusters {0,1 | 2,3,4}: TP = 1 + 1 = 2, predicted pairs 1 + 3 = 4,
    # true pairs 3 + 1 = 4 -> P = R = 1/2, F1 = 1/2.
    assert pairwise_f1([0, 0, 0, 1, 1], [5, 5, 6, 6, 6]) == pytest.approx(0.5, abs=1e-15)
    assert pairwise_f1([0, 1, 2], [0, 1, 2]) == 0.0  # no same-class pair at all
    rng = np.random.default_rng(1)
    for _ in range(3):
        yt = rng.integers(0, 6, 80)
        yp = rng.integers(0, 4, 80)
        assert pairwise_f1(yt, yp) == pytest.approx(_pair_f1(yt, yp), abs=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clustering_metrics_separable_and_seeded(backend):
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((6, 8)) * 20
    y = np.repeat(np.arange(6), 50)
    x = (centers[y] + rng.standard_normal((300, 8))).astype(np.float32)
    a = clustering_metrics(x, y, backend=backend, seed=3)
    b = clustering_metrics(x, y, backend=backend, seed=3)
    assert a == b  # reproducible
    assign = kmeans(x, 6, seed=3, backend=backend)
    assert a["nmi"] == pytest.approx(normalized_mutual_info_score(y, assign), abs=1e-12)
    assert a["f1"] == pytest.approx(_pair_f1(y, assign), abs=1e-12)
    assert a["nmi"] > 0.8  # well-separated blobs are (mostly) recovered


def test_clustering_bad_inputs():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="lengths must match"):
        clustering_metrics(x, [0, 1, 1])
    with pytest.raises(ValueError, match="NaN or inf"):
        clustering_metrics(np.full((4, 2), np.nan, np.float32), [0, 1, 1, 0])
    with pytest.raises(ValueError, match="num_clusters"):
        clustering_metrics(x, [0, 1, 1, 0], num_clusters=5)
    with pytest.raises(ValueError, match="lengths must match"):
        pairwise_f1([0, 1], [0])
