"""Online backups and verified restores of the event log and its companion files.

A copy is only as good as its check: every copy made or taken in here passes
`integrity_check` and a walk of the hash chain before anyone is told it is good.
A restore builds the new file beside the database and puts it in place with one
rename, so the database path always holds either the old file or the new one,
whole — never a half-written mixture.

Companions are the other SQLite files an installation needs to come back whole
(the forwarding secrets, the key store): the CLI names them, so this module does
not import the forwarder's or the key store's code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.log import eventlog

# The log's own columns: a file without them is not a callgate database.
EVENT_COLUMNS = frozenset((*eventlog.HASHED_COLUMNS, "prev_hash", "hash"))


class BackupError(Exception):
    """A refusal or failure worded for the operator (the CLI prints it and exits 1)."""


@dataclass(frozen=True)
class Checked:
    """A copy that passed every check: what it holds, to print and to anchor elsewhere."""

    path: str
    events: int
    head_seq: int
    head_hash: str
    files: tuple[str, ...] = ()  # what was copied: "log" and the companions found


def companion_file(path: str, name: str) -> str:
    """`backup.db` → `backup.secrets.db`: where a companion's copy sits beside the log's."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{name}{p.suffix or '.db'}"))


def _connect(path: str, timeout: float = 5.0) -> sqlite3.Connection:
    """A plain connection that changes nothing about the file (no journal-mode switch)."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def _integrity(conn: sqlite3.Connection, label: str) -> None:
    rows = [row[0] for row in conn.execute("PRAGMA integrity_check(5)")]
    if rows != ["ok"]:
        raise BackupError(f"{label}: integrity_check failed: {'; '.join(rows)}")


def check_log(path: str, label: str | None = None) -> Checked:
    """Refuse anything but an intact callgate log: SQLite, structurally sound, chain holds."""
    label = label or path
    if not Path(path).is_file():
        raise BackupError(f"{label}: no such file")
    try:
        conn = _connect(path)
        try:
            _integrity(conn, label)
            columns = {row["name"] for row in conn.execute("PRAGMA table_info(events)")}
            if not columns >= EVENT_COLUMNS:
                raise BackupError(f"{label}: not a callgate database (no event log in it)")
            result = eventlog.verify(conn)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{label}: not a readable SQLite database ({exc})") from None
    if not result.ok:
        raise BackupError(
            f"{label}: hash chain broken at seq {result.first_bad_seq}: {result.reason} "
            f"({result.checked} events verified before it)"
        )
    return Checked(path, result.checked, result.head_seq, result.head_hash)


def check_plain(path: str, label: str | None = None) -> None:
    """A companion file: any SQLite database that passes integrity_check."""
    label = label or path
    try:
        conn = _connect(path)
        try:
            _integrity(conn, label)
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{label}: not a readable SQLite database ({exc})") from None


def _copy(source: str, target: str) -> None:
    """SQLite's online backup, all pages in one step: one read transaction on the source,
    so the copy is one consistent snapshot while writers go on committing (WAL). The copy
    is switched to a rollback journal so it is one self-contained file."""
    try:
        src = _connect(source)
        dst = _connect(target)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
            src.close()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{source}: not a readable SQLite database ({exc})") from None
    _fsync(target)


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        _fsync(str(Path(path).parent))


@contextlib.contextmanager
def _temp_beside(path: str) -> Iterator[str]:
    """An empty private (0600) file in `path`'s directory, so os.replace is a rename and
    no copy of personal data or secrets is ever readable by others; removed with its
    SQLite side files unless it was moved into place."""
    directory = Path(path).resolve().parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{Path(path).name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield temp
    finally:
        for leftover in (temp, temp + "-journal", temp + "-wal", temp + "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)


def backup(db: str, dest: str, force: bool = False,
           companions: Mapping[str, str] | None = None) -> Checked:
    """Copy the live log to `dest` (and each existing companion beside it), verified first.

    Nothing is written at `dest` until the copy has passed its checks; an existing
    `dest` is refused unless `force`.
    """
    if not Path(db).is_file():
        raise BackupError(f"{db}: no such database")
    targets = {dest: db}
    names = ["log"]
    for name, path in (companions or {}).items():
        if Path(path).is_file():
            targets[companion_file(dest, name)] = path
            names.append(name)
    if not force:
        existing = [target for target in targets if Path(target).exists()]
        if existing:
            raise BackupError(f"{existing[0]} exists; pass --force to overwrite it")
    checked: Checked | None = None
    for target, source in targets.items():
        with _temp_beside(target) as temp:
            _copy(source, temp)
            if source == db:
                checked = check_log(temp, label=f"copy of {db}")
                checked = Checked(target, checked.events, checked.head_seq, checked.head_hash,
                                  tuple(names))
            else:
                check_plain(temp, label=f"copy of {source}")
            os.replace(temp, target)
            _fsync_dir(target)
    assert checked is not None
    return checked


def has_content(path: str) -> bool:
    """Whether replacing `path` would throw something away: events or rejections in a log,
    a row in any table of another SQLite file, or a file that is not SQLite at all."""
    p = Path(path)
    if not p.exists() or p.stat().st_size == 0:
        return False
    try:
        conn = _connect(path)
        try:
            tables = [row[0] for row in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name NOT LIKE 'sqlite_%' AND name NOT LIKE '_litestream_%'"
            )]
            if "events" in tables:  # a log's projections and cursors are rebuilt from it
                tables = [name for name in tables if name in ("events", "rejections")]
            return any(
                conn.execute(f'SELECT 1 FROM "{name}" LIMIT 1').fetchone() for name in tables
            )
        finally:
            conn.close()
    except sqlite3.DatabaseError:
        return True


def _retire(path: str) -> None:
    """Fold the old file's WAL into it and leave rollback-journal mode, so no stale `-wal`
    can be replayed onto the file that replaces it. This needs the only connection: a
    running callgate (or Litestream) on the file makes it fail, and the restore stops."""
    if not Path(path).exists():
        return
    try:
        conn = _connect(path, timeout=1.0)
        try:
            # Leaving WAL mode checkpoints everything and needs the only connection.
            mode = conn.execute("PRAGMA journal_mode=DELETE").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.OperationalError:
        mode = "busy"
    except sqlite3.DatabaseError:
        return  # not SQLite at all (--force): nothing of it to fold in
    if mode.lower() != "delete":
        raise BackupError(
            f"{path} is in use (a running callgate or Litestream?): stop it, then restore"
        )
    # Litestream's local state describes the file being replaced, not its successor.
    shutil.rmtree(Path(path).with_name(f".{Path(path).name}-litestream"), ignore_errors=True)


@dataclass(frozen=True)
class Source:
    """One file to restore: where its copy comes from and where it goes."""

    name: str  # "log" or a companion's name
    target: str
    fetch: Callable[[str], bool]  # writes the copy to the given temp path; False: none there


def restore(sources: list[Source], force: bool = False) -> Checked:
    """Fetch every copy beside its target, check them all, then rename each into place.

    The log's source comes first; a companion whose source has no copy is skipped. Every
    copy is checked before any target is looked at; a non-empty target is then refused
    unless `force`, and left exactly as it was.
    """
    with contextlib.ExitStack() as stack:
        ready: list[tuple[Source, str]] = []
        checked: Checked | None = None
        for source in sources:
            temp = stack.enter_context(_temp_beside(source.target))
            if not source.fetch(temp) or not Path(temp).stat().st_size:
                if source.name == "log":
                    raise BackupError("no copy of the log found")
                continue
            os.chmod(temp, 0o600)  # Litestream writes its restore with the umask's mode
            if source.name == "log":
                checked = check_log(temp, label="backup")
            else:
                check_plain(temp, label=f"backup of the {source.name} file")
            ready.append((source, temp))
        assert checked is not None
        if not force:  # only once the copies are known good: a bad backup is named first
            for source, _temp in ready:
                if has_content(source.target):
                    raise BackupError(
                        f"{source.target} is not empty; pass --force to replace it "
                        "(take a `callgate backup` of it first)"
                    )
        for source, _temp in ready:
            _retire(source.target)
        for source, temp in ready:
            _fsync(temp)
            os.replace(temp, source.target)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(source.target + "-shm")
            _fsync_dir(source.target)
        return Checked(sources[0].target, checked.events, checked.head_seq, checked.head_hash,
                       tuple(source.name for source, _temp in ready))


def from_file(path: str) -> Callable[[str], bool]:
    """A `Source.fetch` copying a backup file (online-safe, even if it is in WAL mode)."""

    def fetch(temp: str) -> bool:
        if not Path(path).is_file():
            return False
        _copy(path, temp)
        return True

    return fetch
