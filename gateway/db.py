"""The SQLite connection's life: how it is opened, how transactions nest, where the log ends.

Every module that touches the database goes through these, so pragmas,
transaction boundaries and the notion of "the log head" have one owner.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import count
from pathlib import Path

from gateway.wire.schemas import format_utc

GENESIS_HASH = "0" * 64
SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")
# Database files hold raw payloads and personal data: owner only. SQLite gives the -wal
# and -shm files the mode of the database file, so creating that one is enough.
PRIVATE_FILE_MODE = 0o600
_savepoints = count()


def connect(path: str, synchronous: str = "FULL", timeout: float = 5.0) -> sqlite3.Connection:
    """A WAL connection in autocommit mode: callers open explicit transactions."""
    level = synchronous.upper()
    if level not in SYNCHRONOUS:
        raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS)}")
    if path not in ("", ":memory:"):
        create_private_file(path)
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={level}")
    conn.execute(f"PRAGMA busy_timeout={int(timeout * 1000)}")
    return conn


def create_private_file(path: str, mode: int = PRIVATE_FILE_MODE) -> None:
    """Create `path` (and its directory) with `mode` unless it exists. SQLite would create
    a new database 0644 under the usual umask, readable by every local user; an empty
    file is a valid empty database."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        return
    os.close(fd)


@contextmanager
def transaction(conn: sqlite3.Connection, *, immediate: bool = True) -> Iterator[None]:
    """One atomic unit: BEGIN (IMMEDIATE by default, so the write lock is taken up front and
    a busy database fails at the start, not halfway), or a savepoint when the caller already
    holds a transaction, so helpers compose. Rolls back on any exception."""
    if conn.in_transaction:
        name = f"sp_{next(_savepoints)}"
        conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            conn.execute(f"ROLLBACK TO {name}")
            conn.execute(f"RELEASE {name}")
            raise
        conn.execute(f"RELEASE {name}")
        return
    conn.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def log_head(conn: sqlite3.Connection) -> tuple[int, str]:
    """(seq, hash) of the newest event, or (0, genesis) for an empty log."""
    row = conn.execute("SELECT seq, hash FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    return (row[0], row[1]) if row else (0, GENESIS_HASH)


def log_head_seq(conn: sqlite3.Connection) -> int:
    """The newest event's seq (0 for an empty log): what every reader's lag is measured to."""
    row = conn.execute("SELECT seq FROM events ORDER BY seq DESC LIMIT 1").fetchone()
    return row[0] if row else 0


def utc_now() -> str:
    """Now as the contract's fixed-width UTC text, so stored times sort as text."""
    return format_utc(datetime.now(UTC))
