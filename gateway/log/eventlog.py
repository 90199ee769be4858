"""The immutable, hash-chained event log and the rejections table.

The log is the only source of truth: every other table is a projection of
it. An event is acknowledged only after the transaction holding it committed
(WAL + synchronous=FULL by default), rows can never be changed (triggers),
and each row's hash covers the previous row's hash, so `verify` finds any
edit, deletion or reordering made behind the triggers' back.

Every event is sealed on its way in (`_prepare`, the one place a NewEvent
becomes a row, whoever appends it: HTTP intake, reprocess, an archiver): its
personal values and raw text are encrypted with its call's data key
(gateway/log/sealing.py), and its dedup hash is keyed (HMAC), so the log holds
no personal data in the clear and no unkeyed hash of it. The chain covers the
sealed form: erasing a call (destroying its key) leaves `verify` passing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import sqlite_utils

from gateway.db import GENESIS_HASH, log_head, transaction, utc_now
from gateway.log import keystore, sealing
from gateway.log.keystore import KeyStore
from gateway.wire.ingest import REFUSED_UNREAD

SCHEMA_VERSION = 3
BODY_CAP = 64 * 1024
HASHED_COLUMNS = (
    "seq",
    "event_id",
    "app_id",
    "voice_id",
    "broadcast_id",
    "class",
    "state",
    "occurred_at",
    "received_at",
    "payload",
    "raw",
    "content_hash",
)
ALLOWED_HEADERS = (
    "content-type",
    "content-length",
    "x-algoritm",
    "x-algorithm",
    "x-format",
    "x-encoding",
    "user-agent",
    "x-forwarded-for",
    "x-request-id",
)


def canonical_json(value: Any) -> str:
    """Sorted keys, no spaces: the form that makes redeliveries byte-identical."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except (TypeError, orjson.JSONEncodeError):  # e.g. integers beyond 64 bits
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(raw_obj: Any, key: bytes | None = None) -> str:
    """The dedup hash of a raw event: HMAC-SHA256 under the key store's dedup key (what
    the log stores since schema 3), or plain SHA-256 without a key (older rows)."""
    text = canonical_json(raw_obj).encode()
    if key is None:
        return hashlib.sha256(text).hexdigest()
    return hmac.digest(key, text, "sha256").hex()


def event_id_for(digest: str) -> str:
    """An event's id, derived from its content hash: the same wherever it is computed."""
    return "ev_" + digest[:24]


def row_hash(prev_hash: str, row: dict[str, Any]) -> str:
    """SHA-256 over the previous hash and the canonical JSON of the row's own columns."""
    body = canonical_json({column: row[column] for column in HASHED_COLUMNS})
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def _migrate_1(conn: sqlite3.Connection) -> None:
    db = sqlite_utils.Database(conn)
    db["events"].create(
        {
            "seq": int,
            "event_id": str,
            "app_id": str,
            "voice_id": str,
            "broadcast_id": str,
            "class": str,
            "state": str,
            "occurred_at": str,
            "received_at": str,
            "payload": str,
            "raw": str,
            "content_hash": str,
            "prev_hash": str,
            "hash": str,
        },
        pk="seq",
        not_null={
            "event_id",
            "class",
            "occurred_at",
            "received_at",
            "payload",
            "raw",
            "content_hash",
            "prev_hash",
            "hash",
        },
    )
    db["events"].create_index(["event_id"], unique=True)
    db["events"].create_index(["content_hash"], unique=True)
    db["events"].create_index(["voice_id", "occurred_at", "seq"])
    db["events"].create_index(["broadcast_id"])
    db["events"].create_index(["occurred_at"])
    conn.execute(
        "CREATE TRIGGER events_no_update BEFORE UPDATE ON events "
        "BEGIN SELECT RAISE(ABORT, 'events is append-only: UPDATE refused'); END"
    )
    conn.execute(
        "CREATE TRIGGER events_no_delete BEFORE DELETE ON events "
        "BEGIN SELECT RAISE(ABORT, 'events is append-only: DELETE refused'); END"
    )
    db["rejections"].create(
        {
            "id": int,
            "received_at": str,
            "error": str,
            "detail": str,
            "http_status": int,
            "method": str,
            "path": str,
            "headers": str,
            "body": bytes,
            "body_size": int,
            "body_truncated": int,
            "remote_addr": str,
            "resolved_at": str,
            "resolution": str,
            "resolved_seq": int,
        },
        pk="id",
        not_null={"received_at", "error", "http_status"},
    )
    db["rejections"].create_index(["error"])
    db["rejections"].create_index(["resolved_at"])


def _migrate_2(conn: sqlite3.Connection) -> None:
    """Drop event_id's unique index: event_id is `ev_` + a prefix of content_hash, whose
    unique index already keeps it unique (short of a 96-bit prefix collision), and its
    random inserts cost the group-commit writer ~4 % of ingest throughput
    (bench/ingest.py: B/A 0.474 -> 0.494). Lookups go through `event_id_match`."""
    conn.execute("DROP INDEX IF EXISTS idx_events_event_id")


def _migrate_3(conn: sqlite3.Connection) -> None:
    """Sealing: `key_store` names the key store this log's events are sealed with, so a
    missing or foreign key store is refused at start-up (keystore.open_store). Rows
    logged before stay as they were (plaintext, unkeyed hash): erasure cannot reach
    them, the README says so."""
    conn.execute(
        "CREATE TABLE IF NOT EXISTS key_store (store_id TEXT PRIMARY KEY, bound_at TEXT NOT NULL)"
    )


MIGRATIONS = {1: _migrate_1, 2: _migrate_2, 3: _migrate_3}


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create or migrate the log's tables; the version lives in PRAGMA user_version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version >= SCHEMA_VERSION:
        return
    with transaction(conn):
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for target in range(version + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[target](conn)
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")


@dataclass(frozen=True)
class NewEvent:
    """What the ingest pipeline hands to the log for one accepted request."""

    event: dict[str, Any]
    raw_text: str
    raw_obj: Any
    app_label: str
    received_at: str


@dataclass(frozen=True)
class AppendResult:
    seq: int
    event_id: str
    duplicate: bool


_ROW_COLUMNS = (*HASHED_COLUMNS, "prev_hash", "hash")
_INSERT_SQL = (
    f"INSERT INTO events ({', '.join(_ROW_COLUMNS)}) "
    f"VALUES ({', '.join(':' + column for column in _ROW_COLUMNS)})"
)


@dataclass(frozen=True)
class _Prepared:
    """What can be computed before the write lock is taken: hashes, sealed payload and raw."""

    item: NewEvent
    digest: str
    payload: str
    raw: str


def _prepare(items: Sequence[NewEvent], store: KeyStore) -> list[_Prepared]:
    """Seal a batch: the one function through which every event reaches the log.

    Keys of calls not seen before (and keyed tags of their numbers) are written to the
    key store in one transaction, durable before the events' own commit; a batch of
    known calls touches the key store not at all (cached keys)."""
    store.refresh()
    digests = [content_hash(item.raw_obj, store.dedup_key) for item in items]
    unit_of, units = sealing_units(items, digests)
    ciphers = store.ensure(units, utc_now())
    nonce_source = sealing.nonces(2 * len(items))
    prepared = []
    for item, digest, unit in zip(items, digests, unit_of, strict=True):
        sealed = sealing.seal_event(item.event, item.raw_text, unit, ciphers[unit], nonce_source)
        prepared.append(_Prepared(item, digest, canonical_json(sealed.payload), sealed.raw))
    return prepared


def sealing_units(
    items: Sequence[NewEvent], digests: Sequence[str]
) -> tuple[list[str], dict[str, set[str]]]:
    """Each item's key unit (its call, its broadcast, else the event itself), and every
    unit's phone numbers: what the key store must hold before the batch is sealed."""
    units: dict[str, set[str]] = {}
    unit_of: list[str] = []
    for item, digest in zip(items, digests, strict=True):
        unit = sealing.unit_of(item.event) or "event:" + digest[:24]
        unit_of.append(unit)
        units.setdefault(unit, set()).update(sealing.numbers_in(item.event))
    return unit_of, units


def _logged(conn: sqlite3.Connection, digests: list[str]) -> dict[str, AppendResult]:
    """Which of these content hashes the log already holds, in one query."""
    found: dict[str, AppendResult] = {}
    for start in range(0, len(digests), 500):
        chunk = digests[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for digest, seq, event_id in conn.execute(
            f"SELECT content_hash, seq, event_id FROM events WHERE content_hash IN ({marks})",
            chunk,
        ):
            found[digest] = AppendResult(seq, event_id, True)
    return found


def append_batch(
    conn: sqlite3.Connection, items: Sequence[NewEvent], store: KeyStore | None = None
) -> list[AppendResult]:
    """Append events in one transaction (one fsync); duplicates return the original seq.

    Sealing, hashing and JSON happen before BEGIN, and the transaction makes a fixed
    number of SQLite calls whatever the batch size: each call releases the GIL, and a
    committing thread that must win it back once per row starves behind request threads.
    Returns only after COMMIT: the caller may acknowledge every result then.
    `store` defaults to the key store of conn's database (keystore.for_database).
    """
    if not items:
        return []
    store = store if store is not None else keystore.for_database(conn)
    return _insert_prepared(conn, _prepare(items, store))


def _insert_prepared(conn: sqlite3.Connection, prepared: Sequence[_Prepared]) -> list[AppendResult]:
    """The write transaction of `append_batch`, for rows `_prepare` sealed."""
    with transaction(conn):
        seq, prev = log_head(conn)
        seen = _logged(conn, [p.digest for p in prepared])
        results: list[AppendResult] = []
        rows: list[dict[str, Any]] = []
        for p in prepared:
            if p.digest in seen:
                original = seen[p.digest]
                results.append(AppendResult(original.seq, original.event_id, True))
                continue
            seq += 1
            row = _row(p, seq, prev)
            prev = row["hash"]
            rows.append(row)
            result = AppendResult(seq, row["event_id"], False)
            seen[p.digest] = result
            results.append(result)
        if rows:
            # One statement per row, deliberately: a multi-row INSERT … SELECT needs a
            # statement journal, which SQLite spills to a temporary file at this size.
            conn.executemany(_INSERT_SQL, rows)
    return results


def _row(prepared: _Prepared, seq: int, prev_hash: str) -> dict[str, Any]:
    event, item = prepared.item.event, prepared.item
    row = {
        "seq": seq,
        "event_id": event_id_for(prepared.digest),
        "app_id": item.app_label,
        "voice_id": event.get("voice_id"),
        "broadcast_id": event.get("broadcast_id"),
        "class": event["class"],
        "state": event.get("state"),
        "occurred_at": event["occurred_at"],
        "received_at": item.received_at,
        "payload": prepared.payload,
        "raw": prepared.raw,
        "content_hash": prepared.digest,
    }
    row["prev_hash"] = prev_hash
    row["hash"] = row_hash(prev_hash, row)
    return row


def append(
    conn: sqlite3.Connection, item: NewEvent, store: KeyStore | None = None
) -> AppendResult:
    return append_batch(conn, [item], store)[0]


_EVENT_ID = re.compile(r"ev_[0-9a-f]{24}")


def event_id_match(event_ids: Sequence[str], table: str = "events") -> tuple[str, list[str]]:
    """A WHERE clause for these event ids that uses the content_hash index.

    `event_id` has no index of its own (see `_migrate_2`); being `ev_` + the first 24
    hex digits of content_hash, each id is a range of that index. Ids of another
    shape match nothing.
    """
    parts: list[str] = []
    params: list[str] = []
    for event_id in event_ids:
        if _EVENT_ID.fullmatch(event_id):
            digits = event_id[3:]
            # Hex digits sort below "g": [digits, digits + "g") is exactly the prefix.
            parts.append(
                f"({table}.content_hash >= ? AND {table}.content_hash < ? "
                f"AND {table}.event_id = ?)"
            )
            params += [digits, digits + "g", event_id]
    return ("(" + " OR ".join(parts) + ")" if parts else "0"), params


def connected_before(conn: sqlite3.Connection, voice_id: str, occurred_at: str) -> bool:
    """Whether the log already holds this call's `connected` earlier in event time."""
    row = conn.execute(
        "SELECT 1 FROM events WHERE voice_id = ? AND occurred_at < ? AND class = 'call' "
        "AND state = 'connected' LIMIT 1",
        (voice_id, occurred_at),
    ).fetchone()
    return row is not None


def kept_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The allow-listed headers of a refused request, values capped: all that is kept."""
    kept = {}
    for name, value in headers:
        lower = name.lower()
        if lower in ALLOWED_HEADERS:
            kept[lower] = value[:512]
    return kept


def record_rejection(
    conn: sqlite3.Connection,
    *,
    error: str,
    detail: str,
    http_status: int,
    body: bytes,
    headers: Iterable[tuple[str, str]],
    method: str = "POST",
    path: str = "",
    remote_addr: str | None = None,
    received_at: str | None = None,
    store: KeyStore | None = None,
    body_size: int | None = None,
) -> int:
    """Keep a refused request (capped body, allow-listed headers) so it can
    be re-processed.

    The body is sealed under a key of its own (it may hold an event's personal data,
    encrypted only with the app id), so `callgate erase` can shred it too; a body refused
    before interpretation under its day's key (`sealing.seal_body`). `body_size` is
    the size as received when `body` is already a capped copy (a rejection archived from
    the NATS stream)."""
    store = store if store is not None else keystore.for_database(conn)
    received = received_at or utc_now()
    stored = body[:BODY_CAP]
    _, sealed_body = sealing.seal_body(store, stored, received, error in REFUSED_UNREAD)
    size = len(body) if body_size is None else body_size
    cursor = conn.execute(
        "INSERT INTO rejections (received_at, error, detail, http_status, method, path, headers, "
        "body, body_size, body_truncated, remote_addr) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (
            received,
            error,
            detail,
            http_status,
            method,
            path,
            json.dumps(kept_headers(headers), sort_keys=True),
            sealed_body,
            size,
            int(size > len(stored)),
            remote_addr,
        ),
    )
    return int(cursor.lastrowid or 0)


def resolve_rejection(
    conn: sqlite3.Connection, rejection_id: int, resolution: str, seq: int | None
) -> None:
    conn.execute(
        "UPDATE rejections SET resolved_at = ?, resolution = ?, resolved_seq = ? WHERE id = ?",
        (utc_now(), resolution, seq, rejection_id),
    )


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None = None
    reason: str | None = None


def iter_events(
    conn: sqlite3.Connection, after: int = 0, batch: int = 5000
) -> Iterator[sqlite3.Row]:
    """Events in seq order, read in batches so a million-row log never sits in memory."""
    last = after
    while True:
        rows = conn.execute(
            "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (last, batch)
        ).fetchall()
        if not rows:
            return
        yield from rows
        last = rows[-1]["seq"]


def verify(conn: sqlite3.Connection) -> VerifyResult:
    """Walk the chain; name the first row whose position, link or content does not hold."""
    prev_hash, expected_seq, checked = GENESIS_HASH, 1, 0
    for row in iter_events(conn):
        record = dict(row)
        seq = record["seq"]
        if seq != expected_seq:
            return VerifyResult(False, checked, seq, prev_hash, seq, f"expected seq {expected_seq}")
        if record["prev_hash"] != prev_hash:
            return VerifyResult(False, checked, seq, prev_hash, seq, "prev_hash does not link")
        # A sealed row's raw text is checked through the chain (the row hash covers its
        # sealed bytes and content_hash): its key may be gone, erased on purpose.
        sealed = record["raw"].startswith(sealing.RAW_PREFIX)
        if not sealed and content_hash(json.loads(record["raw"])) != record["content_hash"]:
            return VerifyResult(False, checked, seq, prev_hash, seq, "raw does not match hash")
        if row_hash(prev_hash, record) != record["hash"]:
            return VerifyResult(False, checked, seq, prev_hash, seq, "row hash mismatch")
        prev_hash, expected_seq, checked = record["hash"], seq + 1, checked + 1
    return VerifyResult(True, checked, expected_seq - 1, prev_hash)
