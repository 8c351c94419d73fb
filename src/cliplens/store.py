"""The on-disk index: one folder holding everything a search needs.

    manifest.json          what was embedded, how, with which weights; written LAST, so its presence means complete
    embeddings.npy         float32 (default) or float16 (N, D) unit rows, memory-mapped on load
    items.parquet          id, ref, label, label_name, superclass, superclass_name (+ source-specific columns)
    images.npy             optional uint8 (N, H, W, 3) thumbnails for tiny-image sources (CIFAR: 30 MB for 10k)

While indexing, ``progress.json`` and ``embeddings.partial.npy`` hold the work so far. A killed run restarted with
the same settings continues from the last checkpoint and ends byte-identical to an uninterrupted run (same
batches, same order); an index with progress.json and no manifest is reported as incomplete, never searched.
Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cliplens import __version__
from cliplens._files import atomic_path, write_json_atomic
from cliplens.errors import ModelMismatchError, StoreError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST, EMBEDDINGS, ITEMS, IMAGES = "manifest.json", "embeddings.npy", "items.parquet", "images.npy"
PROGRESS, PARTIAL = "progress.json", "embeddings.partial.npy"
DTYPES = ("float32", "float16")


# --------------------------------------------------------------------------- reading


class IndexStore:
    """A complete index folder, opened read-only. Embeddings stay on disk (memory-mapped)."""

    def __init__(self, root: Path, manifest: dict, embeddings: np.ndarray, items: dict[str, np.ndarray]):
        self.root = root
        self.manifest = manifest
        self.embeddings = embeddings
        self.items = items  # column name -> numpy array (object arrays for strings)

    @classmethod
    def open(cls, root: str | Path) -> "IndexStore":
        root = Path(root).expanduser()
        if not root.is_dir():
            raise StoreError(f"no index at {root}: build one with `cliplens index ... --index-dir {root}`")
        if not (root / MANIFEST).is_file():
            if (root / PROGRESS).is_file():
                done = _read_json(root / PROGRESS).get("rows_done", "?")
                total = _read_json(root / PROGRESS).get("identity", {}).get("count", "?")
                raise StoreError(
                    f"index at {root} is incomplete ({done} of {total} images embedded): "
                    "run the same `cliplens index` command again to resume it"
                )
            if (root / PARTIAL).exists() or any(p.name.startswith("pending") for p in root.iterdir()):
                raise StoreError(f"index at {root} is unfinished (an indexing run stopped before it completed): "
                                 "run the same `cliplens index` command again to finish it")
            raise StoreError(f"{root} is not a cliplens index (no {MANIFEST}): build one with `cliplens index`")
        manifest = _read_json(root / MANIFEST)
        if manifest.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"index at {root} has format {manifest.get('format_version')!r}, this cliplens reads "
                f"{FORMAT_VERSION}: rebuild it with `cliplens index`"
            )
        try:
            emb = np.load(root / EMBEDDINGS, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise StoreError(f"index at {root} is corrupt ({EMBEDDINGS}: {exc}); rebuild it with `cliplens index`") from None
        want = (manifest["count"], manifest["embedding_dim"])
        if emb.shape != want or str(emb.dtype) != manifest["dtype"]:
            raise StoreError(
                f"index at {root} is corrupt: {EMBEDDINGS} is {emb.dtype}{emb.shape}, manifest says "
                f"{manifest['dtype']}{want}; rebuild it with `cliplens index`"
            )
        from cliplens.items import LazyItems

        items = LazyItems(root / ITEMS)  # columns read on first use (cliplens.items)
        if items.num_rows != manifest["count"] or "id" not in items:
            raise StoreError(f"index at {root} is corrupt: {ITEMS} has {items.num_rows} rows, expected {manifest['count']}")
        return cls(root, manifest, emb, items)

    def __len__(self) -> int:
        return int(self.manifest["count"])

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    @property
    def has_labels(self) -> bool:
        return "label" in self.items and bool(self.manifest.get("class_names"))

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("class_names") or ())

    @property
    def superclass_names(self) -> tuple[str, ...]:
        return tuple(self.manifest.get("superclass_names") or ())

    @property
    def labels(self) -> np.ndarray | None:
        return self.items["label"].astype(np.int64) if self.has_labels else None

    @property
    def superclasses(self) -> np.ndarray | None:
        col = self.items.get("superclass")
        return col.astype(np.int64) if col is not None and self.superclass_names else None

    @property
    def fine_to_coarse(self) -> np.ndarray | None:
        f2c = self.manifest.get("fine_to_coarse")
        return np.asarray(f2c, dtype=np.int64) if f2c is not None else None

    def images(self) -> np.ndarray | None:
        """uint8 (N,H,W,3) thumbnails when the source stored them (tiny-image sets), memory-mapped."""
        path = self.root / IMAGES
        return np.load(path, mmap_mode="r") if path.is_file() else None

    def item(self, item_id: int) -> dict[str, Any]:
        if not 0 <= item_id < len(self):
            raise StoreError(f"no item {item_id} in index {self.root} (ids run 0..{len(self) - 1})")
        return {k: _py(v[item_id]) for k, v in self.items.items()}

    def check_model(self, info) -> None:
        """Refuse to compare query vectors from one model with image vectors from another."""
        built = self.manifest["model"]
        same = built["name"] == info.name and built.get("weights_sha256") == info.weights_sha256
        if not same:
            raise ModelMismatchError(
                f"index at {self.root} was built with {_model_label(built)}, not {_model_label(info.__dict__)}: "
                f"query it with --model {built['name']} "
                + (f"--pretrained {built['pretrained']}" if built.get("pretrained") else "--weights <that file>")
                + " or rebuild it"
            )


def _model_label(m: dict) -> str:
    sha = (m.get("weights_sha256") or "none")[:12]
    return f"{m['name']}/{m.get('pretrained') or 'file'} (weights sha256 {sha})"


def _py(v):
    return v.item() if isinstance(v, np.generic) else v


def read_items(path: Path) -> dict[str, np.ndarray]:
    from cliplens.items import LazyItems

    items = LazyItems(path)
    return {name: items[name] for name in items}


def write_items(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read {path} ({exc}); rebuild the index with `cliplens index`") from None


# --------------------------------------------------------------------------- writing


@dataclass
class IndexWriter:
    """Writes one index, resumably. ``identity`` is everything that determines the embeddings' bytes."""

    root: Path
    identity: dict  # model info, source, split, count, fingerprint, dtype, batch_size
    dim: int

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()
        self.count = int(self.identity["count"])
        self.dtype = self.identity["dtype"]
        if self.dtype not in DTYPES:
            raise StoreError(f"unknown embedding dtype {self.dtype!r}: use float32 or float16")
        self._mm: np.memmap | None = None

    def is_complete(self) -> bool:
        """True when the folder already holds a finished index of exactly this identity."""
        path = self.root / MANIFEST
        if not path.is_file() or (self.root / PROGRESS).is_file():
            return False
        try:
            return json.loads(path.read_text()).get("identity") == self.identity
        except (OSError, ValueError):
            return False

    def complete_identity(self) -> dict | None:
        """The identity of a finished index already in this folder (whatever its settings), or None."""
        path = self.root / MANIFEST
        if not path.is_file() or (self.root / PROGRESS).is_file():
            return None
        try:
            found = json.loads(path.read_text()).get("identity")
        except (OSError, ValueError):
            return None
        return found if isinstance(found, dict) else None

    def start(self) -> int:
        """Open the partial embeddings; return how many rows are already done (0 unless resuming)."""
        self.root.mkdir(parents=True, exist_ok=True)
        progress = self.root / PROGRESS
        partial = self.root / PARTIAL
        if progress.is_file() and partial.is_file():
            state = _read_json(progress)
            if state.get("identity") == self.identity:
                self._mm = np.lib.format.open_memmap(partial, mode="r+")
                if self._mm.shape == (self.count, self.dim) and str(self._mm.dtype) == self.dtype:
                    done = int(state["rows_done"])
                    log.info("resuming %s at %d/%d", self.root, done, self.count)
                    return done
            log.warning("discarding an unfinished index in %s built with other settings", self.root)
        self._mm = None
        with atomic_path(partial) as tmp:  # header + zeros, created whole before anything points at it
            np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=(self.count, self.dim)).flush()
        self._mm = np.lib.format.open_memmap(partial, mode="r+")
        self.checkpoint(0)
        return 0

    def write(self, start: int, vectors: np.ndarray) -> None:
        self._mm[start : start + len(vectors)] = vectors.astype(self.dtype, copy=False)

    def checkpoint(self, rows_done: int) -> None:
        """Make rows [0, rows_done) durable, then record that they are (in that order)."""
        self._mm.flush()
        write_json_atomic(self.root / PROGRESS, {"identity": self.identity, "rows_done": rows_done})

    def finalize(self, *, items: dict[str, Any], manifest: dict, images: np.ndarray | None = None) -> dict:
        """Move the finished embeddings into place and write the manifest last."""
        self._mm.flush()
        del self._mm
        self._mm = None
        # An older complete index in this folder stops being "complete" before any of its files is replaced;
        # a crash from here on leaves an incomplete index that the same command finishes.
        (self.root / MANIFEST).unlink(missing_ok=True)
        if images is not None:
            with atomic_path(self.root / IMAGES) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(images))
        write_items(self.root / ITEMS.replace(".parquet", ".new.parquet"), items)
        full = {
            "format_version": FORMAT_VERSION,
            "cliplens_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "count": self.count,
            "embedding_dim": self.dim,
            "dtype": self.dtype,
            "identity": self.identity,
            **manifest,
        }
        os.replace(self.root / PARTIAL, self.root / EMBEDDINGS)
        os.replace(self.root / ITEMS.replace(".parquet", ".new.parquet"), self.root / ITEMS)
        if images is None:
            (self.root / IMAGES).unlink(missing_ok=True)
        write_json_atomic(self.root / MANIFEST, full)
        (self.root / PROGRESS).unlink(missing_ok=True)
        return full
