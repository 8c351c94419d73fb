"""Linear probe: logistic regression on frozen CLIP image embeddings, compared with zero-shot.

The recipe of the CLIP paper (section 3.2 and appendix A.3), scaled to a CPU: scikit-learn's L2-regularised
``LogisticRegression`` with the L-BFGS solver on the stored unit embeddings; the inverse regularisation strength C
is chosen by a sweep scored on a validation split carved, per class and seeded, from the TRAIN index only (the test
index is never looked at until the final model is fixed); the chosen C is then refit on all the train items used.
The sweep is coarse-to-fine: decades first, then half a decade either side of the best.

L-BFGS stops at scikit-learn's default tolerance (1e-4, what the linear-probe example in OpenAI's CLIP README
uses); ``tol`` tightens it at a cost in time. Each fit's iteration count is reported: under very strong
regularisation a fit can stop after one or two iterations, which is no bug (the strongly regularised limit of
logistic regression is a nearest-class-mean classifier), but worth seeing.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np

from cliplens import metrics as M
from cliplens.errors import CliplensError, ModelMismatchError

log = logging.getLogger(__name__)


class ProbeError(CliplensError):
    """The two indexes cannot be probed together (labels, classes, models)."""


@dataclass(frozen=True)
class ProbeConfig:
    cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0)  # coarse sweep of C
    refine: bool = True  # then try best * 10**-0.5 and best * 10**0.5
    val_fraction: float = 0.2  # of each class's train items
    limit_per_class: int | None = None  # use at most N train items per class (seeded sample)
    seed: int = 0
    max_iter: int = 1000
    tol: float = 1e-4  # scikit-learn's default stopping tolerance, as in the CLIP paper's use of it
    progress: bool = False  # a tqdm bar over the fits of the sweep

    def __post_init__(self) -> None:
        if not self.cs or any(not c > 0 for c in self.cs):
            raise ProbeError(f"C values must be positive, got {self.cs}")
        if not self.tol > 0 or self.max_iter < 1:
            raise ProbeError(f"tol must be positive and max_iter at least 1, got {self.tol}, {self.max_iter}")
        if not 0 < self.val_fraction < 1:
            raise ProbeError(f"the validation fraction must lie between 0 and 1, got {self.val_fraction}")
        if self.limit_per_class is not None and self.limit_per_class < 2:
            raise ProbeError(f"the limit per class must be at least 2 (one to train, one to validate), got "
                             f"{self.limit_per_class}", fix={"limit_per_class": None})


def check_compatible(train_manifest, test_manifest) -> None:
    """Both indexes (their ``Manifest``s) must hold embeddings of the same model and the same classes."""
    a, b = train_manifest.model, test_manifest.model
    if not a.same_vectors(b):
        raise ModelMismatchError(f"the train index was built with {a.label()} and the test index with {b.label()}: "
                                 "embed both with the same --model/--pretrained")
    if not train_manifest.class_names or train_manifest.class_names != test_manifest.class_names:
        raise ProbeError("the train and test indexes must both have labels with the same class names "
                         "(index the train and test splits of one data set)")


def split_train_val(labels: np.ndarray, *, val_fraction: float, limit_per_class: int | None, seed: int):
    """(train_idx, val_idx): per class, a seeded shuffle, at most ``limit_per_class`` kept, ``val_fraction`` held out.

    A class with a single item goes to train only. Both index arrays are sorted.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        if limit_per_class is not None:
            idx = idx[:limit_per_class]
        n_val = int(round(val_fraction * len(idx))) if len(idx) > 1 else 0
        n_val = min(max(n_val, 1 if len(idx) > 1 else 0), len(idx) - 1)
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _fit(x: np.ndarray, y: np.ndarray, c: float, config: ProbeConfig):
    try:
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        raise ProbeError("the linear probe needs scikit-learn: pip install 'cliplens[eval]'") from None
    from sklearn.exceptions import ConvergenceWarning

    clf = LogisticRegression(C=c, solver="lbfgs", max_iter=config.max_iter, tol=config.tol, random_state=config.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        # few shots per class (the few-shot study) are a classification problem, whatever this heuristic thinks
        warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
        clf.fit(x, y)
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        log.warning("L-BFGS did not converge in %d iterations at C=%g", config.max_iter, c)
    return clf


def _logits(clf, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Decision scores for all classes; a class absent from training can never be predicted (-inf)."""
    out = np.full((len(x), num_classes), -np.inf)
    scores = clf.decision_function(x)
    if scores.ndim == 1:  # two classes: sklearn returns the positive-class margin only
        scores = np.stack([-scores, scores], axis=1)
    out[:, clf.classes_] = scores
    return out


def fit_logits(x: np.ndarray, y: np.ndarray, test_x: np.ndarray, *, c: float, num_classes: int,
               config: ProbeConfig = ProbeConfig()) -> np.ndarray:
    """One fit at a fixed C (no sweep) and its (N, C) decision scores on ``test_x``: the few-shot study's 1-shot case."""
    clf = _fit(np.asarray(x, np.float32), np.asarray(y, np.int64), c, config)
    return _logits(clf, np.asarray(test_x, np.float32), num_classes)


def _top1(clf, x, y, num_classes: int) -> float:
    return M.topk_accuracy(_logits(clf, x, num_classes), y, 1)


def linear_probe(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, test_labels: np.ndarray, *,
                 num_classes: int, config: ProbeConfig = ProbeConfig()) -> dict:
    """Sweep C on the validation split, refit on train + validation, score on test. Numbers and timings."""
    t0 = time.perf_counter()
    x = np.asarray(train_emb, dtype=np.float32)
    y = np.asarray(train_labels, dtype=np.int64)
    tr, va = split_train_val(y, val_fraction=config.val_fraction, limit_per_class=config.limit_per_class, seed=config.seed)
    if len(va) == 0 or len(np.unique(y[tr])) < 2:
        raise ProbeError("the train index is too small for a validation split: it needs 2+ classes with 2+ images each")
    sweep: dict[float, float] = {}
    iterations: dict[float, int] = {}
    from tqdm import tqdm

    bar = tqdm(total=len(config.cs) + 2 * config.refine, desc="C sweep", unit="fit", disable=not config.progress)

    def score(c: float) -> None:
        if c not in sweep:
            clf = _fit(x[tr], y[tr], c, config)
            sweep[c], iterations[c] = _top1(clf, x[va], y[va], num_classes), int(np.max(clf.n_iter_))
            log.info("C=%g: validation top-1 %.4f after %d L-BFGS iterations", c, sweep[c], iterations[c])
        bar.update(1)

    for c in config.cs:
        score(float(c))
    best = max(sorted(sweep), key=lambda c: sweep[c])  # first maximum in ascending C: ties go to more regularisation
    if config.refine:
        for c in (best * 10**-0.5, best * 10**0.5):
            score(float(c))
        best = max(sorted(sweep), key=lambda c: sweep[c])
    bar.close()
    sweep_seconds = time.perf_counter() - t0
    used = np.sort(np.concatenate([tr, va]))
    t1 = time.perf_counter()
    clf = _fit(x[used], y[used], best, config)
    fit_seconds = time.perf_counter() - t1
    logits = _logits(clf, np.asarray(test_emb, dtype=np.float32), num_classes)
    pred = logits.shape[1] - 1 - np.argmax(logits[:, ::-1], axis=1)  # ties as metrics.topk_accuracy
    return {
        "best_C": best,
        "sweep": [{"C": c, "val_top1": sweep[c], "iterations": iterations[c]} for c in sorted(sweep)],
        "iterations": int(np.max(clf.n_iter_)), "tol": config.tol, "max_iter": config.max_iter,
        "num_train": int(len(tr)), "num_val": int(len(va)), "num_test": int(len(test_labels)),
        "limit_per_class": config.limit_per_class, "val_fraction": config.val_fraction, "seed": config.seed,
        "top1": M.topk_accuracy(logits, test_labels, 1),
        "top5": M.topk_accuracy(logits, test_labels, min(5, num_classes)),
        "per_class_accuracy": M.per_class_recall(pred, test_labels, num_classes),
        "mean_per_class_accuracy": M.mean_per_class_recall(pred, test_labels, num_classes),
        "sweep_seconds": round(sweep_seconds, 3), "fit_seconds": round(fit_seconds, 3),
        "seconds": round(sweep_seconds + fit_seconds, 3),
    }


def compare(probe_per_class: np.ndarray, zero_shot_per_class: np.ndarray, names, n: int = 5) -> dict:
    """Classes where the probe gains most and least over zero-shot (accuracy difference, absent classes skipped)."""
    diff = np.asarray(probe_per_class) - np.asarray(zero_shot_per_class)
    ok = np.flatnonzero(~np.isnan(diff))
    order = ok[np.lexsort((ok, -diff[ok]))]  # largest gain first, ties by class index

    def rows(idx) -> list[dict]:
        return [{"class": names[i], "probe": float(probe_per_class[i]), "zero_shot": float(zero_shot_per_class[i]),
                 "gain": float(diff[i])} for i in idx]

    least = order[::-1][:n]
    return {"most": rows(order[:n]), "least": rows(least)}
