"""Forwarding: signed, retried, per-call ordered delivery of logged events to users' apps.

The log feeds an outbox: each subscription has a cursor over `events` (seq
order) and every event it wants becomes one `deliveries` row. Workers POST a
CloudEvents 1.0 envelope signed with Standard Webhooks headers; each try is a
`delivery_attempts` row. Per-call order is absolute: for one subscription, a
delivery is only attempted when no earlier delivery of the same call (voice
id, else broadcast id) is still pending, so a call's later events wait while
an earlier one is retrying, and other calls keep flowing.

Only the thread that runs the loop touches SQLite; the pool threads only do
HTTP. A delivery is claimed with a lease (`claimed_until`) so two forwarders
on one database never send the same delivery at once; a crashed forwarder's
lease simply expires (at-least-once, the receiver dedupes on `webhook-id`).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from standardwebhooks import Webhook

from gateway import eventlog
from gateway.subscriptions import (
    SecretStore,
    Subscription,
    SubscriptionError,
    disable_subscription,
    event_type,
    get_subscription,
    matches,
    now_text,
    secrets_path,
)

log = logging.getLogger("callgate.forwarder")

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
DEFAULT_SOURCE = "callgate/enablex"
RESPONSE_CAP = 2048
MAX_RETRY_AFTER = 24 * 3600.0
USER_AGENT = "callgate-forwarder/0.1"
PRIVATE_KEYS = frozenset({"app_id", "app", "app_label", "appId"})  # never leave callgate

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
    conn = eventlog.connect(db_path, synchronous="NORMAL")
    ensure_schema(conn)
    return conn


# --- configuration ------------------------------------------------------------------


def parse_schedule(text: str | Sequence[float]) -> tuple[float, ...]:
    """`0,5,5m,30m,2h` (seconds unless suffixed s/m/h) → seconds; must be non-empty, ≥ 0."""
    if not isinstance(text, str):
        values = tuple(float(v) for v in text)
    else:
        units = {"s": 1.0, "m": 60.0, "h": 3600.0}
        parsed = []
        for part in text.split(","):
            item = part.strip().lower()
            if not item:
                continue
            factor = units.get(item[-1], 0.0)
            number = item[:-1] if factor else item
            try:
                parsed.append(float(number) * (factor or 1.0))
            except ValueError:
                raise ValueError(f"bad retry schedule entry {part.strip()!r}") from None
        values = tuple(parsed)
    if not values or any(v < 0 or v != v for v in values):
        raise ValueError("a retry schedule needs at least one delay, none negative")
    return values


@dataclass(frozen=True)
class ForwardOptions:
    """Tunables; `from_env` reads the CALLGATE_* variables so `up` and `forward` agree."""

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    jitter: float = 0.2
    workers: int = 8
    timeout: float = 10.0
    poll_interval: float = 0.5
    source: str = DEFAULT_SOURCE
    secrets_db: str | None = None
    secrets_refresh: float = 2.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> ForwardOptions:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if env.get("CALLGATE_RETRY_SCHEDULE"):
            values["schedule"] = parse_schedule(env["CALLGATE_RETRY_SCHEDULE"])
        if env.get("CALLGATE_FORWARD_WORKERS"):
            values["workers"] = int(env["CALLGATE_FORWARD_WORKERS"])
        if env.get("CALLGATE_FORWARD_TIMEOUT"):
            values["timeout"] = float(env["CALLGATE_FORWARD_TIMEOUT"])
        if env.get("CALLGATE_FORWARD_SOURCE"):
            values["source"] = env["CALLGATE_FORWARD_SOURCE"]
        if env.get("CALLGATE_SECRETS_DB"):
            values["secrets_db"] = env["CALLGATE_SECRETS_DB"]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


@dataclass
class ForwardStats:
    """What one run did; printed by `callgate forward`, exported by `up`'s metrics."""

    enqueued: int = 0
    attempts: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    disabled: list[str] = field(default_factory=list)


# --- envelope and signing -----------------------------------------------------------


def message_id(subscription_id: str, event_id: str) -> str:
    """Deterministic webhook-id / CloudEvents id: a replay resends the same id."""
    digest = hashlib.sha256(f"{subscription_id}\n{event_id}".encode()).hexdigest()
    return "msg_" + digest[:32]


def order_key(voice_id: str | None, broadcast_id: str | None, event_id: str) -> str:
    """The unit of ordering: a call, else a broadcast, else the lone event itself."""
    if voice_id:
        return "voice:" + voice_id
    if broadcast_id:
        return "broadcast:" + broadcast_id
    return "event:" + event_id


def envelope(
    msg_id: str, event: Mapping[str, Any], seq: int, event_id: str, source: str = DEFAULT_SOURCE
) -> dict[str, Any]:
    """CloudEvents 1.0 structured form of one normalised event (never the app id)."""
    data = {k: v for k, v in event.items() if k not in PRIVATE_KEYS}
    result: dict[str, Any] = {
        "specversion": "1.0",
        "id": msg_id,
        "source": source,
        "type": event_type(event.get("class"), event.get("state")),
        "time": event.get("occurred_at"),
        "datacontenttype": "application/json",
        "callgateseq": seq,
        "callgateeventid": event_id,
        "data": data,
    }
    subject = event.get("voice_id") or event.get("broadcast_id")
    if subject:
        result["subject"] = subject
    return result


def envelope_body(doc: Mapping[str, Any]) -> str:
    """Canonical JSON text: identical bytes on every replay of the same event."""
    return eventlog.canonical_json(doc)


class Signer:
    """Standard Webhooks headers for a body, one signature per valid secret (rotation)."""

    def __init__(self) -> None:
        self._hooks: dict[str, Webhook] = {}

    def headers(
        self, msg_id: str, body: str, secrets: Sequence[str], at: datetime | None = None
    ) -> dict[str, str]:
        moment = (at or datetime.now(UTC)).astimezone(UTC)
        signatures = []
        for secret in secrets:
            hook = self._hooks.get(secret)
            if hook is None:
                hook = self._hooks[secret] = Webhook(secret)
            signatures.append(hook.sign(msg_id, moment, body))
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": " ".join(signatures),
        }


# --- the outbox ---------------------------------------------------------------------


def _later(seconds: float, base: datetime | None = None) -> str:
    return now_text((base or datetime.now(UTC)) + timedelta(seconds=seconds))


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
    conn.execute("BEGIN IMMEDIATE")
    try:
        cursor = conn.execute(
            "UPDATE deliveries SET next_attempt_at = ? WHERE status = 'pending' "
            "AND next_attempt_at IS NULL AND NOT EXISTS ("
            " SELECT 1 FROM deliveries p WHERE p.subscription_id = deliveries.subscription_id"
            " AND p.order_key = deliveries.order_key AND p.status = 'pending'"
            " AND p.seq < deliveries.seq)",
            (now_text(),),
        )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
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
    head = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
    for sub in subs:
        if sub.cursor_seq >= head:
            continue
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT cursor_seq, disabled_at FROM subscriptions WHERE id = ?", (sub.id,)
                ).fetchone()
                if row is None or row["disabled_at"]:
                    conn.execute("COMMIT")
                    break
                events = conn.execute(
                    "SELECT seq, event_id, voice_id, broadcast_id, class, state FROM events "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (row["cursor_seq"], batch),
                ).fetchall()
                if not events:
                    conn.execute("COMMIT")
                    break
                created = now_text()
                due = _later(schedule[0])
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
                added += max(cursor.rowcount, 0)
                conn.execute(
                    "UPDATE subscriptions SET cursor_seq = ? WHERE id = ?",
                    (events[-1]["seq"], sub.id),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            if len(events) < batch:
                break
    return added


# The head of each (subscription, call) queue: the only delivery of that call allowed to
# be attempted. Deliveries queued behind a pending one have no next_attempt_at (NULL: they
# are promoted when the head leaves `pending`), so this scan only meets heads; the first
# NOT EXISTS is the guarantee itself, whatever next_attempt_at says; the second keeps a
# call to one request in flight even when `redeliver` queued an older event behind a
# newer one that is being sent.
_HEADS = """
SELECT d.id, d.subscription_id, d.seq, d.event_id, d.order_key, d.attempts, d.retry_step,
       d.next_attempt_at, s.url, e.payload
FROM deliveries d
JOIN subscriptions s ON s.id = d.subscription_id AND s.disabled_at IS NULL
JOIN events e ON e.seq = d.seq
WHERE d.status = 'pending' AND d.next_attempt_at <= :now
  AND (d.claimed_until IS NULL OR d.claimed_until <= :now)
  AND NOT EXISTS (
      SELECT 1 FROM deliveries p
      WHERE p.subscription_id = d.subscription_id AND p.order_key = d.order_key
        AND p.status = 'pending' AND p.seq < d.seq)
  AND NOT EXISTS (
      SELECT 1 FROM deliveries q
      WHERE q.subscription_id = d.subscription_id AND q.order_key = d.order_key
        AND q.status = 'pending' AND q.seq > d.seq AND q.claimed_until > :now)
ORDER BY d.next_attempt_at, d.seq
LIMIT :limit
"""

_NEXT_DUE = """
SELECT min(max(d.next_attempt_at, coalesce(d.claimed_until, '')))
FROM deliveries d
JOIN subscriptions s ON s.id = d.subscription_id AND s.disabled_at IS NULL
WHERE d.status = 'pending' AND d.next_attempt_at IS NOT NULL
  AND NOT EXISTS (
      SELECT 1 FROM deliveries p
      WHERE p.subscription_id = d.subscription_id AND p.order_key = d.order_key
        AND p.status = 'pending' AND p.seq < d.seq)
"""


@dataclass(frozen=True)
class Claim:
    """One delivery leased to this forwarder, with everything a worker needs to send it."""

    delivery_id: str
    subscription_id: str
    seq: int
    event_id: str
    order_key: str
    attempt: int
    retry_step: int
    url: str
    body: str


@dataclass(frozen=True)
class AttemptResult:
    claim: Claim
    started_at: str
    duration_ms: int
    status_code: int | None
    response_body: str | None
    error: str | None
    retry_after: float | None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds (delta or HTTP date), capped at 24 h; None when absent/bad."""
    if not value:
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def make_client(options: ForwardOptions) -> httpx.Client:
    """One keep-alive client shared by the worker threads (httpx.Client is thread-safe)."""
    return httpx.Client(
        timeout=httpx.Timeout(options.timeout, connect=min(options.timeout, 5.0)),
        limits=httpx.Limits(
            max_connections=max(options.workers * 2, 4),
            max_keepalive_connections=max(options.workers, 2),
        ),
        follow_redirects=False,
        headers={"user-agent": USER_AGENT},
    )


class Forwarder:
    """The delivery loop over one database; use `forward_once` / `follow` unless embedding."""

    def __init__(
        self,
        db_path: str,
        options: ForwardOptions | None = None,
        client: httpx.Client | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or ForwardOptions.from_env()
        self.db_path = db_path
        self.conn = open_db(db_path)
        self.store = SecretStore(self.options.secrets_db or secrets_path(db_path))
        self._own_client = client is None
        self.client = client or make_client(self.options)
        self.pool = ThreadPoolExecutor(
            max_workers=max(self.options.workers, 1), thread_name_prefix="callgate-forward"
        )
        self.signer = Signer()
        self.rng = rng or random.Random()
        self.lease = self.options.timeout + 30.0
        self._secrets: dict[str, list[str]] = {}
        self._secrets_at = 0.0

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        if self._own_client:
            self.client.close()
        self.store.close()
        self.conn.close()

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- database side (loop thread only) --

    def enqueue(self) -> int:
        return enqueue(self.conn, self.options.schedule)

    def claim(self, limit: int) -> list[Claim]:
        """Lease up to `limit` due queue heads (at most one per call and subscription)."""
        if limit <= 0:
            return []
        now = now_text()
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            rows = self.conn.execute(_HEADS, {"now": now, "limit": limit}).fetchall()
            until = _later(self.lease)
            self.conn.executemany(
                "UPDATE deliveries SET claimed_until = ? WHERE id = ?",
                [(until, row["id"]) for row in rows],
            )
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
        claims = []
        for row in rows:
            doc = envelope(
                row["id"],
                json.loads(row["payload"]),
                row["seq"],
                row["event_id"],
                self.options.source,
            )
            claims.append(
                Claim(
                    delivery_id=row["id"],
                    subscription_id=row["subscription_id"],
                    seq=row["seq"],
                    event_id=row["event_id"],
                    order_key=row["order_key"],
                    attempt=row["attempts"] + 1,
                    retry_step=row["retry_step"],
                    url=row["url"],
                    body=envelope_body(doc),
                )
            )
        return claims

    def seconds_until_due(self) -> float | None:
        """How long until some queue head may be tried; None when nothing is pending."""
        row = self.conn.execute(_NEXT_DUE).fetchone()
        if row is None or row[0] is None:
            return None
        due = datetime.strptime(row[0], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        return max((due - datetime.now(UTC)).total_seconds(), 0.0)

    def secrets_for(self, subscription_id: str) -> list[str]:
        """Cached for a couple of seconds so a rotation reaches a running forwarder quickly."""
        if time.monotonic() - self._secrets_at > self.options.secrets_refresh:
            self._secrets = self.store.active_map()
            self._secrets_at = time.monotonic()
        return self._secrets.get(subscription_id, [])

    def record(self, results: Iterable[AttemptResult], stats: ForwardStats) -> None:
        """Write the attempts and move each delivery on: delivered, retry, dead or disabled."""
        schedule = self.options.schedule
        now_dt = datetime.now(UTC)
        now = now_text(now_dt)
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            for res in results:
                c = res.claim
                stats.attempts += 1
                code = res.status_code
                next_at: str | None = None
                if code is not None and 200 <= code < 300:
                    outcome = "delivered"
                elif code == 410:
                    outcome = "gone"
                else:
                    step = c.retry_step + 1
                    if step >= len(schedule):
                        outcome = "dead"
                    else:
                        outcome = "retry"
                        delay = schedule[step] * self.rng.uniform(
                            1 - self.options.jitter, 1 + self.options.jitter
                        )
                        if res.retry_after is not None:
                            delay = max(delay, res.retry_after)
                        next_at = _later(delay, now_dt)
                error = res.error
                if error is None and outcome != "delivered":
                    error = f"HTTP {code}"
                self.conn.execute(
                    "INSERT OR IGNORE INTO delivery_attempts (delivery_id, subscription_id, "
                    "attempt, started_at, duration_ms, status_code, response_body, error, "
                    "outcome, next_attempt_at) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        c.delivery_id,
                        c.subscription_id,
                        c.attempt,
                        res.started_at,
                        res.duration_ms,
                        code,
                        res.response_body,
                        res.error,
                        outcome,
                        next_at,
                    ),
                )
                common = (res.started_at, code, error)
                if outcome == "delivered":
                    stats.delivered += 1
                    self.conn.execute(
                        "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1, "
                        "claimed_until = NULL, last_attempt_at = ?, last_status = ?, "
                        "last_error = NULL, delivered_at = ? "
                        "WHERE id = ? AND status IN ('pending', 'cancelled')",
                        (res.started_at, code, now, c.delivery_id),
                    )
                    promote(self.conn, c.subscription_id, c.order_key, now)
                elif outcome == "gone":
                    self.conn.execute(
                        "UPDATE deliveries SET status = 'cancelled', attempts = attempts + 1, "
                        "claimed_until = NULL, last_attempt_at = ?, last_status = ?, "
                        "last_error = ? WHERE id = ?",
                        (*common, c.delivery_id),
                    )
                    reason = f"receiver answered 410 Gone at {res.started_at}"
                    disable_subscription(self.conn, c.subscription_id, reason, now)
                    if c.subscription_id not in stats.disabled:
                        stats.disabled.append(c.subscription_id)
                    log.warning("subscription %s disabled: %s", c.subscription_id, reason)
                elif outcome == "dead":
                    stats.dead += 1
                    self.conn.execute(
                        "UPDATE deliveries SET status = 'dead', attempts = attempts + 1, "
                        "retry_step = retry_step + 1, claimed_until = NULL, "
                        "last_attempt_at = ?, last_status = ?, last_error = ? "
                        "WHERE id = ? AND status = 'pending'",
                        (*common, c.delivery_id),
                    )
                    promote(self.conn, c.subscription_id, c.order_key, now)
                    log.warning(
                        "delivery %s dead after %d tries: %s", c.delivery_id, c.attempt, error
                    )
                else:
                    stats.retrying += 1
                    self.conn.execute(
                        "UPDATE deliveries SET attempts = attempts + 1, "
                        "retry_step = retry_step + 1, claimed_until = NULL, next_attempt_at = ?, "
                        "last_attempt_at = ?, last_status = ?, last_error = ? "
                        "WHERE id = ? AND status = 'pending'",
                        (next_at, *common, c.delivery_id),
                    )
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise

    # -- network side (pool threads) --

    def send(self, claim: Claim, secrets: Sequence[str]) -> AttemptResult:
        """One signed POST; never raises (every failure becomes an attempt row)."""
        started_at = now_text()
        t0 = time.perf_counter()
        if not secrets:
            return AttemptResult(claim, started_at, 0, None, None, "no signing secret", None)
        headers = self.signer.headers(claim.delivery_id, claim.body, secrets)
        headers["content-type"] = "application/cloudevents+json; charset=utf-8"
        code: int | None = None
        body_head: str | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            with self.client.stream(
                "POST", claim.url, content=claim.body.encode(), headers=headers
            ) as response:
                code = response.status_code
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                chunks = bytearray()
                for chunk in response.iter_bytes():
                    chunks.extend(chunk)
                    if len(chunks) >= RESPONSE_CAP:
                        break
                body_head = bytes(chunks[:RESPONSE_CAP]).decode("utf-8", "replace")
        except httpx.TimeoutException as exc:
            error = f"timeout: {type(exc).__name__}"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        except Exception as exc:  # noqa: BLE001 - a worker must report, not die
            error = f"{type(exc).__name__}: {exc}"[:500]
        duration = int(round((time.perf_counter() - t0) * 1000))
        return AttemptResult(claim, started_at, duration, code, body_head, error, retry_after)

    # -- the loop --

    def run(
        self,
        stop: threading.Event | None = None,
        follow: bool = False,
        drain: bool = False,
    ) -> ForwardStats:
        """Deliver until idle (`follow`: until `stop`; `drain`: also wait out pending retries).

        In-flight requests are always finished and recorded before returning,
        so a SIGTERM never leaves a sent-but-unrecorded delivery behind. When
        following, a database error (locked, disk full) is logged and retried:
        what could not be recorded is resent once its lease runs out.
        """
        stop = stop or threading.Event()
        stats = ForwardStats()
        inflight: dict[Future[AttemptResult], Claim] = {}
        poll = max(self.options.poll_interval, 0.01)
        last_enqueue = -float("inf")
        started = False
        try:
            while not stop.is_set():
                try:
                    if not started:
                        repair_waiting(self.conn)
                        started = True
                    since = time.monotonic() - last_enqueue  # inf before the first pass
                    if since == float("inf") or (follow and since >= poll):
                        stats.enqueued += self.enqueue()
                        last_enqueue = time.monotonic()
                    if not self._step(inflight, stats, stop, follow, drain, poll):
                        break
                except sqlite3.OperationalError as exc:
                    if not follow:
                        raise
                    log.warning("database error (%s); retrying in 1 s", exc)
                    stop.wait(1.0)
        finally:
            if inflight:
                self.record([f.result() for f in inflight], stats)
        return stats

    def _step(
        self,
        inflight: dict[Future[AttemptResult], Claim],
        stats: ForwardStats,
        stop: threading.Event,
        follow: bool,
        drain: bool,
        poll: float,
    ) -> bool:
        """Claim what is due, wait for some answers, record them; False when done for good."""
        for claim in self.claim(max(self.options.workers, 1) - len(inflight)):
            secrets = self.secrets_for(claim.subscription_id)
            inflight[self.pool.submit(self.send, claim, secrets)] = claim
        if inflight:
            done, _ = wait(list(inflight), timeout=poll, return_when=FIRST_COMPLETED)
            results = [f.result() for f in done]
            for f in done:
                del inflight[f]
            if results:
                self.record(results, stats)
            return True
        due = self.seconds_until_due()
        if not follow and (not drain or due is None):
            return False
        pause = poll if due is None else min(poll, due)
        stop.wait(max(pause, 0.02))
        return True


def forward_once(
    db_path: str, options: ForwardOptions | None = None, drain: bool = False
) -> ForwardStats:
    """Enqueue new events and deliver everything due now (`drain`: until nothing is pending)."""
    with Forwarder(db_path, options) as forwarder:
        return forwarder.run(drain=drain)


def follow(
    db_path: str, stop_event: threading.Event, options: ForwardOptions | None = None
) -> ForwardStats:
    """Forward continuously until `stop_event` is set; safe to run in a thread of `callgate up`."""
    with Forwarder(db_path, options) as forwarder:
        return forwarder.run(stop=stop_event, follow=True)


# --- redelivery ---------------------------------------------------------------------


@dataclass(frozen=True)
class Redelivery:
    """One (subscription, event) pair `redeliver` selected, and what it did or would do."""

    subscription_id: str
    seq: int
    event_id: str
    type: str
    voice_id: str | None
    occurred_at: str
    previous_status: str | None  # None: no delivery row existed
    action: str  # requeue | create | skip-pending | skip-not-yet-enqueued


def parse_time(value: str) -> str:
    """A `--since/--until` value (ISO 8601 date or time, naive = UTC) → stored-time text."""
    text = value.strip()
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise ValueError(f"not an ISO 8601 date or time: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return now_text(moment)


def redeliver(
    conn: sqlite3.Connection,
    *,
    event_ids: Sequence[str] = (),
    voice_ids: Sequence[str] = (),
    subscription_id: str | None = None,
    since: str | None = None,
    until: str | None = None,
    dead: bool = False,
    dry_run: bool = False,
) -> list[Redelivery]:
    """Queue events again (same webhook-id) for the matching live subscriptions.

    `dead` picks dead-lettered deliveries; otherwise the events matching the
    filters are resent to every live subscription whose patterns want them,
    including events logged before the subscription existed. Requeued
    deliveries restart the retry schedule and take their log place in the
    per-call order again. `since`/`until` bound the event time (inclusive, exclusive).
    """
    if not (event_ids or voice_ids or subscription_id or since or until or dead):
        raise SubscriptionError(
            "say what to redeliver: --event, --call, --subscription, --since/--until or --dead"
        )
    if subscription_id:
        sub = get_subscription(conn, subscription_id)
        if sub.disabled_at:
            raise SubscriptionError(
                f"subscription {subscription_id} is disabled ({sub.disabled_reason})"
            )
    where, params = ["1 = 1"], []
    if event_ids:
        clause, ids = eventlog.event_id_match(event_ids, table="e")
        where.append(clause)
        params += ids
    if voice_ids:
        marks = ",".join("?" * len(voice_ids))
        where.append(f"(e.voice_id IN ({marks}) OR e.broadcast_id IN ({marks}))")
        params += list(voice_ids) * 2
    if since:
        where.append("e.occurred_at >= ?")
        params.append(parse_time(since))
    if until:
        where.append("e.occurred_at < ?")
        params.append(parse_time(until))

    conn.execute("BEGIN IMMEDIATE")
    try:
        subs = {
            row["id"]: Subscription.from_row(row)
            for row in conn.execute("SELECT * FROM subscriptions WHERE disabled_at IS NULL")
            if subscription_id in (None, row["id"])
        }
        plan: list[Redelivery] = []
        if dead:
            rows = conn.execute(
                "SELECT d.subscription_id, d.status, e.seq, e.event_id, e.voice_id, "
                "e.class, e.state, e.occurred_at FROM deliveries d JOIN events e ON e.seq = d.seq "
                f"WHERE d.status = 'dead' AND {' AND '.join(where)} ORDER BY e.seq",
                params,
            ).fetchall()
            plan = [
                _planned(r, r["subscription_id"], r["status"], "requeue")
                for r in rows
                if r["subscription_id"] in subs
            ]
        else:
            existing = {
                (r["subscription_id"], r["event_id"]): r["status"]
                for r in conn.execute(
                    "SELECT d.subscription_id, d.event_id, d.status FROM deliveries d "
                    f"JOIN events e ON e.seq = d.seq WHERE {' AND '.join(where)}",
                    params,
                )
            }
            for r in conn.execute(
                "SELECT e.seq, e.event_id, e.voice_id, e.class, e.state, e.occurred_at "
                f"FROM events e WHERE {' AND '.join(where)} ORDER BY e.seq",
                params,
            ):
                for sub in subs.values():
                    if not matches(sub.patterns, r["class"], r["state"]):
                        continue
                    status = existing.get((sub.id, r["event_id"]))
                    if status == "pending":
                        action = "skip-pending"
                    elif status is not None:
                        action = "requeue"
                    elif r["seq"] <= sub.cursor_seq:
                        action = "create"
                    else:
                        action = "skip-not-yet-enqueued"
                    plan.append(_planned(r, sub.id, status, action))
        if not dry_run:
            _apply(conn, plan)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return plan


def _planned(row: sqlite3.Row, sub_id: str, status: str | None, action: str) -> Redelivery:
    return Redelivery(
        subscription_id=sub_id,
        seq=row["seq"],
        event_id=row["event_id"],
        type=event_type(row["class"], row["state"]),
        voice_id=row["voice_id"],
        occurred_at=row["occurred_at"],
        previous_status=status,
        action=action,
    )


def _apply(conn: sqlite3.Connection, plan: Sequence[Redelivery]) -> None:
    """Requeue/create rows as waiting, then make each touched call's earliest one due."""
    now = now_text()
    touched: set[tuple[str, str]] = set()
    for item in plan:
        msg_id = message_id(item.subscription_id, item.event_id)
        if item.action == "requeue":
            conn.execute(
                "UPDATE deliveries SET status = 'pending', retry_step = 0, "
                "next_attempt_at = NULL, claimed_until = NULL, "
                "redeliveries = redeliveries + 1 WHERE id = ?",
                (msg_id,),
            )
        elif item.action == "create":
            event = conn.execute(
                "SELECT broadcast_id FROM events WHERE seq = ?", (item.seq,)
            ).fetchone()
            conn.execute(
                "INSERT OR IGNORE INTO deliveries (id, subscription_id, seq, event_id, voice_id, "
                "order_key, type, created_at, redeliveries) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1)",
                (
                    msg_id,
                    item.subscription_id,
                    item.seq,
                    item.event_id,
                    item.voice_id,
                    order_key(item.voice_id, event["broadcast_id"], item.event_id),
                    item.type,
                    now,
                ),
            )
        else:
            continue
        row = conn.execute("SELECT order_key FROM deliveries WHERE id = ?", (msg_id,)).fetchone()
        touched.add((item.subscription_id, row["order_key"]))
    for subscription_id, key in sorted(touched):
        promote(conn, subscription_id, key, now)
