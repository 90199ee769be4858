"""Runtime configuration, read once from the environment so every entry point agrees."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_DB = "data/callgate.db"
DATASETTE_TOKEN_ENV = "CALLGATE_DATASETTE_TOKEN"
MASTER_KEY_ENV = "CALLGATE_MASTER_KEY"
DEFAULT_MAX_BODY = 1024 * 1024  # EnableX events are < 1 kB; refuse megabyte bodies unread.
PUBLIC_PII_ENV = "CALLGATE_PUBLIC_PII"
# What anonymous Datasette visitors get of callers' numbers, digits and speech text
# (analytics/privacy.py): masked forms, nothing, or the cleartext.
PUBLIC_PII_POLICIES = ("masked", "hidden", "full")


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in {"0", "false", "no", "off"}


def _number(value: str | None, kind: type[int] | type[float]) -> Any:
    return kind(value) if value and value.strip() else None


class LogURLError(ValueError):
    """`--log` / CALLGATE_LOG is neither `sqlite` nor `nats://host:port[,host:port…]`."""


_HOST_PORT = re.compile(r"(?:[^@/\s]+@)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9.-]+):(\d{1,5})")


def parse_log_url(value: str | None) -> tuple[str, ...]:
    """`sqlite` (or nothing) → (); `nats://a:4222,b:4222` → each server's URL.

    `tls://` works as NATS clients expect; `user:password@` may precede a host.
    """
    text = (value or "sqlite").strip()
    if text == "sqlite":
        return ()
    scheme = next((s for s in ("nats://", "tls://") if text.startswith(s)), None)
    if scheme is None:
        raise LogURLError("--log must be `sqlite` or nats://host:port[,host:port...]")
    servers = []
    for part in text[len(scheme) :].split(","):
        part = part.strip().removeprefix(scheme)
        match = _HOST_PORT.fullmatch(part)
        if not match or not 0 < int(match.group(2)) < 65536:
            # Never echo the part: it may carry user:password.
            raise LogURLError("each NATS server in --log must be written host:port")
        servers.append(scheme + part)
    return tuple(servers)


def split_app_ids(value: str | None) -> tuple[str, ...]:
    """`ENABLEX_APP_ID=a,b` → ("a", "b"): tried in order when decrypting."""
    if not value:
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


CHECKPOINT_MODES = ("passive", "truncate", "off")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str:
    """`env[name]` lower-cased, one of `choices` (the first when unset)."""
    value = (env.get(name) or choices[0]).strip().lower()
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


@dataclass(frozen=True)
class Config:
    """Everything the gateway needs; tests build one directly instead of patching env."""

    db_path: str = DEFAULT_DB
    app_ids: tuple[str, ...] = ()
    allow_plaintext: bool = True
    webhook_token: str | None = None
    max_body: int = DEFAULT_MAX_BODY
    synchronous: str = "FULL"
    group_commit: bool = True
    # EnableX waits about 5 s for an answer: fail fast with 503 (it redelivers) rather than late.
    busy_timeout: float = 2.0
    # Forwarding and the read side: the same variables whichever command reads them.
    secrets_db: str | None = None
    retry_schedule: str | None = None
    forward_workers: int | None = None
    forward_timeout: float | None = None
    forward_source: str | None = None
    datasette_token: str | None = field(default=None, repr=False)
    # WAL checkpoints by the gateway: passive (default), truncate, or off (see writer.py).
    checkpoint: str = "passive"
    # Sealing and erasure (gateway/log/keystore.py): where the data keys live, the master
    # key that wraps them, and how long a call's personal data is kept.
    keys_db: str | None = None
    master_key: str | None = field(default=None, repr=False)
    retention_days: float | None = None
    public_pii: str = PUBLIC_PII_POLICIES[0]
    # The log backend: `sqlite` (the embedded default) or nats://host:port[,host:port...].
    log: str = field(default="sqlite", repr=False)
    nats_stream: str = "CALLGATE"
    nats_subject_root: str = "enablex"
    nats_replicas: int = 3
    nats_creds: str | None = None
    nats_tls_ca: str | None = None
    nats_tls_cert: str | None = None
    nats_tls_key: str | None = None
    # Under EnableX's ~5 s patience: no PubAck by then answers 503 (EnableX redelivers).
    nats_timeout: float = 2.0
    nats_duplicate_window: float = 24 * 3600.0
    nats_max_age: float = 7 * 24 * 3600.0

    @classmethod
    def from_env(
        cls,
        db_path: str | None = None,
        env: Mapping[str, str] | None = None,
        log: str | None = None,
    ) -> Config:
        env = dict(os.environ if env is None else env)
        return cls(
            db_path=db_path or env.get("CALLGATE_DB") or DEFAULT_DB,
            app_ids=split_app_ids(env.get("ENABLEX_APP_ID")),
            allow_plaintext=_flag(env.get("CALLGATE_ALLOW_PLAINTEXT"), True),
            webhook_token=env.get("CALLGATE_WEBHOOK_TOKEN") or None,
            max_body=int(env.get("CALLGATE_MAX_BODY") or DEFAULT_MAX_BODY),
            synchronous=(env.get("CALLGATE_SYNCHRONOUS") or "FULL").upper(),
            group_commit=_flag(env.get("CALLGATE_GROUP_COMMIT"), True),
            secrets_db=env.get("CALLGATE_SECRETS_DB") or None,
            retry_schedule=env.get("CALLGATE_RETRY_SCHEDULE") or None,
            forward_workers=_number(env.get("CALLGATE_FORWARD_WORKERS"), int),
            forward_timeout=_number(env.get("CALLGATE_FORWARD_TIMEOUT"), float),
            forward_source=env.get("CALLGATE_FORWARD_SOURCE") or None,
            datasette_token=env.get(DATASETTE_TOKEN_ENV) or None,
            checkpoint=_choice(env, "CALLGATE_CHECKPOINT", CHECKPOINT_MODES),
            keys_db=env.get("CALLGATE_KEYS_DB") or None,
            master_key=env.get(MASTER_KEY_ENV) or None,
            retention_days=_number(env.get("CALLGATE_RETENTION_DAYS"), float),
            public_pii=_choice(env, PUBLIC_PII_ENV, PUBLIC_PII_POLICIES),
            log=log or env.get("CALLGATE_LOG") or "sqlite",
            nats_stream=env.get("CALLGATE_NATS_STREAM") or "CALLGATE",
            nats_subject_root=env.get("CALLGATE_NATS_SUBJECT_ROOT") or "enablex",
            nats_replicas=int(env.get("CALLGATE_NATS_REPLICAS") or 3),
            nats_creds=env.get("CALLGATE_NATS_CREDS") or None,
            nats_tls_ca=env.get("CALLGATE_NATS_TLS_CA") or None,
            nats_tls_cert=env.get("CALLGATE_NATS_TLS_CERT") or None,
            nats_tls_key=env.get("CALLGATE_NATS_TLS_KEY") or None,
            nats_timeout=float(env.get("CALLGATE_NATS_TIMEOUT") or 2.0),
            nats_duplicate_window=float(env.get("CALLGATE_NATS_DUPLICATE_WINDOW") or 86400),
            nats_max_age=float(env.get("CALLGATE_NATS_MAX_AGE") or 7 * 86400),
        )

    @property
    def nats_servers(self) -> tuple[str, ...]:
        """The NATS servers of `log`, or () for the embedded SQLite log."""
        return parse_log_url(self.log)

    @property
    def open_endpoint_problem(self) -> str | None:
        """Why anyone who can reach the port could add events, or None. Ciphertext proves
        the sender knows the app id; a plaintext delivery proves nothing unless it came
        by the secret path."""
        if self.allow_plaintext and not self.webhook_token:
            return (
                "plaintext deliveries are accepted (CALLGATE_ALLOW_PLAINTEXT) and there is "
                "no secret path (CALLGATE_WEBHOOK_TOKEN): anyone who can reach this port can "
                "add events. Set CALLGATE_WEBHOOK_TOKEN (EnableX's event_url then ends in "
                "/webhooks/enablex/<token>) or CALLGATE_ALLOW_PLAINTEXT=off"
            )
        return None

    def ensure_db_dir(self) -> None:
        parent = Path(self.db_path).parent
        parent.mkdir(parents=True, exist_ok=True)
