"""Load generators for bench/ingest.py, each running outside the server's processes.

- `run_wrk`: closed-loop maximum rate with wrk and bench/wrk_post.lua (preferred: wrk costs
  the shared CPUs far less than any Python client).
- `run_python`: multi-process keep-alive client (one asyncio loop per process). Closed
  loop (`rate=None`) is the fallback when wrk is missing; open loop (`rate=R`) is the
  fixed-rate mode behind `--latency-at`: requests are scheduled R per second regardless of
  how fast answers come back, and latency is measured from the *scheduled* send time, so a
  stalled server shows up as latency instead of silently lowering the offered load
  (no coordinated omission).

Both read request bodies from a file with one body per line and give each connection its
own share of the lines, so no event is sent twice unless the file runs out (`wrapped`).
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

LUA_SCRIPT = Path(__file__).resolve().parent / "wrk_post.lua"
WEBHOOK_HEADERS = {
    "Content-Type": "application/json",
    "x-algoritm": "aes-256-cbc",
    "x-format": "hex",
    "x-encoding": "utf8",
}


@dataclass
class LoadResult:
    """What one leg of load produced; latencies in milliseconds."""

    client: str
    requests: int
    ok: int
    non2xx: int
    errors: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    wrapped: int = 0
    offered_rps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)  # non-2xx answers by status

    @property
    def rps(self) -> float:
        """Completed requests per second over the leg."""
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0


def wrk_path() -> str | None:
    """The wrk executable, if installed."""
    return shutil.which("wrk")


def run_wrk(
    url: str, bodies: Path, duration: float, connections: int, threads: int, timeout_s: int = 10
) -> LoadResult:
    """Closed loop: `connections` keep-alive connections each sending as fast as answered."""
    threads = max(1, min(threads, connections))
    cmd = [
        wrk_path() or "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        f"--timeout={timeout_s}s",
        "-s",
        str(LUA_SCRIPT),
        url,
        "--",
        str(bodies),
        str(threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
    line = next(
        (ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None
    )
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout}\n{proc.stderr}")
    data = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return LoadResult(
        client="wrk",
        requests=data["requests"],
        ok=data["ok"],
        non2xx=data["non2xx"],
        errors=errors,
        duration_s=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1e3,
        p90_ms=data["p90_us"] / 1e3,
        p99_ms=data["p99_us"] / 1e3,
        max_ms=data["max_us"] / 1e3,
        wrapped=data["wrapped"],
        extra={k: data[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts")},
        statuses={int(k): v for k, v in data["non2xx_by_status"].items()},
    )


# --------------------------------------------------------------------------- python client


@dataclass
class _Plan:
    """One client process's share of the work (picklable, sent to the child)."""

    url: str
    bodies: str
    duration: float
    start_at: float  # time.monotonic() value shared by all processes (system-wide clock)
    proc_index: int
    procs: int
    connections: int  # connections in this process
    total_connections: int
    first_conn: int  # global index of this process's first connection
    rate: float | None  # whole-run requests/s (open loop), None = closed loop


def _read_share(path: str, conn_index: int, total: int) -> list[bytes]:
    """Lines conn_index, conn_index+total, ... of the body file."""
    share: list[bytes] = []
    with open(path, "rb") as fh:
        for n, line in enumerate(fh):
            if n % total == conn_index:
                share.append(line.rstrip(b"\n"))
    return share


class _Stats:
    """What one client process counts; latencies in milliseconds."""

    def __init__(self) -> None:
        self.latencies = array("d")
        self.counts = {"requests": 0, "ok": 0, "non2xx": 0, "errors": 0, "wrapped": 0, "late": 0}
        self.statuses: dict[int, int] = {}


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bool]:
    """Send one request on a kept-alive connection; (status, server keeps it open)."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, keep = 0, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep = False
    await reader.readexactly(length)
    return status, keep


async def _run_plan(plan: _Plan) -> _Stats:
    """One event loop drives all of this process's connections.

    asyncio rather than a thread per connection: 32 client threads fight over one GIL,
    and at a few thousand requests a second their switching showed up as milliseconds
    of latency that were the client's, not the server's.
    """
    parts = urlsplit(plan.url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in WEBHOOK_HEADERS.items())
    ).encode()
    stats = _Stats()
    next_slot = 0
    end_at = plan.start_at + plan.duration

    def due_time() -> float | None:
        """Open loop: the next slot of this process's evenly interleaved schedule."""
        nonlocal next_slot
        assert plan.rate is not None
        slot, next_slot = next_slot, next_slot + 1
        due = plan.start_at + (slot * plan.procs + plan.proc_index) / plan.rate
        return due if due < end_at else None

    async def connection(bodies: list[bytes]) -> None:
        counts = stats.counts
        streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        index = 0
        await asyncio.sleep(max(0.0, plan.start_at - time.monotonic()))
        while True:
            if plan.rate is None:
                started = time.monotonic()
                if started >= end_at:
                    break
            else:
                due = due_time()
                if due is None:
                    break
                now = time.monotonic()
                if due > now:
                    await asyncio.sleep(due - now)
                else:
                    counts["late"] += 1
                started = due
            if index >= len(bodies):
                index = 0
                counts["wrapped"] += 1
            body = bodies[index]
            index += 1
            request = head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            try:
                if streams is None:
                    streams = await asyncio.wait_for(asyncio.open_connection(host, port), 30)
                status, keep = await asyncio.wait_for(_exchange(*streams, request), 30)
            except (OSError, TimeoutError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError, ValueError, IndexError):
                counts["errors"] += 1
                if streams is not None:
                    streams[1].close()
                streams = None
                continue
            if not keep:
                streams[1].close()
                streams = None
            stats.latencies.append((time.monotonic() - started) * 1e3)
            counts["requests"] += 1
            if 200 <= status < 300:
                counts["ok"] += 1
            else:
                counts["non2xx"] += 1
                stats.statuses[status] = stats.statuses.get(status, 0) + 1
        if streams is not None:
            streams[1].close()

    shares = [
        _read_share(plan.bodies, plan.first_conn + i, plan.total_connections)
        for i in range(plan.connections)
    ]
    await asyncio.gather(*(connection(share) for share in shares))
    return stats


def _client_process(plan: _Plan, out: Any) -> None:
    """A client child process: runs its plan and sends counts + latencies back."""
    stats = asyncio.run(_run_plan(plan))
    out.send((stats.counts, stats.statuses, stats.latencies.tobytes()))
    out.close()


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(0, min(len(sorted_values) - 1, round(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


def run_python(
    url: str,
    bodies: Path,
    duration: float,
    connections: int,
    processes: int | None = None,
    rate: float | None = None,
) -> LoadResult:
    """Keep-alive client in `processes` child processes; open loop when `rate` is given."""
    procs = max(1, min(processes or (os.cpu_count() or 1), connections))
    ctx = mp.get_context("fork")
    start_at = time.monotonic() + 1.0  # time for every child to read its bodies
    children = []
    first = 0
    for p in range(procs):
        mine = connections // procs + (1 if p < connections % procs else 0)
        plan = _Plan(
            url, str(bodies), duration, start_at, p, procs, mine, connections, first, rate
        )
        first += mine
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_client_process, args=(plan, send), daemon=True)
        child.start()
        send.close()
        children.append((child, recv))
    totals: dict[str, int] = {}
    by_status: dict[int, int] = {}
    merged = array("d")
    for child, recv in children:
        counts, statuses, raw = recv.recv()
        child.join()
        for code, value in statuses.items():
            by_status[code] = by_status.get(code, 0) + value
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
        part = array("d")
        part.frombytes(raw)
        merged.extend(part)
    elapsed = max(time.monotonic() - start_at, 1e-9)
    values = sorted(merged)
    return LoadResult(
        client="python-open-loop" if rate else "python",
        requests=totals["requests"],
        ok=totals["ok"],
        non2xx=totals["non2xx"],
        errors=totals["errors"],
        # Open loop: the schedule spans `duration`; closed loop: until the last answer.
        duration_s=duration if rate else elapsed,
        p50_ms=_percentile(values, 50),
        p90_ms=_percentile(values, 90),
        p99_ms=_percentile(values, 99),
        max_ms=values[-1] if values else 0.0,
        wrapped=totals["wrapped"],
        offered_rps=rate,
        extra={"late_starts": totals["late"], "p99_9_ms": _percentile(values, 99.9)},
        statuses=by_status,
    )
