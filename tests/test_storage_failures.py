"""Storage failures: 503 + Retry-After, never a 2xx for an event that is not stored, and
recovery without a restart once storage is back.

EnableX redelivers on anything but a 2xx, so when the log cannot commit the
gateway must say so (503) rather than acknowledge (DESIGN.md invariant 1) or
drop the request. Each test breaks real storage under a real `callgate serve`:
a lock held past the busy timeout, the database and WAL files made immutable
(read-only even for root, even through already-open descriptors), and a full
tmpfs. Every 503'd event is sent again afterwards and must be logged as NEW,
which proves the 503 stored nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.db import connect
from gateway.wire.crypto import encrypt_event
from tests.conftest import CALLGATE, RunningServer, server_env
from tests.corpus import APP_ID

HEADERS = {"Content-Type": "application/json", "x-algoritm": "aes-256-cbc", "x-format": "hex",
           "x-encoding": "utf8"}
URL = "/webhooks/enablex"


def event_body(n: int, pad: int = 0) -> bytes:
    event = {"voice_id": f"storage-{n:05d}", "state": "connected",
             "timestamp": "2024-03-11T09:15:09Z", "owner_ref": "x" * pad}
    data = encrypt_event(json.dumps(event), "aes-256-cbc", "hex", "utf8", APP_ID)
    return json.dumps({"encrypted_data": data}).encode()


BAD_BODY = b'{"encrypted_data": "zz"}'


def post_all(url: str, bodies: list[bytes]) -> list[httpx.Response]:
    """Send concurrently: a lock wait costs the busy timeout once, not once per request."""
    def one(body: bytes) -> httpx.Response:
        with httpx.Client(timeout=60) as client:
            return client.post(url + URL, content=body, headers=HEADERS)

    with ThreadPoolExecutor(max(len(bodies), 1)) as pool:
        return list(pool.map(one, bodies))


def logged_count(db: str) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM rejections)"
        )
        return tuple(row.fetchone())  # type: ignore[return-value]


def assert_unavailable(answers: list[httpx.Response]) -> None:
    for answer in answers:
        assert answer.status_code == 503, (answer.status_code, answer.text)
        assert answer.headers.get("Retry-After", "").isdigit(), answer.headers
        assert answer.json()["error"] == "storage_unavailable"


def assert_recovered(server: RunningServer, failed: list[bytes], before: tuple[int, int]) -> None:
    """The refused events are now logged as new (they were not stored before) and the log holds."""
    answers = post_all(server.url, failed)
    assert [a.status_code for a in answers] == [200] * len(failed), [a.text for a in answers]
    assert not any(a.json()["duplicate"] for a in answers), "a 503'd event had been stored"
    assert logged_count(server.db)[0] == before[0] + len(failed)
    verified = subprocess.run([CALLGATE, "verify", "--db", server.db], capture_output=True,
                              text=True, timeout=60, env=server_env())
    assert verified.returncode == 0, verified.stderr
    with contextlib.closing(sqlite3.connect(server.db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_lock_held_past_the_busy_timeout_gives_503_then_recovers(server: RunningServer) -> None:
    warm = post_all(server.url, [event_body(0)])
    assert warm[0].status_code == 200
    before = logged_count(server.db)
    holder = sqlite3.connect(server.db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process keeps the write lock
    try:
        failed = [event_body(n) for n in range(1, 5)]
        started = time.perf_counter()
        answers = post_all(server.url, [*failed, BAD_BODY])
        waited = time.perf_counter() - started
        assert_unavailable(answers)
        print(f"\nlocked: {len(answers)} requests answered 503 after {waited:.1f}s")
        assert holder.execute("SELECT count(*) FROM events").fetchone()[0] == before[0]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert logged_count(server.db) == before, "nothing was stored while locked"
    assert_recovered(server, failed, before)
    bad = post_all(server.url, [BAD_BODY])[0]
    assert bad.status_code == 400 and logged_count(server.db)[1] == before[1] + 1


def _chattr(flag: str, *paths: Path) -> None:
    subprocess.run(["chattr", flag, *map(str, paths)], check=True, capture_output=True)


def test_read_only_database_gives_503_then_recovers(server: RunningServer) -> None:
    """chattr +i: writes fail even through the workers' open descriptors, even for root."""
    warm = post_all(server.url, [event_body(n) for n in range(3)])
    assert [a.status_code for a in warm] == [200] * 3
    before = logged_count(server.db)
    files = [Path(server.db), Path(server.db + "-wal")]
    probe = Path(server.db).with_name("probe")
    probe.touch()
    try:
        _chattr("+i", probe)
    except (subprocess.CalledProcessError, FileNotFoundError):
        pytest.skip("chattr +i is not available here (needs CAP_LINUX_IMMUTABLE and ext4/xfs)")
    _chattr("-i", probe)
    _chattr("+i", *files)
    try:
        failed = [event_body(n) for n in range(10, 16)]
        answers = post_all(server.url, [*failed, BAD_BODY])
        assert_unavailable(answers)
        again = post_all(server.url, failed[:2])  # still read-only: still 503, not a stale 2xx
        assert_unavailable(again)
    finally:
        _chattr("-i", *files)
    assert logged_count(server.db) == before
    assert_recovered(server, failed, before)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(path: Path) -> int:
    """Write until the filesystem is full; returns the bytes written."""
    written = 0
    chunk = b"\0" * 4096
    with path.open("wb", buffering=0) as handle:
        while True:
            try:
                written += handle.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                return written


def test_disk_full_gives_503_never_a_false_ack_then_recovers(tiny_fs: Path) -> None:
    server = RunningServer(
        str(tiny_fs / "callgate.db"), server_env(), log_path=tiny_fs.parent / "s.log"
    )
    server.start()
    try:
        warm = post_all(server.url, [event_body(n) for n in range(5)])
        assert [a.status_code for a in warm] == [200] * 5
        filler = tiny_fs / "filler"
        fill(filler)
        # Bigger events, until the WAL cannot grow: some may still fit in space SQLite already
        # holds (stored and acknowledged: fine); the rest must be 503, none a false 2xx.
        acked: list[str] = []
        failed: list[bytes] = []
        for n in range(100, 400, 10):
            bodies = [event_body(m, pad=4000) for m in range(n, n + 10)]
            answers = post_all(server.url, bodies)
            for body, answer in zip(bodies, answers, strict=True):
                if answer.status_code == 200:
                    acked.append(answer.json()["event_id"])
                else:
                    assert_unavailable([answer])
                    failed.append(body)
            if len(failed) >= 20:
                break
        assert len(failed) >= 20, "the full disk was never noticed"
        rejected = post_all(server.url, [BAD_BODY])
        assert rejected[0].status_code in (400, 503)
        with contextlib.closing(connect(server.db)) as conn:
            ids = {row[0] for row in conn.execute("SELECT event_id FROM events")}
        assert set(acked) <= ids, "an acknowledged event is missing"
        before = logged_count(server.db)
        print(f"\ndisk full: {len(acked)} acknowledged after the fill, {len(failed)} refused "
              f"with 503; log holds {before[0]} events")
        filler.unlink()
        assert_recovered(server, failed, before)
    finally:
        server.stop()


def test_a_server_started_on_a_full_disk_answers_503_then_recovers(tiny_fs: Path) -> None:
    """A worker that cannot create the schema at boot must still boot: gunicorn halts the
    whole server when a worker fails to boot, which would turn a full disk into refused
    connections (and a respawned worker on a full disk into an outage)."""
    filler = tiny_fs / "filler"
    fill(filler)
    server = RunningServer(
        str(tiny_fs / "callgate.db"), server_env(), log_path=tiny_fs.parent / "s.log"
    )
    server.start(healthy=False)  # /healthz answers 503 while the disk is full
    try:
        assert server.proc is not None and server.proc.poll() is None, "the server exited"
        answers = post_all(server.url, [event_body(n) for n in range(3)])
        assert_unavailable(answers)
        filler.unlink()
        recovered = post_all(server.url, [event_body(n) for n in range(3)])
        assert [a.status_code for a in recovered] == [200] * 3, [a.text for a in recovered]
        assert logged_count(server.db)[0] == 3
    finally:
        server.stop()
