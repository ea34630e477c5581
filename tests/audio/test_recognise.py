"""Word recognition against NumPy loops and dml_jax.evaluation's k-NN classifier."""

import numpy as np
import pytest

from dml_jax.audio.recognise import MISSING_SCORE, class_scores, recognise, word_accuracy
from dml_jax.evaluation import knn_classify


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def loop_scores(q, e, y, c, method, k):
    q, e = unit(q.astype(np.float64)), unit(e.astype(np.float64))
    out = np.full((len(q), c), MISSING_SCORE)
    for i in range(len(q)):
        for cls in range(c):
            sims = sorted((float(q[i] @ e[j]) for j in range(len(e)) if y[j] == cls),
                          reverse=True)
            if not sims:
                continue
            if method == "knn":
                out[i, cls] = np.mean(sims[:k])
            else:
                cen = e[y == cls].mean(0)
                out[i, cls] = q[i] @ cen / np.linalg.norm(cen)
    return out


@pytest.mark.parametrize("method,k", [("knn", 1), ("knn", 3), ("centroid", 1)])
def test_scores_match_loop(method, k):
    rng = np.random.default_rng(0)
    e = rng.standard_normal((23, 6)).astype(np.float32)
    y = rng.integers(0, 4, 23)
    y[y == 3] = 0  # class 3 has no enrolled utterance
    q = rng.standard_normal((11, 6)).astype(np.float32)
    got = class_scores(q, e, y, num_classes=4, method=method, k=k, block=4)
    np.testing.assert_allclose(got, loop_scores(q, e, y, 4, method, k), atol=1e-12)
    assert np.all(got[:, 3] == MISSING_SCORE)


def test_nearest_neighbour_equals_knn_classify():
    rng = np.random.default_rng(1)
    e = unit(rng.standard_normal((40, 8))).astype(np.float32)
    y = rng.integers(0, 5, 40)
    q = unit(rng.standard_normal((25, 8))).astype(np.float32)
    pred = recognise(class_scores(q, e, y, num_classes=5, method="knn", k=1))
    np.testing.assert_array_equal(pred, knn_classify(e, y, q, k=1, backend="jax"))


def test_word_accuracy_matches_loop():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 4, (30, 7)).astype(np.float64)  # many ties
    y = rng.integers(0, 7, 30)
    acc = word_accuracy(s, y, ks=(1, 3, 5))
    for k in (1, 3, 5):
        hits = 0
        for i in range(30):
            order = sorted(range(7), key=lambda c: (-s[i, c], c))
            hits += y[i] in order[:k]
        assert acc[f"top{k}"] == pytest.approx(hits / 30)
    assert 0 < acc["top1"] < acc["top5"] < 1
    with pytest.raises(ValueError, match="NaN"):
        word_accuracy(np.full((2, 3), np.nan), [0, 1])
