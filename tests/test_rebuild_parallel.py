"""The parallel rebuild on real SQLite files: worker processes, one voice_id range each,
give exactly the tables of the in-process fold (and of the incremental projector), and
no worker outlives a failed, interrupted or killed rebuild."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analytics import projector, tables
from tests.helpers_analytics import append_all, open_log, snapshot, synthetic_log

ROOT = str(Path(__file__).resolve().parent.parent)
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _alive(pid: int) -> bool:
    """Running (a zombie, or a pid gone, counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_dead(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _leftovers(conn: sqlite3.Connection) -> list[str]:
    """Staging or chunk tables a rebuild left behind (main and temp schemas)."""
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    names += [r[0] for r in conn.execute("SELECT name FROM sqlite_temp_master")]
    return [n for n in names if n.endswith((tables.STAGING_SUFFIX, projector._CHUNK_SUFFIX))]


@pytest.fixture
def log(tmp_path: Path) -> tuple[str, sqlite3.Connection]:
    """A log of corpus shapes (broadcasts, bridges, late events) projected incrementally."""
    path = str(tmp_path / "log.db")
    conn = open_log(path)
    append_all(conn, synthetic_log(copies=120, seed=12))
    projector.project_all(conn, batch=37)
    return path, conn


def test_parallel_rebuild_equals_serial_and_incremental(
    log: tuple[str, sqlite3.Connection],
) -> None:
    _, conn = log
    incremental = snapshot(conn)
    n = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    assert len(projector._split_points(conn, 3)) == 2, "three non-empty voice_id ranges"
    for workers in (1, 2, 3):
        seen: list[tuple[int, int]] = []
        folded = projector.rebuild(
            conn, progress=lambda d, t, out=seen: out.append((d, t)), workers=workers
        )
        assert folded == n
        assert snapshot(conn) == incremental, f"{workers} workers"
        assert seen[-1] == (n, n) and all(0 <= d <= t == n for d, t in seen)
        assert projector.checkpoint(conn) == n
        assert not _leftovers(conn)


def test_more_workers_than_calls(tmp_path: Path) -> None:
    path = str(tmp_path / "tiny.db")
    conn = open_log(path)
    append_all(conn, synthetic_log(copies=1, seed=5))
    projector.project_all(conn)
    incremental = snapshot(conn)
    projector.rebuild(conn, workers=8)
    assert snapshot(conn) == incremental and not _leftovers(conn)


@needs_proc
@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_interrupted_parallel_rebuild_kills_its_workers(
    log: tuple[str, sqlite3.Connection], monkeypatch: pytest.MonkeyPatch, error: type
) -> None:
    """An error (or Ctrl-C) in the parent while the workers fold: they are killed before
    the staging tables are dropped, and the old tables stay as they were."""
    _, conn = log
    before = snapshot(conn)
    started: list[int] = []
    real_start = projector._Workers.start

    def start_then_fail(self: projector._Workers, *args: object, **kwargs: object) -> None:
        real_start(self, *args, **kwargs)  # type: ignore[arg-type]
        started.extend(proc.pid for proc in self.procs)
        assert all(_alive(pid) for pid in started)
        raise error("operator pressed Ctrl-C")

    monkeypatch.setattr(projector._Workers, "start", start_then_fail)
    with pytest.raises(error):
        projector.rebuild(conn, workers=2)
    assert len(started) == 2 and not _wait_dead(started, timeout=0.5)
    assert snapshot(conn) == before and not conn.in_transaction
    assert not _leftovers(conn)


def test_progress_callback_failing_mid_fold(log: tuple[str, sqlite3.Connection]) -> None:
    _, conn = log
    before = snapshot(conn)

    def explode(done: int, total: int) -> None:
        raise RuntimeError("progress bar broke")

    with pytest.raises(RuntimeError, match="progress bar broke"):
        projector.rebuild(conn, progress=explode, workers=2)
    assert snapshot(conn) == before and not _leftovers(conn)


def test_a_failing_worker_fails_the_rebuild(log: tuple[str, sqlite3.Connection]) -> None:
    """A payload the fold cannot decode: the worker reports its traceback, the rebuild
    raises it, and the projections are untouched."""
    _, conn = log
    before = snapshot(conn)
    del before[tables.TIMELINE_VIEW]  # the view decodes payloads: it cannot read the bad one
    head = conn.execute("SELECT max(seq) FROM events").fetchone()[0]
    conn.execute(
        "INSERT INTO events (seq, event_id, app_id, voice_id, broadcast_id, class, state, "
        "occurred_at, received_at, payload, raw, content_hash, prev_hash, hash) "
        "VALUES (?, 'ev_broken', 'test', 'ffffffff-broken', NULL, 'call', 'ringing', "
        "'2024-03-20T00:00:00.000Z', '2024-03-20T00:00:00.000Z', '{not json', '{}', "
        "'broken', '', '')",
        (head + 1,),
    )
    with pytest.raises(RuntimeError, match="rebuild worker failed(.|\n)*JSONDecodeError"):
        projector.rebuild(conn, workers=2)
    after = {
        t.name: sorted(map(tuple, conn.execute(f'SELECT * FROM "{t.name}"')), key=repr)
        for t in tables.PROJECTIONS
    }
    assert after == before and not _leftovers(conn)


@needs_proc
@pytest.mark.parametrize("armed_after", [1.0, 0.0])
def test_a_killed_rebuild_takes_its_workers_down(tmp_path: Path, armed_after: float) -> None:
    """SIGKILL of the rebuilding process: its workers die with it (the kernel's parent-death
    signal), even though something else keeps their job pipe open, so no orphan can write
    into the staging tables of a later rebuild. With no wait the rebuild dies while its
    workers are still importing: they must notice they were orphaned before arming."""
    script = (
        "import subprocess, sys, time\n"
        "from analytics import projector\n"
        "pool = projector._Workers(2)\n"
        "fds = [proc.stdin.fileno() for proc in pool.procs]\n"
        "holder = subprocess.Popen(['sleep', '60'], pass_fds=fds)\n"
        "print(*[proc.pid for proc in pool.procs], holder.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": ROOT}
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env
    )
    holder = None
    try:
        assert parent.stdout is not None
        *workers, holder = map(int, parent.stdout.readline().split())
        time.sleep(armed_after)  # 1 s: the workers have imported and armed the signal
        if armed_after:
            assert all(_alive(pid) for pid in workers), "workers wait for their job"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert not _wait_dead(workers), "orphaned rebuild workers kept running"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if holder is not None and _alive(holder):
            os.kill(holder, signal.SIGKILL)
