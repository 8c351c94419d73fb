"""Reading files that someone else controls: only regular files, only inside the folder, names made printable."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO


def display_name(rel: str) -> str:
    """``rel`` as valid Unicode: bytes that are not UTF-8 (kept by os.walk as surrogates) become ``\\xNN``."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def open_regular(path: str | Path, *, root: str | Path | None = None, max_bytes: int | None = None) -> BinaryIO:
    """Open ``path`` for reading only if it is (still) a regular file, inside ``root`` when given.

    Checked on the open file itself, so a file swapped for a FIFO, a folder or a link out of ``root`` between
    listing and reading is refused (OSError) instead of blocking, crashing or reading something else.
    """
    path = Path(path)
    if root is not None and not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
        raise OSError(errno.EPERM, "links to outside the folder", str(path))
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if max_bytes is not None and st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"over {max_bytes} bytes", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
