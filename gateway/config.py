"""Runtime configuration, read once from the environment so every entry point agrees."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DB = "data/callgate.db"
DEFAULT_MAX_BODY = 1024 * 1024  # EnableX events are < 1 kB; refuse megabyte bodies unread.


def _flag(value: str | None, default: bool) -> bool:
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() not in {"0", "false", "no", "off"}


def split_app_ids(value: str | None) -> tuple[str, ...]:
    """`ENABLEX_APP_ID=a,b` → ("a", "b"): tried in order when decrypting."""
    if not value:
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


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
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, db_path: str | None = None, env: dict[str, str] | None = None) -> Config:
        env = dict(os.environ if env is None else env)
        return cls(
            db_path=db_path or env.get("CALLGATE_DB") or DEFAULT_DB,
            app_ids=split_app_ids(env.get("ENABLEX_APP_ID")),
            allow_plaintext=_flag(env.get("CALLGATE_ALLOW_PLAINTEXT"), True),
            webhook_token=env.get("CALLGATE_WEBHOOK_TOKEN") or None,
            max_body=int(env.get("CALLGATE_MAX_BODY") or DEFAULT_MAX_BODY),
            synchronous=(env.get("CALLGATE_SYNCHRONOUS") or "FULL").upper(),
            group_commit=_flag(env.get("CALLGATE_GROUP_COMMIT"), True),
        )

    def ensure_db_dir(self) -> None:
        parent = Path(self.db_path).parent
        parent.mkdir(parents=True, exist_ok=True)
