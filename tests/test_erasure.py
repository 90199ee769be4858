"""Sealing at ingest and erasure by crypto-shredding (README "Privacy and erasure").

The end-to-end test builds the corpus database through the real write path, erases a
corpus number with the real `callgate erase`, and then looks for the number everywhere
it could survive: the log (row count, chain), a rebuild, every page an operator can
read in a real Datasette, what a real forwarder delivers and redelivers to a real
receiver (tests/receiver.py), every byte of the database files, and every stored body
opened with the keys that remain and decrypted with the app id.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from analytics import projector, tables
from gateway.db import connect
from gateway.forward.subscriptions import SecretStore, create_subscription, secrets_path
from gateway.log import eventlog, keystore, sealing
from gateway.wire import crypto
from tests.conftest import CALLGATE
from tests.corpus import APP_ID, flows
from tests.helpers_analytics import append_all, new_event, open_log, snapshot
from tests.servers import Receiver
from tests.test_datasette_helpers import OPERATOR_TOKEN, Datasette, build_database

# The caller of 16 corpus flows (DTMF, speech, recordings, bridges); typed as a person would.
NUMBER = "919820012345"
TYPED = "+91 98200 12345"


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLGATE_")}
    env["ENABLEX_APP_ID"] = APP_ID
    env.update(extra)
    return env


def callgate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CALLGATE, *args], env=env or cli_env(), capture_output=True, text=True, timeout=120
    )


def db_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and ".db" in p.name)


def bytes_found(directory: Path, needle: str) -> list[str]:
    return [p.name for p in db_files(directory) if needle.encode() in p.read_bytes()]


def operator_crawl(ds: Datasette) -> dict[str, str]:
    """Every table, view and canned query an operator can read: JSON (all rows) and CSV."""
    index = ds.get(f"/{ds.name}.json", OPERATOR_TOKEN)
    assert index.status_code == 200, index.text[:300]
    meta = index.json()
    names = [t["name"] for t in meta.get("tables", [])] + [
        v["name"] if isinstance(v, dict) else v for v in meta.get("views", [])
    ]
    queries = [q["name"] for q in meta.get("queries", [])]
    assert "calls" in names and "events" in names, names
    pages: dict[str, str] = {}
    for name in [*names, *queries]:
        for suffix, params in ((".json", {"_size": "max", "_shape": "array"}), (".csv", {})):
            path = f"/{ds.name}/{name}{suffix}"
            response = ds.get(path, OPERATOR_TOKEN, **params)
            pages[path] = response.text
    return pages


def opened_texts(db: str) -> list[str]:
    """Every stored raw text and body that the remaining keys open, decrypted with the app
    id where it is EnableX ciphertext: what someone with the key store and the app id reads."""
    conn = connect(db)
    unseal = sealing.Opener(keystore.for_database(conn))
    texts = []
    for (raw,) in conn.execute("SELECT raw FROM events"):
        if (text := unseal.raw(raw)) is not None:
            texts.append(text)
    for headers, stored in conn.execute("SELECT headers, body FROM rejections"):
        body = unseal.body(stored)
        if body is None:
            continue
        texts.append(body.decode("utf-8", "replace"))
        hdrs = json.loads(headers or "{}")
        try:
            outer = json.loads(body)
            texts.append(
                crypto.decrypt_event(
                    outer["encrypted_data"], hdrs.get("x-algoritm") or hdrs["x-algorithm"],
                    hdrs["x-format"], hdrs["x-encoding"], [APP_ID],
                ).text
            )
        except (ValueError, KeyError, TypeError, crypto.CryptoError):
            pass
    conn.close()
    return texts


def test_erasing_a_corpus_number_leaves_no_trace(tmp_path: Path) -> None:
    built = build_database(tmp_path)
    db, directory = built.db, tmp_path
    conn = connect(db)
    before_rows = [tuple(r) for r in conn.execute("SELECT * FROM events ORDER BY seq")]
    erased_calls = sorted(
        {v for (v,) in conn.execute("SELECT voice_id FROM calls_private WHERE from_number = ? "
                                    "OR to_number = ?", (NUMBER, NUMBER))}
    )
    conn.close()
    assert len(erased_calls) >= 10
    # The number is really there before (so the checks below can fail): in projections
    # and in what the keys open, never in the sealed log itself.
    assert bytes_found(directory, NUMBER) == ["callgate.db"]
    assert any(NUMBER in text for text in opened_texts(db))

    result = callgate("erase", "--number", TYPED, "--yes", "--db", db)
    assert result.returncode == 0, result.stderr
    assert f"erased {len(erased_calls)} call(s)" in result.stdout
    assert NUMBER not in result.stdout + result.stderr

    # The log: every row as it was, plus one audit event without personal data.
    conn = connect(db)
    after_rows = [tuple(r) for r in conn.execute("SELECT * FROM events ORDER BY seq")]
    assert after_rows[: len(before_rows)] == before_rows
    assert len(after_rows) == len(before_rows) + 1
    audit = dict(conn.execute("SELECT * FROM events ORDER BY seq DESC LIMIT 1").fetchone())
    assert audit["class"] == "erasure" and NUMBER not in json.dumps(audit)
    assert json.loads(audit["payload"])["calls"] == erased_calls
    verified = callgate("verify", "--db", db)
    assert verified.returncode == 0 and verified.stdout.startswith("ok:"), verified.stderr

    # Projections: the erased calls keep their rows but lose every personal value, and a
    # rebuild from the log gives exactly the same tables.
    rows = conn.execute(
        f"SELECT from_number, to_number, recording_url FROM calls_private WHERE voice_id IN "
        f"({','.join('?' * len(erased_calls))})", erased_calls
    ).fetchall()
    assert len(rows) == len(erased_calls)
    assert all(tuple(r) == (None, None, None) for r in rows)
    projected = snapshot(conn)
    projector.rebuild(conn)
    assert snapshot(conn) == projected
    conn.close()

    # Operator pages in a real Datasette.
    ds = Datasette(db, OPERATOR_TOKEN).start()
    try:
        pages = operator_crawl(ds)
    finally:
        ds.stop()
    assert len(pages) > 20
    assert [path for path, text in pages.items() if NUMBER in text] == []

    # Forwarding and redelivery to a real receiver: everything from seq 1, then the erased
    # calls again.
    receiver = Receiver(tmp_path).start()
    try:
        conn = connect(db)
        store = SecretStore(secrets_path(db))
        sub, _ = create_subscription(conn, store, receiver.url(), ["*"], from_start=True)
        store.close()
        conn.close()
        forwarded = callgate("forward", "--drain", "--retry-schedule", "0", "--db", db)
        assert forwarded.returncode == 0, forwarded.stderr
        first = len(receiver.records())
        assert first == len(after_rows)
        again = callgate("redeliver", "--subscription", sub.id,
                         *[arg for v in erased_calls for arg in ("--call", v)], "--db", db)
        assert again.returncode == 0, again.stderr
        forwarded = callgate("forward", "--drain", "--retry-schedule", "0", "--db", db)
        assert forwarded.returncode == 0, forwarded.stderr
        records = receiver.records()
    finally:
        receiver.stop()
    assert len(records) > first
    assert all(r["status"] == 200 for r in records)
    assert [r for r in records if NUMBER in json.dumps(r)] == []

    # Bytes: no file of the database, its WAL, the key store or the secrets holds it, and
    # nothing the remaining keys and the app id open does either.
    assert bytes_found(directory, NUMBER) == []
    assert [text for text in opened_texts(db) if NUMBER in text] == []
    # Other callers are untouched: the company number still opens.
    assert any("918068475012" in text for text in opened_texts(db))


def projected_call(tmp_path: Path, project: bool = True) -> tuple[str, str]:
    """(database, voice_id): a log holding corpus flow 0, projected unless told not to."""
    db = str(tmp_path / "callgate.db")
    conn = open_log(db)
    flow = flows()[0]
    append_all(conn, flow.events)
    if project:
        projector.project_all(conn)
    conn.close()
    return db, flow.events[0]["voice_id"]


def test_erase_of_an_unknown_number_or_call_says_so_and_exits_1(tmp_path: Path) -> None:
    db = str(tmp_path / "callgate.db")
    conn = open_log(db)
    append_all(conn, flows()[0].events)
    conn.close()
    for args in (("--number", "+1 555 0100"), ("--call", "no-such-call")):
        result = callgate("erase", *args, "--yes", "--db", db)
        assert result.returncode == 1
        assert "nothing to erase" in result.stderr and "Traceback" not in result.stderr
    refused = callgate("erase", "--number", "12345", "--db", db, env=cli_env())
    assert refused.returncode == 1  # confirmation asked, stdin empty: aborted
    assert callgate("erase", "--db", db).returncode == 2  # nothing chosen: usage error


def test_erase_by_number_reaches_refused_requests_that_wrote_it_formatted(
    tmp_path: Path, make_app
) -> None:
    """Events are matched by the digits of their numbers, refused requests only by whole
    digit runs: one that wrote the number as `+91 98200-12345` kept it readable."""
    db = str(tmp_path / "callgate.db")
    from gateway.config import Config

    app = make_app(Config(db_path=db, app_ids=(APP_ID,)))
    client = app.test_client()
    written = ("+91 98200-12345", "(91) 98200.12345", "919820012345")
    for n, number in enumerate(written):
        assert client.post("/webhooks/enablex", json={
            "voice_id": f"fmt-{n}", "state": "connected", "from": number}).status_code == 200
        refused = client.post("/webhooks/enablex", json={"state": "connected", "from": number,
                                                         "note": f"refused {n}"})
        assert refused.status_code == 422
    other = client.post("/webhooks/enablex", json={"state": "ringing", "from": "+91 98200 12346"})
    assert other.status_code == 422
    noted = client.post("/webhooks/enablex", json={"state": "ringing",
                                                  "note": "+91 98200-12345 (2) - 10:30"})
    assert noted.status_code == 422  # more digit groups after the number
    app.extensions["callgate_writer"].close()
    result = callgate("erase", "--number", TYPED, "--yes", "--db", db)
    assert result.returncode == 0, result.stderr
    assert "3 call(s)" in result.stdout and "4 refused request(s)" in result.stdout
    cached = connect(db)
    keystore.forget(cached)  # this process's keys were cached before the erasure
    cached.close()
    left = [text for text in opened_texts(db) if "9820" in text]
    assert len(left) == 1 and "12346" in left[0], left  # only the other caller's request


def test_a_busy_log_erases_nothing_and_says_so_then_erase_completes(tmp_path: Path) -> None:
    """Before, the keys went first and the audit append then failed on the locked log: a
    traceback, no audit event, the caller's number left in the projections, and a second
    run found nothing to erase. Now erase waits its turn among the log's writers; if the
    log stays busy, nothing is destroyed."""
    from gateway.log.writer import WriterLock

    db, voice_id = projected_call(tmp_path)
    with WriterLock(db, 5.0):  # a gateway writer's turn that outlasts erase's wait
        busy = callgate("erase", "--call", voice_id, "--yes", "--wait", "0.5", "--db", db)
    assert busy.returncode == 1 and "Traceback" not in busy.stderr
    assert "nothing was erased" in busy.stderr
    conn = connect(db)
    row = conn.execute("SELECT from_number FROM calls_private WHERE voice_id = ?", (voice_id,))
    assert row.fetchone()[0]
    assert not conn.execute("SELECT 1 FROM events WHERE class = 'erasure'").fetchall()
    conn.close()
    done = callgate("erase", "--call", voice_id, "--yes", "--wait", "0.5", "--db", db)
    assert done.returncode == 0, done.stderr
    conn = connect(db)
    row = conn.execute("SELECT from_number FROM calls_private WHERE voice_id = ?", (voice_id,))
    assert row.fetchone()[0] is None
    assert len(conn.execute("SELECT 1 FROM events WHERE class = 'erasure'").fetchall()) == 1
    conn.close()


def test_erase_warns_when_the_key_stores_wal_could_not_be_emptied(tmp_path: Path) -> None:
    """The key store's truncating checkpoint was fire-and-forget: with a reader holding the
    WAL, copies of the destroyed keys stayed in it without a word."""
    db, voice_id = projected_call(tmp_path, project=False)
    reader = sqlite3.connect(str(tmp_path / "callgate-keys.db"), isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM data_keys").fetchone()  # a snapshot: WAL pinned
    result = callgate("erase", "--call", voice_id, "--yes", "--wait", "0.5", "--db", db)
    reader.execute("COMMIT")
    reader.close()
    assert result.returncode == 0, result.stderr
    assert "key store's WAL" in result.stderr and "callgate-keys.db-wal" in result.stderr


def test_the_projector_refolds_what_an_erasure_event_names(tmp_path: Path) -> None:
    """The audit event drives the re-fold too: should `erase` stop after logging it, the
    projector following the log still takes the erased values out of the projections."""
    from gateway.config import Config
    from gateway.log import erasure

    db, voice_id = projected_call(tmp_path)
    conn = connect(db)
    store = keystore.for_database(conn)
    plan = erasure.plan_call(conn, store, Config(db_path=db, app_ids=(APP_ID,)), voice_id)
    assert plan.calls == [voice_id]
    erasure.destroy(conn, store, plan, "call")  # and no reproject
    query = "SELECT from_number FROM calls_private WHERE voice_id = ?"
    assert conn.execute(query, (voice_id,)).fetchone()[0]  # not re-folded yet
    assert projector.project_all(conn) == 1  # the erasure event
    assert conn.execute(query, (voice_id,)).fetchone()[0] is None
    conn.close()


def test_erasing_a_call_of_a_broadcast_reaches_the_summary_that_lists_it(
    tmp_path: Path,
) -> None:
    """A broadcast summary lists each call's number beside its voice_id, sealed with the
    broadcast's key: `erase --call` left that number readable in the log and in
    broadcasts_private. Now the summary's key goes too (all its numbers, as with
    `erase --number`)."""
    db = str(tmp_path / "callgate.db")
    conn = open_log(db)
    flow = next(f for f in flows() if f.name.startswith("16_") or "callinfo" in f.name)
    append_all(conn, flow.events)
    projector.project_all(conn)
    summary = next(e for e in flow.events if "broadcast_call_info" in e)
    voice_id, called = summary["broadcast_call_info"][0]["voice_id"], summary[
        "broadcast_call_info"][0]["to"]
    conn.close()
    result = callgate("erase", "--call", voice_id, "--yes", "--db", db)
    assert result.returncode == 0, result.stderr
    assert "1 call(s), 1 broadcast(s)" in result.stdout, result.stdout
    cached = connect(db)
    keystore.forget(cached)
    cached.close()
    assert not [text for text in opened_texts(db) if called in text]
    conn = connect(db)
    unseal = sealing.Opener(keystore.for_database(conn))
    for (payload,) in conn.execute("SELECT payload FROM events WHERE class = 'broadcast'"):
        assert called not in json.dumps(unseal.event(payload))
    private = json.dumps([list(r) for r in conn.execute("SELECT * FROM broadcasts_private")])
    assert called not in private
    conn.close()


def test_erase_of_one_call_and_by_retention(tmp_path: Path) -> None:
    db = str(tmp_path / "callgate.db")
    conn = open_log(db)
    first, second = flows()[0], flows()[1]
    append_all(conn, first.events + second.events)
    projector.project_all(conn)
    voice_id = first.events[0]["voice_id"]
    conn.close()
    result = callgate("erase", "--call", voice_id, "--yes", "--db", db)
    assert result.returncode == 0, result.stderr
    conn = connect(db)
    calls = {r["voice_id"]: dict(r) for r in conn.execute("SELECT * FROM calls_private")}
    assert calls[voice_id]["from_number"] is None
    assert all(c["from_number"] for v, c in calls.items() if v != voice_id)
    conn.close()
    # Retention: every key older than 0 days, i.e. all of them.
    no_days = callgate("erase", "--retention", "--yes", "--db", db)
    assert no_days.returncode == 1 and "CALLGATE_RETENTION_DAYS" in no_days.stderr
    result = callgate("erase", "--retention", "--yes", "--db", db,
                      env=cli_env(CALLGATE_RETENTION_DAYS="0"))
    assert result.returncode == 0, result.stderr
    conn = connect(db)
    left = [r[0] for r in conn.execute("SELECT from_number FROM calls_private")]
    assert left == [None] * len(calls)
    assert eventlog.verify(conn).ok
    conn.close()


def test_the_log_holds_no_personal_value_and_no_unkeyed_hash(tmp_path: Path) -> None:
    db = str(tmp_path / "callgate.db")
    conn = open_log(db)
    raws = [raw for flow in flows() for raw in flow.events]
    append_all(conn, raws)
    personal = {
        value for raw in raws for value in sealing.iter_personal(new_event(raw).event)
    }
    assert NUMBER in personal and "12345" in personal
    stored = "\n".join(
        f"{payload}\n{raw}" for payload, raw in conn.execute("SELECT payload, raw FROM events")
    )
    assert [value for value in personal if len(value) > 3 and value in stored] == []
    hashes = {h for (h,) in conn.execute("SELECT content_hash FROM events")}
    assert not hashes & {eventlog.content_hash(raw) for raw in raws}
    # The projector opens them: cleartext where the projections keep it.
    projector.project_all(conn)
    found = conn.execute("SELECT count(*) FROM calls_private WHERE from_number = ?", (NUMBER,))
    assert found.fetchone()[0]
    conn.close()


def _sealed_log(db: str, env: dict[str, str] | None = None) -> None:
    """A log with sealed events, written by the real `callgate ingest`."""
    lines = [
        json.dumps({"headers": r.headers, "body": r.body.decode()}) for r in flows()[1].wire
    ]
    capture = Path(db).with_suffix(".jsonl")
    capture.parent.mkdir(parents=True, exist_ok=True)
    capture.write_text("\n".join(lines) + "\n")
    result = callgate("ingest", "--db", db, str(capture), env=env)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("problem", ["missing", "foreign", "no master key", "wrong master key"])
def test_a_bad_key_store_is_a_clear_start_up_error(tmp_path: Path, problem: str) -> None:
    db = str(tmp_path / "callgate.db")
    master = {"CALLGATE_MASTER_KEY": os.urandom(32).hex()}
    _sealed_log(db, cli_env(**master))
    keys = tmp_path / "callgate-keys.db"
    env = cli_env(**master)
    if problem == "missing":
        for path in tmp_path.glob("callgate-keys.db*"):
            path.unlink()
        expected = "does not exist"
    elif problem == "foreign":
        _sealed_log(str(tmp_path / "other" / "callgate.db"), cli_env(**master))
        env["CALLGATE_KEYS_DB"] = str(tmp_path / "other" / "callgate-keys.db")
        expected = "another database's keys"
    elif problem == "no master key":
        env.pop("CALLGATE_MASTER_KEY")
        expected = "set CALLGATE_MASTER_KEY"
    else:
        env["CALLGATE_MASTER_KEY"] = os.urandom(32).hex()
        expected = "does not open"
    commands = [["project"], ["serve", "--port", "1"]]
    if problem == "missing":  # every command that seals or unseals checks at start-up
        commands += [["reprocess"], ["forward", "--drain"], ["rebuild"], ["erase", "--call", "x"],
                     ["archive", "--log", "nats://127.0.0.1:1"]]
    for command in commands:
        result = callgate(*command, "--db", db, env=env)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, command
    if problem == "missing":
        assert not keys.exists()  # nothing made a fresh store behind the operator's back
    ok = callgate("project", "--db", db, env=cli_env(**master))
    assert ok.returncode == (1 if problem == "missing" else 0), ok.stderr


def test_a_schema_2_log_keeps_its_plaintext_rows_and_seals_new_ones(tmp_path: Path) -> None:
    """An existing database: old rows stay readable and verifiable, new rows are sealed."""
    db = str(tmp_path / "callgate.db")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN")
    eventlog.MIGRATIONS[1](conn)
    eventlog.MIGRATIONS[2](conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("COMMIT")
    old = flows()[0].events
    item = new_event(old[0])
    digest = eventlog.content_hash(item.raw_obj)
    row = {"seq": 1, "event_id": "ev_" + digest[:24], "app_id": "test",
           "voice_id": item.event["voice_id"], "broadcast_id": None,
           "class": item.event["class"], "state": item.event.get("state"),
           "occurred_at": item.event["occurred_at"], "received_at": item.received_at,
           "payload": eventlog.canonical_json(item.event), "raw": item.raw_text,
           "content_hash": digest, "prev_hash": "0" * 64}
    row["hash"] = eventlog.row_hash("0" * 64, row)
    conn.execute(eventlog._INSERT_SQL, row)
    conn.close()
    log = open_log(db)
    assert log.execute("PRAGMA user_version").fetchone()[0] == eventlog.SCHEMA_VERSION
    append_all(log, old[1:])
    assert eventlog.verify(log).ok
    raws = [r for (r,) in log.execute("SELECT raw FROM events ORDER BY seq")]
    assert not raws[0].startswith(sealing.RAW_PREFIX)
    assert all(r.startswith(sealing.RAW_PREFIX) for r in raws[1:])
    projector.project_all(log)
    call = dict(log.execute(tables.cleartext_select(tables.CALLS)).fetchone())
    assert call["from_number"] and call["event_count"] == len(old)
    log.close()


def test_redelivery_after_erasure_is_not_logged_twice_nor_resealed(tmp_path: Path) -> None:
    """EnableX redelivers an erased call's event: a duplicate by the keyed hash; a new event
    of that call is logged without its personal values (the unit stays shredded)."""
    db = str(tmp_path / "callgate.db")
    conn = open_log(db)
    events = flows()[0].events
    append_all(conn, events[:-1])
    voice_id = events[0]["voice_id"]
    conn.close()
    assert callgate("erase", "--call", voice_id, "--yes", "--db", db).returncode == 0
    conn = open_log(db)
    keystore.forget(conn)
    results = append_all(conn, events)
    assert [r.duplicate for r in results] == [True] * (len(events) - 1) + [False]
    late = conn.execute("SELECT payload, raw FROM events WHERE seq = ?", (results[-1].seq,))
    payload, raw = late.fetchone()
    assert sealing.SEALED not in json.loads(payload) and raw == f"sealed:{voice_id}:"
    conn.close()


def test_sealing_survives_the_http_gateway(tmp_path: Path, server) -> None:  # noqa: ANN001
    """Through the real gunicorn gateway: the stored event carries no number in the clear."""
    request = flows()[1].wire[0]
    response = httpx.post(server.url + "/webhooks/enablex", headers=request.headers,
                          content=request.body, timeout=10)
    assert response.status_code == 200, response.text
    conn = connect(server.db)
    payload, raw = conn.execute("SELECT payload, raw FROM events").fetchone()
    conn.close()
    assert NUMBER not in payload + raw and raw.startswith(sealing.RAW_PREFIX)


def test_a_key_minted_by_another_process_is_the_one_used(tmp_path: Path) -> None:
    """Two processes' stores on one key file: whoever mints a unit's key first, both
    seal and open with that one key (the second reads it back instead of its own)."""
    path = str(tmp_path / "callgate-keys.db")
    first, second, third = (keystore.KeyStore(path) for _ in range(3))
    try:
        mine = first.ensure({"voice-1": {"919800000001"}}, "2024-06-01T00:00:00.000Z")["voice-1"]
        theirs = second.ensure({"voice-1": set()}, "2024-06-01T00:00:01.000Z")["voice-1"]
        assert mine is not None and theirs is not None
        event = {"voice_id": "voice-1", "class": "call", "from": "919800000001"}
        sealed = sealing.seal_event(event, '{"from":"919800000001"}', "voice-1", theirs)
        payload = eventlog.canonical_json(sealed.payload)
        assert "919800000001" not in payload
        # A third store, nothing cached: what the file holds opens both processes' seals.
        reader = sealing.Opener(third)
        assert reader.event(payload)["from"] == "919800000001"
        token = sealing.seal_event(event, "raw", "voice-1", mine).raw
        assert reader.raw(token) == "raw"
        assert first.units_of_number("919800000001") == ["voice-1"]
    finally:
        for store in (first, second, third):
            store.close()
