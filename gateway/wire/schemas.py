"""Validation and normalisation of EnableX events (WIRE.md §4).

EnableX's own documents and sample apps disagree on field names, casing and
types; this module is the single place that folds every known variant into
one normalised shape (docs/CONTRACT.md), so nothing downstream ever has to
know about `voice_Id`, `timeStamp`, `playstateus` or `digit: 0`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, pre_load

from gateway.wire.crypto import INT_MAX, INT_MIN

VOICE_ID_KEYS = ("voice_id", "voice_Id", "voiceId", "VoiceId")
BROADCAST_ID_KEYS = ("broadcast_id", "broadcastId")
TIMESTAMP_KEYS = ("timestamp", "timeStamp")

SPEECH_STATES = frozenset({"recognized", "unrecognized", "timeout"})
SPEECH_PLAYSTATES = {
    "speech_recognized": "recognized",
    "speechrecognized": "recognized",
    "speechunrecognized": "unrecognized",
    "speechtimeout": "timeout",
}
BROADCAST_STATES = frozenset({"broadcastcomplete", "broadcastcall_complete"})
RECORDING_STATES = frozenset({"started", "completed"})
BRIDGE_STATES = frozenset({"bridging", "bridged", "bridge_disconnected"})
CALL_STATES = frozenset(
    {
        "incomingcall",
        "initiated",
        "ringing",
        "connected",
        "joined",
        "hold",
        "unhold",
        "transferring",
        "transferred",
        "disconnected",
        "failed",
    }
)
# States that belong to a bridge leg once the call itself is already connected.
LEG_STATES = frozenset({"failed", "initiated"})

# Optional text fields copied through as strings when they carry a scalar.
TEXT_FIELDS = (
    "from",
    "to",
    "play_id",
    "prompt_ref",
    "reason",
    "disconnect_reason",
    "recording_id",
    "recording_url",
    "channel_id",
    "room_id",
    "owner_ref",
    "transfer_to",
    "description",
)

_TEXT_FIELD_SET = frozenset(TEXT_FIELDS)

_TS = re.compile(
    r"^\s*(\d{4})-(\d{2})-(\d{2})[T ](\d{2}):(\d{2})"
    r"(?::(\d{2})(?:[.,](\d+))?)?"
    r"\s*(Z|[+-]\d{2}(?::?\d{2})?Z?)?\s*$",
    re.IGNORECASE,
)


class EventError(Exception):
    """An event that cannot be logged: carries the WIRE.md §3 error code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def format_utc(moment: datetime) -> str:
    """Fixed-width UTC ISO 8601 with milliseconds, so text order is time order.

    Formatted by hand rather than with strftime: it runs several times per webhook."""
    if moment.tzinfo is not UTC:
        moment = moment.astimezone(UTC)
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:"
        f"{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


def parse_timestamp(value: Any) -> str | None:
    """EnableX time (ISO 8601 in its documented variants, or epoch s/ms) → UTC text.

    The docs show `2021-02-18T12:47-00Z` (no seconds, a stray `-00` before
    `Z`); it means 12:47:00 UTC. Unparseable values return None: the event is
    kept and timed by its arrival instead.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        try:
            seconds = value / 1000 if value > 1e11 else value  # an int past float: Overflow
            return format_utc(datetime.fromtimestamp(seconds, UTC))
        except (OverflowError, OSError, ValueError):
            return None
    if not isinstance(value, str):
        return None
    match = _TS.match(value)
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        moment = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second or 0), micro
        )
    except ValueError:
        return None
    offset = timedelta(0)
    if zone and zone.upper() != "Z":
        body = zone.rstrip("Zz")
        sign = -1 if body[0] == "-" else 1
        digits = body[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:4] or 0)
        if hours > 23 or minutes > 59:
            return None
        offset = sign * timedelta(hours=hours, minutes=minutes)
    try:
        return format_utc((moment - offset).replace(tzinfo=UTC))
    except OverflowError:
        return None


def normalise_state(value: Any) -> str | None:
    """`Incoming Call`, `incoming call`, `Incomingcall` → `incomingcall`; non-text → None."""
    if not isinstance(value, str):
        return None
    folded = "".join(value.split()).lower()
    return folded or None


def scalar_text(value: Any) -> str | None:
    """Scalars as text (numbers travel as ints in some payloads); anything else is dropped."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else str(value)
    return None


def _first_text(raw: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    for key in keys:
        text = scalar_text(raw.get(key))
        if text is not None and text.strip():
            return text.strip()
    return None


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        # The strict parser admits what SQLite can store; others may call this directly.
        return value if INT_MIN <= value <= INT_MAX else None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
        # Whole numbers as ints, as long as SQLite can store them; larger ones stay floats.
        return int(value) if value.is_integer() and INT_MIN <= value <= INT_MAX else value
    return None


def speech_result(state: str | None, playstate: str | None) -> str | None:
    """The speech outcome: the state when it is one (seed shape), else the playstate's suffix."""
    if state in SPEECH_STATES:
        return state
    if playstate in SPEECH_PLAYSTATES:
        return SPEECH_PLAYSTATES[playstate]
    return None


def classify(
    state: str | None,
    playstate: str | None,
    recordstate: str | None,
    *,
    has_recording_id: bool = False,
    description: str | None = None,
    connected_before: bool = False,
) -> str:
    """WIRE.md §4.7, first match wins. `connected_before` decides bridge legs (rule 6)."""
    if state in BROADCAST_STATES:
        return "broadcast"
    if state in SPEECH_STATES or playstate in SPEECH_PLAYSTATES:
        return "speech"
    if recordstate or state in RECORDING_STATES:
        return "recording"
    if state == "failed" and (has_recording_id or "record" in (description or "").lower()):
        return "recording"
    if state == "dtmfcollected":
        return "dtmf"
    if playstate:
        return "play"
    if state in BRIDGE_STATES or (state in LEG_STATES and connected_before):
        return "bridge"
    if state in CALL_STATES:
        return "call"
    return "unknown"


def effective_state(
    cls: str, state: str | None, playstate: str | None, recordstate: str | None
) -> str | None:
    """The one state that names what happened within the event's class."""
    if cls == "play":
        return playstate
    if cls == "speech":
        return speech_result(state, playstate)
    if cls == "recording":
        return recordstate or state
    if cls == "unknown":
        return state or playstate
    return state


def _all_text(values: Mapping[str, Any]) -> None:
    if not all(isinstance(value, str) for value in values.values()):
        raise ValidationError("every extra text value must be a string")


class EventSchema(Schema):
    """Marshmallow view of one decrypted event, after the aliases have been folded."""

    class Meta:
        unknown = EXCLUDE

    voice_id = fields.String(load_default=None, allow_none=True)
    broadcast_id = fields.String(load_default=None, allow_none=True)
    state = fields.String(load_default=None, allow_none=True)
    playstate = fields.String(load_default=None, allow_none=True)
    recordstate = fields.String(load_default=None, allow_none=True)
    occurred_at = fields.String(load_default=None, allow_none=True)
    digits = fields.String(load_default=None, allow_none=True)
    text = fields.String(load_default=None, allow_none=True)
    confidence = fields.Float(load_default=None, allow_none=True)
    result = fields.Raw(load_default=None, allow_none=True)
    recording_duration = fields.Raw(load_default=None, allow_none=True)
    broadcast_successful = fields.Integer(load_default=None, allow_none=True, strict=False)
    broadcast_failed = fields.Integer(load_default=None, allow_none=True, strict=False)
    broadcast_call_info = fields.List(fields.Dict(), load_default=None, allow_none=True)
    # Keys come from TEXT_FIELDS, so only the values need checking: one validator over
    # the dict costs a fraction of a String field run per value.
    extra_text = fields.Dict(load_default=dict, validate=_all_text)

    @pre_load
    def fold_aliases(self, raw: Mapping[str, Any], **_: Any) -> dict[str, Any]:
        """Map every documented spelling onto one field; drop values of the wrong type."""
        if not isinstance(raw, Mapping):
            raise ValidationError("event is not a JSON object", field_name="_schema")
        playstate = raw.get("playstate")
        if normalise_state(playstate) is None:
            playstate = raw.get("playstateus")
        timestamp = next((raw[k] for k in TIMESTAMP_KEYS if raw.get(k) is not None), None)
        digits = _first_text(raw, ("digits", "digit"))
        text = scalar_text(raw.get("text"))
        if text is None:
            text = scalar_text(raw.get("recognized_phrase"))
        result_set = raw.get("resultSet") if isinstance(raw.get("resultSet"), Mapping) else {}
        info = raw.get("broadcast_call_info")
        confidence = _number(raw.get("confidence"))
        folded: dict[str, Any] = {
            "voice_id": _first_text(raw, VOICE_ID_KEYS),
            "broadcast_id": _first_text(raw, BROADCAST_ID_KEYS),
            "state": normalise_state(raw.get("state")),
            "playstate": normalise_state(playstate),
            "recordstate": normalise_state(raw.get("recordstate")),
            "occurred_at": parse_timestamp(timestamp),
            "digits": digits,
            "text": text,
            "confidence": confidence,
            "result": raw.get("result") if isinstance(raw.get("result"), str | int) else None,
            "recording_duration": _number(raw.get("recording_duration")),
            "broadcast_successful": _number(
                result_set.get("successfull_calls", result_set.get("successful_calls"))
            ),
            "broadcast_failed": _number(result_set.get("failed_calls")),
            "broadcast_call_info": (
                [item for item in info if isinstance(item, Mapping)]
                if isinstance(info, list)
                else None
            ),
            "extra_text": {
                key: value
                for key, raw_value in raw.items()
                if key in _TEXT_FIELD_SET and (value := scalar_text(raw_value)) is not None
            },
        }
        # Absent values are left to the fields' load_default, so marshmallow only
        # deserialises what the event carries (a handful of its fifteen fields).
        return {key: value for key, value in folded.items() if value is not None}


_SCHEMA = EventSchema()


def normalise(raw: Any, received_at: str, connected_before: bool = False) -> dict[str, Any]:
    """One decrypted event → the normalised event of docs/CONTRACT.md.

    Raises EventError: `bad_event` when it is not a JSON object,
    `missing_voice_id` when nothing attributes it to a call or a broadcast.
    """
    if not isinstance(raw, Mapping):
        raise EventError("bad_event", "the decrypted event is not a JSON object")
    try:
        # partial=True: fields the event does not carry are skipped rather than
        # filled with their defaults one by one (absent reads as None below).
        loaded = _SCHEMA.load(raw, partial=True)
    except ValidationError as exc:  # the folded shape is built to validate; keep it a 4xx
        raise EventError("bad_event", f"event failed validation: {exc.messages}") from exc
    data = dict.fromkeys(_SCHEMA.fields, None) | loaded
    if data["voice_id"] is None and data["broadcast_id"] is None:
        raise EventError("missing_voice_id", "the event has no voice_id and no broadcast_id")
    extra = data.pop("extra_text") or {}
    state, playstate, recordstate = data["state"], data["playstate"], data["recordstate"]
    cls = classify(
        state,
        playstate,
        recordstate,
        has_recording_id="recording_id" in extra,
        description=extra.get("description"),
        connected_before=connected_before,
    )
    event: dict[str, Any] = {
        "voice_id": data["voice_id"],
        "class": cls,
        "state": effective_state(cls, state, playstate, recordstate),
        "occurred_at": data["occurred_at"] or received_at,
    }
    if data["occurred_at"] is None:
        event["time_source"] = "received"
    optional = {
        "broadcast_id": data["broadcast_id"],
        "raw_state": state,
        "playstate": playstate,
        "recordstate": recordstate,
        "digits": data["digits"],
        "text": data["text"],
        "confidence": data["confidence"],
        "result": data["result"],
        "recording_duration": data["recording_duration"],
        "broadcast_successful": data["broadcast_successful"],
        "broadcast_failed": data["broadcast_failed"],
        "broadcast_call_info": data["broadcast_call_info"],
        **extra,
    }
    event.update({key: value for key, value in optional.items() if value is not None})
    return event
