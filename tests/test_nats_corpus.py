"""The corpus flows give the same projections in NATS mode as in SQLite mode.

Every flow's captured requests go through the real app twice: once with the
embedded SQLite log, once through `--log nats://…` (a real 3-node cluster) and
`callgate archive`. Both logs must hold the same events in the same order, and
projecting each must give the same tables. Arrival times differ between the two
runs by nature, so what derives from the clock of arrival is left out of the
comparison: `received_at` itself, and the occurrence time of events that carry no
timestamp (the contract says those take their received time).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask

from analytics import projector
from gateway.config import Config
from gateway.db import connect
from gateway.log import eventlog, keystore, sealing
from tests.conftest import dedup_key_of
from tests.corpus import APP_ID, flows
from tests.helpers_analytics import Snapshot, snapshot
from tests.nats_support import NatsTarget


def _post_corpus(app: Flask) -> None:
    client = app.test_client()
    for flow in flows():
        for request in flow.wire:
            answer = client.post("/webhooks/enablex", data=request.body, headers=request.headers)
            assert answer.status_code == 200, answer.get_json()


def _projected(db: str) -> tuple[list[tuple[str, str, str]], Snapshot]:
    """The log (raw text, class, event without arrival-clock fields), both opened with
    the database's own key store, and every projection, `received_at` columns left out.

    The stored columns themselves differ between two logs by design: each seals with
    its own keys and random nonces, and keys its dedup hash with its own secret; so
    each row's hash is checked against the opened raw under this log's dedup key."""
    conn = connect(db)
    try:
        projector.project_all(conn)
        store = keystore.for_database(conn)
        opener = sealing.Opener(store)
        log = []
        for digest, kind, payload, raw in conn.execute(
            "SELECT content_hash, class, payload, raw FROM events ORDER BY seq"
        ):
            assert not list(sealing.iter_personal(json.loads(payload)))  # all sealed
            text = opener.raw(raw)
            assert text is not None and text not in raw
            assert digest == eventlog.content_hash(json.loads(text), store.dedup_key)
            log.append((text, kind, _without_arrival(opener.event(payload))))
        tables = snapshot(conn)
        for name in tables:
            cursor = conn.execute(f'SELECT * FROM "{name}" LIMIT 0')
            columns = [d[0] for d in cursor.description]
            if "received_at" in columns:
                keep = [i for i, c in enumerate(columns) if c != "received_at"]
                rows = conn.execute(f'SELECT * FROM "{name}"').fetchall()
                tables[name] = sorted((tuple(r[i] for i in keep) for r in rows), key=repr)
        return log, tables
    finally:
        keystore.forget(conn)
        conn.close()


def _without_arrival(event: dict[str, Any]) -> str:
    if event.get("time_source") == "received":
        event.pop("occurred_at")
    return json.dumps(event, sort_keys=True)


def test_corpus_projections_are_the_same_in_nats_and_sqlite_mode(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    # Apart, so each log has the key store of its own that it would have in production.
    sqlite_db, nats_db = str(tmp_path / "sqlite" / "log.db"), str(tmp_path / "nats" / "log.db")
    for db in (sqlite_db, nats_db):
        Path(db).parent.mkdir()
    _post_corpus(make_app(Config(db_path=sqlite_db, app_ids=(APP_ID,))))
    _post_corpus(make_app(nats_target.config(nats_db, app_ids=(APP_ID,))))
    nats_target.archive(nats_db)
    sqlite_log, sqlite_tables = _projected(sqlite_db)
    nats_log, nats_tables = _projected(nats_db)
    assert dedup_key_of(sqlite_db) != dedup_key_of(nats_db)
    assert len(nats_log) == len({row[0] for row in nats_log}) > 100
    assert nats_log == sqlite_log  # same events, same order, same classes, opened payloads
    assert nats_tables.keys() == sqlite_tables.keys()
    differing = [name for name in sqlite_tables if sqlite_tables[name] != nats_tables[name]]
    assert not differing
