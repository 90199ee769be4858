"""Commit latency with and without Litestream replicating the log, at a fixed offered rate.

Each leg starts a fresh `callgate serve` on a fresh database and offers it the same
open-loop rate of unique encrypted events (bench/loadgen.py: latency from the
scheduled send, so a stall shows up as latency instead of a lower rate):

  alone      the gateway by itself (CALLGATE_CHECKPOINT=passive, the default)
  replicate  plus `callgate replicate file://<tmp>` beside it (passive, as `up` runs it)
  truncate   plus Litestream, with CALLGATE_CHECKPOINT=truncate: the mode that fights
             Litestream's read lock (only with --with-truncate)

Legs alternate over the rounds (one order, then the reverse) so drift of the shared
machine hits every side alike. Figures only: nothing here asserts a timing.

    .venv/bin/python bench/replication.py [--rounds 2] [--duration 8] [--rate 300]
                                          [--with-truncate]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from ingest import (  # noqa: E402
    EventBodies,
    callgate_executable,
    count_events,
    free_port,
    machine,
    start_server,
)
from loadgen import LoadResult, run_python  # noqa: E402

from tests.corpus import APP_ID  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per leg")
    parser.add_argument("--rate", type=float, default=300.0, help="offered requests/s")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--with-truncate", action="store_true",
                        help="also run the truncate-beside-Litestream leg")
    return parser.parse_args(argv)


def run_leg(name: str, args: argparse.Namespace, bodies: EventBodies, workdir: Path) -> LoadResult:
    """One fresh gateway (and Litestream for the replicating legs) under the fixed rate."""
    legdir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=workdir))
    db = legdir / "callgate.db"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CALLGATE_", "PROMETHEUS_MULTIPROC_DIR"))}
    env.update(ENABLEX_APP_ID=APP_ID,
               CALLGATE_CHECKPOINT="truncate" if name == "truncate" else "passive")
    port = free_port()
    exe = callgate_executable()
    server = start_server(name, [exe, "serve", "--db", str(db), "--port", str(port),
                                 "--workers", str(args.workers)], port, legdir, env)
    replicator = None
    try:
        server.wait_ready()
        if name != "alone":
            log = (legdir / "replicate.log").open("wb")
            replicator = subprocess.Popen(
                [exe, "replicate", f"file://{legdir / 'replica'}", "--db", str(db)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            time.sleep(1.5)  # Litestream's first snapshot, before the measured load
        count = math.ceil(args.rate * args.duration * 1.2) + 2 * args.connections
        result = run_python(server.url, bodies.write(legdir / "bodies.txt", count),
                            args.duration, args.connections, rate=args.rate)
        if replicator is not None and replicator.poll() is not None:
            raise SystemExit(f"litestream exited early: {(legdir / 'replicate.log').read_text()}")
        return result
    finally:
        if replicator is not None:
            os.killpg(replicator.pid, signal.SIGTERM)
            replicator.wait(30)
        server.stop()
        events, _ = count_events(db)
        shutil.rmtree(legdir, ignore_errors=True)
        print(f"    ({name}: {events} events in its log)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    legs = ["alone", "replicate"] + (["truncate"] if args.with_truncate else [])
    workdir = Path(tempfile.mkdtemp(prefix="callgate-replication-bench-"))
    bodies = EventBodies(APP_ID)
    print(f"machine: {machine()}")
    print(f"load: {args.rate:g} req/s offered (open loop), {args.connections} connections, "
          f"{args.rounds} rounds x {args.duration:g} s per leg, {args.workers} workers, "
          "litestream sync-interval 1 s")
    got: dict[str, list[LoadResult]] = {leg: [] for leg in legs}
    try:
        for rnd in range(1, args.rounds + 1):
            order = legs if rnd % 2 else legs[::-1]
            print(f"round {rnd} ({' '.join(order)})")
            for leg in order:
                result = run_leg(leg, args, bodies, workdir)
                got[leg].append(result)
                print(f"  {leg:9s} {result.rps:6.0f} req/s  p50 {result.p50_ms:7.2f} ms  "
                      f"p99 {result.p99_ms:7.2f} ms  max {result.max_ms:8.2f} ms  "
                      f"2xx {result.ok}  non-2xx {result.non2xx}  errors {result.errors}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"median over {args.rounds} rounds")
    base = statistics.median(r.p99_ms for r in got["alone"])
    for leg in legs:
        p99 = statistics.median(r.p99_ms for r in got[leg])
        worst = max(r.max_ms for r in got[leg])
        print(f"  {leg:9s} p50 {statistics.median(r.p50_ms for r in got[leg]):7.2f} ms  "
              f"p99 {p99:7.2f} ms  (x{p99 / base:.2f} of alone)  worst max {worst:8.2f} ms")
    print(f"after: {machine()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
