"""`callgate serve` from two (or more) checkouts, driven alternately in one run.

For a change to the ingest path, B/A alone cannot say whether B got faster when
the machine's load moves A and B between runs; this drives the variants in turns
(order reversed every round, as bench/ingest.py does) with the same closed-loop
load and prints, per leg and as medians, requests/s and the server's CPU per
request (utime + stime of the master and its workers from /proc), which moves
less with the neighbours than a rate does. Also per leg: the machine's idle share
(all CPUs, /proc/stat: a server that leaves CPU idle under closed-loop load is
waiting, not working) and, from a callgate server's /metrics, the events per
group commit and the mean wait for and hold of the writers' turn.

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
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

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


def machine_idle() -> tuple[int, int]:
    """(idle + iowait ticks, all ticks) of every CPU so far, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return fields[3] + fields[4], sum(fields[:8])


def group_commits(url: str) -> tuple[float, float, float, float] | None:
    """(commits, events, seconds waited for the writers' turn, seconds held) so far, from
    the server's /metrics; None for a server without them (A, NATS mode)."""
    try:
        text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    except OSError:
        return None
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith(("callgate_group_commit", "callgate_writer_turn")):
                found[sample.name] = sample.value
    if "callgate_group_commit_events_count" not in found:
        return None
    return (found["callgate_group_commit_events_count"], found["callgate_group_commit_events_sum"],
            found["callgate_writer_turn_wait_seconds_sum"],
            found["callgate_writer_turn_held_seconds_sum"])


def commits_text(before: tuple[float, ...] | None, after: tuple[float, ...] | None) -> str:
    """Events per commit and the mean turn wait/hold over one leg."""
    if before is None or after is None or after[0] <= before[0]:
        return ""
    commits, events, waited, held = (a - b for a, b in zip(after, before, strict=True))
    return (f"  {events / commits:4.1f} events/commit, turn wait {waited / commits * 1e3:4.2f} "
            f"held {held / commits * 1e3:4.2f} ms")


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
        rows: dict[str, list[tuple[float, float, float]]] = {name: [] for name in servers}
        names = list(servers)
        for rnd in range(1, args.rounds + 1):
            for name in names if rnd % 2 else names[::-1]:
                server = servers[name]
                # /metrics is read outside the measured window: its own CPU is not counted.
                base = f"http://127.0.0.1:{server.port}"
                commits_before = group_commits(base)
                before, idle_before = server_cpu(server.proc.pid), machine_idle()
                result = leg(server, args.duration)
                cpu_us = (server_cpu(server.proc.pid) - before) / max(1, result.requests) * 1e6
                idle_after = machine_idle()
                commits = commits_text(commits_before, group_commits(base))
                idle = (idle_after[0] - idle_before[0]) / max(1, idle_after[1] - idle_before[1])
                rows[name].append((result.rps, cpu_us, idle))
                print(f"round {rnd} {name:12s} {result.rps:7.0f} req/s  {cpu_us:6.0f} µs CPU "
                      f"per request  machine idle {idle:4.0%}  p99 {result.p99_ms:6.1f} ms  "
                      f"non-2xx {result.non2xx}{commits}", flush=True)
        print(f"medians over {args.rounds} rounds on {ingest.host()}")
        for name, got in rows.items():
            print(f"  {name:12s} {statistics.median(r for r, _, _ in got):7.0f} req/s  "
                  f"{statistics.median(c for _, c, _ in got):6.0f} µs CPU per request  "
                  f"machine idle {statistics.median(i for _, _, i in got):4.0%}")
        print(f"machine at the end: {ingest.machine()}")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
