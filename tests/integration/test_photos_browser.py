"""The photo-library page in a real browser: Debian's chromium driven by Playwright against a live ``cliplens serve``
of a photo folder (EXIF dates, cameras, GPS, a portrait, HEIC, AVIF, a re-encoded copy) and the CIFAR fixture.

Every number the page shows is checked against the API's own answer for the same request. The page may reach
loopback only (anything else is blocked and fails the test) and must log no console error.
Set CLIPLENS_SCREENSHOTS=docs to keep the screenshots (docs/photos-*.png are made that way).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import photo_fixture
import pytest
from serve_fixture import guard_page, serving
from test_web_browser import ARGS, CHROMIUM

pytestmark = pytest.mark.slow

TEMPLATE = "a photo of a {}."  # the calibration the page asks for: the default prompt's
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}


# --------------------------------------------------------------------------- fixtures: the index and the server


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model):
    """A photo folder plus a re-encoded copy of the beach photo (and a caption for it), indexed by the CLI."""
    base = tmp_path_factory.mktemp("photos-web")
    photos = photo_fixture.make_photos(base / "library")
    photo_fixture.reencoded(photos / "2023/beach.jpg", photos / "2023/beach-copy.jpg")
    (photos / "2023/beach.txt").write_text("a sunny beach at sunset\n")
    home = base / "home"  # this module's own CLIPLENS_HOME: its thresholds must not leak into other tests
    env = {**os.environ, "CLIPLENS_HOME": str(home)}
    index = base / "indexes" / "photos"
    subprocess.run([sys.executable, "-m", "cliplens", "index", str(photos), "--index-dir", str(index),
                    "--model", tiny_model, "--device", "cpu", "-q"], check=True, env=env, timeout=600)
    return {"photos": photos, "index": index, "home": home, "env": env}


def record_duplicate_threshold(library) -> float:
    """Write the duplicate threshold for the tiny model's weights, chosen on this index's own embeddings so that
    the re-encoded beach photo collapses into the original (the random model separates them: checked here)."""
    from cliplens.store import IndexStore

    store = IndexStore.open(library["index"])
    emb = np.asarray(store.embeddings, np.float64)
    rows = {p: i for i, p in enumerate(store.items["path"])}
    a, b = rows["2023/beach.jpg"], rows["2023/beach-copy.jpg"]
    copy = float(emb[a] @ emb[b])
    cos = emb @ emb.T
    others = [float(cos[i, j]) for i in range(len(emb)) for j in range(i + 1, len(emb)) if {i, j} != {a, b}]
    distinct = max(others)
    assert copy > distinct, "the tiny model cannot tell the copy from other photos: choose other fixture pictures"
    threshold = (copy + distinct) / 2
    sha = store.manifest.model.weights_sha256
    path = library["home"] / "calibration" / f"{sha}.duplicates.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"threshold": threshold, "copies_p01": threshold, "distinct_p99": distinct,
                                "sample": len(emb)}))
    return threshold


def record_calibration(library, threshold: float) -> None:
    """What `cliplens calibrate` records for (weights, template); read by the server on every request."""
    from cliplens.store import IndexStore

    sha = IndexStore.open(library["index"]).manifest.model.weights_sha256
    path = library["home"] / "calibration" / f"{sha}.json"
    path.write_text(json.dumps({"model": "tiny", "weights_sha256": sha, "templates": {TEMPLATE: {
        "threshold": threshold, "precision": 0.9, "recall": 0.5, "target_precision": 0.9}}}))


@pytest.fixture(scope="module")
def server(library, tiny_index, tmp_path_factory, playwright_api):
    record_duplicate_threshold(library)
    record_calibration(library, -1.0)  # replaced by the test of the cut, which picks one inside the scores
    log = tmp_path_factory.mktemp("photos-server") / "server.log"
    with serving([library["index"], tiny_index], library["env"], log) as url:
        yield url


class Api:
    def __init__(self, url: str):
        self.url = url

    def get(self, path: str, **params):
        query = urllib.parse.urlencode([(k, v) for k, vals in params.items()
                                        for v in (vals if isinstance(vals, (list, tuple)) else [vals])])
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=30) as r:
            return json.loads(r.read())

    def ids(self, path: str, **params) -> list[int]:
        return [h["id"] for h in self.get(path, **params)["hits"]]


@pytest.fixture(scope="module")
def api(server):
    return Api(server)


@pytest.fixture(scope="module")
def browser(server):
    from playwright.sync_api import sync_playwright

    p = sync_playwright().start()
    b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    try:
        yield b
    finally:
        b.close()
        p.stop()


@pytest.fixture
def open_page(browser, server):
    """open_page(viewport, path, allow) -> a page of its own (fresh history) that may reach loopback only and must
    log no console error but those containing a text in ``allow``; both are checked when the test ends."""
    foreign: list[str] = []
    errors: list[str] = []
    contexts = []
    allowed: list[str] = []

    def opener(viewport=DESKTOP, path="/", allow=()):
        allowed.extend(allow)
        context = browser.new_context(viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        guard_page(page, server, foreign, errors)
        page.goto(server + path)
        page.wait_for_selector("#index option", state="attached")
        return page

    yield opener
    for c in contexts:
        c.close()
    assert foreign == [], f"the page tried to reach other hosts: {foreign}"
    assert [e for e in errors if not any(a in e for a in allowed)] == [], errors


def screenshot(page, name: str) -> None:
    keep = os.environ.get("CLIPLENS_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(keep) / name))


# --------------------------------------------------------------------------- page helpers

TILE_IDS = "[...document.querySelectorAll('#results .tile')].map(t => Number(t.dataset.id))"


def tile_ids(page) -> list[int]:
    return page.evaluate(TILE_IDS)


def wait_ids(page, expected: list[int]) -> None:
    try:
        page.wait_for_function(f"ids => JSON.stringify({TILE_IDS}) === JSON.stringify(ids)", arg=expected)
    except Exception:
        raise AssertionError(f"tiles {tile_ids(page)} != API {expected}; status: {page.inner_text('#status')}")


def search(page, text: str) -> None:
    page.fill("#q", text)
    page.press("#q", "Enter")


def query_of(page) -> dict:
    return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(page.url).query))


def tile(page, item_id: int):
    return page.locator(f'#results .tile[data-id="{item_id}"]')


def paths(api) -> dict[str, int]:
    hits = api.get("/api/search", q="photo", index="photos", k=100, collapse="false")["hits"]
    return {h["path"]: h["id"] for h in hits}


def meta_rows(page) -> dict[str, str]:
    return page.evaluate("""() => { const out = {}; const dts = document.querySelectorAll('#viewer-meta dt');
        for (const dt of dts) out[dt.textContent] = dt.nextElementSibling.textContent; return out; }""")


# --------------------------------------------------------------------------- tests


def test_viewer_shows_the_photo_and_its_details(open_page, api, library):
    page = open_page(path="/?index=photos")
    search(page, "beach")
    body = api.get("/api/search", q="beach", index="photos")
    ids = [h["id"] for h in body["hits"]]
    wait_ids(page, ids)
    hit = next(h for h in body["hits"] if h["path"] == "phone.heic")  # EXIF date, camera and GPS

    tile(page, hit["id"]).click()
    page.wait_for_selector("#viewer[open]")
    assert page.inner_text("#viewer-title") == "phone.heic"
    rows = meta_rows(page)
    assert rows["Path"] == hit["path"]
    assert rows["Score"].startswith(f"{hit['score']:.4f}") and f"#{hit['rank']}" in rows["Score"]
    assert rows["Taken"] == hit["taken"].replace("T", " ")[:16] + " (EXIF)"
    assert rows["Camera"] == hit["camera"] == "Apple iPhone 15 Pro"
    assert rows["GPS"] == f"{hit['lat']:.5f}, {hit['lon']:.5f}"
    assert rows["Size"] == f"{hit['width']} \u00d7 {hit['height']} px"
    # the photo at screen resolution: 1280 css px at dpr 1 is over 1024, so the 2048 px rendition, decoded
    size = 2048 if max(DESKTOP.values()) > 1024 else 1024
    page.wait_for_function("s => { const i = document.getElementById('viewer-img'); return i.complete && "
                           "i.naturalWidth > 0 && i.src.includes('size=' + s); }", arg=size)
    assert "view=" + str(hit["id"]) in page.url

    # a photo without EXIF: the date is the file's
    at = ids.index(hit["id"])
    page.keyboard.press("ArrowRight")
    nxt = body["hits"][at + 1]
    page.wait_for_function("t => document.getElementById('viewer-title').textContent === t",
                           arg=nxt["path"].split("/")[-1])
    assert query_of(page)["view"] == str(nxt["id"])
    if nxt["taken_from"] == "mtime":
        assert meta_rows(page)["Taken"].endswith("(file time: no EXIF date)")
    page.keyboard.press("ArrowLeft")
    page.wait_for_function("t => document.getElementById('viewer-title').textContent === t", arg="phone.heic")
    page.click("#viewer-next")
    page.wait_for_function("id => new URLSearchParams(location.search).get('view') === String(id)", arg=nxt["id"])
    page.click("#viewer-prev")
    page.wait_for_function("id => new URLSearchParams(location.search).get('view') === String(id)", arg=hit["id"])

    # "Open original": the file's own bytes, as the browser gets them from the link
    href = page.get_attribute("#viewer-original", "href")
    assert page.is_visible("#viewer-original") and href.startswith(f"/api/items/{hit['id']}/original")
    got = page.evaluate("""async (href) => { const r = await fetch(href); const b = new Uint8Array(await r.arrayBuffer());
        let s = ''; for (const x of b) s += String.fromCharCode(x); return btoa(s); }""", href)
    assert base64.b64decode(got) == (library["photos"] / hit["path"]).read_bytes()
    if os.environ.get("CLIPLENS_SCREENSHOTS"):  # a wider window: the grid shows around the viewer
        page.set_viewport_size({"width": 1680, "height": 1000})
        screenshot(page, "photos-viewer.png")
        page.set_viewport_size(DESKTOP)

    # Esc: the viewer closes, focus is back on the photo's tile, the URL forgets the item
    page.keyboard.press("Escape")
    page.wait_for_selector("#viewer", state="hidden")
    assert page.evaluate("document.activeElement.dataset.id") == str(hit["id"])
    page.wait_for_function("!new URLSearchParams(location.search).has('view')")
    assert page.input_value("#q") == "beach"  # Esc in the viewer does not clear the search
    wait_ids(page, ids)

    # "More like this": the box says #id, the results are the API's, focus stays in the results
    page.keyboard.press("Enter")
    page.wait_for_selector("#viewer[open]")
    page.click("#viewer-similar")
    similar = api.ids(f"/api/similar/{hit['id']}", index="photos")
    wait_ids(page, similar)
    assert page.input_value("#q") == f"#{hit['id']}"
    assert f"like #{hit['id']}" in page.inner_text("#status")
    assert page.evaluate("document.activeElement.classList.contains('tile')")
    assert page.is_hidden("#viewer")


def test_cifar_viewer_is_pixelated_and_has_no_original(open_page, api):
    page = open_page(path="/?index=cifar100-test&q=tulip")
    wait_ids(page, api.ids("/api/search", q="tulip", index="cifar100-test"))
    assert page.evaluate("getComputedStyle(document.querySelector('#results .tile img')).imageRendering") == "pixelated"
    page.locator("#results .tile").first.click()
    page.wait_for_selector("#viewer[open]")
    assert page.is_hidden("#viewer-original")  # CIFAR has no original files
    assert page.evaluate("getComputedStyle(document.getElementById('viewer-img')).imageRendering") == "pixelated"
    assert "Label" in meta_rows(page)


def test_url_holds_the_state_and_back_restores_it(open_page, api):
    beach = {"q": "beach", "index": "photos"}
    plain = api.ids("/api/search", **beach)
    dated = api.ids("/api/search", **beach, where=["taken>=2023-01-01"])
    both = ["taken>=2023-01-01", "camera=Apple iPhone 13"]
    by_camera = api.ids("/api/search", **beach, where=both)
    sort = next(s for s in ("-taken", "taken") if api.ids("/api/search", **beach, where=both, sort=s) != by_camera)
    by_date = api.ids("/api/search", **beach, where=both, sort=sort)
    assert len({tuple(x) for x in (plain, dated, by_camera, by_date)}) == 4, "the steps must change the results"

    page = open_page(path="/?index=photos")
    search(page, "beach")
    wait_ids(page, plain)
    assert query_of(page) == beach
    page.fill("#taken-from", "2023-01-01")
    page.dispatch_event("#taken-from", "change")
    wait_ids(page, dated)
    page.select_option("#camera", "Apple iPhone 13")
    wait_ids(page, by_camera)
    page.select_option("#sort", sort)
    wait_ids(page, by_date)
    tile(page, by_date[0]).click()
    page.wait_for_selector("#viewer[open]")
    assert query_of(page) == {**beach, "from": "2023-01-01", "camera": "Apple iPhone 13", "sort": sort,
                              "view": str(by_date[0])}

    # the link, opened elsewhere: the same results, the same photo open
    shared = open_page(path=urllib.parse.urlsplit(page.url)._replace(scheme="", netloc="").geturl())
    wait_ids(shared, by_date)
    shared.wait_for_selector("#viewer[open]")
    assert shared.inner_text("#viewer-title") == page.inner_text("#viewer-title")
    assert shared.input_value("#q") == "beach" and shared.input_value("#camera") == "Apple iPhone 13"
    assert shared.input_value("#taken-from") == "2023-01-01" and shared.input_value("#sort") == sort

    # back: the viewer closes, then each step goes again, with the results it had; forward redoes one
    page.go_back()
    page.wait_for_selector("#viewer", state="hidden")
    wait_ids(page, by_date)
    page.go_back()
    wait_ids(page, by_camera)
    assert page.input_value("#sort") == "score"
    page.go_back()
    wait_ids(page, dated)
    assert page.input_value("#camera") == ""
    page.go_back()
    wait_ids(page, plain)
    assert page.input_value("#taken-from") == ""
    page.go_forward()
    wait_ids(page, dated)


def test_more_results_page_on_after_the_first(open_page, api):
    page = open_page(path="/?index=cifar100-test&q=tractor")
    pages = [api.get("/api/search", q="tractor", index="cifar100-test", offset=o) for o in (0, 24, 48)]
    assert all(p["more"] for p in pages)
    first = [h["id"] for h in pages[0]["hits"]]
    wait_ids(page, first)
    assert page.is_visible("#more")
    # scrolling to the end loads the next page (offset 24) ...
    page.mouse.wheel(0, 20_000)
    two = first + [h["id"] for h in pages[1]["hits"]]
    wait_ids(page, two)
    # ... and so does the button (offset 48), focus on the first new result
    page.click("#more")
    three = two + [h["id"] for h in pages[2]["hits"]]
    wait_ids(page, three)
    assert len(set(three)) == len(three) == 72
    assert page.evaluate("document.activeElement.dataset.id") == str(pages[2]["hits"][0]["id"])
    ranks = page.locator("#results .tile .score").all_inner_texts()
    assert [r.split(" ")[0] for r in ranks] == [f"#{i}" for i in range(1, 73)]


def test_relevance_cut_counts_what_the_api_keeps(open_page, api, library):
    scores = [h["score"] for h in api.get("/api/search", q="tractor", index="cifar100-test", k=1000)["hits"]]
    # a cut between two scores, well away from both, so rounding cannot move a hit across it
    def between(lo: int, hi: int) -> float:  # the middle of the widest gap between scores lo..hi
        _, i = max((scores[i] - scores[i + 1], i) for i in range(lo, hi))
        value = round((scores[i] + scores[i + 1]) / 2, 3)
        assert scores[i + 1] < value < scores[i]
        return value

    cut, calibrated = between(10, 40), between(2, 8)
    record_calibration(library, calibrated)

    page = open_page(path="/?index=cifar100-test&q=tractor")
    wait_ids(page, api.ids("/api/search", q="tractor", index="cifar100-test"))
    page.wait_for_function("document.getElementById('cut-count').dataset.count !== undefined")
    everything = len(api.ids("/api/search", q="tractor", index="cifar100-test", k=1000))
    assert int(page.get_attribute("#cut-count", "data-count")) == everything
    page.evaluate("""v => { const s = document.getElementById('min-score'); s.value = v;
        s.dispatchEvent(new Event('input', {bubbles: true})); s.dispatchEvent(new Event('change', {bubbles: true})); }""",
                  str(cut))
    kept = api.ids("/api/search", q="tractor", index="cifar100-test", k=1000, min_score=cut)
    page.wait_for_function("n => document.getElementById('cut-count').dataset.count === String(n)", arg=len(kept))
    assert page.inner_text("#cut-count").startswith(f"{len(kept)} results")
    assert query_of(page)["min"] == str(cut)
    wait_ids(page, api.ids("/api/search", q="tractor", index="cifar100-test", min_score=cut))
    assert len(tile_ids(page)) == min(24, len(kept))

    # the calibrated threshold: marked on the slider and offered as a button
    page.hover("#min-score")
    page.wait_for_selector("#cut-calibrated", state="visible")
    assert page.is_visible("#cut-mark")
    assert page.inner_text("#cut-calibrated") == f"Calibrated: {calibrated:.3f}"
    screenshot(page, "photos-cut.png")
    page.click("#cut-calibrated")
    above = api.ids("/api/search", q="tractor", index="cifar100-test", k=1000, min_score=calibrated)
    page.wait_for_function("n => document.getElementById('cut-count').dataset.count === String(n)", arg=len(above))
    wait_ids(page, above[:24])
    assert float(page.input_value("#min-score")) == calibrated


def test_near_identical_photos_collapse_behind_a_badge(open_page, api):
    page = open_page(path="/?index=photos&q=beach")
    body = api.get("/api/search", q="beach", index="photos")
    assert body["collapse"]["threshold"] is not None
    wait_ids(page, [h["id"] for h in body["hits"]])
    head = next(h for h in body["hits"] if h.get("duplicates"))
    ids = paths(api)
    assert {head["id"], *head["duplicates"]} == {ids["2023/beach.jpg"], ids["2023/beach-copy.jpg"]}
    badge = page.locator(f'#results .cell:has(.tile[data-id="{head["id"]}"]) .badge')
    assert badge.inner_text() == "+1" and badge.get_attribute("aria-expanded") == "false"
    assert page.locator(".badge").count() == sum(1 for h in body["hits"] if h.get("duplicates"))
    badge.click()
    copy = head["duplicates"][0]
    page.wait_for_selector(f'#results .cell.dup .tile[data-id="{copy}"]')
    assert badge.get_attribute("aria-expanded") == "true"
    order = tile_ids(page)
    assert order[order.index(head["id"]) + 1] == copy  # beside its group's tile
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.wait_for_function("document.getElementById('cut-count').dataset.count !== undefined")
    screenshot(page, "photos-grid.png")
    badge.click()
    page.wait_for_selector(f'#results .tile[data-id="{copy}"]', state="detached")

    # collapsing off: both copies as results of their own, in the URL too
    page.uncheck("#collapse")
    wait_ids(page, api.ids("/api/search", q="beach", index="photos", collapse="false"))
    assert query_of(page)["collapse"] == "false" and page.locator(".badge").count() == 0
    assert {head["id"], copy} <= set(tile_ids(page))


def test_tiles_keep_their_shape_and_offer_2x_thumbnails(open_page, api):
    page = open_page(path="/?index=photos&q=beach&collapse=false")
    hits = api.get("/api/search", q="beach", index="photos", collapse="false")["hits"]
    wait_ids(page, [h["id"] for h in hits])
    for h in hits:
        img = tile(page, h["id"]).locator("img")
        assert img.get_attribute("srcset") == f"{h['thumb']} 1x, {h['thumb2x']} 2x" and "size=512" in h["thumb2x"]
    portrait = next(h for h in hits if h["path"] == "2023/portrait.jpg")
    assert portrait["height"] > portrait["width"]
    page.wait_for_function("id => { const i = document.querySelector(`.tile[data-id='${id}'] img`); "
                           "return i.complete && i.naturalWidth > 0; }", arg=portrait["id"])
    box = tile(page, portrait["id"]).locator("img").bounding_box()
    assert box["height"] > box["width"] * 1.2  # 64 x 48 stored rotated: shown 48 wide, 64 tall
    landscape = tile(page, next(h["id"] for h in hits if h["path"] == "2022/snow.jpg")).locator("img").bounding_box()
    assert landscape["width"] > landscape["height"] * 1.2
    assert page.evaluate("getComputedStyle(document.querySelector('#results .tile img')).imageRendering") != "pixelated"
    caption = tile(page, paths(api)["2023/beach.jpg"]).locator(".caption")
    assert caption.inner_text() == "a sunny beach at sunset"  # captions on the tiles


def test_controls_follow_the_index(open_page, api):
    info = {i["name"]: i for i in api.get("/api/indexes")["indexes"]}
    page = open_page(path="/?index=photos")
    assert info["photos"]["has_superclasses"] is False
    assert page.is_hidden("#superclass-label") and page.is_hidden("#superclass")
    assert page.is_visible("#camera") and page.is_visible("#taken-from") and page.is_visible("#sort")
    options = page.locator("#camera option").all_inner_texts()
    assert options == ["any", *info["photos"]["cameras"]]
    # example queries as chips; one click searches for it
    chips = page.locator("#examples button").all_inner_texts()
    assert chips == info["photos"]["examples"] and chips
    page.locator("#examples button").first.click()
    wait_ids(page, api.ids("/api/search", q=chips[0], index="photos"))
    assert page.input_value("#q") == chips[0] and page.is_hidden("#examples")

    page.select_option("#index", "cifar100-test")
    wait_ids(page, api.ids("/api/search", q=chips[0], index="cifar100-test"))
    assert page.is_visible("#superclass")
    assert page.is_hidden("#camera") and page.is_hidden("#taken-from") and page.is_hidden("#sort")


def test_suspect_filter_keeps_only_suspect_labels(open_page, api):
    """The study's suspect labels as a filter on the search page (labelled indexes only)."""
    flagged = {s["id"] for s in api.get("/api/study/suspects", index="cifar100-test", top=1000)["suspects"]}
    want = api.ids("/api/search", q="apple", index="cifar100-test", suspects="true")
    assert want and set(want) <= flagged
    page = open_page(path="/?index=photos")
    assert page.is_hidden("#suspects-label")  # a photo folder has no labels to suspect
    page.select_option("#index", "cifar100-test")
    search(page, "apple")
    page.check("#suspects")
    wait_ids(page, want)
    assert query_of(page).get("suspects") == "true"
    page.go_back()
    wait_ids(page, api.ids("/api/search", q="apple", index="cifar100-test"))
    assert not page.is_checked("#suspects")


def test_empty_results_say_what_to_try_and_errors_replace_results(open_page, api):
    page = open_page(path="/?index=photos&q=beach&min=0.9", allow=["status of 404"])  # the error asked for below
    assert api.get("/api/search", q="beach", index="photos", min_score=0.9)["hits"] == []
    page.wait_for_selector("#results .empty")
    advice = page.inner_text("#results .empty")
    assert "Try other words" in advice and "relevance cut" in advice
    assert page.locator("#results .empty .chip-button").count() == len(api.get("/api/indexes")["indexes"][0]["examples"])
    page.click("#results .empty >> text=remove the cut")
    wait_ids(page, api.ids("/api/search", q="beach", index="photos"))
    # an error takes the place of the results it makes stale
    search(page, "#999")
    page.wait_for_selector("#results .error-box")
    assert page.locator("#results .tile").count() == 0
    assert "no item 999" in page.inner_text("#results .error-box") and "error" in page.get_attribute("#status", "class")
    page.keyboard.press("Escape")


def test_image_search_shows_the_image_in_the_box(open_page, api, library):
    page = open_page(path="/?index=photos&q=beach")
    page.wait_for_selector("#results .tile")
    data = (library["photos"] / "2022/snow.jpg").read_bytes()
    page.set_input_files("#image-file", files=[{"name": "snow.jpg", "mimeType": "image/jpeg", "buffer": data}])
    page.wait_for_function("document.getElementById('status').textContent.includes('like the image snow.jpg')")
    assert page.input_value("#q") == "" and page.inner_text("#image-chip-name") == "snow.jpg"
    page.wait_for_function("document.getElementById('image-chip-img').src.startsWith('data:image/png')")
    assert query_of(page)["image"] == "snow.jpg" and "q" not in query_of(page)
    assert tile_ids(page)[0] == paths(api)["2022/snow.jpg"]
    page.go_back()  # back to the text search
    wait_ids(page, api.ids("/api/search", q="beach", index="photos"))
    assert page.is_hidden("#image-chip") and page.input_value("#q") == "beach"
    page.go_forward()  # the image is still known to this page: the search runs again
    page.wait_for_function("document.getElementById('status').textContent.includes('like the image snow.jpg')")
    page.click("#image-chip-remove")
    page.wait_for_selector("#image-chip", state="hidden")


def test_phone_layout(open_page, api):
    page = open_page(viewport=PHONE, path="/?index=photos&q=beach")
    wait_ids(page, api.ids("/api/search", q="beach", index="photos"))
    header = page.locator("header").bounding_box()
    assert header["height"] <= 0.2 * PHONE["height"], header
    assert page.is_hidden("#camera")  # the filters fold away behind a button ...
    page.click("#filters-button")
    assert page.is_visible("#camera") and page.get_attribute("#filters-button", "aria-expanded") == "true"
    page.click("#filters-button")
    assert page.is_hidden("#camera")
    screenshot(page, "photos-phone.png")
    page.locator("#results .tile").first.click()  # ... and the viewer fits the screen
    page.wait_for_selector("#viewer[open]")
    page.wait_for_function("document.getElementById('viewer-img').src.includes('size=1024')")  # 844 px: 1024 do
    for sel in ("#viewer-img", "#viewer-similar", "#viewer-close"):
        box = page.locator(sel).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"] + 1 and box["y"] + box["height"] <= PHONE["height"]
    screenshot(page, "photos-phone-viewer.png")
