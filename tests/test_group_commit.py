"""Group commit: many requests share a transaction, each is released only after COMMIT."""

from __future__ import annotations

import json
import multiprocessing
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.queues import Queue
from typing import Any

import pytest

from gateway.db import connect, utc_now
from gateway.log import eventlog
from gateway.log import writer as writer_module
from gateway.log.writer import BatchWriter, WriterLock


def new_event(n: int) -> eventlog.NewEvent:
    raw = {"voice_id": f"call-{n}", "state": "ringing", "timestamp": "2024-03-11T09:15:00Z"}
    event = {"voice_id": f"call-{n}", "class": "call", "state": "ringing",
             "occurred_at": "2024-03-11T09:15:00.000Z"}
    return eventlog.NewEvent(event, json.dumps(raw), raw, "plaintext", utc_now())


def held_log(
    db_path: str, **options: Any
) -> tuple[sqlite3.Connection, BatchWriter, sqlite3.Connection]:
    """(a connection, a writer, a blocker holding the write lock): submissions pile up
    behind the writer's first attempt until the blocker commits."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    writer = BatchWriter(db_path, **options)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    return conn, writer, blocker


def test_queued_requests_share_one_commit_and_all_land(db_path) -> None:
    conn, writer, blocker = held_log(db_path)
    with ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(writer.submit, lambda c, n=n: new_event(n)) for n in range(300)]
        time.sleep(0.5)
        assert not any(f.done() for f in futures), "acknowledged before the commit"
        blocker.execute("COMMIT")
        results = [f.result(timeout=30) for f in futures]
    writer.close()
    assert sorted(r.seq for r in results) == list(range(1, 301))
    assert writer.events == 300 and writer.batches <= 30
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 300
    assert eventlog.verify(conn).ok


def test_each_commit_is_reported_and_a_failing_observer_loses_nothing(db_path) -> None:
    told: list[tuple[int, float, float]] = []
    conn, writer, blocker = held_log(db_path, observer=lambda *seen: told.append(seen))
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(writer.submit, lambda c, n=n: new_event(n)) for n in range(40)]
        time.sleep(0.2)
        blocker.execute("COMMIT")
        assert len({f.result(timeout=30).seq for f in futures}) == 40
    writer.close()
    assert sum(events for events, _, _ in told) == 40
    assert len(told) == writer.batches < 40
    assert all(waited >= 0 and held > 0 for _, waited, held in told)

    def broken(*_: object) -> None:
        raise OSError("metrics directory is full")

    writer = BatchWriter(db_path, observer=broken)
    assert not writer.submit(lambda c: new_event(99)).duplicate
    writer.close()
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 41


def test_duplicates_inside_one_batch_get_the_first_seq(db_path) -> None:
    conn, writer, blocker = held_log(db_path)
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(writer.submit, lambda c: new_event(7)) for _ in range(8)]
        time.sleep(0.2)
        blocker.execute("COMMIT")
        results = [f.result(timeout=30) for f in futures]
    writer.close()
    assert {r.seq for r in results} == {1}
    assert sum(not r.duplicate for r in results) == 1


def unstorable_event(n: int) -> eventlog.NewEvent:
    """An event that reached the log API although no JSON tool can write it back (nested
    past orjson's 255 levels in a sealed field): the HTTP parser refuses such input, this
    stands for any one event whose sealing fails."""
    nested: object = []
    for _ in range(300):
        nested = [nested]
    event = {"broadcast_id": f"b-{n}", "class": "broadcast", "state": "broadcastcomplete",
             "occurred_at": "2024-03-11T09:15:00.000Z",
             "broadcast_call_info": [{"voice_id": "x", "to": nested}]}
    return eventlog.NewEvent(event, "{}", {"n": n}, "plaintext", utc_now())


def test_one_event_the_log_cannot_take_fails_alone_and_its_batch_is_committed(db_path) -> None:
    """Before, it failed every event of its batch: requests answered 503 and kept nowhere."""
    conn, writer, blocker = held_log(db_path)
    with ThreadPoolExecutor(16) as pool:
        futures = {n: pool.submit(writer.submit, lambda c, n=n: new_event(n)) for n in range(30)}
        poison = pool.submit(writer.submit, lambda c: unstorable_event(1))
        time.sleep(0.3)
        blocker.execute("COMMIT")
        results = [f.result(timeout=30) for f in futures.values()]
        error = poison.exception(timeout=30)
    assert error is not None and not isinstance(error, sqlite3.Error)
    assert sorted(r.seq for r in results) == list(range(1, 31))
    assert writer.submit(lambda c: new_event(99)).seq == 31  # and the writer carries on
    writer.close()
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 31
    assert eventlog.verify(conn).ok


def test_admitted_requests_are_counted_out_again_on_a_fresh_writer(db_path) -> None:
    """The count of requests a gathering leader waits for returns to zero. Before, the first
    submit of a process (and the first after close) reset it while the requests admitted
    before it were counted, each then took itself off again, and below zero no leader
    ever waited for requests in flight."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    writer = BatchWriter(db_path)
    for base in (0, 100):  # a new writer, then the same one after close()
        barrier = threading.Barrier(8)

        def request(n: int, barrier: threading.Barrier = barrier, base: int = base) -> None:
            with writer.admitted():
                barrier.wait()
                writer.submit(lambda c: new_event(base + n))

        threads = [threading.Thread(target=request, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert writer._waiting == 0
        writer.close()
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 16


@pytest.mark.skipif(os.geteuid() != 0, reason="only root creates files for another user")
def test_lock_files_made_by_root_belong_to_the_databases_owner(db_path) -> None:
    """`callgate erase` from root's cron made the writers' lock files root's (0600), and a
    gateway running as the database's owner then fell back to SQLite's locking."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    conn.close()
    os.chown(db_path, 65534, 65534)
    lock = WriterLock(db_path, 1.0)
    with lock:
        pass
    lock.close()
    writer = BatchWriter(db_path)
    writer.submit(lambda c: new_event(1))
    writer.close()
    for suffix in ("-writer.lock", "-writer.gate", "-checkpointer.lock"):
        info = os.stat(db_path + suffix)
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (65534, 65534, 0o600), suffix


def test_a_failed_commit_fails_every_waiter_and_the_writer_recovers(db_path) -> None:
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    writer = BatchWriter(db_path)
    blocker = sqlite3.connect(db_path, isolation_level=None, timeout=0)
    blocker.execute("PRAGMA busy_timeout=0")
    blocker.execute("BEGIN EXCLUSIVE")
    errors: list[BaseException] = []

    def submit() -> None:
        try:
            writer.submit(lambda c: new_event(1), timeout=30)
        except sqlite3.OperationalError as exc:
            errors.append(exc)

    thread = threading.Thread(target=submit)
    thread.start()
    thread.join(30)  # the writer's busy timeout (5 s) expires while the lock is held
    blocker.execute("ROLLBACK")
    assert len(errors) == 1 and "locked" in str(errors[0])
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    recovered = writer.submit(lambda c: new_event(2))
    writer.close()
    assert recovered.seq == 1


def _hammer(db_path: str, base: int, count: int, busy_timeout: float, out: Queue) -> None:
    """One 'worker process': 8 request threads submitting through this process's writer."""
    writer = BatchWriter(db_path, busy_timeout=busy_timeout)
    errors = 0

    def one(n: int) -> None:
        nonlocal errors
        try:
            writer.submit(lambda c: new_event(base + n), timeout=60)
        except sqlite3.OperationalError:
            errors += 1

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))
    writer.close()
    out.put((errors, writer.batches))


def test_two_writer_processes_take_turns_without_lock_errors(db_path) -> None:
    """Two gunicorn workers' writers on one log: hand-over on the lock file, no 'locked'.

    Left to SQLite's busy handler (sleeps of up to 100 ms between retries), a writer
    that keeps losing the race hit its busy timeout under load and the gateway
    answered 503s; taking turns on the writer lock keeps every wait to a commit or two.
    """
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    # spawn, not fork: forking the test process while other tests' threads may hold
    # SQLite's or the allocator's locks can leave a child blocked forever on one.
    ctx = multiprocessing.get_context("spawn")
    out: Queue = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(db_path, k * 100_000, 3000, 0.2, out))
        for k in range(2)
    ]
    for proc in procs:
        proc.start()
    reports = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    assert [errors for errors, _ in reports] == [0, 0]
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 6000
    assert eventlog.verify(conn).ok


def test_writer_lock_wait_is_bounded_and_reads_as_a_locked_database(db_path) -> None:
    """A writer lock held elsewhere fails the batch like a locked database (→ 503)."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    holder = WriterLock(db_path, timeout=1.0)
    with holder:
        writer = BatchWriter(db_path, busy_timeout=0.3)
        started = time.monotonic()
        try:
            writer.submit(lambda c: new_event(1), timeout=30)
        except sqlite3.OperationalError as exc:
            assert "locked" in str(exc)
        else:
            raise AssertionError("committed while another writer held the lock")
        assert time.monotonic() - started < 25  # bounded by busy_timeout, not the 30 s wait
    assert writer.submit(lambda c: new_event(2)).seq == 1
    writer.close()
    holder.close()


def test_the_wal_is_checkpointed_in_the_background_not_on_the_commit_path(db_path) -> None:
    """Pages reach the database file while no webhook waits: nothing commits after the
    appends, yet the WAL is copied into the database within a few CHECKPOINT_SECONDS."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    conn.close()
    writer = BatchWriter(db_path)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: writer.submit(lambda c: new_event(n)), range(200)))
    committed = os.path.getsize(db_path)
    deadline = time.monotonic() + 10 * writer_module.CHECKPOINT_SECONDS
    while os.path.getsize(db_path) <= committed:
        assert time.monotonic() < deadline, "the WAL was never checkpointed"
        time.sleep(0.05)
    writer.close()
    reader = connect(db_path)
    assert reader.execute("SELECT count(*) FROM events").fetchone()[0] == 200


def _wal_restarts(db_path: str) -> int:
    """The WAL header's checkpoint sequence number: SQLite bumps it each time the WAL
    starts over from its first frame."""
    with open(db_path + "-wal", "rb") as wal:
        return int.from_bytes(wal.read(16)[12:16], "big")


def test_the_wal_starts_over_while_writes_never_pause(db_path) -> None:
    """Under continuous commits a checkpoint running beside them never reaches the end of
    the WAL, so the WAL would only restart at the writers' 10,000-page backstop, on the
    commit path. The checkpointer pauses the writers for the last few pages instead."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    writer = BatchWriter(db_path)
    writer.submit(lambda c: new_event(-1))
    before = _wal_restarts(db_path)
    stop_at = time.monotonic() + 12 * writer_module.CHECKPOINT_SECONDS
    counter = iter(range(10**9))

    def hammer() -> None:
        while time.monotonic() < stop_at:
            n = next(counter)
            writer.submit(lambda c, n=n: new_event(n))

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(hammer) for _ in range(8)]:
            future.result()
    writer.close()
    assert _wal_restarts(db_path) >= before + 2
    assert eventlog.verify(conn).ok


def _leaders(writers: list[BatchWriter]) -> list[BatchWriter]:
    return [w for w in writers if w._checkpointer is not None and w._checkpointer.leading]


def test_one_checkpointer_per_log_and_another_takes_over_when_it_stops(db_path) -> None:
    """Every worker process starts a checkpointer, but a server checkpoints once per
    interval: the one holding `<db>-checkpointer.lock` leads. flock conflicts between
    two open files of one process as between processes, so two writers here stand for
    two workers; closing the leader's stands for its process dying (the kernel drops
    the lock either way)."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    conn.close()
    writers = [BatchWriter(db_path), BatchWriter(db_path)]
    for n, writer in enumerate(writers):
        writer.submit(lambda c, n=n: new_event(n))
    deadline = time.monotonic() + 10 * writer_module.CHECKPOINT_SECONDS
    while not _leaders(writers):
        assert time.monotonic() < deadline, "no checkpointer took the lead"
        time.sleep(0.05)
    time.sleep(3 * writer_module.CHECKPOINT_SECONDS)
    (leader,) = _leaders(writers)
    (follower,) = [w for w in writers if w is not leader]
    leader.close()
    deadline = time.monotonic() + 10 * writer_module.CHECKPOINT_SECONDS
    while _leaders(writers) != [follower]:
        assert time.monotonic() < deadline, "the other checkpointer never took over"
        time.sleep(0.05)
    follower.close()
    assert not _leaders(writers)


def test_the_first_waiting_request_commits_on_its_own_thread(db_path) -> None:
    """No writer thread: a lone request is committed by its own thread (no hand-off), and
    under contention the events of other threads ride along in a leader's commit."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    writer = BatchWriter(db_path)
    built_on: list[int] = []

    def make(n: int) -> eventlog.NewEvent:
        built_on.append(threading.get_ident())
        return new_event(n)

    writer.submit(lambda c: make(1))
    assert built_on == [threading.get_ident()]
    assert not [t.name for t in threading.enumerate() if t.name == "callgate-writer"]
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(writer.submit, lambda c, n=n: make(n)) for n in range(2, 42)]
        time.sleep(0.3)
        blocker.execute("COMMIT")
        assert sorted(f.result(timeout=30).seq for f in futures) == list(range(2, 42))
    writer.close()
    # Fewer commits than events: followers' events were built on a leader's thread.
    assert writer.batches < writer.events == 41
    assert eventlog.verify(conn).ok


def test_a_follower_that_gives_up_leaves_the_writer_working(db_path) -> None:
    """A request that times out while queued is taken off the queue (it answers 503 and
    EnableX redelivers); the lead still passes on and later requests commit."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    writer = BatchWriter(db_path, busy_timeout=5.0)
    blocker = sqlite3.connect(db_path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    with ThreadPoolExecutor(2) as pool:
        leader = pool.submit(writer.submit, lambda c: new_event(1))
        time.sleep(0.2)  # the leader now waits inside BEGIN IMMEDIATE
        follower = pool.submit(writer.submit, lambda c: new_event(2), 0.3)
        try:
            follower.result(timeout=30)
        except TimeoutError:
            pass
        else:
            raise AssertionError("a queued request was answered while the log was locked")
        blocker.execute("COMMIT")
        assert leader.result(timeout=30).seq == 1
    assert writer.submit(lambda c: new_event(3)).seq == 2
    writer.close()
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 2
