"""Shared fixtures: a temp database per test, the real Flask app, a real gunicorn server,
and the corpus database served by a real Datasette."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.config import Config
from gateway.web.app import create_app
from tests.corpus import APP_ID

if TYPE_CHECKING:  # imported lazily below: test_datasette_helpers imports this module
    from tests.test_datasette_helpers import Built, Datasette

REPO = Path(__file__).resolve().parent.parent
CALLGATE = str(Path(sys.executable).parent / "callgate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "callgate.db")


@pytest.fixture
def config(db_path: str) -> Config:
    return Config(db_path=db_path, app_ids=(APP_ID,))


@pytest.fixture(autouse=True)
def no_writer_threads_left() -> Iterator[None]:
    """Fail a test that leaves a writer or checkpointer thread running. Such a thread may
    hold SQLite locks inside a test's temp database, and a child that a later test forks
    inherits those locks without the thread: it hung in `sqlite3.connect` once in CI."""
    before = set(threading.enumerate())
    yield
    left = [
        t.name
        for t in threading.enumerate()
        if t not in before and t.name.startswith("callgate-") and t.is_alive()
    ]
    assert not left, f"threads left running by the test: {left}"


@pytest.fixture
def make_app() -> Iterator[Callable[[Config], Flask]]:
    """`create_app` for tests that need their own Config. Every app's writer and
    checkpointer threads are stopped on teardown: left running, they would outlive the
    test's temp directory and sit in every process a later test forks."""
    apps: list[Flask] = []

    def make(config: Config) -> Flask:
        apps.append(create_app(config))
        return apps[-1]

    yield make
    for app in apps:
        writer = app.extensions["callgate_writer"]
        if writer is not None:
            writer.close()


@pytest.fixture
def client(make_app: Callable[[Config], Flask], config: Config) -> FlaskClient:
    return make_app(config).test_client()


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None,
              any_status: bool = False) -> None:
    """Until `url` answers below 500 (or at all, with `any_status`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500 or any_status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


class RunningServer:
    """`callgate serve` as a real subprocess in its own process group.

    Its output goes to a file, never to a pipe: a pipe nobody reads fills up and
    blocks the server mid-test.
    """

    def __init__(self, db: str, env: dict[str, str], workers: int = 2,
                 log_path: Path | None = None, args: tuple[str, ...] = ()) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.workers = workers
        self.log_path = log_path or Path(db + ".server.log")
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, healthy: bool = True) -> RunningServer:
        """Start and wait until /healthz answers (200, or anything when not `healthy`)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [CALLGATE, "serve", "--db", self.db, "--port", str(self.port),
                 "--workers", str(self.workers), *self.args],
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_http(self.url + "/healthz", timeout=30, proc=self.proc, any_status=not healthy)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=20)

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if connections keep it from exiting."""
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CALLGATE_", "ENABLEX_"))}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env["ENABLEX_APP_ID"] = APP_ID
    env.update(extra)
    return env


@pytest.fixture
def server(db_path: str) -> Iterator[RunningServer]:
    running = RunningServer(db_path, server_env()).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def built() -> Built:
    """The corpus database built through the real write path, with its reference model
    (tests/test_datasette_helpers.py): built once per test run, read-only for the tests."""
    from tests.test_datasette_helpers import corpus_build

    return corpus_build()


@pytest.fixture(scope="session")
def ds(built: Built) -> Iterator[Datasette]:
    """One real Datasette (started as `callgate datasette` would) serving the corpus
    database, shared by the Datasette, permission and dashboard tests."""
    from tests.test_datasette_helpers import running

    yield from running(built.db)
