"""Small file helpers shared by every module that writes to disk.

Everything cliplens writes goes to a temporary name in the same folder and is then renamed over the
target, so a crash or Ctrl-C leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

_CHUNK = 1 << 20  # 1 MiB reads: large enough to be I/O bound, small enough to stay off the heap


def cliplens_home() -> Path:
    """Where downloads, caches and default indexes live: $CLIPLENS_HOME, else ~/.cache/cliplens."""
    return Path(os.environ.get("CLIPLENS_HOME") or Path.home() / ".cache" / "cliplens").expanduser()


@contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def cache_entry(folder: Path) -> Iterator[Path]:
    """A temporary folder beside the cache folder ``folder`` to build it in; :func:`publish_cache_entry` makes it
    ``folder``. Whatever is left of it (a failed build) is removed on the way out, so an entry is whole or absent."""
    import shutil

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_cache_entry(tmp: Path, folder: Path, meta: dict) -> None:
    """Finish a :func:`cache_entry`: ``meta.json`` written last (its presence means the entry is complete), the
    modes mkdir and open() would give (mkdtemp and onnx make owner-only files), then renamed into place; when
    another process finished the same entry first, theirs is kept."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    mask = _umask()
    os.chmod(tmp, 0o777 & ~mask)
    for path in tmp.iterdir():
        os.chmod(path, 0o666 & ~mask)
    try:
        os.replace(tmp, folder)
    except OSError:  # a complete entry is there already: keep it
        pass


def write_bytes_atomic(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_json_atomic(target: str | Path, obj: Any) -> None:
    write_bytes_atomic(target, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def cached_sha256(path: str | Path) -> str:
    """sha256 of a (large, rarely changing) file such as model weights, cached by path, size and mtime.

    Hashing ViT-B/32's 600 MB of weights takes about a second; the cache makes every later start free.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    cache_file = cliplens_home() / "sha256-cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        cache[key] = file_digest(path)
        try:
            write_json_atomic(cache_file, cache)
        except OSError:
            pass  # a read-only home only costs us the cache
    return cache[key]
