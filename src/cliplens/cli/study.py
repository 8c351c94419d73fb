"""Study subcommands beyond ``evaluate``: fewshot, suspects, map, compare, calibrate.

Each prints a short table (or one JSON object with ``--json``) and, with ``--out DIR``, writes metrics.json,
report.md and a self-contained report.html like ``evaluate`` does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cliplens.cli import common
from cliplens.cli.common import add_model_flags, default_index_dir, positive_int
from cliplens.cli.evaluate import _floats
from cliplens.errors import CliplensError


def _shots(text: str) -> tuple:
    out = []
    for t in (t.strip() for t in text.split(",") if t.strip()):
        if t == "all":
            out.append(None)
        elif t.isdigit() and int(t) >= 1:
            out.append(int(t))
        else:
            raise argparse.ArgumentTypeError(f"shots are whole numbers >= 1 or 'all', such as 1,2,4,8,16,all; got {text!r}")
    if not out:
        raise argparse.ArgumentTypeError("no shots given; use e.g. 1,2,4,8,16,all")
    return tuple(dict.fromkeys(out))


def _labelled(path, flag: str, command: str):
    from cliplens.store import IndexStore

    store = IndexStore.open(path or default_index_dir())
    if not store.has_labels:
        raise CliplensError(f"{flag} {store.root} has no labels: {command} needs a labelled index (cifar100, cifar10); "
                            "a folder index has none (`cliplens map` works on it)")
    return store


def _encoder(args, store):
    encoder = common.load_model(args, store.manifest)
    store.check_model(encoder.info)
    return encoder


def _classifier(args, store, encoder):
    """The zero-shot classifier as ``evaluate`` builds it: (C, D) unit class vectors."""
    from cliplens.prompts import PromptError, classnames, load_templates
    from cliplens.textcache import class_text_features

    try:
        templates = load_templates(args.templates)
    except PromptError as exc:
        raise CliplensError(str(exc)) from None
    feats = class_text_features(encoder, classnames(store.class_names, args.classnames), templates,
                                progress=not args.quiet)
    return feats.classifier(args.ensemble)


def _text_table(table) -> str:
    rows = [table.headers, *table.rows]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(table.headers))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _emit(args, title: str, sections, metrics: dict, lines: list[str]) -> None:
    from cliplens.evaluate import jsonable
    from cliplens.report import write_document

    metrics = jsonable(metrics)
    if getattr(args, "out", None) is not None:
        paths = write_document(args.out, title, sections, metrics)
        lines.append(f"\nreport: {paths['html']}  (also {paths['markdown'].name}, {paths['metrics'].name})")
    print(json.dumps(metrics, indent=2) if args.json else "\n".join(lines))


def _header(store) -> str:
    from cliplens.report import _model_line

    return _model_line(store.manifest)


# --------------------------------------------------------------------------- fewshot
def cmd_fewshot(args) -> int:
    import numpy as np

    from cliplens.fewshot import METHODS, FewShotConfig, run_fewshot
    from cliplens.probe import ProbeConfig, check_compatible
    from cliplens.study_report import fewshot_sections, fewshot_table

    train = _labelled(args.train_index_dir, "--train-index-dir", "fewshot")
    test = _labelled(args.index_dir, "--index-dir", "fewshot")
    check_compatible(train.manifest, test.manifest)
    config = FewShotConfig(shots=args.shots, seeds=args.seeds, methods=tuple(args.methods or METHODS),
                           val_fraction=args.val_fraction, probe=ProbeConfig(cs=args.cs), progress=not args.quiet)
    encoder = _encoder(args, test)
    class_emb = _classifier(args, test, encoder)
    result = run_fewshot(train.embeddings, train.labels, np.asarray(test.embeddings), test.labels, class_emb,
                         num_classes=len(test.class_names), config=config)
    result.update(train_index=str(train.root), test_index=str(test.root), model=test.manifest.model.to_json(),
                  templates=args.templates)
    lines = [f"few-shot on {result['num_test']} test images, shots from {result['num_train']} train images "
             f"({result['seeds']} seeds, {result['seconds']:.1f} s)", _text_table(fewshot_table(result)),
             "published (not measured here): zero-shot CLIP matches about a 4-shot linear probe, averaged over the "
             "CLIP paper's datasets"]
    _emit(args, "cliplens few-shot study", fewshot_sections(result, _header(test)), result, lines)
    return 0


# --------------------------------------------------------------------------- suspects
def cmd_suspects(args) -> int:
    import numpy as np

    from cliplens.probe import check_compatible
    from cliplens.prompts import english_classname
    from cliplens.report import pct
    from cliplens.study_report import suspects_sections
    from cliplens.suspects import (DEFAULT_DUP_THRESHOLD, PUBLISHED, copy_threshold, find_suspects, near_duplicates,
                                   precision_at, read_reference)

    store = _labelled(args.index_dir, "--index-dir", "suspects")
    train = _labelled(args.train_index_dir, "--train-index-dir", "suspects") if args.train_index_dir else None
    if train is not None:
        check_compatible(train.manifest, store.manifest)
    reference = read_reference(args.reference, len(store)) if args.reference else None  # bad file: said before work
    encoder = _encoder(args, store)
    class_emb = _classifier(args, store, encoder)
    names = [english_classname(n) for n in store.class_names]
    emb = np.asarray(store.embeddings, np.float32)
    r = find_suspects(emb, store.labels, class_emb, num_classes=len(names), neighbours=args.neighbours,
                      ref_emb=None if train is None else train.embeddings, ref_labels=None if train is None else train.labels)
    labels = store.labels
    sus = [{"id": int(i), "ref": str(store.items["ref"][i]), "label": names[labels[i]], "suggested": names[r["suggested"][i]],
            "self_confidence": float(r["self_confidence"][i]), "zero_shot": names[r["zero_shot_pred"][i]],
            "neighbours": names[r["neighbour_pred"][i]]} for i in r["ranked"]]
    result = {"index": str(store.root), "count": len(store), "flagged": len(sus), "flagged_share": len(sus) / len(store),
              "neighbours": r["neighbours"], "neighbours_from": r["neighbours_from"], "suspects": sus,
              "published": list(PUBLISHED), "model": store.manifest.model.to_json(),
              "score_note": "score: self-confidence p[label], p = (zero-shot softmax + neighbour label share) / 2; "
                            f"flagged when both the zero-shot prediction and the {r['neighbours']}-neighbour vote "
                            f"({r['neighbours_from']}) disagree with the label; lowest score first."}
    if reference is not None:
        ns = tuple(sorted({10, 50, 100, args.top}))
        result["reference"] = {"file": str(args.reference), "count": int(len(reference)),
                               "precision": precision_at(r["ranked"], reference, ns)}
    if train is not None:
        images = store.images()
        if args.dup_threshold is not None:
            thr, how = {"threshold": args.dup_threshold}, "given with --dup-threshold"
        elif images is not None:
            thr = copy_threshold(encoder, images)
            how = (f"1st percentile of the cosine between {thr['sample']} images and their re-encoded copies "
                   "(JPEG, resized)")
        else:
            thr, how = {"threshold": DEFAULT_DUP_THRESHOLD}, "default: this index has no thumbnails to measure on"
        dup = near_duplicates(emb, train.embeddings, thr["threshold"])
        result["duplicates"] = {**dup, "threshold_from": how, "measurement": thr}
    lines = [f"{len(sus)} of {len(store)} labels ({pct(result['flagged_share'])}) disagree with both zero-shot and "
             f"their {r['neighbours']} nearest neighbours ({r['neighbours_from']}); top {min(args.top, len(sus))}:",
             f"{'rank':>4}  {'id':>6}  {'label':<20}{'CLIP suggests':<20}{'score':>7}"]
    lines += [f"{k + 1:>4}  {s['id']:>6}  {s['label'][:19]:<20}{s['suggested'][:19]:<20}{s['self_confidence']:7.3f}"
              for k, s in enumerate(sus[:args.top])]
    if "reference" in result:
        lines.append("precision against the reference list: " + ", ".join(
            f"@{n} {pct(v)}" for n, v in result["reference"]["precision"].items()))
    if "duplicates" in result:
        d = result["duplicates"]
        lines.append(f"near-duplicates in train: {d['count']} test images ({pct(d['share'])}) at cosine >= "
                     f"{d['threshold']:.4f} ({d['threshold_from']})")
    lines.append("published (not measured here): about 6% of CIFAR-100 test is mislabelled (Northcutt et al. 2021, "
                 "5.85%); about 10% of CIFAR-100 test images have near-duplicates in train (Barz & Denzler 2020)")
    _emit(args, "cliplens suspect labels", suspects_sections(result, _header(store), store.images(), args.top),
          result, lines)
    return 0


# --------------------------------------------------------------------------- map
def cmd_map(args) -> int:
    import time

    from cliplens._files import write_bytes_atomic
    from cliplens.embedmap import cached_projection, map_groups, plot_map
    from cliplens.store import IndexStore

    if args.out.suffix.lower() != ".png":
        raise CliplensError(f"--out must name a .png file, got {args.out}")
    store = IndexStore.open(args.index_dir or default_index_dir())
    t0 = time.perf_counter()
    pts, cached = cached_projection(store, method=args.method, seed=args.seed, library=args.library)
    seconds = time.perf_counter() - t0
    groups, names, kind = map_groups(store)
    png = plot_map(pts, groups, names, f"{args.method.upper()} of {len(store)} embeddings, by {kind}")
    write_bytes_atomic(args.out, png)
    result = {"index": str(store.root), "method": args.method, "count": len(store), "from_cache": cached,
              "seconds": round(seconds, 3), "coloured_by": kind, "groups": len(names), "out": str(args.out)}
    print(json.dumps(result, indent=2) if args.json else
          f"{args.method} map of {len(store)} items ({'from the cache' if cached else f'{seconds:.1f} s'}), "
          f"{len(names)} {kind} colours -> {args.out}")
    return 0


# --------------------------------------------------------------------------- registration
def _zero_shot_flags(p) -> None:
    p.add_argument("--templates", default="cifar100", metavar="NAME|FILE", help="zero-shot templates (default cifar100)")
    p.add_argument("--classnames", default="english", choices=["english", "raw"],
                   help="class names in the zero-shot prompts: english (aquarium fish) or raw (aquarium_fish)")
    p.add_argument("--ensemble", default="normalize-first", choices=["normalize-first", "average-first"],
                   help="prompt ensembling: normalise each prompt embedding before averaging, or after")


def _output_flags(p) -> None:
    p.add_argument("--out", type=Path, default=None, help="write metrics.json, report.md and report.html here")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def _study_flags(p, handler) -> None:
    """The flags every labelled study shares: zero-shot classifier, output, model; then its handler."""
    _zero_shot_flags(p)
    _output_flags(p)
    add_model_flags(p, for_query=True)
    p.set_defaults(handler=handler)


def register(sub) -> None:
    p = sub.add_parser("fewshot", help="how many labels beat zero-shot: probe, Tip-Adapter(-F), zero-shot-init probe",
                       description="Sample k labelled images per class from TRAIN (seeded), adapt, score on TEST.")
    p.add_argument("--train-index-dir", type=Path, required=True, help="the labelled TRAIN index (shots come from it)")
    p.add_argument("--index-dir", type=Path, default=None, help="the labelled TEST index (same model)")
    p.add_argument("--shots", type=_shots, default=(1, 2, 4, 8, 16, None), help="per class, e.g. 1,2,4,8,16,all")
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds per number of shots (default 5)")
    p.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="zero-shot probe tip-adapter tip-adapter-f zs-probe (default: all)")
    p.add_argument("--cs", type=_floats, default=(0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0),
                   help="the probe's C sweep (as `cliplens probe`)")
    p.add_argument("--val-fraction", type=float, default=0.25, help="share of each class's shots held out to validate")
    _study_flags(p, cmd_fewshot)

    p = sub.add_parser("suspects", help="labels worth a second look, and train/test near-duplicates",
                       description="Rank items whose label disagrees with zero-shot and with their nearest neighbours.")
    p.add_argument("--index-dir", type=Path, default=None, help="the labelled index to check")
    p.add_argument("--train-index-dir", type=Path, default=None, help="take neighbours from this index; list near-duplicates")
    p.add_argument("--top", type=positive_int, default=25, help="suspects to show (default 25)")
    p.add_argument("--neighbours", type=positive_int, default=10, help="nearest labelled neighbours (default 10)")
    p.add_argument("--reference", type=Path, default=None, help="known-bad item ids (one per line or a JSON list)")
    p.add_argument("--dup-threshold", type=float, default=None, help="near-duplicate cosine (default: measured)")
    _study_flags(p, cmd_suspects)

    p = sub.add_parser("map", help="a 2-D map of the embeddings (PCA, t-SNE, UMAP)",
                       description="Project an index's embeddings to 2-D, coloured by superclass, class or folder.")
    p.add_argument("--index-dir", type=Path, default=None, help="the index to project (default: the default index)")
    p.add_argument("--method", default="pca", choices=["pca", "tsne", "umap"], help="2-D projection")
    p.add_argument("--library", default=None, choices=["numpy", "opentsne", "sklearn", "umap-learn"],
                   help="t-SNE: sklearn (default) or opentsne")
    p.add_argument("--seed", type=int, default=0, help="seed of the projection")
    p.add_argument("--out", type=Path, default=Path("map.png"), help="the PNG to write (default map.png)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_map)
