"""Rebuild benchmark: how fast the projections are replayed from the event log.

Generates a realistic log (default 1,000,000 events, about 100,000 calls of the
shapes EnableX sends: outbound TTS, inbound IVR with digits, bridges with
recordings, speech menus, holds and transfers, busy and unanswered calls,
broadcasts) straight into the real `events` schema, hash chain included, then
prints the raw rate of reading + JSON-decoding the log next to the rebuild rate.

    .venv/bin/python bench/replay.py [--events N] [--db PATH] [--fresh] [--workers N]

The reference is one process reading every event row in seq order (a sequential
scan, the cheapest order there is) and orjson-decoding every payload: the floor any
replay pays, whatever it does after. The rebuild reads the same rows and decodes
the same payloads (in call order, by worker processes: `--workers`, default one
per CPU), folds them, writes every projection into staging tables and swaps them
in (drop the old tables, build the indexes, commit). Its CPU figure is this
process plus its workers; "fold" is the time until every event was folded and
written, "swap" the rest. The wall ratio compares the two wall times of the same
run; the CPU ratio shows how much more work the rebuild does per event. The "ceiling"
line sets the fold alone against the raw read: what the ratio would be with a free swap.

The generated DB is kept (default bench/out/replay.db, git-ignored) and reused when it already
holds the requested number of events.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import os
import random
import resource
import sqlite3
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from gateway.db import GENESIS_HASH, connect

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from analytics import projector  # noqa: E402
from gateway.log import eventlog  # noqa: E402
from gateway.wire import schemas  # noqa: E402

EPOCH = datetime(2024, 3, 1, tzinfo=UTC)
APP_LABEL = "app-" + hashlib.sha256(b"bench-app-id").hexdigest()[:8]
CALLS_PER_CHUNK = 2000
MEAN_GAP_S = 1.7  # mean seconds between call starts: ~100 calls in progress at any time
OUR_NUMBER = "918068475012"

Raw = dict[str, Any]


class Call:
    """Builds one call's raw webhooks (EnableX shapes) at increasing event times."""

    def __init__(self, rng: random.Random, start: float, voice_id: str | None = None) -> None:
        self.rng = rng
        self.t = start
        self.voice_id = voice_id or str(uuid.UUID(int=rng.getrandbits(128), version=4))
        self.events: list[tuple[float, Raw]] = []
        self.plays = 0
        self.customer = "9198" + str(rng.randrange(10**8)).zfill(8)

    def at(self) -> str:
        moment = EPOCH + timedelta(seconds=self.t)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"

    def wait(self, low: float, high: float) -> None:
        self.t += self.rng.uniform(low, high)

    def emit(self, **fields: Any) -> None:
        self.events.append((self.t, {"voice_id": self.voice_id, **fields, "timestamp": self.at()}))

    def call(self, state: str, inbound: bool, **extra: Any) -> None:
        a, b = (self.customer, OUR_NUMBER) if inbound else (OUR_NUMBER, self.customer)
        self.emit(state=state, **{"from": a, "to": b}, **extra)

    def play(self, prompt: str, outcome: str = "playfinished", **extra: Any) -> None:
        self.plays += 1
        play_id = f"pl-{self.voice_id[:8]}-{self.plays}"
        self.wait(0.2, 0.6)
        self.emit(play_id=play_id, playstate="initiated", prompt_ref=prompt)
        self.wait(2, 12)
        self.emit(play_id=play_id, playstate=outcome, prompt_ref=prompt, **extra)


def outbound_tts(c: Call) -> None:
    c.call("initiated", False, owner_ref="bench")
    c.wait(1, 4)
    c.call("ringing", False, owner_ref="bench")
    c.wait(2, 15)
    c.call("connected", False, owner_ref="bench")
    c.play("1")
    c.play("2")
    c.wait(1, 10)
    c.call("disconnected", False, disconnect_reason="hangup_by_api")


def inbound_ivr(c: Call) -> None:
    c.call("incomingcall", True, channel_id=f"ch-{c.voice_id[:6]}")
    c.wait(0.5, 3)
    c.call("connected", True)
    c.play("welcome")
    retries = c.rng.choice((0, 0, 0, 1, 2))
    for _ in range(retries):
        c.play("menu", "menutimeout")
    c.play("menu", "digitcollected", digit=str(c.rng.randrange(10)))
    c.play("confirm")
    c.wait(1, 5)
    c.call("disconnected", True, disconnect_reason=c.rng.choice(("hangup_by_api", "remote_hangup")))


def bridge_recording(c: Call) -> None:
    agent = "9198111" + str(c.rng.randrange(10**5)).zfill(5)
    c.call("initiated", False)
    c.wait(1, 4)
    c.call("ringing", False)
    c.wait(2, 12)
    c.call("connected", False)
    c.play("welcome_prompt")
    c.wait(0.5, 2)
    c.emit(state="bridging", **{"from": OUR_NUMBER, "to": agent})
    c.wait(3, 9)
    c.emit(state="bridged", **{"from": OUR_NUMBER, "to": agent})
    rec = f"rec-{c.voice_id[:8]}"
    url = f"https://api.enablex.io/voice/v1/recording/bench/{rec}.mp3"
    c.wait(0.5, 2)
    c.emit(recordstate="started", recording_id=rec)
    length = c.rng.randrange(20, 300)
    c.t += length
    c.emit(recordstate="completed", recording_id=rec, recording_url=url, recording_duration=length)
    c.wait(1, 20)
    c.emit(state="bridge_disconnected", **{"from": OUR_NUMBER, "to": agent})
    c.wait(0.1, 0.5)
    c.call("disconnected", False, disconnect_reason="Normal Clearing", recording_url=url,
           recording_duration=length)  # fmt: skip


def inbound_speech(c: Call) -> None:
    c.call("incoming call", True, channel_id=f"ch-{c.voice_id[:6]}")
    c.wait(0.5, 3)
    c.call("connected", True)
    for result in c.rng.choice((("recognized",), ("timeout", "recognized"),
                                ("timeout", "unrecognized", "recognized"))):  # fmt: skip
        c.wait(0.2, 0.6)
        c.plays += 1
        c.emit(play_id=f"pl-{c.voice_id[:8]}-{c.plays}", playstate="initiated", prompt_ref="asr")
        c.wait(4, 12)
        text = ""
        if result == "recognized":
            text = c.rng.choice(("talk to sales", "billing", "yes please"))
        c.emit(state=result, text=text, reason=result.title(), playstate="speech_recognized",
               prompt_ref="asr")  # fmt: skip
    c.play("goodbye")
    c.wait(0.5, 2)
    c.call("disconnected", True)


def hold_transfer(c: Call) -> None:
    agent = "9198111" + str(c.rng.randrange(10**5)).zfill(5)
    c.call("incomingcall", True, channel_id=f"ch-{c.voice_id[:6]}")
    c.wait(0.5, 3)
    c.call("connected", True)
    c.wait(1, 3)
    c.call("joined", True, room_id=f"room-{c.rng.randrange(50)}")
    c.wait(10, 60)
    c.call("hold", True)
    c.wait(5, 60)
    c.call("unhold", True)
    c.wait(5, 30)
    c.emit(state="dtmfcollected", digit=c.rng.randrange(100000))
    c.wait(2, 20)
    c.emit(state="transferring", transfer_to=agent, **{"from": OUR_NUMBER, "to": agent})
    c.wait(3, 9)
    c.emit(state="bridged", **{"from": OUR_NUMBER, "to": agent})
    c.wait(30, 300)
    c.emit(state="bridge_disconnected", **{"from": OUR_NUMBER, "to": agent})
    c.wait(0.1, 0.4)
    c.call("disconnected", True, disconnect_reason="remote_hangup")


def busy(c: Call) -> None:
    c.call("initiated", False)
    c.wait(1, 6)
    c.call("disconnected", False, disconnect_reason="User Busy")


def no_answer(c: Call) -> None:
    c.call("initiated", False)
    c.wait(1, 4)
    c.call("ringing", False)
    c.wait(20, 45)
    c.call("failed", False, reason="no_answer")


SHAPES: tuple[tuple[Callable[[Call], None], int], ...] = (
    (outbound_tts, 22),
    (inbound_ivr, 25),
    (bridge_recording, 15),
    (inbound_speech, 12),
    (hold_transfer, 10),
    (busy, 6),
    (no_answer, 5),
)


def broadcast(rng: random.Random, start: float) -> list[tuple[float, Raw]]:
    """A broadcast of 3-6 legs, then its summary (legacy resultSet or v2 call info)."""
    broadcast_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    events: list[tuple[float, Raw]] = []
    info = []
    end = start
    for leg in range(rng.randrange(3, 7)):
        c = Call(rng, start + leg * 0.2)
        tag = {"broadcast_id": broadcast_id}
        c.call("initiated", False, **tag)
        c.wait(1, 4)
        c.call("ringing", False, **tag)
        answered = rng.random() < 0.8
        if answered:
            c.wait(2, 10)
            c.call("connected", False, **tag)
            c.play("broadcast_initial_prompt", broadcast_id=broadcast_id)
            c.wait(0.2, 1)
            c.call("disconnected", False, disconnect_reason="hangup_by_api", **tag)
        else:
            c.wait(20, 45)
            c.call("failed", False, reason="no_answer", **tag)
        info.append({"voice_id": c.voice_id, "to": c.customer,
                     "state": "completed" if answered else "failed"})  # fmt: skip
        events.extend(c.events)
        end = max(end, c.t)
    end += 1
    at = (EPOCH + timedelta(seconds=end)).isoformat().replace("+00:00", "Z")
    if rng.random() < 0.5:
        ok = sum(1 for i in info if i["state"] == "completed")
        summary = {"broadcast_id": broadcast_id, "state": "broadcastcomplete", "from": OUR_NUMBER,
                   "resultSet": {"successfull_calls": ok, "failed_calls": len(info) - ok},
                   "timestamp": at}  # fmt: skip
    else:
        summary = {"broadcast_id": broadcast_id, "state": "broadcastcall_complete",
                   "from": OUR_NUMBER, "broadcast_call_info": info, "timestamp": at}  # fmt: skip
    events.append((end, summary))
    return events


def fmt(seconds: float) -> str:
    moment = EPOCH + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def make_chunk(args: tuple[int, int]) -> tuple[float, list[tuple[float, int, tuple[Any, ...]]]]:
    """Calls of one chunk (deterministic per index) → their events, normalised, with arrival
    times; a worker process does this part because normalise() dominates generation."""
    index, seed = args
    rng = random.Random(seed * 1_000_003 + index)
    start = index * CALLS_PER_CHUNK * MEAN_GAP_S
    first_start = start
    shapes = [shape for shape, _ in SHAPES]
    weights = [weight for _, weight in SHAPES]
    out: list[tuple[float, int, tuple[Any, ...]]] = []
    order = 0
    for _ in range(CALLS_PER_CHUNK):
        start += rng.expovariate(1 / MEAN_GAP_S)
        if rng.random() < 0.01:
            timed = broadcast(rng, start)
        else:
            c = Call(rng, start)
            rng.choices(shapes, weights)[0](c)
            timed = c.events
        for occurred, raw in timed:
            # Network delay; 2% of webhooks are retried late and arrive out of order.
            delay = rng.uniform(0.03, 0.4) if rng.random() > 0.02 else rng.uniform(2, 30)
            arrival = occurred + delay
            received_at = fmt(arrival)
            event = schemas.normalise(raw, received_at)
            raw_text = orjson.dumps(raw).decode()
            digest = eventlog.content_hash(raw)
            row = ("ev_" + digest[:24], APP_LABEL, event.get("voice_id"),
                   event.get("broadcast_id"), event["class"], event.get("state"),
                   event["occurred_at"], received_at, eventlog.canonical_json(event), raw_text,
                   digest)  # fmt: skip
            order += 1
            out.append((arrival, order, row))
    return first_start, out


def _chunks(n_events: int, seed: int, workers: int) -> Iterator[tuple[float, list[Any]]]:
    """Chunks in start order, generated in parallel; stops once enough events were made."""
    made = 0
    index = 0
    with ProcessPoolExecutor(max_workers=workers) as pool:
        while made < n_events:
            batch = list(range(index, index + workers * 2))
            index += len(batch)
            for first, rows in pool.map(make_chunk, [(i, seed) for i in batch]):
                yield first, rows
                made += len(rows)
                if made >= n_events:
                    return


def generate(db_path: str, n_events: int, seed: int = 7, workers: int | None = None) -> int:
    """Write about `n_events` events into a fresh log at db_path; returns the count written."""
    path = Path(db_path)
    for suffix in ("", "-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    conn = connect(str(path), synchronous="OFF")
    eventlog.ensure_schema(conn)
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    heap: list[tuple[float, int, tuple[Any, ...]]] = []
    seq, prev = 0, GENESIS_HASH
    buffer: list[tuple[Any, ...]] = []
    tiebreak = 0
    columns = eventlog.HASHED_COLUMNS
    sql = (
        "INSERT INTO events (seq, event_id, app_id, voice_id, broadcast_id, class, state, "
        "occurred_at, received_at, payload, raw, content_hash, prev_hash, hash) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)"
    )

    def drain(limit: float) -> None:
        nonlocal seq, prev
        while heap and heap[0][0] < limit and seq < n_events:
            _, _, row = heapq.heappop(heap)
            seq += 1
            record = dict(zip(columns, (seq, *row), strict=True))
            digest = eventlog.row_hash(prev, record)
            buffer.append((seq, *row, prev, digest))
            prev = digest
            if len(buffer) >= 50000:
                flush()

    def flush() -> None:
        conn.execute("BEGIN")
        conn.executemany(sql, buffer)
        conn.execute("COMMIT")
        buffer.clear()
        print(f"\r  generated {seq:,} events", end="", file=sys.stderr, flush=True)

    for first, rows in _chunks(n_events, seed, workers):
        drain(first)  # later chunks' events all arrive after their first call starts
        for arrival, order, row in rows:
            tiebreak += 1
            heapq.heappush(heap, (arrival, tiebreak, row))
            del order
    drain(float("inf"))
    flush()
    print(file=sys.stderr)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("ANALYZE")
    conn.close()
    return seq


def raw_rate(conn: sqlite3.Connection, order_by: str = "seq") -> tuple[int, float, float]:
    """Just read every payload and orjson-decode it: the floor any replay pays.
    Returns (events, wall seconds, CPU seconds of this process)."""
    cur = conn.cursor()
    cur.row_factory = None
    loads = orjson.loads
    started, cpu = time.perf_counter(), time.process_time()
    n = 0
    cur.execute(f"SELECT payload FROM events ORDER BY {order_by}")
    while rows := cur.fetchmany(20000):
        for (payload,) in rows:
            loads(payload)
        n += len(rows)
    return n, time.perf_counter() - started, time.process_time() - cpu


def rebuild_once(conn: sqlite3.Connection, workers: int | None) -> tuple[int, float, float, float]:
    """One full rebuild: (events, wall s, CPU s of this process and its workers, wall s
    until the last event was folded and written, i.e. before the swap)."""
    folded_at = [0.0]

    def progress(done: int, total: int) -> None:
        if done >= total and not folded_at[0]:
            folded_at[0] = time.perf_counter()

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started, cpu = time.perf_counter(), time.process_time()
    replayed = projector.rebuild(conn, progress=progress, workers=workers)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu += (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    return replayed, wall, cpu, (folded_at[0] or started) - started


def line(label: str, n: int, wall: float, cpu: float) -> str:
    return (f"{label:<52}{n / wall:>10,.0f} events/s wall ({wall:.2f} s)   "
            f"{n / cpu:>10,.0f} events/s CPU ({cpu:.2f} s)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="log size to generate")
    parser.add_argument("--db", default=str(Path(__file__).parent / "out" / "replay.db"))
    parser.add_argument("--fresh", action="store_true", help="regenerate even if the DB exists")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=1, help="runs per figure; best is shown")
    parser.add_argument(
        "--workers", type=int, default=None, help="rebuild worker processes (default: per CPU)"
    )
    args = parser.parse_args(argv)

    existing = 0
    if Path(args.db).exists() and not args.fresh:
        probe = sqlite3.connect(args.db)
        try:
            existing = probe.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        except sqlite3.Error:
            existing = 0
        probe.close()
    if existing != args.events:
        started = time.perf_counter()
        written = generate(args.db, args.events, args.seed)
        print(f"generated {written:,} events in {time.perf_counter() - started:.1f} s "
              f"→ {args.db}")  # fmt: skip
    conn = connect(args.db, synchronous="NORMAL")
    # The raw reads get the same page cache and mmap as the rebuild: a fair floor.
    for name, value in projector._BULK_PRAGMAS.items():
        conn.execute(f"PRAGMA {name} = {value}")
    calls = conn.execute(
        "SELECT COUNT(DISTINCT voice_id), COUNT(DISTINCT broadcast_id) FROM events"
    ).fetchone()
    print(f"log: {args.events:,} events, {calls[0]:,} calls, {calls[1]:,} broadcasts; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip

    raw_rate(conn)  # warm the page cache so the figures measure CPU, not the disk
    best = min((raw_rate(conn) for _ in range(args.repeat)), key=lambda r: r[1])
    n, raw_wall, raw_cpu = best
    print(line("raw read + orjson decode (seq order):", n, raw_wall, raw_cpu))
    best = min(
        (raw_rate(conn, "voice_id, occurred_at, seq") for _ in range(args.repeat)),
        key=lambda r: r[1],
    )
    n_idx, idx_wall, idx_cpu = best
    print(line("raw read + decode (call order, info):", n_idx, idx_wall, idx_cpu))

    runs = [rebuild_once(conn, args.workers) for _ in range(args.repeat)]
    replayed, rebuild_wall, rebuild_cpu, fold_wall = min(runs, key=lambda r: r[1])
    workers = projector._worker_count(args.workers, replayed)
    print(line(f"rebuild, {workers} worker(s) (fold + write + swap):", replayed, rebuild_wall,
               rebuild_cpu))  # fmt: skip
    print(f"  of which fold + write {fold_wall:.2f} s, swap (drop, index, commit) "
          f"{rebuild_wall - fold_wall:.2f} s; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    print(f"ratio rebuild / raw (seq order):   wall {raw_wall / rebuild_wall:.2f}   "
          f"CPU {raw_cpu / rebuild_cpu:.2f}")  # fmt: skip
    print(f"ratio rebuild / raw (call order):  wall {idx_wall / rebuild_wall:.2f}   "
          f"CPU {idx_cpu / rebuild_cpu:.2f}")  # fmt: skip
    # The fold alone already reads, decodes, folds and writes every event: this is the
    # most the seq-order ratio could reach if the swap (drop, indexes, commit) were free.
    print(f"ceiling if the swap were free:     wall {raw_wall / fold_wall:.2f} "
          f"(fold + write alone vs raw seq order)")  # fmt: skip
    names = ("calls", "plays", "recordings", "dtmf", "speech", "broadcasts", "timeline_marks")
    rows = {table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in names}
    print("rows: " + ", ".join(f"{table} {count:,}" for table, count in rows.items()))
    conn.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
