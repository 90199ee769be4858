"""The summary tables behind peak_concurrency and webhook_lateness stay exact however they
are reached: full recompute, the projector's incremental upkeep, a half-summarised log, a
database built by an older callgate. The oracle is the SQL these two queries ran before
the summaries existed: a sweep over calls and a histogram over the whole log."""

from __future__ import annotations

import random
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from analytics import projector, summaries, tables
from analytics.datasette_app import load_metadata
from gateway.cli.datasette import prepare_database
from gateway.db import connect
from gateway.log import eventlog
from tests.helpers_analytics import new_event, open_log, synthetic_log

OLD_PEAK_CONCURRENCY = """
    WITH spans AS (
      SELECT started_at AS s, coalesce(ended_at, last_event_at) AS e
      FROM calls
      WHERE started_at IS NOT NULL AND coalesce(ended_at, last_event_at) > started_at
    ),
    points AS (
      SELECT s AS t, 1 AS d FROM spans
      UNION ALL
      SELECT e, -1 FROM spans
    ),
    steps AS (SELECT t, sum(d) AS d FROM points GROUP BY t),
    levels AS (
      SELECT t,
             sum(d) OVER (ORDER BY t ROWS UNBOUNDED PRECEDING) AS level,
             lead(t) OVER (ORDER BY t) AS next_t
      FROM steps
    ),
    hours(hour, last_hour, level) AS (
      SELECT strftime('%Y-%m-%dT%H:00:00Z', t),
             strftime('%Y-%m-%dT%H:00:00Z', next_t, '-0.001 seconds'),
             level
      FROM levels
      WHERE level > 0 AND next_t IS NOT NULL
      UNION ALL
      SELECT strftime('%Y-%m-%dT%H:00:00Z', hour, '+1 hour'), last_hour, level
      FROM hours
      WHERE hour < last_hour
    ),
    peaks AS (SELECT hour, max(level) AS peak FROM hours GROUP BY hour),
    starts AS (
      SELECT strftime('%Y-%m-%dT%H:00:00Z', started_at) AS hour, count(*) AS started
      FROM calls WHERE started_at IS NOT NULL GROUP BY 1
    ),
    all_hours AS (SELECT hour FROM peaks UNION SELECT hour FROM starts)
    SELECT
      a.hour,
      coalesce(p.peak, 0) AS peak_concurrent_calls,
      coalesce(s.started, 0) AS calls_started
    FROM all_hours a
    LEFT JOIN peaks p ON p.hour = a.hour
    LEFT JOIN starts s ON s.hour = a.hour
    ORDER BY a.hour
"""

OLD_WEBHOOK_LATENESS = """
    WITH timed AS (
      SELECT class,
             CAST(round((julianday(received_at) - julianday(occurred_at)) * 86400000.0)
                  AS INTEGER) AS ms
      FROM events
      WHERE (:since = '' OR received_at >= :since)
        -- occurred_at = received_at only when the event had no timestamp (or truly 0 s
        -- late): only then is the payload read to tell which.
        AND (occurred_at != received_at
             OR coalesce(json_extract(payload, '$.time_source'), '') != 'received')
    ),
    -- Percentiles from a millisecond histogram: both times are stored to the
    -- millisecond, so this is exact and sorts buckets, not a million events.
    per_class AS (SELECT class AS grp, ms, count(*) AS k FROM timed GROUP BY class, ms),
    histogram AS (
      SELECT grp, ms, k FROM per_class
      UNION ALL
      SELECT 'all', ms, sum(k) FROM per_class GROUP BY ms
    ),
    ranked AS (
      SELECT grp, ms,
             sum(k) OVER (PARTITION BY grp ORDER BY ms ROWS UNBOUNDED PRECEDING) AS cum,
             sum(k) OVER (PARTITION BY grp) AS n
      FROM histogram
    )
    SELECT
      grp AS class,
      max(n) AS events,
      min(CASE WHEN cum * 100 >= n * 50 THEN ms END) / 1000.0 AS p50_s,
      min(CASE WHEN cum * 100 >= n * 95 THEN ms END) / 1000.0 AS p95_s,
      max(ms) / 1000.0 AS max_s
    FROM ranked
    GROUP BY grp
    ORDER BY grp = 'all', grp
"""

SINCE_VALUES = (
    "",
    "2024-03-01",
    "2024-03-02",
    "2024-03-02T13",
    "2024-03-02T13:14:15.123Z",
    "2024-03-03T00:00:00.000Z",
    "2024-03-02T",
    "2099-01-01",
    "zzz",
)


def canned(name: str) -> str:
    return str(load_metadata()["databases"]["callgate"]["queries"][name]["sql"])


def utc(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --------------------------------------------------------------------------- concurrency


def calls_db() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    conn.execute(tables.CALLS.create_sql())
    for sql in tables.CALLS.index_sql():
        conn.execute(sql)
    conn.execute(tables.HOURLY_CONCURRENCY.create_sql())
    return conn


def random_call(rng: random.Random, base: datetime) -> dict[str, Any]:
    """Starts on or near hour boundaries, ties, zero-length and multi-hour calls, calls
    that never ended and calls with no end at all."""
    start = base + timedelta(
        minutes=rng.choice([0, 0, 59, 60, 61, 120]) * rng.random() // 1,
        milliseconds=rng.choice([0, 0, 1, 999, rng.randrange(3_600_000)]),
    )
    start += timedelta(hours=rng.randrange(6))
    length = timedelta(
        milliseconds=rng.choice(
            [
                0,
                1,
                1000,
                rng.randrange(600_000),
                rng.randrange(4 * 3_600_000),
                3_600_000
                - (start.minute * 60_000 + start.second * 1000 + start.microsecond // 1000),
            ]
        )
    )
    last = start + length + timedelta(milliseconds=rng.choice([0, 0, 5000]))
    ended = None if rng.random() < 0.2 else start + length
    return {
        "voice_id": f"v{rng.randrange(10**9)}",
        "started_at": utc(start),
        "ended_at": utc(ended) if ended is not None else None,
        "last_event_at": utc(last) if rng.random() > 0.02 else None,
    }


def insert(conn: sqlite3.Connection, calls: list[dict[str, Any]]) -> None:
    conn.executemany(
        "INSERT INTO calls (voice_id, started_at, ended_at, last_event_at) "
        "VALUES (:voice_id, :started_at, :ended_at, :last_event_at)",
        calls,
    )


def concurrency(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
    return conn.execute(canned("peak_concurrency")).fetchall()


@pytest.mark.parametrize("seed", range(12))
def test_hourly_concurrency_equals_the_sweep(seed: int) -> None:
    rng = random.Random(seed)
    conn = calls_db()
    base = datetime(2024, 3, 1, 10, tzinfo=UTC)
    calls = [random_call(rng, base) for _ in range(rng.choice([1, 5, 40, 200]))]
    insert(conn, calls)
    summaries.rebuild_concurrency(conn)
    assert concurrency(conn) == conn.execute(OLD_PEAK_CONCURRENCY).fetchall()

    # Calls gain events the way the projector sees them: an earlier start, a later last
    # event, an end (possibly earlier than the last event). Only their hours are redone.
    for _round in range(4):
        changed = rng.sample(calls, k=max(1, len(calls) // 5))
        for call in changed:
            start = datetime.fromisoformat(call["started_at"])
            last = datetime.fromisoformat(call["last_event_at"] or call["started_at"])
            start -= timedelta(milliseconds=rng.choice([0, 0, 1, rng.randrange(7_200_000)]))
            last += timedelta(milliseconds=rng.choice([0, 1, rng.randrange(7_200_000)]))
            end = start + (last - start) * rng.random() if rng.random() < 0.7 else None
            call.update(
                started_at=utc(start),
                last_event_at=utc(last),
                ended_at=utc(end) if end is not None else None,
            )
            conn.execute("DELETE FROM calls WHERE voice_id = ?", (call["voice_id"],))
        fresh = [random_call(rng, base) for _ in range(rng.randrange(3))]
        calls += fresh
        insert(conn, changed + fresh)
        summaries.refresh_calls(conn, [c["voice_id"] for c in changed + fresh])
        assert concurrency(conn) == conn.execute(OLD_PEAK_CONCURRENCY).fetchall()


def test_hourly_rows_of_nothing() -> None:
    assert summaries.hourly_rows([], []) == []
    conn = calls_db()
    summaries.rebuild_concurrency(conn)
    summaries.refresh_calls(conn, ["no-such-call"])
    assert concurrency(conn) == [] == conn.execute(OLD_PEAK_CONCURRENCY).fetchall()


# --------------------------------------------------------------------------- lateness


def lateness_log(path: Path, seed: int = 3) -> sqlite3.Connection:
    """Corpus calls logged over three days with varied (sometimes negative) lateness."""
    conn = open_log(str(path))
    rng = random.Random(seed)
    received = datetime(2024, 3, 1, 22, tzinfo=UTC)
    pending = []
    for raw in synthetic_log(copies=30, seed=seed):
        received += timedelta(milliseconds=rng.randrange(400_000))
        pending.append(new_event(raw, received_at=utc(received), conn=conn))
        if len(pending) == 50:
            eventlog.append_batch(conn, pending)
            pending = []
    eventlog.append_batch(conn, pending)
    return conn


def lateness(conn: sqlite3.Connection, since: str) -> list[tuple[Any, ...]]:
    return conn.execute(canned("webhook_lateness"), {"since": since}).fetchall()


def old_lateness(conn: sqlite3.Connection, since: str) -> list[tuple[Any, ...]]:
    return conn.execute(OLD_WEBHOOK_LATENESS, {"since": since}).fetchall()


def test_webhook_lateness_equals_the_full_histogram_at_every_checkpoint(tmp_path: Path) -> None:
    conn = lateness_log(tmp_path / "late.db")
    head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    days = {r[0] for r in conn.execute("SELECT DISTINCT substr(received_at, 1, 10) FROM events")}
    assert len(days) >= 2
    summaries.reset_lateness(conn)
    for step in (0, head // 3, 2 * head // 3, head):  # nothing, part, all summarised
        summaries.refresh_lateness(conn, max_events=step - summaries.lateness_checkpoint(conn))
        assert summaries.lateness_checkpoint(conn) == step
        for since in SINCE_VALUES:
            assert lateness(conn, since) == old_lateness(conn, since), (step, since)
    total = conn.execute("SELECT sum(events) FROM lateness_histogram").fetchone()[0]
    assert total == head  # every event of this log has a timestamp of its own
    conn.close()


def test_the_projector_keeps_both_summaries_up_to_date(tmp_path: Path) -> None:
    conn = lateness_log(tmp_path / "inc.db", seed=5)
    projector.project_all(conn, batch=37)
    incremental = conn.execute("SELECT * FROM hourly_concurrency ORDER BY hour").fetchall()
    assert incremental == conn.execute(OLD_PEAK_CONCURRENCY).fetchall()
    assert incremental and max(row[1] for row in incremental) > 1
    assert summaries.lateness_checkpoint(conn) == projector.checkpoint(conn)
    for since in SINCE_VALUES:
        assert lateness(conn, since) == old_lateness(conn, since), since
    # A rebuild recomputes the concurrency from scratch and keeps the histogram.
    histogram = conn.execute("SELECT * FROM lateness_histogram ORDER BY 1, 2, 3").fetchall()
    projector.rebuild(conn)
    assert conn.execute("SELECT * FROM hourly_concurrency ORDER BY hour").fetchall() == incremental
    assert conn.execute("SELECT * FROM lateness_histogram ORDER BY 1, 2, 3").fetchall() == histogram
    conn.close()


# --------------------------------------------------------------------------- upgrades


def test_a_database_built_by_an_older_callgate_is_upgraded(tmp_path: Path) -> None:
    """No summary tables, old index definitions, a stale lateness checkpoint: whoever
    opens it first (Datasette here) brings it up to date, and the queries agree."""
    path = tmp_path / "old.db"
    conn = lateness_log(path, seed=7)
    projector.rebuild(conn)
    conn.execute("DROP TABLE hourly_concurrency")
    conn.execute("DROP TABLE lateness_histogram")  # its checkpoint row stays behind
    for name, _sql in tables.CALLS.index_definitions():
        if name not in (
            "calls_started_at",
            "calls_final_state",
            "calls_direction",
            "calls_broadcast_id",
        ):
            conn.execute(f'DROP INDEX "{name}"')
    conn.execute("DROP INDEX calls_direction")
    conn.execute('CREATE INDEX "calls_direction" ON "calls" ("direction", "started_at")')
    conn.execute("DROP INDEX plays_prompt_ref")
    conn.execute('CREATE INDEX "plays_prompt_ref" ON "plays" ("prompt_ref")')
    assert summaries.lateness_checkpoint(conn) > 0
    conn.close()

    prepare_database(path)

    conn = connect(str(path))
    stored = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
    for table in tables.ALL_TABLES:
        for name, sql in table.index_definitions():
            assert stored.get(name) == sql, name
    assert conn.execute("SELECT * FROM hourly_concurrency ORDER BY hour").fetchall() == (
        conn.execute(OLD_PEAK_CONCURRENCY).fetchall()
    )
    head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    assert summaries.lateness_checkpoint(conn) == head
    assert conn.execute("SELECT sum(events) FROM lateness_histogram").fetchone()[0] == head
    for since in SINCE_VALUES:
        assert lateness(conn, since) == old_lateness(conn, since), since
    conn.close()


def test_inside_a_transaction_the_histogram_is_filled_one_chunk_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The projector creates missing tables inside its write transaction: the lock must not
    be held for a whole log's worth of summarising; the query reads the rest live."""
    conn = lateness_log(tmp_path / "chunk.db", seed=9)
    conn.execute("DROP TABLE lateness_histogram")
    monkeypatch.setattr(summaries, "LATENESS_CHUNK", 100)
    projector.ensure_tables(conn)
    assert summaries.lateness_checkpoint(conn) == 100
    for since in SINCE_VALUES:
        assert lateness(conn, since) == old_lateness(conn, since), since
    conn.close()
