"""gateway.worker: the read deadline in isolation, and the first-byte sweep on a real server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from gateway.worker import BodyTimedOut, DeadlineReader, HeadersTimedOut
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
from gateway.server import ServeOptions, serve
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
