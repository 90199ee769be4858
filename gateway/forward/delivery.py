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
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx

from gateway.config import Config
from gateway.db import transaction, utc_now
from gateway.forward.envelope import DEFAULT_SOURCE, Signer, envelope, envelope_body
from gateway.forward.outbox import (
    DEFAULT_SCHEDULE,
    enqueue,
    later,
    open_db,
    promote,
    repair_waiting,
)
from gateway.forward.subscriptions import (
    SecretStore,
    disable_subscription,
    secrets_path,
)
from gateway.log import keystore, sealing
from gateway.wire.schemas import format_utc

log = logging.getLogger("callgate.forwarder")

RESPONSE_CAP = 2048
MAX_RETRY_AFTER = 24 * 3600.0
USER_AGENT = "callgate-forwarder/0.1"


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
    """Tunables; `from_config` takes the CALLGATE_* settings so every forwarder agrees."""

    schedule: tuple[float, ...] = DEFAULT_SCHEDULE
    jitter: float = 0.2
    workers: int = 8
    timeout: float = 10.0
    poll_interval: float = 0.5
    source: str = DEFAULT_SOURCE
    secrets_db: str | None = None
    secrets_refresh: float = 2.0

    @classmethod
    def from_config(cls, config: Config, **overrides: Any) -> ForwardOptions:
        """The configured tunables, then any non-None override (command-line options)."""
        values: dict[str, Any] = {
            "schedule": parse_schedule(config.retry_schedule) if config.retry_schedule else None,
            "workers": config.forward_workers,
            "timeout": config.forward_timeout,
            "source": config.forward_source,
            "secrets_db": config.secrets_db,
        }
        values.update(overrides)
        return cls(**{k: v for k, v in values.items() if v is not None})


@dataclass
class ForwardStats:
    """What one run did; printed by `callgate forward`."""

    enqueued: int = 0
    attempts: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    disabled: list[str] = field(default_factory=list)


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


@dataclass(frozen=True)
class Verdict:
    """What one attempt means for its delivery."""

    outcome: str  # delivered | gone | dead | retry
    error: str | None
    next_at: str | None = None


def judge(
    res: AttemptResult,
    options: ForwardOptions,
    uniform: Callable[[float, float], float],
    now: datetime,
) -> Verdict:
    """Pure: 2xx delivered, 410 gone (the subscription is disabled), otherwise the next
    step of the schedule with jitter (never sooner than Retry-After), or dead past its end."""
    code = res.status_code
    if code is not None and 200 <= code < 300:
        return Verdict("delivered", res.error)
    error = res.error if res.error is not None else f"HTTP {code}"
    if code == 410:
        return Verdict("gone", error)
    step = res.claim.retry_step + 1
    if step >= len(options.schedule):
        return Verdict("dead", error)
    delay = options.schedule[step] * uniform(1 - options.jitter, 1 + options.jitter)
    if res.retry_after is not None:
        delay = max(delay, res.retry_after)
    return Verdict("retry", error, later(delay, now))


class Forwarder:
    """The delivery loop over one database; use `forward_once` / `follow` unless embedding."""

    def __init__(
        self,
        db_path: str,
        options: ForwardOptions | None = None,
        client: httpx.Client | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.options = options or ForwardOptions.from_config(Config.from_env())
        self.db_path = db_path
        self.conn = open_db(db_path)
        # Personal values are sealed in the log; opened here, just before signing, and
        # null once `callgate erase` destroyed the call's key (redeliveries included).
        self.unseal = sealing.Opener(keystore.for_database(self.conn))
        self.store = SecretStore(secrets_path(db_path, self.options.secrets_db))
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
        now = utc_now()
        with transaction(self.conn):
            rows = self.conn.execute(_HEADS, {"now": now, "limit": limit}).fetchall()
            until = later(self.lease)
            self.conn.executemany(
                "UPDATE deliveries SET claimed_until = ? WHERE id = ?",
                [(until, row["id"]) for row in rows],
            )
        claims = []
        self.unseal.refresh()
        for row in rows:
            doc = envelope(
                row["id"],
                self.unseal.event(row["payload"]),
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
        now_dt = datetime.now(UTC)
        now = format_utc(now_dt)
        with transaction(self.conn):
            for res in results:
                stats.attempts += 1
                verdict = judge(res, self.options, self.rng.uniform, now_dt)
                self._write_attempt(res, verdict)
                self._move_on(res, verdict, now, stats)

    def _write_attempt(self, res: AttemptResult, verdict: Verdict) -> None:
        c = res.claim
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
                res.status_code,
                res.response_body,
                res.error,
                verdict.outcome,
                verdict.next_at,
            ),
        )

    def _move_on(self, res: AttemptResult, verdict: Verdict, now: str, stats: ForwardStats) -> None:
        """The delivery's new status; a finished one lets the call's next delivery go."""
        c = res.claim
        common = (res.started_at, res.status_code, verdict.error)
        if verdict.outcome == "delivered":
            stats.delivered += 1
            self.conn.execute(
                "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1, "
                "claimed_until = NULL, last_attempt_at = ?, last_status = ?, "
                "last_error = NULL, delivered_at = ? "
                "WHERE id = ? AND status IN ('pending', 'cancelled')",
                (res.started_at, res.status_code, now, c.delivery_id),
            )
            promote(self.conn, c.subscription_id, c.order_key, now)
        elif verdict.outcome == "gone":
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
        elif verdict.outcome == "dead":
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
                "delivery %s dead after %d tries: %s", c.delivery_id, c.attempt, verdict.error
            )
        else:
            stats.retrying += 1
            self.conn.execute(
                "UPDATE deliveries SET attempts = attempts + 1, "
                "retry_step = retry_step + 1, claimed_until = NULL, next_attempt_at = ?, "
                "last_attempt_at = ?, last_status = ?, last_error = ? "
                "WHERE id = ? AND status = 'pending'",
                (verdict.next_at, *common, c.delivery_id),
            )

    # -- network side (pool threads) --

    def send(self, claim: Claim, secrets: Sequence[str]) -> AttemptResult:
        """One signed POST; never raises (every failure becomes an attempt row)."""
        started_at = utc_now()
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
    """Forward continuously until `stop_event` is set (`callgate forward --follow`)."""
    with Forwarder(db_path, options) as forwarder:
        return forwarder.run(stop=stop_event, follow=True)
