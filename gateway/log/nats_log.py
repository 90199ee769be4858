"""NATS JetStream as the log's replicated front: settings, stream setup, publishing.

In NATS mode a gateway keeps nothing on its own disk: an accepted event is
published to stream `CALLGATE` (subject per call) with `Nats-Msg-Id` = its
content hash, and the request is answered 2xx only once JetStream's PubAck says
a quorum of servers stored it (servers run with `sync_interval: always`, so
that means fsynced). `callgate archive` later appends the stream, in order, to
the ordinary hash-chained SQLite log.

nats-py is asyncio; gunicorn's request threads are not. Each process runs one
event loop in a daemon thread (`NatsLink`), started lazily so it exists only
after gunicorn forked, and request threads hand it coroutines with
`run_coroutine_threadsafe`, each waiting only for its own PubAck, so the
threads of a worker keep many publishes in flight at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.js.api import StorageType, StreamConfig

from gateway.config import Config
from gateway.db import utc_now
from gateway.log import eventlog
from gateway.log.intake import Outcome, accepted_body, rejection_fields
from gateway.wire.ingest import Accepted, Headers, Rejected, interpret

log = logging.getLogger("callgate.nats")
T = TypeVar("T")

# Every error a NATS call may raise: the client's own and JetStream API errors.
ERRORS = (nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError)
FORMAT_VERSION = 1
# A subject token may not hold `.`, `*`, `>` or whitespace; other ids are hashed.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")


class UnsafeStream(RuntimeError):
    """The stream exists with settings under which a PubAck would not mean durable."""


class Unavailable(RuntimeError):
    """No PubAck in time (no quorum, no server, timeout): nothing may be acknowledged."""


def redact(server: str) -> str:
    """A server URL without its user:password, for messages and logs."""
    scheme, _, rest = server.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"


def subject_token(identifier: str) -> str:
    if _TOKEN.fullmatch(identifier):
        return identifier
    return "h" + hashlib.sha256(identifier.encode()).hexdigest()[:32]


def subject_for(root: str, event: dict[str, Any]) -> str:
    """One subject per call (or per broadcast, for summaries without a voice id):
    JetStream keeps order within the stream, and purges by subject once archived."""
    if event.get("voice_id"):
        return f"{root}.call.{subject_token(str(event['voice_id']))}"
    return f"{root}.broadcast.{subject_token(str(event.get('broadcast_id') or '-'))}"


@dataclass(frozen=True)
class NatsSettings:
    """Where the stream lives and what it must guarantee; built from `Config`, which owns
    the variables and their defaults."""

    servers: tuple[str, ...]
    stream: str
    # Subjects: <root>.call.<voice_id>, <root>.broadcast.<id>, <root>.rejection.
    subject_root: str
    replicas: int
    creds: str | None
    tls_ca: str | None
    tls_cert: str | None
    tls_key: str | None
    publish_timeout: float
    # JetStream's dedup is a first line only (the archive's unique content hash is the
    # permanent one), but 24 h (the default) covers EnableX's redeliveries and 503 retries.
    duplicate_window: float
    # The stream holds personal data: nothing stays longer than this, archived or not.
    max_age: float

    @classmethod
    def from_config(cls, config: Config) -> NatsSettings:
        return cls(
            servers=config.nats_servers,
            stream=config.nats_stream,
            subject_root=config.nats_subject_root,
            replicas=config.nats_replicas,
            creds=config.nats_creds,
            tls_ca=config.nats_tls_ca,
            tls_cert=config.nats_tls_cert,
            tls_key=config.nats_tls_key,
            publish_timeout=config.nats_timeout,
            duplicate_window=config.nats_duplicate_window,
            max_age=config.nats_max_age,
        )

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.stream,
            description="callgate: EnableX webhook events, archived by `callgate archive`",
            subjects=[f"{self.subject_root}.>"],
            storage=StorageType.FILE,
            num_replicas=self.replicas,
            duplicate_window=self.duplicate_window,
            max_age=self.max_age,
        )


def problems(config: StreamConfig, settings: NatsSettings) -> list[str]:
    """Why an existing stream would break "a PubAck means stored on a quorum's disks"."""
    found = []
    if config.storage != StorageType.FILE:
        found.append("it keeps messages in memory (storage must be file)")
    if str(getattr(config.persist_mode, "value", config.persist_mode) or "default") == "async":
        found.append("persist_mode is async (PubAck before the write reaches disk)")
    if (config.num_replicas or 1) < settings.replicas:
        found.append(
            f"it has {config.num_replicas or 1} replica(s), CALLGATE_NATS_REPLICAS wants "
            f"{settings.replicas}"
        )
    if config.no_ack:
        found.append("no_ack is set (publishes would get no PubAck)")
    if f"{settings.subject_root}.>" not in (config.subjects or []):
        found.append(f"its subjects do not include {settings.subject_root}.>")
    return found


async def connect(settings: NatsSettings, name: str) -> nats.NATS:
    """A client that reconnects forever; failures surface as timeouts, never crashes."""

    async def quiet(exc: Exception) -> None:  # nats-py logs tracebacks by default
        log.debug("nats: %s", type(exc).__name__)

    options: dict[str, Any] = {
        "servers": list(settings.servers),
        "name": name,
        "connect_timeout": 2,
        "reconnect_time_wait": 0.5,
        "max_reconnect_attempts": -1,
        "error_cb": quiet,
    }
    if settings.creds:
        options["user_credentials"] = settings.creds
    if settings.tls_ca or settings.tls_cert:
        context = ssl.create_default_context(cafile=settings.tls_ca)
        if settings.tls_cert:
            context.load_cert_chain(settings.tls_cert, settings.tls_key)
        options["tls"] = context
    return await nats.connect(**options)


async def ensure_stream(js: Any, settings: NatsSettings) -> Any:
    """Create the stream, or check the one that exists; raise UnsafeStream with the reason."""
    try:
        info = await js.stream_info(settings.stream)
    except nats.js.errors.NotFoundError:
        try:
            created = await js.add_stream(settings.stream_config())
        except nats.js.errors.BadRequestError as exc:  # e.g. another stream owns the subjects
            raise UnsafeStream(
                f"cannot create stream {settings.stream}: {exc.description}"
            ) from None
        return await _until_led(js, settings.stream, created)
    found = problems(info.config, settings)
    if found:
        raise UnsafeStream(
            f"stream {settings.stream} is unsafe for callgate: "
            + "; ".join(found)
            + ". Fix or delete it; callgate will not acknowledge webhooks on it."
        )
    return info


async def _until_led(js: Any, stream: str, info: Any, seconds: float = 10.0) -> Any:
    """A new replicated stream answers publishes only once its replicas elected a leader:
    wait for that, so the first webhooks after start-up are not refused for nothing."""
    deadline = time.monotonic() + seconds
    while info.cluster is not None and not info.cluster.leader and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        info = await js.stream_info(stream)
    return info


async def retrying(attempt: Callable[[], Awaitable[T]], seconds: float) -> T:
    """`attempt()` until it succeeds or `seconds` have passed: a fresh (or busy) cluster
    answers JetStream requests with errors or time-outs while it elects its leaders.
    An unsafe stream is a verdict, never retried."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await attempt()
        except UnsafeStream:
            raise
        except ERRORS:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.25)


async def ensure_stream_retrying(js: Any, settings: NatsSettings, seconds: float) -> Any:
    """`ensure_stream` while a fresh cluster elects its leaders (a few seconds)."""
    return await retrying(lambda: ensure_stream(js, settings), seconds)


def event_message(root: str, accepted: Accepted, received_at: str) -> tuple[str, bytes, str]:
    """(subject, payload, Nats-Msg-Id) for an accepted request."""
    digest = eventlog.content_hash(accepted.raw_obj)
    # canonical_json, not orjson.dumps: it also carries integers beyond 64 bits.
    payload = eventlog.canonical_json(
        {
            "v": FORMAT_VERSION,
            "kind": "event",
            "raw": accepted.raw_text,
            "event": accepted.event,
            "received_at": received_at,
            "app": accepted.app_label,
            "content_hash": digest,
        }
    ).encode()
    return subject_for(root, accepted.event), payload, digest


def rejection_message(
    *,
    error: str,
    detail: str,
    http_status: int,
    body: bytes,
    headers: Iterable[tuple[str, str]],
    method: str,
    path: str,
    remote_addr: str | None,
    received_at: str,
    body_size: int | None = None,
) -> bytes:
    """A refused request, capped like the rejections table keeps it."""
    return eventlog.canonical_json(
        {
            "v": FORMAT_VERSION,
            "kind": "rejection",
            "error": error,
            "detail": detail,
            "http_status": http_status,
            "method": method,
            "path": path,
            "headers": eventlog.kept_headers(headers),
            "body": base64.b64encode(body[: eventlog.BODY_CAP]).decode(),
            "body_size": len(body) if body_size is None else body_size,
            "remote_addr": remote_addr,
            "received_at": received_at,
        }
    ).encode()


class NatsLink:
    """One asyncio loop thread and one NATS connection per process (created after fork)."""

    def __init__(self, settings: NatsSettings, name: str) -> None:
        self.settings = settings
        self.name = name
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._nc: nats.NATS | None = None
        self._js: Any = None
        self._connecting: asyncio.Future[Any] | None = None
        self.stream_checked = False

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        if self._pid == os.getpid() and self._loop is not None:
            return self._loop
        with self._lock:
            if self._pid != os.getpid() or self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="callgate-nats", daemon=True
                )
                thread.start()
                self._loop, self._thread, self._pid = loop, thread, os.getpid()
                self._nc = self._js = self._connecting = None
        return self._loop

    def run(self, make: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run a coroutine on the loop thread from any thread; Unavailable past `timeout`."""
        future = asyncio.run_coroutine_threadsafe(make, self._ensure_loop())
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise Unavailable("no answer from NATS in time") from None

    async def jetstream(self) -> Any:
        """The JetStream context, connecting (once, shared by concurrent callers) if needed."""
        if self._js is not None:
            return self._js
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> Any:
        try:
            nc = await connect(self.settings, self.name)
        except ERRORS as exc:
            raise Unavailable(f"cannot reach NATS ({type(exc).__name__})") from None
        js = nc.jetstream(timeout=self.settings.publish_timeout)
        if not self.stream_checked:
            try:
                await ensure_stream(js, self.settings)
            except BaseException as exc:
                with contextlib.suppress(*ERRORS):
                    await nc.close()
                if isinstance(exc, ERRORS):  # e.g. a server without JetStream
                    raise Unavailable(f"no JetStream answer ({type(exc).__name__})") from None
                raise
            self.stream_checked = True
        self._nc, self._js = nc, js
        return js

    async def _publish(self, subject: str, payload: bytes, msg_id: str | None) -> Any:
        """Publish within the timeout. "No responders" is retried until then: it is what a
        stream answers for a moment while it elects a leader or its interest reaches this
        server, and the Msg-Id makes a retry that did land a duplicate, not a second copy."""
        js = await self.jetstream()
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        deadline = time.monotonic() + self.settings.publish_timeout
        while True:
            left = deadline - time.monotonic()
            try:
                return await js.publish(
                    subject,
                    payload,
                    timeout=max(left, 0.05),
                    stream=self.settings.stream,
                    headers=headers,
                )
            except nats.js.errors.NoStreamResponseError as exc:
                if time.monotonic() + 0.05 >= deadline:
                    raise Unavailable(f"no PubAck ({type(exc).__name__})") from None
                await asyncio.sleep(0.05)
            except ERRORS as exc:
                raise Unavailable(f"no PubAck ({type(exc).__name__})") from None

    def publish(self, subject: str, payload: bytes, msg_id: str | None) -> Any:
        """Block until the PubAck (a quorum stored it) or raise Unavailable."""
        return self.run(
            self._publish(subject, payload, msg_id), self.settings.publish_timeout + 0.5
        )

    async def _stream_state(self) -> Any:
        js = await self.jetstream()
        try:
            return await js.stream_info(self.settings.stream)
        except ERRORS as exc:
            raise Unavailable(f"stream info failed ({type(exc).__name__})") from None

    def stream_info(self) -> Any:
        return self.run(self._stream_state(), self.settings.publish_timeout + 0.5)

    def close(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or self._pid != os.getpid():
            return
        if self._nc is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._nc.close(), loop).result(3)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(3)
        loop.close()
        self._loop = self._thread = self._nc = self._js = None
        self._pid = None


# What a gateway answers 503 for: no PubAck, or a stream it must not write to.
NATS_FAILURES = (Unavailable, UnsafeStream)


class NatsRecorder:
    """The stateless gateway's log: publish each verdict and wait for its PubAck.

    `on_publish(seconds, ok)` lets the web layer count publish latency and errors
    without this module knowing about metrics.
    """

    def __init__(
        self,
        settings: NatsSettings,
        on_publish: Callable[[float, bool], None] = lambda seconds, ok: None,
    ) -> None:
        self.settings = settings
        self.link = NatsLink(settings, "callgate-gateway")
        self.on_publish = on_publish

    def _publish(self, subject: str, payload: bytes, msg_id: str | None) -> Any:
        started = time.perf_counter()
        try:
            ack = self.link.publish(subject, payload, msg_id)
        except (Unavailable, UnsafeStream):
            self.on_publish(time.perf_counter() - started, False)
            raise
        self.on_publish(time.perf_counter() - started, True)
        return ack

    def accept(self, accepted: Accepted, received_at: str) -> eventlog.AppendResult:
        """The event is on a quorum's disks when this returns; `seq` is the stream's."""
        subject, payload, digest = event_message(self.settings.subject_root, accepted, received_at)
        ack = self._publish(subject, payload, digest)
        return eventlog.AppendResult(ack.seq, eventlog.event_id_for(digest), bool(ack.duplicate))

    def reject(self, fields: dict[str, Any]) -> None:
        """Publish a refused request (`intake.rejection_fields`) and wait for its PubAck."""
        self._publish(f"{self.settings.subject_root}.rejection", rejection_message(**fields), None)

    def health(self) -> dict[str, Any]:
        """A stream round trip: what `/healthz` reports (no secrets, no server addresses)."""
        info = self.link.stream_info()
        cluster = info.cluster
        return {
            "status": "ok",
            "log": "nats",
            "stream": self.settings.stream,
            "stream_seq": info.state.last_seq,
            "replicas": info.config.num_replicas,
            "leader": cluster.leader if cluster is not None else None,
        }

    def close(self) -> None:
        self.link.close()


def ingest_to_stream(
    recorder: NatsRecorder,
    config: Config,
    headers: Headers,
    body: bytes,
    *,
    method: str = "POST",
    path: str = "/webhooks/enablex",
    remote_addr: str | None = None,
) -> Outcome:
    """`intake.ingest_request` for NATS mode: the same verdicts, published instead of appended.

    The arrival-time guess at bridge legs (`intake.refine_leg`) needs the log, so
    the archiver makes it when it appends; the projection re-derives it anyway.
    """
    received_at = utc_now()
    verdict = interpret(headers, body, config, received_at)
    if isinstance(verdict, Accepted):
        result = recorder.accept(verdict, received_at)
        return Outcome(
            200,
            accepted_body(result),
            seq=result.seq,
            duplicate=result.duplicate,
            event_class=verdict.event["class"],
        )
    return refuse_to_stream(
        recorder, verdict, headers, body, method, path, remote_addr, received_at
    )


def refuse_to_stream(
    recorder: NatsRecorder,
    verdict: Rejected,
    headers: Headers,
    body: bytes,
    method: str,
    path: str,
    remote_addr: str | None,
    received_at: str | None = None,
) -> Outcome:
    received_at = received_at or utc_now()
    recorder.reject(
        rejection_fields(verdict, headers, body, method, path, remote_addr, received_at)
    )
    return Outcome(verdict.status, verdict.response(), error=verdict.code)


def prepare_stream(settings: NatsSettings, seconds: float = 10.0) -> Any:
    """Create or check the stream before serving (raises UnsafeStream, or Unavailable)."""

    async def run() -> Any:
        try:
            nc = await connect(settings, "callgate-setup")
        except ERRORS as exc:
            raise Unavailable(f"cannot reach NATS ({type(exc).__name__})") from None
        try:
            js = nc.jetstream(timeout=settings.publish_timeout)
            try:
                return await ensure_stream_retrying(js, settings, seconds)
            except ERRORS as exc:
                raise Unavailable(f"no JetStream answer ({type(exc).__name__})") from None
        finally:
            with contextlib.suppress(*ERRORS):
                await nc.close()

    return asyncio.run(run())
