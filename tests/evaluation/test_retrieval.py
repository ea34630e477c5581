"""k-NN and retrieval metrics: hand-built exact cases, brute-force agreement, errors."""

from __future__ import annotations

import numpy as np
import pytest

from dml_jax.evaluation import knn, retrieval_metrics
from dml_jax.evaluation.knn import search_rows
from tests.evaluation._reference import brute_knn, brute_retrieval
from tests.evaluation.backends import AVAILABLE, BACKENDS, NEEDS_FAISS


def _col(values):
    return np.asarray(values, np.float32)[:, None]


# ------------------------------------------------------------------ hand-built exact cases


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_gallery_hand_built_with_tie(backend):
    # 1-D points. Query 2 (x=3) is at squared distance 9 from both x=0 (index 0) and x=6
    # (index 3): the tie goes to index 0, so its only relevant item (index 3) comes third.
    x = _col([0, 1, 3, 6, 10])
    y = np.array([0, 0, 1, 1, 0])
    idx, d = knn(x, k=4, backend=backend)
    np.testing.assert_array_equal(idx[2], [1, 0, 3, 4])
    np.testing.assert_array_equal(d[2], [4, 9, 9, 49])
    m = retrieval_metrics(x, y, ks=(1, 2, 4), backend=backend)
    # per query: recall@1 [1,1,0,1,0]; recall@2 [1,1,0,1,0]; recall@4 all 1;
    # r_precision [1/2, 1/2, 0, 1, 0]; map@r [1/2, 1/2, 0, 1, 0]
    assert m["num_queries"] == 5
    assert m["recall@1"] == pytest.approx(0.6, abs=1e-15)
    assert m["recall@2"] == pytest.approx(0.6, abs=1e-15)
    assert m["recall@4"] == pytest.approx(1.0, abs=1e-15)
    assert m["precision@1"] == pytest.approx(0.6, abs=1e-15)
    assert m["r_precision"] == pytest.approx(0.4, abs=1e-15)
    assert m["map@r"] == pytest.approx(0.4, abs=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_separate_reference_map_differs_from_rprecision(backend):
    ref = _col([1, 2, 3, 4, 5])
    rl = np.array([1, 0, 1, 1, 0])
    # query 0 (x=0, label 1): order [0,1,2,3,4] -> rel [1,0,1,1,0], R=3:
    #   RP = 2/3, MAP@R = (1/1 + 2/3) / 3 = 5/9.
    # query 1 (x=4.5, label 0): indices 3 and 4 tie at 0.25 -> index 3 first:
    #   order [3,4,2,1,0] -> rel [0,1,0,1,0], R=2: RP = 1/2, MAP@R = (1/2)/2 = 1/4.
    # query 2 (label 7) has no relevant item: excluded.
    q = _col([0, 4.5, 2])
    ql = np.array([1, 0, 7])
    m = retrieval_metrics(q, ql, ref, rl, ks=(1, 2), backend=backend)
    assert m["num_queries"] == 2
    assert m["recall@1"] == pytest.approx(0.5, abs=1e-15)
    assert m["recall@2"] == pytest.approx(1.0, abs=1e-15)
    assert m["r_precision"] == pytest.approx((2 / 3 + 1 / 2) / 2, abs=1e-15)
    assert m["map@r"] == pytest.approx((5 / 9 + 1 / 4) / 2, abs=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_query_whose_only_match_is_itself_is_excluded(backend):
    x = _col([0, 1, 1.5, 9])
    y = np.array([0, 1, 1, 2])  # labels 0 and 2 occur once: R_q = 0 for queries 0 and 3
    m = retrieval_metrics(x, y, ks=(1,), backend=backend)
    assert m["num_queries"] == 2
    assert m["recall@1"] == 1.0 and m["map@r"] == 1.0
    # `where` removes queries but keeps them in the gallery.
    m2 = retrieval_metrics(x, y, ks=(1,), where=np.array([1, 1, 0, 1], bool), backend=backend)
    assert m2["num_queries"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_tie_to_lower_index_across_gallery_blocks(backend):
    rng = np.random.default_rng(1)
    base = rng.standard_normal((3, 4)).astype(np.float32)
    x = np.repeat(base, 40, axis=0)[rng.permutation(120)]
    idx, d = knn(x, k=60, backend=backend, query_block=7, reference_block=16)
    np.testing.assert_array_equal(idx, brute_knn(x, x, 60, True))
    # the 39 exact duplicates of each query come first, in increasing index order
    for i in range(120):
        dup = np.nonzero(np.all(x == x[i], axis=1))[0]
        np.testing.assert_array_equal(idx[i, :39], dup[dup != i])
        assert np.all(d[i, :39] == 0.0)


def test_certification_fallback_gives_exact_order():
    # extra=0 leaves no slack: ties beyond the k-th candidate force the exact fallback.
    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)
    q_self = np.arange(30, dtype=np.int32)
    for backend in AVAILABLE:
        _, idx = search_rows(x, q_self, x, 12, backend=backend, extra=0)
        np.testing.assert_array_equal(idx, brute_knn(x, x, 12, True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_where_float32_gram_form_cannot_resolve(backend):
    # Points near a large offset: the float32 Gram form cancels catastrophically, the float64
    # re-rank (with fallback) still reproduces the exact order.
    rng = np.random.default_rng(2)
    x = (1000.0 + rng.standard_normal((200, 3)) * 1e-2).astype(np.float32)
    idx, _ = knn(x, k=5, backend=backend)
    np.testing.assert_array_equal(idx, brute_knn(x, x, 5, True))


# ------------------------------------------------------------------ random data


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("blocks", [(1024, 16384), (13, 50)])
def test_knn_matches_bruteforce(backend, blocks):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    r = rng.standard_normal((250, 8)).astype(np.float32)
    qb, rb = blocks
    idx, d = knn(x, k=20, backend=backend, query_block=qb, reference_block=rb)
    np.testing.assert_array_equal(idx, brute_knn(x, x, 20, True))
    idx2, _ = knn(x, r, k=20, backend=backend, query_block=qb, reference_block=rb)
    np.testing.assert_array_equal(idx2, brute_knn(x, r, 20, False))
    assert np.all(np.diff(d, axis=1) >= 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_matches_bruteforce(backend):
    rng = np.random.default_rng(4)
    centers = rng.standard_normal((12, 6))
    y = rng.integers(0, 12, 240)
    x = (centers[y] + 0.8 * rng.standard_normal((240, 6))).astype(np.float32)
    ref_y = rng.integers(0, 14, 180)
    ref = (np.vstack([centers, rng.standard_normal((2, 6))])[ref_y]
           + 0.8 * rng.standard_normal((180, 6))).astype(np.float32)
    ks = (1, 3, 10)
    for args in [(x, y), (x, y, ref, ref_y)]:
        got = retrieval_metrics(*args, ks=ks, backend=backend)
        want = brute_retrieval(*args, ks) if len(args) == 4 else brute_retrieval(x, y, None,
                                                                                  None, ks)
        assert got.keys() == want.keys()
        assert got["num_queries"] == want["num_queries"]
        for key in want:
            assert got[key] == pytest.approx(want[key], abs=1e-12), key
    # sanity: the metrics are informative here (not trivially 0 or 1)
    assert 0.2 < got["map@r"] < 0.95


@NEEDS_FAISS
def test_backends_identical_on_normalised_data():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1500, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = rng.integers(0, 100, 1500)
    a = retrieval_metrics(x, y, backend="jax")
    b = retrieval_metrics(x, y, backend="faiss")
    assert a == b


def test_agrees_with_pytorch_metric_learning():
    torch = pytest.importorskip("torch")
    acc_mod = pytest.importorskip("pytorch_metric_learning.utils.accuracy_calculator")
    rng = np.random.default_rng(6)
    x = rng.standard_normal((600, 16)).astype(np.float32)
    y = rng.integers(0, 40, 600)
    calc = acc_mod.AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
    )
    theirs = calc.get_accuracy(torch.tensor(x), torch.tensor(y))
    ours = retrieval_metrics(x, y)
    assert ours["precision@1"] == pytest.approx(theirs["precision_at_1"], abs=1e-12)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-12)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-12)


# ------------------------------------------------------------------ errors


def test_bad_inputs_raise():
    x = np.zeros((5, 3), np.float32)
    y = np.array([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="lengths must match"):
        retrieval_metrics(x, y[:4])
    with pytest.raises(ValueError, match=r"shape \[N, D\]"):
        retrieval_metrics(x[0], y)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        retrieval_metrics(bad, y)
    with pytest.raises(ValueError, match="NaN or inf"):
        knn(x, np.full((2, 3), np.inf, np.float32), k=1)
    with pytest.raises(ValueError, match=r"in \[1, 4\]"):
        retrieval_metrics(x, y, ks=(1, 5))
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 2\]"):
        knn(x, x[:2], k=3)
    with pytest.raises(ValueError, match="both"):
        retrieval_metrics(x, y, x)
    with pytest.raises(ValueError, match="dimension"):
        retrieval_metrics(x, y, np.zeros((4, 2), np.float32), np.zeros(4, int))
    with pytest.raises(ValueError, match="integer"):
        retrieval_metrics(x, y.astype(np.float32))
    with pytest.raises(ValueError, match="No query"):
        retrieval_metrics(x, np.arange(5), ks=(1,))
    with pytest.raises(ValueError, match="backend"):
        knn(x, k=1, backend="annoy")
