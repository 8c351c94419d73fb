"""Is there nothing to do? Decided before any model loads, so re-running ``cliplens index`` on unchanged data
takes a fraction of a second instead of the seconds that importing torch and loading CLIP take.

Each check answers "the index in this folder is exactly what this command would write" and returns None when it
cannot be sure, so the caller takes the full path (which then finds out itself, as before). The model is the
same when the flags name the model the index records and its weights file still hashes to the recorded sha256
(:func:`cliplens._files.cached_sha256`: by path, size and mtime, as the weights are always checked).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cliplens.manifest import Manifest, ModelInfo
from cliplens.store import read_current_manifest

log = logging.getLogger(__name__)


def same_model(built: ModelInfo, args) -> bool:
    """True when ``args`` (--model, --pretrained, --weights, --precision) ask for the model ``built`` records,
    decided without loading it (:func:`cliplens.indexing.lazy.same_request`). Exact precision on the CPU only:
    a fast or accelerator encoder is chosen at load time, so only loading can tell."""
    from cliplens.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED
    from cliplens.indexing.lazy import same_request

    if getattr(args, "precision", "exact") != "exact" or built.precision != "exact":
        return False
    if getattr(args, "device", "auto") not in ("auto", "cpu"):
        return False
    name = args.model or DEFAULT_MODEL
    if built.name != name:
        return False
    pretrained = None if args.weights else (args.pretrained or DEFAULT_PRETRAINED)
    if args.weights is None and built.weights_path is None:
        return False  # random weights, or a tag whose file was not recorded: load to be sure
    return same_request(built, name=name, pretrained=pretrained, weights=args.weights, precision="exact")


def labeled_complete(index_dir: Path, data, args) -> Manifest | None:
    """The manifest when ``index_dir`` already holds ``data`` (``LabeledImages``) embedded as ``args`` ask."""
    index_dir = Path(index_dir).expanduser()
    manifest = read_current_manifest(index_dir)
    if manifest is None or not same_model(manifest.model, args):
        return None
    identity = manifest.identity
    want = {"source": data.source, "split": data.split, "count": len(data), "dtype": getattr(args, "dtype", "float32"),
            "files": {"verified": data.fingerprint.get("verified"), "files": data.fingerprint.get("files")}}
    if any(identity.get(k) != v for k, v in want.items()):
        return None
    if args.batch_size is not None and identity.get("batch_size") != args.batch_size:
        return None
    return manifest


def folder_unchanged(root: Path, index_dir: Path, args):
    """A :class:`~cliplens.folder_index.FolderIndexSummary` of nothing done, when every file under ``root`` has
    the path, size and mtime the index records (captions included) and the flags are the ones it was built with;
    else None."""
    from cliplens.sources.folder import read_sidecar, walk_folder
    from cliplens.folder_index import FolderIndexSummary
    from cliplens.items import LazyItems
    from cliplens.store import ITEMS, index_files

    root, index_dir = Path(root).expanduser().resolve(), Path(index_dir).expanduser()
    manifest = read_current_manifest(index_dir)
    if manifest is None or manifest.source is None:
        return None
    source = manifest.source
    flags = {"exclude": list(args.exclude), "include_hidden": args.include_hidden,
             "max_megapixels": args.max_megapixels}
    if (source.type != "folder" or source.root != str(root) or any(source.options.get(k) != v for k, v in flags.items())
            or manifest.identity.get("dtype") != getattr(args, "dtype", "float32")):
        return None
    if not same_model(manifest.model, args):
        return None
    from cliplens.folder_index import PHOTOS_FORMAT

    if manifest.identity.get("photos") != PHOTOS_FORMAT:
        return None  # written before thumbnails and metadata were stored: the full path adds them
    try:
        items = LazyItems(index_files(index_dir) / ITEMS)
        indexed = list(zip(items["path"], items["size"].tolist(), items["mtime_ns"].tolist()))
        captions = list(zip(items["caption"], items["meta"]))
    except Exception:  # an unreadable or older index: the full path decides
        return None
    skipped = (manifest.folder or {}).get("skipped", [])
    unusable: list[tuple[str, str]] = []  # link loops, links out, names that are not UTF-8 (recorded without size)
    files = walk_folder(root, exclude=args.exclude, include_hidden=args.include_hidden, skipped=unusable)
    if {b["path"] for b in skipped if b.get("size") is None} != {rel for rel, _ in unusable}:
        return None
    bad = {(b["path"], b.get("size"), b.get("mtime_ns")) for b in skipped if b.get("size") is not None}
    listing = [(f.rel, f.size, f.mtime_ns) for f in files]
    if [x for x in listing if x not in bad] != [(str(p), int(s), int(m)) for p, s, m in indexed]:
        return None
    if len(listing) - len(indexed) != len(bad):
        return None
    if [read_sidecar(root / rel, root=root) for rel, _, _ in indexed] != [(c, m) for c, m in captions]:
        return None
    for b in skipped:
        log.warning("skipped %s: %s", b["path"], b["reason"])
    return FolderIndexSummary(root=str(root), index_dir=str(index_dir), total=len(indexed), added=0, updated=0,
                              removed=0, reused=0, unchanged=len(indexed), skipped=len(skipped),
                              skipped_files=tuple((b["path"], b["reason"]) for b in skipped))
