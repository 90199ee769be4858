"""`callgate up --demo-if-empty` (what `make run` starts on a fresh clone): every part starts,
the demo history of the last 14 days reaches the dashboard (Chromium via Playwright reads
the per-day charts), and one signal stops it all."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from datetime import UTC, datetime, timedelta

import httpx

from gateway.simulate.sender import (
    DEMO_APP_ID,
    DEMO_DAYS,
    DEMO_MARGIN,
    WireOptions,
    render_request,
)
from tests.conftest import CALLGATE, free_port, server_env, wait_http
from tests.helpers_browser import axis_labels, chromium, legend_labels, screenshot, watch_errors

DEMO_CALLS = 300  # lean: the default is 1000, the pattern is the same
PER_DAY_CHARTS = ("calls-per-day", "asr-ner", "acd", "time-to-answer")


def _demo_projected(db: str) -> bool:
    """All demo calls are in `calls`, the 13 whole days before today have their starts,
    and the projector has caught up with the log.

    The day count matters: a call's row exists from its first event, and with reordered
    deliveries that is not always the one that starts it."""
    try:
        with sqlite3.connect(db) as conn:
            calls = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
            days = conn.execute(
                "SELECT count(DISTINCT substr(started_at, 1, 10)) FROM calls"
            ).fetchone()[0]
            head = conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0]
            done = conn.execute(
                "SELECT coalesce(max(seq), 0) FROM checkpoints WHERE name = 'projector'"
            ).fetchone()[0]
    except sqlite3.OperationalError:
        return False
    return calls >= DEMO_CALLS and days >= DEMO_DAYS - 1 and done == head


def test_up_runs_everything_and_one_signal_stops_it(tmp_path) -> None:
    db = str(tmp_path / "up.db")
    port, ds_port = free_port(), free_port()
    env = server_env()
    env.pop("ENABLEX_APP_ID")
    headers, body = render_request(
        {"voice_id": "after-demo-1", "state": "connected", "timestamp": "2024-03-20T10:00:00Z"},
        WireOptions(app_id=DEMO_APP_ID),
    )
    proc = subprocess.Popen(
        [CALLGATE, "up", "--db", db, "--port", str(port), "--datasette-port", str(ds_port),
         "--demo-if-empty", "--demo-calls", str(DEMO_CALLS)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=proc)
        wait_http(f"http://127.0.0.1:{ds_port}/", timeout=60, proc=proc)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and not _demo_projected(db):
            time.sleep(1)
        assert _demo_projected(db), "the demo traffic did not reach the calls projection"
        answer = httpx.get(f"http://127.0.0.1:{ds_port}/up/calls.json?_shape=array",
                           timeout=10)
        assert answer.status_code == 200 and len(answer.json()) > 0
        now = datetime.now(UTC)
        days = [(now - DEMO_MARGIN - timedelta(days=n)).date().isoformat()
                for n in range(13, -1, -1)]  # fmt: skip
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors, failed = watch_errors(page)
            page.goto(f"http://127.0.0.1:{ds_port}/-/dashboards/calls-overview")
            selector = ", ".join(f"#chart-{slug} svg" for slug in PER_DAY_CHARTS)
            page.wait_for_function(
                f"document.querySelectorAll({selector!r}).length >= {len(PER_DAY_CHARTS)}",
                timeout=30_000,
            )
            for slug in PER_DAY_CHARTS:  # 14 days of history on every per-day chart
                labels = axis_labels(page, slug)
                # Today is only DEMO_MARGIN short of now: early in a UTC day it holds a
                # call or two, and a chart of answered calls may have nothing to show yet.
                assert labels in (days, days[:-1]), (slug, labels)
            # Normalised reasons: NO_ANSWER, No Answer and no_answer make one slice.
            reasons = legend_labels(page, "disconnect-mix")
            assert "no_answer" in reasons and "busy" in reasons
            assert len(reasons) == len(set(reasons))
            assert not {"NO_ANSWER", "No Answer", "User Busy"} & set(reasons)
            page.wait_for_timeout(300)  # Vega's last paint
            screenshot(page, "dashboard-demo", docs_name="screenshot-dashboard.png")
            assert errors == [] and failed == [], (errors, failed)
        # Once the demo is played, its app id (public: it is in the source) opens nothing.
        deadline = time.monotonic() + 120
        status = 200
        while time.monotonic() < deadline and status == 200:
            try:
                status = httpx.post(f"http://127.0.0.1:{port}/webhooks/enablex",
                                    content=body, headers=headers, timeout=5).status_code
            except httpx.HTTPError:
                status = 200  # restarting: try again
            time.sleep(0.5)
        assert status == 400, "the gateway still accepts the demo app id after the demo"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == 0, output[-2000:]
    sent = re.search(r"demo traffic sent \((\d+) of (\d+) webhooks accepted\)", output)
    assert sent and sent.group(1) == sent.group(2), output[-2000:]
    assert "demo app id dropped" in output, output[-2000:]
    # Every child is gone with the parent.
    for check_port in (port, ds_port):
        try:
            httpx.get(f"http://127.0.0.1:{check_port}/", timeout=2)
            raise AssertionError(f"port {check_port} still served after stop")
        except httpx.HTTPError:
            pass


def test_up_nats_runs_a_cluster_two_gateways_and_archivers(tmp_path) -> None:
    db = str(tmp_path / "up.db")
    port, ds_port = free_port(), free_port()
    while port + 1 == ds_port:
        ds_port = free_port()
    proc = subprocess.Popen(
        [CALLGATE, "up", "--nats", "--db", db, "--port", str(port),
         "--datasette-port", str(ds_port), "--no-forward"],
        env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for gateway in (port, port + 1):
            wait_http(f"http://127.0.0.1:{gateway}/healthz", timeout=60, proc=proc)
        assert httpx.get(f"http://127.0.0.1:{port + 1}/healthz").json()["log"] == "nats"
        event = {"voice_id": "up-nats-1", "state": "incomingcall",
                 "timestamp": "2026-12-01T10:00:00.000Z"}
        answer = httpx.post(f"http://127.0.0.1:{port + 1}/webhooks/enablex", json=event)
        assert answer.status_code == 200, answer.text
        deadline = time.monotonic() + 60
        calls = 0
        while time.monotonic() < deadline and not calls:
            time.sleep(0.5)
            try:
                with sqlite3.connect(db) as conn:
                    calls = conn.execute(
                        "SELECT count(*) FROM calls WHERE voice_id = 'up-nats-1'").fetchone()[0]
            except sqlite3.OperationalError:
                calls = 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    # Judged after stopping up, so a failure shows what up, the archivers and NATS printed.
    assert calls == 1, "the event did not reach the archive and the calls projection\n" + (
        output[-4000:]
    )
    assert proc.returncode == 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    for check_port in (port, port + 1, ds_port):
        try:
            httpx.get(f"http://127.0.0.1:{check_port}/", timeout=2)
            raise AssertionError(f"port {check_port} still served after stop")
        except httpx.HTTPError:
            pass
