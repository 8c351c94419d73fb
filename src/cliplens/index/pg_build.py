"""Creating and syncing a pgvector table, all in one transaction (see :mod:`cliplens.index.pgvector_index`).

1. lock the table's name (an advisory lock: two builds of one table take turns) and read what it mirrors;
2. encode every store row as its binary COPY tuple and hash it (sha256): the digest column says which rows the
   table already holds exactly;
3. delete the rows whose digest changed and the ids the store no longer has, COPY the changed and new rows;
4. build the vector index (kept when few rows changed: pgvector then indexes the new rows as they arrive);
5. record the store's generation in ``cliplens_tables``, ANALYZE, commit.

Anything raising before the commit (a kill, a full disk, Ctrl-C) rolls all of it back: the previous table, its
index and its record are untouched, and an old record keeps refusing a newer store until a sync commits.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from cliplens import __version__
from cliplens.errors import BackendError
from cliplens.index import pg_sql
from cliplens.index.backends import store_key
from cliplens.index.pgvector_index import _COPY_ROWS, _REBUILD_FRACTION, META

log = logging.getLogger(__name__)


def sync_table(conn, target, store, name: str, *, index_kind: str, index_params: dict, btree: bool = True,
               progress: bool) -> dict:
    from psycopg import sql
    from tqdm import tqdm

    half = store.embeddings.dtype == np.float16
    vector_type = "halfvec" if half else "vector"
    cols = pg_sql.column_types(store, vector_type)
    columns = [c for c, _ in cols]
    root = str(Path(store.root).expanduser().resolve())
    ident, n = sql.Identifier(name), len(store)
    hint = f"`cliplens build-index --index-dir {store.root} --backend pgvector --pg-uri {target.flag} --pg-table NAME`"
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
        conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} (table_name text PRIMARY KEY, store_root text NOT NULL, "
                             "meta jsonb NOT NULL)").format(sql.Identifier(META)))
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]
        record = conn.execute(sql.SQL("SELECT store_root, meta FROM {} WHERE table_name = %s")
                              .format(sql.Identifier(META)), (name,)).fetchone()
        if exists and record is None:
            raise BackendError(f"a table {name} exists at {target.shown} that cliplens did not make: leave it, and "
                               f"pick another name: {hint}")
        if record is not None and record[0] != root:
            raise BackendError(f"the pgvector table {name} at {target.shown} mirrors another index ({record[0]}): "
                               f"pick another name: {hint}")
        old = record[1] if record is not None else {}
        if exists and (old.get("columns") != columns or old.get("vector_type") != vector_type
                       or old.get("dim") != store.dim):
            log.info("table %s has another shape (model or columns changed): recreating it", name)
            conn.execute(sql.SQL("DROP TABLE {}").format(ident))  # cliplens made it, for this very folder
            exists = False
        if not exists:
            conn.execute(sql.SQL("CREATE TABLE {} ({})").format(ident, sql.SQL(", ").join(
                sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(t)) for c, t in cols)))
        conn.execute("SELECT set_config('maintenance_work_mem', %s, true)", (_work_mem(store, index_params),))

        # ---- which rows differ: digests of what each row would be, against those the table holds
        have = np.zeros(0, dtype="S32")
        if exists:
            rows = conn.execute(sql.SQL("SELECT id, digest FROM {}").format(ident)).fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            gone = ids[(ids < 0) | (ids >= n)].tolist()
            have = np.zeros(n, dtype="S32")
            keep = (ids >= 0) & (ids < n)
            have[ids[keep]] = [bytes(r[1]) for r, k in zip(rows, keep) if k]
        else:
            gone = []
        want = np.zeros(n, dtype="S32")
        bar = tqdm(total=n, unit="row", desc=f"pgvector {name} (compare)", disable=not progress or not exists,
                   dynamic_ncols=True)
        if exists:
            for lo in range(0, n, _COPY_ROWS):
                hi = min(lo + _COPY_ROWS, n)
                want[lo:hi] = [pg_sql.digest(r) for r in pg_sql.encode_rows(store, columns, lo, hi, half=half)]
                bar.update(hi - lo)
        bar.close()
        differ = np.flatnonzero(want != have) if exists else np.arange(n)
        present = np.flatnonzero(have != b"") if exists else np.zeros(0, np.int64)
        updated = np.intersect1d(differ, present)
        counts = {"inserted": int(len(differ) - len(updated)), "updated": int(len(updated)), "deleted": len(gone),
                  "unchanged": int(n - len(differ))}

        # ---- the vector index: kept when it is the one asked for and few rows change, else built after the writes
        index_name = sql.Identifier(name[:55] + "_vec")
        same_index = exists and old.get("index_kind") == index_kind and old.get("index_params") == index_params
        rebuild = not same_index or len(differ) > _REBUILD_FRACTION * n
        if rebuild:
            conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(index_name))
        if len(updated) or gone:
            conn.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(ident), (updated.tolist() + gone,))
        _copy_rows(conn, ident, store, columns, differ, half=half, progress=progress, desc=f"pgvector {name}")
        if rebuild and index_kind != "none":
            _create_index(conn, ident, index_name, index_kind, index_params, vector_type)
        for c in ("label", "superclass"):
            btree_name = sql.Identifier(f"{name[:50]}_{c}")
            if c in columns and btree:
                conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(btree_name, ident,
                                                                                       sql.Identifier(c)))
            else:
                conn.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(btree_name))
        meta = meta_row(store, table=name, index_kind=index_kind, index_params=index_params, columns=columns,
                        vector_type=vector_type)
        conn.execute(sql.SQL("INSERT INTO {} (table_name, store_root, meta) VALUES (%s, %s, %s::jsonb) "
                             "ON CONFLICT (table_name) DO UPDATE SET store_root = EXCLUDED.store_root, "
                             "meta = EXCLUDED.meta").format(sql.Identifier(META)), (name, root, meta_json(meta)))
        conn.execute(sql.SQL("ANALYZE {}").format(ident))
    counts["index"] = ("built" if rebuild else "kept") if index_kind != "none" else "none"
    return counts


def _copy_rows(conn, ident, store, columns, ids: np.ndarray, *, half: bool, progress: bool, desc: str) -> None:
    """COPY the rows ``ids`` (sorted) in binary, chunk by chunk (only chunks holding one of them are encoded)."""
    from psycopg import sql
    from tqdm import tqdm

    if not len(ids):
        return
    bar = tqdm(total=len(ids), unit="row", desc=desc, disable=not progress, dynamic_ncols=True)
    names = sql.SQL(", ").join(map(sql.Identifier, columns))
    with conn.cursor() as cur, cur.copy(sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(ident, names)) as cp:
        cp.write(pg_sql.COPY_HEADER)
        for lo in range(0, len(store), _COPY_ROWS):
            hi = min(lo + _COPY_ROWS, len(store))
            chosen = ids[(ids >= lo) & (ids < hi)]
            if not len(chosen):
                continue
            rows = pg_sql.encode_rows(store, columns, lo, hi, half=half)
            write_chunk(cp, [pg_sql.with_digest(rows[i - lo], pg_sql.digest(rows[i - lo])) for i in chosen])
            bar.update(len(chosen))
        cp.write(pg_sql.COPY_TRAILER)
    bar.close()


def write_chunk(copy, rows: list[bytes]) -> None:
    """One COPY chunk (a seam for tests that kill a sync half way)."""
    copy.write(b"".join(rows))


def _create_index(conn, ident, index_name, kind: str, params: dict, vector_type: str) -> None:
    from psycopg import sql

    ops = sql.SQL(f"{vector_type}_cosine_ops")
    with_ = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(int(v)))
                               for k, v in sorted(params.items()))
    log.info("building the %s index %s", kind, params)
    conn.execute(sql.SQL("CREATE INDEX {} ON {} USING {} (vector {}) WITH ({})").format(
        index_name, ident, sql.SQL(kind), ops, with_))


def _work_mem(store, params: dict) -> str:
    """maintenance_work_mem for this build: room for the whole HNSW graph (pgvector builds slowly once it spills)."""
    per_row = store.dim * store.embeddings.dtype.itemsize + 16 * int(params.get("m", 16)) + 64
    mib = int(len(store) * per_row * 1.3 / 2**20) + 64
    return f"{min(max(mib, 64), 4096)}MB"


def meta_row(store, *, table: str, index_kind: str, index_params: dict, columns: list[str], vector_type: str) -> dict:
    """What ``cliplens_tables.meta`` records for a table (JSON)."""
    return {"store_key": store_key(store), "count": len(store), "dim": store.dim, "vector_type": vector_type,
            "columns": columns, "index_kind": index_kind, "index_params": index_params, "table": table,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cliplens_version": __version__,
            "created": store.manifest.created}


def meta_json(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True)
