"""Public forms of personal data (analytics/privacy.py) and the CALLGATE_PUBLIC_PII switch:
the forms themselves, each policy through a real projection of the corpus (rebuild and
incremental agree), and a misspelt policy stopping the command line."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import pytest

from analytics import privacy, projector, tables
from gateway.config import Config
from gateway.db import connect
from gateway.wire.crypto import app_id_label
from tests.conftest import CALLGATE
from tests.corpus import APP_ID, flows
from tests.helpers_analytics import append_all, open_log, public_rows_are_public_forms, snapshot

URL = f"https://api.enablex.io/voice/v1/recording/{APP_ID}/rec-AC-0001.wav"


@pytest.mark.parametrize(
    ("number", "shown"),
    [
        ("919820012345", "+91*******345"),  # E.164 without "+", as EnableX sends it
        ("+14155550123", "+1*******123"),
        ("0044 20 7946 0958", "+44*******958"),
        ("+358401234567", "+358******567"),  # a three-digit country code
        ("08068475012", "********012"),  # national form: no country code to keep
        ("12345", "*****"),  # too short to keep any digit
        ("0012345", "*****"),
        ("sip:alice@example.com", "***"),
        ("", ""),
        (919820012345, "+91*******345"),  # a number sent as a JSON number
    ],
)
def test_masked_numbers(number: object, shown: str) -> None:
    assert privacy.mask_number(number) == shown


def test_digits_urls_and_texts_by_policy() -> None:
    assert [privacy.public_digits(d, "masked") for d in ("1", "42", "123", "40021#")] == [
        "1", "42", "***", "******",
    ]  # fmt: skip
    assert privacy.public_digits("40021#", "hidden") is None
    assert privacy.public_digits("7", "hidden") == "7"  # menu choices stay for the IVR stats
    assert privacy.public_digits("40021#", "full") == "40021#"
    assert privacy.public_digit_list('["1", "12345"]', "masked") == '["1","*****"]'
    assert privacy.public_digit_list('["1", "12345"]', "hidden") == '["1",null]'
    masked = privacy.public_url(URL, "masked")
    assert masked == f"https://api.enablex.io/voice/v1/recording/{app_id_label(APP_ID)}/rec-AC-0001.wav"
    assert privacy.public_url(URL, "full") == masked  # the app id is a secret, not PII
    assert privacy.public_url(URL, "hidden") is None
    assert APP_ID not in privacy.strip_app_id(f"https://u:pw@x.example/r?app={APP_ID}")
    assert "pw" not in privacy.strip_app_id("https://u:pw@x.example/r")
    assert privacy.public_text("talk to sales", "masked") is None
    assert privacy.public_text("talk to sales", "full") == "talk to sales"
    info = '[{"voice_id": "v1", "to": "919900000011", "state": "completed"}]'
    assert json.loads(privacy.public_call_info(info, "masked")) == [
        {"voice_id": "v1", "to": "+91*******011", "state": "completed"}
    ]
    assert privacy.public_call_info("{not json", "masked") is None  # unknown: nothing shown
    assert privacy.public_digit_list('"12345"', "masked") is None
    assert privacy.public_digit_list("[]", "hidden") == "[]"
    with pytest.raises(ValueError, match="masked, hidden, full"):
        privacy.check_policy("mask")


def _corpus_log(path: str) -> sqlite3.Connection:
    conn = open_log(path)
    append_all(conn, [raw for flow in flows() for raw in flow.events])
    return conn


@pytest.mark.parametrize("policy", privacy.POLICIES)
def test_each_policy_through_a_projection(tmp_path: Path, policy: str) -> None:
    conn = _corpus_log(str(tmp_path / "c.db"))
    projector.project_all(conn, batch=9, policy=policy)
    incremental = snapshot(conn)
    projector.rebuild(conn, policy=policy)
    assert snapshot(conn) == incremental  # rebuild ≡ incremental, private tables included
    assert public_rows_are_public_forms(conn, policy) > 0
    public = {r["voice_id"]: dict(r) for r in conn.execute("SELECT * FROM calls")}
    private = {
        r["voice_id"]: dict(r) for r in conn.execute(tables.cleartext_select(tables.CALLS))
    }
    numbers = [c["from_number"] for c in public.values() if c["from_number"]]
    texts = [c["speech"] for c in public.values() if c["speech"] not in (None, "[]")]
    keyed = [d for c in public.values() for d in json.loads(c["digits"] or "[]")]
    if policy == "masked":
        assert numbers and all(n.startswith("+91*******") for n in numbers)
        assert not texts and "*****" in keyed
    elif policy == "hidden":
        assert not numbers and not texts and None in keyed
    else:
        assert "919820012345" in numbers and texts and "12345" in keyed
    # Operators always read the cleartext, whatever the public policy.
    assert any(c["from_number"] == "919820012345" for c in private.values())
    assert any(c["recording_url"] and APP_ID in c["recording_url"] for c in private.values())
    assert not any(c["recording_url"] and APP_ID in c["recording_url"] for c in public.values())
    conn.close()


def test_policy_read_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert Config.from_env(env={}).public_pii == "masked"
    assert Config.from_env(env={"CALLGATE_PUBLIC_PII": " Hidden "}).public_pii == "hidden"
    with pytest.raises(ValueError, match="PUBLIC_PII must be one of masked, hidden, full"):
        Config.from_env(env={"CALLGATE_PUBLIC_PII": "mask"})
    conn = _corpus_log(str(tmp_path / "c.db"))
    monkeypatch.setenv("CALLGATE_PUBLIC_PII", "full")
    projector.project_all(conn)
    assert conn.execute("SELECT count(*) FROM calls WHERE from_number = '919820012345'").fetchone()
    conn.close()


def test_a_misspelt_policy_stops_every_command(tmp_path: Path) -> None:
    db = str(tmp_path / "c.db")
    connect(db).close()
    for argv in (["project", "--db", db], ["datasette", "--db", db, "--port", "1"]):
        out = subprocess.run(
            [CALLGATE, *argv], env={"PATH": "/usr/bin:/bin", "CALLGATE_PUBLIC_PII": "mask"},
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 1, (argv, out.stdout, out.stderr)
        assert "CALLGATE_PUBLIC_PII must be one of masked, hidden, full, not 'mask'" in out.stderr
        assert "Traceback" not in out.stderr
