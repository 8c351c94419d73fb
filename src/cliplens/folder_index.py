"""Incremental indexing of an image folder, on top of the store's IndexWriter.

Each run compares the folder with the index already in ``index_dir`` (if any):

- a file whose path, size and mtime are unchanged keeps its vector (nothing is read);
- any other file is hashed (sha256); if an indexed file had the same content (a move, a rename, a copy, or
  a ``touch``) its vector is reused, otherwise the file is decoded and embedded (added or updated);
- indexed paths that are gone, and whose content did not move elsewhere, are removed;
- files that cannot be decoded, or claim more than ``max_megapixels``, are skipped with one warning each.

The whole run holds the index folder's writer lock. New embeddings go through ``embed_into`` (or ``embed_fn``, e.g.
the Ray engine's: same contract) into a resumable "pending" build in the index folder's own scratch space (see
:mod:`cliplens.layout`), so an interrupted run continues where it stopped without embedding anything twice. The
finished index is then written whole, in sorted path order, as a new generation: until it is complete, the
previous index stays the current one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cliplens.sources.folder import (
    DEFAULT_MAX_MEGAPIXELS,
    FolderFile,
    FolderSource,
    ImageSkipped,
    allow_pixels,
    probe_image,
    sha256_file,
)
from cliplens.embed import choose_batch_size, embed_into
from cliplens.errors import DatasetError, IndexExistsError, StoreError
from cliplens.layout import IndexFolder
from cliplens.store import PARTIAL, IndexStore, IndexWriter, read_current_manifest

log = logging.getLogger(__name__)

PHOTOS_FORMAT = 1  # what a folder generation stores besides vectors (metadata and thumbnails, cliplens.sources.photos)

_COPY_ROWS = 8192  # rows copied per write when assembling the index (8192 x 512 x 4 B = 16 MB)


@dataclass(frozen=True)
class FolderIndexOptions:
    exclude: tuple[str, ...] = ()
    include_hidden: bool = False
    max_megapixels: float = DEFAULT_MAX_MEGAPIXELS
    batch_size: int | None = 32  # None: chosen by a quick probe of the model and device
    dtype: str = "float32"
    workers: int = 2  # decoding threads
    progress: bool = True
    rebuild: bool = False  # replace an index built with another model or dtype (else refused: IndexExistsError)
    replace_other: bool = False  # an index of another kind (CIFAR) in index_dir is replaced instead of refused

    @property
    def max_pixels(self) -> int:
        return int(self.max_megapixels * 1_000_000)


@dataclass(frozen=True)
class FolderIndexSummary:
    root: str
    index_dir: str
    total: int  # items in the index now
    added: int
    updated: int
    removed: int
    reused: int  # vectors taken over from another path with the same content (moved, renamed, copied)
    unchanged: int
    skipped: int
    skipped_files: tuple[tuple[str, str], ...] = field(default=())  # (relative path, reason)
    embedded_seconds: float = 0.0

    def line(self) -> str:
        """``9 added, 0 updated, 0 removed, 0 reused, 3 skipped: 1 too large, 2 unreadable (0 unchanged; ...)``."""
        why = skip_breakdown(r for _, r in self.skipped_files)
        return (f"{self.added} added, {self.updated} updated, {self.removed} removed, {self.reused} reused, "
                f"{self.skipped} skipped{': ' + why if why else ''} ({self.unchanged} unchanged; {self.total} images "
                f"in {self.index_dir})")

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["skipped_files"] = [{"path": p, "reason": r} for p, r in self.skipped_files]
        return d


def skip_kind(reason: str) -> str:
    """The short kind of a skip reason, for the summary line: "unsupported .cr2", "unreadable", "too large"..."""
    r = reason.lower()
    if r.startswith("unsupported"):
        return reason.split(" (")[0]
    if "megapixel" in r or "bomb" in r:
        return "too large"
    if "link" in r:
        return "unusable link"
    if "utf-8" in r:
        return "bad name"
    if "not a regular file" in r:
        return "not a file"
    return "unreadable"


def skip_breakdown(reasons) -> str:
    """``1 unsupported .cr2, 2 unreadable``: skipped files counted by kind, largest first."""
    from collections import Counter

    counts = Counter(skip_kind(r) for r in reasons)
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class _ZeroFailed:
    """Writer proxy that stores zero rows for failed images: encoder output is never zero, so zero = skipped."""

    def __init__(self, writer: IndexWriter, failed: dict[int, str]):
        self.writer, self.failed = writer, failed

    @property
    def root(self):  # what the Ray engine needs of a writer: where to keep its shards, and for which job
        return self.writer.root

    @property
    def identity(self) -> dict:
        return self.writer.identity

    @property
    def scratch(self):
        return self.writer.scratch

    def close(self) -> None:
        self.writer.close()

    def start(self) -> int:
        return self.writer.start()

    def write(self, start: int, vectors: np.ndarray) -> None:
        bad = [i - start for i in self.failed if start <= i < start + len(vectors)]
        if bad:
            vectors = vectors.copy()
            vectors[bad] = 0
        self.writer.write(start, vectors)

    def checkpoint(self, rows_done: int) -> None:
        self.writer.checkpoint(rows_done)


@dataclass
class _Plan:
    """What to do with each file: keep a previous vector, embed it, or skip it."""

    keep: dict = field(default_factory=dict)  # rel -> ("unchanged" | "reused", sha256, previous row)
    todo: list = field(default_factory=list)  # (FolderFile, sha256, "added" | "updated")
    skipped: list = field(default_factory=list)  # (rel, reason)


def _previous(index_dir: Path, info, kind: str = "folder", replace_other: bool = False, *, dtype: str = "float32",
              rebuild: bool = False):
    """The existing index of this kind in ``index_dir`` if its vectors can be reused with this model, else None."""
    if read_current_manifest(index_dir) is None:
        return None
    try:
        store = IndexStore.open(index_dir)
    except StoreError as exc:
        log.warning("ignoring the unreadable index in %s (%s); re-embedding everything", index_dir, exc)
        return None
    source = store.manifest.source
    if source is None or source.type != kind:
        if replace_other:
            return None
        raise DatasetError(f"{index_dir} holds a {source.name if source else 'data set'} index, not a {kind} "
                           "index: choose another index folder")
    built = store.manifest.model
    changed = [word for word, same in (("model", built.name == info.name),
                                       ("weights", built.weights_sha256 == info.weights_sha256),
                                       ("embedding size", store.dim == info.embed_dim),
                                       ("precision", (built.precision or "exact") == info.precision),
                                       ("dtype", str(store.embeddings.dtype) == dtype)) if not same]
    if changed and not rebuild:
        raise IndexExistsError(index_dir, f"{', '.join(changed)} differ")
    if changed:
        log.warning("%s was built with another %s; re-embedding everything", index_dir, " and ".join(changed))
        return None
    return store


def _plan(root: Path, files: list[FolderFile], prev, options: FolderIndexOptions) -> _Plan:
    from tqdm import tqdm

    plan = _Plan()
    items = prev.items if prev is not None else {}
    by_rel = {str(r): i for i, r in enumerate(items.get("path", ()))}
    by_sha: dict[str, int] = {}
    for i, sha in enumerate(items.get("sha256", ())):
        by_sha.setdefault(str(sha), i)
    same_root = prev is not None and prev.manifest.source.root == str(root)
    known_bad = {(b["path"], b.get("size"), b.get("mtime_ns")): b["reason"]  # unchanged bad files: not retried
                 for b in ((prev.manifest.folder or {}).get("skipped", []) if same_root else [])}
    need_hash = []
    for f in files:
        i = by_rel.get(f.rel)
        if (f.rel, f.size, f.mtime_ns) in known_bad:
            plan.skipped.append((f.rel, known_bad[f.rel, f.size, f.mtime_ns]))
        elif i is not None and same_root and (int(items["size"][i]), int(items["mtime_ns"][i])) == (f.size, f.mtime_ns):
            plan.keep[f.rel] = ("unchanged", str(items["sha256"][i]), i)
        else:
            need_hash.append(f)
    bar = tqdm(total=sum(f.size for f in need_hash), unit="B", unit_scale=True, desc="hashing",
               disable=not options.progress or not need_hash, dynamic_ncols=True)
    for f in need_hash:
        bar.update(f.size)
        try:
            sha = sha256_file(root / f.rel)
        except OSError as exc:
            plan.skipped.append((f.rel, f"cannot read ({exc.strerror})"))
            continue
        j = by_sha.get(sha)
        if j is not None:  # this content is indexed already: a move, rename, copy, or touch
            same_path = f.rel in by_rel and str(items["sha256"][by_rel[f.rel]]) == sha
            plan.keep[f.rel] = ("unchanged" if same_path else "reused", sha, j)
            continue
        try:
            probe_image(root / f.rel, max_pixels=options.max_pixels)  # header only: bombs stop here, cheaply
        except ImageSkipped as exc:
            plan.skipped.append((f.rel, exc.reason))
            continue
        plan.todo.append((f, sha, "updated" if f.rel in by_rel else "added"))
    bar.close()
    return plan


def fast_decode_size(info) -> int | None:
    """The reduced JPEG decode of ``--precision fast`` (None in exact mode, whose pixels equal open_clip's): both
    sides at least twice the model's input and at least the 512 px thumbnail made from the same decode. A
    12-megapixel JPEG then decodes at 1/4 or 1/8 scale, several times faster; agreement with exact is measured
    (tests/unit/test_fast_decode.py, docs/performance.md)."""
    if not str(getattr(info, "precision", "exact")).startswith("fast"):
        return None
    from cliplens.sources.photos import THUMB_SIZES

    return max(2 * int(info.image_size), max(THUMB_SIZES))


def index_folder(root: str | Path, encoder, index_dir: str | Path, *,
                 options: FolderIndexOptions = FolderIndexOptions(),
                 embed_fn: Callable | None = None) -> FolderIndexSummary:
    """Bring ``index_dir`` up to date with the images under ``root``; see the module docstring.

    ``embed_fn`` replaces :func:`cliplens.embed.embed_into` for the new and changed images (same signature), e.g.
    ``RayEngine(...).embed_into``; which images are embedded, reused or removed does not depend on it.
    """
    from cliplens.indexing.listings import FolderListing

    listing = FolderListing(root, exclude=tuple(options.exclude), include_hidden=options.include_hidden)
    return index_files(listing, encoder, index_dir, options=options, embed_fn=embed_fn)


def index_files(listing, encoder, index_dir: str | Path, *, options: FolderIndexOptions = FolderIndexOptions(),
                embed_fn: Callable | None = None, reuse: bool = True) -> FolderIndexSummary:
    """Bring ``index_dir`` up to date with the files of ``listing`` (a folder, an image list: see
    :mod:`cliplens.indexing.listings`), incrementally; see the module docstring. ``reuse=False`` embeds every
    file again (no vector is taken from the index there)."""
    index_dir = Path(index_dir).expanduser()
    allow_pixels(options.max_pixels)
    folder = IndexFolder.claim(index_dir)  # refuses a folder that is not an index; one writer at a time
    try:
        return _index_files(listing, encoder, index_dir, folder, options, embed_fn, reuse)
    finally:
        folder.release()


def _index_files(listing, encoder, index_dir: Path, folder: IndexFolder, options, embed_fn, reuse: bool):
    info, root, files = encoder.info, listing.root, listing.files
    prev = (_previous(index_dir, info, listing.kind, options.replace_other, dtype=options.dtype,
                      rebuild=options.rebuild) if reuse else None)
    plan = _plan(root, files, prev, options)
    plan.skipped[:0] = listing.refused

    # ---- embed what is new, resumably, in index_dir/pending
    t0 = time.perf_counter()
    todo = plan.todo
    new_vectors = np.zeros((0, info.embed_dim), np.float32)
    fresh_thumbs: dict = {}  # rel -> thumbnails made while embedding (local engine)
    if todo:
        new_vectors, failed = _embed_pending(root, [t[0].rel for t in todo], [t[1] for t in todo], encoder,
                                             folder, options, embed_fn=embed_fn, thumbs=fresh_thumbs)
        plan.skipped += [(todo[pos][0].rel, reason) for pos, reason in sorted(failed.items())]
    embedded_seconds = time.perf_counter() - t0
    for rel, reason in plan.skipped:
        log.warning("skipped %s: %s", rel, reason)

    # ---- assemble every usable file, in path order
    failed_rels = {rel for rel, _ in plan.skipped}
    new_pos = {t[0].rel: p for p, t in enumerate(todo)}
    counts = dict(added=0, updated=0, reused=0, unchanged=0)
    rows: list[tuple[FolderFile, str, str, int]] = []  # (file, sha256, "prev"/"new", row there)
    for f in files:
        if f.rel in plan.keep and f.rel not in failed_rels:
            how, sha, i = plan.keep[f.rel]
            rows.append((f, sha, "prev", i))
        elif f.rel in new_pos and f.rel not in failed_rels:
            _, sha, how = todo[new_pos[f.rel]]
            rows.append((f, sha, "new", new_pos[f.rel]))
        else:
            continue
        counts[how] += 1
    if not rows:
        raise DatasetError(f"no usable images {listing.describe()} ({len(files)} image files found, "
                           f"{len(plan.skipped)} skipped): check the path and the exclusions")
    present = {f.rel for f in files}
    moved = {sha for how, sha, _ in plan.keep.values() if how == "reused"}
    removed = 0 if prev is None else sum(1 for rel, sha in zip(prev.items["path"], prev.items["sha256"])
                                         if str(rel) not in present and str(sha) not in moved)
    summary = FolderIndexSummary(root=str(root), index_dir=str(index_dir), total=len(rows), removed=removed,
                                 skipped=len(plan.skipped), skipped_files=tuple(plan.skipped),
                                 embedded_seconds=embedded_seconds, **counts)
    _write_index(folder, listing, info, rows, prev, new_vectors, files, summary, options, fresh_thumbs)
    return summary


def _write_index(folder: IndexFolder, listing, info, rows, prev, new_vectors, files, summary,
                 options, fresh_thumbs=None) -> None:
    from cliplens.sources import photos

    prev_emb = prev.embeddings if prev is not None else None
    root, rels = listing.root, [f.rel for f, *_ in rows]
    columns = listing.columns(rels)
    class_names = listing.class_names(rels)
    per_row = [[f.rel, f.size, f.mtime_ns, sha] for f, sha, _, _ in rows]
    fingerprint = hashlib.sha256(json.dumps([per_row, columns, class_names], ensure_ascii=False).encode()).hexdigest()
    identity = {"model": info.name, "pretrained": info.pretrained, "weights_sha256": info.weights_sha256,
                "precision": info.precision, "source": listing.kind, "root": str(root), "count": len(rows),
                "fingerprint": fingerprint, "dtype": options.dtype, "photos": PHOTOS_FORMAT}
    writer = IndexWriter(root=folder.root, identity=identity, dim=info.embed_dim, folder=folder)
    if writer.is_complete():  # same files, same captions, same model: nothing to write
        return
    writer.start()
    for lo in range(0, len(rows), _COPY_ROWS):
        chunk = rows[lo : lo + _COPY_ROWS]
        block = np.empty((len(chunk), info.embed_dim), np.float32)
        for r, (_, _, src, i) in enumerate(chunk):
            block[r] = prev_emb[i] if src == "prev" else new_vectors[i]
        writer.write(lo, block)
    writer.checkpoint(len(rows))
    # metadata and thumbnails (cliplens.sources.photos): taken over from the previous generation by content
    photo_cols = photos.build_thumbs([(f.rel, f.mtime_ns, sha) for f, sha, _, _ in rows], root=root,
                                     out=writer.scratch / photos.THUMBS, max_pixels=options.max_pixels,
                                     reuse=_photo_reuse(prev), fresh=fresh_thumbs, progress=options.progress)
    items = {
        "id": np.arange(len(rows), dtype=np.int64),
        "ref": [f.rel for f, *_ in rows],
        "path": [f.rel for f, *_ in rows],
        "mtime_ns": np.array([f.mtime_ns for f, *_ in rows], np.int64),
        "size": np.array([f.size for f, *_ in rows], np.int64),
        "sha256": [sha for _, sha, _, _ in rows],
        **columns,
        **{c: photo_cols[c] for c in photos.META_COLUMNS},
        **{c: np.asarray(photo_cols[c], np.int64) for c in photos.THUMB_COLUMNS},
    }
    by_file = {f.rel: f for f in files}
    n_new = summary.added + summary.updated
    seconds = summary.embedded_seconds
    manifest = {
        "model": dict(info.__dict__),
        "preprocess": info.preprocess,
        "source": {**listing.source(), "max_megapixels": options.max_megapixels,
                   "fingerprint": {"verified": None, "sha256": fingerprint}},
        "class_names": list(class_names) if class_names else None,
        "superclass_names": None,
        "fine_to_coarse": None,
        "folder": {"summary": {k: v for k, v in summary.to_json().items() if k != "skipped_files"},
                   "skipped": [{"path": rel, "reason": reason, "size": getattr(by_file.get(rel), "size", None),
                                "mtime_ns": getattr(by_file.get(rel), "mtime_ns", None)}
                               for rel, reason in summary.skipped_files]},
        "stats": {"seconds": round(seconds, 3), "batch_size": options.batch_size,  # this run's embedding
                  "images_per_second": round(n_new / seconds, 2)} if n_new and seconds > 0 else None,
    }
    writer.finalize(items=items, manifest=manifest)


def _photo_reuse(prev):
    """sha256 -> (metadata, 256 px WebP, 512 px WebP) held by the previous generation, or None."""
    from cliplens.sources import photos

    if prev is None or not all(c in prev.items for c in (*photos.META_COLUMNS, *photos.THUMB_COLUMNS)):
        return None
    by_sha = {str(s): i for i, s in enumerate(prev.items["sha256"])}
    columns = {c: prev.items[c] for c in (*photos.META_COLUMNS, *photos.THUMB_COLUMNS)}  # read once, here
    thumbs = photos.ThumbFile(prev.files / photos.THUMBS, columns)

    def reuse(sha):
        i = by_sha.get(sha)
        if i is None:
            return None
        try:
            small, big = thumbs.read(i, 256), thumbs.read(i, 512)
        except OSError:
            return None
        if not small or not big:
            return None
        meta = {c: _plain(columns[c][i]) for c in photos.META_COLUMNS}
        return meta, small, big

    return reuse


def _plain(value):
    """A numpy scalar as a Python value; NaN (a missing float in parquet) as None."""
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and value != value else value


def _embed_pending(root: Path, rels: list[str], shas: list[str], encoder, folder: IndexFolder,
                   options: FolderIndexOptions, *, embed_fn: Callable | None = None,
                   thumbs: dict | None = None) -> tuple[np.ndarray, dict[int, str]]:
    """Embed ``rels`` into a resumable "pending" build of ``folder``; return (vectors, failed position -> reason).

    The build stays in the folder's scratch space until the new generation is committed, so a run killed while
    assembling the index finds these vectors again."""
    info = encoder.info
    batch_size = options.batch_size or choose_batch_size(encoder)  # fixed here: a resumed run batches the same way
    identity = {"model": info.name, "weights_sha256": info.weights_sha256, "precision": info.precision,
                "source": "folder-pending", "count": len(rels),
                "fingerprint": hashlib.sha256(json.dumps([rels, shas]).encode()).hexdigest(),
                "dtype": "float32", "batch_size": batch_size}
    writer = IndexWriter(root=folder.root, identity=identity, dim=info.embed_dim, kind="pending", folder=folder)
    made: dict[int, tuple] = {}  # position -> thumbnails, made by the decoding threads (local engine only)
    in_process = embed_fn is None or getattr(getattr(embed_fn, "__self__", None), "in_process", False)
    source = FolderSource(root, rels, max_pixels=options.max_pixels, thumbs=made if in_process else None,
                          reduce_to=fast_decode_size(info))
    if in_process:  # the image tower gets ready while the first batches decode
        getattr(encoder, "prepare_images_in_background", lambda: None)()
    (embed_fn or embed_into)(source, encoder, _ZeroFailed(writer, source.failed), batch_size=batch_size,
                             checkpoint_every=1, workers=options.workers, progress=options.progress)
    writer.close()
    vectors = np.load(writer.scratch / PARTIAL)
    failed = dict(source.failed)
    for pos in np.flatnonzero(~vectors.any(axis=1)):  # zero rows: failed here or in an interrupted earlier run
        failed.setdefault(int(pos), "could not be decoded")
    if thumbs is not None:
        thumbs.update({rels[pos]: t for pos, t in made.items() if pos not in failed})
    return vectors, failed
