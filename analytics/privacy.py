"""Public forms of personal data: what anonymous Datasette visitors may read.

Pure functions (no SQL, no clock, no I/O). The projector passes every row the folds
emit through a `Splitter`: the public projection table gets the form the policy
(CALLGATE_PUBLIC_PII) asks for, the operator-only `<table>_private` table the
cleartext, keyed like the public row. Doing it in the stored data, not in page
rendering, keeps JSON, CSV, row pages, facets, canned queries and dashboards safe
alike. Recording URLs lose the EnableX app id (the key that decrypts every webhook)
under every policy: that is a secret, not personal data.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from gateway.wire.crypto import app_id_label

MASKED = "masked"
HIDDEN = "hidden"
FULL = "full"
POLICIES = (MASKED, HIDDEN, FULL)
DEFAULT_POLICY = MASKED

MENU_KEYS = 2  # digit strings this short are menu choices: the IVR analytics need them
_KEPT_DIGITS = 3  # a masked number keeps its last 3 digits
_MIN_MASKED_LENGTH = 7  # shorter numbers keep no digit at all
_NOT_A_NUMBER = "***"  # a SIP address or a name: nothing of it, not even its length
_INTERNATIONAL_LENGTH = 11  # EnableX sends E.164 without "+": 91 98200 12345
# ITU-T E.164 country codes of one and two digits (every other code has three); the set
# is prefix-free, so the first match is the country code.
_COUNTRY_CODES = frozenset(
    {
        "1", "7", "20", "27", "30", "31", "32", "33", "34", "36", "39", "40", "41", "43", "44",
        "45", "46", "47", "48", "49", "51", "52", "53", "54", "55", "56", "57", "58", "60", "61",
        "62", "63", "64", "65", "66", "81", "82", "84", "86", "90", "91", "92", "93", "94", "95",
        "98",
    }
)
# An EnableX app id is a 24-hex-digit object id; a recording URL carries it as a path
# segment (…/voice/v1/recording/<app id>/<file>).
_APP_ID_SHAPE = re.compile(r"[0-9a-fA-F]{24}")
_RECORDING_SEGMENTS = frozenset({"recording", "recordings"})
# Keys of a broadcast_call_info entry that hold a phone number.
_NUMBER_KEYS = frozenset({"to", "from", "to_number", "from_number", "number", "caller_id"})


def check_policy(policy: str) -> str:
    """The policy name, or ValueError naming the allowed ones."""
    if policy not in POLICIES:
        raise ValueError(f"unknown privacy policy {policy!r}: use one of {', '.join(POLICIES)}")
    return policy


def mask_number(value: Any) -> str | None:
    """+91*******345: the country code and the last 3 digits, '*' for every other digit.
    Without a country code (national form) only the last 3 digits; short numbers and
    anything that is not a phone number (a SIP address) keep nothing."""
    if value is None:
        return None
    text = str(value).strip()
    digits = "".join(ch for ch in text if ch.isdigit())
    if not text:
        return text
    if not digits or any(ch.isalpha() for ch in text):
        return _NOT_A_NUMBER
    international = text.startswith(("+", "00")) or (
        len(digits) >= _INTERNATIONAL_LENGTH and not digits.startswith("0")
    )
    if text.startswith("00"):
        digits = digits[2:]
    if len(digits) < _MIN_MASKED_LENGTH:
        return "*" * len(digits)
    country = ""
    if international:
        for size in (1, 2, 3):
            if digits[:size] in _COUNTRY_CODES or size == 3:
                country = digits[:size]
                break
    hidden = len(digits) - len(country) - _KEPT_DIGITS
    prefix = "+" + country if country else ""
    return prefix + "*" * hidden + digits[-_KEPT_DIGITS:]


def mask_digits(value: Any) -> str | None:
    """Menu choices (1–2 keys) as they are; longer strings (PINs, account and card
    numbers) as one '*' per key."""
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= MENU_KEYS else "*" * len(text)


def strip_app_id(url: Any) -> str | None:
    """The URL with its app-id segment (the one after /recording/, and any segment or
    query value shaped like an app id) replaced by the app's label."""
    if url is None:
        return None
    text = str(url)
    try:
        parts = urlsplit(text)
    except ValueError:
        return _APP_ID_SHAPE.sub(lambda m: app_id_label(m.group(0)), text)
    segments = parts.path.split("/")
    for index, segment in enumerate(segments):
        after_recording = index > 0 and segments[index - 1].lower() in _RECORDING_SEGMENTS
        if segment and (after_recording or _APP_ID_SHAPE.fullmatch(segment)):
            if after_recording and index == len(segments) - 1:
                continue  # …/recording/<file>: no app id in this URL
            segments[index] = app_id_label(segment)
    query = _APP_ID_SHAPE.sub(lambda m: app_id_label(m.group(0)), parts.query)
    netloc = parts.netloc.rpartition("@")[2]  # never user:password@
    return urlunsplit((parts.scheme, netloc, "/".join(segments), query, ""))


def _json_list(text: str | None) -> list[Any] | None:
    """The JSON array in `text`, or None for anything else (published as nothing)."""
    if text == "[]":
        return []
    try:
        value = orjson.loads(text) if text is not None else None
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, list) else None


def _dumps(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


# --- one function per kind of personal column: (value, policy) -> public value ----------


def public_number(value: Any, policy: str) -> Any:
    if policy == FULL:
        return value
    return mask_number(value) if policy == MASKED else None


def public_digits(value: Any, policy: str) -> Any:
    if policy == FULL or value is None or len(str(value)) <= MENU_KEYS:
        return value
    return mask_digits(value) if policy == MASKED else None


def _public_list(value: str | None, policy: str, form: Callable[[Any], Any]) -> str | None:
    """A JSON array column with each element in its public form (the count stays); one
    of any other shape is published as nothing."""
    if policy == FULL:
        return value
    items = _json_list(value)
    if not items:
        return value if items == [] else None
    return _dumps([form(item) for item in items])


def public_digit_list(value: str | None, policy: str) -> str | None:
    """A JSON array of digit strings: each element as public_digits."""
    return _public_list(value, policy, lambda item: public_digits(item, policy))


def public_text(value: Any, policy: str) -> Any:
    """Speech text (or a JSON array of texts): only under the full policy."""
    return value if policy == FULL else None


def public_url(value: Any, policy: str) -> Any:
    return None if policy == HIDDEN else strip_app_id(value)


def public_call_info(value: str | None, policy: str) -> str | None:
    """broadcast_call_info (JSON array of {voice_id, to, state, …}): numbers as public_number."""

    def entry(item: Any) -> Any:
        if not isinstance(item, dict):
            return None
        return {k: public_number(v, policy) if k in _NUMBER_KEYS else v for k, v in item.items()}

    return _public_list(value, policy, entry)


KINDS: dict[str, Callable[[Any, str], Any]] = {
    "number": public_number,
    "digits": public_digits,
    "digit_list": public_digit_list,
    "text": public_text,
    "url": public_url,
    "call_info": public_call_info,
}

Row = tuple[Any, ...]


class Splitter:
    """Row of a public table (column order `columns`) → (public row, private row).

    The private row is the key columns then the personal columns, in cleartext."""

    def __init__(
        self,
        columns: Sequence[str],
        key: Sequence[str],
        personal: Sequence[tuple[str, str]],
        policy: str,
    ) -> None:
        self.policy = check_policy(policy)
        self.key = [columns.index(name) for name in key]
        self.personal = [(columns.index(name), KINDS[kind]) for name, kind in personal]

    def __call__(self, row: Row) -> tuple[Row, Row]:
        public = list(row)
        policy = self.policy
        for index, form in self.personal:
            value = row[index]
            if value is not None:
                public[index] = form(value, policy)
        private = tuple([row[i] for i in self.key] + [row[i] for i, _ in self.personal])
        return tuple(public), private

    def public(self, row: Row) -> Row:
        return self(row)[0]
