"""Slow and abusive clients must not stall EnableX's deliveries.

EnableX gives up on a webhook after about 5 s. A sender that opens connections
and then says nothing, trickles its headers, or trickles its body must not be
able to use up the gateway's worker threads or connection slots so that
genuine deliveries go unanswered. Each test holds slow connections open
against a real `callgate serve` (2 workers x 12 threads, the defaults) while
ordinary webhooks are sent, and requires every ordinary webhook to be answered
200 within EnableX's 5 s.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, closing

import httpx
import pytest

from tests.conftest import RunningServer, server_env

ENABLEX_PATIENCE = 5.0  # seconds EnableX waits for an answer
HEAD = b"POST /webhooks/enablex HTTP/1.1\r\nHost: callgate\r\nContent-Type: application/json\r\n"


class Slowloris:
    """`count` connections that send `opening`, then one more byte every `interval` seconds."""

    def __init__(self, port: int, count: int, opening: bytes, drip: bytes | None) -> None:
        self.port, self.count, self.opening, self.drip = port, count, opening, drip
        self.socks: list[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)

    def __enter__(self) -> Slowloris:
        for _ in range(self.count):
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            if self.opening:
                sock.sendall(self.opening)
            self.socks.append(sock)
        self.thread.start()
        time.sleep(0.5)  # let the workers pick them up
        return self

    def _trickle(self) -> None:
        while not self.stop.wait(0.5):
            for sock in self.socks:
                if self.drip:
                    with contextlib.suppress(OSError):  # the server may hang up: allowed
                        sock.sendall(self.drip)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for sock in self.socks:
            sock.close()


def normal_traffic(url: str, count: int, tag: str) -> list[tuple[int | str, float]]:
    """Ordinary webhooks sent concurrently: (status or error, seconds) each."""
    def one(n: int) -> tuple[int | str, float]:
        started = time.perf_counter()
        body = json.dumps({"voice_id": f"{tag}-{n}", "state": "ringing"})
        try:
            with httpx.Client(timeout=ENABLEX_PATIENCE) as client:
                answer = client.post(url + "/webhooks/enablex", content=body,
                                     headers={"Content-Type": "application/json"})
            return answer.status_code, time.perf_counter() - started
        except httpx.HTTPError as exc:
            return type(exc).__name__, time.perf_counter() - started

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def assert_served(results: list[tuple[int | str, float]], what: str) -> None:
    late = [(status, round(seconds, 2)) for status, seconds in results
            if status != 200 or seconds > ENABLEX_PATIENCE]
    worst = max(seconds for _, seconds in results)
    print(f"\n{what}: {len(results) - len(late)}/{len(results)} ordinary webhooks answered "
          f"in time (slowest {worst:.2f}s)")
    assert not late, f"{what}: not answered within {ENABLEX_PATIENCE}s: {late}"


def test_a_few_slow_senders_leave_the_gateway_serving(server: RunningServer) -> None:
    """Fewer slow connections than threads: the rest keep serving and nothing crashes."""
    with Slowloris(server.port, 4, HEAD, b"X"), Slowloris(
        server.port, 2, HEAD + b"Content-Length: 500\r\n\r\n{", b" "
    ):
        assert_served(normal_traffic(server.url, 10, "few"), "4 header + 2 body tricklers")
    assert_served(normal_traffic(server.url, 5, "after"), "after they left")
    assert server.proc is not None and server.proc.poll() is None


SLOW_CASES = {
    # 60 connections trickling header bytes: more than the 24 request threads.
    "headers trickled": (60, HEAD, b"X-Pad: 1\r\n"),
    # 60 requests whose declared body never finishes arriving.
    "body trickled": (60, HEAD + b"Content-Length: 100000\r\n\r\n{", b" "),
    # 250 connections that never send a byte: more than 2 x worker_connections (100).
    # Opened and closed without a byte, these even wedge the workers for good (gunicorn#2917).
    "idle connections": (250, b"", None),
}


@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_many_slow_connections_do_not_stall_ordinary_webhooks(server: RunningServer,
                                                              case: str) -> None:
    count, opening, drip = SLOW_CASES[case]
    with ExitStack() as stack:
        stack.enter_context(Slowloris(server.port, count, opening, drip))
        results = normal_traffic(server.url, 10, case.split()[0])
    # Whatever happened under attack, the gateway must be whole once the attackers leave.
    with closing(socket.create_connection(("127.0.0.1", server.port), timeout=5)):
        pass
    assert_served(normal_traffic(server.url, 5, "after-" + case.split()[0]), "after " + case)
    assert_served(results, f"{count} slow connections ({case})")


def _closed_after(port: int, payload: bytes, limit: float) -> float | None:
    """Seconds until the server hangs up on a connection that sent only `payload`."""
    started = time.monotonic()
    with closing(socket.create_connection(("127.0.0.1", port), timeout=limit)) as sock:
        if payload:
            sock.sendall(payload)
        try:
            while sock.recv(4096):
                pass
        except TimeoutError:
            return None
    return time.monotonic() - started


def test_serve_deadlines_are_set_from_the_command_line(db_path: str) -> None:
    """`--idle-timeout 1 --read-timeout 1`: both kinds of stalled connection go early.

    The idle sweep runs about once a second, so a silent connection goes within ~2 s
    (default: 5 s); a half-sent request is cut at its 1 s read deadline (default: 3 s).
    """
    running = RunningServer(
        db_path, server_env(), args=("--idle-timeout", "1", "--read-timeout", "1")
    ).start()
    try:
        silent = _closed_after(running.port, b"", limit=4.5)
        half_sent = _closed_after(running.port, HEAD, limit=4.5)
        assert silent is not None and silent < 3.5, silent
        assert half_sent is not None and half_sent < 2.5, half_sent
        assert_served(normal_traffic(running.url, 5, "deadlines"), "after both were closed")
    finally:
        running.stop()
