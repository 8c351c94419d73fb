"""pgvector backend: one PostgreSQL table per index folder, its filters run by the database.

Table ``cliplens_<folder>_<hash>`` (the hash: sha256 of the index folder's absolute path, 10 hex digits)::

    id bigint PRIMARY KEY        the store's row number
    vector vector(D)             halfvec(D) for a float16 store
    label, superclass bigint     class ids (labelled stores)
    path text                    the item's path (folders) or ref (CIFAR): what --where path= matches
    caption text                 folders with captions
    taken, camera                photo metadata, nullable, when the store's items have them
    digest bytea                 sha256 of the row as written: what an incremental sync compares

and ``cliplens_tables`` (one row per table: the store folder, the store generation it mirrors, the index kind and
settings). Vector index: HNSW with ``vector_cosine_ops`` (``m``, ``ef_construction``), IVFFlat (``lists``), or none
(every query a sequential scan: exact). ``build`` creates or *syncs* the table in one transaction: rows whose digest
changed are replaced, new ids inserted, ids the store no longer has deleted, and the generation recorded, so a
killed build leaves the previous table and record; a table whose generation is not the store's is refused.

Search: ``ORDER BY vector <=> query LIMIT k + extra`` with the filters as a WHERE clause of bound parameters,
``hnsw.ef_search`` / ``ivfflat.probes`` and iterative index scans (``relaxed_order``) set per query, then the
candidates are re-scored exactly from the store (so ``Hit.score`` is the store's cosine). Should an index scan still
come back short of k with a filter, that query runs again as an exact sequential scan.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from cliplens.errors import BackendError
from cliplens.index import pg_sql
from cliplens.index.backends import check_allowed, check_ids, check_queries, rescore, store_key
from cliplens.index.pg_connect import check_extension, connect, resolve

log = logging.getLogger(__name__)

META = "cliplens_tables"
INDEX_KINDS = ("hnsw", "ivfflat", "none")
SCANS = ("auto", "index", "exact")
_COPY_ROWS = 4096  # rows encoded and sent per COPY chunk (4096 x 2 KiB = 8 MiB)
_REBUILD_FRACTION = 0.2  # replacing more rows than this: drop the vector index, write, build it again (faster)


def default_table(store) -> str:
    root = str(Path(store.root).expanduser().resolve())
    slug = re.sub(r"[^a-z0-9_]+", "_", Path(root).name.lower()).strip("_")[:36] or "index"
    return f"cliplens_{slug}_{hashlib.sha256(root.encode()).hexdigest()[:10]}"


class PgvectorIndex:
    """One table over one store. Create with :meth:`build` or :meth:`open`."""

    accepts_where = True  # Searcher / run_query pass --where filters here, to become SQL

    def __init__(self, *, conn, target, store, table: str, meta: dict, ef_search: int | None = None,
                 probes: int | None = None, scan: str = "auto", iterative_scan: str = "relaxed_order",
                 extra: int = 8, fallback: bool = True):
        from psycopg import sql

        if scan not in SCANS:
            raise BackendError(f"unknown scan {scan!r}: use one of {', '.join(SCANS)}")
        self.conn, self.target, self.store, self.table, self.meta = conn, target, store, table, meta
        self.kind = meta["index_kind"]
        self.ef_search, self.probes, self.scan, self.iterative_scan = ef_search, probes, scan, iterative_scan
        self.extra = int(extra)  # candidates beyond k, re-scored exactly: float rounding at the k-th place
        self.fallback = fallback  # a filtered index scan that comes back short of k runs again, exactly
        self.columns = list(meta["columns"])
        self.vector_type = meta["vector_type"]
        self.ident = sql.Identifier(table)
        self.class_columns = {c: store.items[c].astype(np.int64) for c in ("label", "superclass") if c in self.columns}
        self.last_sql: str | None = None  # what the database ran last, with its parameters (tests, --verbose)
        self.last_params: tuple = ()
        self.fallbacks = 0  # queries that came back short from the index and ran again as a sequential scan
        self._lock = threading.Lock()  # one connection: one query at a time (serve answers from many threads)
        self._sent: dict[str, str] = {}  # session settings already sent on this connection
        # No prepared statements: a cached generic plan would keep the scan it was planned with (say, the HNSW
        # index) after the settings change (scan="exact"); each query is planned afresh (~0.1 ms).
        conn.prepare_threshold = None
        _register_vector_dumper(conn, self.vector_type)
        self._vector_dtype = ">f2" if self.vector_type == "halfvec" else ">f4"
        if ef_search is not None and self.kind != "hnsw":
            raise BackendError(f"efSearch applies to HNSW tables, not {table} ({self.kind})")
        if probes is not None and self.kind != "ivfflat":
            raise BackendError(f"probes apply to IVFFlat tables, not {table} ({self.kind})")

    def settings(self) -> dict:
        return {"table": self.table, "index": self.kind}

    def describe(self) -> str:
        c = getattr(self, "sync_counts", {})
        changes = f"; {c['inserted']} inserted, {c['updated']} updated, {c['deleted']} deleted" if c else ""
        params = ", ".join(f"{k} {v}" for k, v in self.meta.get("index_params", {}).items())
        return f"pgvector table {self.table} ({self.kind}{', ' + params if params else ''}{changes}) at {self.target.shown}"

    # ---------------------------------------------------------------- build / open
    @classmethod
    def build(cls, store, *, uri: str | None = None, table: str | None = None, index: str = "hnsw",
              m: int | None = None, ef_construction: int | None = None, lists: int | None = None,
              btree: bool = True, progress: bool = True, **search_options) -> "PgvectorIndex":
        """Create or sync the store's table (one transaction) and its vector index; returns it opened.

        ``btree``: also index label and superclass (b-trees), so the planner can answer a selective class filter
        from them exactly, without the vector index."""
        from cliplens.index.pg_build import sync_table

        if index not in INDEX_KINDS:
            raise BackendError(f"unknown pgvector index {index!r}: use one of {', '.join(INDEX_KINDS)}")
        if index != "hnsw" and (m is not None or ef_construction is not None):
            raise BackendError(f"m and efConstruction set how an HNSW index is built, not {index}: build an hnsw index",
                               fix={"pg_index": "hnsw"})
        if index != "ivfflat" and lists is not None:
            raise BackendError(f"lists sets how an IVFFlat index is built, not {index}: build an ivfflat index",
                               fix={"pg_index": "ivfflat"})
        target = resolve(store, uri)
        conn = connect(target)
        name = table or default_table(store)
        params = {"m": m or 16, "ef_construction": ef_construction or 64} if index == "hnsw" else \
            {"lists": lists or max(1, min(len(store) // 1000, 4 * int(np.sqrt(len(store)))))} if index == "ivfflat" else {}
        with _closing_on_error(conn):
            check_extension(conn, target, create=True)
            counts = sync_table(conn, target, store, name, index_kind=index, index_params=params, btree=btree,
                                progress=progress)
        log.info("pgvector table %s: %s", name, counts)
        opened = cls.open(store, uri=uri, table=name, _conn=(conn, target), **search_options)
        opened.sync_counts = counts
        return opened

    @classmethod
    def open(cls, store, *, uri: str | None = None, table: str | None = None, _conn=None,
             **search_options) -> "PgvectorIndex":
        conn, target = _conn if _conn is not None else (None, resolve(store, uri, create=False))
        conn = conn or connect(target)
        with _closing_on_error(conn):
            return cls._open(store, conn, target, table, search_options)

    @classmethod
    def _open(cls, store, conn, target, table: str | None, search_options: dict) -> "PgvectorIndex":
        check_extension(conn, target, create=False)
        hint = f"`cliplens build-index --index-dir {store.root} --backend pgvector --pg-uri {target.flag}`"
        has_meta = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (META,)).fetchone()[0]
        rows = conn.execute(f"SELECT table_name, store_root, meta FROM {META}").fetchall() if has_meta else []
        root = str(Path(store.root).expanduser().resolve())
        name = table or default_table(store)
        mine = [r for r in rows if r[1] == root]
        if table is None and name not in {r[0] for r in rows} and mine:  # one table built for this folder: use it
            if len(mine) > 1:
                raise BackendError(f"several pgvector tables mirror {store.root} at {target.shown}: "
                                   f"{', '.join(sorted(r[0] for r in mine))}; pick one with --pg-table")
            name = mine[0][0]
        row = next((r for r in rows if r[0] == name), None)
        if row is None:
            raise BackendError(f"no pgvector table {name} at {target.shown}: build it with {hint}")
        if row[1] != root:
            raise BackendError(f"the pgvector table {name} at {target.shown} mirrors another index ({row[1]}), not "
                               f"{store.root}: choose another --pg-table, or rebuild it with {hint}")
        meta = row[2]
        if meta.get("store_key") != store_key(store):
            raise BackendError(f"the pgvector table {name} at {target.shown} mirrors an older generation of "
                               f"{store.root} (built {meta.get('built', '?')}): refresh it with {hint}")
        return cls(conn=conn, target=target, store=store, table=name, meta=meta, **search_options)

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        from psycopg import sql

        with self._lock:
            return int(self.conn.execute(sql.SQL("SELECT count(*) FROM {}").format(self.ident)).fetchone()[0])

    def search(self, queries: np.ndarray, k: int, *, allowed: np.ndarray | None = None, where=(),
               ef_search: int | None = None, probes: int | None = None,
               scan: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k by cosine; ``where``: parsed ``--where`` filters (run as SQL), ``allowed``: a bool mask (as ids or
        classes in SQL); ``ef_search`` / ``probes`` / ``scan`` ("auto", "index", "exact") override the settings."""
        q = check_queries(queries, self.store.dim)
        allowed = check_allowed(allowed, len(self.store))
        k = min(int(k), len(self.store) if allowed is None else int(allowed.sum()))
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        clauses = pg_sql.where_clauses(self.store, where, self.columns)
        if allowed is not None and not allowed.all():
            clauses.append(pg_sql.mask_clause(allowed, self.class_columns))
        ef = ef_search if ef_search is not None else self.ef_search
        probes = probes if probes is not None else self.probes
        scan = scan or self.scan
        limit = k + self.extra
        candidates = np.full((len(q), limit), -1, dtype=np.int64)
        with self._lock:
            for row, vector in enumerate(q):
                ids = self._query(vector, clauses, limit, ef, probes, scan)
                if self.fallback and len(ids) < limit and clauses and scan != "exact" and self.kind != "none":
                    exact = self._query(vector, clauses, limit, ef, probes, "exact")
                    if len(exact) > len(ids):  # the index gave up before the filter let enough through
                        self.fallbacks += 1
                        ids = exact
                candidates[row, : len(ids)] = ids
        return rescore(q, candidates, self.store.embeddings, k)

    def _query(self, vector: np.ndarray, clauses, limit: int, ef, probes, scan: str, *,
               explain: bool = False) -> list:
        from psycopg import sql

        where = " AND ".join(c.sql for c in clauses) or "TRUE"
        text = f"SELECT id FROM {{}} WHERE {where} ORDER BY vector <=> %b LIMIT %s"
        params = tuple(p for c in clauses for p in c.params) + (self._vector_param(vector), limit)
        self._settings(ef=ef, probes=probes, scan=scan, limit=limit)
        query = sql.SQL(("EXPLAIN " if explain else "") + text).format(self.ident)
        self.last_sql, self.last_params = query.as_string(self.conn), params
        return [r[0] for r in self.conn.execute(query, params).fetchall()]

    def _vector_param(self, vector: np.ndarray) -> VectorParam:
        head = np.array([len(vector), 0], dtype=">i2").tobytes()
        return VectorParam(head + np.asarray(vector, dtype=self._vector_dtype).tobytes())

    def _settings(self, *, ef, probes, scan: str, limit: int) -> None:
        """Session settings for the next query, sent (in one statement) only when they change: a query is then
        one round trip. The connection is this index's own, so session-level settings touch nobody else."""
        want = {"enable_seqscan": "off" if scan == "index" else "on",
                "enable_bitmapscan": "off" if scan in ("index", "exact") else "on",
                "enable_indexscan": "off" if scan == "exact" else "on"}
        if self.kind == "hnsw":
            want["hnsw.ef_search"] = str(min(1000, max(ef or 40, limit)))  # pgvector's own range: 1..1000
            want["hnsw.iterative_scan"] = self.iterative_scan
        elif self.kind == "ivfflat":
            want["ivfflat.probes"] = str(probes or 1)
            want["ivfflat.iterative_scan"] = "off" if self.iterative_scan == "off" else "relaxed_order"
        changed = {k: v for k, v in want.items() if self._sent.get(k) != v}
        if changed:
            calls = ", ".join(["set_config(%s, %s, false)"] * len(changed))
            self.conn.execute(f"SELECT {calls}", tuple(x for kv in changed.items() for x in kv))
            self._sent.update(changed)

    def explain(self, vector: np.ndarray, *, where=(), k: int = 10, scan: str | None = None) -> str:
        """The database's plan for one query (EXPLAIN), e.g. to see whether the HNSW index is used."""
        clauses = pg_sql.where_clauses(self.store, where, self.columns)
        with self._lock:
            rows = self._query(check_queries(vector, self.store.dim)[0], clauses, k + self.extra, self.ef_search,
                               self.probes, scan or self.scan, explain=True)
        return "\n".join(rows)

    def delete(self, ids) -> int:
        """Delete rows from the table; returns how many the database removed."""
        from psycopg import sql

        ids = check_ids(ids, len(self.store))
        if not len(ids):
            return 0
        with self._lock:
            cur = self.conn.execute(sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(self.ident), (ids.tolist(),))
            return int(cur.rowcount)

    def close(self) -> None:
        self.conn.close()

    def __del__(self):  # an index dropped without close() (a CLI command ending) closes its connection quietly
        conn = getattr(self, "conn", None)
        if conn is not None and not conn.closed:
            conn.close()


@contextmanager
def _closing_on_error(conn):
    try:
        yield
    except BaseException:
        conn.close()
        raise


class VectorParam:
    """A query vector sent in pgvector's binary format (int16 dim, int16 0, big-endian floats): no text to print
    and parse, 2 KiB on the wire instead of ~10 KiB."""

    def __init__(self, data: bytes):
        self.data = data


def _register_vector_dumper(conn, vector_type: str) -> None:
    from psycopg.adapt import Dumper
    from psycopg.pq import Format
    from psycopg.types import TypeInfo

    info = TypeInfo.fetch(conn, vector_type)
    if info is None:
        raise BackendError(f"the database has no {vector_type} type: is the vector extension installed?")

    class _Dumper(Dumper):
        format = Format.BINARY
        oid = info.oid

        def dump(self, obj):
            return obj.data

    conn.adapters.register_dumper(VectorParam, _Dumper)
