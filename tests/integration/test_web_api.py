"""The JSON API through FastAPI's test client: every endpoint, every limit, path tricks, batching."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time

import folder_fixture
import numpy as np
import pytest
from PIL import Image


from fastapi.testclient import TestClient  # noqa: E402

from cliplens.folder_index import FolderIndexOptions, index_folder  # noqa: E402
from cliplens.query import Term, run_query  # noqa: E402
from cliplens.search import Searcher  # noqa: E402
from cliplens.store import ITEMS, IndexStore, index_files, read_items, write_items  # noqa: E402
from cliplens.web import EncoderService, WebLimits, create_app  # noqa: E402

SECRET = "TOP-SECRET-CONTENTS"


@pytest.fixture(scope="module")
def photos_index(tmp_path_factory, tiny_encoder):
    base = tmp_path_factory.mktemp("web")
    photos = folder_fixture.make_folder(base / "photos")
    (base / "secret.txt").write_text(SECRET)  # beside the indexed folder: must never be served
    out = base / "photos-index"
    index_folder(photos, tiny_encoder, out, options=FolderIndexOptions(batch_size=8, progress=False))
    return out


@pytest.fixture(scope="module")
def searchers(tiny_index, photos_index, tiny_encoder):
    return {"cifar": Searcher(encoder=tiny_encoder, store=IndexStore.open(tiny_index)),
            "photos": Searcher(encoder=tiny_encoder, store=IndexStore.open(photos_index))}


@pytest.fixture(scope="module")
def client(searchers):
    app = create_app(searchers, limits=WebLimits(max_upload_bytes=200_000, max_pixels=1_000_000))
    with TestClient(app, base_url="http://127.0.0.1") as c:  # runs start-up and shut-down (the encoder worker stops at the end)
        yield c


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def core(hits: list[dict]) -> list[dict]:
    """The library's fields of API hits (the API adds thumbnail URLs and photo metadata)."""
    keys = ("rank", "id", "score", "label", "superclass", "ref", "match", "duplicates")
    return [{k: h[k] for k in keys if k in h} for h in hits]


def assert_json_error(resp, status):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["status"] == status and isinstance(body["error"], str) and body["error"]
    assert SECRET not in resp.text and "root:" not in resp.text


# --------------------------------------------------------------------------- meta


def test_healthz_indexes_and_openapi(client, searchers):
    health = client.get("/healthz").json()
    assert (health["status"], health["indexes"], health["models"]) == ("ok", 2, 1)  # one model, loaded once
    assert health["encoders"][0].keys() == {"text_calls", "texts", "image_calls", "largest_batch"}
    body = client.get("/api/indexes").json()
    assert [i["name"] for i in body["indexes"]] == ["cifar", "photos"] and body["default"] == "cifar"
    cifar, photos = body["indexes"]
    assert cifar["count"] == 200 and cifar["has_labels"] and len(cifar["superclasses"]) == 20
    assert photos["source"] == "folder" and photos["superclasses"] == [] and "root" not in photos
    assert body["template_sets"] == ["single", "cifar100", "imagenet80"] and body["limits"]["max_k"] == 1000
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/items/{item_id}", "/api/items/{item_id}/image", "/api/similar/{item_id}",
            "/api/indexes", "/healthz"} <= spec["paths"].keys()
    body_types = spec["paths"]["/api/search"]["post"]["requestBody"]["content"].keys()
    assert {"application/json", "multipart/form-data"} <= body_types


def test_page_and_static_assets_are_local(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/app.js" in page.text and "/static/style.css" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    for name, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        assert "https://" not in r.text


# --------------------------------------------------------------------------- search


def test_get_search_matches_the_library(client, searchers):
    r = client.get("/api/search", params={"q": "tulip", "k": 5})
    assert r.status_code == 200
    body = r.json()
    want = searchers["cifar"].search("tulip", 5).to_json()
    assert body["index"] == "cifar" and core(body["hits"]) == want["hits"] and body["prompt"] == want["prompt"]
    assert body["hits"][0]["thumb"] == f"/api/items/{body['hits'][0]['id']}/image?size=256&index=cifar"
    assert body["query_class"] == "tulip" and body["precision_at_k"] == want["precision_at_k"]


def test_get_search_templates_filters_min_score_and_index(client, searchers):
    body = client.get("/api/search", params={"q": "tulip", "k": 50, "template": "cifar100",
                                             "where": ["superclass=flowers"]}).json()
    assert body["prompt"] == '"tulip" x 18 templates' and {h["superclass"] for h in body["hits"]} == {"flowers"}
    assert len(body["hits"]) == 10
    top = client.get("/api/search", params={"q": "tulip", "k": 10}).json()["hits"]
    cut = top[3]["score"] - 5e-6  # the JSON scores are rounded to 6 places
    body = client.get("/api/search", params={"q": "tulip", "k": 10, "min_score": cut}).json()
    assert [h["id"] for h in body["hits"]] == [h["id"] for h in top[:4]]
    body = client.get("/api/search", params={"q": '"2:red square" - blue', "index": "photos", "k": 3,
                                             "where": "path=sub/*"}).json()
    assert body["index"] == "photos" and {h["ref"] for h in body["hits"]} == {"sub/b.jpg", "sub/deep/c.webp"}
    assert [t["weight"] for t in body["terms"]] == [2.0, -1.0]


def test_k_is_capped_by_the_index_size(client):
    body = client.get("/api/search", params={"q": "cat", "index": "photos", "k": 1000}).json()
    assert body["k"] == 9 and len(body["hits"]) == 9


@pytest.mark.parametrize("params,status", [
    ({"q": "cat", "k": 1001}, 422), ({"q": "cat", "k": 0}, 422), ({"q": "cat", "k": "ten"}, 422),
    ({"q": "x" * 501}, 422), ({}, 422), ({"q": ""}, 422), ({"q": "cat", "min_score": 2}, 422),
    ({"q": "cat", "index": "nope"}, 404), ({"q": "cat", "where": "colour=red"}, 400),
    ({"q": "cat", "where": "label=nothing"}, 400), ({"q": "a + - b"}, 400), ({"q": "cat", "template": "bad"}, 400),
    ({"q": "/etc/passwd"}, 400), ({"q": "../secret.txt"}, 400), ({"q": "image:x"}, 400), ({"q": "#99999"}, 400),
    ({"q": "cat", "index": "photos", "where": "label=cat"}, 400),
])
def test_get_search_limits_and_errors(client, params, status):
    assert_json_error(client.get("/api/search", params=params), status)


def test_post_json_terms_equal_run_query(client, searchers):
    body = {"terms": [{"text": "red tractor", "weight": 2}, {"text": "snow", "weight": -1}, {"id": 7, "weight": 0.5}],
            "k": 5, "where": ["superclass=vehicles_1"]}
    r = client.post("/api/search", json=body)
    assert r.status_code == 200, r.text
    from cliplens.query import parse_where

    want = run_query(searchers["cifar"], [Term("text", "red tractor", 2), Term("text", "snow", -1),
                                          Term("item", 7, 0.5)], 5, where=parse_where(["superclass=vehicles_1"]))
    got = r.json()
    assert [h["id"] for h in got["hits"]] == [h.id for h in want.hits]
    np.testing.assert_allclose([h["score"] for h in got["hits"]], [h.score for h in want.hits], atol=1e-5)
    r = client.post("/api/search", json={"q": "tulip", "k": 3, "index": "cifar"})
    assert core(r.json()["hits"]) == searchers["cifar"].search("tulip", 3).to_json()["hits"]


@pytest.mark.parametrize("body,status", [
    ({"k": 3}, 422), ({"terms": [{"text": "a", "id": 1}]}, 422), ({"terms": [{"text": "a", "weight": 0}]}, 422),
    ({"q": "a", "k": 5000}, 422), ({"q": "a", "unknown": 1}, 422), ([1, 2], 422),
    ({"terms": [{"text": "a"}] * 17}, 422), ({"q": "x" * 501}, 422), ({"terms": [{"id": 10**6}]}, 400),
])
def test_post_json_errors(client, body, status):
    assert_json_error(client.post("/api/search", json=body), status)


def test_post_bad_json_and_media_types(client):
    assert_json_error(client.post("/api/search", content=b"{nope", headers={"content-type": "application/json"}), 400)
    assert_json_error(client.post("/api/search", content=b"q=cat", headers={"content-type": "text/plain"}), 415)
    big = json.dumps({"q": "a", "where": ["x" * 300_000]}).encode()
    assert_json_error(client.post("/api/search", content=big, headers={"content-type": "application/json"}), 413)


def test_image_upload_search(client, searchers, photos_index):
    data = (IndexStore.open(photos_index).manifest.source.root + "/a.png")
    with open(data, "rb") as f:
        png = f.read()
    r = client.post("/api/search", files={"image": ("a.png", png, "image/png")},
                    data={"k": "3", "index": "photos"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["hits"][0]["ref"] == "a.png" and body["hits"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert body["terms"][0]["kind"] == "image"
    # combined with text and a filter, in the same form
    r = client.post("/api/search", files={"image": ("a.png", png, "image/png")},
                    data={"k": "2", "index": "photos", "q": "- red", "weight": "2", "where": "path=sub/*"})
    assert r.status_code == 200 and [t["weight"] for t in r.json()["terms"]] == [2.0, -1.0]
    assert {h["ref"] for h in r.json()["hits"]} <= {"sub/b.jpg", "sub/deep/c.webp"}


def test_upload_limits(client):
    rng = np.random.default_rng(0)
    too_big = png_bytes(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8))  # ~270 kB > the 200 kB test limit
    assert len(too_big) > 200_000
    assert_json_error(client.post("/api/search", files={"image": ("big.png", too_big, "image/png")}), 413)
    too_many_pixels = png_bytes(np.zeros((1100, 1000, 3), np.uint8))  # small file, 1.1 MP > 1 MP limit
    assert_json_error(client.post("/api/search", files={"image": ("wide.png", too_many_pixels)}), 413)
    bomb = folder_fixture.png_header_only(100_000, 100_000)
    assert_json_error(client.post("/api/search", files={"image": ("bomb.png", bomb)}), 413)
    assert_json_error(client.post("/api/search", files={"image": ("x.jpg", b"not an image at all")}), 422)
    assert_json_error(client.post("/api/search", data={"q": "cat"}, files={"other": ("x", b"1")}), 422)


# --------------------------------------------------------------------------- items


def test_item_metadata(client, searchers):
    body = client.get("/api/items/3").json()
    store = searchers["cifar"].store
    assert body["id"] == 3 and body["label"] == store.class_names[store.labels[3]].replace("_", " ")
    assert body["superclass_id"] == int(store.superclasses[3]) and body["image_url"] == "/api/items/3/image?index=cifar"
    rows = {p: i for i, p in enumerate(searchers["photos"].store.items["path"])}
    body = client.get(f"/api/items/{rows['sub/deep/c.webp']}", params={"index": "photos"}).json()
    assert body["path"] == "sub/deep/c.webp" and body["caption"] == "the webp one" and body["meta"]["tags"] == ["x"]
    assert len(body["sha256"]) == 64 and "label" not in body


def test_item_images(client, searchers):
    r = client.get("/api/items/3/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.size == (256, 256)  # 32 px enlarged 8 times, whole pixels
    arr = np.asarray(im)
    np.testing.assert_array_equal(arr[::8, ::8], searchers["cifar"].store.images()[3])
    assert Image.open(io.BytesIO(client.get("/api/items/3/image", params={"size": 64}).content)).size == (64, 64)
    r = client.get("/api/items/0/image", params={"index": "photos", "size": 40})  # rounded up to 64
    assert r.status_code == 200 and r.headers["content-type"] == "image/webp"  # from the stored thumbnail
    assert Image.open(io.BytesIO(r.content)).size == (64, 48)  # a.png, 64 x 48, is not enlarged
    r = client.get("/api/items/0/image", params={"index": "photos", "size": 1024})  # the viewer: from the file
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (64, 48)
    assert_json_error(client.get("/api/items/3/image", params={"size": 5000}), 422)


@pytest.mark.parametrize("url,status", [
    ("/api/items/200", 404), ("/api/items/-1", 404), ("/api/items/abc", 422), ("/api/items/1.5", 422),
    ("/api/items/99999999999999999999999", 404), ("/api/items/3?index=nope", 404),
    ("/api/items/../../etc/passwd", 404), ("/api/items/..%2F..%2Fetc%2Fpasswd", 404),
    ("/api/items/%2Fetc%2Fpasswd/image", 404), ("/api/items/3/image/../../../../secret.txt", 404),
    ("/api/items/..%2f..%2fsecret.txt/image?index=photos", 404), ("/static/..%2F..%2Fpyproject.toml", 404),
    ("/static/../../../pyproject.toml", 404), ("/static/%2e%2e/app.py", 404), ("/static/index.htm", 404),
    ("/api/similar/abc", 422), ("/api/similar/500", 404), ("/nope", 404), ("/api/items/%00/image", 422),
])
def test_path_tricks_and_bad_ids_never_read_files(client, url, status):
    r = client.get(url)
    assert r.status_code in (status, 404 if status == 422 else status), r.text
    assert r.headers["content-type"].startswith("application/json")
    assert SECRET not in r.text and "[project]" not in r.text and "root:" not in r.text


def test_a_tampered_index_cannot_escape_its_folder(tmp_path, photos_index, tiny_encoder):
    bad = tmp_path / "tampered"
    shutil.copytree(photos_index, bad)
    files = index_files(bad)
    items = read_items(files / ITEMS)
    items["path"] = items["path"].copy()
    items["path"][0] = "../secret.txt"
    items["path"][1] = "/etc/passwd"
    write_items(files / ITEMS, {k: list(v) if v.dtype == object else v for k, v in items.items()})
    manifest = json.loads((files / "manifest.json").read_text())  # a careful tamperer fixes the digest too
    manifest["files"][ITEMS]["sha256"] = hashlib.sha256((files / ITEMS).read_bytes()).hexdigest()
    (files / "manifest.json").write_text(json.dumps(manifest))
    app = create_app({"t": Searcher(encoder=tiny_encoder, store=IndexStore.open(bad))})
    with TestClient(app, base_url="http://127.0.0.1") as c:
        for i in (0, 1):  # anything read from the folder is refused (stored thumbnails never read a path)
            assert_json_error(c.get(f"/api/items/{i}/image", params={"size": 1024}), 404)
            assert_json_error(c.get(f"/api/items/{i}/original"), 404)
        assert c.get("/api/items/2/image", params={"size": 1024}).status_code == 200
        assert c.get("/api/items/2/original").status_code == 200


def test_similar(client, searchers):
    body = client.get("/api/similar/5", params={"k": 4}).json()
    want = run_query(searchers["cifar"], [Term("item", 5)], 4)
    assert [h["id"] for h in body["hits"]] == [h.id for h in want.hits] and 5 not in [h["id"] for h in body["hits"]]
    assert body["query"] == "more like #5" and body["query_class"] is not None
    body = client.get("/api/similar/5", params={"k": 4, "where": "superclass=flowers"}).json()
    assert {h["superclass"] for h in body["hits"]} == {"flowers"}


def test_concurrent_text_queries_are_batched(tiny_encoder):
    class Slow:
        """The tiny encoder, slowed down and counting calls, as a busy big model would be."""

        info = tiny_encoder.info

        def __init__(self):
            self.calls = []

        def encode_texts(self, texts):
            self.calls.append(len(texts))
            time.sleep(0.2)
            return tiny_encoder.encode_texts(texts)

    slow = Slow()
    svc = EncoderService(slow)
    words = [f"word{i}" for i in range(12)]
    out = {}
    threads = [threading.Thread(target=lambda w=w: out.__setitem__(w, svc.encode_texts([w]))) for w in words]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    svc.close()
    assert len(slow.calls) < len(words) and sum(slow.calls) == len(words)  # merged into fewer model calls
    for w in words:  # and every caller got its own vector
        np.testing.assert_allclose(out[w][0], tiny_encoder.encode_texts([w])[0], atol=1e-5)
    assert svc.stats.largest_batch > 1


def test_encoder_errors_reach_the_request_not_the_worker(tiny_encoder):
    class Broken:
        info = tiny_encoder.info

        def encode_texts(self, texts):
            raise RuntimeError("boom")

    svc = EncoderService(Broken())
    with pytest.raises(RuntimeError, match="boom"):
        svc.encode_texts(["a"])
    with pytest.raises(RuntimeError, match="boom"):  # the worker is still alive
        svc.encode_texts(["b"])
    svc.close()


def test_an_unexpected_error_is_a_json_500(searchers):
    class Broken:
        encoder, store = searchers["cifar"].encoder, searchers["cifar"].store

        def search_vector(self, *a, **kw):
            raise RuntimeError("a bug")

    with TestClient(create_app({"b": Broken()}), base_url="http://127.0.0.1", raise_server_exceptions=False) as c:
        r = c.get("/api/search", params={"q": "cat"})
        assert_json_error(r, 500)
        assert "a bug" not in r.text  # details go to the server log, not to the client


def test_the_same_error_is_worded_for_each_caller(client, tiny_index, capsys):
    """Library errors carry which inputs fix them; the API says it in words, the CLI names its flags."""
    from cliplens.cli import main
    from cliplens.errors import QueryError
    from cliplens.query import parse_terms

    with pytest.raises(QueryError) as info:
        list(parse_terms(""))
    assert "an image or an item id" in str(info.value) and "--" not in str(info.value)
    assert info.value.fix == {"image": None, "similar": None}
    r = client.post("/api/search", json={"q": ""})
    assert 400 <= r.status_code < 500 and "--" not in r.json()["error"]
    from cliplens.cli.common import word_error

    assert word_error(info.value).endswith("an image or an item id to search like (--image PATH or --similar ID)")
    assert main(["compare", "--index-dir", str(tiny_index)]) == 2  # through the CLI's error handler
    cli = capsys.readouterr().err.strip()
    assert cli == "cliplens: error: compare needs at least two indexes: name each index folder (--index-dir DIR)"
