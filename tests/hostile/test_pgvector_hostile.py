"""Hostile pgvector inputs, each one line (a parametrised case): servers that cannot be used, and --where values
built to break out of SQL. Every refusal is one line naming what to do, exit 2 through the CLI, nothing created or
damaged; every injection attempt returns what exact search returns and leaves a canary table standing."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pg_fixture import admin, pg_available, scratch_database

from cliplens.cli import main
from cliplens.errors import BackendError
from cliplens.index import ExactIndex, build_index, open_index
from cliplens.query import parse_where, where_mask
from cliplens.store import IndexStore

pytestmark = pytest.mark.skipif(not pg_available(), reason="the pgvector extra is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_socket(dsn, tmp_path):
    return f"host={tmp_path / 'nobody-listens'} user=postgres dbname=postgres"


def _closed_port(dsn, tmp_path):
    return f"postgresql://postgres@127.0.0.1:{_free_port()}/postgres"


def _wrong_password(dsn, tmp_path):
    """A role with a password, and pg_hba asking for it (scram) on the socket: the wrong one is refused."""
    with admin(dsn) as conn:
        conn.execute("DROP ROLE IF EXISTS pw_user")
        conn.execute("CREATE ROLE pw_user LOGIN PASSWORD 'right-password'")
        hba = Path(conn.execute("SHOW hba_file").fetchone()[0])
        text = hba.read_text()
        if "pw_user" not in text:
            hba.write_text("local all pw_user scram-sha-256\n" + text)
            conn.execute("SELECT pg_reload_conf()")
    return dsn.replace("user=postgres", "user=pw_user password=wrong-password")


def _missing_database(dsn, tmp_path):
    return dsn.replace("dbname=postgres", "dbname=no_such_db")


def _no_vector_no_privilege(dsn, tmp_path):
    """A database without the extension, and a plain user who may not create it (vector is not a trusted one)."""
    scratch = scratch_database(dsn, vector=False)
    with admin(dsn) as conn:
        conn.execute("DROP ROLE IF EXISTS plain_user")
        conn.execute("CREATE ROLE plain_user LOGIN")
    with admin(scratch) as conn:
        conn.execute("GRANT CREATE ON SCHEMA public TO plain_user")
    return scratch.replace("user=postgres", "user=plain_user")


def _old_pgvector(dsn, tmp_path):
    """A database whose vector extension reports 0.7.4 (as a server with an older pgvector would)."""
    scratch = scratch_database(dsn)
    with admin(scratch) as conn:
        conn.execute("UPDATE pg_extension SET extversion = '0.7.4' WHERE extname = 'vector'")
    return scratch


def _bad_uri(dsn, tmp_path):
    return "postgresql://[oops"


SERVERS = [
    ("no-socket", _no_socket, "cannot reach PostgreSQL at postgres@"),
    ("closed-port", _closed_port, "cannot reach PostgreSQL at postgres@127.0.0.1:"),
    ("wrong-password", _wrong_password, "refused the login (password authentication failed for user \"pw_user\")"),
    ("missing-database", _missing_database, "no such database at postgres@"),
    ("no-vector-extension", _no_vector_no_privilege, "has no 'vector' extension and user plain_user may not create it"),
    ("old-pgvector", _old_pgvector, "is pgvector 0.7.4; cliplens needs 0.8.0 or newer"),
    ("bad-uri", _bad_uri, "bad PostgreSQL URI"),
]


@pytest.fixture(scope="module")
def store(tiny_index, tmp_path_factory) -> IndexStore:
    root = tmp_path_factory.mktemp("hostile-pg") / "cifar100-test"
    shutil.copytree(tiny_index, root)
    return IndexStore.open(root)


@pytest.mark.parametrize("case,make_uri,message", SERVERS, ids=[c[0] for c in SERVERS])
def test_unusable_servers_are_one_line(case, make_uri, message, store, pg_dsn, tmp_path, capsys):
    uri = make_uri(pg_dsn, tmp_path)
    for action in (build_index, open_index):
        with pytest.raises(BackendError) as info:
            action(store, "pgvector", uri=uri, **({"progress": False} if action is build_index else {}))
        text = str(info.value)
        if action is open_index and case == "no-vector-extension":  # opening never creates anything
            assert "has no 'vector' extension, so no cliplens table" in text
        else:
            assert message in text, text
        assert "\n" not in text and "right-password" not in text and "wrong-password" not in text
    assert main(["build-index", "--index-dir", str(store.root), "--backend", "pgvector", "--pg-uri", uri, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cliplens: error: ") and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "wrong-password" not in err
    assert not (store.root / "pg").exists()  # no embedded server was started instead


def test_a_table_cliplens_did_not_make_is_left_alone(store, pg_dsn):
    from cliplens.index.pgvector_index import default_table

    scratch = scratch_database(pg_dsn)
    name = default_table(store)
    with admin(scratch) as conn:
        conn.execute(f'CREATE TABLE "{name}" (id bigint, precious text)')
        conn.execute(f"INSERT INTO \"{name}\" VALUES (1, 'keep me')")
    with pytest.raises(BackendError, match=f"a table {name} exists at .* that cliplens did not make") as info:
        build_index(store, "pgvector", uri=scratch, progress=False)
    assert "--pg-table NAME" in str(info.value)
    with admin(scratch) as conn:
        assert conn.execute(f'SELECT * FROM "{name}"').fetchall() == [(1, "keep me")]


INJECTIONS = [
    "path=x' OR '1'='1",
    "path='); DROP TABLE canary; --",
    "caption=%' OR 1=1 --",
    "caption=\\'; DELETE FROM canary; --",
    "path=*' UNION SELECT id FROM canary --",
    "label=apple') OR ('1'='1",
    "path=%s%s%s",
    "path=$1",
    "caption=\x00",
    "path=*.png' ; SELECT pg_sleep(10); --",
]


@pytest.fixture(scope="module")
def pg_index(store, pg_dsn):
    index = build_index(store, "pgvector", uri=pg_dsn, index="none", table="hostile_where", progress=False)
    with admin(pg_dsn) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS canary (id int)")
        conn.execute("DELETE FROM canary")
        conn.execute("INSERT INTO canary VALUES (42)")
    yield index
    index.close()


@pytest.mark.parametrize("spec", INJECTIONS)
def test_where_values_never_become_sql(spec, pg_index, store, pg_dsn):
    q = np.asarray(store.embeddings[:2], np.float32)
    try:
        wheres = parse_where([spec])
        mask = where_mask(store, wheres)
    except Exception as exc:  # refused by the parser (e.g. no such label): the backend refuses it the same way
        with pytest.raises(type(exc)):
            pg_index.search(q, 5, where=parse_where([spec]))
        return
    got = pg_index.search(q, 5, where=wheres)
    want = ExactIndex(store.embeddings).search(q, 5, allowed=mask)
    np.testing.assert_array_equal(got[1], want[1])
    with admin(pg_dsn) as conn:  # the marker: no statement of ours ran
        assert conn.execute("SELECT id FROM canary").fetchall() == [(42,)]
        assert conn.execute("SELECT count(*) FROM hostile_where").fetchone()[0] == len(store)


def test_programs_behind_a_root_only_folder_are_named_in_one_line(tmp_path, monkeypatch):
    """As root the server runs as 'nobody', which cannot look up its programs behind a 0700 folder (a venv under
    /root, say): initdb's own message called them "not found". The failure now names the folder, in one line."""
    from cliplens.index import pg_server

    closed = tmp_path / "home"
    programs = closed / "venv" / "pginstall" / "bin"
    programs.mkdir(parents=True)
    closed.chmod(0o700)
    monkeypatch.setattr(pg_server, "_bin_dir", lambda: programs)
    monkeypatch.setattr(pg_server.os, "geteuid", lambda: 0)  # the case is root's; the tests may run as anyone
    monkeypatch.setattr(pg_server.shutil, "which", lambda name: f"/usr/bin/{name}")
    initdb_said = 'initdb: error: program "postgres" is needed by initdb but was not found in the same directory'
    monkeypatch.setattr(pg_server.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, stdout="", stderr=initdb_said + "\n"))  # what it printed, run from a 0700 clone
    server = pg_server.EmbeddedServer(tmp_path / "index" / "pg")
    server.data.mkdir(parents=True)
    with pytest.raises(BackendError) as caught:
        server._run(["initdb", "-D", str(server.data)], what="create the cluster")
    message = str(caught.value)
    assert "\n" not in message and "is closed to other users" in message and str(programs) in message
    named = Path(message.split(": ")[1].split(" is closed")[0])
    assert named in (closed, *closed.parents) and not named.stat().st_mode & 0o001
    assert list(server.data.iterdir()) == []


def test_the_first_folder_closed_to_an_account_is_found_from_the_root_down(tmp_path):
    from cliplens.index.pg_server import _closed_folder

    top = Path(tempfile.mkdtemp(dir="/tmp", prefix="cliplens-open-"))  # outside pytest's own 0700 folders
    try:
        top.chmod(0o755)
        deep = top / "a" / "b"
        deep.mkdir(parents=True)
        assert _closed_folder(deep, "nobody") is None
        (top / "a").chmod(0o711)  # searchable, not listable: enough
        assert _closed_folder(deep, "nobody") is None
        (top / "a").chmod(0o700)
        assert _closed_folder(deep, "nobody") == top / "a"
        assert _closed_folder(top / "missing" / "bin", "nobody") is None  # left to the command that needs it
    finally:
        (top / "a").chmod(0o755)
        shutil.rmtree(top)
