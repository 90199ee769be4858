"""Shared by the Datasette tests: a database built from the corpus, a reference model of
the corpus computed straight from the flow files, and a real Datasette process.

The database goes through the real write path (ingest.interpret → eventlog.append,
rejections via intake.reject, projector.rebuild, the forwarder against real HTTP
endpoints). The reference model never reads that database: it re-derives every
figure from the flows' raw events and `expect` blocks, so a canned query is
checked against numbers it did not produce.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from analytics import projector
from analytics.datasette_app import TOKEN_ENV, datasette_argv
from gateway.cli.datasette import prepare_database
from gateway.config import Config
from gateway.db import connect
from gateway.forward.subscriptions import SecretStore, create_subscription, secrets_path
from gateway.log import eventlog, intake
from gateway.wire import ingest
from tests.conftest import CALLGATE
from tests.corpus import APP_ID, cases, flows
from tests.servers import Subprocess, free_port, wait_http

OPERATOR_TOKEN = "test-operator-token-0123456789abcdef"
TERMINAL = ("disconnected", "failed")
# README "Normalised disconnect reasons": spellings that mean the same reason.
REASON_SYNONYMS = {
    "user_busy": "busy",
    "noanswer": "no_answer", "no_user_response": "no_answer", "not_answered": "no_answer",
    "ring_timeout": "no_answer",
    "call_rejected": "rejected", "declined": "rejected",
}  # fmt: skip
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%f"
REJECTIONS_START = datetime(2024, 3, 19, 0, 0, tzinfo=UTC)


# --- reference model: the corpus read directly, without callgate's code ---------------


def parse_time(text: str) -> datetime:
    """EnableX timestamps as WIRE.md lists them, parsed independently of gateway.wire.schemas."""
    match = re.fullmatch(
        r"(\d{4}-\d{2}-\d{2})T(\d{2}):(\d{2})(?::(\d{2})(\.\d+)?)?(?:(Z)|-00Z|([+-]\d{2}):(\d{2}))",
        text,
    )
    assert match, text
    day, hour, minute, second, fraction, _zulu, off_h, off_m = match.groups()
    moment = datetime.fromisoformat(f"{day}T{hour}:{minute}:{second or '00'}").replace(tzinfo=UTC)
    if fraction:
        moment += timedelta(microseconds=round(float(fraction) * 1_000_000))
    if off_h:
        sign = -1 if off_h.startswith("-") else 1
        moment -= sign * timedelta(hours=abs(int(off_h)), minutes=int(off_m))
    return moment


def utc_text(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime(TIME_FORMAT)[:-3] + "Z"


def voice_id_of(raw: dict[str, Any]) -> str | None:
    for key in ("voice_id", "voice_Id", "voiceId", "VoiceId"):
        if raw.get(key):
            return str(raw[key])
    return None


def state_of(raw: dict[str, Any]) -> str | None:
    value = raw.get("state")
    return value.replace(" ", "").lower() if isinstance(value, str) and value.strip() else None


def playstate_of(raw: dict[str, Any]) -> str | None:
    value = raw.get("playstate") or raw.get("playstateus")
    return value.lower() if isinstance(value, str) and value else None


def digits_of(raw: dict[str, Any]) -> str | None:
    value = raw.get("digits") if raw.get("digits") not in (None, "") else raw.get("digit")
    return None if value is None or value == "" else str(value)


def timestamp_of(raw: dict[str, Any]) -> datetime:
    return parse_time(raw.get("timestamp") or raw["timeStamp"])


@dataclass
class RefEvent:
    raw: dict[str, Any]
    at: datetime
    arrival: int  # global arrival index of its first delivery
    delay_ms: int  # received_at - occurred_at assigned when it was ingested


@dataclass
class RefCall:
    voice_id: str
    expect: dict[str, Any]
    events: list[RefEvent] = field(default_factory=list)

    @property
    def ordered(self) -> list[RefEvent]:
        return sorted(self.events, key=lambda e: (e.at, e.arrival))

    def first(self, state: str) -> datetime | None:
        times = [e.at for e in self.ordered if state_of(e.raw) == state and not playstate_of(e.raw)]
        return times[0] if times else None

    @property
    def started(self) -> datetime:
        return self.ordered[0].at

    @property
    def last(self) -> datetime:
        return self.ordered[-1].at

    @property
    def direction(self) -> str:
        if any(state_of(e.raw) == "incomingcall" for e in self.events):
            return "inbound"
        if any(e.raw.get("broadcast_id") for e in self.events):
            return "broadcast"
        return "outbound"

    @property
    def answered(self) -> datetime | None:
        return self.first("connected")

    @property
    def final_state(self) -> str:
        return str(self.expect["final_state"])

    @property
    def ended(self) -> datetime | None:
        return self.first("disconnected") or (
            self.first("failed") if self.final_state == "failed" else None
        )

    @property
    def disconnect_reason(self) -> str | None:
        for e in self.ordered:
            if state_of(e.raw) in TERMINAL and not playstate_of(e.raw):
                return e.raw.get("disconnect_reason") or e.raw.get("reason")
        return None

    @property
    def ring_seconds(self) -> float | None:
        rang = self.first("ringing") or self.first("incomingcall")
        until = self.answered or self.ended
        return None if rang is None or until is None else (until - rang).total_seconds()

    @property
    def normalised_reason(self) -> str | None:
        """README's rules, restated: words of the reason, lower case, joined by `_`, then
        the synonyms."""
        words = [w for w in re.split(r"[ _-]+", (self.disconnect_reason or "").lower()) if w]
        if not words:
            return None
        reason = "_".join(words)
        return REASON_SYNONYMS.get(reason, reason)

    @property
    def outcome(self) -> str:
        if self.answered is not None:
            return "answered"
        if self.final_state not in TERMINAL:
            return "in_progress"
        reason = self.normalised_reason
        return reason if reason in ("busy", "no_answer", "rejected") else "failed"

    @property
    def recorded(self) -> bool:
        for e in self.events:
            raw = e.raw
            if raw.get("recording_url") or raw.get("recordstate") == "completed":
                return True
            if state_of(raw) == "completed" and not playstate_of(raw):
                return True
        return False


@dataclass
class Reference:
    """What the corpus says, event by event: the expected side of every assertion."""

    calls: dict[str, RefCall]
    events: list[RefEvent]  # unique events in arrival order
    rejections: list[dict[str, Any]]  # {error, http_status, received_at}

    def call(self, voice_id: str) -> RefCall:
        return self.calls[voice_id]


def nearest_rank(values: list[float], pct: int) -> float:
    """Nearest-rank percentile: the smallest value with at least pct % of values <= it."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[rank - 1]


def delay_ms(arrival: int) -> int:
    """A deterministic, varied webhook delay (150 ms … 2.1 s) for the lateness figures."""
    return 150 + (arrival * 7919) % 2000


# --- the database, built through the real write path -----------------------------------


def _serve_http(status_for_path: dict[str, int]) -> tuple[ThreadingHTTPServer, str]:
    """A throwaway receiver for the forwarder: a fixed status per path, empty body."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length") or 0)
            self.rfile.read(length)
            self.send_response(status_for_path.get(self.path, 404))
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@dataclass
class Built:
    db: str
    reference: Reference
    subscriptions: dict[str, str]  # role (ok / failing / unreachable) -> subscription id
    forwarded_kind: str  # the event state the subscriptions asked for


def build_database(directory: Path) -> Built:
    """Every corpus request through ingest, then projections and a forwarding run."""
    db = str(directory / "callgate.db")
    prepare_database(db)
    conn = connect(db)
    config = Config(db_path=db, app_ids=(APP_ID,))
    calls: dict[str, RefCall] = {}
    unique: dict[str, RefEvent] = {}
    arrival = 0
    placeholder = "2000-01-01T00:00:00.000Z"

    def deliver(raw: dict[str, Any], headers: dict[str, str], body: bytes) -> None:
        nonlocal arrival
        arrival += 1
        verdict = ingest.interpret(ingest.Headers.of(headers), body, config, placeholder)
        assert isinstance(verdict, ingest.Accepted), verdict
        key = json.dumps(raw, sort_keys=True)
        ref = unique.get(key)
        if ref is None:
            at = timestamp_of(raw)
            ref = unique[key] = RefEvent(raw, at, arrival, delay_ms(arrival))
        received_at = utc_text(ref.at + timedelta(milliseconds=ref.delay_ms))
        eventlog.append(conn, intake.to_new_event(conn, verdict, received_at))

    for flow in flows():
        assert len(flow.wire) == len(flow.events), flow.name
        per_call = flow.expect.get("calls") or {flow.expect.get("voice_id"): flow.expect}
        for raw, request in zip(flow.events, flow.wire, strict=True):
            deliver(raw, request.headers, request.body)
            voice_id = voice_id_of(raw)
            if voice_id:
                call = calls.setdefault(voice_id, RefCall(voice_id, per_call[voice_id]))
                key = json.dumps(raw, sort_keys=True)
                if unique[key] not in call.events:
                    call.events.append(unique[key])
    for case in cases("edge"):
        raw = case["expect"]["event"]
        deliver(raw, case["request"].headers, case["request"].body)
        voice_id = voice_id_of(raw)
        assert voice_id
        call = calls.setdefault(voice_id, RefCall(voice_id, {"final_state": state_of(raw)}))
        ref = unique[json.dumps(raw, sort_keys=True)]
        if ref not in call.events:
            call.events.append(ref)

    rejections = []
    for number, case in enumerate(cases("bad")):
        request = case["request"]
        verdict = ingest.interpret(ingest.Headers.of(request.headers), request.body, config, "")
        assert isinstance(verdict, ingest.Rejected), case["name"]
        received_at = utc_text(REJECTIONS_START + timedelta(seconds=number))
        intake.reject(conn, verdict, ingest.Headers.of(request.headers), request.body, "POST",
                      "/webhooks/enablex", "127.0.0.1", received_at)
        rejections.append({"error": case["expect"]["error"],
                           "http_status": case["expect"]["http_status"],
                           "received_at": received_at})

    projector.rebuild(conn)

    # Forwarding: three subscriptions to disconnected events; one receiver answers 200,
    # one 500, one address refuses connections. `callgate forward` (a subprocess, so a
    # hang cannot stall the suite) tries each delivery twice (schedule 0, 0), then gives up.
    server, base = _serve_http({"/ok": 200, "/fail": 500})
    closed = free_port()
    store = SecretStore(secrets_path(db))
    subscriptions = {}
    for role, url in (("ok", base + "/ok"), ("failing", base + "/fail"),
                      ("unreachable", f"http://127.0.0.1:{closed}/gone")):
        sub, _secret = create_subscription(conn, store, url, ["call.disconnected"],
                                           from_start=True)
        subscriptions[role] = sub.id
    store.close()
    conn.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
    try:
        subprocess.run(
            [CALLGATE, "forward", "--drain", "--retry-schedule", "0,0", "--timeout", "5",
             "--db", db],
            env=env, check=True, timeout=120, capture_output=True,
        )
    finally:
        server.shutdown()

    events = sorted(unique.values(), key=lambda e: e.arrival)
    return Built(db, Reference(calls, events, rejections), subscriptions, "disconnected")


@functools.cache
def corpus_build() -> Built:
    """One corpus database per test process (read-only for every test that uses it)."""
    directory = Path(tempfile.mkdtemp(prefix="callgate-datasette-"))
    atexit.register(shutil.rmtree, directory, True)
    return build_database(directory)


# --- a real Datasette ------------------------------------------------------------------


class Datasette:
    """`datasette serve` started from datasette_argv, as `callgate datasette` would.

    Its output goes to a file next to the database, never to a pipe nobody reads (a full
    pipe would stall the server mid-test).
    """

    def __init__(self, db: str, token: str | None = OPERATOR_TOKEN) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
        if token:
            env[TOKEN_ENV] = token
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = Path(db).stem
        self.server = Subprocess(Path(f"{db}.datasette-{self.port}.log"), env)
        self.env = self.server.env

    def start(self) -> Datasette:
        argv = datasette_argv(
            self.db, "127.0.0.1", self.port, token_configured=bool(self.env.get(TOKEN_ENV))
        )
        ready = self.url + "/-/versions.json"
        self.server.launch(argv, lambda: wait_http(ready, timeout=30, proc=self.server.proc))
        return self

    def stop(self) -> None:
        self.server.stop()

    def get(self, path: str, token: str | None = None, **params: str) -> httpx.Response:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url + path, params=params, headers=headers, timeout=30)

    def query(self, name: str, token: str | None = None, **params: str) -> list[dict[str, Any]]:
        """Rows of a canned query as dicts (anonymous unless a token is given)."""
        response = self.get(f"/{self.name}/{name}.json", token, _shape="array", **params)
        assert response.status_code == 200, (name, response.status_code, response.text[:500])
        rows = response.json()
        assert isinstance(rows, list)
        return rows


def running(db: str, token: str | None = OPERATOR_TOKEN) -> Iterator[Datasette]:
    """Generator for fixtures: a started Datasette, stopped afterwards."""
    instance = Datasette(db, token).start()
    try:
        yield instance
    finally:
        instance.stop()


def wait_until(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


