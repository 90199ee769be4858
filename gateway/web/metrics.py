"""Prometheus metrics for the gateway, safe under several gunicorn worker processes.

prometheus-client switches to its multiprocess value files when
PROMETHEUS_MULTIPROC_DIR is set before it is imported; `callgate serve` sets it.
"""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "callgate_webhook_requests_total",
    "Webhook requests by outcome (accepted, duplicate, rejected) and error code.",
    ["outcome", "error"],
)
DUPLICATES = Counter("callgate_webhook_duplicates_total", "Redelivered webhooks answered 2xx.")
STORAGE_ERRORS = Counter(
    "callgate_storage_errors_total", "Requests answered 503 because the database failed."
)
LATENCY = Histogram(
    "callgate_ingest_seconds",
    "Time from request received to answer, seconds.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
# NATS mode (`serve --log nats://…`): the time from publish to PubAck, and publishes
# that got none (answered 503).
PUBLISH_LATENCY = Histogram(
    "callgate_nats_publish_seconds",
    "Time from publishing an event or rejection to its JetStream PubAck, seconds.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
PUBLISH_ERRORS = Counter(
    "callgate_nats_publish_errors_total",
    "Publishes that got no PubAck in time (no quorum, no server, unsafe stream).",
)
# SQLite mode: one observation per group commit (BatchWriter's observer), so an
# operator sees how deep the batches are and how long the worker processes queue
# for the writers' turn, the figures that say whether commits or CPU limit ingest.
GROUP_COMMIT_EVENTS = Histogram(
    "callgate_group_commit_events",
    "Events committed per group commit (one transaction, one fsync).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
_TURN_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.125, 0.25, 1.0)
TURN_WAIT = Histogram(
    "callgate_writer_turn_wait_seconds",
    "Time a group commit waited for the writers' turn (the worker processes take turns).",
    buckets=_TURN_BUCKETS,
)
TURN_HELD = Histogram(
    "callgate_writer_turn_held_seconds",
    "Time a group commit held the writers' turn: key store, sealing, insert and COMMIT.",
    buckets=_TURN_BUCKETS,
)

CONTENT_TYPE = CONTENT_TYPE_LATEST


def observe_group_commit(events: int, waited: float, held: float) -> None:
    GROUP_COMMIT_EVENTS.observe(events)
    TURN_WAIT.observe(waited)
    TURN_HELD.observe(held)


def observe_publish(seconds: float, ok: bool) -> None:
    if ok:
        PUBLISH_LATENCY.observe(seconds)
    else:
        PUBLISH_ERRORS.inc()


_CHILDREN: dict[tuple[str, str], Any] = {}


def observe(outcome: str, error: str, seconds: float) -> None:
    """Count one answered webhook; label children are cached (labels() locks and allocates)."""
    child = _CHILDREN.get((outcome, error))
    if child is None:
        child = REQUESTS.labels(outcome=outcome, error=error)
        _CHILDREN[(outcome, error)] = child
    child.inc()
    if outcome == "duplicate":
        DUPLICATES.inc()
    LATENCY.observe(seconds)


def _age_registry(conn: sqlite3.Connection) -> CollectorRegistry:
    """Log-derived gauges, read at scrape time so every worker reports the same truth."""
    registry = CollectorRegistry()
    age = Gauge(
        "callgate_newest_event_age_seconds",
        "Seconds since the newest logged event was received.",
        registry=registry,
    )
    head = Gauge("callgate_log_head_seq", "Seq of the newest logged event.", registry=registry)
    row = conn.execute("SELECT seq, received_at FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    if row:
        received = datetime.strptime(row[1], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        age.set((datetime.now(UTC) - received).total_seconds())
        head.set(row[0])
    else:
        age.set(float("nan"))
        head.set(0)
    return registry


def render(conn: sqlite3.Connection | None) -> bytes:
    """Every counter; with the log's connection (SQLite mode) also its head and age."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        text = generate_latest(registry)
    else:
        text = generate_latest(REGISTRY)
    return text if conn is None else text + generate_latest(_age_registry(conn))
