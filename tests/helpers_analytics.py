"""Shared helpers for the analytics tests: corpus events into real temp logs, table snapshots."""

from __future__ import annotations

import json
import random
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from analytics import privacy, projector, tables
from gateway.db import connect
from gateway.log import eventlog, intake
from gateway.wire import schemas
from tests.corpus import Flow, flows

RECEIVED_AT = "2024-03-20T00:00:00.000Z"
VOICE_ID_KEYS = ("voice_id", "voice_Id", "voiceId", "VoiceId")

# Columns that record *when* an event reached the log (seq order) rather than what happened:
# they legitimately differ between two arrival orders of the same events.
ARRIVAL_COLUMNS: dict[str, tuple[str, ...]] = {
    "calls": ("first_seq", "last_seq", "out_of_order_events"),
    "plays": ("first_seq", "last_seq"),
    "recordings": ("first_seq", "last_seq"),
    "dtmf": ("seq",),
    "speech": ("seq",),
    "broadcasts": ("first_seq", "last_seq"),
    "timeline": ("seq", "arrived_late"),
}

Snapshot = dict[str, list[tuple[Any, ...]]]


def corpus() -> list[Flow]:
    return flows()


def expected_calls(expect: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A flow's `expect` as {voice_id: expected call} (broadcast flows list several)."""
    return expect["calls"] if "calls" in expect else {expect["voice_id"]: expect}


def check_call(row: dict[str, Any], want: dict[str, Any], name: str) -> None:
    """Compare a calls row with a flow's `expect` on every key the flow states."""
    assert row["final_state"] == want["final_state"], name
    assert row["duration_s"] == want["duration_s"], name
    assert row["plays"] == want["plays"], name
    assert json.loads(row["digits"]) == want["digits"], name
    assert row["recording_url"] == want["recording_url"], name
    if "speech" in want:
        assert json.loads(row["speech"]) == want["speech"], name
    if "speech_results" in want:
        assert json.loads(row["speech_results"]) == want["speech_results"], name
    if "bridge_state" in want:
        assert row["bridge_state"] == want["bridge_state"], name
    if "event_classes" in want:
        assert json.loads(row["event_classes"]) == want["event_classes"], name
    if "unique_events" in want:
        assert row["event_count"] == want["unique_events"], name


def canonical(raw: dict[str, Any]) -> str:
    return eventlog.canonical_json(raw)


def unique_raw(raw_events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Raw events without redeliveries, first delivery kept (what the log keeps)."""
    seen: set[str] = set()
    out = []
    for raw in raw_events:
        key = canonical(raw)
        if key not in seen:
            seen.add(key)
            out.append(raw)
    return out


def normalised(raw_events: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold input as the log would hold it: deduplicated, normalised, seq = arrival position."""
    out = []
    for seq, raw in enumerate(unique_raw(raw_events), start=1):
        event = schemas.normalise(raw, RECEIVED_AT)
        event["seq"] = seq
        event["received_at"] = RECEIVED_AT
        out.append(event)
    return out


def open_log(path: str, synchronous: str = "OFF") -> sqlite3.Connection:
    """A real log file with the projection tables; durability is not under test here."""
    conn = connect(path, synchronous=synchronous)
    projector.ensure_tables(conn)
    return conn


def new_event(
    raw: dict[str, Any],
    received_at: str = RECEIVED_AT,
    conn: sqlite3.Connection | None = None,
    app_label: str = "test",
) -> eventlog.NewEvent:
    """As the gateway logs it: with `conn`, its arrival-time guess at bridge legs applied."""
    event = schemas.normalise(raw, received_at)
    if conn is not None:
        event = intake.refine_leg(conn, event)
    return eventlog.NewEvent(
        event=event,
        raw_text=json.dumps(raw),
        raw_obj=raw,
        app_label=app_label,
        received_at=received_at,
    )


def append_all(
    conn: sqlite3.Connection,
    raw_events: Iterable[dict[str, Any]],
    batch: int = 500,
    app_label: str = "test",
) -> list[eventlog.AppendResult]:
    """Append raw events in arrival order through the real log (dedup, hash chain)."""
    results: list[eventlog.AppendResult] = []
    pending: list[eventlog.NewEvent] = []
    for raw in raw_events:
        pending.append(new_event(raw, conn=conn, app_label=app_label))
        if len(pending) >= batch:
            results.extend(eventlog.append_batch(conn, pending))
            pending = []
    if pending:
        results.extend(eventlog.append_batch(conn, pending))
    return results


def public_rows_are_public_forms(conn: sqlite3.Connection, policy: str) -> int:
    """Every public row with personal columns is the public form of its `_private` twin's
    cleartext, and nothing else differs; returns the rows checked."""
    checked = 0
    for table in tables.PUBLIC_WITH_PRIVATE:
        split = privacy.Splitter(
            table.column_names, table.primary_key, tables.PERSONAL[table.name], policy
        )
        public = {
            tuple(r[k] for k in table.primary_key): tuple(r)
            for r in conn.execute(f'SELECT * FROM "{table.name}"')
        }
        cleartext = conn.execute(tables.cleartext_select(table)).fetchall()
        assert len(cleartext) == len(public), table.name
        for row in cleartext:
            key = tuple(row[k] for k in table.primary_key)
            assert public[key] == split.public(tuple(row)), (table.name, key)
            checked += 1
    return checked


def snapshot(conn: sqlite3.Connection, drop_arrival: bool = False) -> Snapshot:
    """Every projection (tables and the timeline view), rows sorted; checkpoints excluded.

    With drop_arrival, arrival-order columns are removed (and timeline_marks is compared
    through the timeline view) so two arrival orders of the same events can be compared.
    """
    names = [t.name for t in tables.PROJECTIONS] + [tables.TIMELINE_VIEW]
    out: Snapshot = {}
    for name in names:
        if drop_arrival and name == tables.TIMELINE_MARKS.name:
            continue
        cursor = conn.execute(f'SELECT * FROM "{name}"')
        columns = [d[0] for d in cursor.description]
        rows = [tuple(row) for row in cursor.fetchall()]
        if drop_arrival:
            drop = set(ARRIVAL_COLUMNS.get(name, ()))
            keep = [i for i, column in enumerate(columns) if column not in drop]
            rows = [tuple(row[i] for i in keep) for row in rows]
        out[name] = sorted(rows, key=repr)
    return out


def _rename_ids(raw: dict[str, Any], ids: dict[str, str], rng: random.Random) -> dict[str, Any]:
    copy = dict(raw)
    for key in (*VOICE_ID_KEYS, "broadcast_id"):
        if isinstance(copy.get(key), str):
            old = copy[key]
            if old not in ids:
                ids[old] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            copy[key] = ids[old]
    if isinstance(copy.get("broadcast_call_info"), list):
        copy["broadcast_call_info"] = [
            {**item, "voice_id": ids.setdefault(item["voice_id"], str(uuid.uuid4()))}
            if isinstance(item, dict) and isinstance(item.get("voice_id"), str)
            else item
            for item in copy["broadcast_call_info"]
        ]
    return copy


def synthetic_log(copies: int, seed: int = 1) -> list[dict[str, Any]]:
    """Corpus flows replayed `copies` times under fresh ids, copies interleaved in arrival
    order (each copy keeps its own sending order): a big log of realistic call shapes."""
    rng = random.Random(seed)
    queues: list[list[dict[str, Any]]] = []
    templates = [flow.events for flow in corpus()]
    for index in range(copies):
        ids: dict[str, str] = {}
        template = templates[index % len(templates)]
        queues.append([_rename_ids(raw, ids, rng) for raw in template])
    out: list[dict[str, Any]] = []
    active: list[list[dict[str, Any]]] = []
    pending = list(reversed(queues))
    while pending or active:
        while pending and len(active) < 20:
            active.append(pending.pop())
        queue = rng.choice(active)
        out.append(queue.pop(0))
        if not queue:
            active.remove(queue)
    return out
