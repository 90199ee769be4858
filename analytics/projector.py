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

import contextlib
import ctypes
import dataclasses
import gc
import itertools
import json
import operator
import os
import selectors
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from analytics import folds, privacy, tables
from gateway.config import Config
from gateway.db import connect, log_head_seq, transaction, utc_now
from gateway.log import erasure, eventlog, keystore, sealing
from gateway.signals import stop_on_signals

CHECKPOINT = tables.PROJECTOR_CHECKPOINT
DEFAULT_BATCH = 2000
_READ_CHUNK = 20000  # rows fetched per round trip while rebuilding
_WRITE_CHUNK = 2000  # calls folded before their rows are flushed with executemany
_PARALLEL_MIN_EVENTS = 100_000  # smaller logs fold faster than worker processes start
_MAX_WORKERS = 4
_PR_SET_PDEATHSIG = 1  # linux/prctl.h

Progress = Callable[[int, int], None]
# While rebuilding: the log is read in call order (random access into the table), so a big
# page cache and memory-mapped reads matter more than anything in Python.
_BULK_PRAGMAS = {"cache_size": -262144, "mmap_size": 2147418112, "temp_store": 2}
# On the connection writing staging: chunks are bound into in-memory TEMP tables, and
# dropping the old projections does not zero every freed page (a Debian build default):
# the rows dropped are the same calls the new tables hold, and `callgate erase` VACUUMs,
# so no erased value outlives an erasure in free pages.
_WRITE_PRAGMAS = {"temp_store": 2, "secure_delete": "FAST"}
_CHUNK_SUFFIX = "__chunk"
_NONE_TO_NULL: Callable[[None], None] = {}.get  # a C-level "return None" for sqlite3 adapters

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
    + "WHERE broadcast_id IS NOT NULL AND seq <= ? ORDER BY broadcast_id, occurred_at, seq"
)
_PER_CALL_TABLES = tuple(
    table
    for public in (tables.CALLS, tables.PLAYS, tables.RECORDINGS, tables.DTMF, tables.SPEECH)
    for table in (public, tables.PRIVATE[public.name])
)


def _cursor(conn: sqlite3.Connection) -> sqlite3.Cursor:
    """A plain-tuple cursor: sqlite3.Row per event would cost more than the fold itself."""
    cur = conn.cursor()
    cur.row_factory = None
    return cur


def ensure_tables(conn: sqlite3.Connection) -> None:
    """Create the log's and the projections' tables when missing (idempotent, cheap); a
    projection of an older shape is dropped and the whole log re-projected into the new one."""
    eventlog.ensure_schema(conn)
    have = {
        row[0]
        for row in _cursor(conn).execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if all(table.name in have for table in tables.ALL_TABLES) and not any(
        table.shape_differs(conn) for table in tables.PROJECTIONS
    ):
        return
    with transaction(conn):
        tables.create_tables(conn)


def checkpoint(conn: sqlite3.Connection) -> int:
    """Highest seq the projections reflect (0 before the first run)."""
    row = (
        _cursor(conn)
        .execute("SELECT seq FROM checkpoints WHERE name = ?", (CHECKPOINT,))
        .fetchone()
    )
    return int(row[0]) if row else 0


def _set_checkpoint(conn: sqlite3.Connection, seq: int) -> None:
    conn.execute(
        "INSERT INTO checkpoints (name, seq, updated_at) VALUES (?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
        (CHECKPOINT, seq, utc_now()),
    )


def opener(conn: sqlite3.Connection) -> sealing.Opener:
    """How this projector opens sealed payloads: the key store of conn's database."""
    return sealing.Opener(keystore.for_database(conn))


def _decode(
    rows: Iterable[tuple[int, str, str]], unseal: sealing.Opener
) -> list[dict[str, Any]]:
    """Log rows → the fold's input: the normalised payload (personal values unsealed unless
    erased) plus seq and received_at."""
    out = []
    loads = unseal.event
    for seq, received_at, payload in rows:
        event = loads(payload)
        event["seq"] = seq
        event["received_at"] = received_at
        out.append(event)
    return out


def load_call(
    conn: sqlite3.Connection, voice_id: str, unseal: sealing.Opener | None = None
) -> list[dict[str, Any]]:
    """All logged events of one call, in (occurred_at, seq) order."""
    unseal = unseal or opener(conn)
    return _decode(_cursor(conn).execute(_CALL_EVENTS, (voice_id,)), unseal)


def _broadcast_event(row: tuple[Any, ...], unseal: sealing.Opener) -> dict[str, Any]:
    """A summary decoded in full; a leg's event as just the columns the broadcast fold reads."""
    broadcast_id, seq, received_at, voice_id, cls, state, occurred_at, payload = row
    if payload is not None:
        event = unseal.event(payload)
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


def load_broadcast(
    conn: sqlite3.Connection, broadcast_id: str, unseal: sealing.Opener | None = None
) -> list[dict[str, Any]]:
    """All logged events carrying one broadcast_id (summaries and legs), in event order."""
    unseal = unseal or opener(conn)
    rows = _cursor(conn).execute(_BROADCAST_EVENTS, (broadcast_id,))
    return [_broadcast_event(r, unseal) for r in rows]


class _Rows:
    """Rows waiting to be written, grouped per table, flushed with executemany.

    Every row of a table with personal columns is split on the way in: its public form
    (the `policy` of analytics/privacy.py) for the public table, the cleartext for the
    operator-only `<table>_private`. Rebuild and incremental projection both come
    through here, so both store the same forms."""

    def __init__(self, policy: str | None = None) -> None:
        policy = resolve_policy(policy)
        self.pending: dict[str, list[folds.Row]] = {t.name: [] for t in tables.PROJECTIONS}
        self.split = {
            t.name: privacy.Splitter(
                t.column_names, t.primary_key, tables.PERSONAL[t.name], policy
            )
            for t in tables.PUBLIC_WITH_PRIVATE
        }

    def _add(self, table: tables.Table, rows: Iterable[folds.Row]) -> None:
        split = self.split[table.name]
        public = self.pending[table.name]
        private = self.pending[table.name + tables.PRIVATE_SUFFIX]
        for row in rows:
            shown, kept = split(row)
            public.append(shown)
            private.append(kept)

    def add_call(self, rows: folds.CallRows) -> None:
        self._add(tables.CALLS, (rows.call,))
        if rows.plays:
            self._add(tables.PLAYS, rows.plays)
        if rows.recordings:
            self._add(tables.RECORDINGS, rows.recordings)
        if rows.dtmf:
            self._add(tables.DTMF, rows.dtmf)
        if rows.speech:
            self._add(tables.SPEECH, rows.speech)
        if rows.marks:
            self.pending[tables.TIMELINE_MARKS.name].extend(rows.marks)

    def add_broadcast(self, rows: folds.BroadcastRows) -> None:
        self._add(tables.BROADCASTS, (rows.broadcast,))
        if rows.marks:
            self.pending[tables.TIMELINE_MARKS.name].extend(rows.marks)

    def flush(
        self, conn: sqlite3.Connection, into: Callable[[tables.Table], str] | None = None
    ) -> list[tables.Table]:
        """executemany every pending row into its table (or the table `into` names);
        returns the tables that got rows."""
        filled = []
        for table in tables.PROJECTIONS:
            rows = self.pending[table.name]
            if rows:
                sql = table.insert_sql if into is None else table.insert_sql_into(into(table))
                conn.executemany(sql, rows)
                rows.clear()
                filled.append(table)
        return filled


def resolve_policy(policy: str | None) -> str:
    """The privacy policy to project with: the one given, else CALLGATE_PUBLIC_PII."""
    return privacy.check_policy(policy if policy is not None else Config.from_env().public_pii)


def project_once(
    conn: sqlite3.Connection, batch: int = DEFAULT_BATCH, policy: str | None = None
) -> int:
    """Project up to `batch` new events; returns how many were consumed (0 = caught up).
    `policy`: the public form of personal data (default: CALLGATE_PUBLIC_PII).

    Folding happens in a read snapshot; the write transaction only swaps rows and
    moves the checkpoint, after checking nobody else moved it meanwhile (then it
    retries), so the gateway's appends wait for milliseconds at most.
    """
    ensure_tables(conn)
    unseal = opener(conn)
    policy = resolve_policy(policy)
    while True:
        # Keys destroyed by `callgate erase` since the last batch leave the cache now; an
        # erasure during the fold is caught before writing (the epoch moved): fold again.
        unseal.refresh()
        epoch = unseal.store.epoch
        conn.execute("BEGIN")
        try:
            start = checkpoint(conn)
            new = (
                _cursor(conn)
                .execute(
                    "SELECT seq, voice_id, broadcast_id, "
                    f"CASE WHEN class = '{erasure.ERASURE_CLASS}' THEN payload END "
                    "FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
                    (start, batch),
                )
                .fetchall()
            )
            if not new:
                return 0
            voice_ids = {row[1] for row in new if row[1] is not None}
            broadcast_ids = {row[2] for row in new if row[2] is not None}
            for row in new:
                if row[3] is not None:
                    # `callgate erase` re-folds what it erased itself; this makes sure of
                    # it should that step have failed or never run.
                    calls, broadcasts = erasure.erased_units(unseal.event(row[3]))
                    voice_ids.update(calls)
                    broadcast_ids.update(broadcasts)
            voice_ids, broadcast_ids = sorted(voice_ids), sorted(broadcast_ids)
            pending = _fold(conn, voice_ids, broadcast_ids, unseal, policy)
        finally:
            conn.execute("COMMIT")  # ends the read snapshot

        conn.execute("BEGIN IMMEDIATE")
        try:
            unseal.refresh()
            if checkpoint(conn) != start or unseal.store.epoch != epoch:
                # another projector or a rebuild got there first, or an erasure ran
                conn.execute("ROLLBACK")
                continue
            _delete(conn, voice_ids, broadcast_ids)
            pending.flush(conn)
            tables.refresh_summaries(conn, voice_ids)
            _set_checkpoint(conn, new[-1][0])
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return len(new)


def _fold(
    conn: sqlite3.Connection,
    voice_ids: Iterable[str],
    broadcast_ids: Iterable[str],
    unseal: sealing.Opener,
    policy: str | None = None,
) -> _Rows:
    """Fold these calls and broadcasts from all of their logged events."""
    pending = _Rows(policy)
    for voice_id in voice_ids:
        events = load_call(conn, voice_id, unseal)
        if events:
            pending.add_call(folds.fold_call(events))
    for broadcast_id in broadcast_ids:
        events = load_broadcast(conn, broadcast_id, unseal)
        if events:
            pending.add_broadcast(folds.fold_broadcast(events))
    return pending


def reproject(
    conn: sqlite3.Connection, voice_ids: Iterable[str], broadcast_ids: Iterable[str] = ()
) -> None:
    """Re-fold these calls and broadcasts in place (after `callgate erase` destroyed their
    keys, so their rows lose the personal values), leaving the checkpoint where it is."""
    calls, broadcasts = sorted(set(voice_ids)), sorted(set(broadcast_ids))
    unseal = opener(conn)
    unseal.refresh()
    with transaction(conn):
        _delete(conn, calls, broadcasts)
        _fold(conn, calls, broadcasts, unseal).flush(conn)
        tables.refresh_summaries(conn, calls)


def _delete(conn: sqlite3.Connection, voice_ids: list[str], broadcast_ids: list[str]) -> None:
    """Remove the rows of the calls and broadcasts about to be re-folded."""
    call_keys = [(voice_id,) for voice_id in voice_ids]
    for table in (*_PER_CALL_TABLES, tables.TIMELINE_MARKS):
        conn.executemany(f'DELETE FROM "{table.name}" WHERE voice_id = ?', call_keys)
    keys = [(broadcast_id,) for broadcast_id in broadcast_ids]
    conn.executemany("DELETE FROM broadcasts WHERE broadcast_id = ?", keys)
    conn.executemany("DELETE FROM broadcasts_private WHERE broadcast_id = ?", keys)
    conn.executemany("DELETE FROM timeline_marks WHERE voice_id IS NULL AND broadcast_id = ?", keys)


def project_all(
    conn: sqlite3.Connection, batch: int = DEFAULT_BATCH, policy: str | None = None
) -> int:
    """Project until caught up with the log; returns the number of events consumed."""
    total = 0
    policy = resolve_policy(policy)
    while n := project_once(conn, batch, policy):
        total += n
    return total


def follow(
    db_path: str,
    interval: float = 0.2,
    stop_event: threading.Event | None = None,
    batch: int = DEFAULT_BATCH,
    on_batch: Callable[[int], None] | None = None,
    policy: str | None = None,
) -> int:
    """Poll the log and project new events until stopped; returns events consumed.

    Stops cleanly (between transactions) on SIGTERM/SIGINT when run in the main
    thread (`callgate project --follow`, a subprocess of `callgate up`), or when
    `stop_event` is set (tests run it in a thread).
    """
    policy = resolve_policy(policy)
    stop = stop_event if stop_event is not None else threading.Event()
    restore = stop_on_signals(stop)
    conn = connect(db_path, synchronous="NORMAL")
    total = 0
    try:
        while not stop.is_set():
            try:
                n = project_once(conn, batch, policy)
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


def _calls_query(lo: str | None, hi: str | None) -> tuple[str, list[Any]]:
    """The events of the calls with lo <= voice_id < hi (None: unbounded) up to a head seq
    (the last parameter, appended by the caller), in call order: one walk of the
    (voice_id, occurred_at, seq) index."""
    where = ["voice_id IS NOT NULL"]
    params: list[Any] = []
    if lo is not None:
        where.append("voice_id >= ?")
        params.append(lo)
    if hi is not None:
        where.append("voice_id < ?")
        params.append(hi)
    sql = (
        "SELECT voice_id, seq, payload FROM events WHERE " + " AND ".join(where)
        + " AND seq <= ? ORDER BY voice_id, occurred_at, seq"
    )  # fmt: skip
    return sql, params


def _grouped(
    cur: sqlite3.Cursor,
    sql: str,
    params: list[Any],
    progress: Callable[[int], None],
    unseal: sealing.Opener,
) -> Iterator[list[dict[str, Any]]]:
    """Stream `sql` (key, seq, payload ordered by key, time, seq) as one decoded event list
    per key, without holding the log in memory. (received_at is left out: only the
    timeline needs it, and the timeline is a view over the log.)

    Walking the (voice_id, occurred_at, seq) index costs more per row than a sequential
    scan, but measured over a million events it beats a seq-order scan that groups calls
    in memory: one call's events at a time stay cache-hot, and rows are written in key
    order (inserting out of key order doubles the cost of the writes)."""
    loads = unseal.event
    cur.execute(sql, params)
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


def _staging_name(table: tables.Table) -> str:
    return table.staging_name


def _chunk_name(table: tables.Table) -> str:
    return table.name + _CHUNK_SUFFIX


class _Stager:
    """Writes a rebuild's rows into the staging tables.

    On a file database (`chunked`) every chunk is first bound into this connection's
    private TEMP tables, which takes no lock on the log's database, then copied into
    staging by SQLite itself in one short write transaction. Binding Python values is
    most of the cost of a write, so the gateway's appends (and the other workers) wait
    for the copy only, milliseconds. In-memory there is no one to wait: rows go straight
    into staging inside the rebuild's one open transaction. A worker process passes its
    parent's pid and stops before writing once orphaned."""

    def __init__(self, conn: sqlite3.Connection, chunked: bool, parent: int | None = None) -> None:
        self.conn = conn
        self.chunked = chunked
        self.parent = parent
        if chunked:
            for table in tables.PROJECTIONS:
                columns = ", ".join(f'"{name}"' for name in table.column_names)
                # Untyped columns keep values exactly as bound; staging's own column
                # types apply on the copy, as if they had been bound there directly.
                conn.execute(f'CREATE TEMP TABLE IF NOT EXISTS "{_chunk_name(table)}" ({columns})')

    def run(self, work: Callable[[], None]) -> None:
        """`work` inside a write transaction (the rebuild's open one when in-memory)."""
        if self.parent is not None and os.getppid() != self.parent:
            raise SystemExit("rebuild worker: the rebuild that started it is gone")
        if not self.chunked:
            work()
            return
        with transaction(self.conn):
            work()

    def write(self, rows: _Rows) -> None:
        """Move every pending row into the staging tables."""
        if not self.chunked:
            self.run(lambda: rows.flush(self.conn, _staging_name))
            return
        conn = self.conn
        with transaction(conn, immediate=False):  # touches only TEMP: no lock on the database file
            filled = rows.flush(conn, _chunk_name)

        def copy() -> None:
            for table in filled:
                conn.execute(
                    f'INSERT INTO main."{table.staging_name}" '
                    f'SELECT * FROM temp."{_chunk_name(table)}"'
                )

        self.run(copy)
        for table in filled:
            conn.execute(f'DELETE FROM temp."{_chunk_name(table)}"')

    def close(self) -> None:
        """Drop the TEMP tables (the connection may be the caller's)."""
        if self.chunked:
            for table in tables.PROJECTIONS:
                self.conn.execute(f'DROP TABLE IF EXISTS temp."{_chunk_name(table)}"')


def _fold_calls(
    reader: sqlite3.Connection,
    stager: _Stager,
    head: int,
    lo: str | None = None,
    hi: str | None = None,
    progress: Callable[[int], None] = lambda done: None,
    policy: str | None = None,
) -> None:
    """Fold every call with lo <= voice_id < hi, as of `head`, into the staging tables."""
    unseal = opener(reader)
    unseal.store.preload()  # every call is opened: one read of the key store, not one per call
    sql, params = _calls_query(lo, hi)
    pending = _Rows(policy)
    fold_call = folds.fold_call
    add_call = pending.add_call
    grouped = _grouped(_cursor(reader), sql, [*params, head], progress, unseal)
    for groups, group in enumerate(grouped, 1):
        add_call(fold_call(group))
        if groups % _WRITE_CHUNK == 0:
            stager.write(pending)
    stager.write(pending)


def _fold_broadcasts(
    reader: sqlite3.Connection, stager: _Stager, head: int, policy: str | None = None
) -> None:
    """Fold every broadcast, as of `head`, into the staging tables (a few rows: one chunk)."""
    pending = _Rows(policy)
    unseal = opener(reader)
    rows = _cursor(reader).execute(_ALL_BROADCAST_EVENTS, (head,))
    for _, group in itertools.groupby(rows, key=operator.itemgetter(0)):
        pending.add_broadcast(folds.fold_broadcast([_broadcast_event(r, unseal) for r in group]))
    stager.write(pending)


def _split_points(reader: sqlite3.Connection, parts: int) -> list[str]:
    """voice_ids cutting the calls' events into `parts` ranges of about equal size, read off
    the (voice_id, ...) index; a call never straddles two ranges."""
    cur = _cursor(reader)
    n = cur.execute("SELECT COUNT(*) FROM events WHERE voice_id IS NOT NULL").fetchone()[0]
    points: list[str] = []
    for k in range(1, parts):
        row = cur.execute(
            "SELECT voice_id FROM events WHERE voice_id IS NOT NULL ORDER BY voice_id "
            "LIMIT 1 OFFSET ?",
            (n * k // parts,),
        ).fetchone()
        if row is not None and (not points or row[0] > points[-1]):
            points.append(row[0])
    return points


def _worker_count(workers: int | None, n_events: int) -> int:
    """Processes to fold calls in: `workers` if given, else one per CPU (at most
    _MAX_WORKERS) for logs big enough to pay for starting them. POSIX only (the workers'
    pipes are multiplexed with selectors)."""
    if os.name != "posix":
        return 1
    if workers is not None:
        return max(1, workers)
    if n_events < _PARALLEL_MIN_EVENTS:
        return 1
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(_MAX_WORKERS, cpus or 1))


class _Workers:
    """Worker processes (`_worker_main`), each folding one voice_id range into the staging
    tables through its own connections: the fold is CPU-bound Python, so processes, not
    threads. `close()` kills whatever still runs, so no worker outlives a failed or
    interrupted rebuild (and the kernel kills them if this process dies, see
    `_die_with_parent`)."""

    def __init__(self, count: int) -> None:
        """Start `count` workers; they import while the caller prepares their jobs."""
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.assigned = 0
        try:
            for _ in range(count):
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-c", _WORKER_CODE, str(os.getpid())],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        env=env,
                    )
                )
        except BaseException:
            self.close()
            raise

    def start(
        self,
        path: str,
        head: int,
        ranges: list[tuple[str | None, str | None]],
        keys: str,
        policy: str,
    ) -> None:
        """Give each worker its voice_id range (and the key store's file: the master key,
        if any, comes with the environment) and the privacy policy; workers left without
        one just exit."""
        self.assigned = min(len(ranges), len(self.procs))
        for index, proc in enumerate(self.procs):
            assert proc.stdin is not None
            if index < self.assigned:
                lo, hi = ranges[index]
                job = {"db": path, "lo": lo, "hi": hi, "head": head, "keys": keys,
                       "policy": policy}  # fmt: skip
                proc.stdin.write(json.dumps(job).encode() + b"\n")
            proc.stdin.close()

    def wait(self, progress: Callable[[int], None]) -> None:
        """Relay the workers' progress until all have finished; raise if any failed."""
        done = [0] * len(self.procs)
        finished = [False] * len(self.procs)
        pending = [b""] * len(self.procs)
        with selectors.DefaultSelector() as selector:
            for index, proc in enumerate(self.procs):
                assert proc.stdout is not None
                selector.register(proc.stdout, selectors.EVENT_READ, index)
            while selector.get_map():
                for key, _ in selector.select():
                    index = key.data
                    data = os.read(key.fd, 65536)
                    if not data:
                        selector.unregister(key.fileobj)
                        continue
                    *lines, pending[index] = (pending[index] + data).split(b"\n")
                    for line in lines:
                        message = json.loads(line)
                        if "error" in message:
                            raise RuntimeError(f"rebuild worker failed:\n{message['error']}")
                        if "ok" in message:
                            finished[index] = True
                        done[index] = message.get("done", done[index])
                    progress(sum(done))
        for index, proc in enumerate(self.procs):
            code = proc.wait()
            if code != 0 or (index < self.assigned and not finished[index]):
                raise RuntimeError(f"rebuild worker {index} exited with status {code}")

    def close(self) -> None:
        """Kill every worker still running and reap them all (idempotent)."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs:
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None and not pipe.closed:
                    pipe.close()

    def __enter__(self) -> _Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_WORKER_CODE = "from analytics.projector import _worker_main; raise SystemExit(_worker_main())"


def _die_with_parent(parent: int) -> int:
    """Linux: have the kernel SIGKILL this worker when the rebuild's process dies (even by
    SIGKILL), so an orphan never writes into the staging tables of a later rebuild.
    Elsewhere `_Stager` checks the parent before each write transaction. `parent` is the
    pid the rebuild passed on the command line: reading it here with getppid() would see
    the adoptive parent when the rebuild died while this worker was still importing."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # it died before prctl took effect
        raise SystemExit(1)
    return parent


def _worker_main() -> int:
    """Entry point of a rebuild worker process: read its job (one JSON line on stdin), fold
    that voice_id range, report on stdout (one JSON object per line: progress, then ok
    or error)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent = _die_with_parent(int(sys.argv[1]))
    gc.disable()
    # Binding None goes through sqlite3's adapter lookup, whose miss raises and swallows an
    # AttributeError per NULL (a third of the write time); a registered adapter answers
    # at once. Process-wide state, so only ever set in this dedicated process.
    sqlite3.register_adapter(type(None), _NONE_TO_NULL)
    out = sys.stdout

    def send(message: dict[str, Any]) -> None:
        out.write(json.dumps(message) + "\n")
        out.flush()

    try:
        line = sys.stdin.readline()
        if not line:  # the parent closed our stdin without a job: nothing to do
            return 0
        job = json.loads(line)
        reader = connect(job["db"], synchronous="NORMAL")
        writer = connect(job["db"], synchronous="NORMAL")
        config = dataclasses.replace(Config.from_env(job["db"]), keys_db=job["keys"])
        keystore.for_database(reader, config)
        for name, value in _BULK_PRAGMAS.items():
            reader.execute(f"PRAGMA {name} = {value}")
        for name, value in _WRITE_PRAGMAS.items():
            writer.execute(f"PRAGMA {name} = {value}")
        # Its reader's snapshot pins the WAL anyway: the parent checkpoints after the swap.
        writer.execute("PRAGMA wal_autocheckpoint = 0")
        stager = _Stager(writer, chunked=True, parent=parent)
        _fold_calls(
            reader, stager, job["head"], job["lo"], job["hi"], lambda n: send({"done": n}),
            job["policy"],
        )
        reader.close()
        writer.close()
    except BaseException:
        send({"error": traceback.format_exc()})
        return 1
    send({"ok": True})
    return 0


class _Checkpointer:
    """Checkpoints the staging tables' pages from the WAL into the database file in a
    thread, while the swap builds the indexes: SQLite releases the GIL in both, the
    index build is CPU and the checkpoint mostly I/O, and a PASSIVE checkpoint never
    waits for (nor blocks) a writer."""

    def __init__(self, path: str) -> None:
        self.thread = threading.Thread(target=self._run, args=(path,), daemon=True)

    @staticmethod
    def _run(path: str) -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass  # best effort: the final checkpoint (or the next commit) does it
        finally:
            conn.close()

    def join(self) -> None:
        if self.thread.is_alive():
            self.thread.join()

    def __enter__(self) -> _Checkpointer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.join()


def rebuild(
    conn: sqlite3.Connection,
    progress: Progress | None = None,
    workers: int | None = None,
    policy: str | None = None,
) -> int:
    """Rebuild every projection from seq 1; readers never see a half-built table.

    The log up to its current head is folded into staging tables (short write
    transactions); one short final transaction drops the old tables, renames the
    staging ones into place, indexes them and sets the checkpoint to that head. The log
    is append-only, so "seq <= head" is a snapshot every connection can read without
    holding one open. Events appended meanwhile are left to the incremental projector.

    Calls are folded by `workers` processes (default: one per CPU for big logs), each
    owning a range of voice_ids; an in-memory database is folded in this process.
    Returns the number of events folded. `progress(done, total)` follows the fold.
    `policy`: the public form of personal data (default: CALLGATE_PUBLIC_PII).
    """
    policy = resolve_policy(policy)
    ensure_tables(conn)
    unseal = opener(conn)
    unseal.refresh()
    epoch = unseal.store.epoch
    path = _db_file(conn)
    reader = connect(path, synchronous="NORMAL") if path else conn
    staged = reader is not conn
    stager: _Stager | None = None
    stack = contextlib.ExitStack()
    stack.enter_context(_bulk_mode(reader, conn))
    if not staged:  # in-memory: one transaction from the first read to the swap
        conn.execute("BEGIN IMMEDIATE")
    try:
        head, n_events = (
            _cursor(reader).execute("SELECT COALESCE(MAX(seq), 0), COUNT(*) FROM events").fetchone()
        )

        def report(done: int) -> None:
            if progress is not None:
                progress(done, n_events)

        n_workers = _worker_count(workers, n_events) if staged else 1
        # Started first: they import while this process creates the staging tables.
        pool = stack.enter_context(_Workers(n_workers)) if n_workers > 1 else None
        stager = _Stager(conn, chunked=staged)
        stager.run(lambda: tables.create_staging(conn))
        _fold_into_staging(reader, stager, path, head, pool, report, unseal.store.path, policy)
        report(n_events)

        def swap() -> None:
            unseal.refresh()
            if unseal.store.epoch != epoch:  # its rows may hold what was just erased
                raise RuntimeError("an erasure ran during the rebuild: run the rebuild again")
            tables.swap_in_staging(conn)
            _set_checkpoint(conn, head)

        if staged:
            checkpointer = stack.enter_context(_Checkpointer(path))
            with transaction(conn):
                swap()
            checkpointer.join()
            # The swap's own pages (new indexes, freed pages), now rather than in the
            # commit of whichever webhook comes next.
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        else:
            swap()
            conn.execute("COMMIT")
    except BaseException:
        stack.close()  # kill any worker still running: none may write after this
        if not staged and conn.in_transaction:
            conn.execute("ROLLBACK")
        if staged:
            _drop_staging_quietly(conn)
        raise
    finally:
        stack.close()
        if stager is not None:
            stager.close()
        if staged:
            reader.close()
    return int(n_events)


@contextlib.contextmanager
def _bulk_mode(reader: sqlite3.Connection, conn: sqlite3.Connection) -> Iterator[None]:
    """Bulk-load pragmas on both connections and no cyclic GC, restored afterwards.

    The fold makes no reference cycles; the cyclic GC would only rescan millions of
    short-lived event dicts over and over.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    saved: dict[tuple[int, str], tuple[sqlite3.Connection, Any]] = {}
    try:
        for target, pragmas in ((reader, _BULK_PRAGMAS), (conn, _BULK_PRAGMAS | _WRITE_PRAGMAS)):
            for name, value in pragmas.items():
                current = target.execute(f"PRAGMA {name}").fetchone()
                if current is None:  # (in-memory: no mmap_size)
                    continue
                saved.setdefault((id(target), name), (target, current[0]))
                target.execute(f"PRAGMA {name} = {value}")
        yield
    finally:
        for (_, name), (target, value) in saved.items():
            target.execute(f"PRAGMA {name} = {value}")
        if gc_was_enabled:
            gc.enable()


def _fold_into_staging(
    reader: sqlite3.Connection,
    stager: _Stager,
    path: str | None,
    head: int,
    pool: _Workers | None,
    report: Callable[[int], None],
    keys: str,
    policy: str,
) -> None:
    """Calls by the worker pool (each a range of voice_ids) or in this process; broadcasts
    here, while the workers fold. `keys`: the key store's file, for the workers."""
    if pool is None:
        _fold_calls(reader, stager, head, progress=report, policy=policy)
        _fold_broadcasts(reader, stager, head, policy)
        return
    bounds = [None, *_split_points(reader, len(pool.procs)), None]
    pool.start(path, head, list(itertools.pairwise(bounds)), keys, policy)
    _fold_broadcasts(reader, stager, head, policy)
    pool.wait(report)
    pool.close()


def _drop_staging_quietly(conn: sqlite3.Connection) -> None:
    """Best effort after a failed rebuild (the next rebuild drops them anyway)."""
    with contextlib.suppress(sqlite3.Error), transaction(conn):
        tables.drop_staging(conn)


def lag(conn: sqlite3.Connection) -> tuple[int, int]:
    """(checkpoint, newest seq): how far behind the log the projections are."""
    head = log_head_seq(conn)
    return checkpoint(conn), int(head)


def wait_for(conn: sqlite3.Connection, seq: int, timeout: float = 5.0) -> bool:
    """Block until the projections reflect `seq` (tests and `callgate up` readiness)."""
    deadline = time.monotonic() + timeout
    while checkpoint(conn) < seq:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
