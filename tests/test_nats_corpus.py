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

from flask import Flask

from analytics import projector
from gateway.config import Config
from gateway.db import connect
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
    """The log (content hash, class, payload without arrival-clock fields) and every
    projection, `received_at` columns left out."""
    conn = connect(db)
    try:
        projector.project_all(conn)
        log = [
            (row[0], row[1], _without_arrival(row[2]))
            for row in conn.execute("SELECT content_hash, class, payload FROM events ORDER BY seq")
        ]
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
        conn.close()


def _without_arrival(payload: str) -> str:
    event = json.loads(payload)
    if event.get("time_source") == "received":
        event.pop("occurred_at")
    return json.dumps(event, sort_keys=True)


def test_corpus_projections_are_the_same_in_nats_and_sqlite_mode(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    sqlite_db, nats_db = str(tmp_path / "sqlite.db"), str(tmp_path / "nats.db")
    _post_corpus(make_app(Config(db_path=sqlite_db, app_ids=(APP_ID,))))
    _post_corpus(make_app(nats_target.config(nats_db, app_ids=(APP_ID,))))
    nats_target.archive(nats_db)
    sqlite_log, sqlite_tables = _projected(sqlite_db)
    nats_log, nats_tables = _projected(nats_db)
    assert len(nats_log) == len({row[0] for row in nats_log}) > 100
    assert nats_log == sqlite_log  # same events, same order, same classes and payloads
    assert nats_tables.keys() == sqlite_tables.keys()
    differing = [name for name in sqlite_tables if sqlite_tables[name] != nats_tables[name]]
    assert not differing
