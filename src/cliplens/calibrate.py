"""A relevance cut you can trust: the cosine above which class-name queries' hits reach a target precision.

From a labelled index, every class's prompt (by default ``a photo of a {}.``, what ``cliplens search`` encodes)
is scored against every image. All (class query, image) pairs are pooled and sorted by score; at each distinct
score t, precision(t) = relevant pairs scoring >= t / all pairs scoring >= t, and recall(t) = relevant pairs
scoring >= t / all relevant pairs (each image is relevant to its own class's query). The calibrated threshold is
the **lowest** t with precision(t) >= the target (default 0.9): the most recall at that precision.

The result is recorded per model (keyed by the weights' sha256) and prompt template in
``$CLIPLENS_HOME/calibration/<sha256>.json``, so ``search --min-score calibrated`` and the page can use it for any
index built with the same weights. A model without a weights sha256 (random weights) cannot be recorded.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from cliplens._files import cliplens_home, write_json_atomic
from cliplens.errors import CliplensError
from cliplens.manifest import ModelInfo

log = logging.getLogger(__name__)

DEFAULT_TARGET = 0.9
CURVE_POINTS = 200  # the stored precision/recall curve, thinned to this many points


class CalibrationError(CliplensError):
    """No calibration exists for a model, or one cannot be made or read."""


def pr_curve(scores: np.ndarray, relevant: np.ndarray) -> dict:
    """Pooled precision and recall at every distinct score (descending): arrays ``threshold``, ``precision``, ``recall``."""
    s = np.asarray(scores, np.float64).ravel()
    rel = np.asarray(relevant, bool).ravel()
    order = np.argsort(-s, kind="stable")
    s, rel = s[order], rel[order]
    tp = np.cumsum(rel)
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # the last pair of each tie group
    total = max(int(rel.sum()), 1)
    return {"threshold": s[last], "precision": tp[last] / (last + 1), "recall": tp[last] / total}


def check_target(target: float) -> None:
    if not 0 < target <= 1:
        raise CalibrationError(f"the target precision must lie in (0, 1], got {target}")


def calibrate(emb: np.ndarray, labels: np.ndarray, class_emb: np.ndarray, *, target: float = DEFAULT_TARGET) -> dict:
    """The threshold, its precision and recall, and a thinned curve (see the module docstring)."""
    check_target(target)
    labels = np.asarray(labels, np.int64)
    scores = np.asarray(class_emb, np.float32) @ np.asarray(emb, np.float32).T  # (C, N)
    relevant = np.arange(len(class_emb))[:, None] == labels[None, :]
    curve = pr_curve(scores, relevant)
    ok = np.flatnonzero(curve["precision"] >= target)
    pick = int(ok[-1]) if len(ok) else None  # thresholds descend: the last index that qualifies is the lowest t
    step = max(1, len(curve["threshold"]) // CURVE_POINTS)
    thin = np.unique(np.r_[np.arange(0, len(curve["threshold"]), step), [pick] if pick is not None else []]).astype(int)
    return {"target_precision": target,
            "threshold": float(curve["threshold"][pick]) if pick is not None else None,
            "precision": float(curve["precision"][pick]) if pick is not None else None,
            "recall": float(curve["recall"][pick]) if pick is not None else None,
            "pairs": int(scores.size), "queries": int(len(class_emb)), "items": int(len(labels)),
            "curve": {k: np.round(v[thin], 6).tolist() for k, v in curve.items()}}


def calibration_dir() -> Path:
    return cliplens_home() / "calibration"


def _path(weights_sha256: str | None, model_name: str) -> Path:
    if not weights_sha256:
        raise CalibrationError(f"model {model_name} has no weights sha256 (random weights?): a calibration could not "
                               "be matched to it later, so none is recorded")
    return calibration_dir() / f"{weights_sha256}.json"


def record(model: ModelInfo, template: str, result: dict, *, index: str) -> Path:
    """Store ``result`` for (model weights, template); other templates' entries in the file are kept."""
    path = _path(model.weights_sha256, model.name)
    data = _load(path) or {"model": model.name, "pretrained": model.pretrained,
                           "weights_sha256": model.weights_sha256, "templates": {}}
    data["templates"][template] = {**result, "index": index,
                                   "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(path, data)
    return path


def _load(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path} is unreadable ({type(exc).__name__}): run `cliplens calibrate` again") from None
    if not isinstance(data, dict) or not isinstance(data.get("templates"), dict):
        raise CalibrationError(f"{path} is not a cliplens calibration: run `cliplens calibrate` again")
    return data


def lookup(model: ModelInfo, template: str) -> dict:
    """The calibration for these weights and this template, or CalibrationError saying how to make one."""
    path = _path(model.weights_sha256, model.name)
    data = _load(path)
    entry = (data or {}).get("templates", {}).get(template)
    if entry is None or entry.get("threshold") is None:
        have = ", ".join(repr(t) for t in (data or {}).get("templates", {})) or "none"
        raise CalibrationError(f"no calibrated threshold for {model.name} with template {template!r} "
                               f"(calibrated: {have}): run `cliplens calibrate --index-dir LABELLED_INDEX "
                               f"--template {template!r}`")
    return entry
