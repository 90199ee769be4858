"""Erasure by crypto-shredding: the log keeps every row, the keys that open them go.

`callgate erase` finds the units (calls, broadcasts, refused requests) whose
sealed data involves a number or a call, destroys their data keys in the key
store, records an `erasure` event in the log that names the erased calls but
holds no personal data, and scrubs the freed pages of both files
(`secure_delete`, VACUUM, WAL truncated). The projections of those calls are
re-folded by the caller (analytics.projector.reproject), after which their
personal values are null everywhere.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gateway import db
from gateway.config import Config
from gateway.log import eventlog, keystore, sealing
from gateway.log.keystore import KeyStore
from gateway.log.writer import WriterLock
from gateway.wire import crypto
from gateway.wire.schemas import format_utc

REJECTION_PREFIX = "rejection:"
_DIGIT_RUNS = re.compile(r"\d+")
# A number as people and systems write it: digits with spaces, dots, dashes or brackets
# between them, maybe a leading +; its digits are what the events' tags were made of.
_WRITTEN_NUMBERS = re.compile(r"\+?\(?\d[\d ().-]*\d")
SCRUB_WAIT_SECONDS = 10.0  # for readers (Datasette, the projector) to let the WAL go


@dataclass(frozen=True)
class Plan:
    """What an erasure will destroy: data-key units, and the calls/broadcasts among them."""

    units: list[str]
    calls: list[str] = field(default_factory=list)
    broadcasts: list[str] = field(default_factory=list)
    requests: int = 0


def _decrypted(headers: dict[str, str], body: bytes, config: Config) -> str | None:
    """A refused request's event text if the configured app ids decrypt it (whatever else
    was wrong with it: a missing voice_id is refused after decryption), else None."""
    try:
        outer = json.loads(body)
    except ValueError:
        return None
    if not isinstance(outer, dict) or not isinstance(outer.get("encrypted_data"), str):
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    algorithm = lower.get("x-algoritm") or lower.get("x-algorithm")
    fmt, encoding = lower.get("x-format"), lower.get("x-encoding")
    if not (algorithm and fmt and encoding):
        return None
    try:
        return crypto.decrypt_event(
            outer["encrypted_data"],
            algorithm.strip(),
            fmt.strip(),
            encoding.strip(),
            config.app_ids,
        ).text
    except crypto.CryptoError:
        return None


def _rejection_texts(
    conn: sqlite3.Connection, opener: sealing.Opener, config: Config
) -> Iterator[tuple[str, list[str]]]:
    """(unit, texts) of every refused request whose key still exists: the stored bytes and,
    when the configured app ids decrypt them, the decrypted event."""
    rows = conn.execute("SELECT headers, body FROM rejections WHERE body IS NOT NULL")
    for headers_text, stored in rows.fetchall():
        unit = sealing.body_unit(stored)
        body = opener.body(stored) if unit is not None else None
        if unit is None or body is None:
            continue
        texts = [body.decode("utf-8", "replace")]
        loaded = json.loads(headers_text or "{}")
        headers = {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
        if (text := _decrypted(headers, body, config)) is not None:
            texts.append(text)
        yield unit, texts


def _classify(conn: sqlite3.Connection, units: Iterable[str], requests: int) -> Plan:
    """Which units are calls and which broadcasts (a unit is a voice_id or a broadcast_id)."""
    ordered = sorted(set(units))
    calls, broadcasts = [], []
    for unit in ordered:
        if unit.startswith(REJECTION_PREFIX):
            continue
        if conn.execute("SELECT 1 FROM events WHERE voice_id = ? LIMIT 1", (unit,)).fetchone():
            calls.append(unit)
        if conn.execute(
            "SELECT 1 FROM events WHERE broadcast_id = ? AND voice_id IS NULL LIMIT 1", (unit,)
        ).fetchone():
            broadcasts.append(unit)
    return Plan(ordered, calls, broadcasts, requests)


def plan_number(conn: sqlite3.Connection, store: KeyStore, config: Config, number: str) -> Plan:
    """Every unit involving this number: the calls and broadcasts the key store's keyed tags
    name, and the refused requests whose bytes (decrypted when possible) carry it."""
    digits = sealing.digits_of(number)
    if digits is None:
        return Plan([])
    units = set(store.units_of_number(digits))
    requests = 0
    for unit, texts in _rejection_texts(conn, sealing.Opener(store), config):
        if any(_mentions_number(text, digits) for text in texts):
            units.add(unit)
            requests += 1
    return _classify(conn, units, requests)


def _mentions_number(text: str, digits: str) -> bool:
    """Whether a stored request carries this number, as events are matched: by its digits,
    written as a run of its own or in groups with separators (`+91 80684-75012`), also
    when more groups follow or precede it (`+91 80684-75012 (2)`, `call 1: +91 …`)."""
    for written in _WRITTEN_NUMBERS.findall(text):
        groups = _DIGIT_RUNS.findall(written)
        for start in range(len(groups)):
            joined = ""
            for group in groups[start:]:
                joined += group
                if len(joined) >= len(digits):
                    break
            if joined == digits:
                return True
    return False


def plan_call(conn: sqlite3.Connection, store: KeyStore, config: Config, voice_id: str) -> Plan:
    """One call's unit (if its key still exists), the broadcasts whose summary lists the
    call (sealed with the broadcast's key, so all of its numbers go), and the refused
    requests naming it."""
    units: set[str] = set()
    if store.cipher(voice_id) is not None:
        units.add(voice_id)
    units.update(b for b in _broadcasts_listing(conn, voice_id) if store.cipher(b) is not None)
    requests = 0
    for unit, texts in _rejection_texts(conn, sealing.Opener(store), config):
        if any(voice_id in text for text in texts):
            units.add(unit)
            requests += 1
    return _classify(conn, units, requests)


def _broadcasts_listing(conn: sqlite3.Connection, voice_id: str) -> set[str]:
    """Broadcasts whose summary's broadcast_call_info names this call (its voice_id is not
    sealed: only the numbers beside it are)."""
    found = set()
    rows = conn.execute(
        "SELECT broadcast_id, payload FROM events WHERE voice_id IS NULL "
        "AND broadcast_id IS NOT NULL AND instr(payload, ?) > 0",
        (voice_id,),
    )
    for broadcast_id, payload in rows:
        items = json.loads(payload).get("broadcast_call_info")
        if isinstance(items, list) and any(
            isinstance(item, dict) and item.get("voice_id") == voice_id for item in items
        ):
            found.add(broadcast_id)
    return found


def plan_older_than(conn: sqlite3.Connection, store: KeyStore, days: float) -> Plan:
    """Every unit whose key was made more than `days` ago (retention)."""
    cutoff = format_utc(datetime.now(UTC) - timedelta(days=days))
    units = store.units_older_than(cutoff)
    requests = sum(1 for unit in units if unit.startswith(REJECTION_PREFIX))
    return _classify(conn, units, requests)


ERASURE_CLASS = "erasure"
WAIT_SECONDS = 30.0  # for the log's writers: erase takes its turn among them


def destroy(
    conn: sqlite3.Connection,
    store: KeyStore,
    plan: Plan,
    reason: str,
    wait: float = WAIT_SECONDS,
) -> int:
    """Destroy the plan's keys and log the erasure (no personal data); returns its seq.

    The log's write lock comes first, taken in turn with the gateway's writers: when it
    cannot be had within `wait`, nothing is destroyed (`ErasureFailed`). Holding
    it, the keys go, then the audit event commits, so a busy log can no longer leave keys
    destroyed with no record; the projector re-folds the calls an erasure event names
    (analytics.projector), so their projections lose the values even if the caller's own
    re-fold never runs. Then `scrub` both files (the log's and `store.conn`), unlocked."""
    at = db.utc_now()
    audit = {
        "class": ERASURE_CLASS,
        "state": "keys_destroyed",
        "occurred_at": at,
        "reason": reason,
        "calls": plan.calls,
        "broadcasts": plan.broadcasts,
        "requests": plan.requests,
        "keys": len(plan.units),
    }
    item = eventlog.NewEvent(audit, eventlog.canonical_json(audit), audit, "callgate", at)
    lock = WriterLock(keystore.database_file(conn) or ":memory:", wait)
    destroyed = False
    try:
        with lock, db.transaction(conn):
            store.destroy(plan.units, reason, at)
            destroyed = True
            seq = eventlog.append(conn, item, store).seq
            _forget_responses(conn, plan.calls)
    except sqlite3.Error as exc:
        raise ErasureFailed(destroyed, type(exc).__name__, str(exc)) from None
    finally:
        lock.close()
    return seq


class ErasureFailed(RuntimeError):
    """The log could not be written: before the keys went (`destroyed` False: nothing
    happened, run again) or, rarely, after (the audit event is missing)."""

    def __init__(self, destroyed: bool, kind: str, detail: str) -> None:
        self.destroyed = destroyed
        if destroyed:
            message = (
                f"the keys were destroyed, but the log could not record it ({kind}: {detail}); "
                "the erased values are unreadable, the audit event is missing"
            )
        else:
            message = f"nothing was erased: the log could not be written ({kind}: {detail})"
        super().__init__(message)


def erased_units(payload: dict[str, object]) -> tuple[list[str], list[str]]:
    """(calls, broadcasts) an erasure event names: what the projector re-folds."""
    calls, broadcasts = payload.get("calls"), payload.get("broadcasts")
    return (
        [c for c in calls if isinstance(c, str)] if isinstance(calls, list) else [],
        [b for b in broadcasts if isinstance(b, str)] if isinstance(broadcasts, list) else [],
    )


def _forget_responses(conn: sqlite3.Connection, voice_ids: list[str]) -> None:
    """Receivers' answers to the erased calls' deliveries (a receiver may echo what it got)."""
    if not voice_ids:
        return
    marks = ",".join("?" * len(voice_ids))
    try:
        with db.transaction(conn):
            conn.execute(
                "UPDATE delivery_attempts SET response_body = NULL WHERE delivery_id IN "
                f"(SELECT id FROM deliveries WHERE voice_id IN ({marks}))",
                voice_ids,
            )
    except sqlite3.OperationalError as exc:  # no forwarding tables: nothing was forwarded
        if "no such table" not in str(exc):
            raise


def scrub(conn: sqlite3.Connection, wait: float = SCRUB_WAIT_SECONDS) -> bool:
    """Overwrite freed pages of a database and empty its WAL: the projections' earlier
    versions of an erased call's rows (the log's file), the destroyed keys (the key
    store's) must not linger in free space or the WAL.
    Returns False when readers kept the WAL from being truncated (run again later)."""
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("VACUUM")
    deadline = time.monotonic() + wait
    while True:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy or time.monotonic() > deadline:
            return not busy
        time.sleep(0.2)
