"""The log's contract, run against both backends: the embedded SQLite log and NATS.

Each test posts through the real Flask app (`--log sqlite` or `--log nats://…`
on a real 3-node loopback cluster, R3 stream) and reads what the SQLite log
finally holds: for NATS, after `callgate archive` ran. The same assertions hold
for both: append, dedup, order per call, rejections kept, durable on ack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.config import Config
from gateway.db import connect
from gateway.log import eventlog, keystore, sealing
from tests.conftest import dedup_key_of
from tests.corpus import APP_ID, flows
from tests.nats_support import NatsTarget


@dataclass
class Backend:
    name: str
    client: FlaskClient
    db_path: str
    settle: Callable[[], None]  # bring the SQLite log up to date (archive, for NATS)
    crash: Callable[[], None]  # lose every process that holds unsynced state

    def post(self, body: bytes, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        return self.client.post(
            "/webhooks/enablex", data=body, headers=headers or {"content-type": "application/json"}
        )

    def log(self) -> list[dict[str, object]]:
        self.settle()
        conn = connect(self.db_path)
        try:
            return [dict(row) for row in conn.execute("SELECT * FROM events ORDER BY seq")]
        finally:
            conn.close()

    def digests(self, raws: list[dict[str, Any]]) -> list[str]:
        """The log's dedup hashes of these raw events, first occurrences in order: keyed
        with the dedup key of the log's own key store (the archive's, for NATS)."""
        self.settle()
        key = dedup_key_of(self.db_path)
        return list(dict.fromkeys(eventlog.content_hash(raw, key) for raw in raws))

    def rejections(self) -> list[dict[str, object]]:
        """The rejections kept, each `body` opened (it is sealed) with the log's key store."""
        self.settle()
        conn = connect(self.db_path)
        try:
            opener = sealing.Opener(keystore.for_database(conn))
            rows = [dict(row) for row in conn.execute("SELECT * FROM rejections ORDER BY id")]
            for row in rows:
                stored = bytes(row["body"])
                assert stored.startswith(sealing.BODY_PREFIX)  # never kept in the clear
                row["body"] = opener.body(stored)
            return rows
        finally:
            keystore.forget(conn)
            conn.close()


@pytest.fixture(params=["sqlite", "nats"])
def backend(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    make_app: Callable[[Config], Flask],
) -> Iterator[Backend]:
    db_path = str(tmp_path / "callgate.db")
    if request.param == "sqlite":
        config = Config(db_path=db_path, app_ids=(APP_ID,))
        yield Backend("sqlite", make_app(config).test_client(), db_path, lambda: None, lambda: None)
        return
    target: NatsTarget = request.getfixturevalue("nats_target")
    config = target.config(db_path, app_ids=(APP_ID,))
    yield Backend(
        "nats",
        make_app(config).test_client(),
        db_path,
        lambda: target.archive(db_path),
        target.cluster_crash,
    )


def test_append_keeps_every_event_once_in_post_order(backend: Backend) -> None:
    flow = flows()[0]
    for request in flow.wire:
        answer = backend.post(request.body, request.headers)
        assert answer.status_code == 200, answer.get_json()
        assert answer.get_json()["event_id"].startswith("ev_")
    digests = backend.digests(flow.events)
    log = backend.log()
    assert [row["content_hash"] for row in log] == digests
    conn = connect(backend.db_path)
    assert eventlog.verify(conn).ok
    conn.close()


def test_a_redelivery_is_acknowledged_as_duplicate_and_logged_once(backend: Backend) -> None:
    request = flows()[1].wire[0]
    first = backend.post(request.body, request.headers).get_json()
    again = backend.post(request.body, request.headers).get_json()
    assert first["duplicate"] is False and again["duplicate"] is True
    assert again["event_id"] == first["event_id"]
    assert len(backend.log()) == 1


def test_each_calls_events_keep_their_order_when_calls_interleave(backend: Backend) -> None:
    a, b = flows()[2], flows()[3]
    mixed = [r for pair in zip(a.wire, b.wire, strict=False) for r in pair]
    mixed += a.wire[len(b.wire):] + b.wire[len(a.wire):]
    for request in mixed:
        assert backend.post(request.body, request.headers).status_code == 200
    log = backend.log()
    for flow in (a, b):
        wanted = backend.digests(flow.events)
        assert [r["content_hash"] for r in log if r["content_hash"] in set(wanted)] == wanted


def test_a_refused_request_is_kept_as_a_rejection(backend: Backend) -> None:
    answer = backend.post(b'{"encrypted_data": 5}', {"content-type": "application/json",
                                                     "x-algoritm": "aes-256-cbc",
                                                     "x-format": "json", "x-encoding": "hex"})
    assert answer.status_code == 400
    assert answer.get_json()["error"] == "bad_body"
    kept = backend.rejections()
    body = b'{"encrypted_data": 5}'
    assert [(r["error"], bytes(r["body"]), r["body_size"]) for r in kept] == [
        ("bad_body", body, len(body))
    ]
    assert backend.log() == []


def test_an_acknowledged_event_survives_a_crash(backend: Backend) -> None:
    request = flows()[4].wire[0]
    assert backend.post(request.body, request.headers).status_code == 200
    backend.crash()  # NATS: SIGKILL all three servers, then start them again
    assert len(backend.log()) == 1
