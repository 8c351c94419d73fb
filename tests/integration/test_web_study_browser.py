"""The study views on the page in Debian's chromium: the canvas map (hover, hits ringed), suspects, compare.

Uses test_web_browser's live ``cliplens serve`` of two indexes. CLIPLENS_SCREENSHOT_DIR=docs/ keeps screenshots.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_web_browser import ARGS, CHROMIUM, server  # noqa: F401  (server is a fixture)

pytestmark = pytest.mark.slow


def test_map_suspects_and_compare_views(server):  # noqa: F811
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    keep = os.environ.get("CLIPLENS_SCREENSHOT_DIR")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(server)
                       else (errors.append(route.request.url), route.abort()))
            page.goto(server + "/")
            page.fill("#q", "tractor")
            page.wait_for_selector("#results .tile")
            page.click("#study-map")
            page.wait_for_selector("#study-canvas")
            page.wait_for_function("document.querySelector('#study-canvas').width > 0")
            # the map is drawn: many coloured pixels, and a black ring around each of the current hits
            painted = page.evaluate("""() => { const c = document.querySelector('#study-canvas');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0, dark = 0;
                for (let i = 0; i < d.length; i += 4) { if (d[i] < 250 || d[i+1] < 250 || d[i+2] < 250) n++;
                  if (d[i] < 40 && d[i+1] < 40 && d[i+2] < 40) dark++; } return [n, dark]; }""")
            assert painted[0] > 1000 and painted[1] > 50
            # hover the first point: the tooltip shows its thumbnail
            box = page.locator("#study-canvas").bounding_box()
            pos = page.evaluate("""async () => { const m = await (await fetch('/api/study/map')).json();
                const c = document.querySelector('#study-canvas'), s = c.clientWidth, pad = 14;
                return [pad + m.x[0] * (s - 2 * pad), s - pad - m.y[0] * (s - 2 * pad)]; }""")
            page.mouse.move(box["x"] + pos[0], box["y"] + pos[1])
            page.wait_for_selector("#study-tip img")
            if keep:
                page.screenshot(path=str(Path(keep) / "study-map.png"))
            page.click("#study-suspects")
            page.wait_for_selector("#study-panel .study-tile")
            assert "labels disagree with both zero-shot" in page.inner_text("#study-panel")
            page.click("#study-compare")
            page.wait_for_selector("#study-panel .study-row")
            assert page.locator("#study-panel .study-row").count() == 2  # one row per served index
            assert page.locator("#study-panel .study-row").first.locator(".study-tile").count() == 10
            if keep:
                page.screenshot(path=str(Path(keep) / "study-compare.png"))
        finally:
            browser.close()
    assert errors == []
