"""Group commit: concurrent requests share one transaction and one fsync.

Each gunicorn worker process owns one writer thread and one write connection.
Request threads hand their event to the writer and block; the writer takes
everything queued, appends it in a single transaction, and only after COMMIT
returns releases each request with its own result. So an acknowledgement
still means "durable", but a burst of N concurrent webhooks costs one fsync
instead of N.

The writers of different worker processes take turns on a lock file
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
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator

from gateway.db import connect
from gateway.log import eventlog, keystore

MAX_BATCH = 512
# How long a batch may wait for requests already in flight to join it.
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
                self._lock_fd = os.open(db_path + "-writer.lock", os.O_RDWR | os.O_CREAT, 0o600)
                self._gate_fd = os.open(db_path + "-writer.gate", os.O_RDWR | os.O_CREAT, 0o600)
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
            lead_fd: int | None = os.open(
                self.db_path + "-checkpointer.lock", os.O_RDWR | os.O_CREAT, 0o600
            )
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
    """One submitted event and the lock its request thread waits on until it is settled.

    A bare lock rather than a `Future`: a Future's condition variable and callback
    machinery cost more than the insert itself at a few thousand events a second.
    """

    __slots__ = ("make", "result", "error", "_settled")

    def __init__(self, make: Callable[[sqlite3.Connection], eventlog.NewEvent]) -> None:
        self.make = make
        self.result: eventlog.AppendResult | None = None
        self.error: BaseException | None = None
        self._settled = threading.Lock()
        self._settled.acquire()

    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def set_result(self, result: eventlog.AppendResult) -> None:
        self.result = result
        self._settled.release()

    def set_exception(self, error: BaseException) -> None:
        self.error = error
        self._settled.release()

    def wait(self, timeout: float) -> eventlog.AppendResult:
        if not self._settled.acquire(timeout=timeout):
            raise TimeoutError("the event log writer did not answer in time")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class BatchWriter:
    """One writer thread per process; started lazily so it is created after fork.

    Every commit costs an fsync, and on a virtualised disk an fsync costs as much
    CPU as three or four inserts (about 150 µs against 45 µs on the development VM),
    so small batches waste most of a writer's time on fsyncs. The writer
    therefore waits, at most `gather_seconds`, for requests that are already being
    handled (`admitted`) to hand in their events: it commits once every admitted
    request has queued. A lone request under light load is committed at once.
    """

    def __init__(
        self,
        db_path: str,
        synchronous: str = "FULL",
        max_batch: int = MAX_BATCH,
        busy_timeout: float = 5.0,
        gather_seconds: float = GATHER_SECONDS,
        checkpoint: str = "passive",
    ) -> None:
        self.db_path = db_path
        self.checkpoint = checkpoint  # Checkpointer's mode; "off": none is started
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.gather_seconds = gather_seconds
        self.batches = 0
        self.events = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._checkpointer: Checkpointer | None = None

    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Mark a request that may submit an event: the writer waits for it to join."""
        with self._lock:
            self._admitted += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitted -= 1

    def submit(
        self, make: Callable[[sqlite3.Connection], eventlog.NewEvent], timeout: float = 30.0
    ) -> eventlog.AppendResult:
        """Block until the event built by `make` (inside the writer) is committed."""
        self._ensure_thread()
        job = _Job(make)
        self._queue.put(job)
        return job.wait(timeout)

    def _ensure_thread(self) -> None:
        if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            if self._pid != os.getpid() or self._thread is None or not self._thread.is_alive():
                self._queue = queue.SimpleQueue()
                self._pid = os.getpid()
                self._thread = threading.Thread(
                    target=self._run, name="callgate-writer", daemon=True
                )
                self._thread.start()
                alive = self._checkpointer is not None and self._checkpointer.is_alive()
                if self.db_path != ":memory:" and self.checkpoint != "off" and not alive:
                    self._checkpointer = Checkpointer(
                        self.db_path, CHECKPOINT_SECONDS, self.busy_timeout, self.checkpoint
                    )
                    self._checkpointer.start()

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(5)
        if self._checkpointer is not None and self._checkpointer.is_alive():
            self._checkpointer.stop()
            self._checkpointer.join(5)

    def _take(self, jobs: list[_Job], wait_until: float | None) -> bool:
        """Add queued jobs to `jobs`, waiting for admitted stragglers until `wait_until`.

        Returns False once the stop sentinel is seen (it is put back for `_run`).
        """
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                if wait_until is None or len(jobs) >= self._admitted:
                    return True
                remaining = wait_until - time.monotonic()
                if remaining <= 0:
                    return True
                try:
                    job = self._queue.get(timeout=remaining)
                except queue.Empty:
                    return True
            if job is None:
                self._queue.put(None)
                return False
            jobs.append(job)
        return True

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        lock = WriterLock(self.db_path, self.busy_timeout)
        while True:
            first = self._queue.get()
            if first is None:
                break
            jobs = [first]
            self._take(jobs, time.monotonic() + self.gather_seconds)
            try:
                if conn is None:
                    conn = connect(self.db_path, self.synchronous, self.busy_timeout)
                    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES}")
                    keystore.for_database(conn)  # opened (and checked) outside the lock
                with lock:
                    # Whatever queued while another process held the lock rides along.
                    self._take(jobs, None)
                    self._commit(conn, jobs)
            except (sqlite3.Error, keystore.KeyStoreError) as exc:
                # Nothing in this batch was committed: every waiter gets the error (→ 503).
                for job in jobs:
                    if not job.done():
                        job.set_exception(exc)
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                conn = None
        if conn is not None:
            conn.close()
        lock.close()

    def _commit(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        items = []
        live = []
        for job in jobs:
            try:
                items.append(job.make(conn))
                live.append(job)
            except sqlite3.Error:
                raise
            except Exception as exc:  # a bad item must not take its batch down with it
                job.set_exception(exc)
        if not items:
            return
        results = eventlog.append_batch(conn, items)
        self.batches += 1
        self.events += len(items)
        for job, result in zip(live, results, strict=True):
            job.set_result(result)
