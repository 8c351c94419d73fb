"""The index folder on disk: who owns it, who writes it, and which generation is the current one.

    INDEX_DIR/
      cliplens-index.json   marker: this folder belongs to cliplens (written when an empty or new folder is claimed)
      CURRENT               one line, the name of the current generation; replaced by a single rename
      gen-000003/           a complete, never-modified index: manifest.json, embeddings.npy, items.parquet, ...
      .build-k2j4x9/        scratch of a build in progress (tempfile.mkdtemp: a name no user owns), resumable
      writer.lock           pid and start time of the process writing; held with flock while it writes
      faiss/, milvus/       backends built over the current generation (they check its fingerprint)

Readers resolve CURRENT once and read every file from that one generation, so a search never mixes the vectors
of one build with the labels of another. A writer builds a whole generation in its scratch folder, renames the
folder to ``gen-N`` and then CURRENT to point at it: until that rename, the previous index is what everyone sees,
whatever happens to the writer. The generation before the current one is kept (a reader that resolved CURRENT a
moment ago still finds its files); older ones are removed.

An index written by cliplens format 1 (its files at the top of INDEX_DIR, no CURRENT) is read in place; the next
``cliplens index`` into it writes a generation and then removes the format-1 files it replaced.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from cliplens._files import write_json_atomic
from cliplens.errors import ForeignFolderError, IndexBusyError, StoreError, StoreSpaceError

log = logging.getLogger(__name__)

MARKER, CURRENT, LOCK = "cliplens-index.json", "CURRENT", "writer.lock"
GEN_PREFIX, BUILD_PREFIX, SCRATCH_META = "gen-", ".build-", "scratch.json"
FORMAT1_FILES = ("manifest.json", "embeddings.npy", "items.parquet", "images.npy", "progress.json",
                 "embeddings.partial.npy", "items.new.parquet")
_GEN = re.compile(r"^gen-(\d{6,})$")
KEEP_GENERATIONS = 2  # the current one and the one before it (for readers that resolved CURRENT just before)


def current_generation(root: Path) -> Path | None:
    """The folder CURRENT names, or None when there is no CURRENT (a new or format-1 index)."""
    try:
        name = (root / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreError(f"cannot read {root / CURRENT} ({exc.strerror}); rebuild the index") from None
    if not _GEN.match(name) or not (root / name).is_dir():
        raise StoreError(f"{root / CURRENT} names {name[:40]!r}, which is not a generation folder of this index: "
                         "rebuild the index")
    return root / name


def is_format1(root: Path) -> bool:
    return not (root / CURRENT).exists() and (root / "manifest.json").is_file()


def is_cliplens_folder(root: Path) -> bool:
    """True for a folder cliplens made: a marker, a generation, or a format-1 index (complete or not)."""
    return any((root / name).exists() for name in (MARKER, CURRENT, "manifest.json", "progress.json"))


def holds_index(folder: Path) -> bool:
    """True for an index folder (for the walk of a photo folder, which never indexes an index inside it)."""
    return ((folder / MARKER).is_file() or (folder / CURRENT).is_file()
            or ((folder / "manifest.json").is_file() and (folder / "embeddings.npy").is_file()))


def builds(root: Path) -> list[Path]:
    """Scratch folders of builds in progress (or killed), oldest first."""
    found = [p for p in root.glob(BUILD_PREFIX + "*") if (p / SCRATCH_META).is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns)


def check_claimable(root: Path) -> None:
    """Refuse a folder cliplens may not write in: a file, or a non-empty folder that is not a cliplens index."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root} is a file, not a folder: choose a folder for the index")
    if root.is_dir() and not is_cliplens_folder(root):
        entries = sum(1 for _ in root.iterdir())
        if entries:
            raise ForeignFolderError(root, entries)


# --------------------------------------------------------------------------- the writer's lock


class WriterLock:
    """``writer.lock`` held with flock: the kernel drops it when its process dies, so a killed writer's lock is
    stale at once and the next writer takes it over; the file's content (pid, start) is only for the message.

    The lock is per process: a second claim by the process that holds it (a writer abandoned after an error, then
    a new one) takes it over instead of waiting for itself.
    """

    _held: dict[str, "WriterLock"] = {}  # folder -> the lock this process holds on it

    def __init__(self, root: Path):
        import fcntl

        self.path = root / LOCK
        self._key = str(root.resolve())
        mine = WriterLock._held.get(self._key)
        if mine is not None and mine._file is not None:
            self._file, mine._file = mine._file, None
        else:
            self._file = open(self.path, "a+")
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                self._busy(root, exc)
        WriterLock._held[self._key] = self
        self._file.seek(0)
        self._file.truncate()
        since = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._file.write(json.dumps({"pid": os.getpid(), "since": since}))
        self._file.flush()

    def _busy(self, root: Path, exc: OSError):
        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            self._file.close()
            raise exc
        self._file.seek(0)
        try:
            held = json.loads(self._file.read() or "{}")
        except ValueError:
            held = {}
        held = held if isinstance(held, dict) else {}
        self._file.close()
        raise IndexBusyError(root, held.get("pid"), held.get("since")) from None

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock; the file stays (deleting it would race a new writer)
            self._file = None
        if WriterLock._held.get(self._key) is self:
            del WriterLock._held[self._key]


# --------------------------------------------------------------------------- claiming, scratch, commit


class IndexFolder:
    """An index folder claimed for writing: checked, marked and locked. Use :meth:`claim`."""

    def __init__(self, root: Path, lock: WriterLock):
        self.root, self.lock = root, lock

    @classmethod
    def claim(cls, root: str | Path) -> "IndexFolder":
        root = Path(root).expanduser()
        check_claimable(root)
        root.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(root)
        try:
            if not (root / MARKER).exists():
                with space_errors(root):
                    write_json_atomic(root / MARKER, {"cliplens_index": True, "layout": 2})
            for stale in root.glob(".*.tmp"):  # a pointer or marker being written when a writer was killed
                stale.unlink(missing_ok=True)
        except BaseException:
            lock.release()
            raise
        return cls(root, lock)

    def scratch(self, key: dict) -> tuple[Path, bool]:
        """The scratch folder of the build ``key`` describes: (folder, True) when an earlier run left it."""
        kind = key.get("kind")
        found = None
        for b in builds(self.root):
            try:
                meta = json.loads((b / SCRATCH_META).read_text())
            except (OSError, ValueError):
                meta = None
            if meta == json.loads(json.dumps(key)) and found is None:
                found = b
            elif meta is None or meta.get("kind") == kind:  # an older build of the same kind: superseded
                log.warning("discarding an unfinished build in %s made with other settings", b)
                shutil.rmtree(b, ignore_errors=True)
        if found is not None:
            for stale in found.rglob("*.tmp"):  # files being written when that run was killed
                stale.unlink(missing_ok=True)
            return found, True
        with space_errors(self.root):
            path = Path(tempfile.mkdtemp(prefix=BUILD_PREFIX, dir=self.root))
            write_json_atomic(path / SCRATCH_META, key)
        return path, False

    def commit(self, build: Path) -> Path:
        """Make ``build`` (a finished scratch folder) the current generation: one rename of CURRENT."""
        gens = sorted(int(m.group(1)) for p in self.root.iterdir() if (m := _GEN.match(p.name)))
        gen = self.root / f"{GEN_PREFIX}{(gens[-1] + 1 if gens else 1):06d}"
        os.rename(build, gen)
        for name in (SCRATCH_META, "progress.json"):  # build bookkeeping; a generation holds the index only
            (gen / name).unlink(missing_ok=True)
        with space_errors(self.root):
            tmp = self.root / f".{CURRENT}.{os.getpid()}.tmp"
            tmp.write_text(gen.name + "\n")
            os.replace(tmp, self.root / CURRENT)  # the switch
        self._tidy(keep=gen)
        return gen

    def _tidy(self, *, keep: Path) -> None:
        """After a switch: older generations, every scratch folder, and replaced format-1 files go."""
        gens = sorted((p for p in self.root.iterdir() if _GEN.match(p.name)), key=lambda p: p.name)
        for old in gens[:-KEEP_GENERATIONS]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
        for b in builds(self.root):
            shutil.rmtree(b, ignore_errors=True)
        for name in FORMAT1_FILES:
            (self.root / name).unlink(missing_ok=True)
        pending = self.root / "pending"  # format 1's folder scratch: removed only if it holds what cliplens wrote
        if any((pending / n).is_file() for n in ("manifest.json", "progress.json")):
            shutil.rmtree(pending, ignore_errors=True)

    def release(self) -> None:
        self.lock.release()


# --------------------------------------------------------------------------- space


def free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def check_space(folder: Path, need: int) -> None:
    """StoreSpaceError before anything is written, when ``need`` bytes clearly do not fit."""
    free = free_bytes(folder)
    if free is not None and need > free:
        raise StoreSpaceError(folder, need, free)


@contextmanager
def space_errors(folder: Path, need: int | None = None) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) inside the block into StoreSpaceError naming ``folder``."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreSpaceError(folder, need, free_bytes(folder)) from None
        raise
