"""The call page without a browser: the pure shaping of analytics/call_page.py, the calls
page's search forms per visitor, and the templates served for a database not named
callgate (a real Datasette on a copy of the corpus database)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from analytics.call_page import bridge_legs, openable, overlay
from tests.test_datasette_helpers import OPERATOR_TOKEN, Built, Datasette, running


def bridge(state: str, at: str, reason: str | None = None) -> dict[str, str | None]:
    return {"class": "bridge", "state": state, "occurred_at": at, "reason": reason}


def test_bridge_legs_from_the_timeline() -> None:
    timeline = [
        {"class": "call", "state": "connected", "occurred_at": "t0"},
        bridge("bridging", "t1"), bridge("failed", "t2", "User Busy"),
        {"class": "play", "state": "initiated", "occurred_at": "t3"},
        bridge("bridging", "t4"), bridge("bridged", "t5"), bridge("bridge_disconnected", "t6"),
        bridge("bridged", "t7"),  # a transfer: bridged with no bridging first, still open
    ]  # fmt: skip
    assert bridge_legs(timeline) == [
        {"leg": 1, "started_at": "t1", "bridged_at": None, "ended_at": "t2",
         "outcome": "failed", "reason": "User Busy"},
        {"leg": 2, "started_at": "t4", "bridged_at": "t5", "ended_at": "t6",
         "outcome": "completed", "reason": None},
        {"leg": 3, "started_at": "t7", "bridged_at": "t7", "ended_at": None,
         "outcome": "bridged", "reason": None},
    ]  # fmt: skip
    assert bridge_legs([{"class": "call", "state": "connected", "occurred_at": "t0"}]) == []


def test_private_rows_overlay_the_public_form_by_key() -> None:
    public = [{"voice_id": "v", "position": 1, "digits": "**", "source": "play"},
              {"voice_id": "v", "position": 2, "digits": "*", "source": "dtmf"}]  # fmt: skip
    private = [{"voice_id": "v", "position": 2, "digits": "7", "text": "only here"}]
    shown = overlay(public, private, ("voice_id", "position"))
    assert shown == [public[0], {"voice_id": "v", "position": 2, "digits": "7", "source": "dtmf",
                                 "text": "only here"}]  # fmt: skip
    assert public[1]["digits"] == "*"  # the input is not changed


@pytest.mark.parametrize(("url", "link"), [
    ("https://api.enablex.io/voice/v1/recording/x.mp3", True),
    ("HTTP://example.test/a.wav", True),
    ("javascript:alert(1)", False), ("data:text/html,x", False), ("", False), (None, False),
])  # fmt: skip
def test_only_http_urls_become_links(url: str | None, link: bool) -> None:
    assert openable(url) == (url if link else None)


def test_calls_page_forms_per_visitor(ds: Datasette) -> None:
    anonymous = ds.get(f"/{ds.name}/calls").text
    operator = ds.get(f"/{ds.name}/calls", OPERATOR_TOKEN).text
    assert 'id="find-by-time"' in anonymous and 'id="find-by-time"' in operator
    assert 'id="find-by-number"' not in anonymous and "find-by-number-refused" in anonymous
    assert 'id="find-by-number"' in operator and f"/{ds.name}/find_calls" in operator
    # The time form is Datasette's own filter: it narrows the calls table for everyone.
    rows = ds.get(f"/{ds.name}/calls.json", _shape="array", started_at__gte="2024-03-14",
                  started_at__lt="2024-03-15").json()  # fmt: skip
    assert rows and all(r["started_at"].startswith("2024-03-14") for r in rows)


@pytest.fixture(scope="module")
def renamed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Datasette]:
    """The corpus database under another name: metadata and templates must follow it."""
    target = tmp_path_factory.mktemp("renamed") / "prod.db"
    shutil.copyfile(built.db, target)
    for suffix in ("-wal", "-shm"):
        if Path(built.db + suffix).exists():
            shutil.copyfile(built.db + suffix, str(target) + suffix)
    yield from running(str(target))


def test_templates_follow_the_database_name(renamed: Datasette, built: Built) -> None:
    voice_id = next(iter(built.reference.calls))
    page = renamed.get(f"/prod/calls/{voice_id}")
    assert page.status_code == 200
    assert f"Call {voice_id}" in page.text and 'id="call-timeline"' in page.text
    assert 'id="find-by-time"' in renamed.get("/prod/calls").text
    assert renamed.get("/prod/deliveries").status_code == 403  # permissions followed too
