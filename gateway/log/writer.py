"""Group commit: concurrent requests share one transaction and one fsync.

There is no writer thread. A request thread whose event is accepted queues it and,
if no commit is under way in its process, becomes the *leader*: it takes the
writers' lock file, takes every event queued by then, appends them in one
transaction and, only after COMMIT returned, releases each follower with its own
result (so an acknowledgement still means "durable"). Followers sleep on a lock of
their own; before the leader returns it promotes the first event queued meanwhile
to lead the next batch. A leading request pays no thread wake-up and a following
one exactly one, where a writer thread cost every request two hand-offs (to the
writer and back) plus the writer's own wake-ups; and while one batch fsyncs, with
the GIL released, the next batch's requests are decrypted and validated.

The leaders of different worker processes take turns on a lock file
(`WriterLock`) before BEGIN IMMEDIATE. Left to SQLite, a writer that finds
the database locked sleeps in growing steps (up to 100 ms) and retries, so
two busy workers stall each other for hundreds of milliseconds; on the lock
file the waiter retries every half millisecond and meanwhile its queue grows
into a bigger batch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeAlias

from gateway.db import connect
from gateway.log import eventlog, keystore

MAX_BATCH = 512
# How long a leader may wait for requests already in flight to join its batch.
GATHER_SECONDS = 0.002


LOCK_POLL_SECONDS = 0.0005
# WAL checkpoints. A commit writes three or four pages per event (strace of a loaded
# writer), mostly index leaves that later events dirty again. With SQLite's default
# (the committing connection checkpoints once the WAL passes 1,000 pages) the writer
# copied them into the database, and fsynced it, every few hundred events, on the
# commit path. Instead a checkpointer thread copies whatever the WAL holds every
# CHECKPOINT_SECONDS, mostly concurrently with commits (see `Checkpointer`), so
# webhooks wait only for the last few pages of each; the writer's own autocheckpoint
# stays as a backstop at 10,000 pages (a WAL of ~40 MB) should the checkpointer fall
# behind.
# The interval trades throughput (rewrites of hot pages coalesce) against the WAL's
# size and the disk it shares with commits. bench/ingest.py --rounds 4 --duration 8
# --latency-at 0.7 (B/A, then p99 at 70 % load): 0.25 s 0.504 / 24.7 ms; 0.5 s
# 0.512 / 24.9 ms with the WAL at ~22 MB; 1 s let the WAL reach the backstop.
CHECKPOINT_SECONDS = 0.5
WAL_AUTOCHECKPOINT_PAGES = 10_000


BatchObserver: TypeAlias = Callable[[int, float, float], None]
"""Told (events committed, seconds waited for the writers' turn, seconds it was held)
after each group commit; `serve` passes the Prometheus histograms' observe."""


class WriterLock:
    """Exclusive, fair-enough turns on the log for our writer processes (lock files).

    Two `flock`s next to the database: `-writer.lock` is held while writing, and
    `-writer.gate` is held by the one process waiting for it. A writer that has
    just finished must pass the gate again, which the waiter holds, so it cannot
    snatch the lock back ahead of a waiting process: turns alternate.

    Bounded like SQLite's busy timeout: not getting a turn in time raises the same
    `sqlite3.OperationalError` a locked database would, so callers answer 503.
    If the lock files cannot be opened (read-only directory), writers fall back to
    SQLite's own locking, which is always correct, only slower under contention.
    """

    def __init__(self, db_path: str, timeout: float) -> None:
        self.timeout = timeout
        self._lock_fd: int | None = None
        self._gate_fd: int | None = None
        if db_path != ":memory:":
            try:
                self._lock_fd = open_lock_file(db_path, "-writer.lock")
                self._gate_fd = open_lock_file(db_path, "-writer.gate")
            except OSError:
                self.close()

    def __enter__(self) -> WriterLock:
        if self._lock_fd is None or self._gate_fd is None:
            return self
        deadline = time.monotonic() + self.timeout
        _flock_until(self._gate_fd, deadline)
        try:
            _flock_until(self._lock_fd, deadline)
        finally:
            fcntl.flock(self._gate_fd, fcntl.LOCK_UN)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def close(self) -> None:
        for fd in (self._lock_fd, self._gate_fd):
            if fd is not None:
                os.close(fd)
        self._lock_fd = self._gate_fd = None


def open_lock_file(db_path: str, suffix: str) -> int:
    """Open (creating it 0600) a lock file beside the database, owned like the database.

    A command run as root (`callgate erase` from root's cron) would otherwise create it
    root's, and a gateway running as the database's owner could not open it and would
    fall back to SQLite's slower locking. SQLite hands its own -wal and -shm files to the
    database's owner the same way."""
    fd = os.open(db_path + suffix, os.O_RDWR | os.O_CREAT, 0o600)
    if os.geteuid() == 0:
        try:
            owner = os.stat(db_path)
            if os.fstat(fd).st_uid != owner.st_uid:
                os.fchown(fd, owner.st_uid, owner.st_gid)
        except OSError:
            pass  # no database file yet: its creator owns both
    return fd


def _flock_until(fd: int, deadline: float) -> None:
    """Take an exclusive flock, retrying every LOCK_POLL_SECONDS until `deadline`."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError("database is locked (writer lock)") from None
            time.sleep(LOCK_POLL_SECONDS)


class Checkpointer(threading.Thread):
    """Copies the WAL into the database every `seconds` until stopped (best effort).

    First the bulk, concurrently with commits; then, holding the writers' lock
    file, the few pages committed meanwhile. Only a checkpoint that reaches the
    end of the WAL lets the next commit start it over: without that pause a
    busy log's WAL never restarts, and the writers' own backstop checkpoint ends
    up running on the commit path after all.

    Every worker process starts one, but only the holder of an flock on
    `<db>-checkpointer.lock` checkpoints (`leading`); the others retry the lock
    each interval, so when the leader's process dies the kernel drops its lock and
    another takes over. Without the lock file (read-only directory) every one of
    them checkpoints, which SQLite serialises: correct, only wasteful.

    `mode` (CALLGATE_CHECKPOINT) is "passive", or "truncate": the paused step is a
    TRUNCATE, which also empties the WAL file but waits for every reader, up to the
    busy timeout, with the writers paused. Beside Litestream, whose read transaction
    never ends, that wait is a commit stall every interval, so `replicate` wants
    "passive" (or "off": no checkpointer, Litestream and the writers' backstop only).
    """

    def __init__(self, db_path: str, seconds: float, timeout: float,
                 mode: str = "passive") -> None:
        super().__init__(name="callgate-checkpointer", daemon=True)
        self.db_path = db_path
        self.seconds = seconds
        self.timeout = timeout
        self.final = "TRUNCATE" if mode == "truncate" else "PASSIVE"
        self.leading = False
        self._stopped = threading.Event()

    def stop(self) -> None:
        self._stopped.set()

    def run(self) -> None:
        conn: sqlite3.Connection | None = None
        lock = WriterLock(self.db_path, self.timeout)
        try:
            lead_fd: int | None = open_lock_file(self.db_path, "-checkpointer.lock")
        except OSError:
            lead_fd = None
        while not self._stopped.wait(self.seconds):
            if not self.leading:
                self.leading = _try_flock(lead_fd)
                if not self.leading:
                    continue
            try:
                if conn is None:
                    conn = connect(self.db_path, "FULL", self.timeout)  # fsyncs the db
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                with lock:
                    conn.execute(f"PRAGMA wal_checkpoint({self.final})").fetchone()
            except sqlite3.Error:
                if conn is not None:
                    conn.close()
                conn = None  # the writer's autocheckpoint is the backstop meanwhile
        if conn is not None:
            conn.close()
        lock.close()
        self.leading = False
        if lead_fd is not None:
            os.close(lead_fd)  # releases the lead to another process's checkpointer


def _try_flock(fd: int | None) -> bool:
    """Take an exclusive flock without waiting; True also when there is no lock file."""
    if fd is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class _Job:
    """One submitted event and the lock its request thread sleeps on until the event is
    settled (committed or failed) or the thread is promoted to lead the next commit.

    A bare lock rather than a `Future`: a Future's condition variable and callback
    machinery cost more than the insert itself at a few thousand events a second.
    """

    __slots__ = ("make", "result", "error", "promoted", "_wake")

    def __init__(self, make: Callable[[sqlite3.Connection], eventlog.NewEvent]) -> None:
        self.make = make
        self.result: eventlog.AppendResult | None = None
        self.error: BaseException | None = None
        self.promoted = False
        self._wake = threading.Lock()
        self._wake.acquire()

    def settled(self) -> bool:
        return self.result is not None or self.error is not None

    def settle(self, result: eventlog.AppendResult | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        self._wake.release()

    def promote(self) -> None:
        self.promoted = True
        self._wake.release()

    def sleep(self, timeout: float) -> bool:
        """Until settled or promoted; False if `timeout` passed first."""
        return self._wake.acquire(timeout=timeout)

    def outcome(self) -> eventlog.AppendResult:
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class BatchWriter:
    """Leader-based group commit for one process (see the module docstring).

    State is per process and created on first use, so a writer built before a fork
    starts clean in the child: its queue, its write connection, its checkpointer.
    `gather_seconds` lets a leader wait, that long at most, for requests already
    being handled (`admitted`) to queue their events first, so fewer fsyncs carry
    the same events (bench/README.md: on the 2-CPU VM a commit costs about 450 µs of
    CPU whatever its size, and gathering raised requests/s); a lone request under
    light load has nobody to wait for and commits at once.
    """

    def __init__(
        self,
        db_path: str,
        synchronous: str = "FULL",
        max_batch: int = MAX_BATCH,
        busy_timeout: float = 5.0,
        gather_seconds: float = GATHER_SECONDS,
        checkpoint: str = "passive",
        observer: BatchObserver | None = None,
    ) -> None:
        self.db_path = db_path
        self.observer = observer
        self.checkpoint = checkpoint  # Checkpointer's mode; "off": none is started
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self.batches = 0
        self.events = 0
        self._mutex = threading.Lock()  # guards everything below
        self._pending: list[_Job] = []
        self._leading = False  # a request thread is committing, or promoted to
        self._waiting = 0  # admitted requests that have not queued an event (yet)
        self._gathering: threading.Lock | None = None  # a leader sleeps on it
        self._pid: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._store: keystore.KeyStore | None = None
        self._lock: WriterLock | None = None
        self._checkpointer: Checkpointer | None = None

    def admitted(self) -> _Admission:
        """Mark a request that may submit an event (`with writer.admitted():`): a gathering
        leader waits for it."""
        return _Admission(self)

    def submit(
        self, make: Callable[[sqlite3.Connection], eventlog.NewEvent], timeout: float = 30.0
    ) -> eventlog.AppendResult:
        """Block until the event built by `make` (inside the commit) is committed."""
        job = _Job(make)
        marker = _admission.current()
        with self._mutex:
            self._for_this_process()
            self._pending.append(job)
            if marker is not None and marker.writer is self and not marker.queued:
                marker.queued = True
                self._waiting -= 1
            lead = not self._leading
            self._leading = True
            self._wake_gatherer()
        if not lead and not job.sleep(timeout):
            with self._mutex:
                if not job.promoted and not job.settled():
                    with contextlib.suppress(ValueError):
                        self._pending.remove(job)
                    raise TimeoutError("the event log writer did not answer in time")
        if lead or job.promoted:
            self._lead()
        return job.outcome()

    def _for_this_process(self) -> None:
        """Per-process state, (re)created after a fork; called holding the mutex."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._pending = []
        self._leading = False
        self._waiting = 0
        self._gathering = None
        self._conn = None
        self._store = None
        self._lock = WriterLock(self.db_path, self.busy_timeout)
        if self.db_path != ":memory:" and self.checkpoint != "off":
            self._checkpointer = Checkpointer(
                self.db_path, CHECKPOINT_SECONDS, self.busy_timeout, self.checkpoint
            )
            self._checkpointer.start()

    def _wake_gatherer(self) -> None:
        """Release a gathering leader once nobody admitted is still on the way (mutex held)."""
        if self._gathering is not None and self._waiting <= 0:
            self._gathering.release()
            self._gathering = None

    def _gather(self) -> None:
        """Wait at most `gather_seconds` for admitted requests to queue their events."""
        with self._mutex:
            if self.gather_seconds <= 0 or self._waiting <= 0:
                return
            gate = self._gathering = threading.Lock()
            gate.acquire()
        gate.acquire(timeout=self.gather_seconds)
        with self._mutex:
            if self._gathering is gate:
                self._gathering = None

    def _take(self) -> list[_Job]:
        with self._mutex:
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
        return batch

    def _lead(self) -> None:
        """Commit what is queued (the leader's own event first), then pass the lead on."""
        assert self._lock is not None
        batch: list[_Job] = []
        observed: tuple[int, float, float] | None = None
        try:
            self._gather()
            if self._conn is None:
                self._conn = connect(self.db_path, self.synchronous, self.busy_timeout)
                self._conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
                # Opened (and checked) outside the lock, once: looking it up per batch
                # would cost a query, and every query releases the GIL.
                self._store = keystore.for_database(self._conn)
            asked = time.perf_counter()
            with self._lock:
                turn = time.perf_counter()
                # Whatever queued while another process held the lock rides along.
                batch = self._take()
                committed = self._commit(self._conn, batch)
            observed = (committed, turn - asked, time.perf_counter() - turn)
        except Exception as exc:
            # Nothing in this batch was committed: every waiter gets the error (a storage
            # error becomes 503), also when the lock was never ours, as a locked database
            # would fail them.
            for job in batch or self._take():
                if not job.settled():
                    job.settle(None, exc)
            if isinstance(exc, sqlite3.Error | keystore.KeyStoreError) and self._conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.close()
                self._conn = None
        finally:
            with self._mutex:
                if self._pending:
                    self._pending[0].promote()
                else:
                    self._leading = False
        if observed is not None and observed[0] and self.observer is not None:
            # After the next leader took over; the events are committed and their
            # requests answered 2xx, so a failing metrics sink must not turn that into
            # an error.
            with contextlib.suppress(Exception):
                self.observer(*observed)

    def close(self) -> None:
        """Stop this process's checkpointer and close the write connection if idle."""
        if self._checkpointer is not None and self._checkpointer.is_alive():
            self._checkpointer.stop()
            self._checkpointer.join(5)
        with self._mutex:
            if self._leading:
                return  # a request is committing: it still needs the connection and lock
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock is not None:
                self._lock.close()
            self._pid = None  # used again, it starts afresh (lock files, checkpointer)

    def _commit(self, conn: sqlite3.Connection, jobs: list[_Job]) -> int:
        """Append the jobs' events in one transaction and settle them; how many were."""
        items = []
        live = []
        for job in jobs:
            try:
                items.append(job.make(conn))
                live.append(job)
            except sqlite3.Error:
                raise
            except Exception as exc:  # a bad item must not take its batch down with it
                job.settle(None, exc)
        if not items:
            return 0
        try:
            results = eventlog.append_batch(conn, items, self._store)
        except (sqlite3.Error, keystore.KeyStoreError):
            raise  # storage: nothing of the batch was committed, every waiter gets it
        except Exception:
            if len(items) == 1:
                raise
            # One event the log cannot take (it rolled back the whole batch): append them
            # one by one so only that event fails and the others are still committed.
            return self._commit_each(conn, live, items)
        self.batches += 1
        self.events += len(items)
        for job, result in zip(live, results, strict=True):
            job.settle(result, None)
        return len(items)

    def _commit_each(
        self, conn: sqlite3.Connection, jobs: list[_Job], items: list[eventlog.NewEvent]
    ) -> int:
        committed = 0
        for job, item in zip(jobs, items, strict=True):
            try:
                result = eventlog.append_batch(conn, [item], self._store)[0]
            except (sqlite3.Error, keystore.KeyStoreError):
                raise  # the caller fails the jobs not settled yet
            except Exception as exc:
                job.settle(None, exc)
                continue
            self.batches += 1
            self.events += 1
            committed += 1
            job.settle(result, None)
        return committed


class _Admission:
    """One admitted request: whose writer admitted it, and whether it has queued yet.

    A class with __enter__/__exit__ rather than a generator context manager: it wraps
    every webhook, and a generator costs several times as much to enter and leave."""

    __slots__ = ("writer", "queued", "_outer")

    def __init__(self, writer: BatchWriter) -> None:
        self.writer = writer
        self.queued = False
        self._outer: _Admission | None = None

    def __enter__(self) -> _Admission:
        with self.writer._mutex:
            # Set up first: doing it on the first submit would zero the count of the
            # requests admitted before it, and each would then take itself off again.
            self.writer._for_this_process()
            self.writer._waiting += 1
        self._outer, _admission.marker = _admission.marker, self
        return self

    def __exit__(self, *exc: object) -> None:
        _admission.marker = self._outer
        if not self.queued:
            with self.writer._mutex:
                self.writer._waiting -= 1
                self.writer._wake_gatherer()


class _ThreadAdmission(threading.local):
    """The admission of the request this thread is handling (None outside one)."""

    marker: _Admission | None = None

    def current(self) -> _Admission | None:
        return self.marker


_admission = _ThreadAdmission()
