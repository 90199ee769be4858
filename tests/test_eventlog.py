"""Invariants of the log: immutable, hash-chained, verifiable, re-processable."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest

from gateway.config import Config
from gateway.db import GENESIS_HASH, connect
from gateway.log import eventlog
from gateway.log.intake import ingest_request, reprocess
from gateway.wire.ingest import Headers
from tests.conftest import CALLGATE
from tests.corpus import APP_ID, flows


def fill(db_path: str, config: Config | None = None, migrate: bool = True) -> int:
    config = config or Config(db_path=db_path, app_ids=(APP_ID,))
    conn = connect(db_path)
    if migrate:
        eventlog.ensure_schema(conn)
    for flow in flows()[:4]:
        for request in flow.wire:
            ingest_request(conn, config, Headers.of(request.headers), request.body)
    return conn.execute("SELECT count(*) FROM events").fetchone()[0]


def raw_conn(db_path: str) -> sqlite3.Connection:
    return sqlite3.connect(db_path, isolation_level=None)


def test_update_and_delete_are_refused(db_path) -> None:
    fill(db_path)
    conn = raw_conn(db_path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE events SET state = 'connected' WHERE seq = 1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM events WHERE seq = 1")


def test_chain_verifies_and_links(db_path) -> None:
    count = fill(db_path)
    conn = connect(db_path)
    result = eventlog.verify(conn)
    assert result.ok and result.checked == count and result.head_seq == count
    rows = conn.execute("SELECT prev_hash, hash FROM events ORDER BY seq").fetchall()
    assert rows[0][0] == GENESIS_HASH
    assert all(rows[i][0] == rows[i - 1][1] for i in range(1, len(rows)))


def _drop_triggers(conn: sqlite3.Connection) -> None:
    conn.execute("DROP TRIGGER events_no_update")
    conn.execute("DROP TRIGGER events_no_delete")


@pytest.mark.parametrize(
    ("tamper", "bad_seq"),
    [
        ("UPDATE events SET state = 'connected' WHERE seq = 7", 7),
        # raw is sealed: flipping one character of its ciphertext text must be caught too.
        (
            "UPDATE events SET raw = substr(raw, 1, length(raw) - 3) || "
            "CASE substr(raw, -3, 1) WHEN 'A' THEN 'B' ELSE 'A' END || substr(raw, -2) "
            "WHERE seq = 8",
            8,
        ),
        ("DELETE FROM events WHERE seq = 5", 6),
        ("DELETE FROM events WHERE seq = (SELECT max(seq) FROM events)", None),
        # Reordering: swap the content of two rows, keeping their hashes.
        (
            "UPDATE events SET payload = (SELECT payload FROM events WHERE seq = 4), "
            "raw = (SELECT raw FROM events WHERE seq = 4), "
            "content_hash = (SELECT content_hash FROM events WHERE seq = 4) WHERE seq = 3",
            3,
        ),
    ],
)
def test_verify_names_the_first_broken_seq(db_path, tamper, bad_seq) -> None:
    fill(db_path)
    conn = raw_conn(db_path)
    _drop_triggers(conn)
    conn.execute("DROP INDEX IF EXISTS idx_events_content_hash")
    conn.execute(tamper)
    result = subprocess.run(
        [CALLGATE, "verify", "--db", db_path], capture_output=True, text=True, timeout=60
    )
    if bad_seq is None:
        # Truncating the tail keeps a valid chain: that is what `verify --head` anchors catch.
        assert result.returncode == 0
        return
    assert result.returncode == 1
    assert f"BROKEN at seq {bad_seq}" in result.stderr


def test_head_is_printed_for_anchoring(db_path) -> None:
    count = fill(db_path)
    out = subprocess.run(
        [CALLGATE, "verify", "--db", db_path, "--head"], capture_output=True, text=True, timeout=60
    ).stdout.split()
    conn = connect(db_path)
    assert out == [str(count), conn.execute("SELECT hash FROM events WHERE seq = ?",
                                            (count,)).fetchone()[0]]


def test_reprocess_turns_a_wrong_app_id_rejection_into_an_event(db_path) -> None:
    without = Config(db_path=db_path, app_ids=("some-other-app",))
    flow = flows()[0]
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    for request in flow.wire:
        outcome = ingest_request(conn, without, Headers.of(request.headers), request.body)
        assert outcome.error == "bad_decrypt"
    assert reprocess(conn, without).still_rejected == len(flow.wire)
    fixed = Config(db_path=db_path, app_ids=("some-other-app", APP_ID))
    summary = reprocess(conn, fixed)
    assert summary.events == flow.expect["unique_events"] and summary.still_rejected == 0
    resolved = conn.execute(
        "SELECT resolution, resolved_seq FROM rejections ORDER BY id"
    ).fetchall()
    assert all(r[0] == "event" and r[1] for r in resolved)
    assert reprocess(conn, fixed).tried == 0


def test_reprocess_command(db_path) -> None:
    flow = flows()[1]
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    for request in flow.wire:
        ingest_request(conn, Config(db_path=db_path), Headers.of(request.headers), request.body)
    env = {"ENABLEX_APP_ID": APP_ID, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([CALLGATE, "reprocess", "--db", db_path], capture_output=True,
                         text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"{flow.expect['unique_events']} new events" in out.stdout
    assert APP_ID not in out.stdout + out.stderr


def test_ingest_command_imports_captured_requests(db_path, tmp_path) -> None:
    capture = tmp_path / "capture.jsonl"
    lines = [json.dumps({"headers": r.headers, "body": r.body.decode()})
             for flow in flows() for r in flow.wire]
    lines.append(json.dumps({"headers": {"x-algoritm": "aes-256-cbc"}, "body": ""}))
    capture.write_text("\n".join(lines) + "\n")
    env = {"ENABLEX_APP_ID": APP_ID, "PATH": "/usr/bin:/bin"}
    out = subprocess.run([CALLGATE, "ingest", "--db", db_path, str(capture)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    unique = sum(f.expect["unique_events"] for f in flows())
    assert f"accepted={unique}" in out.stdout and "rejected=1" in out.stdout
    conn = connect(db_path)
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == unique
    assert eventlog.verify(conn).ok


def test_schema_is_versioned_and_idempotent(db_path) -> None:
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    eventlog.ensure_schema(conn)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == eventlog.SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_a_version_1_log_loses_the_event_id_index_and_keeps_its_events(db_path) -> None:
    """Migration 2 on a log written by schema 1: same rows, same chain, one index fewer."""
    conn = connect(db_path)
    conn.execute("BEGIN IMMEDIATE")
    eventlog.MIGRATIONS[1](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("COMMIT")
    count = fill(db_path, migrate=False)
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(events)")}
    assert "idx_events_event_id" in indexes
    eventlog.ensure_schema(conn)
    indexes = {row[1] for row in conn.execute("PRAGMA index_list(events)")}
    assert "idx_events_event_id" not in indexes and "idx_events_content_hash" in indexes
    assert conn.execute("PRAGMA user_version").fetchone()[0] == eventlog.SCHEMA_VERSION
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == count
    assert eventlog.verify(conn).ok


def test_event_ids_are_found_through_the_content_hash_index(db_path) -> None:
    fill(db_path)
    conn = connect(db_path)
    wanted = [row[0] for row in conn.execute("SELECT event_id FROM events WHERE seq IN (2, 5)")]
    clause, params = eventlog.event_id_match([*wanted, "ev_not-an-id", "ev_" + "0" * 24])
    found = [row[0] for row in conn.execute(
        f"SELECT event_id FROM events WHERE {clause} ORDER BY seq", params)]
    assert found == wanted
    plan = " ".join(row[3] for row in conn.execute(
        f"EXPLAIN QUERY PLAN SELECT seq FROM events WHERE {clause}", params))
    assert "idx_events_content_hash" in plan and "SCAN" not in plan
    assert eventlog.event_id_match(["nope"]) == ("0", [])
