"""gunicorn's threaded worker with deadlines for slow senders.

The stock `gthread` worker reads a request on a blocking socket with no
timeout, so a client trickling its headers or body pins a request thread for
as long as it likes; and it never expires a connection that has not sent its
first byte, so idle connections fill `worker_connections` (and, once at the
cap, the worker stops polling and wedges for good: gunicorn#2917). EnableX
gives up on a webhook after ~5 s, so both are outages for genuine deliveries.

`CallgateThreadWorker` overrides only what is needed:

* a new connection gets a first-byte deadline and sits in `_keep`, the queue
  the stock `murder_keepalived` sweep already expires, until it is readable;
* a request must arrive completely within `read_timeout` of becoming
  readable: the parser reads through `DeadlineReader`, which only waits for
  more bytes until that deadline. Bytes already buffered are always read, so
  a complete request that merely queued for a thread is never cut off, while
  tricklers that queued past their deadline are dropped at once.
"""

from __future__ import annotations

import contextlib
import errno
import select
import selectors
import socket
import ssl
import time
from functools import partial
from typing import Any

from gunicorn.http.errors import NoMoreData
from gunicorn.workers.gthread import TConn, ThreadWorker
from werkzeug.exceptions import RequestTimeout

DEFAULT_FIRST_BYTE_TIMEOUT = 5.0
DEFAULT_READ_TIMEOUT = 3.0
# How long a worker with a connection per thread waits before taking another one,
# and at most how much of each second it spends so (a connection flood must not turn
# the courtesy into a stalled event loop).
ACCEPT_YIELD_SECONDS = 0.001
ACCEPT_YIELD_BUDGET = 0.05


class HeadersTimedOut(NoMoreData):
    """The request line/headers did not arrive in time.

    A `NoMoreData` so the stock `handle` just closes the connection quietly.
    """


class BodyTimedOut(RequestTimeout):
    """The body did not arrive in time while the app was reading it: the app answers 408."""


class DeadlineReader:
    """The socket as the request parser sees it: `recv` waits no later than `deadline`.

    Everything else is delegated to the real socket; responses are written to
    the real socket directly, so writes are unaffected.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        # TLS sockets refuse recv flags; they keep the poll-then-recv path.
        self._plain = not isinstance(sock, ssl.SSLSocket)
        self.deadline = float("inf")  # time.monotonic() by which the request must be in
        self.in_app = False  # the app is reading the body: a timeout becomes a 408
        self.expired = False

    def start(self, seconds: float) -> None:
        """Arm the deadline for the next request on this connection."""
        self.deadline = time.monotonic() + seconds
        self.in_app = False
        self.expired = False

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if self._plain:
            # One syscall when the bytes are there, the common case: each syscall
            # releases the GIL, and with a dozen request threads a release can cost a
            # thread switch. Only when nothing has arrived yet do we poll and wait.
            try:
                return self.sock.recv(bufsize, flags | socket.MSG_DONTWAIT)
            except BlockingIOError:
                ready = False
        else:
            ready = self._ready(0.0)
        if not ready:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0 or not self._ready(remaining):
                self.expired = True
                if self.in_app:
                    raise BodyTimedOut("the request body did not arrive in time")
                raise HeadersTimedOut()
        return self.sock.recv(bufsize, flags)

    def _ready(self, timeout: float) -> bool:
        """Readable within `timeout` s; poll, not select: fds may exceed FD_SETSIZE."""
        pending = getattr(self.sock, "pending", None)  # TLS may hold decrypted bytes
        if pending is not None and pending():
            return True
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(timeout * 1000))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class CallgateConn(TConn):  # type: ignore[misc]
    """A connection whose parser reads through a `DeadlineReader`."""

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.reader: DeadlineReader | None = None

    def init(self) -> None:
        super().init()
        if self.reader is None:
            # The parser was just built on the (possibly TLS-wrapped) socket: read through us.
            self.reader = DeadlineReader(self.sock)
            self.parser.unreader.sock = self.reader


class CallgateThreadWorker(ThreadWorker):  # type: ignore[misc]
    """`gthread` plus a first-byte deadline and a whole-request read deadline.

    Tuned through class attributes; `gateway.web.server` sets them per worker from
    `ServeOptions` in the `post_worker_init` hook.
    """

    first_byte_timeout: float = DEFAULT_FIRST_BYTE_TIMEOUT
    read_timeout: float = DEFAULT_READ_TIMEOUT
    # (start of the current one-second window, seconds spent yielding in it)
    _yield_window: tuple[float, float] = (0.0, 0.0)

    def accept(self, server: Any, listener: socket.socket) -> None:
        """As stock, but the new connection must send a byte within `first_byte_timeout`,
        and a worker that already has a connection per thread lets a less busy one go first.

        Every worker polls the one shared listening socket, and whichever wakes first
        takes the connection; senders that keep connections alive (EnableX does) would
        otherwise often pile onto one worker, leaving it saturated and the other idle.
        """
        if self._may_yield():
            time.sleep(ACCEPT_YIELD_SECONDS)
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            raise
        conn = CallgateConn(self.cfg, sock, client, server)
        # `murder_keepalived` closes what is in `_keep` past `conn.timeout` (wall clock).
        conn.timeout = time.time() + self.first_byte_timeout
        self.nr_conns += 1
        with self._lock:
            self._keep.append(conn)
            self.poller.register(conn.sock, selectors.EVENT_READ,
                                 partial(self.on_client_socket_readable, conn))

    def _may_yield(self) -> bool:
        """Whether to let other workers take the pending connection first (budgeted)."""
        if self.nr_conns < self.cfg.threads:
            return False
        now = time.monotonic()
        window, spent = self._yield_window
        if now - window >= 1.0:
            window, spent = now, 0.0
        if spent >= ACCEPT_YIELD_BUDGET:
            return False
        self._yield_window = (window, spent + ACCEPT_YIELD_SECONDS)
        return True

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A new connection spoke in time: take it off the first-byte sweep."""
        if not conn.initialized:
            # ValueError: already reaped, nothing to undo.
            with self._lock, contextlib.suppress(ValueError):
                self._keep.remove(conn)
        super().on_client_socket_readable(conn, client)

    def enqueue_req(self, conn: Any) -> None:
        """The clock for the whole request starts when it becomes readable, not at pickup.

        So tricklers that queued behind busy threads are dropped on their first
        wait instead of each pinning a thread for the full `read_timeout`.
        """
        conn.init()
        conn.reader.start(self.read_timeout)
        super().enqueue_req(conn)

    def handle_request(self, req: Any, conn: Any) -> bool:
        conn.reader.in_app = True
        try:
            keepalive: bool = super().handle_request(req, conn)
        finally:
            conn.reader.in_app = False
        return keepalive

    def handle(self, conn: Any) -> tuple[bool, Any]:
        keepalive, conn = super().handle(conn)
        if conn.reader is not None and conn.reader.expired:
            # The rest of a half-read request is still in flight: never reuse the connection.
            self.log.info("Closed %s: request not received within %.1fs",
                          _peer(conn.client), self.read_timeout)
            keepalive = False
        return keepalive, conn


def _peer(client: Any) -> str:
    if isinstance(client, tuple) and len(client) >= 2:
        return f"{client[0]}:{client[1]}"
    return str(client) or "unix socket"
