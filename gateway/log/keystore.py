"""The key store: per-call data keys, kept outside the database Datasette serves.

Personal fields of every call are sealed with that call's own AES-256-GCM data
key (gateway/log/sealing.py). The keys live in a separate SQLite file
(`CALLGATE_KEYS_DB`, default `callgate-keys.db` beside the main database,
mode 0600), optionally wrapped by a master key from the environment
(`CALLGATE_MASTER_KEY`, 32 bytes in base64). Destroying a call's key is how a
call is erased: the immutable log keeps its sealed bytes, which nobody can
open any more (crypto-shredding).

The store also holds the index secret behind the keyed hashes: dedup hashes of
events (no unkeyed hash of personal data anywhere) and one keyed tag per
phone number and call, so `callgate erase --number` finds the calls of a
number without a plaintext index of numbers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import sqlite3
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config import Config
from gateway.db import utc_now

KEY_BYTES = 32
NONCE_BYTES = 12
STORE_VERSION = 1
_WRAP_AAD = b"callgate-key:"
_CHECK_PLAINTEXT = b"callgate key store check"


class KeyStoreError(RuntimeError):
    """The key store is missing, belongs to another database, or the master key is wrong."""


def parse_master_key(text: str | None) -> bytes | None:
    """`CALLGATE_MASTER_KEY`: 32 bytes as base64 (standard or URL-safe) or 64 hex digits."""
    if text is None or not text.strip():
        return None
    value = text.strip()
    if len(value) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    try:
        key = base64.b64decode(
            value.replace("-", "+").replace("_", "/") + "=" * (-len(value) % 4), validate=True
        )
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise KeyStoreError(
            "CALLGATE_MASTER_KEY must be 32 bytes in base64 or hex "
            "(e.g. `python -c 'import secrets;print(secrets.token_hex(32))'`)"
        )
    return key


def keys_path(db_path: str, explicit: str | None = None) -> str:
    """`CALLGATE_KEYS_DB`, else `callgate-keys.db` beside the main database."""
    if explicit:
        return explicit
    if db_path == ":memory:":
        return ":memory:"
    return str(Path(db_path).resolve().parent / "callgate-keys.db")


def _private_file(path: str) -> None:
    """Create the file 0600 before SQLite writes a single key into it."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    if not Path(path).exists():
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)


class KeyStore:
    """Data keys per unit (a call's voice_id, a broadcast's id, a rejection's id).

    Keys are cached per process (an AESGCM object per unit): sealing and unsealing
    touch the file only for units not seen yet. `epoch` counts erasures; readers
    check it (`refresh`) so a key destroyed by `callgate erase` in another process
    is dropped from their caches too.
    """

    def __init__(self, path: str, master_key: bytes | None = None, *, create: bool = True) -> None:
        self.path = path
        self._wrap = AESGCM(master_key) if master_key is not None else None
        if path != ":memory:":
            if not Path(path).exists() and not create:
                raise KeyStoreError(f"the key store {path} does not exist")
            _private_file(path)
        self.conn = sqlite3.connect(
            path, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.execute("PRAGMA secure_delete=ON")  # destroyed keys leave no bytes behind
        if path != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # a key is durable before its event
        self._lock = threading.RLock()
        self._cache: dict[str, AESGCM | None] = {}
        self._tags: set[tuple[str, str]] = set()  # (number, unit) already tagged
        self._ensure_schema()
        self.store_id, index_secret = self._open_meta()
        self.dedup_key = hmac.new(index_secret, b"dedup", hashlib.sha256).digest()
        self._tag_key = hmac.new(index_secret, b"number", hashlib.sha256).digest()
        self._data_version = self._version()
        self.epoch = self._epoch()

    # -- schema and identity ---------------------------------------------------

    def _ensure_schema(self) -> None:
        self.conn.executescript(
            "BEGIN IMMEDIATE;"
            "CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);"
            "CREATE TABLE IF NOT EXISTS data_keys (unit TEXT PRIMARY KEY, key BLOB NOT NULL,"
            " created_at TEXT NOT NULL);"
            "CREATE INDEX IF NOT EXISTS data_keys_created ON data_keys(created_at);"
            "CREATE TABLE IF NOT EXISTS number_tags (tag BLOB NOT NULL, unit TEXT NOT NULL,"
            " PRIMARY KEY (tag, unit)) WITHOUT ROWID;"
            "CREATE INDEX IF NOT EXISTS number_tags_unit ON number_tags(unit);"
            "CREATE TABLE IF NOT EXISTS shredded (unit TEXT PRIMARY KEY, shredded_at TEXT NOT NULL,"
            " reason TEXT NOT NULL);"
            "COMMIT;"
        )

    def _open_meta(self) -> tuple[str, bytes]:
        """Read (or, in a new store, create) the store id, the wrap check and the index secret."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            meta = dict(self.conn.execute("SELECT name, value FROM meta").fetchall())
            if "store_id" not in meta:
                meta = {
                    "store_id": "ks_" + secrets.token_hex(8),
                    "version": str(STORE_VERSION),
                    "wrapped": "1" if self._wrap else "0",
                }
                meta["check"] = self._wrap_key(_CHECK_PLAINTEXT, meta["store_id"])
                meta["index_secret"] = self._wrap_key(secrets.token_bytes(KEY_BYTES), "index")
                self.conn.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
                meta["epoch"] = "0"
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        store_id = str(meta["store_id"])
        wrapped = str(meta["wrapped"]) == "1"
        if wrapped and self._wrap is None:
            raise KeyStoreError(
                f"the key store {self.path} is wrapped by a master key: set CALLGATE_MASTER_KEY"
            )
        if not wrapped and self._wrap is not None:
            raise KeyStoreError(
                f"the key store {self.path} was created without a master key, "
                "but CALLGATE_MASTER_KEY is set"
            )
        if self._unwrap_key(bytes(meta["check"]), store_id) != _CHECK_PLAINTEXT:
            raise KeyStoreError(f"CALLGATE_MASTER_KEY does not open the key store {self.path}")
        return store_id, self._unwrap_key(bytes(meta["index_secret"]), "index")

    def _wrap_key(self, key: bytes, unit: str) -> bytes:
        if self._wrap is None:
            return key
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._wrap.encrypt(nonce, key, _WRAP_AAD + unit.encode())

    def _unwrap_key(self, stored: bytes, unit: str) -> bytes:
        if self._wrap is None:
            return stored
        try:
            return self._wrap.decrypt(
                stored[:NONCE_BYTES], stored[NONCE_BYTES:], _WRAP_AAD + unit.encode()
            )
        except InvalidTag:
            raise KeyStoreError(
                f"CALLGATE_MASTER_KEY does not open the key store {self.path}"
            ) from None

    def _version(self) -> int:
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    def _epoch(self) -> int:
        row = self.conn.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self.conn.close()

    # -- keyed hashes ------------------------------------------------------------

    def number_tag(self, number: str) -> bytes:
        """HMAC of a phone number's digits: equal numbers match, nobody can reverse it."""
        return hmac.digest(self._tag_key, number.encode(), "sha256")[:16]

    # -- data keys -----------------------------------------------------------------

    def refresh(self) -> None:
        """Drop cached keys if another process erased any since we last looked (cheap:
        one PRAGMA unless the store changed)."""
        with self._lock:
            version = self._version()
            if version == self._data_version:
                return
            self._data_version = version
            epoch = self._epoch()
            if epoch != self.epoch:
                self.epoch = epoch
                self._cache.clear()
                self._tags.clear()

    def cipher(self, unit: str) -> AESGCM | None:
        """The unit's data key for opening; None when it was destroyed (or never made)."""
        try:
            return self._cache[unit]
        except KeyError:
            pass
        with self._lock:
            row = self.conn.execute("SELECT key FROM data_keys WHERE unit = ?", (unit,)).fetchone()
            cipher = AESGCM(self._unwrap_key(bytes(row[0]), unit)) if row else None
            if cipher is not None:
                self._cache[unit] = cipher
            return cipher

    def preload(self) -> None:
        """Every live key into the cache in one read (a rebuild opens every call)."""
        with self._lock:
            for unit, key in self.conn.execute("SELECT unit, key FROM data_keys"):
                if unit not in self._cache:
                    self._cache[unit] = AESGCM(self._unwrap_key(bytes(key), unit))

    def ensure(
        self, units: Mapping[str, Iterable[str]], created_at: str
    ) -> dict[str, AESGCM | None]:
        """Sealing keys for these units (made when new), recording each unit's numbers as
        keyed tags. One transaction (one fsync) for everything not cached yet, none when
        all is known. A shredded unit gets None: its personal fields are not stored."""
        result: dict[str, AESGCM | None] = {}
        missing: list[str] = []
        new_tags: list[tuple[str, str]] = []
        for unit, numbers in units.items():
            cipher = self._cache.get(unit)
            if cipher is None:
                missing.append(unit)
            else:
                result[unit] = cipher
            for number in numbers:
                if (number, unit) not in self._tags:
                    new_tags.append((number, unit))
        if not missing and not new_tags:
            return result
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                marks = ",".join("?" * len(missing))
                shredded = (
                    {
                        row[0]
                        for row in self.conn.execute(
                            f"SELECT unit FROM shredded WHERE unit IN ({marks})", missing
                        )
                    }
                    if missing
                    else set()
                )
                fresh = [u for u in missing if u not in shredded]
                # One read of the OS generator for all new keys (each read releases the GIL).
                material = os.urandom(KEY_BYTES * len(fresh))
                minted = {
                    u: material[i * KEY_BYTES : (i + 1) * KEY_BYTES] for i, u in enumerate(fresh)
                }
                inserted = 0
                if fresh:
                    inserted = self.conn.executemany(
                        "INSERT OR IGNORE INTO data_keys (unit, key, created_at) VALUES (?, ?, ?)",
                        [(u, self._wrap_key(key, u), created_at) for u, key in minted.items()],
                    ).rowcount
                live_tags = [t for t in new_tags if t[1] not in shredded]
                if live_tags:
                    self.conn.executemany(
                        "INSERT OR IGNORE INTO number_tags (tag, unit) VALUES (?, ?)",
                        [(self.number_tag(number), unit) for number, unit in live_tags],
                    )
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            self._tags.update(live_tags)
            # Every key ours (the usual case): no need to read back what another process
            # may have minted first for the same unit.
            ours = inserted == len(fresh)
            for unit in missing:
                if unit in shredded:
                    result[unit] = None
                elif ours:
                    result[unit] = self._cache[unit] = AESGCM(minted[unit])
                else:
                    result[unit] = self.cipher(unit)
        return result

    # -- erasure ---------------------------------------------------------------------

    def units_of_number(self, number: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT unit FROM number_tags WHERE tag = ? ORDER BY unit", (self.number_tag(number),)
        )
        return [row[0] for row in rows]

    def units_older_than(self, cutoff: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT unit FROM data_keys WHERE created_at < ? ORDER BY unit", (cutoff,)
        )
        return [row[0] for row in rows]

    def live_units(self, prefix: str) -> list[str]:
        rows = self.conn.execute(
            "SELECT unit FROM data_keys WHERE unit >= ? AND unit < ? ORDER BY unit",
            (prefix, prefix + "\U0010ffff"),
        )
        return [row[0] for row in rows]

    def destroy(self, units: Iterable[str], reason: str, at: str) -> int:
        """Delete these keys and their number tags (secure_delete zeroes their pages;
        `erasure.scrub` of `conn` afterwards empties the WAL and the free pages too).

        The units are remembered as shredded, so a late redelivery of the call does not
        mint a new key and store its personal fields again."""
        todo = sorted(set(units))
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                keys = [(u,) for u in todo]
                self.conn.executemany("DELETE FROM data_keys WHERE unit = ?", keys)
                self.conn.executemany("DELETE FROM number_tags WHERE unit = ?", keys)
                self.conn.executemany(
                    "INSERT OR IGNORE INTO shredded (unit, shredded_at, reason) VALUES (?, ?, ?)",
                    [(u, at, reason) for u in todo],
                )
                self.conn.execute(
                    "INSERT INTO meta (name, value) VALUES ('epoch', '1') ON CONFLICT(name) "
                    "DO UPDATE SET value = CAST(value AS INTEGER) + 1"
                )
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
            for unit in todo:
                self._cache.pop(unit, None)
            gone = set(todo)
            self._tags = {t for t in self._tags if t[1] not in gone}
            self.epoch = self._epoch()
            self._data_version = self._version()
        return len(todo)



# -- one store per database and process ---------------------------------------------

_OPEN: dict[tuple[int, str], KeyStore] = {}
_OPEN_LOCK = threading.Lock()


def database_file(conn: sqlite3.Connection) -> str:
    """The main database's file ('' for an in-memory or temporary database)."""
    for _, name, path in conn.execute("PRAGMA database_list").fetchall():
        if name == "main":
            return str(path or "")
    return ""


def bound_store(conn: sqlite3.Connection) -> str | None:
    """The id of the key store this database's events are sealed with (None: not yet)."""
    try:
        row = conn.execute("SELECT store_id FROM key_store LIMIT 1").fetchone()
    except sqlite3.OperationalError:  # a log older than sealing (schema < 3)
        return None
    return str(row[0]) if row else None


def open_store(conn: sqlite3.Connection, config: Config) -> KeyStore:
    """Open the key store for the database `conn` is on, and check they belong together.

    A database whose events were sealed refuses to run without its key store (missing
    file, another database's store, a wrong or missing master key): sealing never
    silently falls back to plaintext, and a fresh store would seal new events with keys
    nobody can match to the old ones. A database that never sealed anything gets a
    new store, bound to it here."""
    path = database_file(conn)
    location = keys_path(path or ":memory:", config.keys_db)
    bound = bound_store(conn)
    if bound is not None and location != ":memory:" and not Path(location).exists():
        raise KeyStoreError(
            f"the key store {location} does not exist, but this database's events are "
            f"sealed with key store {bound}: restore it (or set CALLGATE_KEYS_DB to it)"
        )
    store = KeyStore(location, parse_master_key(config.master_key))
    if bound is not None and bound != store.store_id:
        store.close()
        raise KeyStoreError(
            f"the key store {location} is {store.store_id}, but this database's events are "
            f"sealed with {bound}: CALLGATE_KEYS_DB points at another database's keys"
        )
    if bound is None:
        try:
            conn.execute(
                "INSERT OR IGNORE INTO key_store (store_id, bound_at) VALUES (?, ?)",
                (store.store_id, utc_now()),
            )
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
    return store


def for_database(conn: sqlite3.Connection, config: Config | None = None) -> KeyStore:
    """The process's key store for this database (opened, checked and cached on first use).

    Entry points call it with their Config at start-up, so a bad key store stops them
    there; the log, the projector and the forwarder then find it by the database file.
    An in-memory database gets an in-memory store of its own."""
    path = database_file(conn)
    cache_key = (os.getpid(), path or f":memory:{id(conn)}")
    store = _OPEN.get(cache_key)
    if store is not None:
        return store
    with _OPEN_LOCK:
        store = _OPEN.get(cache_key)
        if store is None:
            store = open_store(conn, config or Config.from_env(path or None))
            _OPEN[cache_key] = store
    return store


def forget(conn: sqlite3.Connection) -> None:
    """Close and drop the cached store of this database (tests that replace the file)."""
    path = database_file(conn)
    store = _OPEN.pop((os.getpid(), path or f":memory:{id(conn)}"), None)
    if store is not None:
        store.close()
