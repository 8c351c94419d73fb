"""The on-disk index: one folder holding everything a search needs, read and checked here.

    INDEX_DIR/CURRENT -> gen-000003/
      manifest.json      what was embedded, how, with which weights; the digest of items.parquet (cliplens.manifest)
      embeddings.npy     float32 (default) or float16 (N, D) unit rows, memory-mapped on load
      items.parquet      id, ref, label, label_name, superclass, superclass_name (+ source-specific columns)
      images.npy         optional uint8 (N, H, W, 3) thumbnails for tiny-image sources (CIFAR: 30 MB for 10k)

How the folder is laid out, claimed, locked and switched from one generation to the next: :mod:`cliplens.layout`;
how a generation is written, resumably: :mod:`cliplens.writer`. :meth:`IndexStore.open` resolves CURRENT once,
so every file it reads comes from one generation, and refuses a damaged one with one line naming the file: the
manifest's schema, the vectors' shape and dtype, the items' columns, row count and digest, ids and label ranges,
the thumbnails' shape, and finite vectors (a sample of rows; every row with ``check=True``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from cliplens import manifest as manifest_io
from cliplens._files import file_digest
from cliplens.errors import ModelMismatchError, StoreError
from cliplens.layout import SCRATCH_META, builds, current_generation, is_format1
from cliplens.manifest import Manifest, ModelInfo
from cliplens.writer import (  # noqa: F401  (the writer's names, importable from the store as before)
    DTYPES,
    EMBEDDINGS,
    IMAGES,
    ITEMS,
    MANIFEST,
    PARTIAL,
    PROGRESS,
    THUMBS,
    IndexWriter,
    write_items,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = manifest_io.SCHEMA_VERSION
FINITE_SAMPLE = 4096  # rows checked for NaN/inf when an index opens (all of them with check=True)
_CHECK_ROWS = 65536  # rows per chunk of a full check


def index_files(root: str | Path) -> Path:
    """The folder holding the current generation's files (the index folder itself for a format-1 index)."""
    root = Path(root).expanduser()
    return current_generation(root) or root


def read_current_manifest(root: str | Path) -> Manifest | None:
    """The current generation's manifest, or None when there is none (or it cannot be read)."""
    root = Path(root).expanduser()
    try:
        gen = current_generation(root)
        if gen is None and not is_format1(root):
            return None
        return manifest_io.read((gen or root) / MANIFEST)
    except StoreError:
        return None


def _incomplete(root: Path) -> str | None:
    """How far an unfinished build got, for the message: "64 of 200", or None when there is none."""
    candidates = [b / PROGRESS for b in builds(root)] + [root / PROGRESS]
    for path in candidates:
        try:
            state = json.loads(path.read_text())
            if path.parent != root and json.loads((path.parent / SCRATCH_META).read_text()).get("kind") != "index":
                continue
            return f"{state.get('rows_done', '?')} of {state.get('identity', {}).get('count', '?')}"
        except (OSError, ValueError, AttributeError):
            continue
    return None


class IndexStore:
    """A complete index generation, opened read-only. Embeddings stay on disk (memory-mapped)."""

    def __init__(self, root: Path, manifest: Manifest, embeddings: np.ndarray, items: dict[str, np.ndarray],
                 files: Path | None = None):
        self.root = root  # the index folder (what users name; backends keep their files here)
        self.files = files or root  # the generation folder the data below was read from
        self.manifest = manifest
        self.embeddings = embeddings
        self.items = items  # column name -> numpy array (object arrays for strings), read lazily

    @property
    def generation(self) -> str:
        return self.files.name if self.files != self.root else ""

    @classmethod
    def open(cls, root: str | Path, *, check: bool = False) -> "IndexStore":
        root = Path(root).expanduser()
        if not root.is_dir():
            raise StoreError(f"no index at {root}: build one with `cliplens index ... --index-dir {root}`")
        files = current_generation(root)
        if files is None:
            if not is_format1(root):
                done = _incomplete(root)
                if done:
                    raise StoreError(f"index at {root} is incomplete ({done} images embedded): "
                                     "run the same `cliplens index` command again to resume it")
                if builds(root) or (root / PARTIAL).exists():  # (PARTIAL: what a format-1 build left at the top)
                    raise StoreError(f"index at {root} is unfinished (an indexing run stopped before it completed): "
                                     "run the same `cliplens index` command again to finish it")
                raise StoreError(f"{root} is not a cliplens index (no {MANIFEST}): build one with `cliplens index`")
            files = root  # format 1: the files at the top of the folder
        manifest = manifest_io.read(files / MANIFEST)
        store = cls(root, manifest, *_read_data(root, files, manifest), files=files)
        store.validate(full=check)
        return store

    def refreshed(self) -> "IndexStore":
        """This store, or the folder's newer generation when one has been completed since it was opened."""
        try:
            if current_generation(self.root) in (None, self.files):
                return self
            return IndexStore.open(self.root)
        except StoreError as exc:
            log.warning("keeping generation %s of %s: the new one cannot be opened (%s)", self.generation,
                        self.root, exc)
            return self

    # ---------------------------------------------------------------- validation
    def _bad(self, name: str, what: str) -> StoreError:
        return StoreError(f"index at {self.root} is corrupt: {self.files / name} {what}; rebuild it with "
                          f"`cliplens index ... --index-dir {self.root}`")

    def validate(self, *, full: bool = False) -> None:
        """Counts, dims, dtypes, ids, label ranges, thumbnails, finiteness (sampled unless ``full``).

        ``fine_to_coarse`` may hold -1: a class without images in this split has no known superclass."""
        m, n = self.manifest, len(self)
        if not np.array_equal(np.asarray(self.items["id"]), np.arange(n)):
            raise self._bad(ITEMS, f"has ids that are not 0..{n - 1} in order")
        for col, names in (("label", m.class_names), ("superclass", m.superclass_names)):
            if names and col in self.items and n:
                values = np.asarray(self.items[col])
                if values.dtype.kind not in "iu" or values.min() < 0 or values.max() >= len(names):
                    raise self._bad(ITEMS, f"has {col} values outside 0..{len(names) - 1}")
        f2c, n_sup = m.fine_to_coarse, len(m.superclass_names or ())
        if f2c is not None and (len(f2c) != len(m.class_names or ()) or any(not -1 <= c < n_sup for c in f2c)):
            raise self._bad(MANIFEST, "has a fine_to_coarse map that does not fit its class names")
        if (self.files / IMAGES).is_file():
            try:
                images = np.load(self.files / IMAGES, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise self._bad(IMAGES, f"cannot be read ({type(exc).__name__})") from None
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != n or images.shape[3] != 3:
                raise self._bad(IMAGES, f"is {images.dtype}{images.shape}, expected uint8 ({n}, H, W, 3)")
        if (self.files / THUMBS).is_file() and "thumb_offset" in self.items and n:
            ends = (np.asarray(self.items["thumb_offset"], np.int64) + np.asarray(self.items["thumb_256"], np.int64)
                    + np.asarray(self.items["thumb_512"], np.int64))
            size = (self.files / THUMBS).stat().st_size
            if ends.max() > size or (np.asarray(self.items["thumb_offset"]) < 0).any():
                raise self._bad(THUMBS, f"is {size} bytes, shorter than its items say ({int(ends.max())})")
        if full:
            for lo in range(0, n, _CHECK_ROWS):
                if not np.isfinite(np.asarray(self.embeddings[lo : lo + _CHECK_ROWS], np.float32)).all():
                    raise self._bad(EMBEDDINGS, "holds NaN or infinite values")
        elif n:
            rows = np.unique(np.linspace(0, n - 1, min(n, FINITE_SAMPLE)).astype(np.int64))
            if not np.isfinite(np.asarray(self.embeddings[rows], np.float32)).all():
                raise self._bad(EMBEDDINGS, "holds NaN or infinite values (in the sampled rows)")

    # ---------------------------------------------------------------- reading
    def __len__(self) -> int:
        return int(self.manifest.count)

    @property
    def dim(self) -> int:
        return int(self.manifest.embedding_dim)

    @property
    def has_labels(self) -> bool:
        return "label" in self.items and bool(self.manifest.class_names)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.manifest.class_names or ())

    @property
    def superclass_names(self) -> tuple[str, ...]:
        return tuple(self.manifest.superclass_names or ())

    @property
    def labels(self) -> np.ndarray | None:
        return self.items["label"].astype(np.int64) if self.has_labels else None

    @property
    def superclasses(self) -> np.ndarray | None:
        col = self.items.get("superclass")
        return col.astype(np.int64) if col is not None and self.superclass_names else None

    @property
    def fine_to_coarse(self) -> np.ndarray | None:
        f2c = self.manifest.fine_to_coarse
        return np.asarray(f2c, dtype=np.int64) if f2c is not None else None

    def images(self) -> np.ndarray | None:
        """uint8 (N,H,W,3) thumbnails when the source stored them (tiny-image sets), memory-mapped."""
        path = self.files / IMAGES
        return np.load(path, mmap_mode="r") if path.is_file() else None

    @property
    def has_thumbnails(self) -> bool:
        return "thumb_offset" in self.items and (self.files / THUMBS).is_file()

    def thumbnail(self, item_id: int, size: int) -> bytes | None:
        """WebP bytes of item ``item_id``'s stored thumbnail (long side 256, or 512 when ``size`` > 256), or None
        when the index stores none for it (CIFAR keeps its tiles in images.npy instead)."""
        if not self.has_thumbnails:
            return None
        from cliplens.sources.photos import ThumbFile

        return ThumbFile(self.files / THUMBS, self.items).read(int(item_id), size)

    def item(self, item_id: int) -> dict[str, Any]:
        if not 0 <= item_id < len(self):
            raise StoreError(f"no item {item_id} in index {self.root} (ids run 0..{len(self) - 1})")
        return {k: _py(v[item_id]) for k, v in self.items.items()}

    def check_model(self, info: ModelInfo) -> None:
        """Refuse to compare query vectors from one model with image vectors from another."""
        built = self.manifest.model
        if not built.same_vectors(info):
            raise ModelMismatchError(
                f"index at {self.root} was built with {built.label()}, not {info.label()}: "
                f"query it with --model {built.name} "
                + (f"--pretrained {built.pretrained}" if built.pretrained else "--weights <that file>")
                + " or rebuild it"
            )


def _read_data(root: Path, files: Path, m: Manifest) -> tuple[np.ndarray, dict]:
    def bad(name, what):
        return StoreError(f"index at {root} is corrupt: {files / name} {what}; rebuild it with "
                          f"`cliplens index ... --index-dir {root}`")

    if m.dtype not in DTYPES:
        raise bad(MANIFEST, f"names dtype {m.dtype!r}, not float32 or float16")
    try:
        emb = np.load(files / EMBEDDINGS, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise bad(EMBEDDINGS, f"cannot be read ({type(exc).__name__}: {str(exc)[:80]})") from None
    want = (m.count, m.embedding_dim)
    if emb.shape != want or str(emb.dtype) != m.dtype:
        raise bad(EMBEDDINGS, f"is {emb.dtype}{emb.shape}, the manifest says {m.dtype}{want}")
    digest = (m.files.get(ITEMS) or {}).get("sha256")
    if digest is not None and _digest(files / ITEMS) != digest:
        raise bad(ITEMS, "is not the one this index was built with (its sha256 differs from the manifest's)")
    if m.format_version >= 2 and digest is None:
        raise bad(MANIFEST, f"records no digest of {ITEMS}")
    from cliplens.items import LazyItems

    items = LazyItems(files / ITEMS)  # columns read on first use (cliplens.items)
    for col in ("id", "ref"):
        if col not in items:
            raise bad(ITEMS, f"has no {col!r} column")
    if items.num_rows != m.count:
        raise bad(ITEMS, f"has {items.num_rows} rows, expected {m.count}")
    return emb, items


def _digest(path: Path) -> str | None:
    try:
        return file_digest(path)
    except OSError:
        return None


def _py(v):
    v = v.item() if isinstance(v, np.generic) else v
    return None if isinstance(v, float) and v != v else v  # a missing number (NaN in parquet) is None


def read_items(path: Path) -> dict[str, np.ndarray]:
    """Every column of an ``items.parquet`` (as :class:`cliplens.items.LazyItems` reads them, without pandas)."""
    from cliplens.items import LazyItems

    items = LazyItems(path)
    return {name: items[name] for name in items}
