"""Photo-library subcommands: ``duplicates`` (groups of near-identical images, like immich's duplicate tool)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cliplens._safe import printable
from cliplens.cli import common
from cliplens.cli.common import INDEX_DIR_HELP, add_model_flags, cosine_float, default_index_dir, positive_int

log = logging.getLogger(__name__)

MAX_GRIDS = 100


def threshold_for(store, args, *, measure_if_missing: bool = True):
    """The duplicate threshold: --threshold, else the one recorded for the index's weights, else measured now on
    the index's own images (and recorded for every index built with these weights)."""
    from cliplens import duplicates

    if getattr(args, "threshold", None) is not None:
        return duplicates.given(args.threshold)
    known = duplicates.recorded(store.manifest.model)
    if known is not None or not measure_if_missing:
        return known
    encoder = common.load_model(args, store.manifest)
    store.check_model(encoder.info)
    t = duplicates.measure(encoder, store)
    path = duplicates.record(store.manifest.model, t, index=str(store.root))
    log.info("duplicate threshold %s measured on %d re-encoded copies%s", t.threshold, t.sample,
             f", recorded in {path}" if path else "")
    return t


def cmd_duplicates(args) -> int:
    from cliplens import duplicates
    from cliplens.store import IndexStore

    store = IndexStore.open(args.index_dir or default_index_dir())
    t = threshold_for(store, args)
    if not t.usable:
        raise duplicates.DuplicatesError(
            f"this model does not tell re-encoded copies (cosine {t.copies_p01:.4f} and up) from different images "
            f"(up to {t.distinct_p99:.4f}) apart, so no threshold is safe; choose one yourself",
            fix={"threshold": None})
    groups = duplicates.all_groups(store.embeddings, t.threshold)
    refs = store.items["path"] if "path" in store.items else store.items["ref"]
    for g in groups:
        g["refs"] = [str(refs[i]) for i in g["ids"]]
    how = (f"measured on {t.sample} re-encoded copies (1st percentile; different images reach "
           f"{t.distinct_p99:.4f})" if t.measured else "given")
    if args.out:
        _grids(store, groups, Path(args.out))
    if args.json:
        print(json.dumps({"index": str(store.root), "threshold": t.to_json(), "count": len(groups),
                          "items_in_groups": sum(g["size"] for g in groups), "groups": groups}, indent=2))
        return 0
    in_groups = sum(g["size"] for g in groups)
    print(f"{len(groups)} groups of near-identical images ({in_groups} of {len(store)} items), cosine >= "
          f"{t.threshold:.4f} ({how})")
    for n, g in enumerate(groups[: args.top], 1):
        print(f"{n:>4}. {g['size']} images, cosine >= {g['min_cosine']:.4f}: "
              + ", ".join(f"#{i} {printable(r)}" for i, r in zip(g["ids"], g["refs"])))
    if len(groups) > args.top:
        print(f"... and {len(groups) - args.top} more groups (--top N, or --json for all)")
    if args.out:
        print(f"grids of the first {min(len(groups), MAX_GRIDS)} groups in {args.out}/")
    return 0


def _grids(store, groups, out: Path) -> None:
    from cliplens.grid import save_grid, store_tiles

    out.mkdir(parents=True, exist_ok=True)
    for n, g in enumerate(groups[:MAX_GRIDS], 1):
        ids = g["ids"][:20]
        save_grid(out / f"group-{n:03d}.png", store_tiles(store, ids), [f"#{i}\n{r[-24:]}" for i, r in
                                                                     zip(ids, g["refs"])],
                  [None] * len(ids), title=f"group {n}: {g['size']} near-identical images")


def register(sub) -> None:
    p = sub.add_parser("duplicates", help="list groups of near-identical images",
                       description="Find groups of near-identical images (re-encoded, resized or copied photos) by "
                                   "image-embedding cosine. The threshold is measured for the model on re-encoded "
                                   "copies of the index's own images, once per weights, unless --threshold is given.")
    p.add_argument("--index-dir", type=Path, default=None, help=INDEX_DIR_HELP)
    p.add_argument("--threshold", type=cosine_float, default=None,
                   help="cosine at or above which two images count as near-identical (default: measured)")
    p.add_argument("--top", type=positive_int, default=20, help="groups to list (default 20; --json lists all)")
    p.add_argument("--json", action="store_true", help="print one JSON object with every group")
    p.add_argument("--out", type=Path, default=None, help="folder for one image grid per group (PNG)")
    add_model_flags(p, for_query=True)
    p.set_defaults(handler=cmd_duplicates)
