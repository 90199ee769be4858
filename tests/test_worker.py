"""gateway.web.worker: the read deadline in isolation, and the first-byte sweep on a real server."""

from __future__ import annotations

import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest
from gunicorn.config import Config
from gunicorn.glogging import Logger

import gateway.web.worker
from gateway.web.worker import (
    BodyTimedOut,
    CallgateThreadWorker,
    DeadlineReader,
    HeadersTimedOut,
)
from tests.conftest import server_env


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    with closing(ours), closing(theirs):
        yield ours, theirs


def test_buffered_bytes_are_read_even_after_the_deadline(pair) -> None:
    """A complete request that queued for a thread past its deadline is still served."""
    ours, theirs = pair
    reader = DeadlineReader(ours)
    reader.start(0.0)
    theirs.sendall(b"GET / HTTP/1.1\r\n\r\n")
    time.sleep(0.05)
    assert reader.recv(8192) == b"GET / HTTP/1.1\r\n\r\n"
    assert not reader.expired


def test_waiting_stops_at_the_deadline(pair) -> None:
    ours, theirs = pair
    reader = DeadlineReader(ours)
    reader.start(0.3)
    theirs.sendall(b"POST / HTTP/1.1\r\n")
    assert reader.recv(8192) == b"POST / HTTP/1.1\r\n"
    started = time.monotonic()
    with pytest.raises(HeadersTimedOut):
        reader.recv(8192)
    assert 0.1 < time.monotonic() - started < 1.0
    assert reader.expired


def test_a_body_timeout_inside_the_app_is_a_408(pair) -> None:
    ours, _ = pair
    reader = DeadlineReader(ours)
    reader.start(0.05)
    reader.in_app = True
    with pytest.raises(BodyTimedOut) as caught:
        reader.recv(8192)
    assert caught.value.code == 408


def test_reader_delegates_to_the_socket(pair) -> None:
    ours, _ = pair
    assert DeadlineReader(ours).fileno() == ours.fileno()


SERVE = """
import sys
from gateway.web.server import ServeOptions, serve
serve(ServeOptions(port=int(sys.argv[2]), workers=1, threads=2, worker_connections=10,
                   first_byte_timeout=1.0), sys.argv[1])
"""


def _free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_silent_connections_are_reaped_so_the_cap_cannot_wedge(tmp_path: Path) -> None:
    """gunicorn#2917: at worker_connections the stock worker stops polling for good.

    Here a single worker with a cap of 10 gets 30 connections that never send a byte
    (some closed, some left open); the first-byte sweep frees the slots.
    """
    port = _free_port()
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", SERVE, str(tmp_path / "db"), str(port)],
                                env=server_env(), stdout=log, stderr=log,
                                cwd=Path(__file__).resolve().parent.parent)
    try:
        url = f"http://127.0.0.1:{port}/healthz"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(30)]
        for sock in silent[::2]:
            sock.close()
        started = time.monotonic()
        assert httpx.get(url, timeout=5).status_code == 200
        waited = time.monotonic() - started
        print(f"\nanswered past 30 silent connections (cap 10) in {waited:.2f}s")
        # Those left open are hung up on by the server after the first-byte deadline.
        assert all(sock.recv(1) == b"" for sock in silent[1::2])
        for sock in silent[1::2]:
            sock.close()
    finally:
        proc.terminate()
        proc.wait(20)


def _worker(threads: int) -> CallgateThreadWorker:
    """A real worker object, set up as `init_process` would, without forking or serving."""
    cfg = Config()
    cfg.set("threads", threads)
    worker = CallgateThreadWorker(1, os.getpid(), [], None, 30, cfg, Logger(cfg))
    worker.poller = selectors.DefaultSelector()
    worker._lock = threading.RLock()
    return worker


def test_a_worker_with_a_connection_per_thread_lets_an_idle_one_accept_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both workers poll one listening socket and are woken for the same connection:
    the one already holding a connection per thread waits, so the idle one gets it.
    Without this, keep-alive senders pile onto whichever worker woke first.
    The wait is lengthened so a loaded test machine cannot reorder the two."""
    monkeypatch.setattr(gateway.web.worker, "ACCEPT_YIELD_SECONDS", 0.5)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    busy, idle = _worker(threads=2), _worker(threads=2)
    busy.nr_conns = 2
    with closing(listener), closing(socket.create_connection(listener.getsockname())):
        time.sleep(0.05)  # the connection is waiting in the backlog
        contender = threading.Thread(target=busy.accept, args=(None, listener))
        contender.start()  # woken first, but waits ACCEPT_YIELD_SECONDS
        time.sleep(0.05)
        idle.accept(None, listener)
        contender.join()
        assert (idle.nr_conns, busy.nr_conns) == (1, 2)
        for worker in (busy, idle):
            for conn in list(worker._keep):
                conn.sock.close()
            worker.poller.close()


def test_yielding_to_other_workers_is_budgeted_per_second() -> None:
    """A flood of new connections must not keep a loaded worker's event loop asleep:
    it yields for at most ACCEPT_YIELD_BUDGET of each second, then accepts at once."""
    worker = _worker(threads=2)
    worker.nr_conns = 2
    yields = 0
    while worker._may_yield():
        yields += 1
        assert yields < 10_000
    allowed = gateway.web.worker.ACCEPT_YIELD_BUDGET / gateway.web.worker.ACCEPT_YIELD_SECONDS
    assert yields == pytest.approx(allowed, abs=1)
    worker.nr_conns = 1
    assert not worker._may_yield()  # below a connection per thread: never waits
    worker.poller.close()
