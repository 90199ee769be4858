"""Secrets never leak: app ids, the webhook path token and subscription signing secrets.

The app id is the decryption key and the path token is the only thing keeping
strangers from writing into the call history; Datasette publishes the main
database, so neither they nor the forwarding secrets may appear in it, in the
logs, or in any answer. The test runs real traffic (good, refused, misrouted)
through a real `callgate serve`, projects, forwards to a real receiver with a
rotation, then greps the server's output, every answer, every column of every
table and the raw database and WAL bytes.

The app ids are made up for this test: the corpus's own id legitimately
appears inside EnableX recording URLs, which are data.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
from pathlib import Path

import httpx

from analytics import projector
from gateway.wire.crypto import derive_key_iv, encrypt_event
from tests.conftest import CALLGATE, RunningServer, server_env
from tests.servers import Receiver

SECRET_APP = "zq9Kx7-callgate-secret-app-id-5521"
OTHER_APP = "zq9Kx7-rotating-out-app-id-0042"
TOKEN = "tok-zq9Kx7-8f31c2d95a6b4e07aa10"
SUB_SECRET = "whsec_" + base64.b64encode(b"zq9Kx7 subscription signing key!").decode()


def needles(app_ids: list[str], whsecs: list[str]) -> dict[str, bytes]:
    """Every form a secret could leak in: as text, its derived key/IV, its decoded key."""
    found: dict[str, bytes] = {}
    for app_id in app_ids:
        found[app_id] = app_id.encode()
        for key_len in (16, 24, 32):
            key, iv = derive_key_iv(app_id, key_len, 16)
            found[f"key{key_len}({app_id})"] = key.hex().encode()
            found[f"rawkey{key_len}({app_id})"] = key
            found[f"iv({app_id})"] = iv.hex().encode()
    for secret in whsecs:
        found[secret] = secret.encode()
        body = secret.removeprefix("whsec_")
        found[f"b64({secret})"] = body.encode()
        found[f"raw({secret})"] = base64.b64decode(body + "=" * (-len(body) % 4))
    found[TOKEN] = TOKEN.encode()
    return found


def leaks(haystack: bytes, where: str, secrets: dict[str, bytes]) -> list[str]:
    return [f"{name} in {where}" for name, needle in secrets.items() if needle in haystack]


def encrypted(event: dict[str, object], app_id: str, algorithm: str = "aes-256-cbc",
              fmt: str = "hex") -> tuple[dict[str, str], bytes]:
    headers = {"Content-Type": "application/json", "x-algoritm": algorithm, "x-format": fmt,
               "x-encoding": "utf8"}
    data = encrypt_event(json.dumps(event), algorithm, fmt, "utf8", app_id)
    return headers, json.dumps({"encrypted_data": data}).encode()


def traffic() -> list[tuple[str, str, dict[str, str], bytes]]:
    """(method, path, headers, body): accepted, refused and misrouted requests."""
    hook = f"/webhooks/enablex/{TOKEN}"
    out = []
    for n, state in enumerate(("ringing", "connected", "disconnected")):
        event = {"voice_id": "secret-call-1", "state": state,
                 "timestamp": f"2024-03-11T09:15:0{n}Z", "from": "918068475012",
                 "recording_url": "https://recordings.example/voice/secret-call-1.mp3"}
        out.append(("POST", hook, *encrypted(event, SECRET_APP)))
        out.append(("POST", hook, *encrypted({**event, "voice_id": "secret-call-2"}, OTHER_APP,
                                             "aes-128-ctr", "base64")))
    event = {"voice_id": "secret-call-3", "state": "connected"}
    out.append(("POST", hook, *encrypted(event, "zq9Kx7-unknown-app")))  # bad_decrypt
    out.append(("POST", hook, *encrypted({"state": "connected"}, SECRET_APP)))  # no voice id
    headers, body = encrypted(event, SECRET_APP)
    out.append(("POST", hook, {**headers, "x-algoritm": "aes-256-gcm"}, body))  # unsupported
    out.append(("POST", "/webhooks/enablex", headers, body))  # token missing
    out.append(("POST", "/webhooks/enablex/" + TOKEN[:-1], headers, body))  # token almost right
    out.append(("POST", hook, headers, body[:-10]))  # truncated
    out.append(("GET", hook, {}, b""))
    out.append(("POST", hook, {**headers, "x-format": "base64"}, body))
    return out


def run(*args: str, env: dict[str, str]) -> str:
    try:
        done = subprocess.run([CALLGATE, *args], capture_output=True, text=True, env=env,
                              timeout=40)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"callgate {args[0]} hung: {exc.stdout!r} {exc.stderr!r}") from None
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout + done.stderr


def test_no_secret_in_logs_answers_or_database(tmp_path: Path) -> None:
    db = str(tmp_path / "callgate.db")
    env = server_env(ENABLEX_APP_ID=f"{OTHER_APP},{SECRET_APP}", CALLGATE_WEBHOOK_TOKEN=TOKEN)
    env.pop("CALLGATE_SECRETS_DB", None)
    whsecs = [SUB_SECRET]
    output: list[tuple[str, bytes]] = []
    server = RunningServer(db, env, log_path=tmp_path / "server.log").start()
    try:
        with httpx.Client(timeout=10) as client:
            statuses = []
            for method, path, headers, body in traffic():
                answer = client.request(method, server.url + path, headers=headers, content=body)
                statuses.append(answer.status_code)
                output.append((f"answer to {method} {path[:18]}", answer.content))
                output.append(("answer headers", repr(answer.headers.raw).encode()))
            for path in ("/healthz", "/metrics"):
                output.append((path, client.get(server.url + path).content))
    finally:
        server.stop()
    assert statuses.count(200) == 6 and {400, 404, 405, 422} <= set(statuses), statuses

    conn = sqlite3.connect(db, isolation_level=None)
    projector.project_all(conn)
    conn.close()

    receiver = Receiver(tmp_path, "--fail-first", "1", secrets=(SUB_SECRET,)).start()
    try:
        url = receiver.url()
        output.append(("subscribe", run("subscribe", url, "--secret", SUB_SECRET,
                                        "--from-start", "--db", db, env=env).encode()))
        first = run("subscribe", url, "--db", db, env=env)  # a generated secret, shown once
        whsecs += [w for w in first.split() if w.startswith("whsec_")]
        sub_id = first.split()[1]
        output.append(("forward", run("forward", "--drain", "--retry-schedule", "0,0.2",
                                      "--db", db, env=env).encode()))
        rotated = run("rotate-secret", sub_id, "--db", db, env=env)
        whsecs += [w for w in rotated.split() if w.startswith("whsec_")]
        output.append(("subscriptions", run("subscriptions", "--db", db, env=env).encode()))
        output.append(("subscriptions --json",
                       run("subscriptions", "--json", "--db", db, env=env).encode()))
    finally:
        receiver.stop()
    received = receiver.records()
    assert any(r["verified"] == [True] and r["status"] == 200 for r in received), received
    assert len(whsecs) == 3, "subscribe and rotate-secret print a generated secret once"

    output.append(("server log", (tmp_path / "server.log").read_bytes()))
    secrets = needles([SECRET_APP, OTHER_APP], whsecs)
    found: list[str] = []
    for where, text in output:
        found += leaks(text, where, secrets)
    conn = sqlite3.connect(db)
    tables = [row[0] for row in conn.execute(
        "SELECT name FROM sqlite_master WHERE type IN ('table', 'view')"
    )]
    rows_seen = 0
    for table in tables:
        cursor = conn.execute(f'SELECT * FROM "{table}"')
        columns = [d[0] for d in cursor.description]
        for row in cursor:
            rows_seen += 1
            for column, value in zip(columns, row, strict=True):
                data = value if isinstance(value, bytes) else str(value).encode()
                found += leaks(data, f"{table}.{column}", secrets)
    kept = [row[0] for row in conn.execute("SELECT path FROM rejections")]
    conn.close()
    for suffix in ("", "-wal"):
        path = Path(db + suffix)
        if path.exists():
            found += leaks(path.read_bytes(), path.name, secrets)
    print(f"\nsecrets: {len(secrets)} needles, {len(output)} outputs, {len(tables)} tables and "
          f"views, {rows_seen} rows scanned; leaks: {found or 'none'}")
    assert "/webhooks/enablex/<redacted>" in kept
    assert not found, found


def test_access_log_does_not_reveal_the_path_token(tmp_path: Path) -> None:
    env = server_env(CALLGATE_WEBHOOK_TOKEN=TOKEN)
    log = tmp_path / "server.log"
    server = RunningServer(str(tmp_path / "callgate.db"), env, log_path=log, args=("--access-log",))
    server.start()
    try:
        headers, body = encrypted({"voice_id": "v", "state": "connected"}, SECRET_APP)
        answer = httpx.post(f"{server.url}/webhooks/enablex/{TOKEN}", headers=headers,
                            content=body)
        assert answer.status_code == 400  # SECRET_APP is not configured here: refused, logged
    finally:
        server.stop()
    text = log.read_text()
    assert "POST /webhooks/enablex" in text, "the access log is on"
    assert TOKEN not in text
