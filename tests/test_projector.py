"""The projector on real SQLite logs: corpus through the real ingest path, idempotence,
crash-and-resume of `callgate project` (SIGKILL), follow mode, rebuild atomicity,
incremental ≡ rebuild, and two projectors racing."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from analytics import folds, privacy, projector, tables
from gateway.config import Config
from gateway.db import connect
from gateway.log.intake import ingest_request
from gateway.wire.ingest import Headers
from tests.corpus import APP_ID
from tests.helpers_analytics import (
    append_all,
    check_call,
    corpus,
    expected_calls,
    open_log,
    public_rows_are_public_forms,
    snapshot,
    synthetic_log,
)

CALLGATE = str(Path(sys.executable).parent / "callgate")
FLOWS = corpus()


def callgate(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CALLGATE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def row(conn: sqlite3.Connection, sql: str, *params: Any) -> dict[str, Any]:
    found = conn.execute(sql, params).fetchone()
    assert found is not None, (sql, params)
    return dict(found)


@pytest.fixture
def corpus_db(tmp_path: Path) -> str:
    """Every corpus flow's wire requests (encrypted, duplicates included) through ingest."""
    path = str(tmp_path / "corpus.db")
    conn = open_log(path)
    config = Config(db_path=path, app_ids=(APP_ID,), allow_plaintext=True)
    for flow in FLOWS:
        for request in flow.wire:
            outcome = ingest_request(conn, config, Headers.of(request.headers), request.body)
            assert outcome.error is None, (flow.name, outcome.body)
    conn.close()
    return path


def test_corpus_over_the_wire_projects_to_expect(corpus_db: str) -> None:
    conn = connect(corpus_db)
    consumed = projector.project_all(conn, batch=7)
    head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    assert consumed == head and projector.lag(conn) == (head, head)
    for flow in FLOWS:
        for voice_id, want in expected_calls(flow.expect).items():
            cleartext = tables.cleartext_select(tables.CALLS) + " WHERE t.voice_id = ?"
            check_call(row(conn, cleartext, voice_id), want, flow.name)
        if "broadcast" in flow.expect:
            want = flow.expect["broadcast"]
            got = row(conn, "SELECT * FROM broadcasts WHERE broadcast_id = ?",
                      want["broadcast_id"])  # fmt: skip
            assert (got["state"], got["successful_calls"], got["failed_calls"]) == (
                want["state"], want["successful"], want["failed"],
            )  # fmt: skip
    duplicates = sum(flow.expect.get("duplicates", 0) for flow in FLOWS)
    requests = sum(len(flow.wire) for flow in FLOWS)
    assert head == requests - duplicates
    total = conn.execute("SELECT sum(event_count) FROM calls").fetchone()[0]
    summaries = conn.execute("SELECT count(*) FROM events WHERE voice_id IS NULL").fetchone()[0]
    assert total + summaries == head
    assert public_rows_are_public_forms(conn, "masked") > 0


def test_timeline_view_is_the_folds_timeline(corpus_db: str) -> None:
    conn = connect(corpus_db)
    projector.project_all(conn)
    voice_ids = [r[0] for r in conn.execute("SELECT voice_id FROM calls ORDER BY voice_id")]
    assert len(voice_ids) == sum(len(expected_calls(f.expect)) for f in FLOWS)
    for voice_id in voice_ids:
        want = folds.project_call(projector.load_call(conn, voice_id))["timeline"]
        got = [
            dict(r)
            for r in conn.execute(
                "SELECT * FROM timeline_private WHERE voice_id = ? ORDER BY position", (voice_id,)
            )
        ]
        assert got == want
        public = [
            dict(r)
            for r in conn.execute(
                "SELECT * FROM timeline WHERE voice_id = ? ORDER BY position", (voice_id,)
            )
        ]
        assert public == [
            {**r, "digits": privacy.public_digits(r["digits"], "masked"), "text": None}
            for r in want
        ]
    broadcast_id = conn.execute("SELECT broadcast_id FROM broadcasts LIMIT 1").fetchone()[0]
    want = folds.project_broadcast(projector.load_broadcast(conn, broadcast_id))["timeline"]
    got = [
        dict(r)
        for r in conn.execute(
            "SELECT * FROM timeline WHERE voice_id IS NULL AND broadcast_id = ?", (broadcast_id,)
        )
    ]
    assert got == want and len(got) == 1
    late = conn.execute("SELECT count(*) FROM timeline WHERE arrived_late = 1").fetchone()[0]
    assert late == conn.execute("SELECT sum(out_of_order_events) FROM calls").fetchone()[0] > 0


def test_project_twice_changes_nothing(corpus_db: str) -> None:
    first = callgate("project", "--db", corpus_db)
    assert first.returncode == 0, first.stderr
    conn = connect(corpus_db)
    head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    assert f"projected {head} events" in first.stdout
    before = snapshot(conn)
    checkpoint_row = row(conn, "SELECT * FROM checkpoints WHERE name = 'projector'")
    second = callgate("project", "--db", corpus_db)
    assert second.returncode == 0, second.stderr
    assert "projected 0 events" in second.stdout
    assert projector.project_once(conn) == 0
    assert snapshot(conn) == before
    assert row(conn, "SELECT * FROM checkpoints WHERE name = 'projector'") == checkpoint_row


def test_incremental_in_small_steps_equals_rebuild(tmp_path: Path) -> None:
    conn = open_log(str(tmp_path / "log.db"))
    raw = synthetic_log(copies=60, seed=5)
    for start in range(0, len(raw), 37):  # appends and projections interleaved
        append_all(conn, raw[start : start + 37])
        projector.project_once(conn, batch=11)
    projector.project_all(conn, batch=11)
    incremental = snapshot(conn)
    assert len(incremental["calls"]) > 60
    assert projector.rebuild(conn) == conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert snapshot(conn) == incremental
    assert projector.lag(conn)[0] == projector.lag(conn)[1]


def test_rebuild_is_invisible_to_readers_until_it_commits(tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")
    conn = open_log(path)
    raw = synthetic_log(copies=40, seed=2)
    half = len(raw) // 2
    append_all(conn, raw[:half])
    projector.project_all(conn)
    old_calls = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
    old_checkpoint = projector.checkpoint(conn)
    append_all(conn, raw[half:])
    reader = connect(path)
    seen: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        # Mid-rebuild, inside its transaction: another connection still sees the old tables.
        calls = reader.execute("SELECT count(*) FROM calls").fetchone()[0]
        seen.append((calls, projector.checkpoint(reader)))
        assert 0 < done <= total

    projector.rebuild(conn, progress=progress)
    assert seen and all(s == (old_calls, old_checkpoint) for s in seen)
    new_calls = reader.execute("SELECT count(*) FROM calls").fetchone()[0]
    assert new_calls > old_calls
    assert projector.checkpoint(reader) == conn.execute("SELECT max(seq) FROM events").fetchone()[0]


def test_gateway_appends_go_through_while_a_rebuild_runs(tmp_path: Path) -> None:
    """The rebuild folds a snapshot into staging tables in short write transactions, so the
    gateway's appends (2 s busy timeout in production, 0.5 s here) never wait behind it;
    events appended meanwhile are picked up by the next incremental run."""
    path = str(tmp_path / "log.db")
    conn = open_log(path)
    raw = synthetic_log(copies=30, seed=8)
    append_all(conn, raw[:-20])
    snapshot_head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    gateway = connect(path, timeout=0.5)
    late = iter(raw[-20:])
    appended: list[int] = []

    def progress(done: int, total: int) -> None:
        for raw_event in itertools.islice(late, 10):
            appended.append(append_all(gateway, [raw_event])[-1].seq)

    assert projector.rebuild(conn, progress=progress) == snapshot_head
    assert appended and max(appended) > snapshot_head
    assert projector.checkpoint(conn) == snapshot_head
    leftovers = conn.execute(
        "SELECT count(*) FROM sqlite_master WHERE name LIKE '%__rebuild%'"
    ).fetchone()[0]
    assert leftovers == 0
    projector.project_all(conn)
    caught_up = snapshot(conn)
    projector.rebuild(conn)
    assert snapshot(conn) == caught_up


def test_in_memory_database_rebuilds_in_one_transaction() -> None:
    conn = connect(":memory:")
    projector.ensure_tables(conn)
    append_all(conn, synthetic_log(copies=20, seed=6))
    projector.project_all(conn, batch=13)
    incremental = snapshot(conn)
    assert projector.rebuild(conn) == conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert snapshot(conn) == incremental and not conn.in_transaction


def test_a_failed_rebuild_leaves_the_old_tables(tmp_path: Path) -> None:
    path = str(tmp_path / "log.db")
    conn = open_log(path)
    append_all(conn, synthetic_log(copies=10, seed=7))
    projector.project_all(conn)
    before = snapshot(conn)

    def explode(done: int, total: int) -> None:
        raise RuntimeError("operator pressed Ctrl-C")

    with pytest.raises(RuntimeError):
        projector.rebuild(conn, progress=explode)
    assert snapshot(conn) == before and not conn.in_transaction
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    assert not [n for n in names if n.endswith(tables.STAGING_SUFFIX)]


def test_sigkilled_projector_resumes_to_the_rebuild_result(tmp_path: Path) -> None:
    """`callgate project` killed with SIGKILL mid-way (several times), then run to the end,
    leaves exactly the tables a full rebuild gives."""
    path = str(tmp_path / "big.db")
    conn = open_log(path)
    append_all(conn, synthetic_log(copies=250, seed=11))
    head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    killed_at: list[int] = []
    for target in (0.2, 0.6):
        proc = subprocess.Popen(
            [CALLGATE, "project", "--db", path, "--batch", "10"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while projector.checkpoint(conn) < target * head and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed_at.append(projector.checkpoint(conn))
    assert any(0 < k < head for k in killed_at), f"never killed mid-way: {killed_at} of {head}"
    print(f"killed at checkpoints {killed_at} of {head}")
    finished = callgate("project", "--db", path)
    assert finished.returncode == 0, finished.stderr
    assert projector.checkpoint(conn) == head
    resumed = snapshot(conn)
    done = callgate("rebuild", "--db", path)
    assert done.returncode == 0, done.stderr
    assert f"rebuilt projections from {head} events" in done.stdout
    assert snapshot(conn) == resumed
    calls = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
    assert calls == conn.execute("SELECT count(DISTINCT voice_id) FROM events").fetchone()[0]


def test_follow_keeps_up_within_a_second_and_stops_on_sigterm(tmp_path: Path) -> None:
    path = str(tmp_path / "live.db")
    conn = open_log(path)
    raw = synthetic_log(copies=30, seed=3)
    append_all(conn, raw[:50])
    proc = subprocess.Popen(
        [CALLGATE, "project", "--follow", "--interval", "0.05", "--db", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert projector.wait_for(conn, 50, timeout=20), "follow never caught up"
        lags = []
        for start in range(50, len(raw), 40):
            seq = append_all(conn, raw[start : start + 40])[-1].seq
            appended = time.monotonic()
            assert projector.wait_for(conn, seq, timeout=5)
            lags.append(time.monotonic() - appended)
        assert max(lags) < 1.0, lags
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped after projecting" in err
    live = snapshot(conn)
    projector.rebuild(conn)
    assert snapshot(conn) == live


def test_follow_in_a_thread_stops_on_its_event(tmp_path: Path) -> None:
    path = str(tmp_path / "thread.db")
    conn = open_log(path)
    append_all(conn, synthetic_log(copies=5, seed=4))
    stop = threading.Event()
    result: list[int] = []
    worker = threading.Thread(
        target=lambda: result.append(projector.follow(path, 0.02, stop_event=stop))
    )
    worker.start()
    head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    assert projector.wait_for(conn, head, timeout=10)
    stop.set()
    worker.join(timeout=5)
    assert not worker.is_alive() and result == [head]


def test_two_projectors_racing_with_the_gateway_converge(tmp_path: Path) -> None:
    """Optimistic checkpoint check: two projectors and a writer at once, never a lost update."""
    path = str(tmp_path / "race.db")
    open_log(path).close()
    raw = synthetic_log(copies=80, seed=9)
    done = threading.Event()
    errors: list[BaseException] = []

    def run_projector() -> None:
        own = connect(path, synchronous="NORMAL")
        try:
            while not done.is_set():
                projector.project_once(own, batch=9)
            projector.project_all(own, batch=9)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run_projector) for _ in range(2)]
    for thread in threads:
        thread.start()
    writer = connect(path, synchronous="OFF")
    for start in range(0, len(raw), 25):
        append_all(writer, raw[start : start + 25])
    done.set()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    conn = connect(path)
    projector.project_all(conn)
    raced = snapshot(conn)
    projector.rebuild(conn)
    assert snapshot(conn) == raced


def test_rebuild_replaces_an_old_timeline_table_and_is_repeatable(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    conn = open_log(path)
    append_all(conn, synthetic_log(copies=3, seed=1))
    conn.execute("DROP VIEW timeline")
    conn.execute("CREATE TABLE timeline (seq INTEGER)")  # an early build stored a table
    projector.rebuild(conn)
    first = snapshot(conn)
    projector.rebuild(conn)
    assert snapshot(conn) == first
    kind = conn.execute("SELECT type FROM sqlite_master WHERE name = 'timeline'").fetchone()[0]
    assert kind == "view"
    assert {t.name for t in tables.PROJECTIONS} <= {
        r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }


def test_projector_on_an_empty_or_new_database(tmp_path: Path) -> None:
    conn = connect(str(tmp_path / "empty.db"))
    assert projector.project_once(conn) == 0
    assert projector.rebuild(conn) == 0
    assert projector.lag(conn) == (0, 0)
    assert json.loads(json.dumps(snapshot(conn))) == {name: [] for name in snapshot(conn)}
    assert os.path.exists(tmp_path / "empty.db")


def test_projections_of_an_older_shape_are_re_projected(tmp_path: Path) -> None:
    """A database built before calls.disconnect_reason_normalised and the foreign keys to
    calls existed: the projector drops the outdated tables and folds the log again."""
    conn = open_log(str(tmp_path / "old.db"))
    append_all(conn, synthetic_log(copies=4, seed=3))
    projector.project_all(conn)
    current = snapshot(conn)
    old_calls = [c for c in tables.CALLS.column_names if c != "disconnect_reason_normalised"]
    conn.execute("DROP TABLE calls")
    conn.execute("DROP TABLE plays")
    conn.execute(f"CREATE TABLE calls ({', '.join(old_calls)}, PRIMARY KEY (voice_id))")
    conn.execute("CREATE TABLE plays (voice_id, play_id, prompt_ref)")  # no foreign key
    conn.execute("INSERT INTO calls (voice_id) VALUES ('stale')")
    assert tables.CALLS.shape_differs(conn) and tables.PLAYS.shape_differs(conn)
    assert not tables.DTMF.shape_differs(conn)
    projector.project_all(conn)
    assert snapshot(conn) == current
    assert not any(t.shape_differs(conn) for t in tables.PROJECTIONS)
    keys = {(r["table"], r["from"]) for r in conn.execute("PRAGMA foreign_key_list(plays)")}
    assert keys == {("calls", "voice_id")}
    assert projector.lag(conn)[0] == projector.lag(conn)[1]
