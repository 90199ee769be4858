"""What the call page (Datasette's row page of `calls`) shows: one call's whole story.

The queries read the projections and the forwarding outbox by voice_id (each has an index
on it); the Datasette plugin `datasette_plugins/callgate_call_page.py` runs only the ones
the visitor may read, then the helpers here shape the rows. Pure: no SQL is executed here,
so the shaping is tested with plain dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Row = dict[str, Any]


@dataclass(frozen=True)
class Section:
    """One block of the page: a table (or view) read for one call, keyed like the table."""

    table: str
    sql: str
    key: tuple[str, ...]  # primary key: how a `<table>_private` row overlays a public one


# `SELECT *`: the page shows what each table holds under the privacy policy in force
# (public tables may drop or mask personal columns), and the template names its columns.
SECTIONS: tuple[Section, ...] = (
    Section("timeline", "SELECT * FROM timeline WHERE voice_id = :voice_id "
            "ORDER BY occurred_at, seq", ("seq",)),
    Section("plays", "SELECT * FROM plays WHERE voice_id = :voice_id "
            "ORDER BY started_at, play_id", ("voice_id", "play_id")),
    Section("dtmf", "SELECT * FROM dtmf WHERE voice_id = :voice_id ORDER BY position",
            ("voice_id", "position")),
    Section("speech", "SELECT * FROM speech WHERE voice_id = :voice_id ORDER BY position",
            ("voice_id", "position")),
    Section("recordings", "SELECT * FROM recordings WHERE voice_id = :voice_id "
            "ORDER BY started_at, recording_id", ("voice_id", "recording_id")),
)
CALL_KEY = ("voice_id",)

# Operators only (the forwarding tables are operator-only in metadata.yml).
DELIVERIES_SQL = (
    "SELECT d.id, d.subscription_id, d.seq, d.type, d.status, d.attempts, d.created_at, "
    "d.delivered_at, d.last_status, d.last_error, d.redeliveries "
    "FROM deliveries d WHERE d.voice_id = :voice_id ORDER BY d.seq, d.subscription_id"
)
ATTEMPTS_SQL = (
    "SELECT a.delivery_id, a.attempt, a.started_at, a.duration_ms, a.status_code, a.error, "
    "a.outcome, a.next_attempt_at FROM delivery_attempts a "
    "JOIN deliveries d ON d.id = a.delivery_id WHERE d.voice_id = :voice_id "
    "ORDER BY d.seq, a.delivery_id, a.attempt"
)

_LEG_START = frozenset({"bridging", "initiated"})
_LEG_END = frozenset({"bridge_disconnected", "failed"})


def private_table(table: str) -> str:
    """Where an operator's cleartext for `table` lives (SHARED-DECISIONS: `<table>_private`,
    keyed like the public table, unreadable for anonymous visitors)."""
    return f"{table}_private"


def overlay(rows: Sequence[Row], private_rows: Sequence[Mapping[str, Any]],
            key: tuple[str, ...]) -> list[Row]:
    """Public rows with the cleartext of the matching private rows put over them: the
    page a visitor may read the private table for shows what that table holds (columns
    the public form leaves out included), everyone else the public form."""
    by_key = {tuple(p.get(k) for k in key): p for p in private_rows}
    out = []
    for row in rows:
        clear = by_key.get(tuple(row.get(k) for k in key))
        merged = dict(row)
        if clear is not None:
            merged.update({k: v for k, v in clear.items() if k not in key})
        out.append(merged)
    return out


def bridge_legs(timeline: Sequence[Mapping[str, Any]]) -> list[Row]:
    """The call's bridge legs (a third party connected to it), from its bridge-class events
    in event order: a leg opens at bridging/initiated (or at bridged when no leg is open)
    and closes at bridge_disconnected or failed."""
    legs: list[Row] = []
    current: Row | None = None
    for event in timeline:
        if event.get("class") != "bridge":
            continue
        state, at = event.get("state"), event.get("occurred_at")
        if current is None or (state in _LEG_START and current["started_at"] is not None):
            if current is not None:
                legs.append(current)
            current = {"leg": len(legs) + 1, "started_at": None, "bridged_at": None,
                       "ended_at": None, "outcome": "open", "reason": None}  # fmt: skip
        if state in _LEG_START:
            current["started_at"] = at
        elif state == "bridged":
            current["bridged_at"] = current["bridged_at"] or at
            current["started_at"] = current["started_at"] or at
            current["outcome"] = "bridged"
        elif state in _LEG_END:
            current["ended_at"] = at
            current["started_at"] = current["started_at"] or at
            current["outcome"] = "completed" if state == "bridge_disconnected" else "failed"
            current["reason"] = event.get("reason")
            legs.append(current)
            current = None
    if current is not None:
        legs.append(current)
    return legs


def openable(url: Any) -> str | None:
    """The URL when it can be a link (http or https only: a stored value never becomes a
    javascript: or data: link), else None."""
    if isinstance(url, str) and url.lower().startswith(("https://", "http://")):
        return url
    return None


def attempts_by_delivery(attempts: Sequence[Mapping[str, Any]]) -> dict[str, list[Row]]:
    """Delivery attempts grouped under their delivery id, in attempt order."""
    grouped: dict[str, list[Row]] = {}
    for attempt in attempts:
        grouped.setdefault(str(attempt["delivery_id"]), []).append(dict(attempt))
    return grouped
