"""The evaluation report: metrics.json (every number), report.md (tables + linked figures), report.html (one file).

One document (sections of paragraphs, tables and figures) is built from an :class:`~cliplens.evaluate.EvalReport`
and rendered twice, so the Markdown and the HTML never disagree. Published anchors are always labelled as
published and sit beside, never among, the numbers measured here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from cliplens._files import write_bytes_atomic
from cliplens.evaluate import FAR_BELOW, PUBLISHED, PUBLISHED_MODEL, PUBLISHED_MODELS, EvalReport
from cliplens.prompts import english_classname
from cliplens.report_html import Figure, Section, Table, grid_png, plot_confusion, plot_per_class_ap, \
    plot_template_comparison, render_html

TITLE = "cliplens evaluation"


def pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{100 * float(x):.1f}%"


def dumps(obj, indent: int = 2, _level: int = 0) -> str:
    """JSON with lists of plain numbers kept on one line (a 100x100 confusion matrix stays 100 lines)."""
    pad, inner = " " * indent * _level, " " * indent * (_level + 1)
    if isinstance(obj, dict) and obj:
        items = [f"{inner}{json.dumps(str(k))}: {dumps(v, indent, _level + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        return "[\n" + ",\n".join(inner + dumps(v, indent, _level + 1) for v in obj) + "\n" + pad + "]"
    return json.dumps(obj)


def _model_line(manifest) -> str:
    m, src = manifest.model, manifest.source
    sha = m.weights_sha256 or "none (random weights)"
    return (f"Index: {src.name if src else '?'} {(src.split if src else None) or ''} ({manifest.count} images). "
            f"Model: {m.short_label()}, weights sha256 {sha}. "
            f"Every number below was measured here with these weights, except those labelled published.")


def _en(name: str) -> str:
    return english_classname(name)


def _is_published_model(manifest) -> bool:
    m, src = manifest.model, manifest.source
    return (m.name, m.pretrained) in PUBLISHED_MODELS and src is not None and src.name == "cifar100"


def _published_beside(z: dict, manifest) -> str:
    """The anchors run like this row (18 CIFAR-100 templates, same class-name style), for the anchors' model only."""
    if not _is_published_model(manifest) or z["templates"] != "cifar100" or z["ensemble"] != "normalize-first":
        return "-"
    return "; ".join(f"published: {pct(p['value'])} {p['source'].split(' (')[0]}" for p in PUBLISHED
                     if p["metric"] == "zero-shot top-1" and p.get("classnames") == z["classnames"]) or "-"


def weights_warning(r: EvalReport) -> str | None:
    """A warning when zero-shot is far below the published figure for the same model name (other weights?)."""
    if not _is_published_model(r.manifest) or not r.zero_shot:
        return None
    best = max(z["top1"] for z in r.zero_shot)
    anchor = min(p["value"] for p in PUBLISHED if p["metric"] == "zero-shot top-1")
    if best >= anchor - FAR_BELOW:
        return None
    sha = (r.manifest.model.weights_sha256 or "none")[:12]
    return (f"Warning: the best zero-shot top-1 measured here ({pct(best)}) is far below the published {pct(anchor)}"
            f"-{pct(max(p['value'] for p in PUBLISHED if p['metric'] == 'zero-shot top-1'))} for "
            f"{r.manifest.model.name}/{r.manifest.model.pretrained}: these are probably not the official "
            f"weights (sha256 {sha}), or the images are not the CIFAR-100 test set.")


def _zero_shot(r: EvalReport, classes: int, images: np.ndarray | None = None) -> Section:
    rows = tuple((z["templates"], str(z["num_templates"]), z["classnames"], z["ensemble"], pct(z["top1"]), pct(z["top5"]),
                  pct(z["mean_per_class_recall"]), pct(z["within_superclass_error_share"]),
                  _published_beside(z, r.manifest)) for z in r.zero_shot)
    table = Table(("templates", "T", "class names", "ensembling", "top-1", "top-5", "mean per-class recall",
                   "errors inside true superclass", "published, same setup"), rows)
    published = Table(("published (not measured here)", "value", "source"),
                      tuple((f"published: {p['metric']}", pct(p["value"]), p["source"]) for p in PUBLISHED))
    blocks: list = [f"{r.manifest.count} images, {classes} classes; chance top-1 is "
                    f"{pct(1 / classes)}.", table,
                    "Published figures sit beside the row run the same way: CLIP_benchmark and open_clip's table "
                    "build the classifier from the raw class names (aquarium_fish), the CLIP paper from English ones. "
                    "CLIP_benchmark's 64.5% is an fp16 run on the TFDS copy of CIFAR-100.",
                    f"Published anchors, for {PUBLISHED_MODEL}; compare only when the model above is that one.", published,
                    Figure("template_comparison", "Zero-shot top-1 per template set, class-name style and ensembling "
                           "order (blue, measured) beside the published anchors (grey, hatched).",
                           plot_template_comparison(r.zero_shot, PUBLISHED, "zero-shot top-1"))]
    p = r.per_template[r.primary["templates"]]
    cm = np.asarray(p["confusion"])
    pairs = p.get("top_confusions") or []
    rows = tuple((_en(r.class_names[c["true"]]), _en(r.class_names[c["pred"]]), str(c["count"]),
                  {True: "yes", False: "no", None: "n/a"}[c["same_superclass"]]) for c in pairs)
    blocks += [f"Most frequent confusions ({r.primary['templates']}, {r.primary['classnames']} names, "
               f"{r.primary['ensemble']}); the full {len(cm)}x{len(cm)} matrix is in metrics.json.",
               Table(("true class", "predicted as", "images", "same superclass"), rows)]
    if images is not None:
        for c in pairs:
            ids = [int(i) for i in c["ids"]]
            t, q = _en(r.class_names[c["true"]]), _en(r.class_names[c["pred"]])
            blocks.append(Figure(f"confusion_{c['true']}_{c['pred']}", f"{t} predicted as {q}: {len(ids)} of "
                                 f"{c['count']} images.", grid_png([images[i] for i in ids], [f"{t}\n#{i}" for i in ids],
                                                                   [False] * len(ids), f"{t} -> {q}")))
    if p["superclass_confusion"] is not None:
        blocks.append(Figure("superclass_confusion", "Superclass confusion (rows: true superclass; colour: share of "
                             "its images; numbers: counts).",
                             plot_confusion(np.asarray(p["superclass_confusion"]), r.superclass_names,
                                            f"superclass confusion, {r.primary['templates']} templates")))
    return Section("Zero-shot classification", tuple(blocks))


def _retrieval(r: EvalReport, ks: Sequence[int]) -> Section:
    rows = []
    for lab, p in r.per_template.items():
        s, fp = p["retrieval"]["summary"], p["retrieval"]["superclass_fp_share"]
        rows.append((lab, pct(s["mAP"]), pct(s["mean_r_precision"]), *(pct(s[f"mean_precision@{k}"]) for k in ks),
                     *(pct(fp.get(k)) for k in ks)))
    head = ("templates", "mAP", "mean R-precision", *(f"P@{k}" for k in ks), *(f"FP same superclass @{k}" for k in ks))
    lab = r.primary["templates"]
    per = r.per_template[lab]["retrieval"]["per_class"]
    recall = r.per_template[lab]["per_class_recall"]
    ap = np.asarray(per["ap"], dtype=float)
    ok = np.flatnonzero(~np.isnan(ap))
    order = ok[np.argsort(-ap[ok], kind="stable")]
    f2c, sup = r.fine_to_coarse, r.superclass_names

    def cls_rows(idx, full: bool = False) -> tuple:
        return tuple((*((str(n + 1),) if full else ()), _en(r.class_names[i]),
                      *((_en(sup[f2c[i]]) if f2c is not None else "-",) if full else ()),
                      pct(ap[i]), pct(per["r_precision"][i]), *(pct(per[f"precision@{k}"][i]) for k in ks),
                      *((pct(recall[i]),) if full else ())) for n, i in enumerate(idx))

    cls_head = ("class", "AP", "R-precision", *(f"P@{k}" for k in ks))
    full_head = ("rank", "class", "superclass", "AP", "R-precision", *(f"P@{k}" for k in ks), "zero-shot recall")
    return Section("Retrieval with class prompts", (
        f"Each class's ensembled prompt is a query over all images (classes evaluated: "
        f"{r.per_template[lab]['retrieval']['summary']['classes_evaluated']}). FP same superclass: the share of the "
        "wrong images in the top k that belong to the query's own superclass.",
        Table(head, tuple(rows)),
        Figure("per_class_ap", f"Average precision per class ({lab} templates), best first, coloured by superclass.",
               plot_per_class_ap(ap, r.class_names, r.fine_to_coarse, r.superclass_names, f"per-class AP, {lab}")),
        "Best classes:", Table(cls_head, cls_rows(order[:5])), "Worst classes:", Table(cls_head, cls_rows(order[::-1][:5])),
        f"Every class, by AP ({lab} templates):", Table(full_head, cls_rows(order, full=True)),
    ))


def _counts(rows: list[dict]) -> str:
    return ", ".join(f"{_en(c['class'])} x{c['count']}" + (" (same superclass)" if c.get("same_superclass") else "")
                     for c in rows) or "none"


def _cases(r: EvalReport, images: np.ndarray | None) -> list[Section]:
    out = [Section("Case studies", (f"Single prompt: 'a photo of a ...'; ensembled: the "
                                    f"{r.primary['case_study_ensemble']} templates. Probe queries are encoded as written.",))]
    for cs in r.case_studies:
        if "skipped" in cs:
            out.append(Section(cs["class"], (f"Skipped: {cs['skipped']}.",), level=3))
            continue
        k10, k100 = cs["k10"], cs["k100"]
        blocks: list = [Table(("prompt", f"P@{k10}", f"P@{k100}"),
                              (("single", pct(cs["single"]["precision@10"]), pct(cs["single"]["precision@100"])),
                               ("ensembled", pct(cs["ensembled"]["precision@10"]), pct(cs["ensembled"]["precision@100"])))),
                        f"Wrong classes in the ensembled top {k100}: {_counts(cs['retrieval_confusions'])}.",
                        f"Zero-shot: its images classified as {_counts(cs['misclassified_as'])}; other images classified "
                        f"as {_en(cs['class'])}: {_counts(cs['mistaken_for_it'])}.",
                        Table(("probe query", f"P@{k10}", f"P@{k100}", "most frequent classes in its top 100"),
                              tuple((p["query"], pct(p["precision@10"]), pct(p["precision@100"]), _counts(p["top_classes"]))
                                    for p in cs["probes"]))]
        if images is not None:
            g = cs["grid"]
            ids = [int(i) for i in g["ids"]]
            caps = [f"{_en(lab)}\n{float(s):.3f} #{i}" for lab, s, i in zip(g["labels"], g["scores"], ids)]
            key = "case_" + re.sub(r"[^A-Za-z0-9_-]", "_", cs["class"])
            blocks.append(Figure(key, f"Top {len(ids)} for the ensembled '{_en(cs['class'])}' prompt "
                                 "(green border: right class, red: wrong).",
                                 grid_png([images[i] for i in ids], caps, [bool(m) for m in g["match"]],
                                          f"{_en(cs['class'])}: ensembled prompt, top {len(ids)}")))
        out.append(Section(f"{_en(cs['class'])} ({cs['num_images']} images)", tuple(blocks), level=3))
    return out


def _resolution(r: EvalReport) -> Section:
    res = r.resolution
    h, w = res["from_size"]
    rows = tuple((row["interpolation"], pct(row["top1"]), f"{row['seconds']:.1f}") for row in res["rows"])
    rows += (("as stored in the index", pct(res["stored_top1"]), "-"),)
    return Section("Low resolution", (
        f"Zero-shot top-1 ({res['templates']} templates) of the first {res['count']} images, upscaled from {h}x{w} to "
        f"{res['to_size']}x{res['to_size']} with each interpolation and re-encoded.",
        Table(("upscaling", "top-1", "seconds"), rows)))


def _captions(c: dict, images=None) -> Section:
    rows = tuple((f"recall@{k}", pct(c[f"text_to_image_recall@{k}"]), pct(c[f"image_to_text_recall@{k}"]))
                 for k in c["ks"])
    blocks: list = [
        f"{c['captions']} captions of {c['images_with_captions']} images, each caption encoded as written and "
        "ranked against every image (text to image), each image against every caption (image to text: a hit is "
        "any of its captions). CLIP_benchmark's definitions.",
        Table(("", "text to image", "image to text"), rows)]
    for n, ex in enumerate((c.get("examples") or []) if images is not None else []):
        ids = ex["ids"]
        caps = [f"{s:.3f} #{i}" for i, s in zip(ids, ex["scores"])]
        blocks.append(Figure(f"caption_{n}", f"Top {len(ids)} images for the caption '{ex['caption'][:80]}' (green "
                             "border: the image it describes).",
                             grid_png([images[i] for i in ids], caps, [i == ex["image"] for i in ids],
                                      ex["caption"][:60])))
    return Section("Caption retrieval", tuple(blocks))


def build_sections(r: EvalReport, *, ks: Sequence[int], images: np.ndarray | None = None) -> list[Section]:
    warning = weights_warning(r)
    head = [*([Section("Warning", (warning,))] if warning else []), Section("Index and model", (_model_line(r.manifest),))]
    if r.caption_retrieval is not None:
        head.append(_captions(r.caption_retrieval, images))
    if not r.class_names:  # a captioned index without labels: caption retrieval is all there is to measure
        return head
    sections = [*head, _zero_shot(r, len(r.class_names), images), _retrieval(r, ks), *_cases(r, images)]
    if r.resolution is not None:
        sections.append(_resolution(r))
    about = ["Templates: " + "; ".join(f"{k}: {len(v)}" for k, v in r.templates.items())
             + " (every template string is in metrics.json).",
             "Ensembling: normalize-first = L2-normalise each prompt embedding, average, normalise again "
             "(CLIP's notebook and open_clip); average-first = average the raw embeddings, then normalise.",
             "Seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r.seconds.items()) + ".", *r.notes]
    sections.append(Section("About these numbers", tuple(about)))
    return sections


def render_markdown(title: str, sections: Sequence[Section]) -> str:
    lines = [f"# {title}", ""]
    for s in sections:
        lines += ["#" * s.level + " " + s.title, ""]
        for b in s.blocks:
            if isinstance(b, str):
                lines += [b, ""]
            elif isinstance(b, Table):
                lines += ["| " + " | ".join(b.headers) + " |", "|" + "---|" * len(b.headers)]
                lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in b.rows] + [""]
            elif isinstance(b, Figure):
                lines += [f"![{b.caption}](figures/{b.key}.png)", "", f"*{b.caption}*", ""]
    return "\n".join(lines)


def write_document(out_dir: str | Path, title: str, sections: Sequence[Section], metrics: dict, *,
                   json_path: str | Path | None = None) -> dict[str, Path]:
    """metrics.json, report.md, figures/*.png and report.html of any study into ``out_dir``; their paths."""
    out = Path(out_dir)
    text = dumps(metrics) + "\n"
    paths = {"metrics": out / "metrics.json", "markdown": out / "report.md", "html": out / "report.html"}
    write_bytes_atomic(paths["metrics"], text.encode())
    if json_path is not None:
        paths["json"] = Path(json_path)
        write_bytes_atomic(paths["json"], text.encode())
    for s in sections:
        for b in s.blocks:
            if isinstance(b, Figure):
                write_bytes_atomic(out / "figures" / f"{b.key}.png", b.png)
    write_bytes_atomic(paths["markdown"], render_markdown(title, sections).encode())
    write_bytes_atomic(paths["html"], render_html(title, sections).encode())
    return paths


def write_report(report: EvalReport, out_dir: str | Path, *, ks: Sequence[int], images: np.ndarray | None = None,
                 json_path: str | Path | None = None, extra_sections: Sequence[Section] = ()) -> dict[str, Path]:
    """Write metrics.json, report.md, figures/*.png and report.html into ``out_dir``; return their paths."""
    sections = build_sections(report, ks=ks, images=images)
    sections[-1:-1] = list(extra_sections)  # before "About these numbers"
    return write_document(out_dir, TITLE, sections, report.to_json(), json_path=json_path)
