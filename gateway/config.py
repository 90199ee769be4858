"""Runtime configuration, read once from the environment so every entry point agrees."""

from __future__ import annotations

import os
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

    @classmethod
    def from_env(
        cls, db_path: str | None = None, env: Mapping[str, str] | None = None
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
        )

    def ensure_db_dir(self) -> None:
        parent = Path(self.db_path).parent
        parent.mkdir(parents=True, exist_ok=True)
