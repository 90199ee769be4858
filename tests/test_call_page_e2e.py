"""The call page in a real browser (Debian's Chromium driven by Playwright) on the corpus
database: one click from the calls table (and from the timeline, plays, dtmf, speech,
recordings and deliveries tables) lands on the call's page, which shows its timeline with
late arrivals marked, its plays and its recording; anonymously in the public form, for the
operator with the forwarded deliveries and a recording link. The privacy rules are checked
on the page itself. One browser for the whole module."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers_browser import chromium, count, screenshot, watch_errors
from tests.test_datasette_helpers import OPERATOR_TOKEN, Built, Datasette, RefCall, utc_text

PERSONAL_TABLES = ("calls", "plays", "dtmf", "speech", "recordings")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as instance:
        yield instance


def open_page(browser: Any, operator: bool) -> Any:
    headers = {"Authorization": f"Bearer {OPERATOR_TOKEN}"} if operator else {}
    context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                  extra_http_headers=headers)  # fmt: skip
    return context.new_page()


def recorded_call(built: Built) -> RefCall:
    """The corpus call with prompts played and a completed recording (flow 07)."""
    for call in built.reference.calls.values():
        if call.expect.get("recording_url") and call.expect.get("plays"):
            return call
    raise AssertionError("no recorded call with plays in the corpus")


def late_events(call: RefCall) -> int:
    """Events logged after an event of the same call with a later event time."""
    return sum(
        1 for e in call.events
        if any(o.arrival < e.arrival and o.at > e.at for o in call.events)
    )  # fmt: skip


def cleartext(ds: Datasette, voice_id: str) -> set[str]:
    """Values only operators may read: what a `<table>_private` table holds for the call
    where it differs from the public table (nothing while no such table exists)."""
    found: set[str] = set()
    for table in PERSONAL_TABLES:
        private = ds.get(f"/{ds.name}/{table}_private.json", OPERATOR_TOKEN,
                         voice_id=voice_id, _shape="array")  # fmt: skip
        if private.status_code != 200:
            continue
        public = ds.get(f"/{ds.name}/{table}.json", voice_id=voice_id, _shape="array").json()
        shown = {str(v) for row in public for v in row.values() if v is not None}
        for row in private.json():
            found |= {str(v) for k, v in row.items()
                      if isinstance(v, str) and len(v) >= 3 and str(v) not in shown}  # fmt: skip
    return found


def story(page: Any) -> dict[str, Any]:
    """What the call page shows, read from its DOM."""
    def column(table: str, index: int) -> list[str]:
        return [t.strip() for t in page.locator(f"#{table} tbody tr td:nth-child({index})")
                .all_inner_texts()]  # fmt: skip

    return {
        "h1": page.locator("h1").inner_text(),
        "times": column("call-timeline", 2),
        "late": count(page, "#call-timeline tr.late"),
        "late_badges": count(page, "#call-timeline .badge.late"),
        "plays": column("call-plays", 1),
        "recordings": column("call-recordings", 2),
        "recording_links": page.locator("a.recording-link").evaluate_all(
            "links => links.map(a => a.href)"),
        "deliveries": count(page, "#call-deliveries tbody tr:not(.attempt)"),
        "attempts": count(page, "#call-deliveries tbody tr.attempt"),
        "from": page.locator("#call-summary .from-number").inner_text(),
        "html": page.content(),
    }


@pytest.mark.parametrize("role", ["anonymous", "operator"])
def test_a_call_opened_from_the_calls_table(ds: Datasette, built: Built, browser: Any,
                                             role: str) -> None:
    operator = role == "operator"
    call = recorded_call(built)
    page = open_page(browser, operator)
    errors, failed = watch_errors(page)
    page.goto(f"{ds.url}/{ds.name}/calls?_size=100")
    page.locator(f'td.col-voice_id a[href$="/calls/{call.voice_id}"]').click()
    page.wait_for_url(re.compile(rf".*/calls/{call.voice_id}$"))
    seen = story(page)
    assert call.voice_id in seen["h1"]
    # Timeline: every logged event, in event time; plays and the recording.
    assert seen["times"] == [utc_text(e.at) for e in call.ordered]
    assert len(seen["plays"]) == call.expect["plays"]
    assert seen["recordings"] and "completed" in seen["recordings"]
    token = OPERATOR_TOKEN
    public = ds.get(f"/{ds.name}/calls/{call.voice_id}.json", _shape="array").json()[0]
    deliveries = ds.get(f"/{ds.name}/deliveries.json", token, voice_id=call.voice_id,
                        _shape="array").json()  # fmt: skip
    attempts = sum(d["attempts"] for d in deliveries)
    assert deliveries and attempts >= len(deliveries)
    secret_values = cleartext(ds, call.voice_id)
    html = seen["html"]
    if operator:
        assert "operator view" in html
        assert seen["deliveries"] == len(deliveries) and seen["attempts"] == attempts
        urls = {r["recording_url"] for r in ds.get(
            f"/{ds.name}/recordings.json", token, voice_id=call.voice_id, _shape="array").json()}
        private = ds.get(f"/{ds.name}/recordings_private.json", token, voice_id=call.voice_id,
                         _shape="array")  # fmt: skip
        if private.status_code == 200:
            urls = {r["recording_url"] for r in private.json()}
        assert seen["recording_links"] and set(seen["recording_links"]) <= urls
        assert all(value in html for value in secret_values)
        screenshot(page, "call-page-operator", docs_name="screenshot-call-page.png")
    else:
        # Privacy on the page an anonymous visitor lands on: the public form of the call
        # only; no forwarding data (deliveries, attempts, subscriptions and their URLs),
        # no recording link, and none of the cleartext the *_private tables keep.
        assert "operator view" not in html
        assert seen["deliveries"] == 0 and "call-deliveries" not in html
        for delivery in deliveries:
            assert delivery["id"] not in html and delivery["subscription_id"] not in html
        for subscription in built.subscriptions.values():
            assert subscription not in html
        assert "127.0.0.1:" not in html.replace(ds.url, "")  # no subscriber URL
        assert seen["recording_links"] == []
        assert seen["from"] == public["from_number"]
        assert not [value for value in secret_values if value in html]
        screenshot(page, "call-page-anonymous")
    assert errors == [] and failed == [], (errors, failed)
    page.context.close()


def test_late_arrivals_are_marked(ds: Datasette, built: Built, browser: Any) -> None:
    late = {c.voice_id: late_events(c) for c in built.reference.calls.values()}
    voice_id = max(late, key=lambda v: late[v])
    assert late[voice_id] >= 1
    page = open_page(browser, operator=False)
    page.goto(f"{ds.url}/{ds.name}/calls/{voice_id}")
    seen = story(page)
    assert seen["late"] == seen["late_badges"] == late[voice_id]
    page.context.close()


@pytest.mark.parametrize("table", ["timeline", "plays", "dtmf", "speech", "recordings",
                                   "deliveries"])  # fmt: skip
def test_one_click_from_a_related_row(ds: Datasette, browser: Any, table: str) -> None:
    operator = table == "deliveries"  # operator-only table
    page = open_page(browser, operator)
    page.goto(f"{ds.url}/{ds.name}/{table}?_size=5&voice_id__notblank=1")
    link = page.locator("td.col-voice_id a").first
    voice_id = link.inner_text().strip()
    link.click()
    page.wait_for_url(re.compile(rf".*/{ds.name}/calls/{re.escape(voice_id)}$"))
    assert voice_id in page.locator("h1").inner_text()
    assert count(page, "#call-timeline tbody tr") >= 1
    page.context.close()
