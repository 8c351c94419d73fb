"""Core subcommands: index, search, info, demo."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from cliplens._files import cliplens_home
from cliplens._safe import printable
from cliplens.cli import common
from cliplens.cli.common import (  # noqa: F401  (importable from here as before)
    INDEX_DIR_HELP,
    add_model_flags,
    cosine_float,
    default_index_dir,
    model_choice,
    non_negative_int,
    positive_int,
    text_only_encoder,
)
from cliplens.errors import CliplensError

log = logging.getLogger(__name__)
CASE_STUDIES = ("tractor", "tulip", "seal", "telephone")  # CIFAR-100 classes 89, 92, 72, 86


# --------------------------------------------------------------------------- index


def check_cifar_inputs(args, source: str) -> None:
    """Before anything slow: when neither the data nor the weights are here or downloadable, say both at once."""
    from cliplens.sources.cifar import missing_data
    from cliplens.encoder import missing_weights

    data = missing_data(source, args.data_dir)
    if data is None:
        return  # the data is here (or can be fetched); a weights problem is then said on its own, as usual
    name, pretrained, weights = model_choice(args)
    model = missing_weights(name, pretrained, weights)
    if model is not None:
        raise CliplensError(f"nothing to index with: {data}; and {model}")


def cifar_index_dir(args, source: str) -> Path:
    """``--index-dir``, else the default for the split; a ``--limit`` run gets its own folder, never the full one's."""
    if args.index_dir:
        return args.index_dir
    if args.limit:
        return cliplens_home() / "indexes" / f"{source}-{args.split}-first{args.limit}"
    return default_index_dir(f"{source}-{args.split}")


def index_cifar(args, source: str, *, engine=None):
    """Load the split and index it through :func:`cliplens.indexing.index_source` (refusing to replace a complete
    index of other settings unless --rebuild). (index_dir, the encoder or None, IndexResult)."""
    from cliplens.errors import IndexExistsError
    from cliplens.indexing import IndexOptions, IndexResult, index_source, open_source
    from cliplens.uptodate import labeled_complete

    index_dir = cifar_index_dir(args, source)
    check_cifar_inputs(args, source)
    data = open_source(source, split=args.split, data_dir=args.data_dir, verify=not args.no_verify,
                       limit=args.limit, progress=not args.quiet)
    done = labeled_complete(index_dir, data, args) if engine is None else None  # before any model loads
    if done is not None:
        return index_dir, None, IndexResult(done, 0, resumed_from=done.count)
    encoder = common.lazy_model(args, index_dir)  # loads only if something must be embedded
    options = IndexOptions(batch_size=args.batch_size, dtype=getattr(args, "dtype", "float32"),
                           checkpoint_every=getattr(args, "checkpoint_every", 4), progress=not args.quiet,
                           rebuild=args.rebuild or getattr(args, "force", False))
    try:
        result = index_source(data, encoder, index_dir, engine=engine, options=options)
    except IndexExistsError as exc:
        raise CliplensError(f"{exc}: pass --rebuild to replace it, or give another --index-dir") from None
    return index_dir, encoder, result


def _cache_image_tower(encoder) -> None:
    """After an exact CPU run that loaded torch: export the image tower for later runs to use without torch
    (cliplens.imageonly; seconds, once per weights). Never fails the index run."""
    if encoder is None or not getattr(encoder, "loaded", True):
        return
    real = getattr(encoder, "encoder", encoder)
    if getattr(real, "image_only", False) or not hasattr(real, "model"):
        return
    from cliplens import imageonly

    if imageonly.cache_folder(real.info) is not None and imageonly.enabled():
        imageonly.build_cache(real)


def _measure_duplicates(index_dir: Path, encoder) -> None:
    """Once per weights, while the model is loaded anyway: measure the near-duplicate threshold on this photo
    index (cliplens.duplicates) so search and serve can collapse copies. Never fails the index run."""
    from cliplens import duplicates
    from cliplens.store import IndexStore

    if encoder is None or not getattr(encoder, "loaded", True) or not encoder.info.weights_sha256:
        return
    if duplicates.recorded(encoder.info) is not None:
        return
    try:
        store = IndexStore.open(index_dir)
        if len(store) < 8:
            return
        t = duplicates.measure(getattr(encoder, "encoder", encoder), store)
        duplicates.record(encoder.info, t, index=str(index_dir))
    except CliplensError as exc:
        log.info("near-duplicate threshold not measured: %s", exc)


def check_index_kind(index_dir: Path, *, kind: str | None, force: bool) -> None:
    """Refuse to write one kind of index (a CIFAR split: None, "folder", "list") over another unless ``--force``."""
    from cliplens.store import read_current_manifest

    current = read_current_manifest(Path(index_dir).expanduser())
    if current is None or current.source is None:
        return  # nothing there (or unreadable: the store says so when it opens it)
    held = current.source.type if current.source.type in ("folder", "list") else None
    if held != kind and not force:
        what = {"folder": "an image-folder index", "list": "an image-list index"}.get(held,
                                                                                    f"a {current.source.name} index")
        raise CliplensError(f"{index_dir} holds {what}: choose another --index-dir, or pass --force to replace it")


# --------------------------------------------------------------------------- index


def cmd_index(args) -> int:
    from cliplens.cli.scale import build_after_index, check_build_flags, engine_for
    from cliplens.errors import IndexExistsError
    from cliplens.indexing import IndexOptions, index_source, open_source
    from cliplens.uptodate import folder_unchanged

    kind = args.source.lower().replace("-", "")
    cifar = kind in ("cifar100", "cifar10")
    if kind == "list" and args.path is None:
        raise CliplensError("cliplens index list needs the list file: cliplens index list FILE.csv|.jsonl|.parquet")
    if not cifar and kind != "list" and not Path(args.source).expanduser().is_dir():
        raise CliplensError(f"unknown source {args.source!r}: use cifar100, cifar10, list FILE, or the path of an "
                            "image folder")
    if args.max_megapixels <= 0:
        raise CliplensError(f"--max-megapixels must be positive, got {args.max_megapixels}")
    check_build_flags(args)  # bad build settings or an unreachable Ray: said now, not after the embedding
    engine = engine_for(args)
    if cifar:
        index_dir = cifar_index_dir(args, kind)
    elif kind == "list":
        index_dir = args.index_dir or default_index_dir(f"list-{Path(args.path).stem}")
    else:
        index_dir = args.index_dir or default_index_dir(f"folder-{Path(args.source).expanduser().resolve().name or 'root'}")
    check_index_kind(index_dir, kind=None if cifar else ("list" if kind == "list" else "folder"), force=args.force)
    encoder = None
    if cifar:
        index_dir, encoder, result = index_cifar(args, kind, engine=engine)
    else:
        if kind != "list" and engine is None:
            summary = folder_unchanged(Path(args.source), index_dir, args)  # nothing changed: no model, no items
            if summary is not None:
                print(f"{Path(args.source).expanduser()}: {summary.line()}")
                build_after_index(args, index_dir)
                return 0
        source = open_source(args.source, path=args.path, exclude=tuple(args.exclude),
                             include_hidden=args.include_hidden)
        options = IndexOptions(batch_size=args.batch_size, dtype=args.dtype, progress=not args.quiet,
                               max_megapixels=args.max_megapixels, rebuild=args.rebuild or args.force,
                               replace_other=args.force)
        try:
            encoder = common.lazy_model(args, index_dir)
            result = index_source(source, encoder, index_dir, engine=engine, options=options)
        except IndexExistsError as exc:
            raise CliplensError(f"{exc}: pass --rebuild to replace it, or give another --index-dir") from None
    if result.summary is not None:  # a folder or a list: what changed
        where = Path(args.path) if kind == "list" else Path(args.source).expanduser()
        print(f"{where}: {result.summary.line()}")
        _measure_duplicates(index_dir, encoder)
    elif result.embedded == 0:
        print(f"{index_dir}: already complete ({result.manifest.count} images), nothing to do")
    else:
        resumed = f", resumed at {result.resumed_from}" if result.resumed_from else ""
        ips = result.embedded / result.seconds if result.seconds > 0 else 0.0
        print(f"indexed {result.embedded} images in {result.seconds:.1f} s ({ips:.1f} img/s{resumed}) -> {index_dir}")
    _cache_image_tower(encoder)
    build_after_index(args, index_dir)
    return 0


# --------------------------------------------------------------------------- search


def open_searcher(args, *, text_only: bool = False):
    """(the Searcher, the backend index it ranks with: None for the exact numpy index).

    ``text_only``: with the torch-free text tower when it is cached (text queries)."""
    from cliplens.cli.scale import open_backend
    from cliplens.search import Searcher
    from cliplens.store import IndexStore

    store = IndexStore.open(args.index_dir or default_index_dir())
    index = open_backend(store, args) if hasattr(args, "backend") else None
    encoder = text_only_encoder(args, store.manifest) if text_only else None
    return Searcher(encoder=encoder or common.load_model(args, store.manifest), store=store, index=index), index


def _text_query(args) -> bool:
    """True when the query needs no image tower: words (any weights, + and -, #ID items), no image files."""
    from cliplens.query import parse_terms

    return not args.image and not any(t.kind == "image" for t in (parse_terms(args.query) if args.query else ()))


def cmd_search(args) -> int:
    import sys

    from cliplens.cli.scale import backend_label, backend_settings
    from cliplens.cli.study_models import resolve_min_score
    from cliplens.query import search_words

    text_only = _text_query(args)
    searcher, index = open_searcher(args, text_only=text_only)
    min_score = resolve_min_score(args.min_score, searcher, args.template)
    k = args.k
    if k > len(searcher.store) >= 1:
        print(f"cliplens: note: the index holds {len(searcher.store)} items, so showing {len(searcher.store)} "
              f"instead of {k}", file=sys.stderr)
        k = len(searcher.store)
    collapse = None if args.no_collapse else duplicate_threshold(searcher.store)
    result = search_words(searcher, args.query, k, images=args.image, similar=args.similar, where=args.where,
                          min_score=min_score, template=args.template, raw=args.raw, offset=args.offset,
                          sort={"oldest": "taken", "newest": "-taken"}.get(args.sort, args.sort), collapse=collapse,
                          paged=True)
    if args.paths:
        for h in result.hits:  # nothing else on stdout: for `| xargs open` and `| fzf`
            print(printable(item_path(searcher.store, h.id)))
    elif args.json:
        print(json.dumps({**result.to_json(), "backend": backend_settings(args, index)}, indent=2))
    else:
        print(format_result(result, searcher, backend=backend_label(args, index), absolute=args.absolute))
    if args.grid:
        path = save_result_grid(searcher, result, args.grid)
        if not args.json:
            print(f"grid saved to {path}")
    if text_only and not getattr(searcher.encoder, "text_only", False):
        _prepare_text_only(searcher.encoder)
    return 0


def _prepare_text_only(encoder) -> None:
    """After a text search that loaded torch: cache the text tower so later text searches need no torch."""
    import sys

    from cliplens import textonly

    if textonly.available() and getattr(encoder.info, "weights_sha256", None):
        sys.stdout.flush()
        print("preparing the text tower for torch-free searches (once per model) ...", file=sys.stderr, flush=True)
        textonly.build_cache(encoder)


def duplicate_threshold(store) -> float | None:
    """The near-duplicate threshold measured for this index's weights, when the model separates copies."""
    from cliplens.duplicates import recorded

    t = recorded(store.manifest.model)
    return t.threshold if t is not None and t.usable else None


def item_path(store, item_id: int) -> str:
    """The absolute path of an item's file (folder and list indexes)."""
    source = store.manifest.source
    if source is None or source.type not in ("folder", "list") or "path" not in store.items:
        raise CliplensError(f"the items of {store.root} are not files (a {source.name if source else 'data'} set): "
                            "--paths and --absolute need a folder or list index")
    return str(Path(source.root) / str(store.items["path"][item_id]))


def format_result(result, searcher, *, backend: str = "exact", absolute: bool = False) -> str:
    store = searcher.store
    lines = [f'query "{printable(result.query)}" -> prompt "{printable(result.prompt)}"  '
             f"({store.manifest.model.short_label()}, {len(store)} images, {backend} search)"]
    labelled = store.has_labels
    dated = result.extra.get("sort", "score") != "score" and "taken" in store.items
    captions = "caption" in store.items and not labelled
    header = f"{'rank':>4}  {'score':>7}  {'id':>6}  " + ("taken       " if dated else "") + (
        f"{'label':<22}{'superclass'}" if labelled else "path" if absolute else "ref")
    lines.append(header)
    for h in result.hits:
        mark = {True: " ✓", False: " ✗", None: ""}[h.match]
        if labelled:
            tail = f"{printable(h.label or '') + mark:<22}{h.superclass or ''}"
        else:
            tail = printable(item_path(store, h.id) if absolute else h.ref)
            caption = store.items["caption"][h.id] if captions else None
            if isinstance(caption, str) and caption:
                tail += f"  {printable(caption[:60] + ('...' if len(caption) > 60 else ''))}"
        if h.duplicates:
            tail += f"  (+{len(h.duplicates)} near-identical: {', '.join(f'#{i}' for i in h.duplicates[:5])})"
        when = f"{str(store.items['taken'][h.id] or '')[:10]:<12}" if dated else ""
        lines.append(f"{h.rank:>4}  {h.score:7.4f}  {h.id:>6}  {when}{tail}")
    if result.extra.get("more"):
        lines.append(f"more results: add --offset {result.extra.get('offset', 0) + len(result.hits)}")
    if result.precision_at_k is not None:
        lines.append(f'precision@{len(result.hits)} for class "{result.query_class}": {result.precision_at_k:.2f}')
    return "\n".join(lines)


def save_result_grid(searcher, result, path) -> Path:
    from cliplens.grid import save_grid, store_tiles

    tiles = store_tiles(searcher.store, [h.id for h in result.hits])
    captions = [f"{h.label or h.ref}\n{h.score:.3f} #{h.id}" for h in result.hits]
    title = f'"{result.prompt}"' + (f"  precision@{len(result.hits)} = {result.precision_at_k:.2f}"
                                    if result.precision_at_k is not None else "")
    try:
        return save_grid(path, tiles, captions, [h.match for h in result.hits], title=title)
    except ValueError as exc:
        raise CliplensError(str(exc)) from None


# --------------------------------------------------------------------------- info


def cmd_info(args) -> int:
    from cliplens.store import IndexStore

    store = IndexStore.open(args.index_dir or default_index_dir(), check=getattr(args, "check", False))
    m = store.manifest
    if args.json:
        print(json.dumps(m.to_json(), indent=2))
        return 0
    src = m.source
    fp = src.fingerprint if src else {}
    rows = [
        ("index", str(store.root) + (f" ({store.generation})" if store.generation else " (format 1)")),
        ("items", f"{m.count} x {m.embedding_dim} {m.dtype}"),
        ("source", f"{src.name if src else None} {(src.split if src else None) or ''}".strip()),
        ("root", src.root) if src and src.type in ("folder", "list") else
        ("verified", "official checksums" if fp.get("verified") else "not verified (--no-verify)"),
        ("model", m.model.short_label()),
        ("weights sha256", m.model.weights_sha256 or "none (random weights)"),
        ("preprocess", m.preprocess),
        ("classes", f"{len(store.class_names)} classes, {len(store.superclass_names)} superclasses"
         if store.has_labels else "no labels"),
        ("created", f"{m.created} by cliplens {m.cliplens_version}"),
    ]
    if fp.get("archive_md5"):
        rows.append(("archive md5", fp["archive_md5"]))
    for name, digest in sorted((fp.get("files") or {}).items()):
        rows.append((name.rsplit("/", 1)[-1] + " sha256", f"{digest.get('sha256')} (md5 {digest.get('md5')})"))
    if getattr(args, "check", False):
        rows.append(("check", "every vector finite, items and thumbnails match the manifest"))
    stats = m.stats
    if stats:
        batch = f" (batch {stats['batch_size']})" if stats.get("batch_size") else ""
        rows.append(("speed", f"{stats['images_per_second']} img/s{batch}"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


# --------------------------------------------------------------------------- demo


def cmd_demo(args) -> int:
    from cliplens.search import Searcher
    from cliplens.store import IndexStore

    args.split = "test"
    index_dir, encoder, result = index_cifar(args, "cifar100")
    encoder = encoder or common.load_model(args)  # None when the index was already complete: nothing needed it yet
    if result.embedded:
        ips = result.embedded / result.seconds if result.seconds > 0 else 0.0
        print(f"indexed {result.embedded} CIFAR-100 test images ({ips:.1f} img/s) -> {index_dir}")
    else:
        print(f"using the complete index in {index_dir}")
    searcher = Searcher(encoder=encoder, store=IndexStore.open(index_dir))
    out = Path(args.out)
    k = min(10, len(searcher.store))
    print(f"\n{'query':<11}{'precision@' + str(k):>13}  false positives")
    for name in CASE_STUDIES:
        result = searcher.search(name, k)
        wrong = Counter(h.label for h in result.hits if not h.match)
        fp = ", ".join(f"{lab} x{n}" for lab, n in wrong.most_common()) or "none"
        p = "n/a" if result.precision_at_k is None else f"{result.precision_at_k:.2f}"
        print(f"{name:<11}{p:>13}  {fp}")
        save_result_grid(searcher, result, out / f"{name}.png")
    print(f"\ngrids saved in {out}/ (green border: right class, red: wrong)")
    return 0


# --------------------------------------------------------------------------- registration


def register(sub) -> None:
    from cliplens.cli.scale import add_backend_flags, add_build_flags, add_engine_flags

    p = sub.add_parser("index", help="embed a data set into an index folder",
                       description="Embed a data set with CLIP into an index folder (resumable).")
    p.add_argument("source", help="cifar100, cifar10, the path of an image folder, or list (then FILE); folders "
                                  "and lists are indexed incrementally")
    p.add_argument("path", nargs="?", default=None, metavar="FILE",
                   help="with list: a .csv, .jsonl or .parquet file with a path column (optional caption, label); "
                        "paths are relative to the file's folder")
    p.add_argument("--split", default="test", choices=["train", "test"], help="CIFAR split to embed")
    p.add_argument("--data-dir", type=Path, default=None, help="where the data set is or goes (default $CLIPLENS_HOME/data)")
    p.add_argument("--no-verify", action="store_true", help="accept files whose md5 is not the official one")
    p.add_argument("--index-dir", type=Path, default=None, help="output folder (default $CLIPLENS_HOME/indexes/SOURCE-SPLIT)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="index only the first N images (default folder: SOURCE-SPLIT-firstN)")
    p.add_argument("--rebuild", action="store_true",
                   help="replace a complete index built with other settings (weights, dtype, limit, precision)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per batch (default: chosen by a quick probe of the model and device)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16"], help="storage type of the embeddings")
    p.add_argument("--checkpoint-every", type=positive_int, default=4, help="batches between resume checkpoints")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="folders: skip matching paths (repeatable)")
    p.add_argument("--include-hidden", action="store_true", help="folders: also index hidden files and folders")
    p.add_argument("--max-megapixels", type=float, default=100.0, help="folders: skip larger images (default 100)")
    p.add_argument("--force", action="store_true",
                   help="replace an index of the other kind (CIFAR over a folder index, or the reverse) in --index-dir")
    add_model_flags(p)
    add_backend_flags(p)
    add_build_flags(p)
    add_engine_flags(p)
    p.set_defaults(handler=cmd_index)

    p = sub.add_parser("search", help="search an index by text, image or both",
                       description='Rank an index\'s images by a query: text, or combined: "2:red tractor" + ./field.jpg - snow + #12.')
    p.add_argument("query", nargs="*", help="words; W:term weights a term, + and - combine terms, #ID is an item")
    p.add_argument("--image", action="append", default=[], type=str, metavar="PATH", help="search by an image file")
    p.add_argument("--similar", action="append", default=[], type=int, metavar="ID", help="more like item ID")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="filter: label=..., superclass=..., path=GLOB, caption=... (repeatable)")
    from cliplens.cli.study_models import min_score_arg

    p.add_argument("--min-score", type=min_score_arg, default=None,
                   help="drop hits below this cosine similarity (-1..1); 'calibrated': the threshold "
                        "`cliplens calibrate` recorded for this model and template")
    p.add_argument("--index-dir", type=Path, default=None, help=INDEX_DIR_HELP)
    p.add_argument("-k", type=int, default=10, help="number of results (1..N)")
    p.add_argument("--template", "--templates", default="a photo of a {}.", metavar="TEMPLATE|SET",
                   help='prompt template with one "{}", or a set: single, cifar100, imagenet80')
    p.add_argument("--raw", action="store_true", help="encode the query exactly as typed (no template)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--grid", type=Path, default=None, help="save the results as an image grid (PNG)")
    p.add_argument("--paths", action="store_true",
                   help="print only the absolute paths of the hits, one per line (for | xargs open, | fzf)")
    p.add_argument("--absolute", action="store_true", help="show absolute paths in the table")
    p.add_argument("--offset", type=non_negative_int, default=0, help="skip this many results (the next page)")
    p.add_argument("--sort", default="score", choices=["score", "taken", "oldest", "newest"],
                   help="order the hits above the score cut by date taken (taken or oldest: oldest first; newest)")
    p.add_argument("--no-collapse", action="store_true",
                   help="show near-identical images separately (by default they are collapsed into the best one "
                        "when a threshold is measured for the model: cliplens duplicates)")
    add_model_flags(p, for_query=True)
    add_backend_flags(p)
    p.set_defaults(handler=cmd_search)

    p = sub.add_parser("info", help="describe an index", description="Show what an index holds and how it was built.")
    p.add_argument("--index-dir", type=Path, default=None, help=INDEX_DIR_HELP)
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--check", action="store_true", help="check every vector (not a sample) and every file")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser("demo", help="the main job: index CIFAR-100 test and run the four case studies",
                       description="Fetch CIFAR-100 test, index it with ViT-B/32 and run tractor, tulip, seal, telephone.")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="where CIFAR-100 is or goes (default $CLIPLENS_HOME/data)")
    p.add_argument("--no-verify", action="store_true",
                   help="accept CIFAR files whose md5 is not the official one (their sha256 is recorded)")
    p.add_argument("--index-dir", type=Path, default=None,
                   help="the index folder (default $CLIPLENS_HOME/indexes/cifar100-test, or "
                        "cifar100-test-firstN with --limit N)")
    p.add_argument("--out", default="cliplens-demo", help="folder for the result grids (default ./cliplens-demo)")
    p.add_argument("--limit", type=positive_int, default=None, help="index only the first N test images (default all)")
    p.add_argument("--rebuild", action="store_true",
                   help="replace a complete index built with other settings (weights, dtype, limit, precision)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per batch (default: chosen by a quick probe of the model and device)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_model_flags(p)
    p.set_defaults(handler=cmd_demo)

