"""Hardening of the write side (issue 16a): `reprocess` never promotes a request refused
before interpretation, the webhook token is compared in constant time on bytes (no 500
for a non-ASCII token), and database and metadata files are created private."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from flask import Flask

from analytics.datasette_app import METADATA_MODE, write_metadata
from gateway.config import Config
from gateway.db import PRIVATE_FILE_MODE, connect
from gateway.forward.subscriptions import SecretStore
from gateway.log import eventlog, keystore, sealing
from gateway.log.intake import UNREAD_BODY_CAP
from gateway.web.app import tokens_match
from tests.conftest import CALLGATE, RunningServer, server_env
from tests.corpus import APP_ID, flows

TOKEN = "s3cret-path-token-0123456789"
# A well-formed plaintext event, as an attacker who can reach the port would send it.
FORGED = {
    "voice_id": "forged-0000-0000",
    "state": "disconnected",
    "from": "919811100000",
    "to": "919811100001",
    "timestamp": "2024-03-20T10:00:00Z",
}


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, under which SQLite would create world-readable files."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def test_reprocess_never_promotes_a_request_refused_before_interpretation(
    tmp_path: Path,
) -> None:
    """POST to a wrong token path and PUT (both with a plaintext event) are kept as
    rejections; `callgate reprocess`, run as the README says after a config change,
    leaves them alone, while a request that did reach the endpoint is still promoted."""
    db = str(tmp_path / "callgate.db")
    env = server_env(CALLGATE_WEBHOOK_TOKEN=TOKEN)
    env["ENABLEX_APP_ID"] = "some-other-app-id-0000000"  # the real one is added later
    server = RunningServer(db, env, workers=1).start()
    body = json.dumps(FORGED).encode()
    padded = json.dumps({**FORGED, "pad": "x" * 5000}).encode()
    headers = {"content-type": "application/json"}
    try:
        answers = [
            httpx.post(f"{server.url}/webhooks/enablex/WRONG", content=body, headers=headers),
            httpx.post(f"{server.url}/webhooks/enablex", content=padded, headers=headers),
            httpx.put(f"{server.url}/webhooks/enablex/{TOKEN}", content=body, headers=headers),
            httpx.patch(f"{server.url}/webhooks/enablex", content=body, headers=headers),
        ]
        assert [a.status_code for a in answers] == [404, 404, 405, 405]
        # A genuine delivery the gateway could not decrypt yet: this one may be promoted.
        genuine = flows()[0].wire[0]
        late = httpx.post(
            f"{server.url}/webhooks/enablex/{TOKEN}", content=genuine.body,
            headers=genuine.headers,
        )  # fmt: skip
        assert late.status_code == 400
    finally:
        server.stop()

    conn = connect(db)
    rows = conn.execute(
        "SELECT error, body, body_size, body_truncated FROM rejections ORDER BY id"
    ).fetchall()
    assert [r["error"] for r in rows] == [
        "bad_token", "bad_token", "method_not_allowed", "method_not_allowed", "bad_decrypt",
    ]  # fmt: skip
    unread = rows[1]  # refused for authentication: metadata and the start of the body only
    kept = sealing.Opener(keystore.for_database(conn)).body(unread["body"])
    assert kept == padded[:UNREAD_BODY_CAP] and unread["body_size"] == len(padded)
    assert unread["body_truncated"] == 1
    conn.close()

    env["ENABLEX_APP_ID"] = APP_ID
    out = subprocess.run(
        [CALLGATE, "reprocess", "--db", db], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "tried 1: 1 new events" in out.stdout, out.stdout
    assert "4 refused before interpretation" in out.stdout, out.stdout
    conn = connect(db)
    voice_ids = [r[0] for r in conn.execute("SELECT voice_id FROM events")]
    assert voice_ids == [flows()[0].expect["voice_id"]]
    unresolved = conn.execute(
        "SELECT error FROM rejections WHERE resolved_at IS NULL ORDER BY id"
    ).fetchall()
    assert [r[0] for r in unresolved] == [
        "bad_token", "bad_token", "method_not_allowed", "method_not_allowed",
    ]  # fmt: skip
    assert eventlog.verify(conn).ok
    conn.close()


def test_webhook_token_compared_on_bytes(
    make_app: Callable[[Config], Flask], db_path: str
) -> None:
    """Right token accepted; a wrong one of the same length, a prefix, a longer one and a
    non-ASCII one are all a plain 404 (compare_digest on str raised for non-ASCII)."""
    client = make_app(Config(db_path=db_path, app_ids=(APP_ID,), webhook_token=TOKEN)).test_client()
    request = flows()[0].wire[0]
    ok = client.post(f"/webhooks/enablex/{TOKEN}", data=request.body, headers=request.headers)
    assert ok.status_code == 200, ok.get_json()
    for wrong in (TOKEN[:-1] + "X", TOKEN[:-1], TOKEN + "0", "s3cret-päth-tökén-0123456789"):
        answer = client.post(
            f"/webhooks/enablex/{wrong}", data=request.body, headers=request.headers
        )
        assert answer.status_code == 404, (wrong, answer.status_code)
        assert answer.get_json()["error"] == "bad_token"
    assert tokens_match(TOKEN, TOKEN) and not tokens_match("\udcff", TOKEN)


def test_database_and_metadata_files_are_created_private(tmp_path: Path, umask_022: None) -> None:
    db = str(tmp_path / "new" / "callgate.db")
    conn = connect(db)
    eventlog.ensure_schema(conn)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("INSERT INTO t VALUES (1)")
    for path in (db, db + "-wal", db + "-shm"):
        assert mode(path) == PRIVATE_FILE_MODE == 0o600, path
    conn.close()
    secrets = SecretStore(str(tmp_path / "new" / "callgate-secrets.db"))
    secrets.close()
    assert mode(tmp_path / "new" / "callgate-secrets.db") == 0o600
    metadata = write_metadata(db, token_configured=True)
    assert mode(metadata) == METADATA_MODE == 0o640
    # Rewriting keeps the mode, even over a file someone made world-readable.
    os.chmod(metadata, 0o644)
    assert mode(write_metadata(db, token_configured=False)) == 0o640


def test_serve_warns_when_anyone_can_add_events(tmp_path: Path) -> None:
    """The default (plaintext on, no secret path) lets anyone who reaches the port write
    call history; `serve` (and so `up`) says so at start, and not once a token is set."""
    from tests.conftest import RunningServer, server_env

    for extra, warned in (({}, True), ({"CALLGATE_WEBHOOK_TOKEN": "t0ken-path"}, False),
                          ({"CALLGATE_ALLOW_PLAINTEXT": "off"}, False)):
        db = str(tmp_path / f"open-{len(extra)}-{warned}.db")
        running = RunningServer(db, server_env(**extra), workers=1).start()
        running.stop()
        log = running.log_path.read_text()
        assert ("anyone who can reach this port can add events" in log) is warned, log[:500]
        assert "t0ken-path" not in log


def test_a_flood_of_unauthenticated_requests_costs_one_key_a_day(tmp_path: Path) -> None:
    """Each wrong-token or wrong-method request was kept with a data key of its own, one
    key-store transaction (and fsync) per request: a crawl's 4,000 requests made 4,000
    keys. Bodies refused before interpretation now share their day's key; a request
    that reached the endpoint still gets one of its own, and erasing a caller found in an
    unread body shreds that shared key, after which new unread bodies get a fresh one."""
    db = str(tmp_path / "callgate.db")
    server = RunningServer(db, server_env(CALLGATE_WEBHOOK_TOKEN=TOKEN), workers=2).start()
    keys = tmp_path / "callgate-keys.db"

    def key_count() -> int:
        conn = sqlite3.connect(keys)
        try:
            return conn.execute("SELECT count(*) FROM data_keys").fetchone()[0]
        finally:
            conn.close()

    headers = {"content-type": "application/json"}
    try:
        before = key_count()
        with httpx.Client(timeout=30) as http:
            for n in range(60):
                http.post(f"{server.url}/webhooks/enablex/guess-{n}", headers=headers,
                          content=json.dumps({**FORGED, "from": f"+44 20 7000 {n:04d}"}))
                http.delete(f"{server.url}/webhooks/enablex", headers=headers)
            assert key_count() - before == 1
            read = http.post(f"{server.url}/webhooks/enablex/{TOKEN}", headers=headers,
                             content=b'{"encrypted_data": "zz"}')
            assert read.status_code == 400 and key_count() - before == 2
    finally:
        server.stop()
    conn = connect(db)
    unseal = sealing.Opener(keystore.for_database(conn))
    bodies = [unseal.body(r[0]) for r in conn.execute("SELECT body FROM rejections")]
    conn.close()
    assert len(bodies) == 121 and all(b is not None for b in bodies)
    assert b"+44 20 7000 0007" in bodies[14]

    erased = subprocess.run(
        [CALLGATE, "erase", "--number", "442070000007", "--yes", "--db", db],
        env=server_env(), capture_output=True, text=True, timeout=60,
    )
    assert erased.returncode == 0, erased.stderr
    assert "1 refused request(s)" in erased.stdout, erased.stdout
    cached = connect(db)
    keystore.forget(cached)  # this process cached the shared key before the erasure
    cached.close()
    server = RunningServer(db, server_env(CALLGATE_WEBHOOK_TOKEN=TOKEN), workers=1).start()
    try:
        httpx.post(f"{server.url}/webhooks/enablex/guess-again", headers=headers,
                   content=json.dumps(FORGED), timeout=30)
    finally:
        server.stop()
    conn = connect(db)
    unseal = sealing.Opener(keystore.for_database(conn))
    rows = [r[0] for r in conn.execute("SELECT body FROM rejections ORDER BY id")]
    opened = [unseal.body(body) for body in rows]
    conn.close()
    assert all(body is None for body in opened[:120])  # that day's unread bodies: shredded
    assert opened[120] is not None  # the read refusal has a key of its own
    assert opened[121] == json.dumps(FORGED).encode()  # a fresh shared key after the erasure
