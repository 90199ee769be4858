"""The Flask gateway: EnableX's `event_url`.

A request is answered 2xx only after its event committed; anything refused is
kept in `rejections` and answered with `{"error", "detail"}`; a failing
database gets 503 + Retry-After so EnableX redelivers. Never a 500.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import sqlite3
import threading
import time
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import orjson
from flask import Blueprint, Flask, Response, request
from werkzeug.exceptions import HTTPException

from gateway.config import Config
from gateway.db import connect, log_head
from gateway.log import eventlog
from gateway.log.intake import Outcome, ingest_request, reject
from gateway.log.writer import BatchWriter
from gateway.web import metrics
from gateway.wire.ingest import Headers, LiveHeaders, Rejected, public_code

if TYPE_CHECKING:
    from gateway.log.nats_log import NatsRecorder

log = logging.getLogger("callgate.gateway")
RETRY_AFTER_SECONDS = "5"
READ_CHUNK = 64 * 1024


class Store:
    """One SQLite connection per worker process and thread, opened after fork."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._local = threading.local()
        self._schema_ready = False

    def conn(self) -> sqlite3.Connection:
        cached = getattr(self._local, "conn", None)
        if cached is not None and getattr(self._local, "pid", None) == os.getpid():
            return cached
        conn = connect(
            self.config.db_path, self.config.synchronous, self.config.busy_timeout
        )
        if not self._schema_ready:
            eventlog.ensure_schema(conn)
            self._schema_ready = True
        self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def reset(self) -> None:
        """Drop this thread's connection after a storage error; the next request reopens."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()


def _json(body: dict[str, Any], status: int, **headers: str) -> Response:
    """A JSON answer, serialised with orjson: this runs for every webhook."""
    response = Response(orjson.dumps(body), status=status, mimetype="application/json")
    for name, value in headers.items():
        response.headers[name.replace("_", "-")] = value
    return response


class Webhooks:
    """The webhook endpoint's work: every request becomes an event or a rejection."""

    def __init__(self, config: Config, store: Store, writer: BatchWriter | None) -> None:
        self.config = config
        self.store = store
        self.writer = writer
        self.admitted = writer.admitted if writer is not None else contextlib.nullcontext

    def handle(self, path: str) -> Response:
        started = time.perf_counter()
        req = request._get_current_object()
        body = _read_body(self.config.max_body)
        try:
            # Non-POST never gets here: refuse_other_methods keeps and answers it.
            with self.admitted():
                outcome = ingest_request(
                    self.store.conn(),
                    self.config,
                    LiveHeaders(req.headers),
                    body,
                    path=path,
                    remote_addr=req.remote_addr,
                    writer=self.writer,
                )
        except sqlite3.Error as exc:
            return self.storage_failure(exc, started)
        return _answer(outcome, started)

    def refuse(self, verdict: Rejected, path: str) -> Response:
        """Keep a request refused before ingest (method, token) and answer it."""
        started = time.perf_counter()
        try:
            outcome = reject(
                self.store.conn(),
                verdict,
                Headers.of(request.headers.items()),
                _read_body(self.config.max_body),
                request.method,
                path,
                request.remote_addr,
            )
        except sqlite3.Error as exc:
            return self.storage_failure(exc, started)
        return _answer(outcome, started)

    def wrong_token(self, path: str) -> Response:
        return self.refuse(Rejected("bad_token", "no webhook endpoint at this path"), path)

    def storage_failure(self, exc: sqlite3.Error, started: float) -> Response:
        self.store.reset()
        metrics.STORAGE_ERRORS.inc()
        metrics.observe("unavailable", "storage", time.perf_counter() - started)
        log.warning("outcome=unavailable error=storage detail=%s", type(exc).__name__)
        return _json(
            {"error": "storage_unavailable", "detail": "the event log is not writable; retry"},
            503,
            Retry_After=RETRY_AFTER_SECONDS,
        )


def tokens_match(given: str, expected: str) -> bool:
    """Constant-time comparison (no timing oracle for the token, one byte at a time).
    Compared as UTF-8 bytes: `hmac.compare_digest` refuses non-ASCII str."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


class Hooks(Protocol):
    """What the webhook routes need: `Webhooks` here, `StreamWebhooks` in NATS mode."""

    config: Config

    def handle(self, path: str) -> Response: ...
    def refuse(self, verdict: Rejected, path: str) -> Response: ...
    def wrong_token(self, path: str) -> Response: ...


def webhook_blueprint(hooks: Hooks) -> Blueprint:
    """`/webhooks/enablex[/<token>]`; any other method on those paths is kept and refused."""
    bp = Blueprint("webhooks", __name__)
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    token = hooks.config.webhook_token

    @bp.before_app_request
    def refuse_other_methods() -> Response | None:
        """Any non-POST on the webhook paths (even OPTIONS, TRACE, made-up verbs) is kept,
        and so is a POST to a path under them that no route matches (`/a/b`, `//`).

        Runs before routing errors are raised, so Flask's own automatic OPTIONS, 405,
        404 and slash-merging redirect answers never bypass the rejections table:
        nothing is dropped.
        """
        if not request.path.startswith("/webhooks/enablex"):
            return None
        tokenless = request.path.rstrip("/") == "/webhooks/enablex"
        path = "/webhooks/enablex" if tokenless else "/webhooks/enablex/<redacted>"
        if request.method != "POST":
            return hooks.refuse(
                Rejected("method_not_allowed", f"{request.method} is not accepted; use POST"),
                path,
            )
        if request.routing_exception is not None and (
            tokenless or request.path.startswith("/webhooks/enablex/")
        ):
            return hooks.wrong_token(path)
        return None

    # A trailing slash (`event_url` set as …/enablex/<token>/) reaches the same route.
    @bp.route("/webhooks/enablex", methods=methods, strict_slashes=False)
    def webhook() -> Response:
        if token:
            return hooks.wrong_token("/webhooks/enablex")
        return hooks.handle("/webhooks/enablex")

    @bp.route("/webhooks/enablex/<path_token>", methods=methods, strict_slashes=False)
    def webhook_with_token(path_token: str) -> Response:
        if not token or not tokens_match(path_token, token):
            return hooks.wrong_token("/webhooks/enablex/<redacted>")
        return hooks.handle("/webhooks/enablex/<token>")

    return bp


def operations_blueprint(store: Store) -> Blueprint:
    """`/healthz` (a database round trip) and `/metrics` (Prometheus text)."""
    bp = Blueprint("operations", __name__)

    @bp.get("/healthz")
    def healthz() -> Response:
        try:
            conn = store.conn()
            conn.execute("SELECT count(*) FROM (SELECT 1 FROM events LIMIT 1)").fetchone()
            seq, _ = log_head(conn)
        except sqlite3.Error as exc:
            store.reset()
            return _json({"status": "unavailable", "detail": type(exc).__name__}, 503)
        return _json({"status": "ok", "head_seq": seq}, 200)

    @bp.get("/metrics")
    def metrics_view() -> Response:
        try:
            payload = metrics.render(store.conn())
        except sqlite3.Error as exc:
            store.reset()
            return _json({"error": "storage_unavailable", "detail": type(exc).__name__}, 503)
        return Response(payload, mimetype=metrics.CONTENT_TYPE)

    return bp


def register_error_handlers(app: Flask) -> None:
    """JSON for every error, never a 500 page or a traceback."""

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = (exc.name or "http_error").lower().replace(" ", "_")
        return _json({"error": code, "detail": exc.description or code}, exc.code or 400)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        # Last line of defence: log the type only (never payloads), answer JSON.
        log.error("outcome=error type=%s", type(exc).__name__)
        if isinstance(exc, sqlite3.Error):
            return _json(
                {"error": "storage_unavailable", "detail": "retry"},
                503,
                Retry_After=RETRY_AFTER_SECONDS,
            )
        return _json(
            {"error": "internal", "detail": "the request could not be processed; retry"},
            503,
            Retry_After=RETRY_AFTER_SECONDS,
        )


def open_store(config: Config) -> Store:
    """The worker's store, schema ensured; a worker boots even when storage is down."""
    store = Store(config)
    try:
        store.conn()  # creates or migrates the schema on its first call
    except sqlite3.Error as exc:
        # Boot anyway: gunicorn halts the whole server when a worker fails to boot, so a
        # full or unwritable disk would become refused connections. Requests answer 503
        # (and `Store.conn` retries the schema) until the storage is back.
        store.reset()
        log.warning("storage unavailable at start (%s); answering 503", type(exc).__name__)
    return store


def create_app(config: Config | None = None) -> Flask:
    """Wire the gateway: storage, the group-commit writer, the endpoints, error handlers."""
    config = config or Config.from_env()
    app = Flask("callgate")
    app.config["CALLGATE"] = config
    # Bodies are read by us, capped: Werkzeug must not buffer more than the limit.
    app.config["MAX_CONTENT_LENGTH"] = None
    if config.nats_servers:
        return _stream_app(app, config)
    config.ensure_db_dir()
    store = open_store(config)
    writer = (
        BatchWriter(
            config.db_path,
            config.synchronous,
            busy_timeout=config.busy_timeout,
            checkpoint=config.checkpoint,
            observer=metrics.observe_group_commit,
        )
        if config.group_commit
        else None
    )
    app.extensions["callgate_store"] = store
    app.extensions["callgate_writer"] = writer
    app.register_blueprint(webhook_blueprint(Webhooks(config, store, writer)))
    app.register_blueprint(operations_blueprint(store))
    register_error_handlers(app)
    return app


def _stream_app(app: Flask, config: Config) -> Flask:
    """NATS mode: the same endpoints over a JetStream recorder, no database at all."""
    recorder = nats_log().NatsRecorder(
        nats_log().NatsSettings.from_config(config), metrics.observe_publish
    )
    app.extensions["callgate_store"] = None
    app.extensions["callgate_writer"] = None
    app.extensions["callgate_recorder"] = recorder
    app.register_blueprint(webhook_blueprint(StreamWebhooks(config, recorder)))
    app.register_blueprint(stream_operations_blueprint(recorder))
    register_error_handlers(app)
    return app


def nats_log() -> ModuleType:
    """gateway.log.nats_log, imported on first use: the SQLite gateway never loads nats-py."""
    import gateway.log.nats_log as module

    return module


# --- NATS mode (`serve --log nats://…`): no local state at all. Same requests, verdicts
# and answers as above, but each verdict is published to the JetStream stream and
# answered only after its PubAck. No PubAck in time (no quorum, no server) → 503 +
# Retry-After, never a 2xx: EnableX redelivers, and the stream's dedup (Nats-Msg-Id =
# content hash) answers the redelivery of an event that did get stored duplicate: true.


class StreamWebhooks:
    """`Webhooks`' interface (handle, refuse, wrong_token) over a `NatsRecorder`."""

    def __init__(self, config: Config, recorder: NatsRecorder) -> None:
        self.config = config
        self.recorder = recorder

    def handle(self, path: str) -> Response:
        started = time.perf_counter()
        req = request._get_current_object()
        body = _read_body(self.config.max_body)
        try:
            outcome = nats_log().ingest_to_stream(
                self.recorder,
                self.config,
                LiveHeaders(req.headers),
                body,
                path=path,
                remote_addr=req.remote_addr,
            )
        except nats_log().NATS_FAILURES as exc:
            return self.unavailable(exc, started)
        return _answer(outcome, started)

    def refuse(self, verdict: Rejected, path: str) -> Response:
        started = time.perf_counter()
        try:
            outcome = nats_log().refuse_to_stream(
                self.recorder,
                verdict,
                Headers.of(request.headers.items()),
                _read_body(self.config.max_body),
                request.method,
                path,
                request.remote_addr,
            )
        except nats_log().NATS_FAILURES as exc:
            return self.unavailable(exc, started)
        return _answer(outcome, started)

    def wrong_token(self, path: str) -> Response:
        return self.refuse(Rejected("bad_token", "no webhook endpoint at this path"), path)

    def unavailable(self, exc: Exception, started: float) -> Response:
        metrics.observe("unavailable", "log", time.perf_counter() - started)
        if isinstance(exc, nats_log().UnsafeStream):
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


def stream_operations_blueprint(recorder: NatsRecorder) -> Blueprint:
    """`/healthz` (a stream round trip) and `/metrics` (counters, publish latency)."""
    bp = Blueprint("operations", __name__)

    @bp.get("/healthz")
    def healthz() -> Response:
        try:
            return _json(recorder.health(), 200)
        except nats_log().NATS_FAILURES as exc:
            detail = "unsafe stream" if isinstance(exc, nats_log().UnsafeStream) else "unreachable"
            return _json({"status": "unavailable", "log": "nats", "detail": detail}, 503)

    @bp.get("/metrics")
    def metrics_view() -> Response:
        return Response(metrics.render(None), mimetype=metrics.CONTENT_TYPE)

    return bp


def _read_body(limit: int) -> bytes:
    """Never buffer more than the limit: a declared oversize body is sampled, not read.

    The sample (the rejection's capped copy) is padded to limit+1 bytes so the
    size check in `interpret` sees it as too large. Reads ask for what is
    declared (or 64 KiB at a time when nothing is), never for the limit at once:
    Werkzeug allocates and zeroes a buffer of the requested size, and a megabyte
    per webhook showed up as cache misses in everything after it.
    """
    req = request._get_current_object()  # once: every proxied attribute costs a lookup
    length = req.content_length
    stream = req.stream
    if length is not None and length > limit:
        try:
            sample = stream.read(eventlog.BODY_CAP)
        except OSError:
            sample = b""
        return sample + b"\0" * (limit + 1 - len(sample))
    wanted = length if length is not None else limit + 1
    chunks: list[bytes] = []
    size = 0
    while size < wanted:
        try:
            chunk = stream.read(min(wanted - size, READ_CHUNK))
        except OSError:
            # Broken chunked framing or a connection lost mid-body (gunicorn's errors are
            # OSErrors): what arrived is judged like any body, so it is kept, not dropped.
            break
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)  # a lone chunk comes back as is, uncopied


def _answer(outcome: Outcome, started: float) -> Response:
    elapsed = time.perf_counter() - started
    label = "rejected" if outcome.error else "duplicate" if outcome.duplicate else "accepted"
    # The exact code goes to the log and the rejections table, which only operators read.
    metrics.observe(label, public_code(outcome.error) if outcome.error else "", elapsed)
    log.info(
        "outcome=%s error=%s class=%s seq=%s latency_ms=%.1f",
        label,
        outcome.error or "-",
        outcome.event_class or "-",
        outcome.seq if outcome.seq is not None else "-",
        elapsed * 1000,
    )
    return _json(outcome.body, outcome.status)
