"""Connecting the pgvector backend: a DSN or the embedded server, and every way that can fail, as one line.

``uri`` is a libpq connection string or URI (``postgresql://user@host:5432/db``, ``host=/run/postgresql
dbname=photos``; a password from the URI, ``$PGPASSWORD`` or ``~/.pgpass``), ``embedded`` (a private server
with its data in ``INDEX_DIR/pg``) or ``embedded:PATH`` (one in ``PATH``, e.g. shared by several indexes). With no
``uri``: ``$CLIPLENS_PG_URI``, else the embedded server.

A password never appears in a message: servers are shown as ``user@host:port/db``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cliplens.errors import BackendError

log = logging.getLogger(__name__)

URI_ENV = "CLIPLENS_PG_URI"
MIN_PGVECTOR = (0, 8, 0)  # iterative index scans (hnsw.iterative_scan) arrived in 0.8.0; halfvec in 0.7.0
CONNECT_TIMEOUT = 10  # seconds


@dataclass
class PgTarget:
    conninfo: str
    shown: str  # for messages: user@host:port/db, or "the embedded server in DIR"
    flag: str  # the --pg-uri value that reaches it again (no password), for the commands messages suggest
    server: object | None = None  # the EmbeddedServer, when embedded


def resolve(store, uri: str | None, *, create: bool = True) -> PgTarget:
    """Where ``uri`` points (starting the embedded server if that is where; creating its cluster if ``create``)."""
    uri = (uri if uri is not None else os.environ.get(URI_ENV, "")).strip() or "embedded"
    if uri == "embedded" or uri.startswith("embedded:"):
        from cliplens.index.pg_server import DIR, embedded_server

        folder = Path(uri[len("embedded:"):]).expanduser() if ":" in uri else Path(store.root) / DIR
        if not create and not (folder / "data" / "PG_VERSION").is_file():  # nothing was ever built there
            raise BackendError(f"no embedded PostgreSQL in {folder}, so no pgvector table for {store.root}: build "
                               f"one with `cliplens build-index --index-dir {store.root} --backend pgvector` "
                               "(or give --pg-uri, or set $CLIPLENS_PG_URI, for your own server)")
        server = embedded_server(folder)
        return PgTarget(server.conninfo(), f"the embedded PostgreSQL in {folder}", uri, server)
    shown = _shown(uri)
    return PgTarget(uri, shown, f"'{_without_password(uri)}'")


def connect(target: PgTarget):
    """An autocommit psycopg connection, or a BackendError that says what to fix."""
    try:
        import psycopg
    except ImportError:
        raise BackendError("the pgvector backend needs psycopg: pip install 'cliplens[pgvector]'") from None
    try:
        return psycopg.connect(target.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                               application_name="cliplens")
    except psycopg.ProgrammingError as exc:  # a malformed URI / conninfo
        raise BackendError(f"bad PostgreSQL URI ({_first_line(exc)}): use postgresql://user@host:5432/db, "
                           "host=... dbname=..., or embedded", fix={"pg_uri": None}) from None
    except psycopg.OperationalError as exc:
        raise BackendError(explain_connect_error(exc, target)) from None


def explain_connect_error(exc: Exception, target: PgTarget) -> str:
    text = str(exc).lower()
    state = getattr(exc, "sqlstate", None)
    reason = _first_line(exc)
    if state in ("28P01", "28000") or "authentication failed" in text or "no password supplied" in text \
            or "password" in text and "required" in text:
        return (f"PostgreSQL at {target.shown} refused the login ({reason}): fix the user or password in --pg-uri, "
                "$PGPASSWORD or ~/.pgpass")
    if state == "3D000" or ("database" in text and "does not exist" in text):
        return f"no such database at {target.shown} ({reason}): create it (createdb) or fix --pg-uri"
    if any(s in text for s in ("connection refused", "no such file or directory", "could not translate host",
                               "timeout expired", "could not connect", "connection failed", "is the server")):
        return (f"cannot reach PostgreSQL at {target.shown} ({reason}): start the server or fix --pg-uri "
                "(--pg-uri embedded runs a private one)")
    return f"cannot connect to PostgreSQL at {target.shown} ({reason}): check --pg-uri"


def check_extension(conn, target: PgTarget, *, create: bool) -> str:
    """The database's pgvector version, creating the extension when ``create`` and allowed; else one line why not."""
    import psycopg

    version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    if version is None:
        available = conn.execute("SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
                                 ).fetchone()
        db, user = conn.info.dbname, conn.info.user
        if available is None:
            raise BackendError(f"the PostgreSQL server at {target.shown} has no pgvector (extension 'vector' is not "
                               "installed on it): install pgvector >= 0.8 there, or use --pg-uri embedded")
        if not create:
            raise BackendError(f"database {db} at {target.shown} has no 'vector' extension, so no cliplens table: "
                               "build one with `cliplens build-index --backend pgvector`")
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        except psycopg.errors.InsufficientPrivilege:
            raise BackendError(f"database {db} at {target.shown} has no 'vector' extension and user {user} may not "
                               f"create it: ask its owner to run CREATE EXTENSION vector; in {db}") from None
        version = conn.execute("SELECT extversion FROM pg_extension WHERE extname = 'vector'").fetchone()
    have = version[0]
    if _version_tuple(have) < MIN_PGVECTOR:
        need = ".".join(map(str, MIN_PGVECTOR))
        raise BackendError(f"the 'vector' extension in database {conn.info.dbname} at {target.shown} is pgvector "
                           f"{have}; cliplens needs {need} or newer (iterative index scans): install it on the server "
                           "and run ALTER EXTENSION vector UPDATE;")
    return have


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for p in str(text).split("."):
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _shown(uri: str) -> str:
    try:
        from psycopg.conninfo import conninfo_to_dict

        d = conninfo_to_dict(uri)
    except Exception:  # malformed: connect() says so
        return "the --pg-uri server"
    host = str(d.get("host") or os.environ.get("PGHOST") or "localhost")
    port = str(d.get("port") or os.environ.get("PGPORT") or "5432")
    user = str(d.get("user") or os.environ.get("PGUSER") or "")
    db = str(d.get("dbname") or os.environ.get("PGDATABASE") or user or "")
    return f"{user + '@' if user else ''}{host}:{port}/{db}"


def _without_password(uri: str) -> str:
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        d = conninfo_to_dict(uri)
    except Exception:
        return "postgresql://..."
    if "password" not in d:
        return uri
    d.pop("password")
    return make_conninfo(**d)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    for prefix in ("connection failed: ", "connection is bad: "):
        if line.startswith(prefix):
            line = line[len(prefix):]
    if "FATAL:" in line:  # the server's own reason, without libpq's "connection to server on socket ... failed:"
        line = line.split("FATAL:", 1)[1].strip()
    return line[:200]
