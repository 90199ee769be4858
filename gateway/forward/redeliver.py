"""`callgate redeliver`: queue logged events again, with their original webhook-id.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from gateway.db import transaction, utc_now
from gateway.forward.envelope import message_id, order_key
from gateway.forward.outbox import promote
from gateway.forward.subscriptions import (
    Subscription,
    SubscriptionError,
    event_type,
    get_subscription,
    matches,
)
from gateway.log import eventlog
from gateway.wire.schemas import format_utc


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
    return format_utc(moment)


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
    where, params = _filters(event_ids, voice_ids, since, until)
    with transaction(conn):
        subs = {
            row["id"]: Subscription.from_row(row)
            for row in conn.execute("SELECT * FROM subscriptions WHERE disabled_at IS NULL")
            if subscription_id in (None, row["id"])
        }
        if dead:
            plan = _plan_dead(conn, subs, where, params)
        else:
            plan = _plan_events(conn, subs, where, params)
        if not dry_run:
            _apply(conn, plan)
    return plan


def _filters(
    event_ids: Sequence[str], voice_ids: Sequence[str], since: str | None, until: str | None
) -> tuple[str, list[Any]]:
    """The WHERE clause over `events e` that the options select, with its parameters."""
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
    return " AND ".join(where), params


def _plan_dead(
    conn: sqlite3.Connection, subs: dict[str, Subscription], where: str, params: list[Any]
) -> list[Redelivery]:
    """Dead-lettered deliveries of the selected events, requeued."""
    rows = conn.execute(
        "SELECT d.subscription_id, d.status, e.seq, e.event_id, e.voice_id, "
        "e.class, e.state, e.occurred_at FROM deliveries d JOIN events e ON e.seq = d.seq "
        f"WHERE d.status = 'dead' AND {where} ORDER BY e.seq",
        params,
    ).fetchall()
    return [
        _planned(r, r["subscription_id"], r["status"], "requeue")
        for r in rows
        if r["subscription_id"] in subs
    ]


def _plan_events(
    conn: sqlite3.Connection, subs: dict[str, Subscription], where: str, params: list[Any]
) -> list[Redelivery]:
    """Every selected event to every live subscription that wants it: requeued when it was
    delivered before, created when it predates the subscription, skipped while pending."""
    existing = {
        (r["subscription_id"], r["event_id"]): r["status"]
        for r in conn.execute(
            "SELECT d.subscription_id, d.event_id, d.status FROM deliveries d "
            f"JOIN events e ON e.seq = d.seq WHERE {where}",
            params,
        )
    }
    plan: list[Redelivery] = []
    for r in conn.execute(
        "SELECT e.seq, e.event_id, e.voice_id, e.class, e.state, e.occurred_at "
        f"FROM events e WHERE {where} ORDER BY e.seq",
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
    now = utc_now()
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
