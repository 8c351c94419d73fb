"""The third source: `cliplens index list FILE` over CSV, JSONL and Parquet lists with captions and labels."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cliplens.cli import main
from cliplens.sources.listfile import read_list
from cliplens.store import IndexStore, index_files

ROWS = [  # an image with two captions (two rows), as COCO / Flickr30k exports have
    {"path": "img/red.png", "caption": "a red square", "label": "red"},
    {"path": "img/red.png", "caption": "something red", "label": "red"},
    {"path": "./img/blue.png", "caption": "a blue square", "label": "blue"},
    {"path": "green.png", "caption": "a green square", "label": "green"},
]
COLOURS = {"img/red.png": (220, 20, 20), "img/blue.png": (20, 20, 220), "green.png": (20, 200, 20)}


def _write(root, fmt):
    path = root / f"list.{fmt}"
    if fmt == "csv":
        path.write_text("path,caption,label\n" + "".join(f'{r["path"]},"{r["caption"]}",{r["label"]}\n' for r in ROWS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.fixture
def catalogue(tmp_path):
    root = tmp_path / "catalogue"
    for rel, rgb in COLOURS.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 24), rgb).save(root / rel)
    return root


def test_read_list_merges_captions_and_normalises_paths(catalogue):
    lst = read_list(_write(catalogue, "csv"))
    assert list(lst.entries) == ["img/red.png", "img/blue.png", "green.png"]
    assert lst.entries["img/red.png"].captions == ("a red square", "something red")
    assert lst.root == catalogue.resolve() and lst.has_labels and lst.has_captions and not lst.skipped


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_index_list_from_anywhere_then_search(fmt, catalogue, tmp_path, tiny_model, tiny_encoder, capsys,
                                              monkeypatch):
    monkeypatch.chdir(tmp_path)  # paths are relative to the list's folder, not to where cliplens runs
    out = tmp_path / f"idx-{fmt}"
    argv = ["index", "list", str(_write(catalogue, fmt)), "--index-dir", str(out), "--model", tiny_model,
            "--device", "cpu", "-q", "--batch-size", "2"]
    assert main(argv) == 0
    assert "3 added, 0 updated, 0 removed, 0 reused, 0 skipped" in capsys.readouterr().out
    store = IndexStore.open(out)
    m = store.manifest
    assert m.source.type == "list" and m.source.root == str(catalogue.resolve())
    assert m.class_names == ("blue", "green", "red") and store.has_labels
    assert list(store.items["path"]) == ["green.png", "img/blue.png", "img/red.png"]
    assert [store.class_names[i] for i in store.items["label"]] == ["green", "blue", "red"]
    assert json.loads(store.items["captions"][2]) == ["a red square", "something red"]
    assert store.items["caption"][1] == "a blue square"
    want = tiny_encoder.encode_images([Image.open(catalogue / "img/blue.png").convert("RGB")])[0]
    np.testing.assert_allclose(store.embeddings[1], want, atol=1e-5)
    gen = index_files(out)
    assert main(argv) == 0  # nothing changed: nothing embedded, no new generation
    assert "0 added, 0 updated, 0 removed, 0 reused, 0 skipped (3 unchanged" in capsys.readouterr().out
    assert index_files(out) == gen
    assert main(["search", "--image", str(catalogue / "green.png"), "--index-dir", str(out), "-k", "1",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hits"][0]["ref"] == "green.png"


def test_a_list_index_serves_its_images(catalogue, tmp_path, tiny_encoder):
    from fastapi.testclient import TestClient

    from cliplens.indexing import index_source, open_source
    from cliplens.search import Searcher
    from cliplens.web import create_app

    out = tmp_path / "idx"
    result = index_source(open_source("list", path=_write(catalogue, "jsonl")), tiny_encoder, out)
    assert result.embedded == 3 and result.manifest.count == 3
    with TestClient(create_app({"c": Searcher(encoder=tiny_encoder, store=IndexStore.open(out))}), base_url="http://127.0.0.1") as client:
        r = client.get("/api/items/0/image")
        assert r.status_code == 200 and r.headers["content-type"] == "image/webp"  # the stored thumbnail
        assert client.get("/api/indexes").json()["indexes"][0]["source"] == "list"


def test_a_list_index_and_a_folder_index_do_not_mix(catalogue, tmp_path, tiny_model, capsys):
    out = tmp_path / "idx"
    common = ["--index-dir", str(out), "--model", tiny_model, "--device", "cpu", "-q"]
    assert main(["index", str(catalogue), *common]) == 0
    capsys.readouterr()
    assert main(["index", "list", str(_write(catalogue, "csv")), *common]) == 2
    assert "holds an image-folder index: choose another --index-dir, or pass --force" in capsys.readouterr().err
