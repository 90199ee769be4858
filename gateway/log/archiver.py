"""`callgate archive`: the JetStream stream, in stream order, into the SQLite log.

One durable pull consumer with explicit ack. Each batch is appended through
`eventlog.append_batch` (so hashing, the chain and whatever else the append path
does apply to archived events by construction) together with one row per
stream message in `archive_positions`, in one transaction; the messages are
acked only after that commit. So:

- the archive's own positions, not the consumer's ack floor, say where to resume:
  whoever takes the lock (a restart, a standby, a restored file) recreates the
  consumer at its highest archived sequence + 1, so messages a dead predecessor
  fetched but never acked come first again, in stream order;
- a crash before the commit leaves nothing half-done, and after it (acks lost)
  nothing is appended twice: the batch is checked against the positions inside
  the same transaction;
- a redelivered webhook outside JetStream's dedup window has a new stream
  sequence but the same content hash: the log's unique index keeps it once;
- a batch is appended only as far as the consumer's deliveries continue without a
  hole (`in_order`): a delivery lost in a reconnect comes back only after ack_wait, and
  must not be overtaken, or resuming after the highest position would skip it.

Only one archiver is active: the holder of key `archiver` in the KV bucket
`<stream>_locks`, whose entries expire `lock_ttl` seconds after their last write.
The holder rewrites it every ttl/4 (compare-and-set on its revision) and stops
committing once the lock is older than half the ttl; a standby retries
`create` and takes over when the holder stops renewing (crash, partition) or
deletes the key (clean stop).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, KeyValueConfig

from gateway.db import connect, transaction, utc_now
from gateway.log import eventlog, nats_log
from gateway.log.intake import to_new_event
from gateway.wire.ingest import Accepted
from gateway.wire.schemas import format_utc

log = logging.getLogger("callgate.archive")
CONSUMER = "callgate-archiver"
LOCK_KEY = "archiver"
BATCH = 256
ACK_WAIT_SECONDS = 60.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS archive_positions (
    stream TEXT NOT NULL,
    stream_seq INTEGER NOT NULL,
    subject TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_seq INTEGER,
    rejection_id INTEGER,
    archived_at TEXT NOT NULL,
    purged_at TEXT,
    PRIMARY KEY (stream, stream_seq)
);
CREATE INDEX IF NOT EXISTS archive_positions_unpurged
    ON archive_positions (subject) WHERE purged_at IS NULL;
"""


class ArchiveError(RuntimeError):
    """The archive cannot continue safely (stream gap, lock held); the text says why."""


def ensure_schema(conn: sqlite3.Connection) -> None:
    eventlog.ensure_schema(conn)
    conn.executescript(SCHEMA)


def position(conn: sqlite3.Connection, stream: str) -> int:
    """The highest stream sequence this archive holds (0 for none)."""
    row = conn.execute(
        "SELECT max(stream_seq) FROM archive_positions WHERE stream = ?", (stream,)
    ).fetchone()
    return int(row[0] or 0)


@dataclass
class Entry:
    """One stream message, decoded."""

    stream_seq: int
    subject: str
    kind: str
    body: dict[str, Any]
    msg: Any = field(repr=False, default=None)
    delivery: int = 0  # the consumer's sequence: its deliveries, counted from 1


_FIELDS = {
    "event": {"raw": str, "event": dict, "received_at": str, "app": str},
    "rejection": {
        "error": str,
        "detail": str,
        "http_status": int,
        "method": str,
        "path": str,
        "headers": dict,
        "body": str,
        "body_size": int,
        "received_at": str,
    },
}


def decode(msg: Any) -> Entry:
    """A stream message as an Entry; anything not in our format is `unreadable` (kept as
    a position, acked, never retried forever)."""
    seq, delivery = msg.metadata.sequence.stream, msg.metadata.sequence.consumer
    try:
        body = json.loads(msg.data)
    except ValueError:
        body = None
    kind = body.get("kind") if isinstance(body, dict) else None
    fields = _FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None or not all(isinstance(body.get(k), t) for k, t in fields.items()):
        return Entry(seq, msg.subject, "unreadable", {}, msg, delivery)
    return Entry(seq, msg.subject, kind, body, msg, delivery)


@dataclass
class Counts:
    events: int = 0
    duplicates: int = 0
    rejections: int = 0
    unreadable: int = 0
    skipped: int = 0
    purged_subjects: int = 0


def commit(conn: sqlite3.Connection, stream: str, entries: list[Entry], counts: Counts) -> None:
    """Append one batch and its positions in one transaction (BEGIN IMMEDIATE … COMMIT)."""
    now = utc_now()
    with transaction(conn):
        done = position(conn, stream)
        fresh = [e for e in entries if e.stream_seq > done]
        counts.skipped += len(entries) - len(fresh)
        events = [e for e in fresh if e.kind == "event"]
        items = []
        for entry in events:
            body = entry.body
            raw_obj = json.loads(body["raw"])
            accepted = Accepted(body["event"], body["raw"], raw_obj, body["app"])
            items.append(to_new_event(conn, accepted, body["received_at"]))
        results = dict(
            zip(
                (e.stream_seq for e in events),
                eventlog.append_batch(conn, items) if items else [],
                strict=True,
            )
        )
        rows = []
        for entry in fresh:
            event_seq = rejection_id = None
            kind = entry.kind
            if kind == "event":
                result = results[entry.stream_seq]
                event_seq = result.seq
                kind = "duplicate" if result.duplicate else "event"
                counts.duplicates += result.duplicate
                counts.events += not result.duplicate
            elif kind == "rejection":
                body = entry.body
                rejection_id = eventlog.record_rejection(
                    conn,
                    error=body["error"],
                    detail=body["detail"],
                    http_status=body["http_status"],
                    body=base64.b64decode(body["body"]),
                    body_size=body["body_size"],
                    headers=list(body["headers"].items()),
                    method=body["method"],
                    path=body["path"],
                    remote_addr=body["remote_addr"],
                    received_at=body["received_at"],
                )
                counts.rejections += 1
            else:
                counts.unreadable += 1
            rows.append(
                (stream, entry.stream_seq, entry.subject, kind, event_seq, rejection_id, now)
            )
        conn.executemany(
            "INSERT INTO archive_positions (stream, stream_seq, subject, kind, event_seq, "
            "rejection_id, archived_at) VALUES (?,?,?,?,?,?,?)",
            rows,
        )


def purgeable(conn: sqlite3.Connection, stream: str, before: str) -> list[tuple[str, int]]:
    """Subjects with archived, unpurged messages archived before `before`: (subject, max seq)."""
    return [
        (row[0], int(row[1]))
        for row in conn.execute(
            "SELECT subject, max(stream_seq) FROM archive_positions "
            "WHERE stream = ? AND purged_at IS NULL AND archived_at <= ? GROUP BY subject",
            (stream, before),
        )
    ]


def mark_purged(conn: sqlite3.Connection, stream: str, subject: str, upto: int) -> None:
    with transaction(conn):
        conn.execute(
            "UPDATE archive_positions SET purged_at = ? WHERE stream = ? AND subject = ? "
            "AND stream_seq <= ? AND purged_at IS NULL",
            (utc_now(), stream, subject, upto),
        )


@dataclass
class ArchiveOptions:
    db_path: str
    follow: bool = False
    lock_ttl: float = 5.0
    batch: int = BATCH
    # Seconds after archiving when a call's messages are purged from the stream
    # (None: never; the stream's max_age still bounds them).
    purge_after: float | None = 600.0
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    # How long to wait at start for the stream and the lock bucket to answer (a fresh or
    # busy cluster is still electing leaders) before giving up with an error.
    wait: float = 30.0


def in_order(last: int, delivered: int, batch: list[tuple[int, int]]) -> int:
    """How many of a fetched batch of (stream sequence, delivery) continue the archive
    without a hole.

    The consumer numbers its deliveries 1, 2, 3, … (a redelivery gets a new number): a
    number skipped is a delivery that never reached us, lost in a reconnect or a leader
    change, and held back until ack_wait. `delivered` is the number of the last message
    committed since the consumer was created (0 for none), `last` its stream sequence.
    Stream sequences only have to rise: the server passes over deleted messages itself.
    A step back is a redelivery behind newer messages."""
    usable = 0
    for seq, delivery in batch:
        if delivery != delivered + 1 or seq <= last:
            break
        usable, last, delivered = usable + 1, seq, delivery
    return usable


async def _unsubscribe(subscription: Any) -> None:
    """Drop a pull subscription before its consumer is recreated (best effort)."""
    if subscription is not None:
        with contextlib.suppress(*nats_log.ERRORS):
            await subscription.unsubscribe()


class Archiver:
    """Holds the lock, pulls, commits, acks; goes back to standby if the lock is lost."""

    def __init__(
        self,
        settings: nats_log.NatsSettings,
        options: ArchiveOptions,
        say: Callable[[str], None] = lambda text: None,
    ) -> None:
        self.settings = settings
        self.options = options
        self.say = say
        self.counts = Counts()
        self.stop = asyncio.Event()
        self.conn = connect(options.db_path)
        ensure_schema(self.conn)
        self._lock_good_until = 0.0
        self._lock_lost = asyncio.Event()
        self._revision = 0
        self._last = 0  # the newest stream sequence appended by this holder
        self._delivered = 0  # the consumer's delivery number of that message (0: none)

    async def run(self) -> Counts:
        nc = await nats_log.connect(self.settings, "callgate-archiver")
        try:
            js = nc.jetstream(timeout=5)
            await nats_log.ensure_stream_retrying(js, self.settings, self.options.wait)
            kv = await nats_log.retrying(lambda: self._lock_bucket(js), self.options.wait)
            while not self.stop.is_set():
                if not await self._acquire(kv):
                    break
                self.say(f"callgate archive: active ({self.options.holder})")
                done = asyncio.Event()
                renewer = asyncio.ensure_future(self._renew(kv, done))
                try:
                    await self._archive(js)
                finally:
                    # Let a renewal in flight finish rather than cancel it: the server
                    # may already have applied it, and the delete below needs the
                    # revision it returns (else the lock outlives a clean stop by a ttl).
                    done.set()
                    with contextlib.suppress(BaseException):
                        await asyncio.wait_for(renewer, self.options.lock_ttl)
                    if not self._lock_lost.is_set():
                        with contextlib.suppress(*nats_log.ERRORS):
                            await kv.delete(LOCK_KEY, last=self._revision)
                if not self.options.follow:
                    break
                if self._lock_lost.is_set():
                    self.say("callgate archive: lock lost; standing by")
        finally:
            with contextlib.suppress(*nats_log.ERRORS):
                await nc.close()
            self.conn.close()
        return self.counts

    async def _lock_bucket(self, js: Any) -> Any:
        bucket = f"{self.settings.stream}_locks"
        try:
            return await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(
                KeyValueConfig(
                    bucket=bucket,
                    history=1,
                    ttl=self.options.lock_ttl,
                    replicas=min(self.settings.replicas, 3),
                )
            )

    async def _acquire(self, kv: Any) -> bool:
        """Take the lock; standby (follow) retries until the holder's entry is gone."""
        waited = False
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                self._revision = await kv.create(LOCK_KEY, self.options.holder.encode())
                self._lock_good_until = sent + self.options.lock_ttl / 2
                self._lock_lost.clear()
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                if not self.options.follow:
                    raise ArchiveError(
                        "another archiver holds the lock; run this one with --follow to stand by"
                    ) from None
                if not waited:
                    self.say("callgate archive: another archiver is active; standing by")
                    waited = True
            except nats_log.ERRORS:
                pass  # no quorum or reconnecting: try again
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), self.options.lock_ttl / 4)
        return False

    async def _renew(self, kv: Any, done: asyncio.Event) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(done.wait(), self.options.lock_ttl / 4)
            if done.is_set():
                return
            sent = time.monotonic()
            try:
                self._revision = await kv.update(
                    LOCK_KEY, self.options.holder.encode(), last=self._revision
                )
                self._lock_good_until = sent + self.options.lock_ttl / 2
            except nats.js.errors.KeyWrongLastSequenceError:
                self._lock_lost.set()
                return
            except nats_log.ERRORS:
                if time.monotonic() > self._lock_good_until:
                    self._lock_lost.set()
                    return

    def _holding(self) -> bool:
        return not self._lock_lost.is_set() and time.monotonic() < self._lock_good_until

    async def _consumer(self, js: Any) -> Any:
        """The durable consumer, created afresh at this archive's own position."""
        stream = self.settings.stream
        done = position(self.conn, stream)
        info = await js.stream_info(stream)
        first, last = info.state.first_seq, info.state.last_seq
        if done < last and first > done + 1:
            raise ArchiveError(
                f"the stream no longer holds sequences {done + 1}..{first - 1}, which this "
                f"archive lacks (expired by max_age or purged by an archiver on another "
                "database); restore the archive from its backup, or archive into a new file"
            )
        # Always start over at this archive's own position: a predecessor's unacked
        # messages would otherwise come back only after ack_wait, behind newer ones, and
        # the archive must append in stream order.
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_consumer(stream, CONSUMER)
        start = (
            {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": done + 1}
            if done
            else {"deliver_policy": DeliverPolicy.ALL}
        )
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT_SECONDS,
                max_ack_pending=self.options.batch * 4,
                **start,
            ),
        )
        self._last = done
        self._delivered = 0
        return await js.pull_subscribe_bind(CONSUMER, stream=stream)

    async def _archive(self, js: Any) -> None:
        stream = self.settings.stream
        subscription = None
        last_purge = 0.0
        while not self.stop.is_set() and self._holding():
            try:
                if subscription is None:
                    subscription = await self._consumer(js)
                messages = await subscription.fetch(
                    self.options.batch, timeout=1.0 if self.options.follow else 0.2
                )
            except nats.errors.TimeoutError:
                messages = []
            except nats_log.ERRORS as exc:
                if isinstance(exc, nats.js.errors.NotFoundError):
                    subscription = None
                log.debug("fetch failed: %s", type(exc).__name__)
                await asyncio.sleep(0.2)
                continue
            if messages:
                entries = [decode(m) for m in messages]
                seqs = [entry.stream_seq for entry in entries]
                batch = [(entry.stream_seq, entry.delivery) for entry in entries]
                usable = in_order(self._last, self._delivered, batch)
                if usable < len(seqs):
                    # A lost delivery (held back until ack_wait) or a redelivery behind
                    # newer messages. Appending past it would leave it out of the archive
                    # for good (resuming starts after the highest position), so commit
                    # what continues the archive, then start over after it.
                    log.warning("delivery out of order at %s; resetting the consumer",
                                seqs[usable])
                    await _unsubscribe(subscription)
                    subscription = None
                    entries = entries[:usable]
                    if not entries:
                        continue
                    seqs = seqs[:usable]
                if not self._holding():
                    break  # another archiver may be active now: commit nothing
                try:
                    await asyncio.to_thread(commit, self.conn, stream, entries, self.counts)
                except sqlite3.Error as exc:
                    # Nothing committed, nothing acked: start over at the archive's position.
                    self.say(f"callgate archive: the archive could not commit ({exc}); retrying")
                    await _unsubscribe(subscription)
                    subscription = None
                    await asyncio.sleep(0.5)
                    continue
                self._last = seqs[-1]
                self._delivered = entries[-1].delivery
                for entry in entries:
                    with contextlib.suppress(*nats_log.ERRORS):
                        await entry.msg.ack()
            now = time.monotonic()
            if self.options.purge_after is not None and now - last_purge > 1.0:
                last_purge = now
                await self._purge(js)
            if not messages and not self.options.follow and await self._caught_up(js):
                if self.options.purge_after is not None:
                    await self._purge(js)
                return

    async def _caught_up(self, js: Any) -> bool:
        try:
            info = await js.consumer_info(self.settings.stream, CONSUMER)
        except nats_log.ERRORS:
            return False
        return not info.num_pending and not info.num_ack_pending

    async def _purge(self, js: Any) -> None:
        """Drop archived messages from the stream, per subject, up to what is archived."""
        assert self.options.purge_after is not None
        before = format_utc(datetime.now(UTC) - timedelta(seconds=self.options.purge_after))
        for subject, upto in purgeable(self.conn, self.settings.stream, before):
            try:
                await js.purge_stream(self.settings.stream, subject=subject, seq=upto + 1)
            except nats_log.ERRORS:
                return  # try again on the next pass
            mark_purged(self.conn, self.settings.stream, subject, upto)
            self.counts.purged_subjects += 1
