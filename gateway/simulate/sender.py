"""Send generated EnableX traffic to a gateway over real HTTP (`callgate simulate`).

The generator (`gateway.simulate.generator`) decides *what* happens and when; this module encrypts
each event exactly as EnableX does (Node createCipher via `gateway.wire.crypto`), paces the
requests in compressed wall-clock time over keep-alive connections, and reports what the
gateway answered.
"""

from __future__ import annotations

import json
import math
import queue
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from gateway.simulate.generator import (
    DEMO_APP_ID,
    DEMO_MIX,
    Delivery,
    Simulation,
    generate,
    spread_starts,
)
from gateway.wire.crypto import encrypt_event

__all__ = [
    "ALGORITHMS",
    "DEMO_APP_ID",
    "ENCODINGS",
    "FORMATS",
    "SendReport",
    "WireOptions",
    "render_request",
    "run_demo",
    "send_simulation",
]

# What the simulator offers (and the tests decrypt with openssl): the ciphers WIRE.md says
# must work, plus Node's aliases.
ALGORITHMS: tuple[str, ...] = tuple(
    f"aes-{bits}-{mode}" for mode in ("cbc", "ctr", "ecb") for bits in (128, 192, 256)
) + ("aes128", "aes192", "aes256")
FORMATS: tuple[str, ...] = ("hex", "base64", "base64url")
ENCODINGS: tuple[str, ...] = ("utf8", "utf16le")
SPELLINGS: tuple[str, ...] = ("algoritm", "algorithm", "both")
WEBHOOK_PATH = "/webhooks/enablex"


@dataclass(frozen=True)
class WireOptions:
    """How requests are written: cipher, ciphertext format, text encoding, header names."""

    app_id: str = DEMO_APP_ID
    algorithm: str = "aes-256-cbc"
    fmt: str = "hex"
    encoding: str = "utf8"
    spelling: str = "algoritm"
    plain: bool = False


def event_json(payload: dict[str, Any]) -> str:
    """The plaintext as Node's JSON.stringify writes it (compact, non-ASCII kept)."""
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)


def render_request(payload: dict[str, Any], wire: WireOptions) -> tuple[dict[str, str], bytes]:
    """Headers and body of one webhook POST, encrypted unless `wire.plain`."""
    text = event_json(payload)
    headers = {"Content-Type": "application/json"}
    if wire.plain:
        return headers, text.encode("utf-8")
    data = encrypt_event(text, wire.algorithm, wire.fmt, wire.encoding, wire.app_id)
    if wire.spelling in ("algoritm", "both"):
        headers["x-algoritm"] = wire.algorithm
    if wire.spelling in ("algorithm", "both"):
        headers["x-algorithm"] = wire.algorithm
    headers["x-format"] = wire.fmt
    headers["x-encoding"] = wire.encoding
    return headers, event_json({"encrypted_data": data}).encode("utf-8")


def webhook_url(url: str) -> str:
    """Accept a bare base URL (`http://host:port`) as well as the full webhook URL."""
    parts = urlsplit(url)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path=WEBHOOK_PATH))
    return url


@dataclass
class SendReport:
    """What the gateway answered, for the final summary and for callers like `up --demo`."""

    planned: int = 0
    sent: int = 0
    acknowledged: int = 0
    duplicates: int = 0
    refused: int = 0
    errors: int = 0
    redeliveries_sent: int = 0
    elapsed_s: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    refusals: list[str] = field(default_factory=list)  # first few refusal bodies
    latencies_ms: list[float] = field(default_factory=list)

    def record(self, response: httpx.Response | None, latency_ms: float, error: str | None) -> None:
        """Count one finished delivery."""
        self.sent += 1
        if response is None:
            self.errors += 1
            if len(self.refusals) < 5 and error:
                self.refusals.append(error)
            return
        self.latencies_ms.append(latency_ms)
        self.statuses[response.status_code] += 1
        if 200 <= response.status_code < 300:
            self.acknowledged += 1
            try:
                if response.json().get("duplicate") is True:
                    self.duplicates += 1
            except ValueError:
                pass
        else:
            self.refused += 1
            if len(self.refusals) < 5:
                self.refusals.append(f"{response.status_code} {response.text[:200]}")

    def percentile(self, p: float) -> float | None:
        """Nearest-rank percentile of request latency in ms."""
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        rank = max(1, math.ceil(p / 100 * len(ordered)))
        return ordered[rank - 1]

    @property
    def ok(self) -> bool:
        """Every request was answered 2xx."""
        return self.refused == 0 and self.errors == 0 and self.sent == self.planned

    def summary(self) -> str:
        """Human summary printed at the end of a run."""
        p50, p99 = self.percentile(50), self.percentile(99)
        rate = self.sent / self.elapsed_s if self.elapsed_s else 0.0
        lines = [
            f"sent          {self.sent} ({self.redeliveries_sent} redeliveries)"
            f" in {self.elapsed_s:.1f}s, {rate:.0f} req/s",
            f"acknowledged  {self.acknowledged}",
            f"duplicates    {self.duplicates}",
            f"refused       {self.refused}",
            f"errors        {self.errors}",
            "latency       p50 "
            + (f"{p50:.1f} ms" if p50 is not None else "-")
            + ", p99 "
            + (f"{p99:.1f} ms" if p99 is not None else "-"),
        ]
        if self.statuses:
            codes = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items()))
            lines.append(f"statuses      {codes}")
        lines.extend(f"refusal       {r}" for r in self.refusals)
        return "\n".join(lines)


def _post(
    client: httpx.Client, url: str, headers: dict[str, str], body: bytes
) -> tuple[httpx.Response | None, float, str | None]:
    """One delivery; a transport failure is retried like EnableX would (a reset is not a 4xx)."""
    began = time.perf_counter()
    for attempt in range(3):
        try:
            response = client.post(url, content=body, headers=headers)
            return response, (time.perf_counter() - began) * 1000, None
        except httpx.TransportError as exc:
            if attempt == 2:
                return None, 0.0, f"transport: {exc!r}"
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def send_simulation(
    sim: Simulation,
    url: str,
    wire: WireOptions,
    *,
    concurrency: int = 8,
    time_scale: float | None = 60.0,
    on_done: Callable[[], None] | None = None,
) -> SendReport:
    """POST every delivery of `sim` to `url`; `time_scale=None` sends as fast as possible.

    The calling thread paces deliveries onto a bounded queue; `concurrency` threads share
    one keep-alive httpx client (the sync client costs about half the CPU per request of
    the async one here, which matters when client and gateway share a machine).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    target = webhook_url(url)
    report = SendReport(planned=len(sim.deliveries))
    lock = threading.Lock()
    stop = threading.Event()
    work: queue.Queue[tuple[dict[str, str], bytes] | None] = queue.Queue(concurrency * 4)
    # A redelivery must repeat the original bytes: keep those bodies until reused.
    repeated = {d.index for d in sim.deliveries if d.redelivery}
    bodies: dict[int, tuple[dict[str, str], bytes]] = {}

    def request_for(d: Delivery) -> tuple[dict[str, str], bytes]:
        if d.redelivery:
            report.redeliveries_sent += 1
            return bodies.pop(d.index)
        req = render_request(d.payload, wire)
        if d.index in repeated:
            bodies[d.index] = req
        return req

    def worker(client: httpx.Client) -> None:
        while (item := work.get()) is not None:
            if stop.is_set():
                continue
            response, latency_ms, error = _post(client, target, *item)
            with lock:
                report.record(response, latency_ms, error)
                if on_done is not None:
                    on_done()

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    began = time.monotonic()
    with httpx.Client(limits=limits, timeout=httpx.Timeout(15.0)) as client:
        threads = [
            threading.Thread(target=worker, args=(client,), name=f"simulate-{n}", daemon=True)
            for n in range(concurrency)
        ]
        for thread in threads:
            thread.start()
        try:
            for d in sim.deliveries:
                if time_scale:
                    ahead = began + d.send_ms / 1000 / time_scale - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                work.put(request_for(d))
        except BaseException:
            stop.set()  # Ctrl-C: drop what is queued, finish what is in flight
            raise
        finally:
            for _ in threads:
                work.put(None)
            for thread in threads:
                thread.join()
            report.elapsed_s = time.monotonic() - began
    return report


def backdated_simulation(
    calls: int, *, seed: int, arrival_gap_s: float, **kwargs: Any
) -> Simulation:
    """Generate so the last event time is about now: replayed history, never future times."""
    probe = generate(
        calls,
        seed=seed,
        start=datetime(2000, 1, 1, tzinfo=UTC),
        arrival_gap_s=arrival_gap_s,
        **kwargs,
    )
    start = datetime.now(UTC) - timedelta(milliseconds=probe.span_ms) - timedelta(minutes=1)
    return generate(calls, seed=seed, start=start, arrival_gap_s=arrival_gap_s, **kwargs)


def arrival_gap(rate: float, time_scale: float) -> float:
    """Mean event-time seconds between call starts for `rate` calls per wall second."""
    return time_scale / rate if rate > 0 else 3.0


def write_truth(sim: Simulation, path: str | Path) -> None:
    """One JSON line per simulated call (then per broadcast), the expected projections."""
    with open(path, "w", encoding="utf-8") as fh:
        for row in sim.truth_lines():
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


# The demo's history ends this long before now, so every call it plays has ended (or
# gone quiet, for the stuck ones) by the time it is sent: no event time lies in the future.
DEMO_MARGIN = timedelta(minutes=30)
DEMO_CALLS = 1000
DEMO_DAYS = 14


def demo_simulation(
    calls: int, *, seed: int, now: datetime, days: int = DEMO_DAYS
) -> Simulation:
    """The demo's calls spread over the last `days` UTC days up to `now` (today included,
    up to DEMO_MARGIN ago), with a business-hours and weekday pattern, the demo mix (some
    stuck calls among them) and a few redelivered and reordered webhooks."""
    if days < 1:
        raise ValueError("days must be >= 1")
    end = now.astimezone(UTC) - DEMO_MARGIN
    start = end.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=days - 1)
    starts = spread_starts(calls, start, end, seed=seed)
    return generate(
        calls, seed=seed, start=start, starts_ms=starts, mix=DEMO_MIX,
        owner_ref="callgate-demo", duplicates=0.01, reorder=0.03,
    )  # fmt: skip


def run_demo(
    url: str,
    calls: int = DEMO_CALLS,
    app_id: str = DEMO_APP_ID,
    *,
    seed: int | None = None,
    days: int = DEMO_DAYS,
    concurrency: int = 8,
    on_done: Callable[[], None] | None = None,
) -> SendReport:
    """Play `calls` demo calls (owner_ref `callgate-demo`) of the last `days` days into the
    gateway at `url`, as fast as it takes them: it is history, already over."""
    seed = secrets.randbits(32) if seed is None else seed
    sim = demo_simulation(calls, seed=seed, now=datetime.now(UTC), days=days)
    return send_simulation(
        sim, url, WireOptions(app_id=app_id), concurrency=concurrency, time_scale=None,
        on_done=on_done,
    )  # fmt: skip
