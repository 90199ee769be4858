"""What a subscriber receives: a CloudEvents 1.0 envelope, signed with Standard Webhooks.

Ids are deterministic, so a resend or a redelivery carries the same webhook-id and the
receiver can dedupe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from standardwebhooks import Webhook

from gateway.forward.subscriptions import (
    event_type,
)
from gateway.log import eventlog

DEFAULT_SOURCE = "callgate/enablex"
PRIVATE_KEYS = frozenset({"app_id", "app", "app_label", "appId"})  # never leave callgate


def message_id(subscription_id: str, event_id: str) -> str:
    """Deterministic webhook-id / CloudEvents id: a replay resends the same id."""
    digest = hashlib.sha256(f"{subscription_id}\n{event_id}".encode()).hexdigest()
    return "msg_" + digest[:32]


def order_key(voice_id: str | None, broadcast_id: str | None, event_id: str) -> str:
    """The unit of ordering: a call, else a broadcast, else the lone event itself."""
    if voice_id:
        return "voice:" + voice_id
    if broadcast_id:
        return "broadcast:" + broadcast_id
    return "event:" + event_id


def envelope(
    msg_id: str, event: Mapping[str, Any], seq: int, event_id: str, source: str = DEFAULT_SOURCE
) -> dict[str, Any]:
    """CloudEvents 1.0 structured form of one normalised event (never the app id)."""
    data = {k: v for k, v in event.items() if k not in PRIVATE_KEYS}
    result: dict[str, Any] = {
        "specversion": "1.0",
        "id": msg_id,
        "source": source,
        "type": event_type(event.get("class"), event.get("state")),
        "time": event.get("occurred_at"),
        "datacontenttype": "application/json",
        "callgateseq": seq,
        "callgateeventid": event_id,
        "data": data,
    }
    subject = event.get("voice_id") or event.get("broadcast_id")
    if subject:
        result["subject"] = subject
    return result


def envelope_body(doc: Mapping[str, Any]) -> str:
    """Canonical JSON text: identical bytes on every replay of the same event."""
    return eventlog.canonical_json(doc)


class Signer:
    """Standard Webhooks headers for a body, one signature per valid secret (rotation)."""

    def __init__(self) -> None:
        self._hooks: dict[str, Webhook] = {}

    def headers(
        self, msg_id: str, body: str, secrets: Sequence[str], at: datetime | None = None
    ) -> dict[str, str]:
        moment = (at or datetime.now(UTC)).astimezone(UTC)
        signatures = []
        for secret in secrets:
            hook = self._hooks.get(secret)
            if hook is None:
                hook = self._hooks[secret] = Webhook(secret)
            signatures.append(hook.sign(msg_id, moment, body))
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": " ".join(signatures),
        }
