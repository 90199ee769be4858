"""Shared fixtures: a temp database per test, the real Flask app, a real gunicorn server,
and the corpus database served by a real Datasette."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from flask import Flask
from flask.testing import FlaskClient

from gateway.config import Config
from gateway.db import connect
from gateway.log import eventlog, keystore
from gateway.web.app import create_app
from tests.corpus import APP_ID
from tests.servers import Subprocess, free_port, wait_http

if TYPE_CHECKING:  # imported lazily below: test_datasette_helpers imports this module
    from tests.test_datasette_helpers import Built, Datasette

pytest_plugins = ("tests.nats_support",)  # the real NATS cluster fixtures

REPO = Path(__file__).resolve().parent.parent
CALLGATE = str(Path(sys.executable).parent / "callgate")


def dedup_key_of(db: str) -> bytes:
    """The keyed-hash secret of this database's key store: what its event ids are made with."""
    conn = connect(db)
    try:
        eventlog.ensure_schema(conn)
        return keystore.for_database(conn).dedup_key
    finally:
        keystore.forget(conn)  # restore refuses files another process holds open
        conn.close()


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
        recorder = app.extensions.get("callgate_recorder")
        if recorder is not None:  # NATS mode: its event-loop thread
            recorder.close()


@pytest.fixture
def client(make_app: Callable[[Config], Flask], config: Config) -> FlaskClient:
    return make_app(config).test_client()


class RunningServer(Subprocess):
    """`callgate serve` as a real subprocess (tests/servers.py: own group, log file)."""

    def __init__(self, db: str, env: dict[str, str], workers: int = 2,
                 log_path: Path | None = None, args: tuple[str, ...] = ()) -> None:
        super().__init__(log_path or Path(db + ".server.log"), env)
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.args = args

    def start(self, healthy: bool = True) -> RunningServer:
        """Start and wait until /healthz answers (200, or anything when not `healthy`)."""
        self.launch(
            [CALLGATE, "serve", "--db", self.db, "--port", str(self.port),
             "--workers", str(self.workers), *self.args],
            lambda: wait_http(self.url + "/healthz", timeout=30, proc=self.proc,
                              any_status=not healthy),
        )
        return self


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
