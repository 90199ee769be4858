"""`callgate serve` from two (or more) checkouts, driven alternately in one run.

For a change to the ingest path, B/A alone cannot say whether B got faster when
the machine's load moves A and B between runs; this drives the variants in turns
(order reversed every round, as bench/ingest.py does) with the same closed-loop
load and prints, per leg and as medians, requests/s and the server's CPU per
request (utime + stime of the master and its workers from /proc), which moves
less with the neighbours than a rate does.

    .venv/bin/python bench/compare_serve.py \\
        --variant old=/path/to/old/checkout --variant new=.:--threads 6

A variant is NAME=PATH[:SERVE ARGS]: the server runs this venv's `callgate` with
PYTHONPATH=PATH, so PATH's `gateway` package is the one served (its dependencies
must match this venv's). PATH `minimal` serves bench/minimal_app.py (A of
bench/ingest.py) instead, for scale. Figures only, nothing asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

import ingest  # noqa: E402
from loadgen import LoadResult, run_python, run_wrk, wrk_path  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CONNECTIONS = 32


def server_cpu(pid: int) -> float:
    """CPU seconds of a gunicorn master and its workers so far."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    total = 0.0
    for proc in [pid, *map(int, out.split())]:
        try:
            fields = Path(f"/proc/{proc}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", action="append", required=True, metavar="NAME=PATH[:ARGS]")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=float, default=5.0, help="seconds per leg")
    p.add_argument("--tmp-dir", default=None, help="where the databases go (a real disk)")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="callgate-compare-", dir=args.tmp_dir))
    bodies = ingest.EventBodies(ingest.APP_ID)
    servers: dict[str, ingest.Server] = {}

    def leg(server: ingest.Server, seconds: float) -> LoadResult:
        path = bodies.write(workdir / "bodies.txt", int(4000 * seconds) + 1000)
        if wrk_path():
            return run_wrk(server.url, path, seconds, CONNECTIONS, 1)
        return run_python(server.url, path, seconds, CONNECTIONS, 1)

    print(f"machine: {ingest.machine()}")
    try:
        for spec in args.variant:
            name, _, rest = spec.partition("=")
            path, _, extra = rest.partition(":")
            port = ingest.free_port()
            db = workdir / f"{name}.db"
            env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
            env.update({"ENABLEX_APP_ID": ingest.APP_ID, "CALLGATE_DB": str(db),
                        "PYTHONPATH": str(Path(path).resolve())})
            if path == "minimal":  # A of bench/ingest.py, for scale
                cmd = [sys.executable, str(BENCH / "minimal_app.py"), "--port", str(port)]
            else:
                cmd = [ingest.callgate_executable(), "serve", "--db", str(db), "--port",
                       str(port)]
            cmd += extra.split()
            servers[name] = ingest.start_server(name, cmd, port, workdir, env)
        for server in servers.values():
            server.wait_ready()
            leg(server, 2)  # warm-up
        rows: dict[str, list[tuple[float, float]]] = {name: [] for name in servers}
        names = list(servers)
        for rnd in range(1, args.rounds + 1):
            for name in names if rnd % 2 else names[::-1]:
                server = servers[name]
                before = server_cpu(server.proc.pid)
                result = leg(server, args.duration)
                cpu_us = (server_cpu(server.proc.pid) - before) / max(1, result.requests) * 1e6
                rows[name].append((result.rps, cpu_us))
                print(f"round {rnd} {name:12s} {result.rps:7.0f} req/s  {cpu_us:6.0f} µs CPU "
                      f"per request  p99 {result.p99_ms:6.1f} ms  non-2xx {result.non2xx}",
                      flush=True)
        print(f"medians over {args.rounds} rounds on {ingest.host()}")
        for name, got in rows.items():
            print(f"  {name:12s} {statistics.median(r for r, _ in got):7.0f} req/s  "
                  f"{statistics.median(c for _, c in got):6.0f} µs CPU per request")
        print(f"machine at the end: {ingest.machine()}")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
