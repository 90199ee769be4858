"""Forwarding benchmark: signed deliveries per second to a real local receiver.

Fills a fresh log with the corpus flows, replicated under new voice ids (so
there are many calls), subscribes the receiver of tests/receiver.py (which
verifies every signature with `standardwebhooks`, as a user's app would) and
times `forward_once` for each worker count. A second figure uses a single
call: per-call order makes those deliveries strictly one at a time, so that
rate is the round-trip bound any ordered forwarder has.

    .venv/bin/python bench/forward.py [--events 4000] [--workers 1,4,8,16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.db import connect, log_head

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.forward import delivery, outbox  # noqa: E402
from gateway.forward.subscriptions import SecretStore, create_subscription, generate_secret  # noqa: E402
from gateway.log import eventlog  # noqa: E402
from tests.helpers_analytics import new_event  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLOWS = sorted((REPO / "tests/fixtures/enablex/corpus/flows").glob("*.json"))
RECEIVED = "2024-06-01T00:00:00.000Z"
ID_KEYS = ("voice_id", "voice_Id", "voiceId", "VoiceId", "broadcast_id")


def corpus_events(copies: int, one_call: bool) -> list[dict[str, Any]]:
    """The corpus events `copies` times, each copy under its own ids (or all under one id)."""
    events = []
    for copy in range(copies):
        for path in FLOWS:
            for raw in json.loads(path.read_text())["events"]:
                raw = dict(raw)
                for key in ID_KEYS:
                    if key in raw:
                        raw[key] = "bench-call" if one_call else f"{raw[key]}-{copy}"
                raw["bench_copy"] = copy  # keep copies distinct for the duplicate check
                events.append(raw)
    return events


def fill(db: str, raws: list[dict[str, Any]]) -> int:
    conn = connect(db, synchronous="OFF")
    eventlog.ensure_schema(conn)
    eventlog.append_batch(conn, [new_event(raw, RECEIVED, app_label="app-bench") for raw in raws])
    head = log_head(conn)[0]
    conn.close()
    return head


def start_receiver(log: Path, secret: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests/receiver.py"), "--log", str(log), "--secret", secret],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        raise RuntimeError(f"receiver did not start: {line!r}")
    return proc, int(line.split()[1])


def run(events: int, workers: int, one_call: bool, tmp: Path) -> tuple[int, float, int]:
    """One timed forward pass; returns (deliveries, seconds, receiver-verified count)."""
    per_copy = sum(len(json.loads(p.read_text())["events"]) for p in FLOWS)
    raws = corpus_events(max(1, events // per_copy), one_call)[:events]
    run_dir = Path(tempfile.mkdtemp(dir=tmp))
    db = str(run_dir / "callgate.db")
    head = fill(db, raws)
    secret = generate_secret()
    proc, port = start_receiver(run_dir / "received.jsonl", secret)
    try:
        conn = outbox.open_db(db)
        store = SecretStore(str(run_dir / "secrets.db"))
        create_subscription(conn, store, f"http://127.0.0.1:{port}/hook", ["*"], secret, True)
        store.close()
        conn.close()
        options = delivery.ForwardOptions(
            workers=workers, secrets_db=str(run_dir / "secrets.db"), timeout=10.0
        )
        t0 = time.perf_counter()
        stats = delivery.forward_once(db, options)
        elapsed = time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    lines = (run_dir / "received.jsonl").read_text().splitlines()
    verified = sum(1 for line in lines if json.loads(line)["verified"] == [True])
    if stats.delivered != head:
        raise RuntimeError(f"delivered {stats.delivered} of {head}")
    return stats.delivered, elapsed, verified


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--workers", default="1,4,8,16")
    parser.add_argument("--single-call-events", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="callgate-bench-forward-") as tmp:
        print("forward bench: corpus flows replicated, receiver = tests/receiver.py (verifies)")
        for workers in [int(w) for w in args.workers.split(",")]:
            n, seconds, verified = run(args.events, workers, False, Path(tmp))
            print(
                f"  many calls  workers={workers:<3} {n:>6} deliveries in {seconds:6.2f} s "
                f"= {n / seconds:8.0f} deliveries/s (receiver verified {verified})"
            )
        n, seconds, verified = run(args.single_call_events, 8, True, Path(tmp))
        print(
            f"  one call    workers=8   {n:>6} deliveries in {seconds:6.2f} s "
            f"= {n / seconds:8.0f} deliveries/s (strictly sequential: per-call order)"
        )


if __name__ == "__main__":
    main()
