"""The gateway's HTTP contract (WIRE.md §1, §3) through the real Flask app and a real DB."""

from __future__ import annotations

import json
import sqlite3

import pytest

from gateway.config import Config
from gateway.db import connect
from gateway.log import keystore, sealing
from gateway.wire import crypto
from tests.corpus import APP_ID, cases, flows

URL = "/webhooks/enablex"
HEADERS = {"Content-Type": "application/json", "x-algoritm": "aes-256-cbc", "x-format": "hex",
           "x-encoding": "utf8"}
EVENT = {"voice_id": "f1aa71c0", "state": "connected", "timestamp": "2024-03-11T09:15:09Z"}


def encrypted(event: object, algorithm: str = "aes-256-cbc", app_id: str = APP_ID) -> bytes:
    text = event if isinstance(event, str) else json.dumps(event)
    data = crypto.encrypt_event(text, algorithm, "hex", "utf8", app_id)
    return json.dumps({"encrypted_data": data}).encode()


def rows(db_path: str, sql: str) -> list[tuple]:
    with sqlite3.connect(db_path) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.parametrize("flow", flows(), ids=lambda f: f.name)
def test_every_flow_is_accepted_and_deduplicated(flow, client, db_path) -> None:
    answers = [client.post(URL, data=r.body, headers=r.headers) for r in flow.wire]
    assert all(a.status_code == 200 for a in answers), [a.get_json() for a in answers]
    bodies = [a.get_json() for a in answers]
    assert sum(not b["duplicate"] for b in bodies) == flow.expect["unique_events"]
    assert sum(b["duplicate"] for b in bodies) == flow.expect.get("duplicates", 0)
    assert rows(db_path, "SELECT count(*) FROM events")[0][0] == flow.expect["unique_events"]
    # A duplicate is answered with the seq of the event it repeats.
    seqs = {b["event_id"]: b["seq"] for b in bodies if not b["duplicate"]}
    assert all(seqs[b["event_id"]] == b["seq"] for b in bodies if b["duplicate"])


@pytest.mark.parametrize("case", cases("bad"), ids=lambda c: c["name"])
def test_bad_requests_are_refused_and_kept(case, client, db_path) -> None:
    request, expect = case["request"], case["expect"]
    answer = client.post(URL, data=request.body, headers=request.headers)
    assert answer.status_code == expect["http_status"]
    body = answer.get_json()
    assert set(body) == {"error", "detail"}
    if expect["error"] in {"bad_ciphertext", "bad_decrypt", "bad_plaintext"}:
        assert body["error"] == "undecryptable"
    else:
        assert body["error"] == expect["error"]
    assert rows(db_path, "SELECT error, http_status FROM rejections") == [
        (expect["error"], expect["http_status"])
    ]
    assert rows(db_path, "SELECT count(*) FROM events") == [(0,)]


@pytest.mark.parametrize("case", cases("edge"), ids=lambda c: c["name"])
def test_edge_requests_are_accepted(case, client, db_path) -> None:
    request = case["request"]
    answer = client.post(URL, data=request.body, headers=request.headers)
    assert answer.status_code == 200, answer.get_json()
    conn = connect(db_path)
    event = json.loads(sealing.Opener(keystore.for_database(conn)).raw(
        rows(db_path, "SELECT raw FROM events")[0][0]))
    conn.close()
    assert event == case["expect"]["event"]


def test_decrypt_stage_failures_answer_byte_identically(client, db_path) -> None:
    good = json.loads(encrypted(EVENT))["encrypted_data"]
    wrong_key = encrypted(EVENT, app_id="not-the-app-id")
    truncated = json.dumps({"encrypted_data": good[:-32]}).encode()
    odd_hex = json.dumps({"encrypted_data": good[:-1]}).encode()
    not_json = encrypted("this is not json")
    answers = [client.post(URL, data=b, headers=HEADERS) for b in
               (wrong_key, truncated, odd_hex, not_json)]
    assert len({(a.status_code, a.data) for a in answers}) == 1
    codes = sorted(r[0] for r in rows(db_path, "SELECT error FROM rejections"))
    assert codes == ["bad_ciphertext", "bad_decrypt", "bad_decrypt", "bad_plaintext"]


@pytest.mark.parametrize(
    ("headers", "body", "code", "status"),
    [
        ({**HEADERS, "x-algorithm": "aes-128-cbc"}, None, "conflicting_headers", 400),
        ({**HEADERS, "x-algoritm": "aes-256-gcm"}, None, "unsupported_algorithm", 400),
        ({**HEADERS, "x-algoritm": "md5"}, None, "unknown_algorithm", 400),
        ({**HEADERS, "x-format": "base32"}, None, "bad_encoding", 400),
        ({**HEADERS, "x-encoding": "ebcdic"}, None, "bad_encoding", 400),
        ({k: v for k, v in HEADERS.items() if k != "x-format"}, None, "missing_header", 400),
        (HEADERS, encrypted([EVENT]), "bad_event", 400),
        (HEADERS, encrypted('{"voice_id": "a", "x": NaN}'), "bad_plaintext", 400),
        (HEADERS, encrypted("\ufeff" + json.dumps(EVENT)), "bad_plaintext", 400),
        (HEADERS, encrypted({"state": "connected"}), "missing_voice_id", 422),
        (HEADERS, b'{"encrypted_data": 42}', "bad_body", 400),
        (HEADERS, b"[1, 2]", "bad_body", 400),
        ({"Content-Type": "application/json"}, b'{"encrypted_data": "00"}', "missing_header", 400),
        ({"Content-Type": "application/json"}, b"\xff\xfe", "bad_body", 400),
    ],
)
def test_each_error_code(client, db_path, headers, body, code, status) -> None:
    answer = client.post(URL, data=encrypted(EVENT) if body is None else body, headers=headers)
    assert answer.status_code == status
    stored = rows(db_path, "SELECT error, detail, headers FROM rejections")
    assert [s[0] for s in stored] == [code]
    assert APP_ID not in stored[0][1] and APP_ID not in answer.get_data(as_text=True)
    kept = json.loads(stored[0][2])
    assert set(kept) <= {"content-type", "content-length", "x-algoritm", "x-algorithm",
                         "x-format", "x-encoding", "user-agent", "x-forwarded-for",
                         "x-request-id"}


def test_header_names_match_in_any_case_and_a_refusal_keeps_them(client, db_path) -> None:
    # Headers are looked up in the request as needed and only listed for a refusal.
    shouted = {"CONTENT-TYPE": "application/json", "X-Algoritm": "aes-256-cbc",
               "X-FORMAT": "hex", "x-Encoding": "utf8", "X-Request-Id": "r-1", "User-Agent": "t"}
    assert client.post(URL, data=encrypted(EVENT), headers=shouted).status_code == 200
    body = encrypted({"state": "connected"})
    assert client.post(URL, data=body, headers=shouted).status_code == 422
    [(kept,)] = rows(db_path, "SELECT headers FROM rejections")
    assert json.loads(kept) == {
        "content-type": "application/json", "content-length": str(len(body)),
        "x-algoritm": "aes-256-cbc", "x-format": "hex", "x-encoding": "utf8",
        "x-request-id": "r-1", "user-agent": "t",
    }


def test_redelivery_is_answered_with_the_original_seq(client, db_path) -> None:
    first = client.post(URL, data=encrypted(EVENT), headers=HEADERS).get_json()
    again = client.post(URL, data=encrypted(EVENT), headers=HEADERS).get_json()
    # The same event in another key order is the same event (canonical JSON).
    reordered = dict(reversed(list(EVENT.items())))
    third = client.post(URL, data=encrypted(reordered), headers=HEADERS).get_json()
    assert first["duplicate"] is False and again["duplicate"] is True
    assert first["seq"] == again["seq"] == third["seq"]
    assert rows(db_path, "SELECT count(*) FROM events") == [(1,)]


def test_unknown_events_are_kept_not_refused(client, db_path) -> None:
    event = {"voice_id": "u-1", "state": "teleported", "timestamp": "2024-03-11T09:15:09Z"}
    assert client.post(URL, data=encrypted(event), headers=HEADERS).status_code == 200
    assert rows(db_path, "SELECT class, state FROM events") == [("unknown", "teleported")]


def test_several_app_ids_tried_in_order_and_the_label_recorded(make_app, db_path) -> None:
    app = make_app(Config(db_path=db_path, app_ids=("other-app-id", APP_ID)))
    answer = app.test_client().post(URL, data=encrypted(EVENT), headers=HEADERS)
    assert answer.status_code == 200
    label = rows(db_path, "SELECT app_id FROM events")[0][0]
    assert label == crypto.app_id_label(APP_ID) and APP_ID not in label


def test_plaintext_can_be_switched_off(make_app, db_path) -> None:
    app = make_app(Config(db_path=db_path, app_ids=(APP_ID,), allow_plaintext=False))
    answer = app.test_client().post(URL, json=EVENT)
    assert answer.status_code == 400 and answer.get_json()["error"] == "missing_header"


def test_secret_path_token(make_app, db_path) -> None:
    app = make_app(Config(db_path=db_path, app_ids=(APP_ID,), webhook_token="s3cret-path"))
    client = app.test_client()
    assert client.post(URL + "/s3cret-path", data=encrypted(EVENT), headers=HEADERS).status_code \
        == 200
    wrong = client.post(URL + "/guess", data=encrypted(EVENT), headers=HEADERS)
    bare = client.post(URL, data=encrypted(EVENT), headers=HEADERS)
    assert wrong.status_code == bare.status_code == 404
    stored = rows(db_path, "SELECT error, path FROM rejections")
    assert [s[0] for s in stored] == ["bad_token", "bad_token"]
    assert all("s3cret" not in s[1] and "guess" not in s[1] for s in stored)


def test_posts_to_any_path_under_the_endpoint_are_an_event_or_kept(make_app, db_path) -> None:
    """A trailing slash reaches the endpoint; any other path under it is a kept bad_token.
    Before, each of these POSTs got a 404 (or a 308 to a merged path) and was stored nowhere."""
    app = make_app(Config(db_path=db_path, app_ids=(APP_ID,), webhook_token="s3cret-path"))
    client = app.test_client()
    sends = {
        URL + "/s3cret-path/": 200,
        URL + "/s3cret-path/extra": 404,
        URL + "/s3cret-path/extra/": 404,
        URL + "//s3cret-path": 404,
        URL + "/": 404,
    }
    for n, (path, status) in enumerate(sends.items()):
        event = {**EVENT, "voice_id": f"path-{n}"}
        answer = client.post(path, data=encrypted(event), headers=HEADERS)
        assert answer.status_code == status, (path, answer.status_code)
        assert answer.is_json and set(answer.get_json()) >= ({"status"} if status == 200
                                                             else {"error", "detail"})
    assert rows(db_path, "SELECT count(*) FROM events") == [(1,)]
    stored = rows(db_path, "SELECT error, path FROM rejections")
    assert [error for error, _ in stored] == ["bad_token"] * 4
    assert all("s3cret" not in path and "extra" not in path for _, path in stored)

    tokenless = make_app(Config(db_path=db_path + "-2", app_ids=(APP_ID,))).test_client()
    assert tokenless.post(URL + "/", data=encrypted(EVENT), headers=HEADERS).status_code == 200
    assert tokenless.post(URL + "/a/b", data=encrypted(EVENT), headers=HEADERS).status_code == 404
    assert rows(db_path + "-2", "SELECT error FROM rejections") == [("bad_token",)]


def test_other_methods_get_json_405_and_are_recorded(client, db_path) -> None:
    for method in ("get", "put", "delete"):
        answer = getattr(client, method)(URL)
        assert answer.status_code == 405 and answer.get_json()["error"] == "method_not_allowed"
    assert rows(db_path, "SELECT count(*) FROM rejections") == [(3,)]


def test_unknown_paths_answer_json_not_html(client) -> None:
    answer = client.get("/nope")
    assert answer.status_code == 404 and answer.get_json()["error"] == "not_found"


def test_public_metrics_do_not_tell_the_decrypt_stages_apart(client, db_path) -> None:
    """The answer to every decrypt-stage failure is identical (no padding oracle); so must
    the public /metrics be. Before, its error label said bad_decrypt (padding wrong) or
    bad_plaintext (padding right), which was enough to decrypt a captured request."""
    good = json.loads(encrypted(EVENT))["encrypted_data"]
    raw = bytes.fromhex(good)
    bad_padding = raw[:-17] + bytes((raw[-17] ^ 0x01,)) + raw[-16:]
    not_json = crypto.encrypt_event("hello, EnableX", "aes-256-cbc", "hex", "utf8", APP_ID)
    label = 'callgate_webhook_requests_total{error="undecryptable",outcome="rejected"}'

    def undecryptable() -> float:  # the registry lives as long as the test process
        text = client.get("/metrics").get_data(as_text=True)
        for exact in ("bad_decrypt", "bad_plaintext", "bad_ciphertext"):
            assert exact not in text
        found = [line for line in text.splitlines() if line.startswith(label)]
        return float(found[0].split()[-1]) if found else 0.0

    before = undecryptable()
    for cipher in (bad_padding.hex(), not_json, "zz"):
        answer = client.post(URL, data=json.dumps({"encrypted_data": cipher}), headers=HEADERS)
        assert answer.get_json()["error"] == "undecryptable"
    assert undecryptable() == before + 3
    kept = rows(db_path, "SELECT error FROM rejections ORDER BY error")
    assert kept == [("bad_ciphertext",), ("bad_decrypt",), ("bad_plaintext",)]


def test_healthz_and_metrics(client) -> None:
    client.post(URL, data=encrypted(EVENT), headers=HEADERS)
    client.post(URL, data=encrypted(EVENT), headers=HEADERS)
    client.post(URL, data=b"", headers=HEADERS)
    health = client.get("/healthz")
    assert health.status_code == 200 and health.get_json()["head_seq"] == 1
    text = client.get("/metrics").get_data(as_text=True)
    assert 'callgate_webhook_requests_total{error="",outcome="accepted"}' in text
    assert 'callgate_webhook_requests_total{error="bad_body",outcome="rejected"}' in text
    assert "callgate_ingest_seconds_bucket" in text
    assert "callgate_newest_event_age_seconds" in text
