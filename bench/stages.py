"""What each stage of a webhook's work costs in this process, on one thread, with no server.

bench/ingest.py and bench/compare_serve.py measure `callgate serve` as a whole, where the
work of a request is mixed with HTTP, threads and GIL hand-offs. This times the work
alone, on the same traffic (bench/ingest.py's unique encrypted events, five per call):

  * the request side, per event: the outer body's strict JSON parse, decryption
    (`crypto.decrypt_event`), marshmallow (`schemas.normalise`), and the whole of
    `ingest.interpret`, which is the three together;
  * the commit side, for each batch size asked for, the three steps of
    `eventlog.append_batch` for a batch: the key store (keys and number tags of the
    batch's new calls, in the key store's own fsync'd transaction), sealing and hashes
    (`_prepare`, with every key already known), and the log's transaction (insert and
    COMMIT, one fsync), each per event;
  * an empty fsync'd commit to a WAL database beside the log, the floor under both
    transactions.

CPU (process time) and wall time per event are printed side by side: the difference is
waiting on the disk. Set against the server's CPU per request (compare_serve.py), it says
how much of a request is the work and how much the server adds around it. Figures only.

    .venv/bin/python bench/stages.py [--events 9000] [--batches 1,9,18] [--tmp-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import ingest  # noqa: E402

from gateway.config import Config  # noqa: E402
from gateway.db import connect, utc_now  # noqa: E402
from gateway.log import eventlog, intake, keystore  # noqa: E402
from gateway.wire import crypto, schemas  # noqa: E402
from gateway.wire.ingest import Accepted, Headers, interpret  # noqa: E402

# What bench/ingest.py's traffic is sent with (bench/wrk_post.lua).
ALGORITHM, FORMAT, ENCODING = "aes-256-cbc", "hex", "utf8"
HEADERS = Headers.of([
    ("content-type", "application/json"),
    ("x-algoritm", ALGORITHM),
    ("x-format", FORMAT),
    ("x-encoding", ENCODING),
])

Clock = collections.Counter[str]


@contextmanager
def clocked(cpu: Clock, wall: Clock, stage: str) -> Iterator[None]:
    """Add the block's process time and wall time to `stage`."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    try:
        yield
    finally:
        cpu[stage] += time.process_time() - cpu0
        wall[stage] += time.perf_counter() - wall0


def request_stages(bodies: list[bytes], config: Config) -> tuple[Clock, Clock, list[Accepted]]:
    """Each request-side stage over every body, one stage at a time."""
    cpu: Clock = collections.Counter()
    wall: Clock = collections.Counter()
    received = utc_now()
    with clocked(cpu, wall, "strict JSON (outer body)"):
        outers = [crypto.parse_strict_json(body.decode()) for body in bodies]
    with clocked(cpu, wall, "decrypt"):
        values = [
            crypto.decrypt_event(
                outer["encrypted_data"], ALGORITHM, FORMAT, ENCODING, config.app_ids  # type: ignore[index]
            ).value
            for outer in outers
        ]
    with clocked(cpu, wall, "marshmallow (normalise)"):
        for value in values:
            schemas.normalise(value, received)
    with clocked(cpu, wall, "interpret (all of the above)"):
        verdicts = [interpret(HEADERS, body, config, received) for body in bodies]
    accepted = [v for v in verdicts if isinstance(v, Accepted)]
    if len(accepted) != len(bodies):
        raise SystemExit(f"only {len(accepted)} of {len(bodies)} bodies were accepted")
    return cpu, wall, accepted


def commit_stages(accepted: list[Accepted], batch: int, directory: Path) -> tuple[Clock, Clock]:
    """`append_batch`'s three steps, timed apart, in batches of `batch` on a fresh log."""
    db = directory / f"stages-{batch}.db"
    conn = connect(str(db), "FULL")
    eventlog.ensure_schema(conn)
    store = keystore.for_database(conn)
    cpu: Clock = collections.Counter()
    wall: Clock = collections.Counter()
    try:
        for start in range(0, len(accepted), batch):
            received = utc_now()
            chunk = accepted[start : start + batch]
            items = [intake.to_new_event(conn, a, received) for a in chunk]
            digests = [eventlog.content_hash(i.raw_obj, store.dedup_key) for i in items]
            _, units = eventlog.sealing_units(items, digests)
            with clocked(cpu, wall, "key store (new calls' keys + tags, fsync)"):
                store.ensure(units, received)
            with clocked(cpu, wall, "seal + hashes"):
                prepared = eventlog._prepare(items, store)
            with clocked(cpu, wall, "log insert + COMMIT (fsync)"):
                eventlog._insert_prepared(conn, prepared)
    finally:
        store.close()
        conn.close()
    return cpu, wall


def empty_commit(directory: Path, count: int = 1000) -> tuple[float, float]:
    """(CPU, wall) seconds of one fsync'd commit of one small row in WAL mode."""
    conn = connect(str(directory / "fsync.db"), "FULL")
    conn.execute("CREATE TABLE t (n INTEGER PRIMARY KEY, b BLOB)")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(count):
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO t (b) VALUES (?)", (b"x" * 300,))
        conn.execute("COMMIT")
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    conn.close()
    return cpu / count, wall / count


def report(title: str, cpu: Clock, wall: Clock, events: int, total: str | None = None) -> None:
    print(title)
    for stage in cpu:
        print(f"  {stage:44s} {cpu[stage] / events * 1e6:7.1f} µs CPU  "
              f"{wall[stage] / events * 1e6:7.1f} µs wall  per event")
    if total is not None:
        print(f"  {total:44s} {sum(cpu.values()) / events * 1e6:7.1f} µs CPU  "
              f"{sum(wall.values()) / events * 1e6:7.1f} µs wall  per event")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=9000, help="events (default 9000)")
    p.add_argument("--batches", default="1,9,18",
                   help="commit batch sizes, comma-separated (default 1,9,18: one request "
                        "alone, and the batches a loaded 2-worker server forms and would form "
                        "with one writer for both workers)")
    p.add_argument("--tmp-dir", default=None, help="where the logs go (a real disk, not tmpfs)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    directory = Path(tempfile.mkdtemp(prefix="callgate-stages-", dir=args.tmp_dir))
    config = Config.from_env(
        env={**os.environ, "ENABLEX_APP_ID": ingest.APP_ID}, db_path=str(directory / "x.db")
    )
    print(f"machine: {ingest.machine()}  sqlite {sqlite3.sqlite_version}")
    try:
        traffic = ingest.EventBodies(ingest.APP_ID)
        bodies = [traffic.body(i).encode() for i in range(args.events)]
        cpu, wall, accepted = request_stages(bodies, config)
        report(f"request side, {args.events} events:", cpu, wall, args.events)
        for batch in batches:
            fresh = [traffic.body(args.events * (1 + batch) + i).encode()
                     for i in range(args.events)]
            _, _, accepted = request_stages(fresh, config)
            cpu, wall = commit_stages(accepted, batch, directory)
            report(f"commit side, batches of {batch}:", cpu, wall, args.events,
                   total="append_batch (all three)")
        one_cpu, one_wall = empty_commit(directory)
        print(f"one empty fsync'd commit (WAL, synchronous=FULL): {one_cpu * 1e6:.1f} µs CPU, "
              f"{one_wall * 1e6:.1f} µs wall")
        print(f"machine at the end: {ingest.machine()}")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
