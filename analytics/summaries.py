"""Summary tables for the two canned queries that no index can make fast.

`peak_concurrency` is a sweep over every call start and end (about 232,000 points for
100,000 calls: half a second of window functions in SQLite) and `webhook_lateness` a
histogram over every event of the log (a million rows). Both are kept here, exact:

- `hourly_concurrency`: per UTC hour, the most calls active at one moment and the calls
  that started. It is derived from `calls` only: recomputed in full when a rebuild swaps
  new projections in, and for the hours a projector batch touched (`refresh_calls`).
- `lateness_histogram`: events per received day, class and lateness in milliseconds. The
  log is append-only, so the histogram only grows: its own row in `checkpoints` says how
  far it has got, and the canned query adds the newer events from the log itself.

The definitions are those of the canned queries they replace (metadata.yml documents
them); tests/test_datasette_summaries.py checks incremental upkeep against a recompute.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta

from gateway.db import log_head_seq, transaction

CONCURRENCY = "hourly_concurrency"
LATENESS = "lateness_histogram"
LATENESS_CHECKPOINT = LATENESS  # its row in `checkpoints`
LATENESS_CHUNK = 100_000  # events summarised per transaction
# Per projector batch: enough to stay ahead of ingest, little enough not to hold the write
# lock for long while an old log is being caught up (the query reads the rest live).
LATENESS_PER_BATCH = 20_000

# received_at - occurred_at in ms, as the canned query always computed it.
LATENESS_MS = (
    'CAST(round((julianday("received_at") - julianday("occurred_at")) * 86400000.0) AS INTEGER)'
)
# Events whose event time is their receive time (no timestamp of their own) are left out.
HAS_OWN_TIME = (
    '("occurred_at" != "received_at" OR '
    "coalesce(json_extract(\"payload\", '$.time_source'), '') != 'received')"
)

_SUMMARISE_LATENESS = f"""
INSERT INTO "{LATENESS}" (received_day, class, ms, events, first_seq, last_seq)
SELECT substr(received_at, 1, 10), class, {LATENESS_MS}, count(*), min(seq), max(seq)
FROM events
WHERE seq > ? AND seq <= ? AND {HAS_OWN_TIME}
GROUP BY 1, 2, 3
ON CONFLICT (class, ms, received_day) DO UPDATE SET
  events = events + excluded.events,
  first_seq = min(first_seq, excluded.first_seq),
  last_seq = max(last_seq, excluded.last_seq)
"""
_SET_CHECKPOINT = (
    "INSERT INTO checkpoints (name, seq, updated_at) "
    "VALUES (?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')) "
    "ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at"
)


# --------------------------------------------------------------------------- lateness


def lateness_checkpoint(conn: sqlite3.Connection) -> int:
    """Highest events.seq summarised in lateness_histogram (0 before the first run)."""
    row = conn.execute(
        "SELECT seq FROM checkpoints WHERE name = ?", (LATENESS_CHECKPOINT,)
    ).fetchone()
    return int(row[0]) if row else 0


def refresh_lateness(conn: sqlite3.Connection, max_events: int | None = None) -> int:
    """Summarise the events logged since the last run, LATENESS_CHUNK at a time (each chunk
    and its checkpoint in one transaction), at most `max_events`. Returns the checkpoint."""
    budget = max_events
    while True:
        with transaction(conn):
            done = lateness_checkpoint(conn)
            head = log_head_seq(conn)
            step = LATENESS_CHUNK if budget is None else min(LATENESS_CHUNK, budget)
            upto = min(head, done + step)
            if upto <= done:
                return done
            conn.execute(_SUMMARISE_LATENESS, (done, upto))
            conn.execute(_SET_CHECKPOINT, (LATENESS_CHECKPOINT, upto))
        if budget is not None:
            budget -= upto - done


def reset_lateness(conn: sqlite3.Connection) -> None:
    """Start the histogram over (a new table must not trust an old checkpoint)."""
    conn.execute(f'DELETE FROM "{LATENESS}"')
    conn.execute("DELETE FROM checkpoints WHERE name = ?", (LATENESS_CHECKPOINT,))


# --------------------------------------------------------------------------- concurrency

_ALL_CALLS = (
    "SELECT started_at, coalesce(ended_at, last_event_at) FROM calls WHERE started_at IS NOT NULL"
)
# Calls active at some moment of [?, ?), found through the calls_active_until index (the
# unary + keeps SQLite from walking calls_started_at over the whole history instead).
_ACTIVE_IN = (
    "SELECT started_at, coalesce(ended_at, last_event_at) FROM calls "
    "WHERE coalesce(ended_at, last_event_at) > ? AND +started_at < ?"
)
_STARTED_IN = "SELECT started_at FROM calls WHERE started_at >= ? AND started_at < ?"
_INSERT_HOUR = (
    f'INSERT INTO "{CONCURRENCY}" (hour, peak_concurrent_calls, calls_started) VALUES (?, ?, ?)'
)


def _next_hour(key: str) -> str:
    """'YYYY-MM-DDTHH' of the following hour."""
    return (datetime.strptime(key, "%Y-%m-%dT%H") + timedelta(hours=1)).strftime("%Y-%m-%dT%H")


def _hour_before(moment: str) -> str:
    """Hour of the instant 1 ms before `moment`: where an excluded end still counts."""
    parsed = datetime.fromisoformat(moment.replace("Z", "+00:00")) - timedelta(milliseconds=1)
    return parsed.strftime("%Y-%m-%dT%H")


def hourly_rows(
    spans: Iterable[tuple[str, str | None]],
    starts: Iterable[str],
    window: tuple[str, str] | None = None,
) -> list[tuple[str, int, int]]:
    """(hour, peak concurrent calls, calls started) per hour, as peak_concurrency defines
    them: a call is active from its start until its end, end excluded; an hour is listed
    when a call started in it or at least one call was active in it.

    `spans` are (started_at, end) of calls (end = ended_at, else last_event_at; a call whose
    end is not after its start is never active). With `window` = (first, last) hour keys
    ('YYYY-MM-DDTHH'), only those hours are returned, and `spans` need only hold the calls
    active at some moment of them: no other call changes how many are active in there.
    """
    deltas: dict[str, int] = {}
    get = deltas.get
    for start, end in spans:
        if end is None or end <= start:
            continue
        deltas[start] = get(start, 0) + 1
        deltas[end] = get(end, 0) - 1
    peaks: dict[str, int] = {}
    times = sorted(deltas)
    level = 0
    for moment, after in zip(times, times[1:], strict=False):  # the last is an end: level 0
        level += deltas[moment]
        if level <= 0:
            continue
        # The level holds from this moment until the next one.
        key = moment[:13]
        if peaks.get(key, 0) < level:
            peaks[key] = level
        if after.startswith(key):
            continue
        last = _hour_before(after)
        while key < last:  # the level lasts into later hours
            key = _next_hour(key)
            if peaks.get(key, 0) < level:
                peaks[key] = level
    started = Counter(start[:13] for start in starts)
    keys = set(peaks) | set(started)
    if window is not None:
        keys = {k for k in keys if window[0] <= k <= window[1]}
    return [(k + ":00:00Z", peaks.get(k, 0), started.get(k, 0)) for k in sorted(keys)]


def rebuild_concurrency(conn: sqlite3.Connection) -> None:
    """Recompute hourly_concurrency from every call (after a rebuild swapped calls in)."""
    with transaction(conn):
        spans = conn.execute(_ALL_CALLS).fetchall()
        rows = hourly_rows(spans, (start for start, _ in spans))
        conn.execute(f'DELETE FROM "{CONCURRENCY}"')
        conn.executemany(_INSERT_HOUR, rows)


def refresh_calls(conn: sqlite3.Connection, voice_ids: Iterable[str]) -> None:
    """Recompute the hours of calls whose rows were just replaced.

    A call's old and new spans both lie between its new started_at and last_event_at:
    more events can only move its start earlier and its last event later, and its end
    is one of its event times. So those hours are all that can have changed.
    """
    ids = list(voice_ids)
    if not ids:
        return
    with transaction(conn):
        first = last = None
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ", ".join("?" for _ in chunk)
            row = conn.execute(
                "SELECT min(started_at), max(max(coalesce(last_event_at, started_at), "
                f"coalesce(ended_at, started_at))) FROM calls WHERE voice_id IN ({marks}) "
                "AND started_at IS NOT NULL",
                chunk,
            ).fetchone()
            if row[0] is None:
                continue
            first = row[0] if first is None else min(first, row[0])
            last = row[1] if last is None else max(last, row[1])
        if first is None or last is None:
            return
        window = (first[:13], last[:13])
        lo = window[0] + ":00:00.000Z"
        hi = _next_hour(window[1]) + ":00:00.000Z"
        spans = conn.execute(_ACTIVE_IN, (lo, hi)).fetchall()
        starts = [row[0] for row in conn.execute(_STARTED_IN, (lo, hi))]
        conn.execute(
            f'DELETE FROM "{CONCURRENCY}" WHERE hour >= ? AND hour <= ?',
            (window[0] + ":00:00Z", window[1] + ":00:00Z"),
        )
        conn.executemany(_INSERT_HOUR, hourly_rows(spans, starts, window))
