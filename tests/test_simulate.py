"""The simulator: seeded scenarios, EnableX-exact encryption (checked with openssl), the CLI.

The end-to-end comparison with the projections (1,000 calls) is in test_simulate_e2e.py.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from gateway.simulate.generator import DEMO_APP_ID, MIX, Simulation, generate, spread_starts
from gateway.simulate.sender import (
    ALGORITHMS,
    DEMO_MARGIN,
    ENCODINGS,
    FORMATS,
    WireOptions,
    demo_simulation,
    event_json,
    render_request,
    run_demo,
)
from tests.conftest import CALLGATE, RunningServer, server_env
from tests.corpus import flows

START = datetime(2024, 5, 1, 9, 0, tzinfo=UTC)
APP = "sim-test-app-0001"  # made up


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return generate(600, seed=42, start=START, duplicates=0.1, reorder=0.2)


def _time_of(payload: dict[str, Any]) -> datetime:
    """Independent reading of the timestamp forms the simulator writes (incl. `-00Z`)."""
    text = payload.get("timestamp") or payload["timeStamp"]
    if text.endswith("-00Z"):
        text = text[:-4] + ":00+00:00"
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _voice_id(payload: dict[str, Any]) -> str | None:
    return payload.get("voice_id") or payload.get("voice_Id")


# --------------------------------------------------------------------------- generator


def test_same_seed_same_traffic_and_truth() -> None:
    a = generate(120, seed=9, start=START, duplicates=0.2, reorder=0.2)
    b = generate(120, seed=9, start=START, duplicates=0.2, reorder=0.2)
    c = generate(120, seed=10, start=START, duplicates=0.2, reorder=0.2)
    assert [d.payload for d in a.deliveries] == [d.payload for d in b.deliveries]
    assert a.truth_lines() == b.truth_lines()
    assert {t.voice_id for t in a.calls}.isdisjoint({t.voice_id for t in c.calls})


def test_exact_call_count_and_every_scenario(sim: Simulation) -> None:
    assert len(sim.calls) == 600
    assert len({c.voice_id for c in sim.calls}) == 600
    scenarios = Counter(c.scenario for c in sim.calls)
    expected = {name for name in MIX if name != "broadcast"} | {"broadcast_leg"}
    assert set(scenarios) == expected, scenarios
    # every call has its events, and the truth counts exactly those
    per_call = Counter(_voice_id(d.payload) for d in sim.deliveries if not d.redelivery)
    assert all(per_call[c.voice_id] == c.event_count for c in sim.calls)
    for n in (0, 1, 2, 7):  # a broadcast never overshoots the requested number
        assert len(generate(n, seed=n, start=START).calls) == n


def test_outcomes_cover_the_rules(sim: Simulation) -> None:
    finals = Counter(c.final_state for c in sim.calls)
    assert set(finals) == {"disconnected", "failed"}
    never_connected = [c for c in sim.calls if c.duration_s is None]
    assert {c.scenario for c in never_connected} >= {
        "outbound_busy", "outbound_no_answer", "inbound_abandoned", "broadcast_leg",
    }  # fmt: skip
    assert any(c.digits == ["0"] or "0" in c.digits for c in sim.calls)
    assert any(c.speech for c in sim.calls)
    results = Counter(r for c in sim.calls for r in c.speech_results)
    assert set(results) == {"timeout", "unrecognized", "recognized"}
    recorded = [c for c in sim.calls if c.scenario == "outbound_recording"]
    assert any(c.recording_url for c in recorded) and any(not c.recording_url for c in recorded)
    assert sum(1 for c in sim.calls if len(c.digits) > 1) > 0
    # broadcasts: both summary shapes, totals match their legs
    assert {b.state for b in sim.broadcasts} == {"broadcastcomplete", "broadcastcall_complete"}
    by_id = {c.voice_id: c for c in sim.calls}
    for b in sim.broadcasts:
        answered = sum(1 for v in b.legs if by_id[v].duration_s is not None)
        assert (b.successful, b.failed) == (answered, len(b.legs) - answered)


def test_spread_starts_follows_the_day_and_week() -> None:
    start = datetime(2024, 4, 29, tzinfo=UTC)  # a Monday
    end = start + timedelta(days=14)
    offsets = spread_starts(2000, start, end, seed=3)
    assert len(offsets) == 2000 and offsets == sorted(offsets)
    assert offsets[0] >= 0 and offsets[-1] < 14 * 86_400_000
    moments = [start + timedelta(milliseconds=ms) for ms in offsets]
    per_day = Counter(m.date() for m in moments)
    assert len(per_day) == 14
    weekday = [n for d, n in per_day.items() if d.weekday() < 5]
    weekend = [n for d, n in per_day.items() if d.weekday() >= 5]
    assert min(weekday) > 2 * max(weekend)
    business = sum(1 for m in moments if 9 <= m.hour < 17)
    night = sum(1 for m in moments if m.hour < 6)
    assert business > 0.5 * len(moments) and night < 0.05 * len(moments)
    assert spread_starts(2000, start, end, seed=3) == offsets  # seeded
    few = spread_starts(14, start, end, seed=1)  # as many calls as days: one each
    assert len({(start + timedelta(milliseconds=ms)).date() for ms in few}) == 14


def test_demo_spreads_fourteen_days_up_to_now_with_stuck_calls() -> None:
    now = datetime(2024, 5, 15, 0, 10, tzinfo=UTC)  # just after midnight: today is short
    demo = demo_simulation(300, seed=11, now=now)
    assert len(demo.calls) == 300
    starts: dict[str, datetime] = {}
    for d in demo.deliveries:
        vid = _voice_id(d.payload)
        at = _time_of(d.payload)
        assert at <= now - DEMO_MARGIN + timedelta(minutes=20), at  # nothing from the future
        if vid is not None and (vid not in starts or at < starts[vid]):
            starts[vid] = at
    days = {at.date() for at in starts.values()}
    assert len(days) == 14 and max(days) == (now - DEMO_MARGIN).date()
    finals = Counter(c.final_state for c in demo.calls)
    assert 0 < sum(1 for c in demo.calls if c.scenario == "inbound_stuck") <= 10
    assert finals["connected"] >= 1  # the stuck ones never ended
    answered = sum(1 for c in demo.calls if c.duration_s is not None)
    assert 0.5 < answered / len(demo.calls) < 0.85
    assert demo.redeliveries > 0


def test_timestamps_strictly_increase_within_a_call(sim: Simulation) -> None:
    times: dict[str | None, list[datetime]] = defaultdict(list)
    for d in sorted((d for d in sim.deliveries if not d.redelivery), key=lambda d: d.index):
        times[_voice_id(d.payload)].append(_time_of(d.payload))
    for vid, seq in times.items():
        if vid is not None:
            assert seq == sorted(seq) and len(set(seq)) == len(seq), vid


def test_redeliveries_and_reordering(sim: Simulation) -> None:
    originals = {d.index: d for d in sim.deliveries if not d.redelivery}
    redeliveries = [d for d in sim.deliveries if d.redelivery]
    assert 0.05 < len(redeliveries) / len(originals) < 0.15
    for d in redeliveries:
        assert d.payload == originals[d.index].payload
        assert d.send_ms > originals[d.index].send_ms
    # nothing is sent before it happened; some calls' events arrive out of event order
    late = 0
    last: dict[str | None, datetime] = {}
    for d in sim.deliveries:
        at = _time_of(d.payload)
        assert (at - sim.start).total_seconds() * 1000 <= d.send_ms + 1
        vid = _voice_id(d.payload)
        if vid and not d.redelivery:
            if vid in last and at < last[vid]:
                late += 1
            last[vid] = max(at, last.get(vid, at))
    assert late > 100


def test_uses_the_corpus_shapes_and_the_docs_quirks(sim: Simulation) -> None:
    corpus_keys: set[str] = set()
    corpus_states: set[str] = set()
    for flow in flows():
        for ev in flow.events:
            corpus_keys |= set(ev)
            corpus_states.add(str(ev.get("state", "")).lower())
    # WIRE.md names these too (§4.3, §4.7, §5) although no corpus flow carries them
    corpus_keys |= {"recognized_phrase"}
    corpus_states |= {"incomingcall", "transferred", ""}
    keys: set[str] = set()
    states: set[str] = set()
    for d in sim.deliveries:
        keys |= set(d.payload)
        states.add(str(d.payload.get("state", "")).lower())
    assert keys <= corpus_keys, keys - corpus_keys
    assert states <= corpus_states, states - corpus_states

    blob = "\n".join(event_json(d.payload) for d in sim.deliveries)
    for quirk in ('"voice_Id"', '"timeStamp"', '"incoming call"', '"playstateus"',
                  '"digit":0', '"playstate":"speech_recognized"', '"speechrecognized"',
                  '"resultSet":{"successfull_calls"', '"broadcast_call_info"',
                  '"description":"Recording Failed"', '"recordstate":"failed"', '"+05:30"'):
        assert quirk.strip('"') in blob, quirk
    assert re.search(r'"timeStamp?":"\d{4}-\d\d-\d\dT\d\d:\d\d-00Z"', blob, re.I)
    # a failing bridge leg after connected, then the call goes on
    assert re.search(r'"state":"failed","from":"1555555', blob)


# --------------------------------------------------------------------------- the wire


def _openssl_decrypt(ciphertext: bytes, algorithm: str, app_id: str) -> bytes:
    """Node createDecipher ≡ `openssl enc -d -<alg> -md md5 -nosalt -pass pass:<app id>`."""
    done = subprocess.run(
        ["openssl", "enc", "-d", f"-{algorithm}", "-md", "md5", "-nosalt",
         "-pass", f"pass:{app_id}"],
        input=ciphertext, capture_output=True, check=True,
    )  # fmt: skip
    return done.stdout


def _raw_ciphertext(text: str, fmt: str) -> bytes:
    if fmt == "hex":
        return bytes.fromhex(text)
    if fmt == "base64url":
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return base64.b64decode(text, validate=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl CLI not installed")
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_openssl_decrypts_every_algorithm_and_format(algorithm: str, fmt: str) -> None:
    small = generate(3, seed=len(algorithm) * 7 + len(fmt), start=START)
    sample = small.deliveries[:: max(1, len(small.deliveries) // 4)]
    for encoding in ENCODINGS:
        wire = WireOptions(app_id=APP, algorithm=algorithm, fmt=fmt, encoding=encoding)
        for d in sample:
            headers, body = render_request(d.payload, wire)
            assert headers["x-algoritm"] == algorithm and headers["x-format"] == fmt
            assert headers["x-encoding"] == encoding
            outer = json.loads(body)
            assert list(outer) == ["encrypted_data"]
            plain = _openssl_decrypt(_raw_ciphertext(outer["encrypted_data"], fmt), algorithm, APP)
            text = plain.decode("utf-8" if encoding == "utf8" else "utf-16-le")
            assert json.loads(text) == d.payload


def test_header_spellings_plain_bodies_and_identical_redeliveries(sim: Simulation) -> None:
    payload = sim.deliveries[0].payload
    h, _ = render_request(payload, WireOptions(app_id=APP, spelling="algorithm"))
    assert "x-algorithm" in h and "x-algoritm" not in h
    h, _ = render_request(payload, WireOptions(app_id=APP, spelling="both"))
    assert h["x-algorithm"] == h["x-algoritm"] == "aes-256-cbc"
    h, body = render_request(payload, WireOptions(app_id=APP, plain=True))
    assert h == {"Content-Type": "application/json"} and json.loads(body) == payload
    # fixed IV: a redelivery is the same ciphertext, byte for byte
    dup = next(d for d in sim.deliveries if d.redelivery)
    wire = WireOptions(app_id=APP, fmt="base64")
    assert render_request(dup.payload, wire) == render_request(dup.payload, wire)


# --------------------------------------------------------------------------- the command


def _events(db: str) -> tuple[int, Counter[str]]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT class FROM events").fetchall()
    return len(rows), Counter(r[0] for r in rows)


def test_cli_sends_paced_traffic_that_the_gateway_accepts(tmp_path: Path) -> None:
    db = str(tmp_path / "cg.db")
    server = RunningServer(db, server_env(ENABLEX_APP_ID=APP)).start()
    try:
        truth = tmp_path / "truth.jsonl"
        done = subprocess.run(
            [CALLGATE, "simulate", "--url", server.url, "--calls", "40", "--rate", "40",
             "--time-scale", "300", "--app-id", APP, "--format", "base64",
             "--header-spelling", "both", "--duplicates", "0.2", "--seed", "3",
             "--truth", str(truth)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        lines = [json.loads(line) for line in truth.read_text().splitlines()]
        expected = generate(40, seed=3, start=START, duplicates=0.2)
        assert [r for r in lines if r["kind"] == "call"] == [
            c.as_json() for c in expected.calls
        ]  # the truth does not depend on the start time
        out = dict(re.findall(r"^(\w+)\s+(\d+)", done.stdout, re.M))
        assert int(out["sent"]) == len(expected.deliveries)
        assert int(out["acknowledged"]) == len(expected.deliveries)
        assert int(out["duplicates"]) == expected.redeliveries > 0
        assert int(out["refused"]) == 0
        assert re.search(r"latency\s+p50 [\d.]+ ms, p99 [\d.]+ ms", done.stdout)
        count, classes = _events(db)
        assert count == expected.event_count
        assert {"call", "play", "speech", "bridge", "recording"} <= set(classes)

        # the wrong app id: every request refused, and the command says so
        wrong = subprocess.run(
            [CALLGATE, "simulate", "--url", server.url + "/webhooks/enablex", "--calls", "2",
             "--rate", "0", "--app-id", "not-the-app-id", "--no-progress"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert wrong.returncode == 1
        refused = int(re.search(r"^refused\s+(\d+)", wrong.stdout, re.M).group(1))  # type: ignore[union-attr]
        assert refused > 0 and "undecryptable" in wrong.stdout
        assert _events(db)[0] == count
    finally:
        server.stop()


def test_run_demo_plays_labelled_calls(tmp_path: Path) -> None:
    db = str(tmp_path / "cg.db")
    server = RunningServer(db, server_env(ENABLEX_APP_ID=DEMO_APP_ID)).start()
    try:
        url = server.url + "/webhooks/enablex"
        report = run_demo(url, calls=30, seed=1)
        assert report.ok, report.summary()
        assert report.acknowledged == report.sent > 30
        import sqlite3

        from gateway.db import connect
        from gateway.log import keystore, sealing

        log = connect(db)
        unseal = sealing.Opener(keystore.for_database(log))
        owners = {json.loads(unseal.raw(r[0]) or "{}").get("owner_ref")
                  for r in log.execute("SELECT raw FROM events WHERE class = 'call'")}
        log.close()
        with sqlite3.connect(db) as conn:
            times = [r[0] for r in conn.execute("SELECT occurred_at FROM events")]
        assert "callgate-demo" in owners
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
        assert max(times) <= now  # replayed history: no event from the future
    finally:
        server.stop()
