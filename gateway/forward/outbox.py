"""The outbox: forwarding tables, and the cursor that turns new log events into deliveries.

Each subscription has a cursor over `events` (seq order); every event it wants becomes one
`deliveries` row. A call's deliveries wait behind its earliest pending one, so per-call order
holds while other calls keep flowing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from gateway.db import connect, log_head_seq, transaction, utc_now
from gateway.forward.envelope import message_id, order_key
from gateway.forward.subscriptions import (
    Subscription,
    event_type,
    matches,
)
from gateway.log import eventlog
from gateway.wire.schemas import format_utc

# Standard Webhooks' recommended schedule: immediately, 5 s, 5 min, 30 min, 2 h, 5 h, 10 h,
# 14 h, 20 h, 24 h. Entry i is the wait before try i+1; after the last try → dead.
DEFAULT_SCHEDULE: tuple[float, ...] = (
    0,
    5,
    5 * 60,
    30 * 60,
    2 * 3600,
    5 * 3600,
    10 * 3600,
    14 * 3600,
    20 * 3600,
    24 * 3600,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS subscriptions (
    id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    events TEXT NOT NULL DEFAULT '["*"]',
    created_at TEXT NOT NULL,
    disabled_at TEXT,
    disabled_reason TEXT,
    cursor_seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS deliveries (
    id TEXT PRIMARY KEY,
    subscription_id TEXT NOT NULL REFERENCES subscriptions(id),
    seq INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    voice_id TEXT,
    order_key TEXT NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'delivered', 'dead', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    retry_step INTEGER NOT NULL DEFAULT 0,
    created_at TEXT NOT NULL,
    next_attempt_at TEXT,
    claimed_until TEXT,
    last_attempt_at TEXT,
    delivered_at TEXT,
    last_status INTEGER,
    last_error TEXT,
    redeliveries INTEGER NOT NULL DEFAULT 0,
    UNIQUE (subscription_id, event_id)
);
CREATE INDEX IF NOT EXISTS deliveries_pending_order
    ON deliveries(subscription_id, order_key, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_pending_due
    ON deliveries(next_attempt_at, seq) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_subscription_status
    ON deliveries(subscription_id, status);
CREATE INDEX IF NOT EXISTS deliveries_voice ON deliveries(voice_id);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries(event_id);
CREATE INDEX IF NOT EXISTS deliveries_seq ON deliveries(seq);
CREATE TABLE IF NOT EXISTS delivery_attempts (
    id INTEGER PRIMARY KEY,
    delivery_id TEXT NOT NULL REFERENCES deliveries(id),
    subscription_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    duration_ms INTEGER,
    status_code INTEGER,
    response_body TEXT,
    error TEXT,
    outcome TEXT NOT NULL,
    next_attempt_at TEXT,
    UNIQUE (delivery_id, attempt)
);
CREATE INDEX IF NOT EXISTS delivery_attempts_subscription
    ON delivery_attempts(subscription_id, started_at);
CREATE VIEW IF NOT EXISTS subscription_health AS
SELECT
    s.id, s.url, s.events, s.created_at, s.disabled_at, s.disabled_reason, s.cursor_seq,
    (SELECT count(*) FROM deliveries d
        WHERE d.subscription_id = s.id AND d.status = 'pending') AS pending,
    (SELECT count(*) FROM deliveries d
        WHERE d.subscription_id = s.id AND d.status = 'delivered') AS delivered,
    (SELECT count(*) FROM deliveries d
        WHERE d.subscription_id = s.id AND d.status = 'dead') AS dead,
    (SELECT count(*) FROM deliveries d
        WHERE d.subscription_id = s.id AND d.status = 'cancelled') AS cancelled,
    (SELECT max(a.started_at) FROM delivery_attempts a
        WHERE a.subscription_id = s.id AND a.outcome = 'delivered') AS last_success_at,
    (SELECT max(a.started_at) FROM delivery_attempts a
        WHERE a.subscription_id = s.id AND a.outcome != 'delivered') AS last_failure_at,
    (SELECT coalesce(a.error, 'HTTP ' || a.status_code) FROM delivery_attempts a
        WHERE a.subscription_id = s.id AND a.outcome != 'delivered'
        ORDER BY a.started_at DESC, a.id DESC LIMIT 1) AS last_failure
FROM subscriptions s;
"""


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the forwarding tables and the health view (idempotent; the log is the lead's)."""
    eventlog.ensure_schema(conn)
    conn.executescript(SCHEMA)


def open_db(db_path: str) -> sqlite3.Connection:
    """The forwarder's connection: NORMAL sync, since a lost status only means a resend."""
    conn = connect(db_path, synchronous="NORMAL")
    ensure_schema(conn)
    return conn


def later(seconds: float, base: datetime | None = None) -> str:
    return format_utc((base or datetime.now(UTC)) + timedelta(seconds=seconds))


def _queue_busy(conn: sqlite3.Connection, subscription_id: str, key: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM deliveries WHERE subscription_id = ? AND order_key = ? "
        "AND status = 'pending' LIMIT 1",
        (subscription_id, key),
    ).fetchone()
    return row is not None


def promote(conn: sqlite3.Connection, subscription_id: str, key: str, at: str) -> None:
    """Make the earliest pending delivery of a call due, if it was waiting behind another."""
    conn.execute(
        "UPDATE deliveries SET next_attempt_at = ? WHERE id = ("
        " SELECT id FROM deliveries WHERE subscription_id = ? AND order_key = ?"
        " AND status = 'pending' ORDER BY seq LIMIT 1) AND next_attempt_at IS NULL",
        (at, subscription_id, key),
    )


def repair_waiting(conn: sqlite3.Connection) -> int:
    """Safety net at start-up: a waiting delivery with nothing ahead of it becomes due."""
    with transaction(conn):
        cursor = conn.execute(
            "UPDATE deliveries SET next_attempt_at = ? WHERE status = 'pending' "
            "AND next_attempt_at IS NULL AND NOT EXISTS ("
            " SELECT 1 FROM deliveries p WHERE p.subscription_id = deliveries.subscription_id"
            " AND p.order_key = deliveries.order_key AND p.status = 'pending'"
            " AND p.seq < deliveries.seq)",
            (utc_now(),),
        )
    return cursor.rowcount


def enqueue(
    conn: sqlite3.Connection, schedule: Sequence[float] = DEFAULT_SCHEDULE, batch: int = 2000
) -> int:
    """Advance every live subscription's cursor, adding one delivery per wanted event.

    Each batch is one transaction (rows + cursor together), so a crash never
    skips or doubles an event; `INSERT OR IGNORE` makes a concurrent forwarder harmless.
    """
    added = 0
    subs = [
        Subscription.from_row(row)
        for row in conn.execute("SELECT * FROM subscriptions WHERE disabled_at IS NULL")
    ]
    head = log_head_seq(conn)
    for sub in subs:
        if sub.cursor_seq >= head:
            continue
        while True:
            with transaction(conn):
                added_now, read = _enqueue_batch(conn, sub, schedule[0], batch)
            added += added_now
            if read < batch:
                break
    return added


def _enqueue_batch(
    conn: sqlite3.Connection, sub: Subscription, first_delay: float, batch: int
) -> tuple[int, int]:
    """One batch past the subscription's cursor (inside the caller's transaction):
    (deliveries added, events read). Reads nothing once the subscription is disabled."""
    row = conn.execute(
        "SELECT cursor_seq, disabled_at FROM subscriptions WHERE id = ?", (sub.id,)
    ).fetchone()
    if row is None or row["disabled_at"]:
        return 0, 0
    events = conn.execute(
        "SELECT seq, event_id, voice_id, broadcast_id, class, state FROM events "
        "WHERE seq > ? ORDER BY seq LIMIT ?",
        (row["cursor_seq"], batch),
    ).fetchall()
    if not events:
        return 0, 0
    created = utc_now()
    due = later(first_delay)
    busy: dict[str, bool] = {}  # queue → already has a pending delivery
    rows = []
    for e in events:
        if not matches(sub.patterns, e["class"], e["state"]):
            continue
        key = order_key(e["voice_id"], e["broadcast_id"], e["event_id"])
        if key not in busy:
            busy[key] = _queue_busy(conn, sub.id, key)
        rows.append(
            (
                message_id(sub.id, e["event_id"]),
                sub.id,
                e["seq"],
                e["event_id"],
                e["voice_id"],
                key,
                event_type(e["class"], e["state"]),
                created,
                None if busy[key] else due,  # NULL: waits behind its call's head
            )
        )
        busy[key] = True
    cursor = conn.executemany(
        "INSERT OR IGNORE INTO deliveries (id, subscription_id, seq, event_id, "
        "voice_id, order_key, type, created_at, next_attempt_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        rows,
    )
    conn.execute(
        "UPDATE subscriptions SET cursor_seq = ? WHERE id = ?", (events[-1]["seq"], sub.id)
    )
    return max(cursor.rowcount, 0), len(events)


# The head of each (subscription, call) queue: the only delivery of that call allowed to
# be attempted. Deliveries queued behind a pending one have no next_attempt_at (NULL: they
# are promoted when the head leaves `pending`), so this scan only meets heads; the first
# NOT EXISTS is the guarantee itself, whatever next_attempt_at says; the second keeps a
# call to one request in flight even when `redeliver` queued an older event behind a
# newer one that is being sent.
