"""Sealing personal fields with per-call data keys, and the one way to open them.

What is personal in an event: the numbers (`from`, `to`, `transfer_to`, also
inside `broadcast_call_info`), the keyed `digits`, the recognised `text` and the
`recording_url`; and the whole raw request (`events.raw`, `rejections.body`).
`seal_event` keeps the event's shape in `events.payload` with those values
set to null and puts the values, AES-256-GCM sealed with the call's data key,
under `"sealed": [unit, token]`. `open_event` is the only reader of it (the
projector and the forwarder call it): it puts the values back while the key
exists; once `callgate erase` destroyed the key they stay null.

The hash chain covers the sealed bytes, so it verifies whether or not a key
still exists.
"""

from __future__ import annotations

import binascii
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.log.keystore import NONCE_BYTES, KeyStore

SEALED = "sealed"
_NON_DIGITS = re.compile(r"\D+")
PERSONAL_FIELDS = ("from", "to", "transfer_to", "digits", "text", "recording_url")
NUMBER_FIELDS = ("from", "to", "transfer_to")
NESTED_LISTS = ("broadcast_call_info",)
RAW_PREFIX = "sealed:"
BODY_PREFIX = b"sealed:"
_AAD_PAYLOAD = b"|payload"
_AAD_RAW = b"|raw"
_AAD_BODY = b"|body"


def unit_of(event: Mapping[str, Any]) -> str | None:
    """Whose key seals an event: its call, else its broadcast (a broadcast summary)."""
    return event.get("voice_id") or event.get("broadcast_id")


def digits_of(number: Any) -> str | None:
    """A phone number as its digits only (`+91 80684-75012` → `918068475012`)."""
    if isinstance(number, bool) or not isinstance(number, str | int):
        return None
    text = str(number)
    digits = text if text.isdigit() else _NON_DIGITS.sub("", text)
    return digits or None


def numbers_in(event: Mapping[str, Any]) -> set[str]:
    """Every phone number an event carries (as digits), for the key store's tags."""
    found = set()
    for field in NUMBER_FIELDS:
        if (digits := digits_of(event.get(field))) is not None:
            found.add(digits)
    for name in NESTED_LISTS:
        items = event.get(name)
        if isinstance(items, list):
            for item in items:
                if isinstance(item, Mapping):
                    for field in NUMBER_FIELDS:
                        if (digits := digits_of(item.get(field))) is not None:
                            found.add(digits)
    return found


def split(event: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the event with personal values nulled, the personal values) — `merge` undoes it."""
    clear = dict(event)
    secret: dict[str, Any] = {}
    for field in PERSONAL_FIELDS:
        if clear.get(field) is not None:
            secret[field] = clear[field]
            clear[field] = None
    for name in NESTED_LISTS:
        items = clear.get(name)
        if not isinstance(items, list):
            continue
        parts: list[dict[str, Any]] = []
        cleared: list[Any] = []
        for item in items:
            if isinstance(item, Mapping):
                inner_clear, inner_secret = split(item)
                cleared.append(inner_clear)
                parts.append(inner_secret)
            else:
                cleared.append(item)
                parts.append({})
        if any(parts):
            clear[name] = cleared
            secret[name] = parts
    return clear, secret


def merge(clear: dict[str, Any], secret: Mapping[str, Any]) -> dict[str, Any]:
    for field, value in secret.items():
        if field in NESTED_LISTS and isinstance(value, list):
            items = clear.get(field)
            if isinstance(items, list):
                for item, inner in zip(items, value, strict=False):
                    if isinstance(item, dict) and inner:
                        merge(item, inner)
        else:
            clear[field] = value
    return clear


def _seal(cipher: AESGCM, data: bytes, aad: bytes, nonce: bytes | None = None) -> bytes:
    nonce = nonce or os.urandom(NONCE_BYTES)
    return nonce + cipher.encrypt(nonce, data, aad)


def nonces(count: int) -> Iterator[bytes]:
    """`count` random GCM nonces from one read of the OS generator.

    os.urandom releases the GIL around its syscall, and a committing thread that
    lets go of the GIL twice per event waits behind the request threads to win it
    back; a batch takes all its nonces at once instead.
    """
    pool = os.urandom(NONCE_BYTES * count)
    for start in range(0, len(pool), NONCE_BYTES):
        yield pool[start : start + NONCE_BYTES]


def _open(cipher: AESGCM | None, token: bytes, aad: bytes) -> bytes | None:
    if cipher is None:
        return None
    try:
        return cipher.decrypt(token[:NONCE_BYTES], token[NONCE_BYTES:], aad)
    except InvalidTag:
        return None


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


_unb64 = binascii.a2b_base64


@dataclass(frozen=True)
class Sealed:
    """What the log stores for one event: payload without personal values, raw sealed."""

    payload: dict[str, Any]
    raw: str


def seal_event(
    event: Mapping[str, Any],
    raw_text: str,
    unit: str,
    cipher: AESGCM | None,
    nonce_source: Iterator[bytes] | None = None,
) -> Sealed:
    """Seal an event's personal values and raw text with its unit's key.

    `cipher` None means the unit was erased before this (late) event arrived: its
    personal values and raw text are not stored at all. `nonce_source` (see `nonces`)
    supplies the two nonces; without it each is read from the OS on its own.
    """
    clear, secret = split(event)
    aad = unit.encode()
    if cipher is None:
        return Sealed(clear, RAW_PREFIX + unit + ":")
    source = nonce_source if nonce_source is not None else nonces(2)
    if secret:
        data = orjson.dumps(secret, option=orjson.OPT_SORT_KEYS)
        clear[SEALED] = [unit, _b64(_seal(cipher, data, aad + _AAD_PAYLOAD, next(source)))]
    sealed_raw = _seal(cipher, raw_text.encode(), aad + _AAD_RAW, next(source))
    return Sealed(clear, RAW_PREFIX + unit + ":" + _b64(sealed_raw))


class Opener:
    """Opens sealed payloads, raw texts and bodies with a key store's (cached) keys."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store

    def refresh(self) -> None:
        self.store.refresh()

    def event(self, payload: str | bytes) -> dict[str, Any]:
        """`events.payload` → the event as logged, personal values back unless erased."""
        event: dict[str, Any] = orjson.loads(payload)
        sealed = event.pop(SEALED, None)
        if sealed is not None:
            unit, token = sealed
            data = _open(self.store.cipher(unit), _unb64(token), unit.encode() + _AAD_PAYLOAD)
            if data is not None:
                merge(event, orjson.loads(data))
        return event

    def raw(self, raw: str) -> str | None:
        """`events.raw` → the request's decrypted text; None once erased."""
        if not raw.startswith(RAW_PREFIX):
            return raw  # logged before sealing existed
        unit, _, token = raw[len(RAW_PREFIX) :].rpartition(":")
        if not token:
            return None
        data = _open(self.store.cipher(unit), _unb64(token), unit.encode() + _AAD_RAW)
        return data.decode() if data is not None else None

    def body(self, body: bytes | None) -> bytes | None:
        """`rejections.body` → the refused request's bytes; None once erased."""
        if body is None:
            return None
        body = bytes(body)
        if not body.startswith(BODY_PREFIX):
            return body
        unit, _, token = body[len(BODY_PREFIX) :].partition(b"\0")
        return _open(self.store.cipher(unit.decode()), token, unit + _AAD_BODY)


def body_unit(body: bytes | None) -> str | None:
    """The unit whose key seals a stored rejection body (None: stored before sealing)."""
    if body is None:
        return None
    body = bytes(body)
    if not body.startswith(BODY_PREFIX):
        return None
    return body[len(BODY_PREFIX) :].partition(b"\0")[0].decode()


def seal_body(
    store: KeyStore, body: bytes, created_at: str, unread: bool = False
) -> tuple[str, bytes]:
    """A refused request's body under a key of its own (unit `rejection:<random>`), so
    erasing one request's caller leaves the others readable.

    `unread` bodies (refused before interpretation: anyone can send them, and nothing
    ever re-reads them) share one key per UTC day and erasure epoch instead
    (`rejection:unread:<day>:<epoch>`): a flood of them must not cost a key and a
    key-store fsync each. Erasing a caller found in one of them destroys that key, all of
    its unread bodies; the next erasure epoch starts a new key."""
    cipher = None
    if unread:
        store.refresh()  # a key destroyed by another process is not used again
        unit = f"rejection:unread:{created_at[:10]}:{store.epoch}"
        cipher = store.ensure({unit: ()}, created_at)[unit]
    if cipher is None:  # not unread, or that key was just shredded
        unit = "rejection:" + os.urandom(8).hex()
        cipher = store.ensure({unit: ()}, created_at)[unit]
    assert cipher is not None
    return unit, BODY_PREFIX + unit.encode() + b"\0" + _seal(
        cipher, body, unit.encode() + _AAD_BODY
    )


def iter_personal(event: Mapping[str, Any]) -> Iterator[str]:
    """Every personal value of an opened event as text (tests and erasure checks)."""
    _, secret = split(event)
    stack: list[Any] = [secret]
    while stack:
        value = stack.pop()
        if isinstance(value, Mapping):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif value is not None:
            yield str(value)
