"""Subscriptions, event-type patterns and the signing-secret store.

Secrets never touch the main database: Datasette publishes that file. They
live in a separate SQLite file (`CALLGATE_SECRETS_DB`, default
`<directory of the main db>/callgate-secrets.db`, mode 0600). A rotation keeps
the previous secret valid for an overlap (24 h by default): during it every
delivery carries one Standard Webhooks signature per valid secret, so the
receiver can switch secrets whenever it likes without refusing a single event.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets as _random
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import httpx
from standardwebhooks import Webhook

from gateway.db import create_private_file, log_head_seq, transaction, utc_now
from gateway.wire.schemas import format_utc

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
MIN_SECRET_BYTES, MAX_SECRET_BYTES = 24, 64  # Standard Webhooks: 24 to 64 bytes of key
DEFAULT_OVERLAP = timedelta(hours=24)
TYPE_PREFIX = "enablex.voice."
_PATTERN = re.compile(r"^[a-z0-9_*?\[\]!-]+(\.[a-z0-9_*?\[\]!-]+)?$")
_TOKEN = re.compile(r"[^a-z0-9_]+")


class SubscriptionError(ValueError):
    """A refused subscription request (bad URL, pattern, secret or unknown id)."""


# --- event types and patterns -------------------------------------------------


def type_token(value: str | None) -> str:
    """A state or class as a CloudEvents type segment: lower-case [a-z0-9_], never empty."""
    if not value:
        return "unknown"
    token = _TOKEN.sub("_", str(value).lower()).strip("_")
    return token or "unknown"


def short_type(event_class: str | None, state: str | None) -> str:
    """`call.connected`: what subscription patterns are matched against."""
    return f"{type_token(event_class)}.{type_token(state)}"


def event_type(event_class: str | None, state: str | None) -> str:
    """`enablex.voice.<class>.<state>`: the CloudEvents `type` attribute."""
    return TYPE_PREFIX + short_type(event_class, state)


def normalise_patterns(patterns: Iterable[str] | None) -> list[str]:
    """Validate and canonicalise patterns; none given means every event (`*`).

    Accepts `call.*`, `play.digitcollected`, `recording.completed`, `*`, a bare
    class (`call` → `call.*`) and the full type (`enablex.voice.call.*`).
    """
    result: list[str] = []
    for pattern in patterns or ():
        for part in str(pattern).split(","):
            text = part.strip().lower()
            if not text:
                continue
            if text.startswith(TYPE_PREFIX):
                text = text[len(TYPE_PREFIX) :]
            if not _PATTERN.match(text):
                raise SubscriptionError(
                    f"bad event pattern {part.strip()!r}: use class.state globs such as "
                    "'call.*', 'play.digitcollected' or '*'"
                )
            if "." not in text and text != "*":
                text += ".*"
            if text not in result:
                result.append(text)
    return result or ["*"]


def matches(patterns: Iterable[str], event_class: str | None, state: str | None) -> bool:
    """Whether an event of this class and state is wanted by any of the patterns."""
    name = short_type(event_class, state)
    return any(fnmatchcase(name, pattern) for pattern in patterns)


# --- secrets ------------------------------------------------------------------


def generate_secret() -> str:
    """A fresh `whsec_` secret: 32 random bytes, base64, as Standard Webhooks recommends."""
    return SECRET_PREFIX + base64.b64encode(_random.token_bytes(SECRET_BYTES)).decode()


def validate_secret(secret: str) -> str:
    """Refuse secrets the receiver's library would decode differently or that are too weak."""
    text = secret.strip()
    if not text.startswith(SECRET_PREFIX):
        raise SubscriptionError("a secret must look like whsec_<base64>")
    body = text[len(SECRET_PREFIX) :]
    try:
        key = base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SubscriptionError(f"secret is not valid base64 after whsec_: {exc}") from None
    if not MIN_SECRET_BYTES <= len(key) <= MAX_SECRET_BYTES:
        raise SubscriptionError(
            f"secret decodes to {len(key)} bytes; Standard Webhooks wants "
            f"{MIN_SECRET_BYTES} to {MAX_SECRET_BYTES}"
        )
    Webhook(text)  # the signing library must accept it too
    return text


def secrets_path(db_path: str, explicit: str | None = None) -> str:
    """`explicit` (Config.secrets_db, from CALLGATE_SECRETS_DB), else `callgate-secrets.db`
    beside the main database: the secrets never live in the file Datasette serves."""
    if explicit:
        return explicit
    return str(Path(db_path).resolve().parent / "callgate-secrets.db")


class SecretStore:
    """The secrets file: one row per secret, `expires_at` set once it has been rotated out."""

    def __init__(self, path: str) -> None:
        self.path = path
        create_private_file(path)  # private before SQLite writes a single secret into it
        self.conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        self.conn.execute("PRAGMA busy_timeout=5000")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS secrets ("
            " id INTEGER PRIMARY KEY,"
            " subscription_id TEXT NOT NULL,"
            " secret TEXT NOT NULL,"
            " created_at TEXT NOT NULL,"
            " expires_at TEXT)"
        )
        self.conn.execute(
            "CREATE INDEX IF NOT EXISTS secrets_subscription ON secrets(subscription_id)"
        )

    def close(self) -> None:
        self.conn.close()

    def add(self, subscription_id: str, secret: str, created_at: str | None = None) -> None:
        self.conn.execute(
            "INSERT INTO secrets (subscription_id, secret, created_at) VALUES (?, ?, ?)",
            (subscription_id, secret, created_at or utc_now()),
        )

    def active(self, subscription_id: str, at: str | None = None) -> list[str]:
        """Secrets that sign now, newest first (the new one leads during an overlap)."""
        rows = self.conn.execute(
            "SELECT secret FROM secrets WHERE subscription_id = ? "
            "AND (expires_at IS NULL OR expires_at > ?) ORDER BY id DESC",
            (subscription_id, at or utc_now()),
        ).fetchall()
        return [row[0] for row in rows]

    def active_map(self, at: str | None = None) -> dict[str, list[str]]:
        """Every subscription's signing secrets in one read (the forwarder's cache)."""
        result: dict[str, list[str]] = {}
        for sub_id, secret in self.conn.execute(
            "SELECT subscription_id, secret FROM secrets "
            "WHERE expires_at IS NULL OR expires_at > ? ORDER BY id DESC",
            (at or utc_now(),),
        ):
            result.setdefault(sub_id, []).append(secret)
        return result

    def rotate(
        self, subscription_id: str, new_secret: str, overlap: timedelta = DEFAULT_OVERLAP
    ) -> str:
        """Add `new_secret`; every still-valid older one expires after `overlap` at the latest."""
        now = datetime.now(UTC)
        expires = format_utc(now + overlap)
        with transaction(self.conn):
            self.conn.execute(
                "UPDATE secrets SET expires_at = ? WHERE subscription_id = ? "
                "AND (expires_at IS NULL OR expires_at > ?)",
                (expires, subscription_id, expires),
            )
            self.add(subscription_id, new_secret, format_utc(now))
        return expires

    def delete(self, subscription_id: str) -> None:
        self.conn.execute("DELETE FROM secrets WHERE subscription_id = ?", (subscription_id,))


# --- subscriptions --------------------------------------------------------------


@dataclass(frozen=True)
class Subscription:
    id: str
    url: str
    patterns: list[str]
    created_at: str
    disabled_at: str | None
    disabled_reason: str | None
    cursor_seq: int

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Subscription:
        return cls(
            id=row["id"],
            url=row["url"],
            patterns=json.loads(row["events"]),
            created_at=row["created_at"],
            disabled_at=row["disabled_at"],
            disabled_reason=row["disabled_reason"],
            cursor_seq=row["cursor_seq"],
        )


def validate_url(url: str) -> str:
    """Only absolute http(s) URLs with a host: anything else could never be delivered."""
    try:
        parsed = httpx.URL(url.strip())
    except (httpx.InvalidURL, TypeError) as exc:
        raise SubscriptionError(f"bad URL {url!r}: {exc}") from None
    if parsed.scheme not in {"http", "https"} or not parsed.host:
        raise SubscriptionError(f"bad URL {url!r}: need an absolute http:// or https:// URL")
    return str(parsed)


def new_subscription_id() -> str:
    return "sub_" + _random.token_hex(8)


def create_subscription(
    conn: sqlite3.Connection,
    store: SecretStore,
    url: str,
    patterns: Iterable[str] | None = None,
    secret: str | None = None,
    from_start: bool = False,
) -> tuple[Subscription, str]:
    """Register a receiver; returns it with its secret (generated when not given).

    A new subscription receives events logged from now on; `from_start` makes
    it receive the whole log (its cursor starts before seq 1).
    """
    clean_url = validate_url(url)
    clean_patterns = normalise_patterns(patterns)
    signing = validate_secret(secret) if secret else generate_secret()
    sub_id = new_subscription_id()
    created = utc_now()
    store.add(sub_id, signing, created)  # secret first: a subscription never lacks one
    try:
        with transaction(conn):
            head = log_head_seq(conn)
            conn.execute(
                "INSERT INTO subscriptions (id, url, events, created_at, cursor_seq) "
                "VALUES (?, ?, ?, ?, ?)",
                (sub_id, clean_url, json.dumps(clean_patterns), created, 0 if from_start else head),
            )
    except BaseException:
        store.delete(sub_id)
        raise
    return get_subscription(conn, sub_id), signing


def get_subscription(conn: sqlite3.Connection, subscription_id: str) -> Subscription:
    row = conn.execute("SELECT * FROM subscriptions WHERE id = ?", (subscription_id,)).fetchone()
    if row is None:
        raise SubscriptionError(f"no subscription {subscription_id!r}")
    return Subscription.from_row(row)


def list_subscriptions(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every subscription with its health (from the `subscription_health` view)."""
    rows = conn.execute("SELECT * FROM subscription_health ORDER BY created_at, id").fetchall()
    return [dict(row) for row in rows]


def disable_subscription(
    conn: sqlite3.Connection, subscription_id: str, reason: str, at: str | None = None
) -> int:
    """Stop deliveries for good: cancel what is still pending. Returns the cancelled count.

    The caller owns the transaction (the forwarder disables inside the one
    that records the 410 answer).
    """
    at = at or utc_now()
    conn.execute(
        "UPDATE subscriptions SET disabled_at = coalesce(disabled_at, ?), "
        "disabled_reason = coalesce(disabled_reason, ?) WHERE id = ?",
        (at, reason, subscription_id),
    )
    cursor = conn.execute(
        "UPDATE deliveries SET status = 'cancelled', claimed_until = NULL, "
        "last_error = coalesce(last_error, ?) WHERE subscription_id = ? AND status = 'pending'",
        (f"subscription disabled: {reason}", subscription_id),
    )
    return cursor.rowcount


def unsubscribe(conn: sqlite3.Connection, store: SecretStore, subscription_id: str) -> int:
    """Disable a subscription (its history stays for Datasette) and forget its secrets."""
    get_subscription(conn, subscription_id)
    with transaction(conn):
        cancelled = disable_subscription(conn, subscription_id, "unsubscribed")
    store.delete(subscription_id)
    return cancelled


def rotate_secret(
    conn: sqlite3.Connection,
    store: SecretStore,
    subscription_id: str,
    secret: str | None = None,
    overlap: timedelta = DEFAULT_OVERLAP,
) -> tuple[str, str]:
    """New signing secret for a live subscription; returns (secret, when the old ones expire)."""
    sub = get_subscription(conn, subscription_id)
    if sub.disabled_at:
        raise SubscriptionError(
            f"subscription {subscription_id} is disabled ({sub.disabled_reason})"
        )
    signing = validate_secret(secret) if secret else generate_secret()
    expires = store.rotate(subscription_id, signing, overlap)
    return signing, expires
