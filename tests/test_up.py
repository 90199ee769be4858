"""`callgate up --demo`: the main job starts every part, shows demo data, stops on one signal."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time

import httpx

from tests.conftest import CALLGATE, free_port, server_env, wait_http


def test_up_runs_everything_and_one_signal_stops_it(tmp_path) -> None:
    db = str(tmp_path / "up.db")
    port, ds_port = free_port(), free_port()
    env = server_env()
    env.pop("ENABLEX_APP_ID")
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
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == 0, output[-2000:]
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
        assert calls == 1, "the event did not reach the archive and the calls projection"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        output = proc.communicate(timeout=60)[0].decode(errors="replace")
    assert proc.returncode == 0, output[-2000:]
    assert "Traceback" not in output, output[-3000:]
    for check_port in (port, port + 1, ds_port):
        try:
            httpx.get(f"http://127.0.0.1:{check_port}/", timeout=2)
            raise AssertionError(f"port {check_port} still served after stop")
        except httpx.HTTPError:
            pass
