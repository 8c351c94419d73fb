"""Study subcommands that look across models: compare (models side by side) and calibrate (a relevance cut),
with ``search --min-score calibrated``'s lookup."""

from __future__ import annotations

import argparse
from pathlib import Path

from cliplens.cli.common import positive_int
from cliplens.cli.study import (_classifier, _emit, _encoder, _header, _labelled, _output_flags, _shots, _text_table,
                                _zero_shot_flags, add_model_flags)
from cliplens.errors import CliplensError


# --------------------------------------------------------------------------- compare
def cmd_compare(args) -> int:
    from cliplens.compare import check_same_source, compare_result, model_row, side_by_side
    from cliplens.evaluate import EvalConfig, evaluate_index
    from cliplens.fewshot import FewShotConfig, run_fewshot
    from cliplens.probe import check_compatible
    from cliplens.search import Searcher
    from cliplens.study_report import compare_sections

    stores = [_labelled(p, "--index-dir", "compare") for p in args.index_dir]
    check_same_source(stores)
    trains = [_labelled(p, "--train-index-dir", "compare") for p in (args.train_index_dir or ())]
    if trains and len(trains) != len(stores):
        raise CliplensError(f"give one --train-index-dir per --index-dir, in the same order ({len(trains)} for "
                            f"{len(stores)})")
    config = EvalConfig(template_sets=(args.templates,), classname_styles=("english",), orders=("normalize-first",),
                        progress=not args.quiet)
    rows, searchers = [], []
    for j, store in enumerate(stores):
        own = argparse.Namespace(**{**vars(args), "model": None, "pretrained": None, "weights": None})
        encoder = _encoder(own, store)
        report = evaluate_index(store, encoder, config)
        crossover = None
        if trains:
            check_compatible(trains[j].manifest, store.manifest)
            few = run_fewshot(trains[j].embeddings, trains[j].labels, store.embeddings, store.labels,
                              _classifier(args, store, encoder), num_classes=len(store.class_names),
                              config=FewShotConfig(shots=args.shots, seeds=args.seeds, methods=("probe", "tip-adapter")))
            crossover = few["crossover"]
        rows.append(model_row(store, report, crossover=crossover))
        searchers.append(Searcher(encoder=encoder, store=store))
    queries = list(args.query or [c["class"] for c in report.case_studies if "skipped" not in c])
    result = compare_result(stores, rows, side_by_side(searchers, queries, args.k))
    table = compare_sections(result, None)[0].blocks[1]
    lines = [f"{result['count']} images of {result['source']}, {len(rows)} models", _text_table(table)]
    _emit(args, "cliplens model comparison", compare_sections(result, stores[0].images()), result, lines)
    return 0


# --------------------------------------------------------------------------- calibrate
def cmd_calibrate(args) -> int:
    from cliplens.calibrate import calibrate, check_target, record
    from cliplens.prompts import english_classname, wrap_query
    from cliplens.study_report import calibration_sections

    check_target(args.target)
    store = _labelled(args.index_dir, "--index-dir", "calibrate")
    encoder = _encoder(args, store)
    prompts = [wrap_query(english_classname(n), args.template) for n in store.class_names]
    result = calibrate(store.embeddings, store.labels, encoder.encode_texts(prompts), target=args.target)
    result.update(template=args.template, index=str(store.root), model=store.manifest.model.to_json())
    lines = []
    if result["threshold"] is None:
        lines.append(f"no cosine threshold reaches precision {args.target:g} for class-name queries with template "
                     f"{args.template!r}; nothing recorded")
    else:
        path = record(store.manifest.model, args.template, result, index=str(store.root))
        result["recorded"] = str(path)
        lines += [f"calibrated threshold {result['threshold']:.4f}: precision {result['precision']:.3f}, recall "
                  f"{result['recall']:.3f} over {result['queries']} class queries x {result['items']} images",
                  f"recorded in {path}; use it with `cliplens search ... --min-score calibrated`"]
    _emit(args, "cliplens calibrated threshold", calibration_sections(result, _header(store), args.template), result, lines)
    return 0


def resolve_min_score(value, searcher, template: str | None):
    """``--min-score calibrated``: the recorded threshold for the index's model and this template; else the float."""
    if value != "calibrated":
        return value
    from cliplens.calibrate import lookup

    return float(lookup(searcher.store.manifest.model, template or "a photo of a {}.")["threshold"])


def min_score_arg(text: str):
    """``--min-score``: a cosine from -1 to 1 (never nan, which would drop nothing) or ``calibrated``."""
    from cliplens.cli.common import cosine_float

    if text == "calibrated":
        return text
    try:
        float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a cosine such as 0.25 or 'calibrated', got {text!r}") from None
    return cosine_float(text)


# --------------------------------------------------------------------------- registration
def register(sub) -> None:
    p = sub.add_parser("compare", help="models side by side on the same images",
                       description="Indexes of one source built with different models: one table, the same queries.")
    p.add_argument("--index-dir", type=Path, action="append", required=True, help="an index (repeat, 2 or more)")
    p.add_argument("--train-index-dir", type=Path, action="append", default=None,
                   help="a train index per model, in the same order: adds the few-shot crossover")
    p.add_argument("--query", action="append", default=None, help="queries shown side by side (default: case studies)")
    p.add_argument("-k", type=positive_int, default=10, help="hits per query and model (default 10)")
    p.add_argument("--shots", type=_shots, default=(1, 2, 4, 8, 16), help="few-shot: shots per class")
    p.add_argument("--seeds", type=positive_int, default=3, help="few-shot: seeds (default 3)")
    _zero_shot_flags(p)
    _output_flags(p)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where the models run; auto picks cuda, then mps, then cpu")
    p.set_defaults(handler=cmd_compare, precision="exact")

    p = sub.add_parser("calibrate", help="the cosine above which class-name queries reach a target precision",
                       description="Choose and record a relevance threshold for this model (search --min-score calibrated).")
    p.add_argument("--index-dir", type=Path, default=None, help="a labelled index built with the model")
    p.add_argument("--target", type=float, default=0.9, help="target precision (default 0.9)")
    p.add_argument("--template", default="a photo of a {}.", help="the query template (default: search's)")
    _output_flags(p)
    add_model_flags(p, for_query=True)
    p.set_defaults(handler=cmd_calibrate)
