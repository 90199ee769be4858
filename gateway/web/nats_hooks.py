"""The webhook endpoint in NATS mode (`serve --log nats://…`): no local state at all.

Same requests, same verdicts and answers as the SQLite gateway (gateway/web/app.py),
but each verdict is published to the JetStream stream and answered only after its
PubAck. No PubAck in time (no quorum, no server) → 503 + Retry-After, never a 2xx:
EnableX redelivers, and the stream's dedup (Nats-Msg-Id = content hash) answers the
redelivery of an event that did get stored `duplicate: true`.
"""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Response, request

from gateway.config import Config
from gateway.log import nats_log
from gateway.web import metrics
from gateway.web.app import RETRY_AFTER_SECONDS, _answer, _json, _read_body
from gateway.wire.ingest import Headers, Rejected

log = logging.getLogger("callgate.gateway")


class StreamWebhooks:
    """`Webhooks`' interface (handle, refuse, wrong_token) over a `NatsRecorder`."""

    def __init__(self, config: Config, recorder: nats_log.NatsRecorder) -> None:
        self.config = config
        self.recorder = recorder

    def handle(self, path: str) -> Response:
        started = time.perf_counter()
        headers = Headers.of(request.headers.items())
        body = _read_body(self.config.max_body)
        try:
            outcome = nats_log.ingest_to_stream(
                self.recorder,
                self.config,
                headers,
                body,
                path=path,
                remote_addr=request.remote_addr,
            )
        except (nats_log.Unavailable, nats_log.UnsafeStream) as exc:
            return self.unavailable(exc, started)
        return _answer(outcome, started)

    def refuse(self, verdict: Rejected, path: str) -> Response:
        started = time.perf_counter()
        try:
            outcome = nats_log.refuse_to_stream(
                self.recorder,
                verdict,
                Headers.of(request.headers.items()),
                _read_body(self.config.max_body),
                request.method,
                path,
                request.remote_addr,
            )
        except (nats_log.Unavailable, nats_log.UnsafeStream) as exc:
            return self.unavailable(exc, started)
        return _answer(outcome, started)

    def wrong_token(self, path: str) -> Response:
        return self.refuse(Rejected("bad_token", "no webhook endpoint at this path"), path)

    def unavailable(self, exc: Exception, started: float) -> Response:
        metrics.observe("unavailable", "log", time.perf_counter() - started)
        if isinstance(exc, nats_log.UnsafeStream):
            log.error("outcome=unavailable error=unsafe_stream detail=%s", exc)
        else:
            log.warning("outcome=unavailable error=log detail=%s", exc)
        return _json(
            {
                "error": "log_unavailable",
                "detail": "the event stream did not acknowledge the event; retry",
            },
            503,
            Retry_After=RETRY_AFTER_SECONDS,
        )


def operations_blueprint(recorder: nats_log.NatsRecorder) -> Blueprint:
    """`/healthz` (a stream round trip) and `/metrics` (counters, publish latency)."""
    bp = Blueprint("operations", __name__)

    @bp.get("/healthz")
    def healthz() -> Response:
        try:
            return _json(recorder.health(), 200)
        except (nats_log.Unavailable, nats_log.UnsafeStream) as exc:
            detail = "unsafe stream" if isinstance(exc, nats_log.UnsafeStream) else "unreachable"
            return _json({"status": "unavailable", "log": "nats", "detail": detail}, 503)

    @bp.get("/metrics")
    def metrics_view() -> Response:
        return Response(metrics.render(None), mimetype=metrics.CONTENT_TYPE)

    return bp
