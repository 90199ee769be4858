"""A real `callgate serve` (gunicorn, several workers) answering the corpus over HTTP."""

from __future__ import annotations

import concurrent.futures
import sqlite3
import time

import httpx

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
    assert 'outcome="accepted"' in metrics and 'error="bad_decrypt"' in metrics
    with sqlite3.connect(db_path) as conn:
        errors = [r[0] for r in conn.execute("SELECT error FROM rejections ORDER BY id")]
    assert errors == [case["expect"]["error"] for case in cases("bad")]


def test_concurrent_clients_get_one_row_per_unique_event(server, db_path) -> None:
    url = server.url + "/webhooks/enablex"
    requests = [r for flow in flows() for r in flow.wire]

    def send(batch: list) -> list[int]:
        with httpx.Client(timeout=10) as client:
            return [client.post(url, content=r.body, headers=r.headers).status_code for r in batch]

    # Every request sent twice from different clients at once: dedup must hold under races.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = [s for chunk in pool.map(send, [requests[i::4] for i in range(4)] * 2)
                    for s in chunk]
    assert set(statuses) == {200}
    unique = sum(flow.expect["unique_events"] for flow in flows())
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == unique
