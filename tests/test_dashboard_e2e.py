"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright loads
/-/dashboards/calls-overview from a real Datasette, anonymously, and every chart renders
(a Vega canvas or SVG, or the metric's number). The screenshot is kept as a test artifact."""

from __future__ import annotations

import shutil
from pathlib import Path

from analytics.datasette_app import REPO_ROOT, load_metadata
from tests.test_datasette_helpers import Built, Datasette

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = REPO_ROOT / "test-artifacts"
README_SCREENSHOT = REPO_ROOT / "docs" / "screenshot-dashboard.png"


def charts() -> dict[str, dict]:  # type: ignore[type-arg]
    metadata = load_metadata()
    return metadata["plugins"]["datasette-dashboards"]["calls-overview"]["charts"]


def test_dashboard_renders_in_chromium(ds: Datasette, built: Built) -> None:
    from playwright.sync_api import sync_playwright

    # Not a skip: `make test` installs Debian's chromium first (`make chromium`).
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: run `make chromium`"
    expected = charts()
    graphs = [slug for slug, chart in expected.items() if chart["library"] != "metric"]
    metrics = [slug for slug, chart in expected.items() if chart["library"] == "metric"]
    assert len(graphs) >= 5
    calls = built.reference.calls.values()
    answered = sum(c.answered is not None for c in calls)
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    failed_requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on(
                "response",
                lambda r: failed_requests.append(f"{r.status} {r.url}") if r.status >= 400 else 0,
            )
            response = page.goto(f"{ds.url}/-/dashboards/calls-overview")
            assert response is not None and response.status == 200
            selector = ", ".join(
                f"#chart-{slug} canvas, #chart-{slug} svg" for slug in graphs
            )
            page.wait_for_function(
                f"document.querySelectorAll({selector!r}).length >= {len(graphs)}",
                timeout=30_000,
            )
            for slug in graphs:
                drawn = page.locator(f"#chart-{slug} canvas, #chart-{slug} svg")
                assert drawn.count() >= 1, slug
                box = drawn.first.bounding_box()
                assert box and box["width"] > 100 and box["height"] > 50, (slug, box)
            for slug in metrics:
                page.wait_for_function(
                    f"document.querySelector('#chart-{slug}').innerText.trim().length > 0"
                )
            assert page.locator("#chart-total-calls").inner_text().strip() == str(len(calls))
            asr = round(100.0 * answered / len(calls), 1)
            assert page.locator("#chart-overall-asr").inner_text().strip() == f"{asr} %"
            page.wait_for_timeout(300)  # let Vega finish its last paint for the screenshot
            shot = ARTIFACTS / "dashboard-calls-overview.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert errors == [], errors
    assert failed_requests == [], failed_requests
    assert shot.stat().st_size > 20_000
    README_SCREENSHOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(shot, README_SCREENSHOT)
