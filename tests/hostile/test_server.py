"""Hostile HTTP: DNS rebinding (Host header), deep JSON, paths in errors, third-party assets, port in use.

New request case = one line in REQUESTS: (method, path, headers, body, expected status).
"""

from __future__ import annotations

import re
import socket
from importlib import resources

import pytest
from fastapi.testclient import TestClient

import hostile_fixture as hf
from cliplens.errors import StoreError
from cliplens.search import Searcher
from cliplens.store import IndexStore
from cliplens.web import create_app

DEEP = "[" * 5000 + "]" * 5000

REQUESTS = {  # name: (method, path, Host header or None for the client's own, JSON body text or None, status)
    "rebinding page's Host": ("GET", "/api/indexes", "evil.example", None, 400),
    "rebinding page's Host with port": ("GET", "/api/search?q=cat", "evil.example:8000", None, 400),
    "loopback name as a suffix": ("GET", "/api/indexes", "127.0.0.1.evil.example", None, 400),
    "localhost as a prefix": ("GET", "/healthz", "localhost.evil.example", None, 400),
    "empty Host": ("GET", "/api/indexes", "", None, 400),
    "Host check on the page too": ("GET", "/", "evil.example", None, 400),
    "loopback IPv4 (allowed)": ("GET", "/api/indexes", "127.0.0.1:8000", None, 200),
    "localhost (allowed)": ("GET", "/api/indexes", "LOCALHOST:8000", None, 200),
    "loopback IPv6 (allowed)": ("GET", "/api/indexes", "[::1]:8000", None, 200),
    "--allow-host name (allowed)": ("GET", "/api/indexes", "photos.lan", None, 200),
    "JSON nested 5000 deep": ("POST", "/api/search", None, DEEP, 400),
    "deep JSON inside a field": ("POST", "/api/search", None, '{"q": "cat", "terms": ' + DEEP + "}", 400),
    "deep JSON in a string is fine": ("POST", "/api/search", None, '{"q": "' + "[" * 400 + '"}', 200),
    "/docs is off (CDN assets)": ("GET", "/docs", None, None, 404),
    "/redoc is off (CDN assets)": ("GET", "/redoc", None, None, 404),
    "schema still served": ("GET", "/openapi.json", None, None, 200),
}


@pytest.fixture(scope="module")
def client(tiny_index, tiny_encoder):
    app = create_app({"cifar": Searcher(encoder=tiny_encoder, store=IndexStore.open(tiny_index))},
                     allowed_hosts=("localhost", "127.0.0.1", "::1", "photos.lan"))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        yield client


@pytest.mark.parametrize("case", REQUESTS)
def test_hostile_request(case, client):
    method, path, host, body, status = REQUESTS[case]
    headers = {"content-type": "application/json"} if body is not None else {}
    if host is not None:
        headers["host"] = host
    r = client.request(method, path, headers=headers, content=body)
    assert r.status_code == status, r.text
    if status >= 400:
        assert r.headers["content-type"].startswith("application/json") and r.json()["status"] == status
        assert "Traceback" not in r.text


def test_errors_never_echo_filesystem_paths(tiny_index, tiny_encoder):
    store = IndexStore.open(tiny_index)

    class Failing(Searcher):
        def search_vector(self, *a, **kw):  # as a store problem found mid-request would say it
            raise StoreError(f"{store.root}/embeddings.npy is truncated; rebuild {store.root}")

    app = create_app({"x": Failing(encoder=tiny_encoder, store=store)})
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.get("/api/search", params={"q": "cat"})
    assert r.status_code == 400
    assert str(store.root) not in r.text and str(tiny_index.parent) not in r.text
    assert "<path>" in r.json()["error"]


def test_the_page_loads_no_third_party_assets():
    for name in ("index.html", "app.js", "style.css"):
        text = resources.files("cliplens.web").joinpath("static", name).read_text()
        external = [u for u in re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s'\")]*", text)
                    if not re.match(r"(?:https?:)?//(localhost|127\.0\.0\.1)", u)]
        assert not external, (name, external)


def test_port_in_use_is_one_line_before_serving(tiny_index, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        code, out, err = hf.cli(capsys, "serve", "--index-dir", tiny_index, "--port", port, "--device", "cpu")
    hf.assert_one_line_error(code, err, expect="already in use")
    assert "serving" not in out
