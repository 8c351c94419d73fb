"""Writing one index generation, resumably: ``IndexWriter`` (start, write, checkpoint, finalize).

The vectors go into ``embeddings.partial.npy`` in the build's scratch folder with plain positioned writes, never
through a memory map: on a full disk a write raises ENOSPC (reported as :class:`StoreSpaceError`), where a store
through a sparse mapping would kill the process with SIGBUS. The file is allocated whole when the build starts
(``posix_fallocate``), so a disk that cannot hold the index says so before any image is embedded.

``checkpoint(n)`` makes rows [0, n) durable (fsync) and only then records n in ``progress.json``, so a run killed
at any moment restarts from the last checkpoint with the same batches, and ends byte-identical to an
uninterrupted run. ``finalize`` writes items, thumbnails and the manifest beside the vectors, then hands the
folder to :meth:`IndexFolder.commit`, which makes it the current generation with one rename.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cliplens import __version__
from cliplens import manifest as manifest_io
from cliplens._files import atomic_path, file_digest, write_json_atomic
from cliplens.errors import StoreError
from cliplens.layout import IndexFolder, check_space, space_errors

log = logging.getLogger(__name__)

MANIFEST, EMBEDDINGS, ITEMS, IMAGES = "manifest.json", "embeddings.npy", "items.parquet", "images.npy"
PROGRESS, PARTIAL = "progress.json", "embeddings.partial.npy"
THUMBS = "thumbs.bin"  # photo thumbnails of folder and list sources (cliplens.sources.photos)
DTYPES = ("float32", "float16")
_ITEM_BYTES = 256  # a generous estimate of one items.parquet row, for the space check


class VectorFile:
    """A (count, dim) ``.npy`` file filled by row ranges with ``os.pwrite`` and made durable with ``fsync``."""

    def __init__(self, path: Path, count: int, dim: int, dtype: str):
        self.path, self.shape, self.dtype = path, (count, dim), np.dtype(dtype)
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                   "fortran_order": False, "shape": self.shape})
        self.header = buf.getvalue()
        self.row_bytes = dim * self.dtype.itemsize
        self.nbytes = len(self.header) + count * self.row_bytes
        self._fd: int | None = None

    def create(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self._fd = fd
        _pwrite_all(fd, self.header, 0)
        try:
            os.posix_fallocate(fd, 0, self.nbytes)  # real blocks now: ENOSPC here, not half-way through
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.ftruncate(fd, self.nbytes)  # a filesystem without fallocate: every write still reports ENOSPC

    def reopen(self) -> bool:
        """Open an existing file for more rows; False when it is not this shape and dtype (or unreadable)."""
        try:
            with open(self.path, "rb") as f:
                ok = f.read(len(self.header)) == self.header and os.fstat(f.fileno()).st_size == self.nbytes
        except OSError:
            return False
        if ok:
            self._fd = os.open(self.path, os.O_RDWR)
        return ok

    def write(self, start: int, vectors: np.ndarray) -> None:
        rows = np.ascontiguousarray(vectors, dtype=self.dtype)
        if rows.ndim != 2 or rows.shape[1] != self.shape[1] or start < 0 or start + len(rows) > self.shape[0]:
            raise ValueError(f"rows {start}..{start + len(rows)} of shape {rows.shape} do not fit {self.shape}")
        _pwrite_all(self._fd, rows.tobytes(), len(self.header) + start * self.row_bytes)

    def sync(self) -> None:
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


@dataclass
class IndexWriter:
    """Writes one index generation, resumably. ``identity`` is everything that determines the embeddings' bytes.

    ``reserve_bytes``: what ``finalize`` will write besides vectors and items (thumbnails), for the space check.
    """

    root: Path
    identity: dict  # model info, source, split, count, fingerprint, dtype, batch_size
    dim: int
    reserve_bytes: int = 0
    kind: str = "index"  # builds of one kind supersede each other; other kinds (a folder's pending vectors) stay
    folder: IndexFolder | None = None  # a folder the caller has claimed (and keeps locked); None: start() claims it
    _folder: IndexFolder | None = field(default=None, init=False, repr=False)
    _vectors: VectorFile | None = field(default=None, init=False, repr=False)
    scratch: Path | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).expanduser()
        self.count = int(self.identity["count"])
        self.dtype = self.identity["dtype"]
        if self.dtype not in DTYPES:
            raise StoreError(f"unknown embedding dtype {self.dtype!r}: use float32 or float16")

    def is_complete(self) -> bool:
        """True when the folder's current index has exactly this identity (nothing to do)."""
        from cliplens.store import read_current_manifest

        current = read_current_manifest(self.root)
        return current is not None and current.identity == json.loads(json.dumps(self.identity))

    def complete_identity(self) -> dict | None:
        """The identity of the complete index already in this folder (whatever its settings), or None."""
        from cliplens.store import read_current_manifest

        current = read_current_manifest(self.root)
        return current.identity if current is not None and isinstance(current.identity, dict) else None

    def start(self) -> int:
        """Claim and lock the folder, open the build's vectors; return how many rows are already done."""
        self._folder = self.folder or IndexFolder.claim(self.root)
        try:
            return self._start()
        except BaseException:
            self.close()
            raise

    def _start(self) -> int:
        key = {"kind": self.kind, "identity": self.identity, "dim": self.dim}
        self.scratch, existed = self._folder.scratch(key)
        self._vectors = VectorFile(self.scratch / PARTIAL, self.count, self.dim, self.dtype)
        if existed:
            if not (self.scratch / PARTIAL).exists() and (self.scratch / EMBEDDINGS).exists():
                os.replace(self.scratch / EMBEDDINGS, self.scratch / PARTIAL)  # killed inside finalize
            try:
                done = int(json.loads((self.scratch / PROGRESS).read_text())["rows_done"])
            except (OSError, ValueError, KeyError, TypeError):
                done = None
            if done is not None and 0 <= done <= self.count and self._vectors.reopen():
                log.info("resuming %s at %d/%d", self.root, done, self.count)
                return done
            log.warning("restarting the unfinished build in %s (its progress file is unreadable)", self.scratch)
        need = self._vectors.nbytes + self.count * _ITEM_BYTES + self.reserve_bytes
        try:
            check_space(self.root, need)
            with space_errors(self.root, need):
                self._vectors.create()
                self.checkpoint(0)
        except BaseException:
            self._vectors.close()
            (self.scratch / PARTIAL).unlink(missing_ok=True)  # nothing of it is worth keeping
            raise
        return 0

    def write(self, start: int, vectors: np.ndarray) -> None:
        with space_errors(self.root, self._vectors.nbytes):
            self._vectors.write(start, vectors)

    def checkpoint(self, rows_done: int) -> None:
        """Make rows [0, rows_done) durable, then record that they are (in that order)."""
        with space_errors(self.root):
            self._vectors.sync()
            write_json_atomic(self.scratch / PROGRESS, {"identity": self.identity, "rows_done": rows_done})

    def close(self) -> None:
        """Let go of the folder (the lock) and the vectors file; the build stays resumable. Idempotent."""
        if self._vectors is not None:
            self._vectors.close()
        if self._folder is not None:
            if self._folder is not self.folder:  # ours to let go of; a caller's claim stays with the caller
                self._folder.release()
            self._folder = None

    def finalize(self, *, items: dict[str, Any], manifest: dict, images: np.ndarray | None = None):
        """Write items, thumbnails and the manifest beside the vectors; make them the current generation."""
        try:
            return self._finalize(items, manifest, images)
        finally:
            self.close()

    def _finalize(self, items, fields_: dict, images):
        build = self.scratch
        self._vectors.sync()
        self._vectors.close()
        need = (images.nbytes if images is not None else 0) + self.count * _ITEM_BYTES
        with space_errors(self.root, need):
            if images is not None:
                with atomic_path(build / IMAGES) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, np.ascontiguousarray(images))
            write_items(build / ITEMS, items)
            os.replace(build / PARTIAL, build / EMBEDDINGS)
            files = {ITEMS: {"sha256": file_digest(build / ITEMS), "bytes": (build / ITEMS).stat().st_size}}
            if (build / THUMBS).is_file():  # photo thumbnails (cliplens.sources.photos): size checked on open
                files[THUMBS] = {"bytes": (build / THUMBS).stat().st_size}
            full = manifest_io.build(count=self.count, dim=self.dim, dtype=self.dtype, identity=self.identity,
                                     created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                     version=__version__, fields_=fields_, files=files)
            write_json_atomic(build / MANIFEST, full.to_json())
            self._folder.commit(build)  # removes progress.json once the build is a generation
        return full


def write_items(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
