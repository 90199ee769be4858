"""Forwarder end to end: a real SQLite log, a real receiver subprocess verifying signatures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from gateway.cli import main as cli
from gateway.config import Config
from gateway.db import connect, log_head
from gateway.forward import delivery, envelope, outbox
from gateway.forward.redeliver import redeliver
from gateway.forward.subscriptions import event_type, generate_secret, matches, normalise_patterns
from gateway.log import eventlog, keystore, sealing
from tests.helpers_analytics import append_all
from tests.servers import Receiver

REPO = Path(__file__).resolve().parent.parent
FLOWS = sorted((REPO / "tests/fixtures/enablex/corpus/flows").glob("*.json"))
QUICK = (0.0, 0.1, 0.1, 0.1, 0.1)


def flow(name: str) -> Path:
    return next(path for path in FLOWS if path.name.startswith(name))


def append_raw(db: str, raws: list[dict[str, Any]]) -> int:
    """Normalise raw EnableX events and append them, as the gateway would; returns the head."""
    conn = connect(db)
    eventlog.ensure_schema(conn)
    append_all(conn, raws, app_label="app-test")
    head = log_head(conn)[0]
    conn.close()
    return head


def fill_log(db: str, flows: list[Path] | None = None) -> int:
    """Append every event of the given corpus flows (default: all of them)."""
    raws = []
    for path in flows if flows is not None else FLOWS:
        raws += json.loads(path.read_text())["events"]
    return append_raw(db, raws)


def log_events(db: str) -> list[dict[str, Any]]:
    conn = connect(db)
    rows = [dict(r) for r in conn.execute("SELECT * FROM events ORDER BY seq")]
    conn.close()
    return rows


def query(db: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    conn = connect(db)
    rows = [dict(r) for r in conn.execute(sql, params)]
    conn.close()
    return rows


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("CALLGATE_SECRETS_DB", raising=False)
    monkeypatch.delenv("CALLGATE_RETRY_SCHEDULE", raising=False)
    return str(tmp_path / "callgate.db")


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    started: list[Receiver] = []
    yield started
    for receiver in started:
        receiver.stop()


def run_cli(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def subscribe(db: str, url: str, *extra: str) -> tuple[str, str]:
    """`callgate subscribe`; returns (id, secret) parsed from what it prints."""
    out = run_cli("subscribe", url, "--db", db, *extra)
    sub_id = out.split()[1]
    secrets = [line.split()[1] for line in out.splitlines() if line.startswith("secret:")]
    return sub_id, secrets[0] if secrets else ""


def options(**kw: Any) -> delivery.ForwardOptions:
    base: dict[str, Any] = dict(schedule=QUICK, workers=4, timeout=3.0, poll_interval=0.05)
    base.update(kw)
    return delivery.ForwardOptions(**base)


def assert_per_call_order(records: list[dict[str, Any]]) -> None:
    """In arrival order, each call's accepted events have strictly increasing log seq."""
    last: dict[tuple[str, str], int] = {}
    for rec in records:
        if rec["status"] != 200:
            continue
        env = rec["envelope"]
        key = (rec["path"], env.get("subject") or env["id"])
        assert env["callgateseq"] > last.get(key, 0), (key, env["callgateseq"], last.get(key))
        last[key] = env["callgateseq"]


def assert_attempts_ordered(db: str) -> None:
    """From the forwarder's own record: no event of a call was tried before the previous
    event of that call (and subscription) was settled: delivered (its row was updated
    after the receiver answered) or dead."""
    rows = query(
        db,
        "SELECT d.subscription_id, d.order_key, d.seq, d.delivered_at, a.started_at, a.outcome "
        "FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id "
        "ORDER BY d.subscription_id, d.order_key, d.seq, a.attempt",
    )
    queues: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        queues[(row["subscription_id"], row["order_key"])].append(row)
    for attempts in queues.values():
        settled_at = ""
        current = None
        for row in attempts:
            if row["seq"] != current:
                assert row["started_at"] >= settled_at, row
                current = row["seq"]
            if row["outcome"] == "delivered":
                settled_at = row["delivered_at"]
            elif row["outcome"] == "dead":
                settled_at = row["started_at"]


def test_patterns_types_and_schedule() -> None:
    assert normalise_patterns(None) == ["*"]
    assert normalise_patterns(
        ["call", "enablex.voice.play.digitcollected,recording.completed"]
    ) == [
        "call.*",
        "play.digitcollected",
        "recording.completed",
    ]
    assert matches(["call.*"], "call", "connected")
    assert not matches(["call.*"], "play", "initiated")
    assert matches(["play.digitcollected"], "play", "digitcollected")
    assert matches(["*"], "unknown", None)
    assert event_type("unknown", None) == "enablex.voice.unknown.unknown"
    assert event_type("call", "incomingcall") == "enablex.voice.call.incomingcall"
    with pytest.raises(ValueError):
        normalise_patterns(["call connected"])
    assert delivery.parse_schedule("0,5,5m,30m,2h") == (0, 5, 300, 1800, 7200)
    assert delivery.parse_schedule("0, 0.2 ,1") == (0, 0.2, 1)
    for bad in ("", "1,-1", "x"):
        with pytest.raises(ValueError):
            delivery.parse_schedule(bad)
    assert delivery.ForwardOptions().schedule == outbox.DEFAULT_SCHEDULE
    env_opts = delivery.ForwardOptions.from_config(
        Config.from_env(env={"CALLGATE_RETRY_SCHEDULE": "0,1,2"})
    )
    assert env_opts.schedule == (0, 1, 2)
    assert delivery.parse_retry_after("7") == 7
    assert delivery.parse_retry_after("soon") is None
    assert delivery.parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10
    assert envelope.message_id("sub_a", "ev_1") == envelope.message_id("sub_a", "ev_1")
    assert envelope.message_id("sub_a", "ev_1") != envelope.message_id("sub_b", "ev_1")


def test_corpus_delivered_once_per_webhook_id(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    fill_log(db)
    events = log_events(db)
    secret_all, secret_calls = generate_secret(), generate_secret()
    rx = Receiver(tmp_path, secrets=(secret_all, secret_calls)).start()
    receivers.append(rx)
    sub_all, _ = subscribe(db, rx.url("/all"), "--secret", secret_all, "--from-start")
    sub_calls, _ = subscribe(
        db,
        rx.url("/calls"),
        "-e",
        "call.*",
        "-e",
        "recording.completed",
        "--secret",
        secret_calls,
        "--from-start",
    )

    stats = delivery.forward_once(db, options())
    wanted_calls = [
        e for e in events if matches(["call.*", "recording.completed"], e["class"], e["state"])
    ]
    assert 0 < len(wanted_calls) < len(events)
    assert stats.delivered == len(events) + len(wanted_calls)

    records = rx.records()
    assert all(r["status"] == 200 for r in records)
    ids = [r["webhook_id"] for r in records]
    assert len(ids) == len(set(ids)), "a webhook id was delivered twice"
    by_path: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for rec in records:
        by_path[rec["path"]][rec["webhook_id"]] = rec
    assert set(by_path["/all"]) == {envelope.message_id(sub_all, e["event_id"]) for e in events}
    assert set(by_path["/calls"]) == {
        envelope.message_id(sub_calls, e["event_id"]) for e in wanted_calls
    }
    assert all(r["verified"] == [True, False] for r in by_path["/all"].values())
    assert all(r["verified"] == [False, True] for r in by_path["/calls"].values())

    by_event = {e["event_id"]: e for e in events}
    conn = connect(db)
    unseal = sealing.Opener(keystore.for_database(conn))  # what the forwarder opened
    for rec in records:
        env = rec["envelope"]
        event = by_event[env["callgateeventid"]]
        payload = unseal.event(event["payload"])
        assert rec["content_type"].startswith("application/cloudevents+json")
        assert env["specversion"] == "1.0"
        assert env["id"] == rec["webhook_id"]
        assert env["source"] == "callgate/enablex"
        assert env["type"] == f"enablex.voice.{event['class']}.{event['state'] or 'unknown'}"
        assert env.get("subject") == (event["voice_id"] or event["broadcast_id"])
        assert env["time"] == event["occurred_at"]
        assert env["datacontenttype"] == "application/json"
        assert env["data"] == payload
        assert "app_id" not in env["data"] and "app-test" not in json.dumps(env)
    conn.close()
    assert_per_call_order(records)

    deliveries = query(db, "SELECT status, attempts FROM deliveries")
    assert len(deliveries) == len(events) + len(wanted_calls)
    assert {(d["status"], d["attempts"]) for d in deliveries} == {("delivered", 1)}
    attempts = query(db, "SELECT * FROM delivery_attempts")
    assert len(attempts) == len(deliveries)
    assert all(a["status_code"] == 200 and a["duration_ms"] >= 0 for a in attempts)
    assert all('"ok": true' in a["response_body"] for a in attempts)

    # A second run has nothing to do; a replay of one call resends the same ids and bytes.
    assert delivery.forward_once(db, options()).attempts == 0
    voice = json.loads(flow("02").read_text())["expect"]["voice_id"]
    conn = outbox.open_db(db)
    plan = redeliver(conn, voice_ids=[voice], subscription_id=sub_all)
    conn.close()
    assert plan and {p.action for p in plan} == {"requeue"}
    delivery.forward_once(db, options())
    replayed = rx.records()[len(records) :]
    assert len(replayed) == len(plan)
    for rec in replayed:
        original = by_path["/all"][rec["webhook_id"]]
        assert rec["envelope"] == original["envelope"]
        assert rec["try"] == 2
    assert_per_call_order(replayed)


def test_failing_receiver_retries_recorded_then_delivered(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    secret = generate_secret()
    rx = Receiver(tmp_path, "--fail-first", "2", secrets=(secret,)).start()
    receivers.append(rx)
    subscribe(db, rx.url(), "--secret", secret)
    head = fill_log(db, [flow("22"), flow("08")])

    stats = delivery.forward_once(db, options(), drain=True)
    assert stats.delivered == head and stats.retrying == 2 * head and stats.dead == 0

    attempts = query(db, "SELECT * FROM delivery_attempts ORDER BY delivery_id, attempt")
    by_delivery: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in attempts:
        by_delivery[row["delivery_id"]].append(row)
    assert len(by_delivery) == head
    for rows in by_delivery.values():
        assert [r["attempt"] for r in rows] == [1, 2, 3]
        assert [r["status_code"] for r in rows] == [503, 503, 200]
        assert [r["outcome"] for r in rows] == ["retry", "retry", "delivered"]
        assert rows[0]["error"] is None and rows[0]["next_attempt_at"] is not None
        assert rows[1]["started_at"] >= rows[0]["next_attempt_at"]
    assert {(d["status"], d["attempts"]) for d in query(db, "SELECT * FROM deliveries")} == {
        ("delivered", 3)
    }
    records = rx.records()
    assert len(records) == 3 * head and all(r["verified"] == [True] for r in records)
    assert_per_call_order(records)
    assert_attempts_ordered(db)


def test_retry_after_is_honoured_and_jitter_bounded(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    secret = generate_secret()
    rx = Receiver(tmp_path, "--fail-first", "1", "--retry-after", "1", secrets=(secret,)).start()
    receivers.append(rx)
    subscribe(db, rx.url(), "--secret", secret)
    fill_log(db, [flow("22")])
    delivery.forward_once(db, options(schedule=(0, 0.05)), drain=True)
    records = rx.records()
    first = {r["webhook_id"]: r["received_at"] for r in records if r["try"] == 1}
    for rec in records:
        if rec["try"] == 2:
            assert rec["status"] == 200
            assert rec["received_at"] - first[rec["webhook_id"]] >= 0.95

    # Without Retry-After the wait is the schedule's step ±20 %.
    db2 = str(tmp_path / "jitter.db")
    rx2 = Receiver(tmp_path, "--fail-first", "1", secrets=(secret,)).start()
    receivers.append(rx2)
    subscribe(db2, rx2.url(), "--secret", secret)
    fill_log(db2, [flow("22")])
    delivery.forward_once(db2, options(schedule=(0, 100)))
    for row in query(db2, "SELECT * FROM delivery_attempts"):
        wait = _seconds(row["next_attempt_at"]) - _seconds(row["started_at"])
        assert 80 - 0.5 <= wait <= 120 + 0.5, wait


def _seconds(text: str) -> float:
    from datetime import UTC, datetime

    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_receiver_down_then_everything_in_per_call_order(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    secret = generate_secret()
    rx = Receiver(tmp_path, secrets=(secret,))  # not started: the port refuses connections
    receivers.append(rx)
    subscribe(db, rx.url(), "--secret", secret)
    first, second = FLOWS[:8], FLOWS[8:]
    fill_log(db, first)
    stop = threading.Event()
    result: list[delivery.ForwardStats] = []
    opts = options(schedule=(0,) + (0.25,) * 40)
    thread = threading.Thread(target=lambda: result.append(delivery.follow(db, stop, opts)))
    thread.start()
    try:
        _wait_for(lambda: query(db, "SELECT count(*) n FROM delivery_attempts")[0]["n"] >= 10)
        head = fill_log(db, second)  # more traffic while the receiver is still down
        time.sleep(0.6)
        failed = query(db, "SELECT * FROM delivery_attempts")
        assert failed and all(a["outcome"] == "retry" and a["error"] for a in failed)
        assert query(db, "SELECT count(*) n FROM deliveries WHERE status='delivered'")[0]["n"] == 0
        rx.start()
        _wait_for(
            lambda: (
                query(db, "SELECT count(*) n FROM deliveries WHERE status='delivered'")[0]["n"]
                == head
            )
        )
    finally:
        stop.set()
        thread.join(timeout=15)
    assert not thread.is_alive() and result[0].delivered == head
    records = rx.records()
    assert len(records) == head == len({r["webhook_id"] for r in records})
    assert all(r["status"] == 200 and r["verified"] == [True] for r in records)
    assert_per_call_order(records)
    assert_attempts_ordered(db)


def test_one_stuck_call_waits_while_other_calls_flow(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    stuck = json.loads(flow("22").read_text())["expect"]["voice_id"]
    secret = generate_secret()
    rx = Receiver(tmp_path, "--fail-first", "2", "--fail-subject", stuck, secrets=(secret,)).start()
    receivers.append(rx)
    subscribe(db, rx.url(), "--secret", secret)
    fill_log(db, [flow("22"), flow("02"), flow("08"), flow("14")])
    delivery.forward_once(db, options(schedule=(0, 0.5, 0.5)), drain=True)

    records = rx.records()
    stuck_ok = [r for r in records if r["envelope"]["subject"] == stuck and r["status"] == 200]
    others = [r for r in records if r["envelope"]["subject"] != stuck]
    assert len(stuck_ok) == 2 and others
    # Every other call was fully delivered before the stuck call's first event got through.
    assert max(r["received_at"] for r in others) < stuck_ok[0]["received_at"]
    stuck_tries = [
        r["envelope"]["callgateseq"] for r in records if r["envelope"]["subject"] == stuck
    ]
    assert stuck_tries == sorted(stuck_tries)  # its second event waited for the first
    assert_per_call_order(records)
    assert_attempts_ordered(db)


def test_410_gone_disables_the_subscription(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    secret = generate_secret()
    gone = Receiver(tmp_path, "--gone", secrets=(secret,)).start()
    fine = Receiver(tmp_path, secrets=(secret,)).start()
    receivers += [gone, fine]
    sub_gone, _ = subscribe(db, gone.url(), "--secret", secret)
    sub_fine, _ = subscribe(db, fine.url(), "--secret", secret)
    head = fill_log(db, FLOWS[:5])
    stats = delivery.forward_once(db, options(workers=2))
    assert stats.disabled == [sub_gone]
    assert len(gone.records()) <= 2  # only what was already in flight
    assert len(fine.records()) == head == stats.delivered

    sub = query(db, "SELECT * FROM subscriptions WHERE id = ?", sub_gone)[0]
    assert sub["disabled_at"] and "410" in sub["disabled_reason"]
    statuses = {
        r["status"]
        for r in query(db, "SELECT status FROM deliveries WHERE subscription_id = ?", sub_gone)
    }
    assert statuses == {"cancelled"}
    gone_attempts = query(db, "SELECT * FROM delivery_attempts WHERE subscription_id = ?", sub_gone)
    assert {a["outcome"] for a in gone_attempts} == {"gone"}

    fill_log(db, FLOWS[5:7])  # later traffic is not even queued for the disabled subscription
    delivery.forward_once(db, options())
    assert len(gone.records()) <= 2
    assert not query(
        db, "SELECT 1 FROM deliveries WHERE subscription_id = ? AND seq > ?", sub_gone, head
    )
    listing = run_cli("subscriptions", "--db", db)
    assert f"{sub_gone}" in listing and "DISABLED" in listing and "410" in listing


def test_dead_letters_are_redelivered(db: str, tmp_path: Path, receivers: list[Receiver]) -> None:
    secret = generate_secret()
    rx = Receiver(tmp_path, "--fail-first", "2", secrets=(secret,)).start()
    receivers.append(rx)
    sub_id, _ = subscribe(db, rx.url(), "--secret", secret)
    head = fill_log(db, [flow("22"), flow("08")])
    stats = delivery.forward_once(db, options(schedule=(0, 0.05)), drain=True)
    assert stats.dead == head and stats.delivered == 0
    health = json.loads(run_cli("subscriptions", "--db", db, "--json"))[0]
    assert health["dead"] == head and health["pending"] == 0 and health["last_failure_at"]

    dry = run_cli("redeliver", "--dead", "--dry-run", "--db", db)
    assert dry.count("requeue") == head and f"would queue {head}" in dry
    assert query(db, "SELECT count(*) n FROM deliveries WHERE status='dead'")[0]["n"] == head

    out = run_cli("redeliver", "--dead", "--subscription", sub_id, "--db", db)
    assert f"queued {head}" in out
    stats = delivery.forward_once(db, options(schedule=(0, 0.05)), drain=True)
    assert stats.delivered == head
    rows = query(db, "SELECT status, attempts, redeliveries FROM deliveries")
    assert {(r["status"], r["attempts"], r["redeliveries"]) for r in rows} == {("delivered", 3, 1)}
    records = rx.records()
    ok = [r for r in records if r["status"] == 200]
    assert len(ok) == head and {r["try"] for r in ok} == {3}
    assert_per_call_order(records)
    health = json.loads(run_cli("subscriptions", "--db", db, "--json"))[0]
    assert health["dead"] == 0 and health["delivered"] == head and health["last_success_at"]


def test_redeliver_by_event_call_and_time_range(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    secret = generate_secret()
    rx = Receiver(tmp_path, secrets=(secret,)).start()
    receivers.append(rx)
    fill_log(db, [flow("02"), flow("08")])
    sub_id, _ = subscribe(db, rx.url(), "--secret", secret)  # only new events by default
    assert delivery.forward_once(db, options()).attempts == 0
    events = log_events(db)

    result = CliRunner().invoke(cli, ["redeliver", "--db", db])
    assert result.exit_code == 2 and "say what to redeliver" in result.output

    target = events[3]
    out = run_cli("redeliver", "--event", target["event_id"], "--db", db)
    assert out.startswith("create") and "queued 1" in out
    delivery.forward_once(db, options())
    assert [r["envelope"]["callgateeventid"] for r in rx.records()] == [target["event_id"]]

    voice = events[-1]["voice_id"]
    call_events = [e for e in events if e["voice_id"] == voice]
    dry = run_cli("redeliver", "--call", voice, "--dry-run", "--db", db)
    assert f"would queue {len(call_events)}" in dry
    since, until = events[1]["occurred_at"], events[4]["occurred_at"]
    in_range = [e for e in events if since <= e["occurred_at"] < until]
    dry = run_cli("redeliver", "--since", since, "--until", until, "--dry-run", "--db", db)
    assert f"would queue {len(in_range)}" in dry
    run_cli("redeliver", "--call", voice, "--subscription", sub_id, "--db", db)
    delivery.forward_once(db, options())
    got = [r["envelope"]["callgateseq"] for r in rx.records()[1:]]
    assert got == [e["seq"] for e in call_events]


def test_rotation_signs_with_both_secrets_during_overlap(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    old = generate_secret()
    rx = Receiver(tmp_path)  # started once the new secret is known
    sub_id, _ = subscribe(db, rx.url(), "--secret", old)
    out = run_cli("rotate-secret", sub_id, "--db", db)
    new = next(line.split()[1] for line in out.splitlines() if line.startswith("secret:"))
    assert new != old and new.startswith("whsec_")
    rx.args += ["--secret", old, "--secret", new]
    receivers.append(rx.start())
    head = fill_log(db, [flow("22"), flow("08")])
    delivery.forward_once(db, options())
    records = rx.records()
    assert len(records) == head
    # A receiver verifying with only the old secret, or only the new one, accepts every delivery.
    assert all(r["signatures"] == 2 and r["verified"] == [True, True] for r in records)

    # Once the overlap is over only the newest secret signs.
    out = run_cli("rotate-secret", sub_id, "--overlap-hours", "0", "--db", db)
    newest = next(line.split()[1] for line in out.splitlines() if line.startswith("secret:"))
    rx.stop()
    rx2 = Receiver(tmp_path, secrets=(old, new, newest), port=rx.port).start()
    receivers.append(rx2)
    head2 = fill_log(db, [flow("02")])
    delivery.forward_once(db, options())
    records = rx2.records()
    assert len(records) == head2 - head
    assert all(r["signatures"] == 1 and r["verified"] == [False, False, True] for r in records)

    # Secrets live only in the private secrets file, never in the database Datasette serves.
    main_bytes = b"".join(Path(p).read_bytes() for p in (db, db + "-wal") if Path(p).exists())
    for secret in (old, new, newest):
        assert secret.encode() not in main_bytes
        assert secret.split("_", 1)[1].encode() not in main_bytes
    secrets_db = Path(db).parent / "callgate-secrets.db"
    assert secrets_db.exists() and (secrets_db.stat().st_mode & 0o777) == 0o600


def test_subscribe_list_unsubscribe_cli(db: str, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["subscribe", "http://127.0.0.1:9/x", "-e", "call.*", "--db", db])
    assert result.exit_code == 0
    sub_id = result.stdout.split()[1]
    secret = next(line.split()[1] for line in result.stdout.splitlines() if "secret:" in line)
    assert sub_id.startswith("sub_") and secret.startswith("whsec_")
    listing = run_cli("subscriptions", "--db", db)
    assert sub_id in listing and "pending=0" in listing and "events=call.*" in listing
    assert secret not in listing
    rows = json.loads(run_cli("subscriptions", "--json", "--db", db))
    assert rows[0]["id"] == sub_id and json.loads(rows[0]["events"]) == ["call.*"]

    for bad in (
        ["ftp://x/y"],
        ["http://127.0.0.1:9/x", "-e", "call connected"],
        ["http://127.0.0.1:9/x", "--secret", "whsec_c2hvcnQ="],
    ):
        result = runner.invoke(cli, ["subscribe", *bad, "--db", db])
        assert result.exit_code == 2, bad
    result = runner.invoke(cli, ["unsubscribe", "sub_nope", "--db", db])
    assert result.exit_code == 2

    assert "unsubscribed" in run_cli("unsubscribe", sub_id, "--db", db)
    assert "DISABLED" in run_cli("subscriptions", "--db", db)
    result = runner.invoke(cli, ["rotate-secret", sub_id, "--db", db])
    assert result.exit_code == 2 and "disabled" in result.output
    conn = outbox.open_db(db)
    from gateway.forward.subscriptions import SecretStore, secrets_path

    store = SecretStore(secrets_path(db))
    assert store.active(sub_id) == []
    store.close()
    conn.close()


def test_forward_follow_stops_cleanly_on_sigterm(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    secret = generate_secret()
    rx = Receiver(tmp_path, secrets=(secret,)).start()
    receivers.append(rx)
    subscribe(db, rx.url(), "--secret", secret)
    callgate = str(Path(sys.executable).parent / "callgate")
    env = {**os.environ, "CALLGATE_RETRY_SCHEDULE": "0,0.1", "CALLGATE_DB": db}
    env.pop("CALLGATE_SECRETS_DB", None)
    proc = subprocess.Popen(
        [callgate, "forward", "--follow", "--poll", "0.05"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        head = fill_log(db, [flow("02")])
        _wait_for(lambda: len(rx.records()) == head)
        proc.terminate()
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"delivered={head}" in out and "pending=0" in out


def test_redelivered_older_event_never_overtakes_one_in_flight(
    db: str, tmp_path: Path, receivers: list[Receiver]
) -> None:
    secret = generate_secret()
    rx = Receiver(tmp_path, "--delay-ms", "400", secrets=(secret,)).start()
    receivers.append(rx)
    subscribe(db, rx.url(), "--secret", secret)
    first, second = json.loads(flow("22").read_text())["events"][:2]
    append_raw(db, [first])
    stop = threading.Event()
    thread = threading.Thread(target=delivery.follow, args=(db, stop, options()))
    thread.start()
    try:
        _wait_for(lambda: len(rx.records()) == 1)
        append_raw(db, [second])
        _wait_for(
            lambda: (
                query(
                    db,
                    "SELECT count(*) n FROM deliveries WHERE claimed_until IS NOT NULL "
                    "AND status = 'pending'",
                )[0]["n"]
                == 1
            )
        )
        conn = outbox.open_db(db)
        plan = redeliver(conn, event_ids=[log_events(db)[0]["event_id"]])
        conn.close()
        assert [p.action for p in plan] == ["requeue"]
        _wait_for(lambda: len(rx.records()) == 3)
    finally:
        stop.set()
        thread.join(timeout=15)
    records = rx.records()
    assert [r["envelope"]["callgateseq"] for r in records] == [1, 2, 1]
    # The resend of seq 1 only started once seq 2 had been answered.
    assert records[2]["received_at"] >= records[1]["answered_at"]


def test_judge_decides_each_outcome_without_io() -> None:
    """The pure half of Forwarder.record: what an attempt's answer means for its delivery."""
    from datetime import UTC, datetime

    claim = delivery.Claim("d1", "s1", 1, "ev_1", "voice:a", 1, 0, "http://x", "{}")
    options = delivery.ForwardOptions(schedule=(0, 10, 20), jitter=0.0)
    now = datetime(2026, 1, 1, tzinfo=UTC)

    def attempt(code: int | None, error: str | None = None, retry_after: float | None = None,
                step: int = 0) -> delivery.Verdict:
        c = delivery.Claim(*[*vars(claim).values()][:6], step, "http://x", "{}")
        res = delivery.AttemptResult(c, "t", 5, code, None, error, retry_after)
        return delivery.judge(res, options, lambda lo, hi: 1.0, now)

    assert attempt(204) == delivery.Verdict("delivered", None)
    assert attempt(410).outcome == "gone"
    retry = attempt(500)
    assert (retry.outcome, retry.error, retry.next_at) == (
        "retry", "HTTP 500", "2026-01-01T00:00:10.000Z"
    )
    assert attempt(503, retry_after=60).next_at == "2026-01-01T00:01:00.000Z"
    assert attempt(None, error="timeout").error == "timeout"
    assert attempt(500, step=2) == delivery.Verdict("dead", "HTTP 500")
