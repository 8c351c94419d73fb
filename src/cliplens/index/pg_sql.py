"""SQL pieces of the pgvector backend: filters as WHERE clauses with bound parameters, and rows as binary COPY.

Nothing here builds SQL from user text: a filter becomes a fixed clause (``label = ANY(%s)``, ``path ~ %s``) and
its values travel as parameters; table and column names go through ``psycopg.sql.Identifier``.

Filters mean exactly what :func:`cliplens.query.where_mask` means (the tests compare both on the same store):

- ``label=`` / ``superclass=``: any of the names (resolved to class ids here, with the same messages);
- ``path=GLOB``: :mod:`fnmatch` semantics on the item's path (CIFAR: on ``ref``), as an anchored POSIX regex;
- ``caption=TEXT``: a case-insensitive substring (glob characters work as in ``path``): ``lower(caption) ~ ...``;
- any other key (one this backend does not translate yet) falls back to the store's own mask, sent as ids.
"""

from __future__ import annotations

import difflib
import hashlib
import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from cliplens.errors import QueryError
from cliplens.prompts import match_class

# item columns mirrored into the table, beside id and the vector; the metadata ones only when the store has them
FILTER_COLUMNS = ("label", "superclass", "path", "caption")
METADATA_COLUMNS = ("taken", "camera")
COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
COPY_TRAILER = struct.pack(">h", -1)
_NULL = struct.pack(">i", -1)
_PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in microseconds since 1970: PostgreSQL's timestamp origin


@dataclass(frozen=True)
class Clause:
    sql: str  # with %s placeholders only
    params: tuple


# --------------------------------------------------------------------------- filters


def where_clauses(store, wheres: Sequence, columns: Sequence[str]) -> list[Clause]:
    """One clause per filter (ANDed by the caller); values are parameters, never part of the SQL text."""
    out = []
    for w in wheres:
        if w.key in ("label", "superclass") and w.key in columns:
            out.append(Clause(f"{w.key} = ANY(%s)", (class_ids(store, w.key, w.values),)))
        elif w.key == "path" and "path" in columns:
            out.append(_any_regex("path", w.values))
        elif w.key == "caption" and "caption" in columns:
            out.append(_any_regex("lower(caption)", [f"*{v.lower()}*" for v in w.values]))
        elif w.key == "taken" and "taken" in columns:  # ISO text compares like the dates it spells
            from cliplens.query import taken_bounds

            low, high = taken_bounds(w)
            parts = [("taken >= %s", low), ("taken < %s", high)]
            kept = [(sql, v) for sql, v in parts if v is not None]
            out.append(Clause("(" + " AND ".join(sql for sql, _ in kept) + ")", tuple(v for _, v in kept)))
        elif w.key == "camera" and "camera" in columns:
            out.append(_any_regex("lower(camera)", [v.lower() for v in w.values]))
        else:  # a key this backend does not translate: the store's own mask, as ids
            from cliplens.query import where_mask

            if w.key in ("label", "superclass", "caption", "taken", "camera"):
                where_mask(store, [w])  # raises the usual "this index has no labels/captions" QueryError
            out.append(mask_clause(where_mask(store, [w]), {}))
    return out


def _any_regex(column: str, globs: Sequence[str]) -> Clause:
    sql = " OR ".join([f"{column} ~ %s"] * len(globs))
    return Clause(f"({sql})", tuple(glob_to_regex(g) for g in globs))


def class_ids(store, key: str, values: Sequence[str]) -> list[int]:
    """Class ids of label/superclass names, refused as :func:`cliplens.query.where_mask` refuses them."""
    names = store.class_names if key == "label" else store.superclass_names
    if not names or key not in store.items:
        raise QueryError(f"this index has no {key}s to filter by; use path= or caption= for a folder")
    ids = []
    for v in values:
        i = match_class(v, names)
        if i is None:
            close = difflib.get_close_matches(v.lower().replace(" ", "_"), names, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise QueryError(f"no {key} named {v!r} in this index{hint}")
        ids.append(int(i))
    return ids


def mask_clause(allowed: np.ndarray, class_columns: dict[str, np.ndarray]) -> Clause:
    """A bool mask as SQL: ``label = ANY(%s)`` when it is exactly a set of classes (so the database filters on its
    own column), else the shorter of ``id = ANY(%s)`` and ``NOT (id = ANY(%s))``."""
    best = None
    for column, values in class_columns.items():
        chosen = np.unique(values[allowed])
        if np.array_equal(np.isin(values, chosen), allowed) and (best is None or len(chosen) < len(best[1])):
            best = (column, chosen)
    if best is not None:
        return Clause(f"{best[0]} = ANY(%s)", (best[1].tolist(),))
    ids = np.flatnonzero(allowed)
    if len(ids) <= len(allowed) - len(ids):
        return Clause("id = ANY(%s)", (ids.tolist(),))
    return Clause("NOT (id = ANY(%s))", (np.flatnonzero(~allowed).tolist(),))


def glob_to_regex(pattern: str) -> str:
    """An :func:`fnmatch.fnmatchcase` glob as an anchored PostgreSQL (ARE) regex: ``*`` ``?`` ``[seq]`` ``[!seq]``."""
    out, i, n = ["^"], 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                out.append("\\[")
                continue
            body, i = pattern[i:j], j + 1
            negate = body.startswith("!")
            body = body[1:] if negate else body
            escaped = "".join("\\" + ch if ch in "\\^[]" else ch for ch in body)
            out.append(("[^" if negate else "[") + escaped + "]")
        else:
            out.append(c if c.isalnum() else "\\" + c)
    return "".join(out) + "$"


# --------------------------------------------------------------------------- rows as binary COPY


def column_types(store, vector_type: str) -> list[tuple[str, str]]:
    """(name, SQL type) of the table's columns for this store, in table order (digest last)."""
    cols = [("id", "bigint PRIMARY KEY"), ("vector", f"{vector_type}({store.dim}) NOT NULL")]
    items = store.items
    for name in ("label", "superclass"):
        if name in items:
            cols.append((name, "bigint"))
    cols.append(("path", "text"))
    if "caption" in items:
        cols.append(("caption", "text"))
    for name in METADATA_COLUMNS:
        if name in items:
            cols.append((name, _sql_type(np.asarray(items[name]))))
    cols.append(("digest", "bytea NOT NULL"))
    return cols


def _sql_type(values: np.ndarray) -> str:
    kind = values.dtype.kind
    return {"i": "bigint", "u": "bigint", "f": "double precision", "b": "boolean", "M": "timestamp"}.get(kind, "text")


def _field(value, kind: str) -> bytes:
    if value is None or (kind == "f" and value != value) or (kind == "M" and np.isnat(value)):
        return _NULL
    if kind in "iu":
        data = struct.pack(">q", int(value))
    elif kind == "f":
        data = struct.pack(">d", float(value))
    elif kind == "b":
        data = b"\x01" if value else b"\x00"
    elif kind == "M":
        data = struct.pack(">q", int(np.datetime64(value, "us").astype(np.int64)) - _PG_EPOCH_US)
    else:
        data = str(value).encode("utf-8")
    return struct.pack(">i", len(data)) + data


def encode_rows(store, columns: Sequence[str], lo: int, hi: int, *, half: bool) -> list[bytes]:
    """Binary COPY tuples of rows [lo, hi) without their digest field (the digest is the sha256 of this)."""
    block = np.asarray(store.embeddings[lo:hi], dtype=">f2" if half else ">f4")
    head = struct.pack(">ihh", 4 + block.shape[1] * block.itemsize, block.shape[1], 0)
    items = store.items
    sources = []
    for name in columns:
        if name in ("id", "vector", "digest"):
            continue
        col = items.get("path", items["ref"]) if name == "path" else items[name]
        arr = np.asarray(col[lo:hi])
        sources.append((arr, arr.dtype.kind))
    count = struct.pack(">h", len(columns))
    rows = []
    for r in range(hi - lo):
        parts = [count, struct.pack(">iq", 8, lo + r), head, block[r].tobytes()]
        parts += [_field(arr[r].item() if kind not in "OUSM" else arr[r], kind) for arr, kind in sources]
        rows.append(b"".join(parts))
    return rows


def digest(row: bytes) -> bytes:
    return hashlib.sha256(row).digest()


def with_digest(row: bytes, row_digest: bytes) -> bytes:
    return row + struct.pack(">i", len(row_digest)) + row_digest
