"""Gateway CPU pinning next to the processes `callgate up` runs beside it.

`callgate serve` pins each gunicorn worker to a CPU of its own (bench/ingest.py
measures that alone). `callgate up` also runs `project --follow` and Datasette on
the same log and the same CPUs, unpinned. This starts that set on a fresh log per
leg, once with `callgate serve` pinned and once with `--no-cpu-affinity`
(alternating which goes first each round), drives the gateway closed loop with
unique encrypted events (wrk, else the Python client), and prints requests/s,
latency and how long after the load the projector had folded the last event.
Figures only: nothing here asserts a timing.

    .venv/bin/python bench/colocated.py [--rounds 2] [--duration 8] [--connections 32]
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
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
    fmt_leg,
    free_port,
    machine,
    start_server,
)
from loadgen import LoadResult, run_python, run_wrk, wrk_path  # noqa: E402

from gateway.db import log_head_seq  # noqa: E402
from tests.corpus import APP_ID  # noqa: E402


def projector_lag(db: Path, timeout: float = 60.0) -> tuple[int, float]:
    """(events in the log, seconds until the projector's checkpoint reached the last one)."""
    started = time.monotonic()
    conn = sqlite3.connect(db)
    try:
        head = log_head_seq(conn)
        while time.monotonic() - started < timeout:
            row = conn.execute("SELECT seq FROM checkpoints WHERE name = 'projector'").fetchone()
            if row is not None and row[0] >= head:
                break
            time.sleep(0.05)
        return int(head), time.monotonic() - started
    finally:
        conn.close()


def leg(
    pinned: bool, args: argparse.Namespace, bodies: EventBodies
) -> tuple[LoadResult, int, float]:
    """One fresh log: gateway (pinned or not) + projector + Datasette, loaded closed loop."""
    workdir = Path(tempfile.mkdtemp(prefix="callgate-colocated-"))
    db = workdir / "callgate.db"
    exe = callgate_executable()
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env = {**env, "ENABLEX_APP_ID": APP_ID, "CALLGATE_DB": str(db)}
    port = free_port()
    affinity = [] if pinned else ["--no-cpu-affinity"]
    gateway = start_server(
        "gateway", [exe, "serve", "--db", str(db), "--port", str(port), *affinity],
        port, workdir, env,
    )  # fmt: skip
    others = []
    try:
        gateway.wait_ready()
        for argv in (["project", "--follow"], ["datasette", "--port", str(free_port())]):
            others.append(
                subprocess.Popen(
                    [exe, *argv, "--db", str(db)], env=env, stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            )
        time.sleep(args.settle)  # the projector and Datasette have started
        load = bodies.write(workdir / "bodies.txt", int(8000 * args.duration) + 1000)
        if wrk_path():
            result = run_wrk(gateway.url, load, args.duration, args.connections, 2)
        else:
            result = run_python(gateway.url, load, args.duration, args.connections)
        events, lag = projector_lag(db)
        return result, events, lag
    finally:
        for proc in others:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        gateway.stop()
        for proc in others:
            proc.wait()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of both legs (default 2)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per leg")
    p.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before the load starts")
    args = p.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"load: {'wrk' if wrk_path() else 'python'}, {args.connections} connections, "
          f"{args.rounds} rounds x {args.duration:g} s per leg")  # fmt: skip
    bodies = EventBodies(APP_ID)
    rates: dict[bool, list[float]] = {True: [], False: []}
    for rnd in range(1, args.rounds + 1):
        for pinned in (True, False) if rnd % 2 else (False, True):
            result, events, lag = leg(pinned, args, bodies)
            rates[pinned].append(result.rps)
            label = "pinned  " if pinned else "unpinned"
            print(f"round {rnd} {label} {fmt_leg(result)}  events {events}  "
                  f"projector caught up {lag:.1f} s after the load")  # fmt: skip
    pinned, unpinned = (sum(rates[k]) / len(rates[k]) for k in (True, False))
    print(f"mean: pinned {pinned:.0f} req/s, unpinned {unpinned:.0f} req/s, "
          f"pinned/unpinned {pinned / unpinned:.2f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
