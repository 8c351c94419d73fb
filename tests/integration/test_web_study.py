"""The study's API for the page: map, suspects, compare, calibration; on a CIFAR-format and a folder index."""

from __future__ import annotations

import folder_fixture
import numpy as np
import pytest
from fastapi.testclient import TestClient

from cliplens.folder_index import FolderIndexOptions, index_folder
from cliplens.search import Searcher
from cliplens.store import IndexStore
from cliplens.web import create_app


@pytest.fixture(scope="module")
def searchers(tiny_index, tiny_encoder, tmp_path_factory):
    base = tmp_path_factory.mktemp("study-web")
    photos = folder_fixture.make_folder(base / "photos")
    index_folder(photos, tiny_encoder, base / "idx", options=FolderIndexOptions(batch_size=8, progress=False))
    return {"cifar": Searcher(encoder=tiny_encoder, store=IndexStore.open(tiny_index)),
            "photos": Searcher(encoder=tiny_encoder, store=IndexStore.open(base / "idx"))}


@pytest.fixture(scope="module")
def client(searchers):
    with TestClient(create_app(searchers), base_url="http://127.0.0.1") as c:
        yield c


def error(resp, status) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["status"] == status
    return body["error"]


def test_map_points_groups_and_cache(client, searchers):
    from cliplens.embedmap import cached_projection

    body = client.get("/api/study/map", params={"index": "cifar"}).json()
    assert body["count"] == 200 and len(body["x"]) == len(body["y"]) == len(body["group"]) == 200
    assert body["group_kind"] == "superclass" and len(body["groups"]) == 20 and min(body["x"]) == 0.0
    pts, cached = cached_projection(searchers["cifar"].store, method="pca")  # the page's points are the CLI's
    assert cached
    span = pts.max(axis=0) - pts.min(axis=0)
    np.testing.assert_allclose(body["x"], (pts[:, 0] - pts[:, 0].min()) / span[0], atol=1e-4)
    photos = client.get("/api/study/map", params={"index": "photos"}).json()
    assert photos["group_kind"] == "folder" and "sub/deep" in photos["groups"]
    error(client.get("/api/study/map", params={"method": "mds"}), 422)
    error(client.get("/api/study/map", params={"index": "nope"}), 404)


def test_suspects_are_the_library_ranking(client, searchers, tiny_encoder):
    from cliplens.prompts import english_classname, wrap_query
    from cliplens.suspects import find_suspects

    body = client.get("/api/study/suspects", params={"index": "cifar", "top": 7}).json()
    store = searchers["cifar"].store
    prompts = [wrap_query(english_classname(n), "a photo of a {}.") for n in store.class_names]
    expected = find_suspects(np.asarray(store.embeddings), store.labels, tiny_encoder.encode_texts(prompts),
                             num_classes=100)
    assert [s["id"] for s in body["suspects"]] == expected["ranked"][:7].tolist()
    assert body["flagged"] == len(expected["ranked"]) and body["suspects"][0]["image_url"].startswith("/api/items/")
    assert "has no labels" in error(client.get("/api/study/suspects", params={"index": "photos"}), 400)
    error(client.get("/api/study/suspects", params={"top": 0}), 422)


def test_compare_runs_the_query_in_every_index(client):
    body = client.get("/api/study/compare", params={"q": "tractor", "k": 5}).json()
    assert [r["index"] for r in body["rows"]] == ["cifar", "photos"]
    assert [len(r["hits"]) for r in body["rows"]] == [5, 5] and body["rows"][0]["model"].startswith("hf-hub:")
    single = client.get("/api/search", params={"q": "tractor", "k": 5, "index": "cifar"}).json()
    assert body["rows"][0]["hits"] == single["hits"]
    error(client.get("/api/study/compare"), 422)
    error(client.get("/api/study/compare", params={"q": "x" * 600}), 422)


def test_calibration_for_the_page_slider(client, searchers, tmp_path, monkeypatch):
    from cliplens.calibrate import record

    monkeypatch.setenv("CLIPLENS_HOME", str(tmp_path))
    assert "cliplens calibrate" in error(client.get("/api/study/calibration", params={"index": "cifar"}), 404)
    record(searchers["cifar"].store.manifest.model, "a photo of a {}.", {"threshold": 0.21, "precision": 0.9},
           index="x")
    body = client.get("/api/study/calibration", params={"index": "cifar"}).json()
    assert body["threshold"] == 0.21 and body["template"] == "a photo of a {}."


def test_page_loads_the_study_script(client):
    assert '<script src="/study/study.js" defer></script>' in client.get("/").text
    js = client.get("/study/study.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "cliplens:results" in js.text and "innerHTML" not in js.text
    assert 'CustomEvent("cliplens:results"' in client.get("/static/app.js").text


def test_search_can_keep_only_suspect_labels(client, searchers):
    """``suspects=true``: the search ranked over the flagged items only, the same ranking as the library's."""
    import numpy as np

    from cliplens.query import Term, run_query

    flagged = [s["id"] for s in client.get("/api/study/suspects", params={"index": "cifar", "top": 1000}).json()
               ["suspects"]]
    body = client.get("/api/search", params={"q": "apple", "index": "cifar", "k": 5, "suspects": "true"}).json()
    mask = np.zeros(len(searchers["cifar"].store), bool)
    mask[flagged] = True
    want = run_query(searchers["cifar"], [Term("text", "apple")], 5, restrict=mask)
    assert [h["id"] for h in body["hits"]] == [h.id for h in want.hits] and set(flagged) >= {h.id for h in want.hits}
    error(client.get("/api/search", params={"q": "apple", "index": "photos", "suspects": "true"}), 400)
