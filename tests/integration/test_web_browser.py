"""The page in a real browser: Debian's chromium driven by Playwright against a live ``cliplens serve``.

Loopback only: any request the page makes to another host is blocked and fails the test. Set
CLIPLENS_SCREENSHOT=path.png to keep a copy of the screenshot (docs/web-ui.png is made that way).
"""

from __future__ import annotations

import base64
import io
import os
import shutil

import numpy as np
import pytest
from serve_fixture import guard_page, serving

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]

pytestmark = pytest.mark.slow


@pytest.fixture
def server(tiny_index, tmp_path, playwright_api):
    # conftest put HF_HOME, HF_HUB_OFFLINE and CLIPLENS_HOME in os.environ: the server inherits them
    second = tmp_path / "second" / tiny_index.name  # the same index again, to have something to switch to
    shutil.copytree(tiny_index, second)
    with serving([tiny_index, second], dict(os.environ), tmp_path / "server.log") as url:
        yield url


def test_search_similar_drop_and_keyboard(server, tiny_index, tmp_path):
    from playwright.sync_api import sync_playwright

    from cliplens.store import IndexStore

    foreign: list[str] = []
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            guard_page(page, server, foreign, errors)
            page.goto(server + "/")
            page.wait_for_selector("#index option", state="attached")  # the index list arrived

            # type a query: debounced live search, tiles with marks and precision@k
            page.fill("#q", "tulip")
            page.wait_for_function("document.querySelectorAll('#results .tile').length === 24")
            status = page.inner_text("#status")
            assert "precision@24" in status and "tulip" in status
            assert page.locator("#results .tile.correct, #results .tile.incorrect").count() == 24
            page.wait_for_function("Array.from(document.querySelectorAll('#results img'))"
                                   ".filter(i => i.getBoundingClientRect().top < innerHeight)"
                                   ".every(i => i.complete && i.naturalWidth === 256)")  # CIFAR 32 px, enlarged
            page.screenshot(path=str(tmp_path / "web-ui.png"))

            # the superclass filter
            page.select_option("#superclass", "flowers")
            page.wait_for_function("document.querySelectorAll('#results .tile').length === 10")
            assert set(page.locator("#results .superclass").all_inner_texts()) == {"flowers"}
            page.select_option("#superclass", "")
            page.wait_for_function("document.querySelectorAll('#results .tile').length === 24")

            # the index switcher: two indexes, the same query runs on the other one
            assert page.locator("#index option").count() == 2
            page.select_option("#index", "cifar100-test-2")
            page.wait_for_function("document.getElementById('status').textContent.includes('in cifar100-test-2')")
            assert "index=cifar100-test-2" in page.locator("#results img").first.get_attribute("src")
            page.select_option("#index", "cifar100-test")
            page.wait_for_function("document.getElementById('status').textContent.includes('in cifar100-test ')")

            # click a result: the viewer opens; its "More like this" searches for the like of it
            first = page.locator("#results .tile").first
            clicked = first.get_attribute("data-id")
            first.click()
            page.wait_for_selector("#viewer[open]")
            page.click("#viewer-similar")
            page.wait_for_function(f"document.getElementById('status').textContent.includes('like #{clicked}')")
            ids = page.locator("#results .tile").evaluate_all("ts => ts.map(t => t.dataset.id)")
            assert len(ids) == 24 and clicked not in ids
            page.screenshot(path=str(tmp_path / "web-ui-similar.png"))

            # keyboard only: "/" to the box, type, arrow down into the grid, Enter for more like this
            page.keyboard.press("Escape")  # clears the box and the results
            assert page.input_value("#q") == "" and page.locator("#results .tile").count() == 0
            page.evaluate("document.activeElement.blur()")
            page.keyboard.press("/")
            assert page.evaluate("document.activeElement.id") == "q"
            page.keyboard.type("tractor")
            page.keyboard.press("Enter")
            page.wait_for_function("document.getElementById('status').textContent.includes('a photo of a tractor.')")
            page.keyboard.press("ArrowDown")
            page.keyboard.press("ArrowRight")
            focused = page.evaluate("document.activeElement.dataset.id")
            assert focused == page.locator("#results .tile").nth(1).get_attribute("data-id")
            page.keyboard.press("Enter")  # opens the viewer; Esc goes back to the tile
            page.wait_for_selector("#viewer[open]")
            page.keyboard.press("Escape")
            page.wait_for_selector("#viewer", state="hidden")
            assert page.evaluate("document.activeElement.dataset.id") == focused
            page.keyboard.press("Enter")
            page.wait_for_selector("#viewer[open]")
            page.focus("#viewer-similar")
            page.keyboard.press("Enter")
            page.wait_for_function(f"document.getElementById('status').textContent.includes('like #{focused}')")

            # drop an image file onto the page: search by image (the index's own image 7 comes first)
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(np.asarray(IndexStore.open(tiny_index).images()[7])).save(buf, "PNG")
            page.evaluate("""(b64) => {
                const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "query.png", {type: "image/png"}));
                window.dispatchEvent(new DragEvent("dragenter", {dataTransfer: dt, bubbles: true}));
                window.dispatchEvent(new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true}));
            }""", base64.b64encode(buf.getvalue()).decode())
            page.wait_for_function("document.getElementById('status').textContent.includes('query.png')")
            assert page.locator("#results .tile").first.get_attribute("data-id") == "7"
            assert page.is_hidden("#drop-overlay")
        finally:
            browser.close()
    assert foreign == [], f"the page tried to reach other hosts: {foreign}"
    assert errors == [], errors
    assert (tmp_path / "web-ui.png").stat().st_size > 10_000
    keep = os.environ.get("CLIPLENS_SCREENSHOT")
    if keep:
        shutil.copy(tmp_path / "web-ui.png", keep)
