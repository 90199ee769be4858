"""Hostile input: mutated EnableX requests never get a 5xx and are never dropped.

DESIGN.md invariants 2 and 7: every request becomes exactly one of a new
event, a duplicate of a logged event, or a rejection row, and bad input gets a
JSON 4xx, never a 500. Hypothesis mutates genuine corpus requests (headers
dropped, duplicated, mis-cased, conflicting; bodies truncated, bit-flipped,
re-encoded, nested, huge, non-UTF-8; JSON with NaN, BOM, deep nesting,
duplicate keys, both outside and inside the ciphertext; wrong content types;
other methods) and checks each answer against what the database gained.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import DEFAULT_MAX_BODY, Config
from gateway.wire import crypto
from tests.corpus import APP_ID, all_wire_requests, cases

URL = "/webhooks/enablex"
SOAK = bool(os.environ.get("CALLGATE_SOAK"))
ROUTED_METHODS = ("POST", "GET", "HEAD", "PUT", "PATCH", "DELETE")
PROTOCOL_HEADERS = ("x-algoritm", "x-algorithm", "x-format", "x-encoding", "content-type")
CIPHER_NAMES = ("aes-256-cbc", "AES-256-CBC", " aes256 ", "aes-128-cbc", "aes-192-cbc",
                "aes-256-ctr", "aes-256-ecb", "aes-256-gcm", "chacha20-poly1305", "md5",
                "rot13", "", " ", "aes-256-cbc\t", "none")
FORMATS = ("hex", "HEX", "base64", "base64url", "latin1", "binary", "utf8", "", "hex ")
ENCODINGS = ("utf8", "utf-8", "UTF8", "ucs2", "utf16le", "ascii", "latin1", "binary", "base64",
             "", "utf-32")
CONTENT_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=xyz", "application/json; charset=utf-16",
                 "application/octet-stream", "", "application/JSON", "*/*")
BAD_BYTES = (b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x00",
             b"\x80", b"\xef\xbb\xbf")
EVENT = {"voice_id": "hostile-0001", "state": "connected", "timestamp": "2024-03-11T09:15:09Z"}
# Hostile plaintexts to encrypt with the right app id, so they reach the inner JSON parser.
PLAINTEXTS: tuple[str, ...] = (
    '{"voice_id": "h1", "state": "connected", "confidence": NaN}',
    '{"voice_id": "h1", "state": "connected", "recording_duration": Infinity}',
    "\ufeff" + json.dumps(EVENT),
    "[" * 100_000 + "]" * 100_000,
    '{"voice_id": "h1", "x": ' + "[" * 50_000 + "]" * 50_000 + "}",
    '{"voice_id": "h1", "voice_id": "h2", "state": "ringing", "state": "connected"}',
    '{"voice_id": "h1", "state": "connected", "n": 1' + "0" * 400 + "}",
    '{"voice_id": "h1", "state": "connected", "f": 1e400}',
    '{"voice_id": "\\ud800", "state": "connected"}',
    '{"voice_id": "h1", "state": "connected"} trailing',
    "[]", '"just a string"', "42", "null", "true", "", " ", "{}",
    '{"voice_id": ["a"], "state": {"x": 1}, "timestamp": 5, "digit": [1]}',
    '{"voice_id": "h1", "timestamp": "2024-13-45T99:99:99Z", "state": "connected"}',
    '{"voice_id": "h1", "timeStamp": "not a time", "playstate": 7, "digits": {}}',
    '{"broadcast_id": "b1", "state": "broadcastcomplete", "resultSet": "oops"}',
    '{"voice_id": "h1", "state": "\\u0000", "from": "\\udfff\\ud800"}',
    '{"voice_id": "' + "v" * 200_000 + '"}',
    '{"voice_id": "h1", "state": "connected", "timestamp": 1' + "0" * 400 + "}",
    '{"broadcast_id": "b1", "state": "broadcastcomplete", "broadcast_call_info": '
    '[{"voice_id": "x", "to": 100000000000000000000000}]}',
    '{"broadcast_id": "b1", "state": "broadcastcomplete", "broadcast_call_info": '
    '[{"voice_id": "x", "to": ' + "[" * 300 + "]" * 300 + "}]}",
)
WRAPPERS: tuple[Callable[[bytes], bytes], ...] = (
    lambda b: b'{"encrypted_data": ' + b + b"}",
    lambda b: b"[" + b + b"]",
    lambda b: b'{"data": ' + b + b"}",
    lambda b: json.dumps(b.decode("utf-8", "replace")).encode(),
    lambda b: b'{"encrypted_data": "x", ' + b[1:],  # duplicate key, the genuine one last
    lambda b: b[:-1] + b', "encrypted_data": "00"}',  # duplicate key, a bad one last
    lambda b: b"\xef\xbb\xbf" + b,
    lambda b: b + b"\n" + b,
)
JSON_DOCUMENTS = (b"NaN", b'{"encrypted_data": NaN}', b'{"encrypted_data": Infinity}',
                  b"[" * 100_000, b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000,
                  b"{}", b"[]", b"null", b'""', b"0", b"-", b"\xef\xbb\xbf{}", b"{" + b" " * 900,
                  b'{"encrypted_data": 1e999}', b'{"encrypted_data": ["00"]}',
                  b'{"encrypted_data": null}', b'{"encrypted_data": "\\ud800"}')


@dataclass(frozen=True)
class Req:
    method: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def without(self, name: str) -> tuple[tuple[str, str], ...]:
        return tuple((k, v) for k, v in self.headers if k.lower() != name)


def base_requests() -> list[Req]:
    """Genuine corpus traffic (accepted and refused) plus a fresh event of our own."""
    wire = all_wire_requests()
    found = [Req("POST", tuple(r.headers.items()), r.body) for r in wire]
    for kind in ("edge", "bad"):
        for case in cases(kind):
            request = case["request"]
            found.append(Req("POST", tuple(request.headers.items()), request.body))
    own = crypto.encrypt_event(json.dumps(EVENT), "aes-256-cbc", "hex", "utf8", APP_ID)
    headers = dict(wire[0].headers)
    found.append(Req("POST", tuple(headers.items()), json.dumps({"encrypted_data": own}).encode()))
    return found


BASES = base_requests()
latin1_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40)


def _ciphertext(req: Req) -> str | None:
    try:
        outer = json.loads(req.body)
    except (ValueError, RecursionError):
        return None
    data = outer.get("encrypted_data") if isinstance(outer, dict) else None
    return data if isinstance(data, str) else None


def _with_ciphertext(req: Req, text: str) -> Req:
    return replace(req, body=json.dumps({"encrypted_data": text}).encode())


Mutation = Callable[[Req, st.DataObject], Req]


def drop_header(req: Req, data: st.DataObject) -> Req:
    if not req.headers:
        return req
    index = data.draw(st.integers(0, len(req.headers) - 1))
    return replace(req, headers=req.headers[:index] + req.headers[index + 1 :])


def duplicate_header(req: Req, data: st.DataObject) -> Req:
    if not req.headers:
        return req
    name, value = data.draw(st.sampled_from(req.headers))
    other = data.draw(st.one_of(st.just(value), latin1_text, st.sampled_from(CIPHER_NAMES)))
    return replace(req, headers=(*req.headers, (name, other)))


def miscase_header(req: Req, data: st.DataObject) -> Req:
    if not req.headers:
        return req
    index = data.draw(st.integers(0, len(req.headers) - 1))
    style = data.draw(st.sampled_from((str.upper, str.lower, str.swapcase, str.title)))
    name, value = req.headers[index]
    headers = list(req.headers)
    headers[index] = (style(name), value)
    return replace(req, headers=tuple(headers))


def conflicting_algorithm(req: Req, data: st.DataObject) -> Req:
    name = data.draw(st.sampled_from(("x-algorithm", "X-Algorithm", "x-algoritm", "X-ALGORITM")))
    value = data.draw(st.one_of(st.sampled_from(CIPHER_NAMES), latin1_text))
    return replace(req, headers=(*req.headers, (name, value)))


def set_header(req: Req, data: st.DataObject) -> Req:
    name = data.draw(st.sampled_from(PROTOCOL_HEADERS))
    pool = {"x-format": FORMATS, "x-encoding": ENCODINGS, "content-type": CONTENT_TYPES}
    value = data.draw(st.one_of(st.sampled_from(pool.get(name, CIPHER_NAMES)), latin1_text))
    return replace(req, headers=(*req.without(name), (name, value)))


def set_method(req: Req, data: st.DataObject) -> Req:
    return replace(req, method=data.draw(st.sampled_from(ROUTED_METHODS)))


def truncate(req: Req, data: st.DataObject) -> Req:
    return replace(req, body=req.body[: data.draw(st.integers(0, max(len(req.body) - 1, 0)))])


def bit_flip(req: Req, data: st.DataObject) -> Req:
    if not req.body:
        return req
    pos = data.draw(st.integers(0, len(req.body) - 1))
    flipped = req.body[pos] ^ (1 << data.draw(st.integers(0, 7)))
    return replace(req, body=req.body[:pos] + bytes((flipped,)) + req.body[pos + 1 :])


def flip_ciphertext(req: Req, data: st.DataObject) -> Req:
    """Still valid hex, different bytes: reaches the padding check and the plaintext parser."""
    text = _ciphertext(req)
    if not text:
        return req
    pos = data.draw(st.integers(0, len(text) - 1))
    char = data.draw(st.sampled_from("0123456789abcdef"))
    return _with_ciphertext(req, text[:pos] + char + text[pos + 1 :])


def reencode_ciphertext(req: Req, data: st.DataObject) -> Req:
    text = _ciphertext(req)
    try:
        raw = bytes.fromhex(text or "")
    except ValueError:
        return req
    fmt = data.draw(st.sampled_from(("base64", "base64url", "latin1", "HEX")))
    written = {
        "base64": base64.b64encode(raw).decode(),
        "base64url": base64.urlsafe_b64encode(raw).decode().rstrip("="),
        "latin1": raw.decode("latin-1"),
        "HEX": raw.hex().upper(),
    }[fmt]
    changed = _with_ciphertext(req, written)
    if data.draw(st.booleans()):  # say so in x-format, or not
        changed = replace(changed, headers=(*req.without("x-format"), ("x-format", fmt.lower())))
    return changed


def reencode_body(req: Req, data: st.DataObject) -> Req:
    codec = data.draw(st.sampled_from(("utf-16", "utf-16-le", "utf-32", "utf-8-sig", "cp500")))
    return replace(req, body=req.body.decode("utf-8", "replace").encode(codec, "replace"))


def nest(req: Req, data: st.DataObject) -> Req:
    return replace(req, body=data.draw(st.sampled_from(WRAPPERS))(req.body))


def huge(req: Req, data: st.DataObject) -> Req:
    """Bodies around the limit: whitespace padding (still valid JSON) or a giant string."""
    target = DEFAULT_MAX_BODY + data.draw(st.sampled_from((-64, 0, 1, 4096, DEFAULT_MAX_BODY)))
    if data.draw(st.booleans()):
        return replace(req, body=req.body + b" " * max(target - len(req.body), 0))
    return _with_ciphertext(req, "a" * max(target - 20, 0))


def non_utf8(req: Req, data: st.DataObject) -> Req:
    pos = data.draw(st.integers(0, len(req.body)))
    junk = data.draw(st.sampled_from(BAD_BYTES))
    return replace(req, body=req.body[:pos] + junk + req.body[pos:])


def json_document(req: Req, data: st.DataObject) -> Req:
    return replace(req, body=data.draw(st.sampled_from(JSON_DOCUMENTS)))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
event_like = st.fixed_dictionaries(
    {},
    optional={
        "voice_id": st.one_of(st.text(max_size=12), json_values),
        "broadcast_id": st.text(max_size=8),
        "state": st.one_of(st.sampled_from(("connected", "Incoming Call", "disconnected",
                                            "failed", "initiated", "recognized", "")),
                           json_values),
        "playstate": json_values,
        "digit": json_values,
        "timestamp": st.one_of(st.sampled_from(("2021-02-18T12:47-00Z", "2024-03-11T09:15:09Z",
                                                "2024-02-30T25:00:00+05:30", "")), json_values),
        "extra": json_values,
    },
)


def hostile_plaintext(req: Req, data: st.DataObject) -> Req:
    """Encrypt with the right app id, so the hostile text reaches the strict JSON parser."""
    text = data.draw(st.one_of(st.sampled_from(PLAINTEXTS), event_like.map(json.dumps),
                               json_values.map(json.dumps)))
    encoding = data.draw(st.sampled_from(("utf8", "ucs2", "latin1")))
    try:
        cipher = crypto.encrypt_event(text, "aes-256-cbc", "hex", encoding, APP_ID)
    except crypto.CryptoError:
        return req
    said = data.draw(st.sampled_from((encoding, "utf8")))  # sometimes lie about the encoding
    headers = {"Content-Type": "application/json", "x-algoritm": "aes-256-cbc",
               "x-format": "hex", "x-encoding": said}
    return Req("POST", tuple(headers.items()), json.dumps({"encrypted_data": cipher}).encode())


MUTATIONS: tuple[Mutation, ...] = (drop_header, duplicate_header, miscase_header,
                                   conflicting_algorithm, set_header, set_method, truncate,
                                   bit_flip, flip_ciphertext, reencode_ciphertext, reencode_body,
                                   nest, huge, non_utf8, json_document, hostile_plaintext)


def counts(conn: sqlite3.Connection) -> tuple[int, int]:
    row = conn.execute("SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM rejections)")
    return tuple(row.fetchone())  # type: ignore[return-value]


def outcome_of(status: int, body: Any, gained: tuple[int, int]) -> str:
    """Which one thing the request became, judged from the answer AND the rows it added."""
    if status == 200 and isinstance(body, dict) and gained == (1, 0) and not body["duplicate"]:
        return "event"
    if status == 200 and isinstance(body, dict) and gained == (0, 0) and body["duplicate"]:
        return "duplicate"
    if 400 <= status < 500 and gained == (0, 1):
        return "rejection"
    return f"INCONSISTENT status={status} gained={gained} body={str(body)[:200]}"


@dataclass
class Stats:
    tried: int = 0
    server_errors: int = 0
    outcomes: Counter[str] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.outcomes = Counter()


@pytest.fixture
def fuzz_target(
    make_app: Callable[[Config], Flask], tmp_path: Path
) -> Iterator[tuple[FlaskClient, sqlite3.Connection, Stats]]:
    db = str(tmp_path / "fuzz.db")
    client = make_app(Config(db_path=db, app_ids=(APP_ID,))).test_client()
    conn = sqlite3.connect(db)
    stats = Stats()
    yield client, conn, stats
    conn.close()
    print(f"\nhostile input: {stats.tried} fuzz cases tried, {stats.server_errors} 5xx seen; "
          f"outcomes {dict(stats.outcomes)}")


@pytest.mark.timeout(3600 if SOAK else 300)
@settings(max_examples=10_000 if SOAK else 700, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_mutated_requests_never_5xx_and_each_becomes_one_outcome(
    fuzz_target: tuple[FlaskClient, sqlite3.Connection, Stats], data: st.DataObject
) -> None:
    client, conn, stats = fuzz_target
    req = data.draw(st.sampled_from(BASES), label="base")
    for mutation in data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3),
                              label="mutations"):
        req = mutation(req, data)
    before = counts(conn)
    answer = client.open(URL, method=req.method, data=req.body, headers=list(req.headers))
    after = counts(conn)
    stats.tried += 1
    stats.server_errors += answer.status_code >= 500
    body = answer.get_json(silent=True)
    outcome = outcome_of(answer.status_code, body, (after[0] - before[0], after[1] - before[1]))
    stats.outcomes[outcome.split(" ")[0]] += 1
    assert answer.status_code < 500, (answer.status_code, body)
    assert not outcome.startswith("INCONSISTENT"), outcome
    if outcome == "rejection" and req.method != "HEAD":
        assert set(body) == {"error", "detail"}, body


@pytest.mark.parametrize("method", ["OPTIONS", "TRACE", "PROPFIND", "CONNECT", "FOO"])
def test_unrouted_methods_are_refused_and_kept(client: FlaskClient, db_path: str,
                                               method: str) -> None:
    """Invariant 2: every request, whatever its method, is an event or a rejection row."""
    request = BASES[0]
    answer = client.open(URL, method=method, data=request.body, headers=list(request.headers))
    with sqlite3.connect(db_path) as conn:
        kept = conn.execute("SELECT error, method FROM rejections").fetchall()
    assert answer.status_code == 405
    assert kept == [("method_not_allowed", method)]


def _chunks(body: bytes, size: int = 65536) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_hostile_requests_through_the_real_server(server: Any, db_path: str) -> None:
    """What the test client cannot show: real HTTP parsing, chunked bodies, real lengths."""
    good = BASES[-1]
    headers = dict(good.headers)
    own = crypto.encrypt_event("[" * 100_000, "aes-256-cbc", "hex", "utf8", APP_ID)
    sends: list[tuple[str, dict[str, Any]]] = [
        ("POST", {"content": good.body, "headers": headers}),  # a new event
        ("POST", {"content": good.body, "headers": headers}),  # its redelivery
        ("POST", {"content": b"[" * 100_000, "headers": headers}),
        ("POST", {"content": json.dumps({"encrypted_data": own}).encode(), "headers": headers}),
        ("POST", {"content": b"\xef\xbb\xbf" + good.body, "headers": headers}),
        ("POST", {"content": b'{"encrypted_data": NaN}', "headers": headers}),
        ("POST", {"content": b"\xff\xfe" + good.body, "headers": headers}),
        ("POST", {"content": b"x" * (3 * DEFAULT_MAX_BODY), "headers": headers}),
        ("POST", {"content": _chunks(b" " * (2 * DEFAULT_MAX_BODY)), "headers": headers}),
        ("POST", {"content": _chunks(good.body + b" " * 1000, 100), "headers": headers}),
        ("POST", {"content": good.body, "headers": [*headers.items(), ("X-Format", "base64")]}),
        ("POST", {"content": good.body, "headers": {**headers, "x-algorithm": "aes-128-cbc"}}),
        ("POST", {"content": good.body,
                  "headers": {**headers, "Content-Type": "application/x-www-form-urlencoded"}}),
        ("PUT", {"content": good.body, "headers": headers}),
        ("DELETE", {"headers": headers}),
        ("GET", {}),
    ]
    with sqlite3.connect(db_path) as conn, httpx.Client(timeout=30) as http:
        before = counts(conn)
        outcomes = Counter()
        for method, kwargs in sends:
            answer = http.request(method, server.url + URL, **kwargs)
            assert answer.status_code < 500, (method, answer.status_code, answer.text[:200])
            body = answer.json()
            if answer.status_code == 200:
                outcomes["duplicate" if body["duplicate"] else "event"] += 1
            else:
                assert set(body) == {"error", "detail"}
                outcomes["rejection"] += 1
        after = counts(conn)
    print(f"\nreal server: {len(sends)} hostile requests -> {dict(outcomes)}")
    assert (after[0] - before[0], after[1] - before[1]) == (
        outcomes["event"], outcomes["rejection"]
    )
    assert sum(outcomes.values()) == len(sends)
    assert outcomes["event"] == 1 and outcomes["duplicate"] == 2  # redelivery, chunked+padded


def _raw_post(url: str, head: str, body: bytes) -> bytes:
    """One request written byte for byte (httpx cannot send broken chunked framing)."""
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_broken_or_cut_bodies_are_answered_400_and_kept(server: Any, db_path: str) -> None:
    """Before, gunicorn's InvalidChunkSize escaped the body read: 503 "internal", nothing
    kept. Now what gunicorn handed over before the error (here nothing: it fails the whole
    read) is judged like any body, and the request is kept with its headers."""
    good = BASES[-1]
    head = (f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "x-algoritm: aes-256-cbc\r\nx-format: hex\r\nx-encoding: utf8\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n")
    half = len(good.body) // 2
    broken = {
        "bad size": b"zz\r\n" + good.body + b"\r\n0\r\n\r\n",
        "bad size after a good chunk": b"%x\r\n" % half + good.body[:half] + b"\r\nzz\r\n",
    }
    for name, body in broken.items():
        answer = _raw_post(server.url, head, body)
        status_line = answer.split(b"\r\n", 1)[0]
        assert b" 400 " in status_line, (name, answer[:300])
        assert b'"error":"bad_body"' in answer, (name, answer[-300:])
    # A declared length the client never sends: it closes its side half-way.
    import socket
    from urllib.parse import urlsplit

    where = urlsplit(server.url)
    with socket.create_connection((where.hostname, where.port), timeout=10) as sock:
        head = (f"POST {URL} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "x-algoritm: aes-256-cbc\r\nx-format: hex\r\nx-encoding: utf8\r\n"
                f"Content-Length: {len(good.body)}\r\n\r\n")
        sock.sendall(head.encode() + good.body[:half])
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert b" 400 " in answer.split(b"\r\n", 1)[0], answer[:300]
    with sqlite3.connect(db_path) as conn:
        kept = conn.execute("SELECT error, body_size FROM rejections ORDER BY id").fetchall()
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    assert kept == [("bad_body", 0), ("bad_body", 0), ("bad_body", half)]


BIG = "1" + "0" * 400
# Valid JSON the log could not write back (orjson writes 64-bit integers and 255 levels at
# most, SQLite signed 64-bit integers): before the parser refused them, each was accepted,
# then failed while being sealed (503, nothing kept, the valid events of its batch with it)
# or, past 2**63 - 1, stopped the projector for good.
UNSTORABLE = {
    "timestamp": '{"voice_id": "u1", "state": "connected", "timestamp": ' + BIG + "}",
    "negative timestamp": '{"voice_id": "u2", "state": "connected", "timestamp": -' + BIG + "}",
    "confidence": '{"voice_id": "u3", "state": "connected", "confidence": ' + BIG + "}",
    "recording_duration": '{"voice_id": "u4", "state": "connected", "recording_duration": '
    + BIG + "}",
    "failed_calls": '{"broadcast_id": "u5", "state": "broadcastcomplete", '
    '"resultSet": {"failed_calls": ' + BIG + "}}",
    "an integer SQLite cannot hold": '{"voice_id": "u8", "state": "disconnected", '
    '"recording_duration": 9223372036854775808}',
    "a number past 64 bits": '{"broadcast_id": "u6", "state": "broadcastcomplete", '
    '"broadcast_call_info": [{"voice_id": "x", "to": 100000000000000000000000}]}',
    "nested 300 deep": '{"broadcast_id": "u7", "state": "broadcastcomplete", '
    '"broadcast_call_info": [{"voice_id": "x", "to": ' + "[" * 300 + "]" * 300 + "}]}",
}


def test_json_the_log_cannot_store_back_is_refused_and_kept_beside_valid_events(
    server: Any, db_path: str
) -> None:
    """Invariants 2 and 7 through the real server: each unstorable event is a 400 and a
    rejection row, and the valid events sent with it at once are all logged."""
    headers = dict(BASES[-1].headers)

    def body(text: str) -> bytes:
        cipher = crypto.encrypt_event(text, "aes-256-cbc", "hex", "utf8", APP_ID)
        return json.dumps({"encrypted_data": cipher}).encode()

    valid = [
        body(json.dumps({"voice_id": f"ok-{n}", "state": "connected",
                         "timestamp": 1710148509000 + n, "confidence": 2**63 - 1}))
        for n in range(40)
    ]
    bad = [body(text) for text in UNSTORABLE.values()]
    sends = valid[:20] + bad + valid[20:]

    from concurrent.futures import ThreadPoolExecutor

    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(
            lambda content: http.post(server.url + URL, content=content, headers=headers), sends
        ))
    statuses = [a.status_code for a in answers]
    assert statuses[:20] + statuses[-20:] == [200] * 40, statuses
    assert statuses[20:-20] == [400] * len(UNSTORABLE), statuses
    assert all(a.json()["error"] == "undecryptable" for a in answers[20:-20])
    with sqlite3.connect(db_path) as conn:
        events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        kept = conn.execute("SELECT error, detail FROM rejections ORDER BY id").fetchall()
    assert events == 40
    assert [error for error, _ in kept] == ["bad_plaintext"] * len(UNSTORABLE)
    details = {detail for _, detail in kept}
    assert any("integer beyond 64 bits" in d for d in details), details
    assert any("deeper than" in d for d in details), details
    from analytics import projector
    from gateway.db import connect

    conn = connect(db_path)
    assert projector.project_all(conn) == 40  # every logged event can be projected
    conn.close()


def _oracle_probes() -> dict[str, tuple[str, bytes]]:
    """Requests failing at each decrypt stage: (expected exact code, body)."""
    good = crypto.encrypt_event(json.dumps(EVENT), "aes-256-cbc", "hex", "utf8", APP_ID)
    raw = bytes.fromhex(good)
    tampered = raw[:-17] + bytes((raw[-17] ^ 0x01,)) + raw[-16:]  # padding byte disturbed

    def body(text: str) -> bytes:
        return json.dumps({"encrypted_data": text}).encode()

    def enc(text: str, encoding: str = "utf8", app_id: str = APP_ID) -> bytes:
        return body(crypto.encrypt_event(text, "aes-256-cbc", "hex", encoding, app_id))

    return {
        "odd hex": ("bad_ciphertext", body(good[:-1])),
        "not hex": ("bad_ciphertext", body("zz" + good[2:])),
        "empty": ("bad_ciphertext", body("")),
        "truncated block": ("bad_decrypt", body(good[:-32])),
        "partial block": ("bad_decrypt", body(good[:-2])),
        "tampered padding": ("bad_decrypt", body(tampered.hex())),
        "wrong app id": ("bad_decrypt", enc(json.dumps(EVENT), app_id="not-the-app-id")),
        "not json": ("bad_plaintext", enc("hello, EnableX")),
        "not utf-8": ("bad_plaintext", enc('{"voice_id": "\u00e9"}', encoding="latin1")),
        "NaN": ("bad_plaintext", enc('{"voice_id": "v", "x": NaN}')),
        "BOM": ("bad_plaintext", enc("\ufeff" + json.dumps(EVENT))),
    }


def test_decrypt_stage_failures_are_byte_identical(server: Any, db_path: str) -> None:
    """No padding oracle (WIRE.md §2): status, headers and body say nothing about the stage."""
    headers = {"Content-Type": "application/json", "x-algoritm": "aes-256-cbc",
               "x-format": "hex", "x-encoding": "utf8"}
    probes = _oracle_probes()
    seen: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
    with httpx.Client(timeout=10) as http:
        for name, (_, body) in probes.items():
            answer = http.post(server.url + URL, content=body, headers=headers)
            kept = sorted((k.lower(), v) for k, v in answer.headers.items() if k.lower() != "date")
            seen[name] = (answer.status_code, kept, answer.content)
    with sqlite3.connect(db_path) as conn:
        codes = [row[0] for row in conn.execute("SELECT error FROM rejections ORDER BY id")]
    assert codes == [code for code, _ in probes.values()], "the exact code is kept internally"
    first = next(iter(seen.values()))
    assert first[0] == 400 and json.loads(first[2])["error"] == "undecryptable"
    different = {name: answer for name, answer in seen.items() if answer != first}
    assert not different, f"distinguishable answers: {different}"
