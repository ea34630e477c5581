"""Re-ID (CMC/mAP, Market/MARS junk rule) and classification metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from dml_jax.evaluation import classification_metrics, knn_classify, reid_metrics
from tests.evaluation.backends import BACKENDS


def _col(v):
    return np.asarray(v, np.float32)[:, None]


GALLERY = _col([1, 2, 3, 4, 5])
G_IDS = np.array([7, 7, 8, -1, 7])
G_CAMS = np.array([0, 1, 1, 1, 1])


def test_reid_hand_built():
    # q0 x=0 id7 cam0: junk idx0 (same id+cam), idx3 (id -1); remaining [1 good, 2, 4 good]
    #   -> first hit 1, AP = (1 + 2/3) / 2 = 5/6.
    # q1 x=4.5 id7 cam1: order [3,4,2,1,0] (3/4 tie -> 3 first); junk 3, 4, 1;
    #   remaining [2, 0 good] -> first hit 2, AP = 1/2.
    # q2 x=2.5 id8 cam0: idx1 and idx2 tie at 0.25 -> idx1 (another id) first, idx2 good:
    #   first hit 2, AP = 1/2.  q3 id9: no good item -> skipped.
    q = _col([0, 4.5, 2.5, 3])
    m = reid_metrics(q, [7, 7, 8, 9], [0, 1, 0, 0], GALLERY, G_IDS, G_CAMS, ranks=(1, 2, 5))
    assert m["num_queries"] == 3
    assert m["cmc@1"] == pytest.approx(1 / 3, abs=1e-15)
    assert m["cmc@2"] == pytest.approx(1.0, abs=1e-15)
    assert m["cmc@5"] == pytest.approx(1.0, abs=1e-15)
    assert m["map"] == pytest.approx((5 / 6 + 1 / 2 + 1 / 2) / 3, abs=1e-15)


def _reid_loop(q, qid, qcam, g, gid, gcam, ranks):
    cmc, aps = {r: [] for r in ranks}, []
    for i in range(len(q)):
        d = np.sum((g.astype(np.float64) - q[i]) ** 2, axis=1)
        order = sorted(range(len(g)), key=lambda j: (d[j], j))
        order = [j for j in order if gid[j] >= 0 and not (gid[j] == qid[i] and gcam[j] == qcam[i])]
        rel = [gid[j] == qid[i] for j in order]
        if not any(rel):
            continue
        first = rel.index(True) + 1
        for r in ranks:
            cmc[r].append(first <= r)
        hits, ap = 0, 0.0
        for p, hit in enumerate(rel, 1):
            if hit:
                hits += 1
                ap += hits / p
        aps.append(ap / sum(rel))
    return {**{f"cmc@{r}": float(np.mean(cmc[r])) for r in ranks}, "map": float(np.mean(aps))}


def test_reid_matches_loop_on_random_data():
    rng = np.random.default_rng(0)
    qid, gid = rng.integers(0, 15, 60), rng.integers(-1, 15, 200)
    centers = rng.standard_normal((16, 5))
    q = (centers[qid] + rng.standard_normal((60, 5))).astype(np.float32)
    g = (centers[gid] + rng.standard_normal((200, 5))).astype(np.float32)
    qcam, gcam = rng.integers(0, 3, 60), rng.integers(0, 3, 200)
    got = reid_metrics(q, qid, qcam, g, gid, gcam, ranks=(1, 5, 10), block=17)
    want = _reid_loop(q, qid, qcam, g, gid, gcam, (1, 5, 10))
    for key, val in want.items():
        assert got[key] == pytest.approx(val, abs=1e-12), key
    assert 0.1 < got["map"] < 0.99


def test_reid_bad_inputs():
    with pytest.raises(ValueError, match="lengths must match"):
        reid_metrics(GALLERY, G_IDS[:4], G_CAMS, GALLERY, G_IDS, G_CAMS)
    with pytest.raises(ValueError, match=r"rank must be in \[1, 5\]"):
        reid_metrics(GALLERY, G_IDS, G_CAMS, GALLERY, G_IDS, G_CAMS, ranks=(1, 6))
    with pytest.raises(ValueError, match="No query"):
        reid_metrics(GALLERY[:1], [3], [0], GALLERY, G_IDS, G_CAMS, ranks=(1,))


def test_binary_classification_hand_built():
    p = np.array([0.9, 0.4, 0.35, 0.8, 0.6])
    y = np.array([1, 1, 0, 0, 1])
    m = classification_metrics(p, y, threshold=0.5)
    # pred [1,0,0,1,1]: TP 2, FN 1, TN 1, FP 1; AUC: 4 of 6 (pos, neg) pairs ordered;
    # AP: positives at ranks 1, 3, 4 -> (1/1 + 2/3 + 3/4) / 3.
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["auc"] == pytest.approx(4 / 6)
    assert m["ap"] == pytest.approx(29 / 36)
    # two-column logits give the same ranking metrics
    logits = np.stack([np.zeros(5), np.log(p / (1 - p))], axis=1)
    m2 = classification_metrics(logits, y)
    for key in m:
        assert m2[key] == pytest.approx(m[key]), key
    assert m["auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["ap"] == pytest.approx(average_precision_score(y, p))


def test_multiclass_accuracy_and_errors():
    logits = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 3.0]])
    # row 0 ties -> class 0
    assert classification_metrics(logits, [0, 2, 2]) == {"accuracy": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="lengths must match"):
        classification_metrics(logits, [0, 1])
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        classification_metrics(logits, [0, 1, 3])
    with pytest.raises(ValueError, match="NaN"):
        classification_metrics(np.full((3, 3), np.nan), [0, 1, 2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_knn_classify_votes_and_ties(backend):
    train = _col([0, 1, 2, 10, 11])
    y = np.array([0, 0, 1, 1, 1])
    # 1.4 (k=3): neighbours 1, 2, 0 -> labels 0, 1, 0 -> 0
    # 1.5 (k=2): 1 and 2 tie, index 1 first -> votes 0:1, 1:1 -> nearest (label 0)
    # 1.6 (k=2): 2 then 1 -> 1;  10.4 (k=3): 3, 4, 2 -> 1
    assert knn_classify(train, y, _col([1.4]), k=3, backend=backend).tolist() == [0]
    pred = knn_classify(train, y, _col([1.5, 1.6]), k=2, backend=backend)
    assert pred.tolist() == [0, 1]
    assert knn_classify(train, y, _col([10.4]), k=3, backend=backend).tolist() == [1]
    with pytest.raises(ValueError, match="k"):
        knn_classify(train, y, _col([1.0]), k=6, backend=backend)
