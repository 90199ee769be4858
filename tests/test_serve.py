"""A real `callgate serve` (gunicorn, several workers) answering the corpus over HTTP."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, server_env
from tests.corpus import cases, flows


def test_serve_answers_the_whole_corpus(server, db_path) -> None:
    url = server.url + "/webhooks/enablex"
    with httpx.Client(timeout=10) as client:
        started = time.perf_counter()
        sent = 0
        for flow in flows():
            answers = [client.post(url, content=r.body, headers=r.headers) for r in flow.wire]
            sent += len(answers)
            assert [a.status_code for a in answers] == [200] * len(answers)
            new = sum(not a.json()["duplicate"] for a in answers)
            assert new == flow.expect["unique_events"], flow.name
        elapsed = time.perf_counter() - started
        for case in cases("bad"):
            request = case["request"]
            answer = client.post(url, content=request.body, headers=request.headers)
            assert answer.status_code == case["expect"]["http_status"], case["name"]
            assert set(answer.json()) == {"error", "detail"}
        assert client.get(server.url + "/healthz").json()["status"] == "ok"
        metrics = client.get(server.url + "/metrics").text
    print(f"\nserve: {sent} corpus requests sequentially in {elapsed:.2f}s "
          f"= {sent / elapsed:.0f} req/s")
    assert 'outcome="accepted"' in metrics and 'error="undecryptable"' in metrics
    assert "bad_decrypt" not in metrics  # public: the exact stage would be a padding oracle
    with sqlite3.connect(db_path) as conn:
        errors = [r[0] for r in conn.execute("SELECT error FROM rejections ORDER BY id")]
    assert errors == [case["expect"]["error"] for case in cases("bad")]


def _send_at_once(url: str, batches: list[list]) -> list[int]:
    """Each batch of corpus requests from a client of its own, all clients at once."""

    def send(batch: list) -> list[int]:
        with httpx.Client(timeout=10) as client:
            return [client.post(url, content=r.body, headers=r.headers).status_code for r in batch]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return [status for chunk in pool.map(send, batches) for status in chunk]


def test_concurrent_clients_get_one_row_per_unique_event(server, db_path) -> None:
    requests = [r for flow in flows() for r in flow.wire]
    # Every request sent twice from different clients at once: dedup must hold under races.
    statuses = _send_at_once(server.url + "/webhooks/enablex",
                             [requests[i::4] for i in range(4)] * 2)
    assert set(statuses) == {200}
    unique = sum(flow.expect["unique_events"] for flow in flows())
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == unique


def test_metrics_show_each_group_commit_its_events_and_the_writers_turn(server) -> None:
    requests = [r for flow in flows() for r in flow.wire]
    statuses = _send_at_once(server.url + "/webhooks/enablex", [requests[i::8] for i in range(8)])
    assert set(statuses) == {200}
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith(("callgate_group_commit", "callgate_writer_turn"))
        and not sample.labels
    }
    commits = samples["callgate_group_commit_events_count"]
    # Every accepted webhook (duplicates included: dedup happens inside the commit)
    # rode in exactly one group commit, and each commit took the writers' turn once.
    assert samples["callgate_group_commit_events_sum"] == len(requests)
    assert 1 <= commits <= len(requests)
    assert samples["callgate_writer_turn_wait_seconds_count"] == commits
    assert samples["callgate_writer_turn_held_seconds_count"] == commits
    assert samples["callgate_writer_turn_held_seconds_sum"] > 0


def _worker_masks(server: RunningServer, expect: int = 2) -> dict[int, set[int]]:
    """Worker pid → CPU affinity, once `expect` workers exist and have run `post_fork`
    (a just-forked worker briefly shows the master's mask)."""
    assert server.proc is not None
    children = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    settled, deadline = time.monotonic() + 1.0, time.monotonic() + 20
    while True:
        masks = {}
        for pid in map(int, children.read_text().split()):
            with contextlib.suppress(OSError):
                masks[pid] = os.sched_getaffinity(pid)
        if len(masks) == expect and time.monotonic() > settled:
            return masks
        assert time.monotonic() < deadline, f"expected {expect} workers, found {masks}"
        time.sleep(0.1)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2
    or not Path("/proc/self/task").exists(),
    reason="needs Linux and at least two CPUs",
)
@pytest.mark.parametrize("pinned", [True, False])
def test_workers_are_pinned_each_to_its_own_cpu(db_path: str, pinned: bool) -> None:
    """Default: one CPU per worker, different ones; --no-cpu-affinity leaves them free.
    A worker killed and respawned takes the CPU its predecessor left."""
    allowed = os.sched_getaffinity(0)
    args = () if pinned else ("--no-cpu-affinity",)
    server = RunningServer(db_path, server_env(), workers=2, args=args).start()
    try:
        masks = _worker_masks(server)
        if not pinned:
            assert list(masks.values()) == [allowed, allowed]
            return
        assert all(len(mask) == 1 for mask in masks.values())
        assert len({frozenset(mask) for mask in masks.values()}) == 2
        victim = min(masks)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while set(_worker_masks(server)) - set(masks) == set():
            assert time.monotonic() < deadline, "gunicorn did not replace the killed worker"
            time.sleep(0.1)
        after = _worker_masks(server)
        (respawned,) = set(after) - set(masks)
        assert after[respawned] == masks[victim]
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    finally:
        server.stop()


def test_stopping_the_server_logs_no_traceback(db_path: str) -> None:
    """SIGTERM stops both workers at once; the master's SIGCHLD handling (dropping their
    metrics files) must not fail on a half-imported prometheus_client, which raised
    ImportError in the master, and would take it down if it happened while serving."""
    server = RunningServer(db_path, server_env(), workers=2).start()
    assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
    _worker_masks(server)  # both workers up (one still booting would die of the stop)
    server.stop()
    log = server.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]
