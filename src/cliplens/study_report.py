"""Report sections and figures for the studies beyond ``evaluate``: few-shot, suspects, map, compare, calibration.

Each ``*_sections`` function turns a study's result dict into :class:`~cliplens.report_html.Section`s that
``report.write_document`` renders as Markdown and HTML; published figures are always labelled as published.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from cliplens.prompts import english_classname
from cliplens.report import pct
from cliplens.report_html import MEASURED, PUBLISHED, Figure, Section, Table, _new, _png, grid_png

COLOURS = {"probe": "#1f6fb2", "tip-adapter": "#d9822b", "tip-adapter-f": "#b5471b", "zs-probe": "#2a9d57"}


def _x(shot: str, all_per_class: int) -> float:
    return float(all_per_class if shot == "all" else int(shot))


def plot_fewshot(result: dict) -> bytes:
    """Top-1 vs shots per class (log x), mean with a +-std band per method, zero-shot as a line."""
    fig = _new(7.5, 4.8)
    ax = fig.add_subplot()
    numeric = [int(s) for s in result["shots"] if s != "all"]
    # "all" sits at its images per class, or right of the largest k when the train set has fewer per class
    n_all = max(result["all_per_class"], 2 * max(numeric, default=1) if result["all_per_class"] <= max(numeric, default=0)
                else 1)
    for method in result["methods"]:
        rows = sorted((r for r in result["rows"] if r["method"] == method), key=lambda r: _x(r["shots"], n_all))
        if not rows:
            continue
        xs = np.array([_x(r["shots"], n_all) for r in rows])
        mean, std = np.array([r["mean"] for r in rows]), np.array([r["std"] for r in rows])
        ax.plot(xs, mean, marker="o", label=method, color=COLOURS.get(method))
        ax.fill_between(xs, mean - std, mean + std, alpha=0.15, color=COLOURS.get(method))
    ax.axhline(result["zero_shot"]["top1"], color="black", linestyle="--", label="zero-shot (measured)")
    ax.axvline(4, color=PUBLISHED, linestyle=":", label="published: zero-shot ~ 4-shot probe (CLIP paper)")
    ax.set_xscale("log", base=2)
    ticks = sorted({_x(s, n_all) for s in result["shots"]})
    ax.set_xticks(ticks, [(f"all\n({result['all_per_class']}/class)" if t == n_all and "all" in result["shots"]
                           else f"{t:g}") for t in ticks])
    ax.set_xlabel("labelled images per class (log scale)", fontsize=10)
    ax.set_ylabel("test top-1 accuracy", fontsize=10)
    ax.tick_params(labelsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("few-shot adaptation vs zero-shot", fontsize=11)
    return _png(fig)


def fewshot_table(result: dict) -> Table:
    cells = {(r["method"], r["shots"]): r for r in result["rows"]}
    rows = [("zero-shot", *([pct(result["zero_shot"]["top1"])] * len(result["shots"])), "-")]
    for m in result["methods"]:
        if m == "zero-shot":
            continue
        vals = [f"{pct(cells[m, s]['mean'])} ± {100 * cells[m, s]['std']:.1f}" if (m, s) in cells else "not run"
                for s in result["shots"]]
        rows.append((m, *vals, result["crossover"].get(m) or "never"))
    return Table(("method", *(f"{s} shot{'s' if s != '1' else ''}" for s in result["shots"]), "beats zero-shot from"),
                 tuple(rows))


def fewshot_sections(result: dict, header: str) -> list[Section]:
    pub = Table(("published (not measured here)", "source"), tuple((f"published: {p['claim']}", p["source"])
                                                                   for p in result["published"]))
    return [Section("Few-shot adaptation", (
        header, f"Top-1 on {result['num_test']} test images, mean ± std over {result['seeds']} seeds (k = all: one "
        "run, nothing is sampled). Shots and hyper-parameters come from the train index only; Tip-Adapter runs only "
        "for numbers of shots.", fewshot_table(result), pub,
        Figure("fewshot", "Test top-1 against labelled images per class (log scale); band: ± one std over seeds.",
               plot_fewshot(result))))]


def _names(names: Sequence[str]) -> list[str]:
    return [english_classname(n) for n in names]


def suspects_sections(result: dict, header: str, images: np.ndarray | None, top: int) -> list[Section]:
    sus = result["suspects"][:top]
    blocks: list = [header, result["score_note"],
                    Table(("rank", "id", "label", "CLIP suggests", "self-confidence", "zero-shot says", "neighbours say"),
                          tuple((str(i + 1), str(s["id"]), s["label"], s["suggested"], f"{s['self_confidence']:.3f}",
                                 s["zero_shot"], s["neighbours"]) for i, s in enumerate(sus)))]
    if images is not None and sus:
        ids = [s["id"] for s in sus[:32]]
        caps = [f"{s['label']} -> {s['suggested']}\n#{s['id']} {s['self_confidence']:.2f}" for s in sus[:32]]
        blocks.append(Figure("suspects", "Top suspects: the given label, then the label CLIP suggests.",
                             grid_png([images[i] for i in ids], caps, [False] * len(ids), "suspect labels")))
    if result.get("reference"):
        r = result["reference"]
        blocks.append(f"Against the reference list ({r['count']} known-bad ids): precision@N "
                      + ", ".join(f"@{n} {pct(v)}" for n, v in r["precision"].items()) + ".")
    blocks.append(Table(("published (not measured here)", "source"),
                        tuple((f"published: {p['claim']}", p["source"]) for p in result["published"])))
    out = [Section("Labels worth a second look", tuple(blocks))]
    dup = result.get("duplicates")
    if dup:
        rows = tuple((str(p["test_id"]), str(p["train_id"]), f"{p['cosine']:.4f}") for p in dup["pairs"][:50])
        out.append(Section("Near-duplicates between train and test", (
            f"{dup['count']} test images ({pct(dup['share'])}) have a train image at cosine >= {dup['threshold']:.4f} "
            f"({dup['threshold_from']}).", Table(("test id", "train id", "cosine"), rows))))
    return out


def map_section(png: bytes, header: str, method: str, kind: str) -> Section:
    return Section("Embedding map", (header, Figure(f"map_{method}", f"{method.upper()} projection of the image "
                                                    f"embeddings, coloured by {kind}; names at each group's median.",
                                                    png)))


def plot_pr(curve: dict, threshold: float | None, target: float) -> bytes:
    fig = _new(6.5, 4.2)
    ax = fig.add_subplot()
    ax.plot(curve["threshold"], curve["precision"], color=MEASURED, label="precision")
    ax.plot(curve["threshold"], curve["recall"], color="#2a9d57", label="recall")
    ax.axhline(target, color=PUBLISHED, linestyle=":", label=f"target precision {target:g}")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"calibrated cut {threshold:.4f}")
    ax.set_xlabel("cosine score of the class-name query", fontsize=10)
    ax.set_ylabel("share of hits above the score", fontsize=10)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, frameon=False)
    ax.set_title("precision and recall of class-name queries", fontsize=11)
    return _png(fig)


def calibration_sections(result: dict, header: str, template: str) -> list[Section]:
    t = result["threshold"]
    line = (f"Calibrated threshold for template '{template}': cosine >= {t:.4f} gives precision "
            f"{pct(result['precision'])} at recall {pct(result['recall'])} over {result['queries']} class queries "
            f"x {result['items']} images." if t is not None else
            f"No threshold reaches precision {result['target_precision']:g} with template '{template}'.")
    return [Section("Calibrated relevance threshold", (header, line, Figure(
        "calibration", "Pooled precision and recall of class-name queries above each cosine score.",
        plot_pr(result["curve"], t, result["target_precision"]))))]


def compare_sections(result: dict, images: np.ndarray | None) -> list[Section]:
    models = result["models"]
    head = ("model", "zero-shot top-1", "top-5", "mAP", *(f"{c} P@10" for c in result["case_names"]),
            "few-shot: probe beats zero-shot from", "published zero-shot top-1")
    rows = tuple((m["label"], pct(m["top1"]), pct(m["top5"]), pct(m["mAP"]),
                  *(pct(m["case_p10"].get(c)) for c in result["case_names"]),
                  (m.get("crossover") or {}).get("probe") or ("-" if m.get("crossover") is None else "never"),
                  ", ".join(f"published: {pct(p['value'])} ({p['source']})" for p in m["published"]) or "-")
                 for m in models)
    blocks: list = [f"{result['count']} images of {result['source']}; every number measured here unless labelled "
                    "published.", Table(head, rows)]
    out = [Section("Models side by side", tuple(blocks))]
    for q in result["queries"]:
        qb: list = [Table(("rank", *(m["label"] for m in models)),
                          tuple((str(r + 1), *(f"#{h['id']} {h['label'] or ''} {h['score']:.3f}"
                                               + {True: " ✓", False: " ✗", None: ""}[h["match"]]
                                               for h in (q["hits"][j][r] for j in range(len(models)))))
                                for r in range(min(len(h) for h in q["hits"]))))]
        if images is not None:
            for j, m in enumerate(models):
                hits = q["hits"][j]
                qb.append(Figure(f"compare_{re.sub(r'[^A-Za-z0-9]', '_', q['query'])}_{j}",
                                 f"'{q['query']}': top {len(hits)} with {m['label']}.",
                                 grid_png([images[h["id"]] for h in hits], [f"{h['label'] or ''}\n{h['score']:.3f}"
                                          for h in hits], [h["match"] for h in hits], m["label"])))
        out.append(Section(f"Query '{q['query']}'", tuple(qb), level=3))
    return out
