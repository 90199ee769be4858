"""The dashboard in a real browser: Debian's headless Chromium driven by Playwright loads
/-/dashboards/calls-overview from a real Datasette on the corpus database, anonymously, and
every chart renders (a Vega SVG, or the metric's number); the disconnect-reason chart has
one slice per normalised reason. The screenshot is kept as a test artifact."""

from __future__ import annotations

from analytics.datasette_app import load_metadata
from tests.helpers_browser import chromium, count, legend_labels, screenshot, watch_errors
from tests.test_datasette_helpers import TERMINAL, Built, Datasette


def charts() -> dict[str, dict]:  # type: ignore[type-arg]
    metadata = load_metadata()
    return metadata["plugins"]["datasette-dashboards"]["calls-overview"]["charts"]


def test_dashboard_renders_in_chromium(ds: Datasette, built: Built) -> None:
    expected = charts()
    graphs = [slug for slug, chart in expected.items() if chart["library"] != "metric"]
    metrics = [slug for slug, chart in expected.items() if chart["library"] == "metric"]
    assert len(graphs) >= 7
    calls = built.reference.calls.values()
    answered = sum(c.answered is not None for c in calls)
    reasons = {c.normalised_reason or "(none)" for c in calls if c.final_state in TERMINAL}
    raw = {c.disconnect_reason for c in calls if c.final_state in TERMINAL}
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors, failed_requests = watch_errors(page)
        response = page.goto(f"{ds.url}/-/dashboards/calls-overview")
        assert response is not None and response.status == 200
        selector = ", ".join(f"#chart-{slug} svg" for slug in graphs)
        page.wait_for_function(
            f"document.querySelectorAll({selector!r}).length >= {len(graphs)}",
            timeout=30_000,
        )
        for slug in graphs:
            drawn = page.locator(f"#chart-{slug} svg")
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
        # One slice per normalised reason: "Normal Clearing" is drawn as normal_clearing.
        assert count(page, "#chart-disconnect-mix g.mark-arc path") == len(reasons)
        assert set(legend_labels(page, "disconnect-mix")) == reasons
        assert "Normal Clearing" in raw and "normal_clearing" in reasons
        page.wait_for_timeout(300)  # let Vega finish its last paint for the screenshot
        screenshot(page, "dashboard-calls-overview")
    assert errors == [], errors
    assert failed_requests == [], failed_requests
