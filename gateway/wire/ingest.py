"""One webhook request → an event to log (`Accepted`) or a refusal with its error code.

HTTP, `callgate ingest` (captured requests) and `callgate reprocess`
(rejections retried after a configuration fix) all go through `interpret`,
so a request is judged the same way whichever door it came in by. Nothing
here touches the log: `gateway.log.intake` stores the verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway.config import Config
from gateway.wire import crypto, schemas

DECRYPT_STAGE = frozenset({"bad_ciphertext", "bad_decrypt", "bad_plaintext"})
# All decrypt-stage failures answer with this one body: no padding oracle.
UNDECRYPTABLE = {
    "error": "undecryptable",
    "detail": "encrypted_data could not be decrypted and parsed with the configured app id",
}
STATUS = {
    "body_too_large": 413,
    "missing_voice_id": 422,
    "bad_token": 404,
    "method_not_allowed": 405,
}
PLAINTEXT_LABEL = "plaintext"
# Refused before the body was interpreted: the request never showed it came from EnableX
# (wrong or missing path token) or was no webhook delivery at all (another method).
REFUSED_UNREAD = frozenset({"bad_token", "method_not_allowed"})


def public_code(code: str) -> str:
    """The error code anyone may learn (answers, the public /metrics): the decrypt stage's
    three codes are one, or their counts would be the padding oracle the answer hides."""
    return UNDECRYPTABLE["error"] if code in DECRYPT_STAGE else code


@dataclass(frozen=True)
class Accepted:
    event: dict[str, Any]
    raw_text: str
    raw_obj: dict[str, Any]
    app_label: str


@dataclass(frozen=True)
class Rejected:
    code: str
    detail: str

    @property
    def status(self) -> int:
        return STATUS.get(self.code, 400)

    def response(self) -> dict[str, str]:
        """What the client sees; decrypt-stage codes are collapsed into one answer."""
        if self.code in DECRYPT_STAGE:
            return dict(UNDECRYPTABLE)
        return {"error": self.code, "detail": self.detail}


class HeaderSource(Protocol):
    """What `LiveHeaders` reads: case-insensitive `get` and the (name, value) pairs."""

    def get(self, name: str) -> str | None: ...
    def items(self) -> Iterable[tuple[str, str]]: ...


class Headers:
    """Case-insensitive header lookup over any (name, value) pairs."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pairs = [(str(name), str(value)) for name, value in pairs]
        self._map: dict[str, str] = {}
        for name, value in self._pairs:
            self._map.setdefault(name.lower(), value)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        """Every header as received, for a refusal's record."""
        return self._pairs

    @classmethod
    def of(cls, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> Headers:
        items = headers.items() if isinstance(headers, Mapping) else headers
        return cls(items)

    def get(self, name: str) -> str | None:
        return self._map.get(name.lower())


class LiveHeaders(Headers):
    """Headers looked up in a case-insensitive source as they are needed (a WSGI request's).

    An accepted webhook reads five of them; only a refused request keeps them all, so
    the pairs are listed on first use instead of for every request."""

    def __init__(self, source: HeaderSource) -> None:
        self._source = source
        self._listed: list[tuple[str, str]] | None = None

    @property
    def pairs(self) -> list[tuple[str, str]]:
        if self._listed is None:
            self._listed = [(str(name), str(value)) for name, value in self._source.items()]
        return self._listed

    def get(self, name: str) -> str | None:
        return self._source.get(name)


def _parse_body(body: bytes) -> Any:
    """The outer body must be strict JSON text (what a JavaScript receiver would accept)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise crypto.CryptoError("bad_body", "the body is not UTF-8 text") from exc
    try:
        return crypto.parse_strict_json(text)
    except crypto.CryptoError as exc:
        raise crypto.CryptoError("bad_body", "the body is not a JSON document") from exc


def _algorithm(headers: Headers) -> str | None:
    """`x-algoritm` (every EnableX sample) or `x-algorithm` (the docs); both must agree."""
    misspelt, documented = headers.get("x-algoritm"), headers.get("x-algorithm")
    both = misspelt is not None and documented is not None
    if both and misspelt.strip().lower() != documented.strip().lower():  # type: ignore[union-attr]
        raise crypto.CryptoError(
            "conflicting_headers", "x-algoritm and x-algorithm name different ciphers"
        )
    value = misspelt if misspelt is not None else documented
    if value is not None and not value.strip():
        raise crypto.CryptoError("missing_header", "the algorithm header is empty")
    return value.strip() if value is not None else None


def _decrypt(headers: Headers, outer: Any, algorithm: str, config: Config) -> tuple[Any, str, str]:
    if not isinstance(outer, dict) or not isinstance(outer.get("encrypted_data"), str):
        raise crypto.CryptoError(
            "bad_body", "an encrypted request needs a JSON object with a string encrypted_data"
        )
    fmt, encoding = headers.get("x-format"), headers.get("x-encoding")
    missing = [name for name, value in (("x-format", fmt), ("x-encoding", encoding)) if not value]
    if missing:
        raise crypto.CryptoError("missing_header", f"missing header(s): {', '.join(missing)}")
    assert fmt is not None and encoding is not None
    result = crypto.decrypt_event(
        outer["encrypted_data"], algorithm, fmt.strip(), encoding.strip(), config.app_ids
    )
    return result.value, result.text, crypto.app_id_label(result.app_id)


def interpret(
    headers: Headers, body: bytes, config: Config, received_at: str
) -> Accepted | Rejected:
    """Decide what a request is. Pure apart from reading the config: no I/O."""
    if len(body) > config.max_body:
        return Rejected("body_too_large", f"the body exceeds {config.max_body} bytes")
    content_type = (headers.get("content-type") or "").lower()
    try:
        if "x-www-form-urlencoded" in content_type or "multipart/" in content_type:
            raise crypto.CryptoError("bad_body", "the body must be JSON, not a form")
        if not body.strip():
            raise crypto.CryptoError("bad_body", "the body is empty")
        algorithm = _algorithm(headers)
        outer = _parse_body(body)
        if algorithm is not None:
            value, raw_text, label = _decrypt(headers, outer, algorithm, config)
        else:
            if isinstance(outer, dict) and "encrypted_data" in outer:
                raise crypto.CryptoError(
                    "missing_header",
                    "encrypted_data was sent without an x-algoritm/x-algorithm header",
                )
            if not config.allow_plaintext:
                raise crypto.CryptoError(
                    "missing_header", "plaintext deliveries are disabled (CALLGATE_ALLOW_PLAINTEXT)"
                )
            value, raw_text, label = outer, body.decode("utf-8"), PLAINTEXT_LABEL
    except crypto.CryptoError as exc:
        return Rejected(exc.code, exc.detail)
    try:
        event = schemas.normalise(value, received_at)
    except schemas.EventError as exc:
        return Rejected(exc.code, exc.detail)
    return Accepted(event, raw_text, value, label)
