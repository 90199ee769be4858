"""Store a verdict: an accepted request becomes an event, a refused one a rejection.

Shared by the HTTP app, `callgate ingest` and `callgate reprocess`, so nothing
is ever dropped whichever door a request came in by.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any

from gateway.config import Config
from gateway.db import utc_now
from gateway.log import eventlog, keystore, sealing
from gateway.log.writer import BatchWriter
from gateway.wire import schemas
from gateway.wire.ingest import REFUSED_UNREAD, Accepted, Headers, Rejected, interpret

# Refused before the body was interpreted (REFUSED_UNREAD, gateway/wire/ingest.py):
# `reprocess` never re-interprets them, that would turn anything anyone can send to the
# port into an event. They keep their metadata and only the start of the body.
UNREAD_BODY_CAP = 1024


def refine_leg(conn: sqlite3.Connection, event: dict[str, Any]) -> dict[str, Any]:
    """A `failed`/`initiated` after the call connected is a bridge leg (WIRE.md §4.7.6).

    Decided here against what the log already holds; the projection re-derives it
    from event order anyway, so an out-of-order arrival cannot make state wrong.
    """
    if event["class"] != "call" or event.get("raw_state") not in schemas.LEG_STATES:
        return event
    voice_id = event.get("voice_id")
    if voice_id and eventlog.connected_before(conn, voice_id, event["occurred_at"]):
        return {**event, "class": "bridge"}
    return event


def to_new_event(
    conn: sqlite3.Connection, accepted: Accepted, received_at: str
) -> eventlog.NewEvent:
    return eventlog.NewEvent(
        event=refine_leg(conn, accepted.event),
        raw_text=accepted.raw_text,
        raw_obj=accepted.raw_obj,
        app_label=accepted.app_label,
        received_at=received_at,
    )


@dataclass(frozen=True)
class Outcome:
    """The result of ingesting one request: what to answer and what was stored."""

    status: int
    body: dict[str, Any]
    seq: int | None = None
    duplicate: bool = False
    error: str | None = None
    event_class: str | None = None
    rejection_id: int | None = None


def accepted_body(result: eventlog.AppendResult) -> dict[str, Any]:
    return {
        "status": "accepted",
        "seq": result.seq,
        "event_id": result.event_id,
        "duplicate": result.duplicate,
    }


def ingest_request(
    conn: sqlite3.Connection,
    config: Config,
    headers: Headers,
    body: bytes,
    *,
    method: str = "POST",
    path: str = "/webhooks/enablex",
    remote_addr: str | None = None,
    writer: BatchWriter | None = None,
) -> Outcome:
    """Interpret, then append (event) or record (rejection); nothing is ever dropped.

    With a writer, the append joins the current group commit; either way this
    returns only after the event's transaction committed.
    """
    received_at = utc_now()
    verdict = interpret(headers, body, config, received_at)
    if isinstance(verdict, Accepted):
        accepted = verdict
        if writer is not None:
            result = writer.submit(lambda c: to_new_event(c, accepted, received_at))
        else:
            result = eventlog.append(conn, to_new_event(conn, accepted, received_at))
        return Outcome(
            200,
            accepted_body(result),
            seq=result.seq,
            duplicate=result.duplicate,
            event_class=verdict.event["class"],
        )
    return reject(conn, verdict, headers, body, method, path, remote_addr, received_at)


def rejection_fields(
    verdict: Rejected,
    headers: Headers,
    body: bytes,
    method: str,
    path: str,
    remote_addr: str | None,
    received_at: str | None,
) -> dict[str, Any]:
    """What a refused request is kept with, in the rejections table or (NATS mode) the stream.
    A request refused before interpretation (token, method) keeps only a short body: it is
    never re-processed, so more of it would only be stored attacker input."""
    kept = body[:UNREAD_BODY_CAP] if verdict.code in REFUSED_UNREAD else body
    return {
        "error": verdict.code,
        "detail": verdict.detail,
        "http_status": verdict.status,
        "body": kept,
        "body_size": len(body),
        "headers": headers.pairs,
        "method": method,
        "path": path,
        "remote_addr": remote_addr,
        "received_at": received_at,
    }


def reject(
    conn: sqlite3.Connection,
    verdict: Rejected,
    headers: Headers,
    body: bytes,
    method: str,
    path: str,
    remote_addr: str | None,
    received_at: str | None = None,
) -> Outcome:
    rejection_id = eventlog.record_rejection(
        conn, **rejection_fields(verdict, headers, body, method, path, remote_addr, received_at)
    )
    return Outcome(
        verdict.status, verdict.response(), error=verdict.code, rejection_id=rejection_id
    )


@dataclass(frozen=True)
class ReprocessSummary:
    tried: int
    events: int
    duplicates: int
    still_rejected: int
    never_retried: int = 0  # refused before interpretation (REFUSED_UNREAD): left alone


def reprocess(conn: sqlite3.Connection, config: Config) -> ReprocessSummary:
    """Re-run every unresolved rejection through the current config (e.g. a new app id).

    Only requests that reached the webhook endpoint with POST (and its token) are
    re-interpreted; those refused before interpretation are never promoted to events."""
    unread = sorted(REFUSED_UNREAD)
    marks = ", ".join("?" for _ in unread)
    retryable = f"error NOT IN ({marks}) AND upper(coalesce(method, 'POST')) = 'POST'"
    rows = conn.execute(
        "SELECT id, headers, body, body_truncated FROM rejections "
        f"WHERE resolved_at IS NULL AND {retryable} ORDER BY id",
        unread,
    ).fetchall()
    skipped = conn.execute(
        f"SELECT count(*) FROM rejections WHERE resolved_at IS NULL AND NOT ({retryable})",
        unread,
    ).fetchone()[0]
    events = duplicates = still = 0
    opener = sealing.Opener(keystore.for_database(conn, config))
    for row in rows:
        headers = Headers.of(_load_headers(row["headers"]))
        body = opener.body(row["body"] or b"")
        received_at = utc_now()
        verdict: Accepted | Rejected
        if body is None:
            verdict = Rejected("erased", "the stored body was erased (callgate erase)")
        elif row["body_truncated"]:
            verdict = Rejected("body_too_large", "the stored body was truncated")
        else:
            verdict = interpret(headers, body, config, received_at)
        if isinstance(verdict, Accepted):
            result = eventlog.append(conn, to_new_event(conn, verdict, received_at))
            resolution = "duplicate" if result.duplicate else "event"
            duplicates += result.duplicate
            events += not result.duplicate
            eventlog.resolve_rejection(conn, row["id"], resolution, result.seq)
        else:
            still += 1
            conn.execute(
                "UPDATE rejections SET resolution = ? WHERE id = ?",
                (f"rejected:{verdict.code}", row["id"]),
            )
    return ReprocessSummary(len(rows), events, duplicates, still, skipped)


def _load_headers(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    loaded = json.loads(text)
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
