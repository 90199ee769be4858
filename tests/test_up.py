"""`callgate up --demo`: the main job starts every part, shows demo data, stops on one signal."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time

import httpx

from gateway.simulate.sender import DEMO_APP_ID, WireOptions, render_request
from tests.conftest import CALLGATE, free_port, server_env, wait_http


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
         "--demo-if-empty"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60, proc=proc)
        wait_http(f"http://127.0.0.1:{ds_port}/", timeout=60, proc=proc)
        deadline = time.monotonic() + 120
        calls = 0
        while time.monotonic() < deadline and calls < 100:
            time.sleep(1)
            try:
                with sqlite3.connect(db) as conn:
                    calls = conn.execute("SELECT count(*) FROM calls").fetchone()[0]
            except sqlite3.OperationalError:
                calls = 0
        assert calls >= 100, "the demo traffic did not reach the calls projection"
        answer = httpx.get(f"http://127.0.0.1:{ds_port}/up/calls.json?_shape=array",
                           timeout=10)
        assert answer.status_code == 200 and len(answer.json()) > 0
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
    assert "demo app id dropped" in output, output[-2000:]
    # Every child is gone with the parent.
    for check_port in (port, ds_port):
        try:
            httpx.get(f"http://127.0.0.1:{check_port}/", timeout=2)
            raise AssertionError(f"port {check_port} still served after stop")
        except httpx.HTTPError:
            pass
