"""Evaluate a labelled index: zero-shot classification, class-prompt retrieval, case studies, low resolution.

Everything here is numpy in, numbers out: the stored image embeddings are compared with class text embeddings
(``textcache``), and the metrics are the pure functions of ``metrics``. :func:`evaluate_index` returns an
:class:`EvalReport`; ``report`` turns it into metrics.json, report.md and report.html.

Variants: every template set asked for x class-name style (``english``/``raw``) x ensembling order
(``normalize-first``/``average-first``) gets zero-shot top-1, top-5, mean per-class recall and the within-superclass
error share. The confusion matrices and the per-class retrieval metrics are computed for each template set with the
*primary* style and order (english, normalize-first when asked). Class retrieval and the case studies rank the
images through a vector index when one is given (``evaluate_index(..., index=...)``: a FAISS or Milvus backend), so
their numbers are that backend's; with none, or an exact one, they are the exact rankings. Zero-shot
classification compares each image with the classes, not a search of the index, and is always exact.

Zero-shot predictions break exact ties towards the higher class index, the rule of ``metrics.topk_accuracy`` (and
scikit-learn), so top-1 == mean(pred == label).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cliplens import metrics as M
from cliplens.errors import BackendError, CliplensError
from cliplens.manifest import Manifest
from cliplens.preprocess import INTERPOLATIONS, ClipPreprocessConfig, preprocess_batch
from cliplens.prompts import PromptError, classnames, load_templates, match_class
from cliplens.textcache import class_text_features

log = logging.getLogger(__name__)

ORDERS = ("normalize-first", "average-first")
STYLES = ("english", "raw")
GRID_SIZE = 16
# Published numbers for ViT-B/32 (OpenAI weights) on the CIFAR-100 test set, quoted, never measured here.
# "classnames": the class-name style each was run with, so the report puts it beside the matching row: CLIP_benchmark
# (and open_clip's table, made with it) build the classifier from the raw names ("aquarium_fish"); on identical
# weights and images cliplens's raw-names row reproduces CLIP_benchmark's predictions, the English row differs.
PUBLISHED = (
    {"metric": "zero-shot top-1", "value": 0.651, "source": "CLIP paper (Radford et al., 2021)", "classnames": "english"},
    {"metric": "zero-shot top-1", "value": 0.645, "classnames": "raw",
     "source": "CLIP_benchmark (18 templates; an fp16 run on the TFDS copy of CIFAR-100)"},
    {"metric": "zero-shot top-1", "value": 0.642, "source": "open_clip results table", "classnames": "raw"},
    {"metric": "linear probe top-1", "value": 0.80, "source": "CLIP_benchmark (about 80%)"},
)
PUBLISHED_MODELS = (("ViT-B-32", "openai"), ("ViT-B-32-quickgelu", "openai"))  # the anchors' model, as open_clip names it
FAR_BELOW = 0.10  # measured zero-shot this far below the published figure: probably not the official weights
PUBLISHED_MODEL = "ViT-B/32, OpenAI weights, CIFAR-100 test (10,000 images)"


class EvaluationError(CliplensError):
    """An index cannot be evaluated (no labels, bad options, unreadable case-study file)."""


@dataclass(frozen=True)
class CaseStudy:
    name: str  # class name as the index spells it (matched like `cliplens search` does)
    probes: tuple[str, ...]  # queries encoded as written; precision@100 for the class is reported


def load_case_studies(path: str | Path | None = None) -> tuple[CaseStudy, ...]:
    """The packaged case studies (tractor, tulip, seal, telephone), or those of a JSON file of the same form."""
    where = str(path) if path else "<built-in case_studies.json>"
    try:
        packaged = resources.files("cliplens").joinpath("data", "case_studies.json")
        text = Path(path).read_text("utf-8") if path else packaged.read_text("utf-8")
        entries = json.loads(text)["case_studies"]
        return tuple(CaseStudy(name=str(e["class"]), probes=tuple(str(p) for p in e.get("probes", ()))) for e in entries)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EvaluationError(f'{where}: not a case-study file ({type(exc).__name__}); expected {{"case_studies": '
                              '[{"class": "seal", "probes": ["a seal"]}]}') from None


@dataclass(frozen=True)
class EvalConfig:
    template_sets: tuple[str, ...] = ("single", "cifar100")  # built-in names or template files
    classname_styles: tuple[str, ...] = STYLES
    orders: tuple[str, ...] = ORDERS
    ks: tuple[int, ...] = (1, 5, 10, 100)
    case_studies: tuple[CaseStudy, ...] | None = None  # None: the packaged ones; () for none
    resolution_study: bool = False
    resolution_limit: int | None = None  # re-encode only the first N images
    batch_size: int = 64
    text_cache: bool = True
    text_cache_dir: Path | None = None
    progress: bool = False
    retrieval_depth: int | None = None  # through a backend: hits asked per class query (None: every item, exact AP)

    def __post_init__(self) -> None:
        for name, given, allowed in (("class-name style", self.classname_styles, STYLES),
                                     ("ensemble order", self.orders, ORDERS)):
            if not given or any(g not in allowed for g in given):
                raise EvaluationError(f"{name}s must be among {', '.join(allowed)}, got {', '.join(given) or 'none'}")
        if not self.template_sets:
            raise EvaluationError("no template sets asked for; name one or more, e.g. single cifar100",
                                  fix={"templates": "single cifar100"})
        if not self.ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in self.ks):
            raise EvaluationError(f"-k needs whole numbers >= 1, got {self.ks}")
        depth = self.retrieval_depth
        if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
            raise EvaluationError(f"the retrieval depth must be a whole number >= 1, got {depth!r}",
                                  fix={"retrieval_depth": None})


@dataclass(frozen=True)
class EvalReport:
    manifest: Manifest  # the index's manifest (model, source, stats, ...)
    class_names: tuple[str, ...]
    superclass_names: tuple[str, ...]
    fine_to_coarse: np.ndarray | None
    templates: dict  # template-set label -> list of template strings
    primary: dict  # {"templates", "classnames", "ensemble"}: the variant behind confusion/retrieval/case studies
    zero_shot: tuple  # one dict per variant
    per_template: dict  # template-set label -> confusion, per-class recall, retrieval (primary style/order)
    case_studies: tuple
    resolution: dict | None
    seconds: dict
    notes: tuple = field(default_factory=tuple)
    retrieval_index: dict = field(default_factory=lambda: {"backend": "exact", "depth": None})
    caption_retrieval: dict | None = None  # captioned indexes: text-to-image / image-to-text recall@k

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["manifest"] = self.manifest.to_json()
        out["published"] = {"model": PUBLISHED_MODEL, "anchors": list(PUBLISHED), "note": "quoted, not measured here"}
        return jsonable(out)


def jsonable(x):
    """numpy arrays/scalars -> lists/Python numbers, nan and inf -> None, recursively."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, (np.integer, np.bool_)):
        return x.item()
    if isinstance(x, (float, np.floating)):
        return float(x) if np.isfinite(x) else None
    return x


# ---------------------------------------------------------------------------- pure evaluations
def predict(logits: np.ndarray) -> np.ndarray:
    """argmax per row, exact ties to the higher class index (as metrics.topk_accuracy ranks them)."""
    return logits.shape[1] - 1 - np.argmax(logits[:, ::-1], axis=1)


def zero_shot(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray, fine_to_coarse: np.ndarray | None) -> dict:
    """Zero-shot classification of unit image rows by unit class rows: accuracies, predictions, error share."""
    logits = image_emb @ class_emb.T
    pred = predict(logits)
    c = class_emb.shape[0]
    return {
        "top1": M.topk_accuracy(logits, labels, 1),
        "top5": M.topk_accuracy(logits, labels, min(5, c)),
        "mean_per_class_recall": M.mean_per_class_recall(pred, labels, c),
        "within_superclass_error_share": (M.within_superclass_error_share(labels, pred, fine_to_coarse)
                                          if fine_to_coarse is not None else None),
        "pred": pred,
    }


def class_retrieval(class_emb: np.ndarray, image_emb: np.ndarray, labels: np.ndarray, ks: Sequence[int],
                    fine_to_coarse: np.ndarray | None, *, index=None, depth: int | None = None) -> dict:
    """Each class's prompt as a query over all images: per-class P@k, R-precision, AP; means; superclass FP shares.

    With ``index`` (a backend over these images), the rankings are that index's top ``depth`` hits per class
    (default: every item); items it does not return rank last, as not retrieved (see ``score_matrix``).
    """
    if index is None:
        scores = class_emb @ image_emb.T
    else:
        from cliplens.index.backends import score_matrix

        depth = depth or len(labels)
        try:
            scores = score_matrix(index, class_emb, len(labels), depth)
        except BackendError as exc:  # e.g. Milvus's limit on hits per query
            raise EvaluationError(f"{exc} (evaluate asked the backend for {depth} hits per class query: "
                                  "lower it with --retrieval-depth)") from None
    per = M.retrieval_metrics(scores, labels, ks)
    valid = per["num_relevant"] > 0  # classes absent from the index are not queries
    summary = {"mAP": float(np.nanmean(per["ap"])) if valid.any() else None,
               "mean_r_precision": float(np.nanmean(per["r_precision"])) if valid.any() else None,
               "classes_evaluated": int(valid.sum())}
    fp_share, fp_per_class = {}, {}
    for k in ks:
        summary[f"mean_precision@{k}"] = float(np.nanmean(per[f"precision@{k}"])) if valid.any() else None
        if fine_to_coarse is None or not valid.any():
            continue
        ranked = M.topk_indices(scores[valid], min(k, scores.shape[1]))
        qc = np.flatnonzero(valid)
        fp_share[k] = M.superclass_false_positive_share(ranked, qc, labels, fine_to_coarse)
        per_q = np.full(len(valid), np.nan)
        per_q[valid] = M.superclass_false_positive_share(ranked, qc, labels, fine_to_coarse, per_query=True)
        fp_per_class[k] = per_q
    return {"per_class": per, "summary": summary, "superclass_fp_share": fp_share,
            "superclass_fp_share_per_class": fp_per_class}


def top_confusions(cm: np.ndarray, labels: np.ndarray, pred: np.ndarray, f2c: np.ndarray | None, *, n: int = 10,
                   examples: int = 8) -> list[dict]:
    """The n most frequent (true, predicted) pairs off the diagonal, with the first ids of each as examples."""
    off = np.array(cm, copy=True)
    np.fill_diagonal(off, 0)
    out = []
    for q in np.argsort(-off, axis=None, kind="stable")[:n]:
        i, j = (int(v) for v in np.unravel_index(q, off.shape))
        if off[i, j] == 0:
            break
        ids = np.flatnonzero((labels == i) & (pred == j))[:examples]
        out.append({"true": i, "pred": j, "count": int(off[i, j]), "ids": ids,
                    "same_superclass": bool(f2c[i] == f2c[j]) if f2c is not None else None})
    return out


def _top_counts(values: np.ndarray, names: Sequence[str], f2c: np.ndarray | None, cls: int, n: int = 5) -> list[dict]:
    same = (lambda j: bool(f2c[j] == f2c[cls])) if f2c is not None else (lambda j: None)
    return [{"class": names[j], "count": cnt, "same_superclass": same(j)} for j, cnt in Counter(values.tolist()).most_common(n)]


def case_study(cs: CaseStudy, *, names: Sequence[str], single: np.ndarray, ensembled: np.ndarray, image_emb: np.ndarray,
               labels: np.ndarray, pred: np.ndarray, fine_to_coarse: np.ndarray | None, probe_emb: np.ndarray,
               rank: Callable[[np.ndarray, int], np.ndarray] | None = None) -> dict:
    """One class under the microscope: precision with single and ensembled prompts, confusions, probe queries.

    ``rank(query, k)`` returns the ids of the top ``k`` images (default: exact, over ``image_emb``); a backend may
    return fewer, and precision@k still divides by k.
    """
    c = match_class(cs.name, names)
    if c is None:
        return {"class": cs.name, "skipped": f"the index has no class named {cs.name!r}"}
    n = len(labels)
    k10, k100 = min(10, n), min(100, n)

    def ranked(query: np.ndarray, k: int) -> np.ndarray:
        return M.topk_indices(image_emb @ query, k) if rank is None else np.asarray(rank(query, k), np.int64)

    def precisions(query: np.ndarray) -> dict:
        top = labels[ranked(query, k100)] == c
        return {"precision@10": float(top[:k10].sum() / k10), "precision@100": float(top.sum() / k100)}

    top100 = ranked(ensembled[c], k100)
    grid = top100[:min(GRID_SIZE, n)]
    wrong = labels[top100][labels[top100] != c]
    f2c = fine_to_coarse
    probes = []
    for text, vec in zip(cs.probes, probe_emb):
        top = labels[ranked(vec, k100)]
        probes.append({"query": text, "precision@100": float(np.sum(top == c) / k100),
                       "precision@10": float(np.sum(top[:k10] == c) / k10),
                       "top_classes": _top_counts(top, names, f2c, c, 3)})
    return {
        "class": names[c], "class_index": int(c), "num_images": int(np.sum(labels == c)), "k10": k10, "k100": k100,
        "single": precisions(single[c]), "ensembled": precisions(ensembled[c]),
        "retrieval_confusions": _top_counts(wrong, names, f2c, c),  # wrong classes in the ensembled top-100
        "misclassified_as": _top_counts(pred[(labels == c) & (pred != c)], names, f2c, c),  # zero-shot
        "mistaken_for_it": _top_counts(labels[(pred == c) & (labels != c)], names, f2c, c),
        "probes": probes,
        "grid": {"ids": grid, "scores": (image_emb[grid] @ ensembled[c]), "match": labels[grid] == c,
                 "labels": [names[j] for j in labels[grid]]},
    }


def resolution_study(encoder, images: np.ndarray, labels: np.ndarray, class_emb: np.ndarray, *, batch_size: int = 64,
                     interpolations: Sequence[str] = ("bicubic", "bilinear", "nearest", "lanczos"),
                     progress: bool = False) -> dict:
    """Zero-shot top-1 when the small images are upscaled to the model's input with each interpolation."""
    from tqdm import tqdm

    base = getattr(encoder, "fast_config", None) or ClipPreprocessConfig(size=int(encoder.info.image_size))
    rows = []
    for interp in interpolations:
        if interp not in INTERPOLATIONS:
            raise EvaluationError(f"unknown interpolation {interp!r}; use {', '.join(INTERPOLATIONS)}")
        cfg = dataclasses.replace(base, interpolation=interp)
        t0, parts = time.perf_counter(), []
        for i in tqdm(range(0, len(images), batch_size), desc=f"re-encode {interp}", unit="batch", disable=not progress):
            parts.append(encoder.encode_pixels(preprocess_batch(np.ascontiguousarray(images[i:i + batch_size]), cfg)))
        logits = np.concatenate(parts) @ class_emb.T
        rows.append({"interpolation": interp, "top1": M.topk_accuracy(logits, labels, 1),
                     "seconds": round(time.perf_counter() - t0, 3)})
    return {"count": int(len(images)), "from_size": list(images.shape[1:3]), "to_size": base.size, "rows": rows}


# ---------------------------------------------------------------------------- the whole evaluation
def _labels_of(spec: str) -> str:
    return spec if spec in ("single", "cifar100", "imagenet80") else Path(spec).name


def _backend_ranker(index, n: int):
    """``rank(query, k)`` through a backend: the ids it returns for one query (its -1 padding dropped)."""
    def rank(query: np.ndarray, k: int) -> np.ndarray:
        ids = index.search(np.asarray(query, np.float32)[None], min(int(k), n))[1][0]
        return ids[ids >= 0]

    return rank


def evaluate_index(store, encoder, config: EvalConfig = EvalConfig(), *, index=None,
                   index_label: str | None = None) -> EvalReport:
    """Run every evaluation of ``config`` on a labelled :class:`~cliplens.store.IndexStore`.

    ``index``: a vector index backend over ``store`` (``cliplens.index.open_index``) through which class retrieval
    and the case studies rank the images, ``config.retrieval_depth`` hits per query; ``index_label`` names it in
    the report. None: the exact rankings.
    """
    if not store.has_labels:
        raise EvaluationError(f"index at {store.root} has no labels: evaluate needs a labelled index (cifar100, cifar10)")
    store.check_model(encoder.info)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    emb = np.asarray(store.embeddings, dtype=np.float32)
    labels, names = store.labels, store.class_names
    f2c = store.fine_to_coarse
    if f2c is not None and (len(f2c) != len(names) or f2c.min() < 0):
        log.warning("fine_to_coarse is incomplete: superclass metrics skipped")
        f2c = None
    sup = store.superclass_names if f2c is not None else ()
    style = "english" if "english" in config.classname_styles else config.classname_styles[0]
    order = "normalize-first" if "normalize-first" in config.orders else config.orders[0]
    labelled = {_labels_of(s): s for s in config.template_sets}
    if len(labelled) != len(config.template_sets):
        raise EvaluationError(f"template sets must have distinct names, got {', '.join(config.template_sets)}")
    primary_set = next((t for t in labelled if t != "single"), next(iter(labelled)))
    ens_set = primary_set if primary_set != "single" else "cifar100"
    specs = {**labelled, "single": "single", ens_set: labelled.get(ens_set, ens_set)}
    try:
        templates = {lab: load_templates(spec) for lab, spec in specs.items()}
    except PromptError as exc:
        raise EvaluationError(str(exc)) from None
    feats = {}
    for lab in specs:
        for st in (set(config.classname_styles) | {style}) if lab in labelled else {style}:
            feats[lab, st] = class_text_features(encoder, classnames(names, st), templates[lab], cache=config.text_cache,
                                                 cache_dir=config.text_cache_dir, progress=config.progress)
    times["text_features"] = time.perf_counter() - t0
    notes = []
    if not all(f.raw for f in feats.values()):
        notes.append("the encoder gives only unit text vectors, so average-first equals normalize-first")
    depth = min(config.retrieval_depth or len(labels), len(labels))
    rank = _backend_ranker(index, len(labels)) if index is not None else None
    label = (index_label or type(index).__name__) if index is not None else "exact"
    if index is not None:
        notes.append(f"class retrieval and case studies ranked by {label}: top {depth} of {len(labels)} images per "
                     "query" + ("" if depth == len(labels) else "; images beyond that count as not retrieved"))

    t1 = time.perf_counter()
    rows, per_template, preds = [], {}, {}
    for lab in labelled:
        for st in config.classname_styles:
            for od in config.orders:
                zs = zero_shot(emb, feats[lab, st].classifier(od), labels, f2c)
                pred = zs.pop("pred")
                rows.append({"templates": lab, "num_templates": len(templates[lab]), "classnames": st, "ensemble": od, **zs})
                if st == style and od == order:
                    preds[lab] = pred
        cm = M.confusion_matrix(labels, preds[lab], len(names))
        per_template[lab] = {
            "confusion": cm,
            "top_confusions": top_confusions(cm, labels, preds[lab], f2c),
            "superclass_confusion": M.coarse_confusion(cm, f2c, len(sup)) if f2c is not None else None,
            "per_class_recall": M.per_class_recall(preds[lab], labels, len(names)),
            "retrieval": class_retrieval(feats[lab, style].classifier(order), emb, labels, config.ks, f2c,
                                         index=index, depth=depth),
        }
    times["zero_shot_and_retrieval"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    studies = load_case_studies() if config.case_studies is None else config.case_studies
    single_emb, ens_emb = feats["single", style].classifier(order), feats[ens_set, style].classifier(order)
    ens_pred = preds.get(ens_set, predict(emb @ ens_emb.T))
    cases = []
    for cs in studies:
        wanted = cs.probes and match_class(cs.name, names) is not None
        probe_emb = encoder.encode_texts(list(cs.probes)) if wanted else np.zeros((0, emb.shape[1]), np.float32)
        cases.append(case_study(cs, names=names, single=single_emb, ensembled=ens_emb, image_emb=emb, labels=labels,
                                pred=ens_pred, fine_to_coarse=f2c, probe_emb=probe_emb, rank=rank))
    times["case_studies"] = time.perf_counter() - t2

    resolution = None
    if config.resolution_study:
        images = store.images()
        if images is None:
            raise EvaluationError("this index stores no thumbnails, so the resolution study has nothing to re-encode: "
                                  "leave it out")
        n = len(images) if config.resolution_limit is None else min(config.resolution_limit, len(images))
        t3 = time.perf_counter()
        resolution = resolution_study(encoder, images[:n], labels[:n], ens_emb, batch_size=config.batch_size,
                                      progress=config.progress)
        resolution["templates"] = ens_set
        resolution["stored_top1"] = M.topk_accuracy(emb[:n] @ ens_emb.T, labels[:n], 1)
        times["resolution_study"] = time.perf_counter() - t3

    return EvalReport(
        manifest=store.manifest, class_names=tuple(names), superclass_names=tuple(sup), fine_to_coarse=f2c,
        templates={lab: list(t) for lab, t in templates.items()},
        primary={"templates": primary_set, "classnames": style, "ensemble": order, "case_study_ensemble": ens_set},
        zero_shot=tuple(rows), per_template=per_template, case_studies=tuple(cases), resolution=resolution,
        seconds={k: round(v, 3) for k, v in times.items()}, notes=tuple(notes),
        retrieval_index={"backend": label, "depth": depth if index is not None else None},
    )
