"""metadata.yml documents the database as it really is: every table, view and column of a
fully built database (log, projections, forwarding) has a description, nothing described
is missing, times say UTC, and every canned query is documented and listed in the docs."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from analytics.datasette_app import REPO_ROOT, load_metadata
from gateway.log import archiver
from tests.test_datasette_helpers import corpus_build

DOCS = REPO_ROOT / "README.md"


def load() -> dict[str, Any]:
    return load_metadata()


def schema(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Every user table and view with its columns (SQLite's own tables excluded)."""
    names = [
        row[0]
        for row in conn.execute(
            "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        )
    ]
    return {
        name: [row[1] for row in conn.execute(f'PRAGMA table_xinfo("{name}")')] for name in names
    }


def undocumented(conn: sqlite3.Connection, metadata: dict[str, Any]) -> list[str]:
    """`table` or `table.column` for everything in the database without a description."""
    tables = metadata["databases"]["callgate"]["tables"]
    missing = []
    for table, columns in schema(conn).items():
        documented = tables.get(table) or {}
        if not str(documented.get("description") or "").strip():
            missing.append(table)
        described = documented.get("columns") or {}
        missing += [
            f"{table}.{column}"
            for column in columns
            if not str(described.get(column) or "").strip()
        ]
    return missing


def test_every_table_and_column_is_described() -> None:
    conn = sqlite3.connect(corpus_build().db)
    try:
        found = schema(conn)
        assert {
            "events", "rejections", "calls", "plays", "recordings", "dtmf", "speech",
            "broadcasts", "timeline", "checkpoints", "subscriptions", "deliveries",
            "delivery_attempts",
        } <= set(found)
        assert undocumented(conn, load()) == []
    finally:
        conn.close()


def test_the_check_catches_a_new_column(tmp_path: Path) -> None:
    """The docs test is only worth something if it fails: add a column, a table, see them."""
    copy = tmp_path / "callgate.db"
    conn = sqlite3.connect(corpus_build().db)
    conn.execute(f"VACUUM INTO '{copy}'")
    conn.close()
    conn = sqlite3.connect(copy)
    try:
        conn.execute("ALTER TABLE calls ADD COLUMN mystery_ms INTEGER")
        conn.execute("CREATE TABLE surprise (id INTEGER PRIMARY KEY)")
        assert undocumented(conn, load()) == ["calls.mystery_ms", "surprise", "surprise.id"]
    finally:
        conn.close()
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_nothing_described_that_does_not_exist() -> None:
    conn = sqlite3.connect(corpus_build().db)
    try:
        found = schema(conn)
    finally:
        conn.close()
    archive = sqlite3.connect(":memory:")  # tables only a NATS-mode archive has
    archive.executescript(archiver.SCHEMA)
    found.update(schema(archive))
    archive.close()
    for table, documented in load()["databases"]["callgate"]["tables"].items():
        assert table in found, f"metadata.yml describes a table that is gone: {table}"
        stale = set(documented.get("columns") or {}) - set(found[table])
        assert not stale, f"{table}: described columns that are gone: {sorted(stale)}"


def test_units_and_times() -> None:
    """Times say UTC; the table and instance say what the data is."""
    metadata = load()
    assert metadata["title"] and metadata["description"] and metadata["source"]
    for table, documented in metadata["databases"]["callgate"]["tables"].items():
        for column, text in documented["columns"].items():
            if column.endswith("_at"):
                assert "UTC" in text, f"{table}.{column} should say its time zone"
            if re.search(r"duration|seconds|_time$", column):
                unit_in_name = re.search(r"(_s|_ms|_seconds)$", column)
                assert unit_in_name or "second" in text, f"{table}.{column}: unit?"


def test_canned_queries_documented_and_listed() -> None:
    queries = load()["databases"]["callgate"]["queries"]
    assert len(queries) >= 12
    docs = DOCS.read_text()
    for name, query in queries.items():
        assert str(query.get("title") or "").strip(), name
        assert len(str(query.get("description") or "")) > 40, name
        assert f"`{name}`" in docs, f"README.md does not list {name}"
        for parameter in set(re.findall(r"(?<!:):([a-z_]+)", query["sql"])):
            assert parameter in query["description"], f"{name}: explain :{parameter}"


def test_dashboards_use_the_callgate_database_and_known_sql() -> None:
    metadata = load()
    queries = {q["sql"] for q in metadata["databases"]["callgate"]["queries"].values()}
    charts = [
        chart
        for dashboard in metadata["plugins"]["datasette-dashboards"].values()
        for chart in dashboard["charts"].values()
    ]
    assert len(charts) >= 5
    reused = [c for c in charts if c["query"] in queries]
    assert len(reused) >= 5  # the charts show the canned queries' own numbers
    conn = sqlite3.connect(corpus_build().db)
    try:
        for chart in charts:
            assert chart["db"] == "callgate"
            params = {name: "" for name in re.findall(r"(?<!:):([a-z_]+)", chart["query"])}
            assert conn.execute(chart["query"], params).fetchall(), chart["title"]
    finally:
        conn.close()
