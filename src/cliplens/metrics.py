"""Evaluation metrics as pure numpy functions: rankings, precision, AP, accuracy, confusion.

Only numpy is imported here (scikit-learn is the test oracle, not a dependency). Every
function validates its inputs with ``ValueError`` and works on whole arrays at once, so
100 class queries over 10,000 items take a few tens of milliseconds.

Tie rules, stated once because they differ on purpose:

* rankings (:func:`topk_indices`, precision@k, R-precision) order by score, highest
  first, and break ties by the *lower* item index, so a ranking is reproducible;
* :func:`average_precision` treats tied scores as one threshold, exactly as
  ``sklearn.metrics.average_precision_score`` does, so it does not depend on item order;
* :func:`topk_accuracy` follows ``sklearn.metrics.top_k_accuracy_score``, which ranks
  classes by a stable ascending sort reversed, so among tied classes the *higher* class
  index ranks first.
"""

from __future__ import annotations

import operator
from typing import Sequence

import numpy as np

__all__ = [
    "topk_indices",
    "precision_at_k",
    "average_precision",
    "r_precision",
    "retrieval_metrics",
    "topk_accuracy",
    "per_class_recall",
    "mean_per_class_recall",
    "confusion_matrix",
    "coarse_confusion",
    "within_superclass_error_share",
    "superclass_false_positive_share",
]


# ---------------------------------------------------------------------------- validation
def _scores(name: str, x: np.ndarray, ndims: tuple[int, ...]) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
        raise ValueError(f"{name} contains NaN; rankings of NaN are undefined")
    return a


def _ints(name: str, x: np.ndarray, ndim: int = 1, n: int | None = None, high: int | None = None) -> np.ndarray:
    """Integer array of `ndim` dims, length `n` (first axis) and values in [0, high)."""
    a = np.asarray(x)
    if a.ndim != ndim or not (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_):
        raise ValueError(f"{name} must be a {ndim}-d integer array, got shape {a.shape} dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if n is not None and a.shape[0] != n:
        raise ValueError(f"{name} has length {a.shape[0]}, expected {n}")
    if a.size and (a.min() < 0 or (high is not None and a.max() >= high)):
        raise ValueError(f"{name} values must lie in [0, {high}), got [{a.min()}, {a.max()}]")
    return a


def _k(k: int, n: int | None, what: str = "items", name: str = "k") -> int:
    """`k` as an int in [1, n] (no upper bound when n is None)."""
    try:
        k = operator.index(k)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {k!r}") from None
    if k < 1 or (n is not None and k > n):
        bound = f"between 1 and the number of {what} ({n})" if n is not None else "at least 1"
        raise ValueError(f"{name} must be {bound}, got {k}")
    return k


def _descending_key(a: np.ndarray) -> np.ndarray:
    """Key whose ascending order is `a`'s descending order, without overflow.

    Integers use bitwise NOT (~x == -x - 1, order-reversing even for INT_MIN and unsigned
    types), bools use logical NOT, floats use negation.
    """
    return ~a if (np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_) else -a


def _relevant(relevant: np.ndarray, n: int) -> np.ndarray:
    r = np.asarray(relevant)
    if r.shape != (n,):
        raise ValueError(f"relevant must have shape ({n},) like scores, got {r.shape}")
    return r.astype(bool)


# ---------------------------------------------------------------------------- rankings
def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` highest scores, highest first, ties broken by lower index.

    `scores` is (N,) or (Q, N); the result is int64 (k,) or (Q, k). Exact even when ties
    straddle the k-th place: argpartition finds the k-th score in O(N), every index whose
    score is >= it is kept (that can be more than k), and only those few are sorted.
    """
    a = _scores("scores", scores, (1, 2))
    rows = a.reshape(1, -1) if a.ndim == 1 else a
    q, n = rows.shape
    k = _k(k, n)
    kth = np.partition(rows, n - k, axis=1)[:, n - k]  # k-th largest score of each row
    r, c = np.nonzero(rows >= kth[:, None])  # row-major: grouped by row, >= k per row
    order = np.lexsort((c, _descending_key(rows[r, c]), r))
    counts = np.bincount(r, minlength=q)
    starts = np.cumsum(counts) - counts  # where each row's candidates begin
    out = c[order][starts[:, None] + np.arange(k)]
    return out[0] if a.ndim == 1 else out


def _rank_rows(scores: np.ndarray) -> np.ndarray:
    """Full ranking of each row: stable argsort of the descending key (ties: lower index)."""
    return np.argsort(_descending_key(scores), axis=1, kind="stable")


def _tie_aware_ap(sorted_scores: np.ndarray, sorted_rel: np.ndarray) -> np.ndarray:
    """AP of each row of a ranking, counting a run of tied scores as one threshold (sklearn).

    AP = sum over relevant items i of precision at the end e(i) of i's tie group, / P.
    """
    q, n = sorted_scores.shape
    pos = np.arange(n)
    is_end = np.ones((q, n), dtype=bool)
    is_end[:, :-1] = sorted_scores[:, :-1] != sorted_scores[:, 1:]
    # e(i): first group end at or after i (reverse running minimum of end positions)
    ends = np.minimum.accumulate(np.where(is_end, pos, n)[:, ::-1], axis=1)[:, ::-1]
    tp = np.cumsum(sorted_rel, axis=1)
    precision_at_end = np.take_along_axis(tp, ends, axis=1) / (ends + 1)
    n_pos = tp[:, -1]
    total = np.where(sorted_rel, precision_at_end, 0.0).sum(axis=1)
    return np.where(n_pos > 0, total / np.maximum(n_pos, 1), np.nan)


def precision_at_k(relevant_sorted: np.ndarray, k: int) -> float | np.ndarray:
    """Share of relevant items among the first `k` of a ranking.

    `relevant_sorted` is a bool (n,) ranking -> float, or (Q, n) rankings -> (Q,) array.
    ValueError if k < 1 or k > n (callers that want clipping clip first).
    """
    r = np.asarray(relevant_sorted)
    if r.ndim not in (1, 2):
        raise ValueError(f"relevant_sorted must be 1-d or 2-d, got shape {r.shape}")
    k = _k(k, r.shape[-1])
    p = r[..., :k].astype(bool).sum(axis=-1) / k
    return float(p) if r.ndim == 1 else p


def average_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Average precision of one query, equal to ``sklearn.metrics.average_precision_score``.

    Tied scores form one threshold (precision is taken after the whole tie group), so the
    result does not depend on item order. Returns nan when there are no relevant items:
    AP is undefined then (sklearn warns and returns 0, which would drag a mean down).
    """
    s = _scores("scores", scores, (1,))
    rel = _relevant(relevant, s.shape[0])
    if s.shape[0] == 0:
        raise ValueError("scores is empty")
    order = _rank_rows(s[None])[0]
    return float(_tie_aware_ap(s[order][None], rel[order][None])[0])


def r_precision(scores: np.ndarray, relevant: np.ndarray) -> float:
    """Precision at R, where R is the number of relevant items (ties: lower index first).

    nan when there are no relevant items.
    """
    s = _scores("scores", scores, (1,))
    rel = _relevant(relevant, s.shape[0])
    n_rel = int(rel.sum())
    if n_rel == 0:
        return float("nan")
    return float(rel[topk_indices(s, n_rel)].sum() / n_rel)


def retrieval_metrics(scores: np.ndarray, labels: np.ndarray, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-class retrieval quality when each class is a query over N labelled items.

    scores: (C, N) similarity of class query c to item n; labels: (N,) ints in [0, C).
    Returns a dict of (C,) float64 arrays: ``"precision@{k}"`` for each requested k (k is
    clipped to N, the key keeps the requested k), ``"r_precision"``, ``"ap"`` (tie-aware,
    as :func:`average_precision`) and ``"num_relevant"`` (int64). Rankings break ties by
    lower item index. A class with no items is not a valid query: its metrics are nan, so
    take ``np.nanmean`` for a mean over classes.
    """
    s = _scores("scores", scores, (2,))
    c, n = s.shape
    if n == 0 or c == 0:
        raise ValueError(f"scores must be non-empty, got shape {s.shape}")
    y = _ints("labels", labels, n=n, high=c)
    ks = [_k(k, None) for k in ks]  # clipped to N below
    order = _rank_rows(s)
    rel = y[order] == np.arange(c)[:, None]  # (C, N) relevance in ranked order
    tp = np.cumsum(rel, axis=1)
    n_rel = tp[:, -1]
    valid = n_rel > 0
    out: dict[str, np.ndarray] = {}
    for k in ks:
        kk = min(k, n)
        out[f"precision@{k}"] = np.where(valid, tp[:, kk - 1] / kk, np.nan)
    r_idx = np.maximum(n_rel, 1) - 1
    out["r_precision"] = np.where(valid, tp[np.arange(c), r_idx] / np.maximum(n_rel, 1), np.nan)
    out["ap"] = _tie_aware_ap(np.take_along_axis(s, order, axis=1), rel)
    out["num_relevant"] = n_rel.astype(np.int64)
    return out


# ---------------------------------------------------------------------------- classification
def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of samples whose true class is among the `k` highest logits.

    logits: (N, C); labels: (N,) ints in [0, C). Equals
    ``sklearn.metrics.top_k_accuracy_score(labels, logits, k=k, labels=range(C))``
    including ties: sklearn ranks by ``argsort(kind="mergesort")[:, ::-1]``, so among
    classes with equal logits the higher class index ranks first. Computed exactly as
    rank = #(logit > true logit) + #(logit == true logit and index > true index) < k.
    (For C == 2 sklearn takes another, thresholding path; this function keeps the rule.)
    k == C gives 1.0; k > C is a ValueError.
    """
    x = _scores("logits", logits, (2,))
    n, c = x.shape
    if n == 0:
        raise ValueError("logits is empty")
    k = _k(k, c, "classes")
    y = _ints("labels", labels, n=n, high=c)
    true = x[np.arange(n), y][:, None]
    higher_index = np.arange(c)[None, :] > y[:, None]
    rank = (x > true).sum(axis=1) + ((x == true) & higher_index).sum(axis=1)
    return float(np.mean(rank < k))


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts, rows = true class, columns = predicted class.

    Equals ``sklearn.metrics.confusion_matrix(labels, pred, labels=range(C))``.
    """
    c = _k(num_classes, None, name="num_classes")
    y = _ints("labels", labels, high=c)
    p = _ints("pred", pred, n=y.shape[0], high=c)
    return np.bincount(y * c + p, minlength=c * c).reshape(c, c).astype(np.int64)


def per_class_recall(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) float64 recall (correct / samples) of each true class; nan for empty classes."""
    cm = confusion_matrix(labels, pred, num_classes)
    support = cm.sum(axis=1)
    out = np.full(cm.shape[0], np.nan)
    np.divide(np.diag(cm), support, out=out, where=support > 0)
    return out


def mean_per_class_recall(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean of :func:`per_class_recall` over classes that have samples (nan if none do)."""
    r = per_class_recall(pred, labels, num_classes)
    return float(np.mean(r[~np.isnan(r)])) if (~np.isnan(r)).any() else float("nan")


# ---------------------------------------------------------------------------- superclasses
def _fine_to_coarse(fine_to_coarse: np.ndarray) -> np.ndarray:
    return _ints("fine_to_coarse", fine_to_coarse)


def coarse_confusion(confusion: np.ndarray, fine_to_coarse: np.ndarray, num_coarse: int) -> np.ndarray:
    """Sum a (C, C) fine confusion matrix into (K, K) superclass blocks (int64)."""
    m = _ints("confusion", confusion, ndim=2)
    f2c = _fine_to_coarse(fine_to_coarse)
    kk = _k(num_coarse, None, name="num_coarse")
    if m.shape != (f2c.shape[0], f2c.shape[0]):
        raise ValueError(f"confusion has shape {m.shape}, expected ({f2c.shape[0]}, {f2c.shape[0]})")
    if f2c.size and f2c.max() >= kk:
        raise ValueError(f"fine_to_coarse values must lie in [0, {kk}), got max {f2c.max()}")
    onehot = np.zeros((f2c.shape[0], kk), dtype=np.int64)
    onehot[np.arange(f2c.shape[0]), f2c] = 1
    return onehot.T @ m @ onehot


def within_superclass_error_share(labels: np.ndarray, pred: np.ndarray, fine_to_coarse: np.ndarray) -> float:
    """Among misclassified samples, the share predicted as a class of the true superclass.

    A high share means the model's mistakes are "near misses" (maple -> oak tree). nan if
    there are no errors.
    """
    f2c = _fine_to_coarse(fine_to_coarse)
    y = _ints("labels", labels, high=f2c.shape[0])
    p = _ints("pred", pred, n=y.shape[0], high=f2c.shape[0])
    wrong = p != y
    if not wrong.any():
        return float("nan")
    return float(np.mean(f2c[p[wrong]] == f2c[y[wrong]]))


def superclass_false_positive_share(
    ranked_ids: np.ndarray,
    query_classes: np.ndarray,
    labels: np.ndarray,
    fine_to_coarse: np.ndarray,
    *,
    per_query: bool = False,
) -> float | np.ndarray:
    """Among top-k false positives, the share whose class is in the query's own superclass.

    ranked_ids: (Q, k) item indices into `labels` (N,); query_classes: (Q,) fine class of
    each query. A false positive is a retrieved item whose label differs from the query
    class. Pooled over all queries (float) by default; with ``per_query=True`` a (Q,)
    array. nan where there are no false positives.
    """
    f2c = _fine_to_coarse(fine_to_coarse)
    y = _ints("labels", labels, high=f2c.shape[0])
    ids = _ints("ranked_ids", ranked_ids, ndim=2, high=y.shape[0])
    qc = _ints("query_classes", query_classes, n=ids.shape[0], high=f2c.shape[0])
    got = y[ids]  # (Q, k) labels of the retrieved items
    false_pos = got != qc[:, None]
    same_super = false_pos & (f2c[got] == f2c[qc][:, None])
    if not per_query:
        n_fp = int(false_pos.sum())
        return float(same_super.sum() / n_fp) if n_fp else float("nan")
    n_fp = false_pos.sum(axis=1)
    out = np.full(ids.shape[0], np.nan)
    np.divide(same_super.sum(axis=1), n_fp, out=out, where=n_fp > 0)
    return out
