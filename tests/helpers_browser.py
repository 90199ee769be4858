"""Shared by the real-browser tests: Debian's headless Chromium driven by Playwright, chart
readers for the dashboard's SVG charts, and where screenshots go.

Screenshots are always written to test-artifacts/; the copies shown in the README (docs/)
are refreshed only with CALLGATE_UPDATE_SCREENSHOTS=1, so an ordinary test run leaves the
work tree clean (demo data differ from run to run)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from analytics.datasette_app import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = REPO_ROOT / "test-artifacts"
DOCS = REPO_ROOT / "docs"
UPDATE_SCREENSHOTS = os.environ.get("CALLGATE_UPDATE_SCREENSHOTS") == "1"


@contextmanager
def chromium() -> Iterator[Any]:
    """One browser for a whole test module (launching costs a second or two)."""
    from playwright.sync_api import sync_playwright

    # Not a skip: `make test` installs Debian's chromium first (`make chromium`).
    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: run `make chromium`"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page: Any, name: str, docs_name: str | None = None) -> Path:
    """Full-page screenshot into test-artifacts/<name>.png (and docs/<docs_name> when asked)."""
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 20_000, shot
    if docs_name and UPDATE_SCREENSHOTS:
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS / docs_name)
    return shot


def watch_errors(page: Any) -> tuple[list[str], list[str]]:
    """Script errors and HTTP failures (status >= 400) the page runs into, as they happen."""
    errors: list[str] = []
    failed: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else 0)
    return errors, failed


def axis_labels(page: Any, slug: str, axis: str = "X") -> list[str]:
    """Tick labels of a Vega SVG chart's axis (its aria-label names the axis)."""
    return list(page.evaluate(
        """([slug, axis]) => {
          const g = Array.from(document.querySelectorAll(`#chart-${slug} g.role-axis`))
            .find(a => (a.getAttribute('aria-label') || '').startsWith(axis + '-axis'));
          return g ? Array.from(g.querySelectorAll('g.role-axis-label text'))
                          .map(t => t.textContent) : [];
        }""",
        [slug, axis],
    ))


def legend_labels(page: Any, slug: str) -> list[str]:
    return list(page.evaluate(
        "slug => Array.from(document.querySelectorAll(`#chart-${slug} g.role-legend-label text`))"
        ".map(t => t.textContent)",
        slug,
    ))


def count(page: Any, selector: str) -> int:
    return int(page.evaluate("s => document.querySelectorAll(s).length", selector))
