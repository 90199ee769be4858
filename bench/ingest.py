"""Ingest benchmark: durable callgate ingest against the plain Flask + gunicorn ceiling.

In one run, alternating legs over several rounds (A B, then B A, ... so slow drift of the
machine hits both sides alike), a separate load-generating process drives

  A. bench/minimal_app.py: one POST route returning a small JSON, under the gunicorn
     settings of `gateway.web.server.gunicorn_settings` (same workers, threads, worker class);
  B. the real `callgate serve --db <fresh temp db>`, receiving unique encrypted EnableX
     events (aes-256-cbc, hex, utf8, with the corpus APP_ID passed via ENABLEX_APP_ID), so
     every request is decrypted, validated and committed, never answered as a duplicate;

and prints requests/s, p50/p99 latency and non-2xx per leg, the medians, and B/A. With
`--latency-at 0.7` it then offers B a fixed 70 % of its measured maximum (open loop) and
prints p50/p99 there. At the end it counts B's events in the database against the 2xx
answers B gave. Figures only: nothing here asserts a timing.

Then the cost of sealing (README "Privacy and erasure"), in this process, alternating legs
again: the same normalised events appended in group-commit-sized batches to fresh logs,
  P. as rows were built before sealing (SHA-256 dedup hash, payload and raw in the clear),
  S. through `eventlog.append_batch` (keyed hash, per-call data keys, AES-GCM sealing),
and prints events/s per leg, S/P, and the sealing CPU per event without any I/O.
`--sealing-only` runs just that part.

    .venv/bin/python bench/ingest.py [--rounds 3] [--duration 10] [--connections 32]
                                     [--latency-at 0.7] [--client auto|wrk|python]
                                     [--sealing-only] [--sealing-events 20000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

from loadgen import LoadResult, run_python, run_wrk, wrk_path  # noqa: E402
from minimal_app import options_for  # noqa: E402

from gateway.db import connect  # noqa: E402
from gateway.log import eventlog, keystore  # noqa: E402
from gateway.web.server import gunicorn_settings  # noqa: E402
from gateway.wire.crypto import encrypt_event  # noqa: E402
from gateway.wire.schemas import normalise  # noqa: E402
from tests.corpus import APP_ID  # noqa: E402

WEBHOOK_PATH = "/webhooks/enablex"
EPOCH = datetime(2024, 6, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- traffic


class EventBodies:
    """Unique encrypted webhook bodies, five per call (incoming → connected → play → hangup).

    A per-run random base for the voice ids and an ever-increasing index make every body
    distinct within the run and from any earlier run, so callgate never deduplicates one.
    """

    def __init__(self, app_id: str) -> None:
        self.app_id = app_id
        self.base = uuid.uuid4().int & ~((1 << 40) - 1)
        self.next_index = 0

    def event(self, index: int) -> dict[str, object]:
        """The raw EnableX event number `index` of this run."""
        call, step = divmod(index, 5)
        voice_id = str(uuid.UUID(int=self.base | call))
        at = EPOCH + timedelta(seconds=call * 0.37 + step * 3.1)
        stamp = at.strftime("%Y-%m-%dT%H:%M:%S.") + f"{at.microsecond // 1000:03d}Z"
        caller = "9198" + str(call % 10**8).zfill(8)
        if step == 0:
            return {"voice_id": voice_id, "state": "incomingcall", "from": caller,
                    "to": "918068475012", "channel_id": f"ch-{call:x}", "timestamp": stamp}
        if step == 1:
            return {"voice_id": voice_id, "state": "connected", "from": caller,
                    "to": "918068475012", "timestamp": stamp}
        if step == 2:
            return {"voice_id": voice_id, "play_id": f"pl-{call:x}", "playstate": "initiated",
                    "timestamp": stamp}
        if step == 3:
            return {"voice_id": voice_id, "play_id": f"pl-{call:x}",
                    "playstate": "playfinished", "prompt_ref": "welcome", "timestamp": stamp}
        return {"voice_id": voice_id, "state": "disconnected", "from": caller,
                "to": "918068475012", "disconnect_reason": "normal_clearing", "timestamp": stamp}

    def body(self, index: int) -> str:
        """One request body exactly as EnableX sends it: {"encrypted_data": hex}."""
        plain = json.dumps(self.event(index), separators=(",", ":"))
        cipher = encrypt_event(plain, "aes-256-cbc", "hex", "utf8", self.app_id)
        return json.dumps({"encrypted_data": cipher}, separators=(",", ":"))

    def write(self, path: Path, count: int) -> Path:
        """Write the next `count` never-sent bodies, one per line."""
        with path.open("w") as fh:
            for index in range(self.next_index, self.next_index + count):
                fh.write(self.body(index))
                fh.write("\n")
        self.next_index += count
        return path


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    """An unused local TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server subprocess (a gunicorn master) this benchmark started and must stop."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{WEBHOOK_PATH}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /healthz until it answers: gunicorn forks its workers after binding."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited early; see {self.log}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/healthz", timeout=2
                ) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout}s; see {self.log}")

    def stop(self) -> None:
        """SIGTERM the master (graceful: in-flight requests finish), SIGKILL its group if stuck."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def tail(self) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
        except OSError:
            return ""


def start_server(
    name: str, cmd: list[str], port: int, workdir: Path, env: dict[str, str]
) -> Server:
    """Start a server in its own session (so only its own group is ever signalled)."""
    log = workdir / f"{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name, proc, port, log)


def callgate_executable() -> str:
    """The venv's `callgate` console script (next to this interpreter), else one on PATH."""
    beside = Path(sys.executable).with_name("callgate")
    if beside.exists():
        return str(beside)
    found = shutil.which("callgate")
    if not found:
        raise SystemExit("callgate console script not found: pip install -e . into the venv")
    return found


# --------------------------------------------------------------------------- reporting


def machine() -> str:
    """The host and its load now: the figures mean nothing without them."""
    return f"{host()} {load_average()}"


def host() -> str:
    """nproc, CPU model, kernel and Python: printed beside every result, since a ratio
    tuned on one CPU model did not carry over to another (issue 18)."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"nproc={os.cpu_count()} cpu={model!r} kernel={platform.release()} "
        f"python={platform.python_version()}"
    )


def load_average() -> str:
    """Other work on the machine skews both sides; the load average says how much there was."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "loadavg=unknown"
    return f"loadavg={one:.2f}/{five:.2f}/{fifteen:.2f}"


def fsync_probe(directory: Path, count: int = 200) -> str:
    """p50/p99 of one 4 KiB write + fsync where B's DB lives: the floor under every commit."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    took = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            started = time.perf_counter()
            os.fsync(fd)
            took.append((time.perf_counter() - started) * 1e3)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    took.sort()
    return f"fsync p50 {took[count // 2]:.2f} ms p99 {took[int(count * 0.99) - 1]:.2f} ms"


def _statuses(result: LoadResult) -> str:
    """Which statuses the non-2xx answers had, e.g. " (503 x3)"."""
    if not result.statuses:
        return ""
    return " (" + ", ".join(f"{k} x{v}" for k, v in sorted(result.statuses.items())) + ")"


def fmt_leg(result: LoadResult, unique: bool = True) -> str:
    """One leg on one line; `unique` legs must not have reused a body (A's may)."""
    return (
        f"{result.rps:9.0f} req/s  p50 {result.p50_ms:7.2f} ms  p99 {result.p99_ms:7.2f} ms  "
        f"non-2xx {result.non2xx}{_statuses(result)}  errors {result.errors}"
        + (f"  WRAPPED {result.wrapped} (bodies reused!)" if unique and result.wrapped else "")
    )


def count_events(db: Path) -> tuple[int, int]:
    """(events, rejections) in B's database, read after the server stopped."""
    conn = sqlite3.connect(db)
    try:
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        try:
            rejections = conn.execute("SELECT count(*) FROM rejections").fetchone()[0]
        except sqlite3.OperationalError:
            rejections = 0
        return int(events), int(rejections)
    finally:
        conn.close()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per leg (default 10)")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up per server")
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto",
                   help="load generator: wrk if installed (auto), or the Python client")
    p.add_argument("--client-threads", type=int, default=None,
                   help="wrk threads / Python client processes (default: half the CPUs)")
    p.add_argument("--workers", type=int, default=None, help="gunicorn workers, both sides")
    p.add_argument("--threads", type=int, default=None, help="gunicorn threads, both sides")
    p.add_argument("--latency-at", type=float, default=None, metavar="FRACTION",
                   help="afterwards, offer B this fraction of its max rate, open loop")
    p.add_argument("--tmp-dir", default=None,
                   help="where B's database goes; must be a real disk for fsync to count")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (DB, logs)")
    p.add_argument("--sealing-only", action="store_true", help="only the sealing-cost part")
    p.add_argument("--sealing-events", type=int, default=20000,
                   help="events per sealing leg (default 20000)")
    p.add_argument("--sealing-batch", type=int, default=32,
                   help="events per transaction in the sealing legs (default 32)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- sealing


def _plain_rows(items: list[eventlog.NewEvent]) -> list[eventlog._Prepared]:
    """Rows as the log built them before sealing: the baseline, never used by callgate."""
    return [
        eventlog._Prepared(
            item, eventlog.content_hash(item.raw_obj), eventlog.canonical_json(item.event),
            item.raw_text,
        )
        for item in items
    ]


def sealing_cost(args: argparse.Namespace, workdir: Path) -> None:
    """P (plain rows) against S (sealed rows), alternating, fresh logs each leg."""
    bodies = EventBodies(APP_ID)
    received = "2024-06-01T00:00:00.000Z"
    items = []
    for index in range(args.sealing_events):
        raw = bodies.event(index)
        text = json.dumps(raw, separators=(",", ":"))
        items.append(eventlog.NewEvent(normalise(raw, received), text, raw, "app-bench", received))
    batches = [items[i : i + args.sealing_batch] for i in range(0, len(items), args.sealing_batch)]

    def leg(sealed: bool, number: int) -> float:
        db = str(workdir / f"sealing-{number}.db")
        conn = connect(db)  # synchronous=FULL, as the gateway commits
        eventlog.ensure_schema(conn)
        store = keystore.for_database(conn)  # a fresh key store beside it
        started = time.perf_counter()
        for batch in batches:
            if sealed:
                eventlog.append_batch(conn, batch, store)
            else:
                eventlog._insert_prepared(conn, _plain_rows(batch))
        elapsed = time.perf_counter() - started
        conn.close()
        return len(items) / elapsed

    def cpu(sealed: bool) -> float:
        """µs per event to build the rows, no I/O (keys already made and cached)."""
        conn = connect(":memory:")
        eventlog.ensure_schema(conn)
        store = keystore.for_database(conn)
        eventlog._prepare(items, store)  # makes the keys
        started = time.perf_counter()
        for batch in batches:
            eventlog._prepare(batch, store) if sealed else _plain_rows(batch)
        return (time.perf_counter() - started) / len(items) * 1e6

    print(f"sealing cost: {len(items)} events per leg ({len(items) // 5} calls), "
          f"batches of {args.sealing_batch}, synchronous=FULL, {args.rounds} rounds")
    rates: dict[bool, list[float]] = {False: [], True: []}
    for number in range(args.rounds):
        order = (False, True) if number % 2 == 0 else (True, False)
        for sealed in order:
            rates[sealed].append(leg(sealed, len(rates[False]) + len(rates[True])))
        p, s = rates[False][-1], rates[True][-1]
        print(f"  round {number + 1}: P plain {p:8.0f} events/s  S sealed {s:8.0f} events/s  "
              f"S/P {s / p:.3f}")
    p_med, s_med = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"  median: P {p_med:.0f} events/s, S {s_med:.0f} events/s, S/P {s_med / p_med:.3f}")
    cpu_p = statistics.median(cpu(False) for _ in range(3))
    cpu_s = statistics.median(cpu(True) for _ in range(3))
    print(f"  rows built without I/O: P {cpu_p:.1f} us/event, S {cpu_s:.1f} us/event "
          f"(+{cpu_s - cpu_p:.1f} us/event for sealing)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = args.client
    if client == "auto":
        client = "wrk" if wrk_path() else "python"
    if client == "wrk" and not wrk_path():
        raise SystemExit("wrk is not installed (apt-get install wrk), use --client python")
    client_threads = args.client_threads or max(1, (os.cpu_count() or 2) // 2)
    if args.sealing_only:
        workdir = Path(tempfile.mkdtemp(prefix="callgate-bench-", dir=args.tmp_dir))
        print(f"machine: {machine()}")
        try:
            sealing_cost(args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0

    def leg(url: str, bodies: Path, duration: float) -> LoadResult:
        if client == "wrk":
            return run_wrk(url, bodies, duration, args.connections, client_threads)
        return run_python(url, bodies, duration, args.connections, client_threads)

    workdir = Path(tempfile.mkdtemp(prefix="callgate-bench-", dir=args.tmp_dir))
    db = workdir / "callgate.db"
    port_a, port_b = free_port(), free_port()
    opts = options_for("127.0.0.1", port_a, args.workers, args.threads)
    settings = gunicorn_settings(opts)
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env_b = {**env, "ENABLEX_APP_ID": APP_ID, "CALLGATE_DB": str(db)}
    for key in ("CALLGATE_WEBHOOK_TOKEN", "CALLGATE_SYNCHRONOUS"):
        env_b.pop(key, None)

    print(f"machine: {machine()}")
    print(
        f"gunicorn (both sides): workers={settings['workers']} threads={settings['threads']} "
        f"worker_class={settings['worker_class']} keepalive={settings['keepalive']}"
    )
    print(
        f"load: {client} ({client_threads} {'threads' if client == 'wrk' else 'processes'}), "
        f"{args.connections} keep-alive connections, {args.rounds} rounds x {args.duration:g} s"
        f" per leg; B db {db} (synchronous default)"
    )
    print(f"disk under B's db: {fsync_probe(workdir)}")

    size = ["--workers", str(opts.workers), "--threads", str(opts.threads)]
    server_a = start_server(
        "A-minimal",
        [sys.executable, str(BENCH / "minimal_app.py"), "--port", str(port_a), *size],
        port_a, workdir, env,
    )
    server_b = start_server(
        "B-callgate",
        [callgate_executable(), "serve", "--db", str(db), "--port", str(port_b), *size],
        port_b, workdir, env_b,
    )
    bodies = EventBodies(APP_ID)
    b_ok_total = 0
    b_legs = 0
    try:
        server_a.wait_ready()
        server_b.wait_ready()
        t0 = time.perf_counter()
        a_file = bodies.write(workdir / "a-bodies.txt", 20_000)
        print(f"generated 20000 bodies in {time.perf_counter() - t0:.1f} s")

        def b_file(rate_hint: float, duration: float) -> Path:
            # Enough unique events for a leg at 1.5x the best rate seen so far (A's ceiling).
            count = math.ceil(max(rate_hint, 2000.0) * duration * 1.5) + 2 * args.connections
            return bodies.write(workdir / "b-bodies.txt", count)

        warm_a = leg(server_a.url, a_file, args.warmup)
        best_rate = warm_a.rps
        warm_b = leg(server_b.url, b_file(best_rate, args.warmup), args.warmup)
        b_ok_total += warm_b.ok
        b_legs += 1
        print(f"warm-up   A {fmt_leg(warm_a, unique=False)}")
        print(f"warm-up   B {fmt_leg(warm_b)}")

        rows: list[tuple[LoadResult, LoadResult]] = []
        for rnd in range(1, args.rounds + 1):
            order = "AB" if rnd % 2 else "BA"
            got: dict[str, LoadResult] = {}
            for side in order:
                if side == "A":
                    got["A"] = leg(server_a.url, a_file, args.duration)
                    best_rate = max(best_rate, got["A"].rps)
                else:
                    got["B"] = leg(server_b.url, b_file(best_rate, args.duration), args.duration)
                    b_ok_total += got["B"].ok
                    b_legs += 1
            a, b = got["A"], got["B"]
            rows.append((a, b))
            print(f"round {rnd} ({order})")
            print(f"  A minimal  {fmt_leg(a, unique=False)}")
            print(f"  B callgate {fmt_leg(b)}")
            print(f"  B/A {b.rps / a.rps:.3f}")

        def med(values: Callable[[LoadResult], float], side: int) -> float:
            return statistics.median(values(row[side]) for row in rows)

        a_rps, b_rps = med(lambda r: r.rps, 0), med(lambda r: r.rps, 1)
        ratios = [b.rps / a.rps for a, b in rows]
        print(f"median over {len(rows)} rounds on {host()}")
        print(
            f"  A minimal  {a_rps:9.0f} req/s  p50 {med(lambda r: r.p50_ms, 0):7.2f} ms  "
            f"p99 {med(lambda r: r.p99_ms, 0):7.2f} ms  non-2xx {sum(a.non2xx for a, _ in rows)}"
        )
        print(
            f"  B callgate {b_rps:9.0f} req/s  p50 {med(lambda r: r.p50_ms, 1):7.2f} ms  "
            f"p99 {med(lambda r: r.p99_ms, 1):7.2f} ms  non-2xx {sum(b.non2xx for _, b in rows)}"
        )
        print(
            f"  B/A {b_rps / a_rps:.3f} (ratio of medians; per-round median "
            f"{statistics.median(ratios):.3f}, range {min(ratios):.3f}-{max(ratios):.3f})"
        )

        if args.latency_at:
            rate = args.latency_at * b_rps
            fixed = run_python(
                server_b.url,
                bodies.write(workdir / "b-bodies.txt", math.ceil(rate * args.duration * 1.2) + 100),
                args.duration,
                args.connections,
                client_threads,
                rate=rate,
            )
            b_ok_total += fixed.ok
            b_legs += 1
            print(
                f"B at {args.latency_at:.0%} of its max ({rate:.0f} req/s offered, open loop, "
                f"latency from scheduled send): {fixed.rps:.0f} req/s  p50 {fixed.p50_ms:.2f} ms"
                f"  p99 {fixed.p99_ms:.2f} ms  p99.9 {fixed.extra['p99_9_ms']:.2f} ms  "
                f"max {fixed.max_ms:.2f} ms  non-2xx {fixed.non2xx}{_statuses(fixed)}  "
                f"errors {fixed.errors}  "
                f"late starts {fixed.extra['late_starts']}"
            )
    finally:
        server_a.stop()
        server_b.stop()

    events, rejections = count_events(db)
    slack = events - b_ok_total
    # wrk stops mid-flight: requests it abandoned may still commit (≤ connections per leg).
    bound = args.connections * b_legs if client == "wrk" else 0
    verdict = "ok" if 0 <= slack <= bound else "MISMATCH"
    print(
        f"B database: {events} events, {rejections} rejections; B answered {b_ok_total} 2xx; "
        f"events - 2xx = {slack} (allowed 0..{bound}: requests in flight when the client "
        f"stopped) -> {verdict}"
    )
    sealing_cost(args, workdir)
    print(f"machine at the end: {machine()}")
    if args.keep:
        print(f"kept {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
