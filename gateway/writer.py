"""Group commit: concurrent requests share one transaction and one fsync.

Each gunicorn worker process owns one writer thread and one write connection.
Request threads hand their event to the writer and block; the writer takes
everything queued, appends it in a single transaction, and only after COMMIT
returns releases each request with its own result. So an acknowledgement
still means "durable", but a burst of N concurrent webhooks costs one fsync
instead of N.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from gateway import eventlog

MAX_BATCH = 512


@dataclass
class _Job:
    make: Callable[[sqlite3.Connection], eventlog.NewEvent]
    future: Future[eventlog.AppendResult]


class BatchWriter:
    """One writer thread per process; started lazily so it is created after fork."""

    def __init__(
        self,
        db_path: str,
        synchronous: str = "FULL",
        max_batch: int = MAX_BATCH,
        busy_timeout: float = 5.0,
    ) -> None:
        self.db_path = db_path
        self.busy_timeout = busy_timeout
        self.synchronous = synchronous
        self.max_batch = max_batch
        self.batches = 0
        self.events = 0
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._thread: threading.Thread | None = None

    def submit(
        self, make: Callable[[sqlite3.Connection], eventlog.NewEvent], timeout: float = 30.0
    ) -> eventlog.AppendResult:
        """Block until the event built by `make` (inside the writer) is committed."""
        self._ensure_thread()
        future: Future[eventlog.AppendResult] = Future()
        self._queue.put(_Job(make, future))
        return future.result(timeout)

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

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(5)

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            first = self._queue.get()
            if first is None:
                break
            jobs = [first]
            while len(jobs) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._queue.put(None)
                    break
                jobs.append(job)
            try:
                if conn is None:
                    conn = eventlog.connect(self.db_path, self.synchronous, self.busy_timeout)
                self._commit(conn, jobs)
            except sqlite3.Error as exc:
                # Nothing in this batch was committed: every waiter gets the error (→ 503).
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                if conn is not None:
                    with contextlib.suppress(sqlite3.Error):
                        conn.close()
                conn = None
        if conn is not None:
            conn.close()

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
                job.future.set_exception(exc)
        if not items:
            return
        results = eventlog.append_batch(conn, items)
        self.batches += 1
        self.events += len(items)
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)
