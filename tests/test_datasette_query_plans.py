"""The canned queries keep the plans that make them fast on a long history (bench/queries.py
measures them; no timing is asserted here): each reads its index in order, with no sort
right after it, and never scans the calls, plays or events tables.

SQLite uses an index on an expression only when the query spells the same expression, so
a query and analytics/tables.py drifting apart shows up here, not as a slow dashboard.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator

import pytest

from analytics import tables
from analytics.datasette_app import load_metadata
from tests.test_datasette_helpers import Built

PARAM_RE = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
INDEXED = {
    "calls_per_day": {"calls_started_day"},
    "asr_ner_per_day": {"calls_started_day"},
    "acd_per_day": {"calls_started_day"},
    "answer_and_ring_times": {
        "calls_answer_ms_by_direction",
        "calls_answer_ms",
        "calls_ring_ms_by_direction",
        "calls_ring_ms",
    },
    "disconnect_reasons": {"calls_ended"},
    "time_to_answer_per_day": {"calls_answer_ms_by_day"},
    "ivr_prompt_outcomes": {"plays_prompt_ref"},
    "recording_coverage": {"calls_direction"},
}
SUMMARY = {"peak_concurrency": "hourly_concurrency", "webhook_lateness": "lateness_histogram"}
BIG_TABLES = ("calls", "plays", "events")


def plan(conn: sqlite3.Connection, sql: str) -> list[tuple[int, int, str]]:
    params = {name: "" for name in PARAM_RE.findall(sql)}
    return [(r[0], r[1], r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]


@pytest.fixture(scope="module")
def conn(built: Built) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(f"file:{built.db}?mode=ro", uri=True)
    yield connection
    connection.close()


def queries() -> dict[str, str]:
    return {n: q["sql"] for n, q in load_metadata()["databases"]["callgate"]["queries"].items()}


def test_the_indexes_the_plans_name_exist() -> None:
    declared = {name for table in tables.ALL_TABLES for name, _ in table.index_definitions()}
    assert set().union(*INDEXED.values()) <= declared


@pytest.mark.parametrize("name", sorted(INDEXED))
def test_query_reads_its_index_in_order(conn: sqlite3.Connection, name: str) -> None:
    rows = plan(conn, queries()[name])
    used = {m.group(1) for _, _, d in rows if (m := re.search(r"COVERING INDEX (\w+)", d))}
    assert INDEXED[name] <= used, rows
    for node, parent, detail in rows:
        if any(f"COVERING INDEX {index}" in detail for index in INDEXED[name]):
            siblings = [d for n, p, d in rows if p == parent and n != node]
            assert not [d for d in siblings if d.startswith("USE TEMP B-TREE")], rows
    assert not [d for _, _, d in rows if re.fullmatch(rf"SCAN ({'|'.join(BIG_TABLES)})", d)]


@pytest.mark.parametrize("name", sorted(SUMMARY))
def test_query_reads_its_summary_not_the_history(conn: sqlite3.Connection, name: str) -> None:
    rows = plan(conn, queries()[name])
    assert any(d.startswith(f"SCAN {SUMMARY[name]}") for _, _, d in rows), rows
    for _, _, detail in rows:
        # the log only by seq range (the events not summarised yet), calls not at all
        assert not re.match(r"(SCAN|SEARCH) calls\b", detail), rows
        if re.match(r"(SCAN|SEARCH) events\b", detail):
            assert "USING INTEGER PRIMARY KEY (rowid>" in detail, rows


def test_dashboard_charts_read_indexes_too(conn: sqlite3.Connection) -> None:
    charts = load_metadata()["plugins"]["datasette-dashboards"]["calls-overview"]["charts"]
    for slug, chart in charts.items():
        rows = plan(conn, chart["query"])
        assert not [d for _, _, d in rows if re.fullmatch(r"SCAN (calls|plays)", d)], (slug, rows)
