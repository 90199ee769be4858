"""One webhook request → an event for the log, or a refusal with its WIRE.md §3 code.

HTTP, `callgate ingest` (captured requests) and `callgate reprocess`
(rejections retried after a configuration fix) all go through `interpret`,
so a request is judged the same way whichever door it came in by.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway import crypto, eventlog, schemas
from gateway.config import Config
from gateway.writer import BatchWriter

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


class Headers:
    """Case-insensitive header lookup over any (name, value) pairs."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        self.pairs = [(str(name), str(value)) for name, value in pairs]
        self._map: dict[str, str] = {}
        for name, value in self.pairs:
            self._map.setdefault(name.lower(), value)

    @classmethod
    def of(cls, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> Headers:
        items = headers.items() if isinstance(headers, Mapping) else headers
        return cls(items)

    def get(self, name: str) -> str | None:
        return self._map.get(name.lower())


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


def refine_leg(conn: sqlite3.Connection, event: dict[str, Any]) -> dict[str, Any]:
    """A `failed`/`initiated` after the call connected is a bridge leg (WIRE.md §4.7.6).

    Decided here against what the log already holds; the projection re-derives it
    from event order anyway, so an out-of-order arrival cannot make state wrong.
    """
    if event["class"] != "call" or event.get("raw_state") not in schemas.LEG_STATES:
        return event
    voice_id = event.get("voice_id")
    if voice_id and eventlog.connected_before(conn, voice_id, event["occurred_at"]):
        return {**event, "class": "bridge"}
    return event


def to_new_event(
    conn: sqlite3.Connection, accepted: Accepted, received_at: str
) -> eventlog.NewEvent:
    return eventlog.NewEvent(
        event=refine_leg(conn, accepted.event),
        raw_text=accepted.raw_text,
        raw_obj=accepted.raw_obj,
        app_label=accepted.app_label,
        received_at=received_at,
    )


@dataclass(frozen=True)
class Outcome:
    """The result of ingesting one request: what to answer and what was stored."""

    status: int
    body: dict[str, Any]
    seq: int | None = None
    duplicate: bool = False
    error: str | None = None
    event_class: str | None = None
    rejection_id: int | None = None


def accepted_body(result: eventlog.AppendResult) -> dict[str, Any]:
    return {
        "status": "accepted",
        "seq": result.seq,
        "event_id": result.event_id,
        "duplicate": result.duplicate,
    }


def ingest_request(
    conn: sqlite3.Connection,
    config: Config,
    headers: Headers,
    body: bytes,
    *,
    method: str = "POST",
    path: str = "/webhooks/enablex",
    remote_addr: str | None = None,
    writer: BatchWriter | None = None,
) -> Outcome:
    """Interpret, then append (event) or record (rejection); nothing is ever dropped.

    With a writer, the append joins the current group commit; either way this
    returns only after the event's transaction committed.
    """
    received_at = eventlog.utc_now()
    verdict = interpret(headers, body, config, received_at)
    if isinstance(verdict, Accepted):
        accepted = verdict
        if writer is not None:
            result = writer.submit(lambda c: to_new_event(c, accepted, received_at))
        else:
            result = eventlog.append(conn, to_new_event(conn, accepted, received_at))
        return Outcome(
            200,
            accepted_body(result),
            seq=result.seq,
            duplicate=result.duplicate,
            event_class=verdict.event["class"],
        )
    return reject(conn, verdict, headers, body, method, path, remote_addr, received_at)


def reject(
    conn: sqlite3.Connection,
    verdict: Rejected,
    headers: Headers,
    body: bytes,
    method: str,
    path: str,
    remote_addr: str | None,
    received_at: str | None = None,
) -> Outcome:
    rejection_id = eventlog.record_rejection(
        conn,
        error=verdict.code,
        detail=verdict.detail,
        http_status=verdict.status,
        body=body,
        headers=headers.pairs,
        method=method,
        path=path,
        remote_addr=remote_addr,
        received_at=received_at,
    )
    return Outcome(
        verdict.status, verdict.response(), error=verdict.code, rejection_id=rejection_id
    )


@dataclass(frozen=True)
class ReprocessSummary:
    tried: int
    events: int
    duplicates: int
    still_rejected: int


def reprocess(conn: sqlite3.Connection, config: Config) -> ReprocessSummary:
    """Re-run every unresolved rejection through the current config (e.g. a new app id)."""
    rows = conn.execute(
        "SELECT id, headers, body, body_truncated FROM rejections "
        "WHERE resolved_at IS NULL ORDER BY id"
    ).fetchall()
    events = duplicates = still = 0
    for row in rows:
        headers = Headers.of(_load_headers(row["headers"]))
        body = bytes(row["body"] or b"")
        received_at = eventlog.utc_now()
        verdict: Accepted | Rejected
        if row["body_truncated"]:
            verdict = Rejected("body_too_large", "the stored body was truncated")
        else:
            verdict = interpret(headers, body, config, received_at)
        if isinstance(verdict, Accepted):
            result = eventlog.append(conn, to_new_event(conn, verdict, received_at))
            resolution = "duplicate" if result.duplicate else "event"
            duplicates += result.duplicate
            events += not result.duplicate
            eventlog.resolve_rejection(conn, row["id"], resolution, result.seq)
        else:
            still += 1
            conn.execute(
                "UPDATE rejections SET resolution = ? WHERE id = ?",
                (f"rejected:{verdict.code}", row["id"]),
            )
    return ReprocessSummary(len(rows), events, duplicates, still)


def _load_headers(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    loaded = json.loads(text)
    return {str(k): str(v) for k, v in loaded.items()} if isinstance(loaded, dict) else {}
