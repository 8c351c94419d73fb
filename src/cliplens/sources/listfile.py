"""Image lists: a CSV, JSONL or Parquet file with a ``path`` column and optional ``caption`` and ``label`` columns.

A product catalogue, or COCO / Flickr30k captions exported to that form (one row per caption: an image with five
captions has five rows; they become one item with five captions, as CLIP_benchmark's retrieval sets have). Paths
are relative to the list file's folder; a path that is absolute or leaves that folder (``..``, a link pointing
out) is skipped with its reason, as is a row without a usable path, so an index never points outside the folder
its list describes. The whole file must fit the limits below (bounded memory): a bigger one is refused, not read.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from cliplens.sources.folder import FolderFile
from cliplens.errors import DatasetError

log = logging.getLogger(__name__)

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".parquet": "parquet"}
MAX_LIST_BYTES = 512 << 20  # a list file over 512 MiB is refused before it is read
MAX_ROWS = 5_000_000
MAX_CAPTION_CHARS = 2_000  # longer text is not a caption (CLIP reads 77 tokens, about 300 characters)
MAX_PATH_CHARS = 4_096


@dataclass(frozen=True)
class ListEntry:
    rel: str  # relative to the list's folder, forward slashes
    captions: tuple[str, ...] = ()
    label: str | None = None


@dataclass
class ImageList:
    path: Path  # the list file
    root: Path  # its folder: what the paths are relative to
    entries: dict[str, ListEntry] = field(default_factory=dict)  # rel -> entry, in first-seen order
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (row as written, reason)
    has_labels: bool = False
    has_captions: bool = False


def _rows(path: Path, fmt: str):
    """(row number, {column: value}) for every row; DatasetError for a file that cannot be read as ``fmt``."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as exc:  # ArrowInvalid, OSError, ...: not a Parquet file
            raise DatasetError(f"cannot read {path} as Parquet ({type(exc).__name__}): export the list again") from None
        if table.num_rows > MAX_ROWS:
            raise DatasetError(f"{path} has {table.num_rows} rows, more than the {MAX_ROWS} a list may have")
        names = table.column_names
        yield 0, {n: None for n in names}  # the header: which columns exist
        yield from enumerate(table.to_pylist(), 1)
        return
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path} is not UTF-8 text (byte {exc.start}): save it as UTF-8") from None
    if "\x00" in text:
        raise DatasetError(f"{path} holds NUL bytes: it is not a {fmt.upper()} text file")
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            yield 0, {n: None for n in (reader.fieldnames or ())}
            for i, row in enumerate(reader, 1):
                yield i, row
        except csv.Error as exc:
            raise DatasetError(f"{path} is not valid CSV ({exc}, line {reader.line_num})") from None
        return
    columns: set[str] = set()
    rows = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            raise DatasetError(f"{path} line {i} is not JSON: each line of a JSONL list is one object") from None
        if not isinstance(obj, dict):
            raise DatasetError(f"{path} line {i} is a JSON {type(obj).__name__}, not an object with a \"path\"")
        columns.update(obj)
        rows.append((i, obj))
    yield 0, {n: None for n in columns}
    yield from rows


def _text(value, limit: int) -> str | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return None
    text = str(value).strip()
    return text[:limit] if text else None


def read_list(path: str | Path) -> ImageList:
    """Read and check a list file; rows that cannot be used are recorded in ``skipped``, never fatal."""
    path = Path(path).expanduser()
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DatasetError(f"{path.name}: a list must be .csv, .jsonl or .parquet (with a \"path\" column)")
    if not path.is_file():
        raise DatasetError(f"no list file at {path}")
    if path.stat().st_size > MAX_LIST_BYTES:
        raise DatasetError(f"{path} is {path.stat().st_size >> 20} MiB, over the {MAX_LIST_BYTES >> 20} MiB a list "
                           "may have: split it")
    root = path.parent.resolve()
    out = ImageList(path=path.resolve(), root=root)
    rows = _rows(path, fmt)
    _, header = next(rows, (0, {}))
    if "path" not in header:
        raise DatasetError(f"{path} has no \"path\" column (columns: {', '.join(map(str, header)) or 'none'}): "
                           "name the column of image paths \"path\"")
    out.has_labels, out.has_captions = "label" in header, "caption" in header
    for count, (i, row) in enumerate(rows, 1):
        if count > MAX_ROWS:
            raise DatasetError(f"{path} has more than {MAX_ROWS} rows: split it")
        raw = row.get("path")
        rel = _text(raw, MAX_PATH_CHARS + 1)
        where = f"row {i}" if rel is None else rel
        reason = _check_path(root, rel)
        if reason:
            out.skipped.append((where, reason))
            continue
        rel = Path(rel).as_posix()  # "./a.png" and "a.png" are one image
        caption, label = _text(row.get("caption"), MAX_CAPTION_CHARS), _text(row.get("label"), 200)
        entry = out.entries.get(rel)
        if entry is None:
            out.entries[rel] = ListEntry(rel=rel, captions=(caption,) if caption else (), label=label)
            continue
        if label is not None and entry.label is not None and label != entry.label:
            log.warning("%s: %s is labelled both %r and %r; keeping %r", path.name, rel, entry.label, label,
                        entry.label)
        captions = entry.captions + ((caption,) if caption and caption not in entry.captions else ())
        out.entries[rel] = ListEntry(rel=rel, captions=captions, label=entry.label or label)
    return out


def _check_path(root: Path, rel: str | None) -> str | None:
    """Why ``rel`` cannot be used (None when it can): missing, absolute, leaving the folder, too long."""
    if rel is None:
        return "no path"
    if len(rel) > MAX_PATH_CHARS or "\x00" in rel:
        return "not a usable path"
    if rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        return "absolute path: paths are relative to the list's folder"
    target = (root / rel).resolve()
    if not target.is_relative_to(root) or target == root:
        return "leaves the list's folder"
    return None


def list_files(image_list: ImageList) -> tuple[list[FolderFile], list[tuple[str, str]]]:
    """(the listed files that exist, sorted by path; (path, reason) for those that do not)."""
    files, missing = [], []
    for rel in image_list.entries:
        try:
            st = os.stat(image_list.root / rel)
        except OSError as exc:
            missing.append((rel, f"cannot read ({exc.strerror})"))
            continue
        if not os.path.isfile(image_list.root / rel):
            missing.append((rel, "not a file"))
            continue
        files.append(FolderFile(rel=Path(rel).as_posix(), size=st.st_size, mtime_ns=st.st_mtime_ns))
    files.sort(key=lambda f: f.rel)
    return files, missing
