"""Evaluation subcommands: evaluate (zero-shot, retrieval, case studies, report) and probe (linear probe)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cliplens.cli import common
from cliplens.cli.common import add_model_flags, default_index_dir
from cliplens.errors import CliplensError


def _ks(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers such as 1,5,10,100, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"k values must be at least 1, got {text!r}")
    return ks


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.1,1,10, got {text!r}") from None


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def _both(value: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    return choices if value == "both" else (value,)


def _pct(x) -> str:
    from cliplens.report import pct

    return pct(x)


# --------------------------------------------------------------------------- evaluate


def cmd_evaluate(args) -> int:
    from cliplens.cli.scale import backend_label, open_backend
    import dataclasses

    from cliplens.caption_recall import evaluate_captions
    from cliplens.evaluate import ORDERS, STYLES, EvalConfig, EvalReport, evaluate_index, load_case_studies
    from cliplens.report import write_report
    from cliplens.store import IndexStore

    store = IndexStore.open(args.index_dir or default_index_dir())
    index = open_backend(store, args)  # None for exact; a backend that is missing or unreachable fails here
    config = EvalConfig(
        template_sets=tuple(args.templates or ("single", "cifar100")),
        classname_styles=_both(args.classnames, STYLES), orders=_both(args.ensemble, ORDERS), ks=args.k,
        case_studies=load_case_studies(args.case_studies) if args.case_studies else None,
        resolution_study=args.resolution_study, resolution_limit=args.limit, batch_size=args.batch_size,
        text_cache=not args.no_text_cache, text_cache_dir=args.text_cache_dir, progress=not args.quiet,
        retrieval_depth=args.retrieval_depth,
    )
    encoder = common.load_model(args, store.manifest)
    captions = evaluate_captions(store, encoder)  # None unless the index has captions
    if store.has_labels:
        report = evaluate_index(store, encoder, config, index=index, index_label=backend_label(args, index))
        report = dataclasses.replace(report, caption_retrieval=captions)
    elif captions is not None:
        store.check_model(encoder.info)
        report = EvalReport(manifest=store.manifest, class_names=(), superclass_names=(), fine_to_coarse=None,
                            templates={}, primary={}, zero_shot=(), per_template={}, case_studies=(), resolution=None,
                            seconds={}, caption_retrieval=captions)
    else:
        raise CliplensError(f"index at {store.root} has neither labels nor captions: evaluate needs one of them "
                            "(cifar100, cifar10, or a folder or list with captions)")
    from cliplens.grid import figure_images

    paths = write_report(report, args.out, ks=args.k, images=figure_images(store), json_path=args.json,
                         extra_sections=[_map_section(store)] if store.has_labels else [])
    print(summary(report, args.k) if store.has_labels else caption_summary(report))
    if store.has_labels and captions is not None:
        print("\n" + caption_summary(report).split("\n", 1)[1])
    print(f"\nreport: {paths['html']}  (also {paths['markdown'].name}, {paths['metrics'].name}"
          + (f"; metrics copied to {paths['json']}" if "json" in paths else "") + ")")
    return 0


def _map_section(store):
    """The embedding map (PCA, cached in the index folder) as a report section."""
    from cliplens.embedmap import cached_projection, map_groups, plot_map
    from cliplens.study_report import map_section

    pts, _ = cached_projection(store, method="pca")
    groups, names, kind = map_groups(store)
    png = plot_map(pts, groups, names, f"PCA of {len(store)} image embeddings, by {kind}")
    return map_section(png, "A 2-D view of the image embeddings; `cliplens map --method tsne` draws a t-SNE.", "pca", kind)
def caption_summary(report) -> str:
    c, m = report.caption_retrieval, report.manifest.model
    lines = [f"{report.manifest.count} images, {c['captions']} captions; model {m.short_label()}",
             f"{'caption retrieval':<20}" + "".join(f"{'R@' + str(k):>8}" for k in c["ks"])]
    for way, label in (("text_to_image", "text -> image"), ("image_to_text", "image -> text")):
        lines.append(f"{label:<20}" + "".join(f"{_pct(c[f'{way}_recall@{k}']):>8}" for k in c["ks"]))
    return "\n".join(lines)


def summary(report, ks) -> str:
    m = report.manifest.model
    lines = [f"{report.manifest.count} images, {len(report.class_names)} classes; model {m.short_label()} "
             f"(weights sha256 {(m.weights_sha256 or 'none')[:12]})", "",
             f"{'zero-shot':<14}{'T':>3}  {'names':<8}{'ensembling':<17}{'top-1':>7}{'top-5':>7}{'recall':>8}{'in-super':>9}"]
    for z in report.zero_shot:
        lines.append(f"{z['templates'][:14]:<14}{z['num_templates']:>3}  {z['classnames']:<8}{z['ensemble']:<17}"
                     f"{_pct(z['top1']):>7}{_pct(z['top5']):>7}{_pct(z['mean_per_class_recall']):>8}"
                     f"{_pct(z['within_superclass_error_share']):>9}")
    lines.append("published (ViT-B/32 openai, not measured here): zero-shot top-1 65.1% CLIP paper, 64.5% "
                 "CLIP_benchmark, 64.2% open_clip")
    ranked_by = report.retrieval_index
    through = ("" if ranked_by.get("depth") is None  # the exact index ranks every item
               else f"  (ranked by {ranked_by['backend']}, top {ranked_by['depth']})")
    lines += ["", f"{'retrieval':<14}{'mAP':>7}" + "".join(f"{'P@' + str(k):>8}" for k in ks)
              + f"{'FP in-super@' + str(ks[-1]):>16}{through}"]
    for lab, p in report.per_template.items():
        s = p["retrieval"]["summary"]
        lines.append(f"{lab[:14]:<14}{_pct(s['mAP']):>7}" + "".join(f"{_pct(s[f'mean_precision@{k}']):>8}" for k in ks)
                     + f"{_pct(p['retrieval']['superclass_fp_share'].get(ks[-1])):>16}")
    lines += ["", f"{'case study':<12}{'P@10 single':>12}{'ensembled':>11}{'P@100 single':>14}{'ensembled':>11}"
              "  probes (P@100)"]
    for cs in report.case_studies:
        if "skipped" in cs:
            lines.append(f"{cs['class']:<12}skipped: {cs['skipped']}")
            continue
        probes = ", ".join(f"'{p['query']}' {_pct(p['precision@100'])}" for p in cs["probes"])
        lines.append(f"{cs['class']:<12}{_pct(cs['single']['precision@10']):>12}{_pct(cs['ensembled']['precision@10']):>11}"
                     f"{_pct(cs['single']['precision@100']):>14}{_pct(cs['ensembled']['precision@100']):>11}  {probes}")
    if report.resolution:
        res = report.resolution
        lines += ["", f"low resolution ({res['count']} images, {res['from_size'][0]}px -> {res['to_size']}px): "
                  + ", ".join(f"{r['interpolation']} {_pct(r['top1'])}" for r in res["rows"])
                  + f"; stored {_pct(res['stored_top1'])}"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- probe


def cmd_probe(args) -> int:
    import numpy as np

    from cliplens.evaluate import jsonable, zero_shot
    from cliplens.probe import ProbeConfig, check_compatible, compare, linear_probe
    from cliplens.prompts import PromptError, classnames, load_templates
    from cliplens.report import dumps
    from cliplens._files import write_bytes_atomic
    from cliplens.store import IndexStore
    from cliplens.textcache import class_text_features

    train, test = IndexStore.open(args.index_dir), IndexStore.open(args.eval_index_dir)
    for store, flag in ((train, "--index-dir"), (test, "--eval-index-dir")):
        if not store.has_labels:
            raise CliplensError(f"{flag} {store.root} has no labels: the probe needs labelled indexes")
    if train.root.resolve() == test.root.resolve() or train.manifest.identity == test.manifest.identity:
        raise CliplensError("--index-dir and --eval-index-dir are the same index: a probe tested on its own training "
                            "data measures nothing; index the train split for --index-dir and the test split for "
                            "--eval-index-dir")
    check_compatible(train.manifest, test.manifest)
    config = ProbeConfig(cs=args.cs, val_fraction=args.val_fraction, limit_per_class=args.limit_per_class, seed=args.seed,
                         tol=args.tol, progress=not args.quiet)
    names = test.class_names
    result = linear_probe(np.asarray(train.embeddings), train.labels, np.asarray(test.embeddings), test.labels,
                          num_classes=len(names), config=config)
    out = {"probe": result, "train_index": str(train.root), "test_index": str(test.root),
           "train_embedding": train.manifest.stats, "model": dict(train.manifest.model.__dict__)}
    zs = None
    if not args.no_zero_shot:
        encoder = common.load_model(args, test.manifest)
        test.check_model(encoder.info)
        try:
            templates = load_templates(args.templates)
        except PromptError as exc:
            raise CliplensError(str(exc)) from None
        feats = class_text_features(encoder, classnames(names, args.classnames), templates, progress=not args.quiet)
        zs = zero_shot(np.asarray(test.embeddings, dtype=np.float32), feats.classifier(args.ensemble), test.labels,
                       None)
        zs_per_class = _per_class(zs.pop("pred"), test.labels, len(names))
        zs.update(templates=args.templates, classnames=args.classnames, ensemble=args.ensemble, per_class_accuracy=zs_per_class)
        out["zero_shot"] = zs
        out["gains"] = compare(result["per_class_accuracy"], zs_per_class, names)
    print(probe_summary(out, train.manifest))
    if args.json:
        write_bytes_atomic(args.json, (dumps(jsonable(out)) + "\n").encode())
        print(f"\nmetrics written to {args.json}")
    return 0


def _per_class(pred, labels, num_classes):
    from cliplens.metrics import per_class_recall

    return per_class_recall(pred, labels, num_classes)


def probe_summary(out: dict, train_manifest) -> str:
    r = out["probe"]
    stats = out.get("train_embedding") or {}
    lines = []
    if stats:
        resumed = (f" (this run resumed at image {stats['resumed_from']}: earlier runs not counted)"
                   if stats.get("resumed_from") else "")
        lines.append(f"train embeddings: {train_manifest.count} images embedded in {stats['seconds']:.1f} s "
                     f"({stats['images_per_second']} img/s){resumed}")
    sweep = ", ".join(f"C={s['C']:g}: {_pct(s['val_top1'])} ({s['iterations']} it.)" for s in r["sweep"])
    lines += [f"C sweep on {r['num_val']} validation images carved from train: {sweep}",
              f"best C = {r['best_C']:g}; refit on {r['num_train'] + r['num_val']} train images "
              f"({r['iterations']} L-BFGS iterations, tol {r['tol']:g}); "
              f"sweep {r['sweep_seconds']:.1f} s + final fit {r['fit_seconds']:.1f} s",
              "", f"{'on ' + str(r['num_test']) + ' test images':<34}{'top-1':>7}{'top-5':>7}{'per-class':>10}",
              f"{'linear probe':<34}{_pct(r['top1']):>7}{_pct(r['top5']):>7}{_pct(r['mean_per_class_accuracy']):>10}"]
    zs = out.get("zero_shot")
    if zs:
        lines.append(f"{'zero-shot (' + zs['templates'] + ')':<34}{_pct(zs['top1']):>7}{_pct(zs['top5']):>7}"
                     f"{_pct(zs['mean_per_class_recall']):>10}")
    lines.append("published (ViT-B/32 openai, not measured here): linear probe about 80% (CLIP_benchmark), "
                 "zero-shot 65.1% (CLIP paper)")
    if "gains" in out:
        for which, title in (("most", "probe gains most"), ("least", "probe gains least")):
            lines.append(f"{title}: " + ", ".join(f"{g['class']} {g['gain'] * 100:+.0f} pts ({_pct(g['zero_shot'])} -> "
                                                  f"{_pct(g['probe'])})" for g in out["gains"][which]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- registration


def register(sub) -> None:
    from cliplens.cli.scale import add_backend_flags

    p = sub.add_parser("evaluate", help="zero-shot accuracy, class-prompt retrieval, case studies and a report",
                       description="Evaluate a labelled index: zero-shot classification per template set, retrieval "
                                   "with class prompts, the case studies, optionally low resolution; writes "
                                   "metrics.json, report.md and a self-contained report.html.")
    p.add_argument("--index-dir", type=Path, default=None, help="a labelled index (default: the CIFAR-100 test index)")
    p.add_argument("--templates", nargs="+", action="extend", metavar="NAME|FILE",
                   help="template sets: single, cifar100, imagenet80 or a file (default: single cifar100)")
    p.add_argument("--classnames", default="both", choices=["english", "raw", "both"],
                   help="class names as English words, as the data set spells them, or both (default)")
    p.add_argument("--ensemble", default="both", choices=["normalize-first", "average-first", "both"],
                   help="prompt ensembling order (default: both, normalize-first is the primary)")
    p.add_argument("--out", type=Path, default=Path("cliplens-report"), help="report folder (default ./cliplens-report)")
    p.add_argument("--json", type=Path, default=None, help="also write metrics.json to this path")
    p.add_argument("-k", type=_ks, default=(1, 5, 10, 100), help="precision@k values, comma-separated (default 1,5,10,100)")
    p.add_argument("--case-studies", type=Path, default=None, help="a case-study JSON file (default: the built-in four)")
    p.add_argument("--resolution-study", action="store_true", help="re-encode the thumbnails with 4 upscaling filters")
    p.add_argument("--limit", type=_positive, default=None, help="resolution study: only the first N images")
    p.add_argument("--batch-size", type=_positive, default=64, help="resolution study batch size")
    p.add_argument("--no-text-cache", action="store_true", help="always re-encode the class prompts")
    p.add_argument("--text-cache-dir", type=Path, default=None, help="default $CLIPLENS_HOME/textcache")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_model_flags(p, for_query=True)
    p.add_argument("--retrieval-depth", type=_positive, default=None, metavar="N",
                   help="with --backend: hits asked per class query (default: every image, so AP is the full AP; "
                        "an image beyond N counts as not retrieved)")
    add_backend_flags(p)
    p.set_defaults(handler=cmd_evaluate)

    p = sub.add_parser("probe", help="linear probe on frozen embeddings, beside zero-shot",
                       description="Fit a logistic-regression probe on a TRAIN index (C chosen on a validation split "
                                   "of train), score it on a TEST index, and compare with zero-shot.")
    p.add_argument("--index-dir", type=Path, required=True, help="the labelled TRAIN index")
    p.add_argument("--eval-index-dir", type=Path, required=True, help="the labelled TEST index (same model)")
    p.add_argument("--limit-per-class", type=_positive, default=None, help="use at most N train images per class")
    p.add_argument("--templates", default="cifar100", metavar="NAME|FILE", help="zero-shot templates (default cifar100)")
    p.add_argument("--classnames", default="english", choices=["english", "raw"],
                   help="class names in the zero-shot prompts: english (aquarium fish) or raw (aquarium_fish)")
    p.add_argument("--ensemble", default="normalize-first", choices=["normalize-first", "average-first"],
                   help="prompt ensembling: normalise each prompt embedding before averaging, or after")
    p.add_argument("--cs", type=_floats, default=(0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0),
                   help="C values of the coarse sweep, comma-separated")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class's train images held out")
    p.add_argument("--tol", type=float, default=1e-4, help="L-BFGS stopping tolerance (scikit-learn's default 1e-4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the zero-shot comparison (no model is loaded)")
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_model_flags(p, for_query=True)
    p.set_defaults(handler=cmd_probe)
