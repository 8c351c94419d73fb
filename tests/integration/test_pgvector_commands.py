"""pgvector through the commands, on the session's real PostgreSQL (``pg_dsn``): ``index FOLDER --backend pgvector``
run twice (the table follows the folder in place), a stale table refused by ``search``, ``evaluate`` and ``serve``
(the JSON API with a --where filter) giving the exact numbers and hits."""

from __future__ import annotations

from pathlib import Path

import json
import shutil

import folder_fixture
import numpy as np
import pytest
from pg_fixture import admin, pg_available

from cliplens.cli import build_parser, main
from cliplens.store import IndexStore

pytestmark = pytest.mark.skipif(not pg_available(), reason="the pgvector extra is not installed")


def _index(folder, out, model, *flags):
    return main(["index", str(folder), "--index-dir", str(out), "--model", model, "--device", "cpu",
                 "--batch-size", "4", "-q", *flags])


def _changed_ids(old: IndexStore, new: IndexStore) -> tuple[int, int, int]:
    """(inserted, updated, deleted) rows a table mirroring ``old`` needs to mirror ``new``, from the stores alone."""
    n_old, n_new = len(old), len(new)
    same = lambda i: (old.items["path"][i] == new.items["path"][i] and old.items["caption"][i] == new.items["caption"][i]
                      and np.array_equal(old.embeddings[i], new.embeddings[i]))  # noqa: E731
    updated = sum(1 for i in range(min(n_old, n_new)) if not same(i))
    return max(0, n_new - n_old), updated, max(0, n_old - n_new)


def test_index_folder_keeps_the_table_in_step(tmp_path, tiny_model, pg_dsn, capsys, monkeypatch):
    photos = folder_fixture.make_folder(tmp_path / "photos")
    out = tmp_path / "photos-index"
    pg = ["--backend", "pgvector", "--pg-uri", pg_dsn]
    assert _index(photos, out, tiny_model, *pg) == 0
    printed = capsys.readouterr().out
    first = IndexStore.open(out)
    assert "built pgvector table cliplens_photos_index_" in printed
    assert f"{len(first)} inserted, 0 updated, 0 deleted" in printed

    # the folder changes: a file removed, one added (last in path order), a caption edited
    (photos / "e.bmp").unlink()
    shutil.copy(photos / "sub" / "b.jpg", photos / "zz-new.jpg")
    from PIL import Image

    Image.fromarray(folder_fixture.noise(np.random.default_rng(7), 30, 30)).save(photos / "zz-new.jpg")
    (photos / "a.txt").write_text("a completely different caption")
    monkeypatch.setenv("CLIPLENS_PG_URI", pg_dsn)  # the default --pg-uri from now on
    assert _index(photos, out, tiny_model, "--backend", "pgvector") == 0
    printed = capsys.readouterr().out
    second = IndexStore.open(out)
    inserted, updated, deleted = _changed_ids(first, second)
    assert f"{inserted} inserted, {updated} updated, {deleted} deleted" in printed
    assert updated >= 1  # the caption, at least

    outs = {}
    for flags in ([], ["--backend", "pgvector"]):
        assert main(["search", "red", "--index-dir", str(out), "-k", "3", "--json", "--where", "path=sub/*",
                     *flags]) == 0
        outs[bool(flags)] = [h["id"] for h in json.loads(capsys.readouterr().out)["hits"]]
    assert outs[True] == outs[False] and len(outs[True]) == 2  # sub/b.jpg and sub/deep/c.webp

    # the folder is indexed again without the backend: the table now mirrors an older generation
    (photos / "d.gif").unlink()
    assert _index(photos, out, tiny_model) == 0
    capsys.readouterr()
    assert main(["search", "red", "--index-dir", str(out), "--backend", "pgvector", "-k", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "mirrors an older generation" in err
    assert f"refresh it with `cliplens build-index --index-dir {out} --backend pgvector --pg-uri '" in err
    assert main(["build-index", "--index-dir", str(out), "--backend", "pgvector", "-q"]) == 0
    assert "0 inserted, " in capsys.readouterr().out
    assert main(["search", "red", "--index-dir", str(out), "--backend", "pgvector", "-k", "3"]) == 0


@pytest.fixture(scope="module")
def cifar_copy(tiny_index, tmp_path_factory):
    root = tmp_path_factory.mktemp("pgcmd") / "cifar100-test"
    shutil.copytree(tiny_index, root)
    return root


def test_evaluate_through_a_sequential_scan_table_equals_exact(cifar_copy, pg_dsn, tmp_path, capsys):
    assert main(["build-index", "--index-dir", str(cifar_copy), "--backend", "pgvector", "--pg-uri", pg_dsn,
                 "--pg-index", "none", "-q"]) == 0
    capsys.readouterr()
    common = ["evaluate", "--index-dir", str(cifar_copy), "--templates", "single", "-k", "1,5,10", "-q",
              "--device", "cpu", "--text-cache-dir", str(tmp_path / "tc")]
    metrics = {}
    for name, flags in (("exact", []), ("pg", ["--backend", "pgvector", "--pg-uri", pg_dsn])):
        assert main([*common, "--out", str(tmp_path / name), *flags]) == 0
        capsys.readouterr()
        metrics[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert metrics["pg"]["per_template"] == metrics["exact"]["per_template"]
    assert metrics["pg"]["case_studies"] == metrics["exact"]["case_studies"]
    assert metrics["pg"]["retrieval_index"]["backend"].startswith("pgvector cliplens_cifar100_test_")


def test_serve_api_with_pgvector_and_a_filter_returns_the_exact_hits(cifar_copy, pg_dsn):
    from fastapi.testclient import TestClient

    from cliplens.cli.web import build_searchers
    from cliplens.web import create_app

    assert main(["build-index", "--index-dir", str(cifar_copy), "--backend", "pgvector", "--pg-uri", pg_dsn,
                 "--pg-index", "hnsw", "-q"]) == 0

    def hits(flags):
        args = build_parser().parse_args(["serve", "--index-dir", str(cifar_copy), "--device", "cpu", *flags])
        searchers = build_searchers(args)
        with TestClient(create_app(searchers), base_url="http://127.0.0.1") as client:
            got = []
            for q, where in (("apple", []), ("tulip", ["superclass=flowers"]), ("sky", ["label=cloud,sea"])):
                r = client.get("/api/search", params={"q": q, "k": 8, "where": where})
                assert r.status_code == 200, r.text
                got.append([(h["id"], h["label"], round(h["score"], 5)) for h in r.json()["hits"]])
        return got, searchers

    exact, _ = hits([])
    through, searchers = hits(["--backend", "pgvector", "--pg-uri", pg_dsn, "--ef-search", "256",
                               "--pg-scan", "index"])
    index = next(iter(searchers.values())).index
    assert type(index).__name__ == "PgvectorIndex" and "label = ANY(%s)" in index.last_sql
    assert through == exact
    index.close()


def test_cli_refuses_pg_flags_on_other_backends_and_bad_servers(cifar_copy, pg_dsn, capsys):
    cases = ((["build-index", "--index-dir", str(cifar_copy), "--backend", "faiss", "--pg-m", "8"],
              "--pg-m sets how a pgvector table is indexed, not the faiss backend"),
             (["build-index", "--index-dir", str(cifar_copy), "--backend", "pgvector", "--pg-uri", pg_dsn,
               "--pg-index", "ivfflat", "--ef-construction", "100"], "--ef-construction applies to HNSW indexes"),
             (["search", "apple", "--index-dir", str(cifar_copy), "--backend", "pgvector", "--pg-uri",
               "postgresql://postgres@127.0.0.1:1/postgres"], "cannot reach PostgreSQL at postgres@127.0.0.1:1/postgres"))
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    with admin(pg_dsn) as conn:  # nothing was created for the refused builds (other tests share this server)
        if conn.execute("SELECT to_regclass('cliplens_tables') IS NOT NULL").fetchone()[0]:
            assert conn.execute("SELECT count(*) FROM cliplens_tables WHERE store_root = %s AND "
                                "meta->>'index_kind' = 'ivfflat'", (str(Path(cifar_copy).resolve()),)).fetchone()[0] == 0
