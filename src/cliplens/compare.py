"""Models side by side: indexes of the same images built with different models, one table and the same queries.

Each index is evaluated by ``evaluate.evaluate_index`` (zero-shot top-1/top-5 of the primary variant, class-prompt
mAP, the case studies' precision@10), optionally run through the few-shot study with a train index of the same
model (the smallest k at which each method beats zero-shot), and asked the same queries through ``Searcher``.
Published anchors come from open_clip's results table (docs/openclip_results.csv, CIFAR-100 column, zero-shot)
and, for ViT-B/32 openai, the CLIP paper and CLIP_benchmark; they are quoted, never measured here.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np

from cliplens.errors import CliplensError

log = logging.getLogger(__name__)

# (open_clip model name, pretrained tag) -> CIFAR-100 zero-shot top-1 as published in open_clip's results table
OPENCLIP_CIFAR100 = {
    ("ViT-B-32", "openai"): 0.6423, ("ViT-B-32-quickgelu", "openai"): 0.6423,
    ("ViT-B-16", "openai"): 0.6695, ("ViT-L-14", "openai"): 0.7582,
    ("ViT-B-32", "laion400m_e32"): 0.6773, ("ViT-B-32-quickgelu", "laion400m_e32"): 0.7029,
    ("ViT-B-16", "laion400m_e32"): 0.7116,
    ("ViT-B-32", "laion2b_s34b_b79k"): 0.7555, ("ViT-B-16", "laion2b_s34b_b88k"): 0.7684,
    ("ViT-L-14", "laion2b_s32b_b82k"): 0.8332,
    ("ViT-B-32", "datacomp_xl_s13b_b90k"): 0.8031, ("ViT-B-16", "datacomp_xl_s13b_b90k"): 0.8212,
}


class CompareError(CliplensError):
    """The indexes cannot be compared (different images or labels, fewer than two, no labels)."""


def published_for(model, source: str | None) -> list[dict]:
    """Published CIFAR-100 zero-shot anchors for this model (none for other data sets)."""
    if source != "cifar100":
        return []
    key = (model.name, model.pretrained)  # a ModelInfo
    out = []
    if key[1] == "openai" and key[0] in ("ViT-B-32", "ViT-B-32-quickgelu"):
        out += [{"value": 0.651, "source": "CLIP paper"}, {"value": 0.645, "source": "CLIP_benchmark"}]
    if key in OPENCLIP_CIFAR100:
        out.append({"value": OPENCLIP_CIFAR100[key], "source": "open_clip results table"})
    return out


def check_same_source(stores: Sequence) -> None:
    if len(stores) < 2:
        raise CompareError("compare needs at least two indexes: name each index folder", fix={"index_dir": None})
    first = stores[0]
    for s in stores:
        if not s.has_labels:
            raise CompareError(f"{s.root} has no labels: compare reports labelled metrics, so every index needs labels "
                               "(index the same labelled data set with each model)")
        if len(s) != len(first) or s.class_names != first.class_names or not np.array_equal(s.labels, first.labels):
            raise CompareError(f"{s.root} and {first.root} do not hold the same labelled images ({len(s)} vs "
                               f"{len(first)} items): build each index from the same source and split")


def model_row(store, report, *, crossover: dict | None) -> dict:
    """One model's line of the table, from its EvalReport (primary variant)."""
    prim = report.primary
    z = next(r for r in report.zero_shot if (r["templates"], r["classnames"], r["ensemble"])
             == (prim["templates"], prim["classnames"], prim["ensemble"]))
    retrieval = report.per_template[prim["templates"]]["retrieval"]["summary"]
    case_p10 = {c["class"]: c["ensembled"]["precision@10"] for c in report.case_studies if "skipped" not in c}
    m, src = store.manifest.model, store.manifest.source
    return {"index": str(store.root), "label": m.short_label(), "model": m.to_json(), "top1": z["top1"], "top5": z["top5"],
            "mAP": retrieval["mAP"], "templates": prim["templates"], "case_p10": case_p10, "crossover": crossover,
            "published": published_for(m, src.name if src else None)}


def side_by_side(searchers: Sequence, queries: Sequence[str], k: int = 10) -> list[dict]:
    """Each query's top k from every model: {"query", "hits": [[hit json, ...] per model]}."""
    out = []
    for q in queries:
        hits = []
        for s in searchers:
            r = s.search(q, min(k, len(s.store)))
            hits.append([h.to_json() for h in r.hits])
        out.append({"query": q, "hits": hits})
    return out


def compare_result(stores: Sequence, rows: list[dict], queries: list[dict]) -> dict:
    names = []
    for r in rows:
        names += [c for c in r["case_p10"] if c not in names]
    src = stores[0].manifest.source
    return {"count": len(stores[0]), "source": f"{src.name if src else '?'} {(src.split if src else None) or ''}".strip(),
            "models": rows, "case_names": names, "queries": queries}
