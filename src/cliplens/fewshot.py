"""How many labels beat zero-shot: every method x every number of shots x several seeds, on frozen embeddings.

Protocol (one run = one method, one k, one seed):

1. **Sample** k items per class from the TRAIN index only (``sample_shots``: per class in class order, a seeded
   permutation of its items, the first k kept; k = all keeps every item). The test index is read only to score
   the final model, so the shots and every hyper-parameter are the same whatever the test set holds.
2. **Validate** on a split carved from the k shots themselves, with the linear probe's own splitter
   (``probe.split_train_val``, the same seed): a quarter of each class's shots by default, at least one when a
   class has two or more. With 1 shot there is nothing to validate on, so each method uses its documented default
   (probe C = 1, Tip-Adapter alpha = 1 and beta = 5.5 as in the paper, blend 0.5) and the run says so.
3. **Refit** with the chosen hyper-parameters on all k shots and score top-1 on the whole test index.

Methods: ``zero-shot`` (the class-prompt classifier, as ``evaluate`` builds it; the same for every k), ``probe``
(``probe.linear_probe``: the C sweep on the validation split, refit on all shots), ``tip-adapter``,
``tip-adapter-f`` and ``zs-probe`` (see ``adapters``). The Tip-Adapter caches hold every shot, so they run only for
numbers of shots (not "all": a cache of a whole training set is not a few-shot method). k = all runs once (seed 0:
nothing is sampled), so its probe row is exactly what ``cliplens probe`` reports with the same C values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import numpy as np

from cliplens import adapters as A
from cliplens import metrics as M
from cliplens.errors import CliplensError
from cliplens.probe import ProbeConfig, fit_logits, linear_probe, split_train_val

log = logging.getLogger(__name__)

METHODS = ("zero-shot", "probe", "tip-adapter", "tip-adapter-f", "zs-probe")
CACHE_METHODS = ("tip-adapter", "tip-adapter-f")
DEFAULT_SHOTS = (1, 2, 4, 8, 16, None)  # None: every train item
PUBLISHED = ({"claim": "zero-shot CLIP matches about a 4-shot linear probe on the same features, averaged over the "
                       "paper's datasets", "shots": 4, "source": "CLIP paper (Radford et al., 2021), few-shot figure"},)


class FewShotError(CliplensError):
    """Bad few-shot options (unknown method, shots below 1, too few seeds)."""


@dataclass(frozen=True)
class FewShotConfig:
    shots: tuple[int | None, ...] = DEFAULT_SHOTS
    seeds: int = 5
    methods: tuple[str, ...] = METHODS
    val_fraction: float = 0.25
    probe: ProbeConfig = field(default_factory=ProbeConfig)  # its C sweep; seed and val_fraction are set per run
    default_c: float = 1.0  # the probe's C when there is no validation split
    adapters: A.AdapterConfig = field(default_factory=A.AdapterConfig)
    progress: bool = False

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise FewShotError(f"unknown method {', '.join(bad) or '(none)'}; choose among {', '.join(METHODS)}")
        if not self.shots or any(k is not None and (isinstance(k, bool) or int(k) < 1) for k in self.shots):
            raise FewShotError(f"shots must be whole numbers >= 1 or 'all', got {self.shots}")
        if isinstance(self.seeds, bool) or self.seeds < 1:
            raise FewShotError(f"the number of seeds must be a whole number >= 1, got {self.seeds}", fix={"seeds": None})
        if not 0 < self.val_fraction < 1:
            raise FewShotError(f"the validation fraction must lie between 0 and 1, got {self.val_fraction}")


def shot_label(k: int | None) -> str:
    return "all" if k is None else str(k)


def sample_shots(labels: np.ndarray, k: int | None, seed: int) -> np.ndarray:
    """Sorted indices of k items per class (all of a class that has fewer), seeded; k None: every index."""
    labels = np.asarray(labels)
    if k is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    picked = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in np.unique(labels)]
    return np.sort(np.concatenate(picked))


def _best(values: dict[float, float]) -> float:
    return max(values, key=lambda t: values[t])  # first maximum in insertion order


def run_method(method: str, x: np.ndarray, y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
               class_emb: np.ndarray, *, num_classes: int, seed: int, config: FewShotConfig) -> dict:
    """One run on shots (x, y): the test top-1 and the hyper-parameters chosen without the test set."""
    ac = config.adapters
    tr, va = split_train_val(y, val_fraction=config.val_fraction, limit_per_class=None, seed=seed)
    validated = len(va) > 0 and len(np.unique(y[tr])) >= 2
    params: dict = {"validated": bool(validated)}
    if method == "zero-shot":
        logits = A.zero_shot_logits(test_x, class_emb)
        params = {}
    elif method == "probe":
        pc = replace(config.probe, seed=seed, val_fraction=config.val_fraction, progress=False)
        if validated:
            r = linear_probe(x, y, test_x, test_y, num_classes=num_classes, config=pc)
            return {"top1": r["top1"], "params": {**params, "C": r["best_C"]}}
        logits = fit_logits(x, y, test_x, c=config.default_c, num_classes=num_classes, config=pc)
        params["C"] = config.default_c
    elif method in CACHE_METHODS:
        alpha, beta = ac.default_alpha, ac.default_beta
        if validated:
            alpha, beta, _ = A.search_alpha_beta(x[va], y[va], class_emb, x[tr], A.one_hot(y[tr], num_classes), ac)
        keys = np.asarray(x, np.float64)
        if method == "tip-adapter-f":
            if validated:  # tune on the train part, then choose alpha and beta again with the tuned keys
                vals = A.one_hot(y[tr], num_classes)
                tuned = A.finetune_keys(np.asarray(x[tr], np.float64), x[tr], y[tr], class_emb, vals, alpha=alpha,
                                        beta=beta, config=ac)
                alpha, beta, _ = A.search_alpha_beta(x[va], y[va], class_emb, tuned, vals, ac)
            keys = A.finetune_keys(keys, x, y, class_emb, A.one_hot(y, num_classes), alpha=alpha, beta=beta,
                                   config=ac)
        logits = A.tip_logits(test_x, class_emb, keys, A.one_hot(y, num_classes), alpha=alpha, beta=beta)
        params.update(alpha=alpha, beta=beta)
    elif method == "zs-probe":
        t = ac.default_blend
        if validated:
            tuned = A.finetune_probe(x[tr], y[tr], class_emb, ac)
            t = _best({float(b): M.topk_accuracy(A.blend_logits(x[va], class_emb, tuned, float(b)), y[va], 1)
                       for b in ac.blends})
        logits = A.blend_logits(test_x, class_emb, A.finetune_probe(x, y, class_emb, ac), t)
        params["blend"] = t
    else:
        raise FewShotError(f"unknown method {method!r}")
    return {"top1": M.topk_accuracy(logits, test_y, 1), "params": params}


def run_fewshot(train_emb: np.ndarray, train_labels: np.ndarray, test_emb: np.ndarray, test_labels: np.ndarray,
                class_emb: np.ndarray, *, num_classes: int, config: FewShotConfig = FewShotConfig()) -> dict:
    """Every method x shots x seed; mean and std of top-1 per cell; the smallest k that beats zero-shot."""
    from tqdm import tqdm

    t0 = time.perf_counter()
    train_labels, test_labels = np.asarray(train_labels, np.int64), np.asarray(test_labels, np.int64)
    test_x = np.asarray(test_emb, np.float32)
    zs_top1 = M.topk_accuracy(A.zero_shot_logits(test_x, class_emb), test_labels, 1)
    plan = [(m, k, s) for k in config.shots for m in config.methods if m != "zero-shot"
            and not (k is None and m in CACHE_METHODS) for s in (range(config.seeds) if k is not None else (0,))]
    runs: dict[tuple[str, str], list] = {}
    for method, k, seed in tqdm(plan, desc="few-shot runs", unit="run", disable=not config.progress):
        idx = sample_shots(train_labels, k, seed)
        x, y = np.asarray(train_emb[idx], np.float32), train_labels[idx]
        r = run_method(method, x, y, test_x, test_labels, class_emb, num_classes=num_classes, seed=seed, config=config)
        runs.setdefault((method, shot_label(k)), []).append({"seed": seed, "num_shots": int(len(idx)), **r})
        log.info("%s k=%s seed %d: top-1 %.4f %s", method, shot_label(k), seed, r["top1"], r["params"])
    rows = []
    for (method, k), rs in runs.items():
        acc = np.array([r["top1"] for r in rs])
        rows.append({"method": method, "shots": k, "mean": float(acc.mean()), "std": float(acc.std()),
                     "seeds": len(rs), "runs": rs})
    labels = [shot_label(k) for k in config.shots]
    crossover = {}
    for method in config.methods:
        if method == "zero-shot":
            continue
        better = [r["shots"] for r in rows if r["method"] == method and r["mean"] > zs_top1]
        crossover[method] = min(better, key=labels.index) if better else None
    counts = np.bincount(train_labels, minlength=num_classes)
    return {"zero_shot": {"top1": zs_top1}, "rows": rows, "crossover": crossover, "shots": labels,
            "all_per_class": int(counts.max()) if len(counts) else 0, "seeds": config.seeds,
            "methods": list(config.methods), "val_fraction": config.val_fraction,
            "num_train": int(len(train_labels)), "num_test": int(len(test_labels)), "num_classes": num_classes,
            "published": list(PUBLISHED), "seconds": round(time.perf_counter() - t0, 3)}
