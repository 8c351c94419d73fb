"""The HTML report in a real browser: headless Chromium opens it offline, logs no errors, and shows every image.

Needs Debian's chromium (`apt-get install chromium`) and the playwright Python package (`pip install playwright`;
never `playwright install`: the system browser is used). Skipped, with the reason, when either is missing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def report_html(tiny_index, tiny_encoder, tmp_path_factory) -> Path:
    from cliplens.evaluate import EvalConfig, evaluate_index
    from cliplens.report import write_report
    from cliplens.store import IndexStore

    store = IndexStore.open(tiny_index)
    config = EvalConfig(classname_styles=("english",), resolution_study=True, resolution_limit=8)
    report = evaluate_index(store, tiny_encoder, config)
    out = tmp_path_factory.mktemp("browser") / "report"
    return write_report(report, out, ks=config.ks, images=store.images())["html"]


def test_report_opens_in_headless_chromium(report_html, tmp_path, playwright_api):
    sync_api = playwright_api
    # The page must stand alone: copy it away from its figures/ folder so nothing can be fetched from beside it.
    page_path = tmp_path / "alone" / "report.html"
    page_path.parent.mkdir()
    shutil.copy(report_html, page_path)
    problems, fetched = [], []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("request", lambda r: fetched.append(r.url))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])")
            title = page.title()
            headings = page.locator("h2").all_inner_texts()
            published = page.locator("td.pub").count()
            shot = tmp_path / "report.png"
            page.screenshot(path=str(shot), full_page=True)
            phone = browser.new_page(viewport={"width": 390, "height": 844})  # fits a phone: no sideways page scroll
            phone.goto(page_path.as_uri(), wait_until="load")
            phone_width = phone.evaluate("document.documentElement.scrollWidth")
        finally:
            browser.close()
    assert problems == []
    assert [u for u in fetched if not u.startswith(("file:", "data:"))] == []
    # 3 plots (template comparison, superclass confusion, per-class AP), 4 case-study grids, and one grid of
    # example images per frequent confusion pair (up to 10)
    pairs = sum(1 for *_, alt in images if " predicted as " in alt)
    assert 1 <= pairs <= 10 and len(images) == 7 + pairs
    for complete, width, height, alt in images:
        assert complete and width > 0 and height > 0, alt
    assert title == "cliplens evaluation"
    assert headings[:3] == ["Index and model", "Zero-shot classification", "Retrieval with class prompts"]
    assert "Low resolution" in headings and published == 4
    assert phone_width <= 390
    from PIL import Image

    with Image.open(shot) as im:
        assert im.width == 1280 and im.height > 3000  # the whole page, plots included
        colours = np.asarray(im.convert("RGB").resize((128, 512))).reshape(-1, 3)
        assert len(np.unique(colours, axis=0)) > 100  # not a blank page
