"""Keeps the projection tables in step with the event log.

The log is the only truth. The projector reads the events after its checkpoint,
re-folds every call and broadcast they touch from ALL of that call's events
(so late and out-of-order deliveries land exactly where a full replay would put
them), and replaces those rows and advances the checkpoint in one transaction:
a crash at any point leaves either the old rows and old checkpoint or the new
ones, so re-running is always safe (exactly-once effect).

`rebuild` re-derives every projection from seq 1: it folds one snapshot of the
log into staging tables (short write transactions, so ingest never waits long
behind it) and swaps them in with ONE transaction, so readers (WAL snapshots,
e.g. Datasette) see the old tables until the new ones are complete.
"""

from __future__ import annotations

import gc
import itertools
import operator
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson

from analytics import folds, tables
from gateway import eventlog
from gateway.schemas import format_utc
from gateway.signals import stop_on_signals

CHECKPOINT = "projector"
DEFAULT_BATCH = 2000
_READ_CHUNK = 20000  # rows fetched per round trip while rebuilding
_WRITE_CHUNK = 2000  # calls folded before their rows are flushed with executemany

Progress = Callable[[int, int], None]
# While rebuilding: the log is read in call order (random access into the table), so a big
# page cache and memory-mapped reads matter more than anything in Python.
_BULK_PRAGMAS = {"cache_size": -262144, "mmap_size": 2147418112, "temp_store": 2}

_CALL_EVENTS = (
    "SELECT seq, received_at, payload FROM events WHERE voice_id = ? ORDER BY occurred_at, seq"
)
# A broadcast's legs matter to its row only through their columns (voice_id, class, state,
# time, seq), so only summaries are decoded: a 10,000-leg broadcast stays cheap to re-fold.
_BROADCAST_COLUMNS = (
    "SELECT broadcast_id, seq, received_at, voice_id, class, state, occurred_at, "
    "CASE WHEN voice_id IS NULL OR class = 'broadcast' THEN payload END FROM events "
)
_BROADCAST_EVENTS = _BROADCAST_COLUMNS + "WHERE broadcast_id = ? ORDER BY occurred_at, seq"
_ALL_BROADCAST_EVENTS = (
    _BROADCAST_COLUMNS
    + "WHERE broadcast_id IS NOT NULL ORDER BY broadcast_id, occurred_at, seq"
)
_PER_CALL_TABLES = (tables.CALLS, tables.PLAYS, tables.RECORDINGS, tables.DTMF, tables.SPEECH)


def _cursor(conn: sqlite3.Connection) -> sqlite3.Cursor:
    """A plain-tuple cursor: sqlite3.Row per event would cost more than the fold itself."""
    cur = conn.cursor()
    cur.row_factory = None
    return cur


def _now() -> str:
    return format_utc(datetime.now(UTC))


def ensure_tables(conn: sqlite3.Connection) -> None:
    """Create the log's and the projections' tables when missing (idempotent, cheap)."""
    eventlog.ensure_schema(conn)
    have = {
        row[0]
        for row in _cursor(conn).execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if all(table.name in have for table in tables.ALL_TABLES):
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables.create_tables(conn)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def checkpoint(conn: sqlite3.Connection) -> int:
    """Highest seq the projections reflect (0 before the first run)."""
    row = _cursor(conn).execute(
        "SELECT seq FROM checkpoints WHERE name = ?", (CHECKPOINT,)
    ).fetchone()
    return int(row[0]) if row else 0


def _set_checkpoint(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute(
        "INSERT INTO checkpoints (name, seq, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
        (CHECKPOINT, seq, _now()),
    )


def _decode(rows: Iterable[tuple[int, str, str]]) -> list[dict[str, Any]]:
    """Log rows → the fold's input: the normalised payload plus seq and received_at."""
    out = []
    loads = orjson.loads
    for seq, received_at, payload in rows:
        event = loads(payload)
        event["seq"] = seq
        event["received_at"] = received_at
        out.append(event)
    return out


def load_call(conn: sqlite3.Connection, voice_id: str) -> list[dict[str, Any]]:
    """All logged events of one call, in (occurred_at, seq) order."""
    return _decode(_cursor(conn).execute(_CALL_EVENTS, (voice_id,)))


def _broadcast_event(row: tuple[Any, ...]) -> dict[str, Any]:
    """A summary decoded in full; a leg's event as just the columns the broadcast fold reads."""
    broadcast_id, seq, received_at, voice_id, cls, state, occurred_at, payload = row
    if payload is not None:
        event = orjson.loads(payload)
        event["seq"] = seq
        event["received_at"] = received_at
        return event  # type: ignore[no-any-return]
    return {
        "voice_id": voice_id,
        "broadcast_id": broadcast_id,
        "class": cls,
        "state": state,
        "occurred_at": occurred_at,
        "seq": seq,
        "received_at": received_at,
    }


def load_broadcast(conn: sqlite3.Connection, broadcast_id: str) -> list[dict[str, Any]]:
    """All logged events carrying one broadcast_id (summaries and legs), in event order."""
    return [_broadcast_event(r) for r in _cursor(conn).execute(_BROADCAST_EVENTS, (broadcast_id,))]


class _Rows:
    """Rows waiting to be written, grouped per table, flushed with executemany."""

    def __init__(self) -> None:
        self.calls: list[folds.Row] = []
        self.plays: list[folds.Row] = []
        self.recordings: list[folds.Row] = []
        self.dtmf: list[folds.Row] = []
        self.speech: list[folds.Row] = []
        self.broadcasts: list[folds.Row] = []
        self.marks: list[folds.Row] = []

    def add_call(self, rows: folds.CallRows) -> None:
        self.calls.append(rows.call)
        if rows.plays:
            self.plays.extend(rows.plays)
        if rows.recordings:
            self.recordings.extend(rows.recordings)
        if rows.dtmf:
            self.dtmf.extend(rows.dtmf)
        if rows.speech:
            self.speech.extend(rows.speech)
        if rows.marks:
            self.marks.extend(rows.marks)

    def add_broadcast(self, rows: folds.BroadcastRows) -> None:
        self.broadcasts.append(rows.broadcast)
        if rows.marks:
            self.marks.extend(rows.marks)

    def flush(self, conn: sqlite3.Connection, staging: bool = False) -> None:
        for table, rows in (
            (tables.CALLS, self.calls),
            (tables.PLAYS, self.plays),
            (tables.RECORDINGS, self.recordings),
            (tables.DTMF, self.dtmf),
            (tables.SPEECH, self.speech),
            (tables.BROADCASTS, self.broadcasts),
            (tables.TIMELINE_MARKS, self.marks),
        ):
            if rows:
                sql = table.insert_sql_into(table.staging_name) if staging else table.insert_sql
                conn.executemany(sql, rows)
                rows.clear()


def project_once(conn: sqlite3.Connection, batch: int = DEFAULT_BATCH) -> int:
    """Project up to `batch` new events; returns how many were consumed (0 = caught up).

    Folding happens in a read snapshot; the write transaction only swaps rows and
    moves the checkpoint, after checking nobody else moved it meanwhile (then it
    retries), so the gateway's appends wait for milliseconds at most.
    """
    ensure_tables(conn)
    while True:
        conn.execute("BEGIN")
        try:
            start = checkpoint(conn)
            new = _cursor(conn).execute(
                "SELECT seq, voice_id, broadcast_id FROM events WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (start, batch),
            ).fetchall()
            if not new:
                return 0
            voice_ids = sorted({row[1] for row in new if row[1] is not None})
            broadcast_ids = sorted({row[2] for row in new if row[2] is not None})
            pending = _Rows()
            for voice_id in voice_ids:
                events = load_call(conn, voice_id)
                if events:
                    pending.add_call(folds.fold_call(events))
            for broadcast_id in broadcast_ids:
                events = load_broadcast(conn, broadcast_id)
                if events:
                    pending.add_broadcast(folds.fold_broadcast(events))
        finally:
            conn.execute("COMMIT")  # ends the read snapshot

        conn.execute("BEGIN IMMEDIATE")
        try:
            if checkpoint(conn) != start:  # another projector or a rebuild got there first
                conn.execute("ROLLBACK")
                continue
            _delete(conn, voice_ids, broadcast_ids)
            pending.flush(conn)
            _set_checkpoint(conn, new[-1][0])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return len(new)


def _delete(conn: sqlite3.Connection, voice_ids: list[str], broadcast_ids: list[str]) -> None:
    """Remove the rows of the calls and broadcasts about to be re-folded."""
    call_keys = [(voice_id,) for voice_id in voice_ids]
    for table in (*_PER_CALL_TABLES, tables.TIMELINE_MARKS):
        conn.executemany(f'DELETE FROM "{table.name}" WHERE voice_id = ?', call_keys)
    keys = [(broadcast_id,) for broadcast_id in broadcast_ids]
    conn.executemany("DELETE FROM broadcasts WHERE broadcast_id = ?", keys)
    conn.executemany(
        "DELETE FROM timeline_marks WHERE voice_id IS NULL AND broadcast_id = ?", keys
    )


def project_all(conn: sqlite3.Connection, batch: int = DEFAULT_BATCH) -> int:
    """Project until caught up with the log; returns the number of events consumed."""
    total = 0
    while n := project_once(conn, batch):
        total += n
    return total


def follow(
    db_path: str,
    interval: float = 0.2,
    stop_event: threading.Event | None = None,
    batch: int = DEFAULT_BATCH,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Poll the log and project new events until stopped; returns events consumed.

    Stops cleanly (between transactions) on SIGTERM/SIGINT when run in the main
    thread, or when `stop_event` is set (how `callgate up` runs it in a thread).
    """
    stop = stop_event if stop_event is not None else threading.Event()
    restore = stop_on_signals(stop)
    conn = eventlog.connect(db_path, synchronous="NORMAL")
    total = 0
    try:
        while not stop.is_set():
            try:
                n = project_once(conn, batch)
            except sqlite3.OperationalError as exc:  # e.g. busy beyond the timeout: retry
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                n = 0
            total += n
            if n and on_batch is not None:
                on_batch(n)
            if n < batch:
                stop.wait(interval)
    finally:
        conn.close()
        restore()
    return total


def _grouped(
    cur: sqlite3.Cursor, sql: str, progress: Callable[[int], None]
) -> Iterator[list[dict[str, Any]]]:
    """Stream `sql` (key, seq, payload ordered by key, time, seq) as one decoded event list
    per key, without holding the log in memory. (received_at is left out: only the
    timeline needs it, and the timeline is a view over the log.)

    Walking the (voice_id, occurred_at, seq) index costs more per row than a sequential
    scan, but measured over a million events it beats a seq-order scan that groups calls
    in memory: one call's events at a time stay cache-hot, and rows are written in key
    order."""
    loads = orjson.loads
    cur.execute(sql)
    current: Any = None
    group: list[dict[str, Any]] = []
    append = group.append
    done = 0
    while rows := cur.fetchmany(_READ_CHUNK):
        for key, seq, payload in rows:
            if key != current:
                if group:
                    yield group
                group = []
                append = group.append
                current = key
            event = loads(payload)
            event["seq"] = seq
            append(event)
        done += len(rows)
        progress(done)
    if group:
        yield group


def _db_file(conn: sqlite3.Connection) -> str:
    """The main database's file ('' for an in-memory or temporary database)."""
    for _, name, path in _cursor(conn).execute("PRAGMA database_list"):
        if name == "main":
            return str(path or "")
    return ""


class _Writes:
    """Staged writes: each chunk in its own short write transaction, so the gateway's
    appends interleave with a long rebuild instead of timing out behind it. With no
    separate reader (in-memory DB) everything stays in the one open transaction."""

    def __init__(self, conn: sqlite3.Connection, chunked: bool) -> None:
        self.conn = conn
        self.chunked = chunked

    def run(self, work: Callable[[], None]) -> None:
        if not self.chunked:
            work()
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            work()
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise


def rebuild(conn: sqlite3.Connection, progress: Progress | None = None) -> int:
    """Rebuild every projection from seq 1; readers never see a half-built table.

    The log is read in one snapshot (a second connection's read transaction) and
    folded into staging tables; one short final transaction drops the old tables,
    renames the staging ones into place, indexes them and sets the checkpoint to the
    snapshot's head. Events appended meanwhile are left to the incremental projector.
    Returns the number of events folded. `progress(done, total)` follows the fold.
    """
    ensure_tables(conn)
    path = _db_file(conn)
    reader = eventlog.connect(path, synchronous="NORMAL") if path else conn
    staged = reader is not conn
    cur = _cursor(reader)
    # The fold makes no reference cycles; the cyclic GC would only rescan millions of
    # short-lived event dicts over and over.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    saved: dict[tuple[int, str], tuple[sqlite3.Connection, Any]] = {}
    for name, value in _BULK_PRAGMAS.items():
        for target in {id(c): c for c in (reader, conn)}.values():
            current = target.execute(f"PRAGMA {name}").fetchone()
            if current is not None:  # (an in-memory database has no mmap_size)
                saved[(id(target), name)] = (target, current[0])
                target.execute(f"PRAGMA {name} = {value}")
    writes = _Writes(conn, chunked=staged)
    # The snapshot everything below is folded from (in-memory: the one transaction).
    reader.execute("BEGIN" if staged else "BEGIN IMMEDIATE")
    try:
        head, n_events = cur.execute(
            "SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM events"
        ).fetchone()

        def report(done: int) -> None:
            if progress is not None:
                progress(done, n_events)

        writes.run(lambda: tables.create_staging(conn))
        pending = _Rows()
        fold_call = folds.fold_call
        add_call = pending.add_call

        def flush() -> None:
            pending.flush(conn, staging=True)

        calls = _grouped(
            cur,
            "SELECT voice_id, seq, payload FROM events "
            "WHERE voice_id IS NOT NULL ORDER BY voice_id, occurred_at, seq",
            report,
        )
        for groups, group in enumerate(calls, 1):
            add_call(fold_call(group))
            if groups % _WRITE_CHUNK == 0:
                writes.run(flush)
        broadcast_rows = _cursor(reader).execute(_ALL_BROADCAST_EVENTS)
        for _, rows in itertools.groupby(broadcast_rows, key=operator.itemgetter(0)):
            pending.add_broadcast(folds.fold_broadcast([_broadcast_event(r) for r in rows]))
        writes.run(flush)
        report(n_events)

        def swap() -> None:
            tables.swap_in_staging(conn)
            _set_checkpoint(conn, head)

        if staged:
            conn.execute("BEGIN IMMEDIATE")
            try:
                swap()
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        else:
            swap()
            conn.execute("COMMIT")
    except BaseException:
        if reader.in_transaction:
            reader.execute("ROLLBACK")
        if staged:
            _drop_staging_quietly(conn)
        raise
    finally:
        if reader.in_transaction:
            reader.execute("COMMIT")
        for (_, name), (target, value) in saved.items():
            target.execute(f"PRAGMA {name} = {value}")
        if staged:
            reader.close()
        if gc_was_enabled:
            gc.enable()
    return int(n_events)


def _drop_staging_quietly(conn: sqlite3.Connection) -> None:
    """Best effort after a failed rebuild (the next rebuild drops them anyway)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        tables.drop_staging(conn)
        conn.execute("COMMIT")
    except sqlite3.Error:
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def lag(conn: sqlite3.Connection) -> tuple[int, int]:
    """(checkpoint, newest seq): how far behind the log the projections are."""
    head = _cursor(conn).execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]
    return checkpoint(conn), int(head)


def wait_for(conn: sqlite3.Connection, seq: int, timeout: float = 5.0) -> bool:
    """Block until the projections reflect `seq` (tests and `callgate up` readiness)."""
    deadline = time.monotonic() + timeout
    while checkpoint(conn) < seq:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
