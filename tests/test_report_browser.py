"""The report in a real browser: Debian's headless Chromium, driven by playwright (python).

The page must load with no console error, request nothing outside its folder, draw every panel at a
non-zero size, and show the findings and the ranked table (sortable). A full-page screenshot is
saved to $MMTRAIN_REPORT_SCREENSHOT (or the test's tmp_path) for a person to look at.
"""

import os
import shutil
from pathlib import Path

import pytest
from test_report import PANELS, trained_runs

from mmtrain.cli import main

# Without the background-networking flags Chromium tries to reach Google's services (and is refused).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    """Debian's chromium, or skip: these machines cannot download a browser build of their own."""
    path = os.environ.get("MMTRAIN_CHROMIUM") or shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
    if path is None:
        pytest.skip("no Chromium to drive: install Debian's chromium package (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed: pip install -e '.[dev]'")
    return path


@pytest.mark.slow
def test_report_in_headless_chromium(tmp_path):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    out = tmp_path / "report"
    assert main(["report", str(trained_runs()), "--out", str(out), "--no-png"]) == 0
    root = out.resolve().as_uri() + "/"
    shot = Path(os.environ.get("MMTRAIN_REPORT_SCREENSHOT") or tmp_path / "report.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors, requests = [], []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(root + "index.html", wait_until="load")
            page.wait_for_selector("body[data-rendered=true]", timeout=120_000)

            assert errors == []
            outside = [u for u in requests if not u.startswith(root) and u != "data:,"]
            assert outside == [], f"requests outside the report folder: {outside}"
            assert root + "assets/plotly.min.js" in requests

            # Every panel: a section with its anchor and a drawn plotly chart of non-zero size.
            for key in PANELS:
                box = page.locator(f"#panel-{key} .js-plotly-plot .main-svg").first.bounding_box()
                assert box and box["width"] > 300 and box["height"] > 200, (key, box)
            for fig in page.locator("[data-figure]").all():
                box = fig.bounding_box()
                assert box and box["width"] > 0 and box["height"] > 0
                assert fig.locator(".main-svg").count() > 0
            # Lines were drawn (not just empty axes) on the loss panel.
            assert page.locator("#panel-loss .scatterlayer .trace").count() >= 3

            # Findings and the ranked table are there; the table sorts by a clicked column.
            assert page.locator("#findings h2").inner_text().startswith("Findings")
            rows = page.locator("#ranked-runs tbody tr")
            assert rows.count() == 3
            col = page.locator("#ranked-runs thead th").all_inner_texts().index("final val loss")

            def column() -> list[float]:
                cells = page.locator(f"#ranked-runs tbody tr td:nth-child({col + 1})").all()
                return [float(c.get_attribute("data-sort")) for c in cells]

            assert column() == sorted(column())  # ranked best first
            page.locator("#ranked-runs thead th").nth(col).click()
            page.locator("#ranked-runs thead th").nth(col).click()  # second click: descending
            assert column() == sorted(column(), reverse=True)

            # The reconstruction grids step through time with the slider; the shown grid has loaded.
            stepper = page.locator("#media .stepper").filter(has=page.locator("img.grid")).first
            frames = stepper.locator(".frame")
            assert frames.count() >= 2
            assert stepper.locator(".frame:not([hidden]) img").evaluate("img => img.naturalWidth") > 0
            stepper.locator("input[type=range]").fill("0")
            assert frames.nth(0).is_visible() and not frames.nth(frames.count() - 1).is_visible()
            stepper.locator("input[type=range]").fill(str(frames.count() - 1))

            page.locator("#ranked-runs thead th").nth(col).click()  # back to best first, for the person looking
            page.evaluate("window.scrollTo(0, 0)")  # sticky elements follow the scroll into a full-page shot
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 50_000
