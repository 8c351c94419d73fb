"""cliplens.metrics against scikit-learn, naive references and hand-computed cases."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, top_k_accuracy_score
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from cliplens import metrics as M


# ---------------------------------------------------------------------------- naive references
def naive_topk(scores: list, k: int) -> list[int]:
    """Sort (score desc, index asc) with plain Python and cut at k."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def naive_ranking(scores: np.ndarray) -> np.ndarray:
    return np.array(naive_topk(list(scores), len(scores)), dtype=np.int64)


# ---------------------------------------------------------------------------- topk_indices
def test_topk_hand_cases():
    assert M.topk_indices(np.array([0.1, 0.9, 0.5]), 1).tolist() == [1]
    assert M.topk_indices(np.array([0.1, 0.9, 0.5]), 3).tolist() == [1, 2, 0]
    # ties straddle the k-th place: the lower indices win
    assert M.topk_indices(np.array([1, 3, 3, 3, 0]), 2).tolist() == [1, 2]
    assert M.topk_indices(np.array([5.0, 5.0, 5.0, 5.0]), 3).tolist() == [0, 1, 2]
    assert M.topk_indices(np.array([[1, 3, 3, 3, 0], [2, 2, 9, 2, 2]]), 3).tolist() == [[1, 2, 3], [2, 0, 1]]


def test_topk_matches_naive_on_many_ties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 40))
        k = int(rng.integers(1, n + 1))
        s = rng.integers(0, 4, n).astype(float)  # only 4 distinct values: ties everywhere
        assert M.topk_indices(s, k).tolist() == naive_topk(s.tolist(), k)
    q = rng.integers(-3, 3, (50, 30))
    got = M.topk_indices(q, 7)
    assert got.shape == (50, 7) and got.dtype == np.int64
    for row, idx in zip(q, got):
        assert idx.tolist() == naive_topk(row.tolist(), 7)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int8, np.int64, np.uint8, np.uint64, np.bool_])
def test_topk_dtypes_including_extremes(dtype):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    vals = [0, 1, 1, 0] if dtype is np.bool_ else [0, 3, 3, 1]
    s = np.array(vals, dtype=dtype)
    assert M.topk_indices(s, 3).tolist() == naive_topk(vals, 3)
    if info is not None:  # negation would overflow at the type's minimum; the key must not
        ext = np.array([info.min, info.max, info.min, info.max], dtype=dtype)
        assert M.topk_indices(ext, 4).tolist() == [1, 3, 0, 2]


def test_topk_k_edges_and_errors():
    s = np.arange(5.0)
    assert M.topk_indices(s, 5).tolist() == [4, 3, 2, 1, 0]
    assert M.topk_indices(s, np.int64(1)).tolist() == [4]
    for bad in (0, -1, 6):
        with pytest.raises(ValueError, match="k must be"):
            M.topk_indices(s, bad)
    with pytest.raises(ValueError, match="integer"):
        M.topk_indices(s, 1.5)
    with pytest.raises(ValueError, match="dimensions"):
        M.topk_indices(np.zeros((2, 2, 2)), 1)
    with pytest.raises(ValueError, match="NaN"):
        M.topk_indices(np.array([1.0, np.nan]), 1)
    assert M.topk_indices(np.zeros((0, 4)), 2).shape == (0, 2)


# ---------------------------------------------------------------------------- precision, AP, R-precision
def test_precision_at_k():
    rel = np.array([1, 0, 1, 0], dtype=bool)
    assert M.precision_at_k(rel, 1) == 1.0
    assert M.precision_at_k(rel, 2) == 0.5
    assert M.precision_at_k(rel, 3) == pytest.approx(2 / 3)
    assert M.precision_at_k(rel, 4) == 0.5
    np.testing.assert_allclose(M.precision_at_k(np.array([[1, 1, 0], [0, 0, 1]]), 2), [1.0, 0.0])
    for bad in (0, 5):
        with pytest.raises(ValueError):
            M.precision_at_k(rel, bad)


def test_average_precision_hand_cases():
    # ranking [rel, not, rel, not]: precisions at hits 1 and 2/3
    assert M.average_precision(np.array([4.0, 3, 2, 1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert M.average_precision(np.array([4.0, 3, 2, 1]), np.array([0, 0, 0, 1])) == pytest.approx(1 / 4)
    assert M.average_precision(np.array([1.0, 2.0]), np.array([1, 1])) == 1.0
    # all four tied, two relevant: one threshold, precision 2/4 -> AP 0.5 whatever the order
    assert M.average_precision(np.array([7, 7, 7, 7]), np.array([1, 0, 0, 1])) == pytest.approx(0.5)
    # tie group {1,2} holds one relevant: after rank 1 (rel) precision 1; after group 2/3
    assert M.average_precision(np.array([3.0, 2, 2, 1]), np.array([1, 0, 1, 0])) == pytest.approx((1 + 2 / 3) / 2)
    assert M.average_precision(np.array([3.0, 2, 2, 1]), np.array([0, 1, 0, 1])) == pytest.approx((1 / 3 + 2 / 4) / 2)


def test_average_precision_no_positives_is_nan():
    assert np.isnan(M.average_precision(np.array([0.3, 0.2]), np.array([0, 0])))
    assert np.isnan(M.r_precision(np.array([0.3, 0.2]), np.array([0, 0])))


def test_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 50))
        rel = rng.random(n) < 0.3
        if not rel.any():
            rel[int(rng.integers(n))] = True
        # alternate continuous scores and integer scores with heavy ties
        s = rng.standard_normal(n) if trial % 2 else rng.integers(0, 3, n)
        assert M.average_precision(s, rel) == pytest.approx(average_precision_score(rel, s), abs=1e-12)


def test_average_precision_errors():
    with pytest.raises(ValueError, match="shape"):
        M.average_precision(np.array([1.0, 2.0]), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match="empty"):
        M.average_precision(np.array([]), np.array([]))


def test_r_precision():
    # R = 2: the top 2 by score are items 0 and 1, one of which is relevant
    assert M.r_precision(np.array([4.0, 3, 2, 1]), np.array([1, 0, 1, 0])) == 0.5
    assert M.r_precision(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1])) == 1.0
    # ties at the R-th place: lower index first -> top-1 of [5,5] is item 0 (not relevant)
    assert M.r_precision(np.array([5.0, 5.0]), np.array([0, 1])) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = rng.integers(0, 4, 25)
        rel = rng.random(25) < 0.3
        if rel.any():
            ranked = rel[naive_ranking(s)]
            assert M.r_precision(s, rel) == pytest.approx(ranked[: rel.sum()].mean())


# ---------------------------------------------------------------------------- retrieval_metrics
def test_retrieval_metrics_matches_per_query_functions():
    rng = np.random.default_rng(0)
    c, n = 6, 40
    scores = rng.integers(0, 5, (c, n)).astype(np.float32)  # many ties
    labels = rng.integers(0, c - 1, n)  # class c-1 has no items
    out = M.retrieval_metrics(scores, labels, ks=[1, 5, 100])
    assert set(out) == {"precision@1", "precision@5", "precision@100", "r_precision", "ap", "num_relevant"}
    for q in range(c - 1):
        rel = labels == q
        ranked = rel[naive_ranking(scores[q])]
        assert out["precision@1"][q] == pytest.approx(ranked[:1].mean())
        assert out["precision@5"][q] == pytest.approx(ranked[:5].mean())
        assert out["precision@100"][q] == pytest.approx(ranked.mean())  # k clipped to N
        assert out["r_precision"][q] == pytest.approx(M.r_precision(scores[q], rel))
        assert out["ap"][q] == pytest.approx(average_precision_score(rel, scores[q]))
        assert out["num_relevant"][q] == rel.sum()
    for key in ("precision@1", "precision@5", "r_precision", "ap"):
        assert np.isnan(out[key][c - 1])
    assert out["num_relevant"][c - 1] == 0


def test_retrieval_metrics_hand_case():
    scores = np.array([[0.9, 0.1, 0.8, 0.2], [0.1, 0.9, 0.2, 0.8]])
    labels = np.array([0, 0, 1, 1])
    out = M.retrieval_metrics(scores, labels, ks=[1, 2])
    np.testing.assert_allclose(out["precision@1"], [1.0, 0.0])
    np.testing.assert_allclose(out["precision@2"], [0.5, 0.5])
    np.testing.assert_allclose(out["r_precision"], [0.5, 0.5])
    # class 0 ranking: rel, -, -, rel; class 1 ranking: -, rel, rel, -
    np.testing.assert_allclose(out["ap"], [(1 + 2 / 4) / 2, (1 / 2 + 2 / 3) / 2])


def test_retrieval_metrics_errors():
    with pytest.raises(ValueError, match="labels"):
        M.retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]), [1])
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        M.retrieval_metrics(np.zeros((2, 3)), np.array([0, 1, 2]), [1])
    with pytest.raises(ValueError, match="k must be"):
        M.retrieval_metrics(np.zeros((2, 3)), np.array([0, 1, 1]), [0])


def test_retrieval_metrics_is_fast():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((100, 10_000)).astype(np.float32)
    labels = rng.integers(0, 100, 10_000)
    t0 = time.perf_counter()
    M.retrieval_metrics(scores, labels, ks=[1, 10, 100])
    assert time.perf_counter() - t0 < 1.0


# ---------------------------------------------------------------------------- classification
def test_topk_accuracy_matches_sklearn_including_ties():
    rng = np.random.default_rng(0)
    for trial in range(100):
        n, c = 30, int(rng.integers(3, 9))
        logits = rng.integers(0, 3, (n, c)).astype(float) if trial % 2 else rng.standard_normal((n, c))
        labels = rng.integers(0, c, n)
        for k in range(1, c):  # k == C makes sklearn warn (perfect score)
            expect = top_k_accuracy_score(labels, logits, k=k, labels=range(c))
            assert M.topk_accuracy(logits, labels, k) == pytest.approx(expect)


def test_topk_accuracy_tie_rule_hand_case():
    # all logits tied: sklearn ranks the highest class index first
    logits = np.zeros((3, 3))
    labels = np.array([0, 1, 2])
    assert M.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)  # only label 2 is "top-1"
    assert M.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert top_k_accuracy_score(labels, logits, k=1, labels=range(3)) == pytest.approx(1 / 3)
    assert M.topk_accuracy(logits, labels, 3) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        M.topk_accuracy(logits, labels, 4)
    with pytest.raises(ValueError, match="k must be"):
        M.topk_accuracy(logits, labels, 0)
    with pytest.raises(ValueError, match="labels"):
        M.topk_accuracy(logits, np.array([0, 1, 3]), 1)


def test_confusion_matrix_matches_sklearn():
    rng = np.random.default_rng(0)
    labels, pred = rng.integers(0, 7, 500), rng.integers(0, 7, 500)
    got = M.confusion_matrix(labels, pred, 8)  # class 7 never occurs
    assert got.dtype == np.int64 and got.shape == (8, 8)
    np.testing.assert_array_equal(got, sk_confusion_matrix(labels, pred, labels=range(8)))
    np.testing.assert_array_equal(M.confusion_matrix([0, 0, 1], [0, 1, 1], 2), [[1, 1], [0, 1]])
    with pytest.raises(ValueError, match="pred"):
        M.confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match="num_classes"):
        M.confusion_matrix([0], [0], 0)


def test_per_class_recall():
    labels = np.array([0, 0, 1, 1, 1, 3])
    pred = np.array([0, 1, 1, 1, 0, 3])
    r = M.per_class_recall(pred, labels, 4)
    np.testing.assert_allclose(r, [0.5, 2 / 3, np.nan, 1.0])
    assert M.mean_per_class_recall(pred, labels, 4) == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    assert np.isnan(M.mean_per_class_recall(np.array([], int), np.array([], int), 3))


# ---------------------------------------------------------------------------- superclasses
F2C = np.array([0, 0, 1, 1, 2])  # 5 fine classes in 3 superclasses


def test_coarse_confusion():
    fine = M.confusion_matrix([0, 1, 2, 3, 4, 0], [1, 1, 3, 4, 4, 2], 5)
    coarse = M.coarse_confusion(fine, F2C, 3)
    np.testing.assert_array_equal(coarse, [[2, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert coarse.sum() == fine.sum() and coarse.dtype == np.int64
    with pytest.raises(ValueError, match="shape"):
        M.coarse_confusion(fine[:4, :4], F2C, 3)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        M.coarse_confusion(fine, F2C, 2)


def test_within_superclass_error_share():
    labels = np.array([0, 0, 2, 4, 3])
    pred = np.array([1, 0, 4, 4, 2])  # errors: 0->1 (same), 2->4 (other), 3->2 (same)
    assert M.within_superclass_error_share(labels, pred, F2C) == pytest.approx(2 / 3)
    assert np.isnan(M.within_superclass_error_share(labels, labels, F2C))


def test_superclass_false_positive_share():
    labels = np.array([0, 1, 2, 3, 4, 0])
    ranked = np.array([[0, 1, 2], [2, 3, 5], [4, 4, 4]])
    queries = np.array([0, 2, 4])
    # q0: FPs items 1 (class 1, same super), 2 (class 2, other) -> 1/2
    # q1: FPs item 3 (class 3, same), 5 (class 0, other) -> 1/2; q2: no FPs
    np.testing.assert_allclose(
        M.superclass_false_positive_share(ranked, queries, labels, F2C, per_query=True), [0.5, 0.5, np.nan]
    )
    assert M.superclass_false_positive_share(ranked, queries, labels, F2C) == pytest.approx(2 / 4)
    assert np.isnan(M.superclass_false_positive_share(ranked[2:], queries[2:], labels, F2C))
    with pytest.raises(ValueError, match="ranked_ids"):
        M.superclass_false_positive_share(np.array([[6]]), queries[:1], labels, F2C)
    with pytest.raises(ValueError, match="query_classes"):
        M.superclass_false_positive_share(ranked, queries[:2], labels, F2C)
