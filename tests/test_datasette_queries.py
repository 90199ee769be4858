"""Every canned query, run by a real Datasette on the corpus database, against figures
computed here straight from the flow files (tests/test_datasette_helpers.Reference)."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from analytics.datasette_app import load_metadata
from tests.test_datasette_helpers import (
    OPERATOR_TOKEN,
    TERMINAL,
    Built,
    Datasette,
    RefCall,
    RefEvent,
    nearest_rank,
    playstate_of,
    state_of,
    utc_text,
)

SPEECH_PLAYSTATES = {
    "speech_recognized": None,
    "speechrecognized": "recognized",
    "speechunrecognized": "unrecognized",
    "speechtimeout": "timeout",
}
SPEECH_STATES = ("recognized", "unrecognized", "timeout")


def approx(value: float) -> Any:
    return pytest.approx(value, abs=0.002)


def day(call: RefCall) -> str:
    return call.started.strftime("%Y-%m-%d")


def speech_result(event: RefEvent) -> str | None:
    """WIRE.md §4.7.2: the state when it is a speech result, else the play state's suffix."""
    state, playstate = state_of(event.raw), playstate_of(event.raw)
    if playstate in SPEECH_PLAYSTATES or state in SPEECH_STATES:
        return state if state in SPEECH_STATES else SPEECH_PLAYSTATES.get(playstate or "")
    return None


def test_every_canned_query_is_covered() -> None:
    """A new canned query must get a test here: the list is read from metadata.yml."""
    metadata = load_metadata()
    names = set(metadata["databases"]["callgate"]["queries"])
    tested = {name[len("test_") :] for name in globals() if name.startswith("test_")}
    assert names <= tested, names - tested
    assert len(names) >= 12


def test_calls_per_day(ds: Datasette, built: Built) -> None:
    calls = built.reference.calls.values()
    expected = Counter((day(c), c.direction, c.outcome) for c in calls)
    rows = ds.query("calls_per_day")
    assert {(r["day"], r["direction"], r["outcome"]): r["calls"] for r in rows} == expected
    assert sum(r["calls"] for r in rows) == len(built.reference.calls) == 24
    # since / until keep only the days in between (both included).
    some = ds.query("calls_per_day", since="2024-03-14", until="2024-03-15")
    window = Counter(
        (day(c), c.direction, c.outcome) for c in calls if "2024-03-14" <= day(c) <= "2024-03-15"
    )
    assert {(r["day"], r["direction"], r["outcome"]): r["calls"] for r in some} == window
    assert {"answered", "busy", "no_answer"} <= {r["outcome"] for r in rows}


def test_asr_ner_per_day(ds: Datasette, built: Built) -> None:
    by_day: dict[str, list[RefCall]] = defaultdict(list)
    for call in built.reference.calls.values():
        by_day[day(call)].append(call)
    rows = {r["day"]: r for r in ds.query("asr_ner_per_day")}
    assert set(rows) == set(by_day)
    for when, calls in by_day.items():
        outcomes = Counter(c.outcome for c in calls)
        row = rows[when]
        assert row["attempts"] == len(calls)
        for outcome in ("answered", "busy", "no_answer", "rejected", "failed", "in_progress"):
            assert row[outcome] == outcomes[outcome], (when, outcome)
        reached = sum(outcomes[o] for o in ("answered", "busy", "no_answer", "rejected"))
        assert row["asr_pct"] == round(100.0 * outcomes["answered"] / len(calls), 1)
        assert row["ner_pct"] == round(100.0 * reached / len(calls), 1)
    # The broadcast day has an unanswered leg, the busy call's day answers nothing.
    assert rows["2024-03-14"]["asr_pct"] == 80.0 and rows["2024-03-14"]["ner_pct"] == 100.0
    assert rows["2024-03-16"]["asr_pct"] == 0.0 and rows["2024-03-16"]["ner_pct"] == 100.0


def test_acd_per_day(ds: Datasette, built: Built) -> None:
    talk: dict[str, list[int]] = defaultdict(list)
    for call in built.reference.calls.values():
        if call.expect.get("duration_s") is not None:
            talk[day(call)].append(int(call.expect["duration_s"]))
    rows = {r["day"]: r for r in ds.query("acd_per_day")}
    assert set(rows) == set(talk)
    for when, seconds in talk.items():
        assert rows[when]["calls_with_talk_time"] == len(seconds)
        assert rows[when]["talk_seconds"] == sum(seconds)
        assert rows[when]["acd_s"] == round(sum(seconds) / len(seconds), 1)
        assert rows[when]["longest_s"] == max(seconds)
    only = ds.query("acd_per_day", since="2024-03-15", until="2024-03-15")
    assert [r["acd_s"] for r in only] == [round(sum(talk["2024-03-15"]) / 2, 1)]


def test_answer_and_ring_times(ds: Datasette, built: Built) -> None:
    tta: dict[str, list[float]] = defaultdict(list)
    ring: dict[str, list[float]] = defaultdict(list)
    for call in built.reference.calls.values():
        if call.answered is not None:
            seconds = (call.answered - call.started).total_seconds()
            tta[call.direction].append(seconds)
            tta["all"].append(seconds)
        if call.ring_seconds is not None:
            ring[call.direction].append(call.ring_seconds)
            ring["all"].append(call.ring_seconds)
    rows = {r["direction"]: r for r in ds.query("answer_and_ring_times")}
    assert set(rows) == set(tta) | set(ring)
    for group, row in rows.items():
        assert row["answered_calls"] == len(tta[group])
        assert row["time_to_answer_p50_s"] == approx(nearest_rank(tta[group], 50))
        assert row["time_to_answer_p95_s"] == approx(nearest_rank(tta[group], 95))
        assert row["rung_calls"] == len(ring[group])
        assert row["ring_p50_s"] == approx(nearest_rank(ring[group], 50))
        assert row["ring_p95_s"] == approx(nearest_rank(ring[group], 95))
    # The broadcast leg nobody answered rang for 60 s before it failed.
    assert rows["broadcast"]["ring_p95_s"] == approx(60.0)


def test_time_to_answer_per_day(ds: Datasette, built: Built) -> None:
    per_day: dict[str, list[float]] = defaultdict(list)
    for call in built.reference.calls.values():
        if call.answered is not None:
            seconds = (call.answered - call.started).total_seconds()
            per_day[utc_text(call.started)[:10]].append(seconds)
    rows = ds.query("time_to_answer_per_day")
    assert [r["day"] for r in rows] == sorted(per_day)
    for row in rows:
        values = per_day[row["day"]]
        assert row["answered_calls"] == len(values)
        assert row["average_s"] == approx(round(sum(values) / len(values), 1))
        assert row["p50_s"] == approx(nearest_rank(values, 50))
        assert row["p95_s"] == approx(nearest_rank(values, 95))
    assert any(len(v) > 2 for v in per_day.values())
    days = sorted(per_day)
    since = ds.query("time_to_answer_per_day", since=days[1], until=days[-2])
    assert [r["day"] for r in since] == days[1:-1]


CALL_LEVEL = ("incomingcall", "initiated", "ringing", "connected", "disconnected", "failed")


def numbers(call: RefCall) -> tuple[str, str]:
    """Caller and called number: from the call's first call-level event that has them."""
    for event in call.ordered:
        raw = event.raw
        if state_of(raw) in CALL_LEVEL and not playstate_of(raw) and raw.get("from"):
            return str(raw["from"]), str(raw.get("to") or "")
    return "", ""


def test_find_calls(ds: Datasette, built: Built) -> None:
    calls = built.reference.calls.values()

    def found(**params: str) -> set[str]:
        rows = ds.query("find_calls", token=OPERATOR_TOKEN, **params)
        return {r["voice_id"] for r in rows}

    def ending(digits: str) -> set[str]:
        return {c.voice_id for c in calls if any(n.endswith(digits) for n in numbers(c))}

    assert ending("5577") and len(ending("0001")) == 1
    assert found(number="5577") == ending("5577")  # last digits
    assert found(number="+91 98333-55577") == ending("919833355577")  # full, as written
    assert found(number="0001") == ending("0001")
    assert found(number="99999999999999") == set()
    window = {c.voice_id for c in calls if "2024-03-14" <= day(c) <= "2024-03-15"}
    assert found(since="2024-03-14", until="2024-03-15") == window
    assert found(number="12345", since="2024-03-14", until="2024-03-15") == (
        window & ending("12345")
    )
    # Personal data: anonymous visitors are refused, whatever they ask.
    assert ds.get(f"/{ds.name}/find_calls.json", number="5577").status_code == 403
    assert ds.get(f"/{ds.name}/find_calls", number="5577").status_code == 403


def test_disconnect_reasons(ds: Datasette, built: Built) -> None:
    ended = [c for c in built.reference.calls.values() if c.final_state in TERMINAL]
    reasons = Counter(c.normalised_reason or "(none)" for c in ended)
    answered = Counter(c.normalised_reason or "(none)" for c in ended if c.answered is not None)
    spellings: defaultdict[str, set[str]] = defaultdict(set)
    for c in ended:
        if c.disconnect_reason is not None:
            spellings[c.normalised_reason or "(none)"].add(c.disconnect_reason)
    rows = ds.query("disconnect_reasons")
    assert {r["disconnect_reason"]: r["calls"] for r in rows} == reasons
    for row in rows:
        assert row["answered_calls"] == answered[row["disconnect_reason"]]
        assert row["share_pct"] == round(100.0 * row["calls"] / len(ended), 1)
        raw = set(row["raw_spellings"].split(" | ")) if row["raw_spellings"] else set()
        assert raw == spellings[row["disconnect_reason"]], row
    assert rows[0]["disconnect_reason"] == reasons.most_common(1)[0][0]
    assert {"busy", "no_answer", "normal_clearing", "(none)"} <= set(reasons)
    assert "Normal Clearing" in spellings["normal_clearing"]


def shown_digits(value: object) -> str:
    """What anonymous visitors see of keyed digits: menu choices (1-2 keys) as keyed, longer
    strings (a PIN, an account number) as one * per key."""
    text = str(value)
    return text if len(text) <= 2 else "*" * len(text)


def test_ivr_digits(ds: Datasette, built: Built) -> None:
    times: Counter[tuple[str, str]] = Counter()
    calls: dict[tuple[str, str], set[str]] = defaultdict(set)
    for call in built.reference.calls.values():
        for event in call.events:
            raw = event.raw
            value = raw.get("digits") if raw.get("digits") not in (None, "") else raw.get("digit")
            if playstate_of(raw) == "digitcollected":
                key = (raw.get("prompt_ref") or "(no prompt_ref)", shown_digits(value))
            elif state_of(raw) == "dtmfcollected":
                key = ("(mid-call dtmf)", shown_digits(value))
            else:
                continue
            times[key] += 1
            calls[key].add(call.voice_id)
    rows = ds.query("ivr_digits")
    assert {(r["prompt_ref"], r["digits"]): r["times"] for r in rows} == times
    assert {(r["prompt_ref"], r["digits"]): r["calls"] for r in rows} == {
        k: len(v) for k, v in calls.items()
    }
    assert ("(mid-call dtmf)", "0") in times  # the integer 0 is a digit, not "no digit"
    one = ds.query("ivr_digits", prompt_ref="voice_menu")
    assert {r["digits"] for r in one} == {d for (p, d) in times if p == "voice_menu"} == {"1", "7"}


def test_ivr_prompt_outcomes(ds: Datasette, built: Built) -> None:
    plays: dict[tuple[str, str], list[RefEvent]] = defaultdict(list)
    for call in built.reference.calls.values():
        for event in call.ordered:
            if event.raw.get("play_id"):
                plays[(call.voice_id, event.raw["play_id"])].append(event)
    expected: dict[str, Counter[str]] = defaultdict(Counter)
    for events in plays.values():
        if any(speech_result(e) for e in events):
            continue  # a speech play: see speech_outcomes
        refs = [e.raw["prompt_ref"] for e in events if e.raw.get("prompt_ref")]
        prompt = refs[-1] if refs else "(no prompt_ref)"
        states = [playstate_of(e.raw) for e in events]
        got, timed_out = "digitcollected" in states, states[-1] == "menutimeout"
        expected[prompt].update(
            plays=1, with_digits=int(got), menu_timeouts=int(timed_out),
            no_input=int(not got and not timed_out),
        )
    rows = {r["prompt_ref"]: r for r in ds.query("ivr_prompt_outcomes")}
    assert set(rows) == set(expected)
    for prompt, counts in expected.items():
        for column in ("plays", "with_digits", "menu_timeouts", "no_input"):
            assert rows[prompt][column] == counts[column], (prompt, column)
    # Flow 03's menu timed out four times, the broadcast leg's once.
    assert rows["2"]["menu_timeouts"] == 5


def test_speech_outcomes(ds: Datasette, built: Built) -> None:
    results: Counter[tuple[str, str]] = Counter()
    confidence: dict[tuple[str, str], list[float]] = defaultdict(list)
    calls: dict[tuple[str, str], set[str]] = defaultdict(set)
    for call in built.reference.calls.values():
        for event in call.events:
            result = speech_result(event)
            if result is None:
                continue
            key = (event.raw.get("prompt_ref") or "(no prompt_ref)", result)
            results[key] += 1
            calls[key].add(call.voice_id)
            if event.raw.get("confidence") is not None:
                confidence[key].append(float(event.raw["confidence"]))
    rows = ds.query("speech_outcomes")
    assert {(r["prompt_ref"], r["result"]): r["results"] for r in rows} == results
    for row in rows:
        key = (row["prompt_ref"], row["result"])
        assert row["calls"] == len(calls[key])
        values = confidence[key]
        assert row["avg_confidence"] == (round(sum(values) / len(values), 3) if values else None)
    assert {r["result"] for r in rows} == set(SPEECH_STATES)


def test_recording_coverage(ds: Datasette, built: Built) -> None:
    answered = [c for c in built.reference.calls.values() if c.answered is not None]
    groups: dict[str, list[RefCall]] = defaultdict(list)
    for call in answered:
        groups[call.direction].append(call)
    groups["all"] = answered
    rows = {r["direction"]: r for r in ds.query("recording_coverage")}
    assert set(rows) == set(groups)
    for group, members in groups.items():
        recorded = sum(c.recorded for c in members)
        assert rows[group]["answered_calls"] == len(members)
        assert rows[group]["recorded_calls"] == recorded
        assert rows[group]["coverage_pct"] == round(100.0 * recorded / len(members), 1)
    assert rows["all"]["recorded_calls"] == 4  # flows 07, 08, 10 and 27


def test_peak_concurrency(ds: Datasette, built: Built) -> None:
    """Brute force: the level at each hour start and at every call start inside the hour."""
    spans = []
    for call in built.reference.calls.values():
        end = call.ended or call.last
        if end > call.started:
            spans.append((call.started, end))

    def level(moment: datetime) -> int:
        return sum(1 for start, end in spans if start <= moment < end)

    def floor_hour(moment: datetime) -> datetime:
        return moment.replace(minute=0, second=0, microsecond=0)

    hours: set[datetime] = {floor_hour(c.started) for c in built.reference.calls.values()}
    for start, end in spans:
        hour = floor_hour(start)
        while hour < end:
            hours.add(hour)
            hour += timedelta(hours=1)
    expected = {}
    for hour in hours:
        candidates = [hour] + [s for s, _ in spans if hour <= s < hour + timedelta(hours=1)]
        started = sum(1 for c in built.reference.calls.values() if floor_hour(c.started) == hour)
        expected[hour.strftime("%Y-%m-%dT%H:00:00Z")] = (max(map(level, candidates)), started)
    rows = ds.query("peak_concurrency")
    assert [r["hour"] for r in rows] == sorted(expected)
    assert {r["hour"]: (r["peak_concurrent_calls"], r["calls_started"]) for r in rows} == expected
    assert max(r["peak_concurrent_calls"] for r in rows) == 3  # the three-leg broadcast


def test_call_timeline(ds: Datasette, built: Built) -> None:
    call = built.reference.call("ce605e25-9333-4b4c-8820-80c565d64d0e")  # out of order + dupes
    ordered = call.ordered
    rows = ds.query("call_timeline", voice_id=call.voice_id)
    assert len(rows) == len(ordered) == call.expect["unique_events"]
    assert [r["position"] for r in rows] == list(range(1, len(rows) + 1))
    assert [r["occurred_at"] for r in rows] == [utc_text(e.at) for e in ordered]
    assert [r["state"] for r in rows] == [
        playstate_of(e.raw) or state_of(e.raw) for e in ordered
    ]
    late = [int(any(o.arrival < e.arrival and o.at > e.at for o in call.events)) for e in ordered]
    assert [r["arrived_late"] for r in rows] == late
    assert sum(late) == 2  # ringing after connected, playfinished after disconnected
    received = [utc_text(e.at + timedelta(milliseconds=e.delay_ms)) for e in ordered]
    assert [r["received_at"] for r in rows] == received
    assert [r["digits"] for r in rows if r["digits"]] == [
        shown_digits(d) for d in call.expect["digits"]
    ]
    assert ds.query("call_timeline", voice_id="no-such-call") == []


def test_stuck_calls(ds: Datasette, built: Built) -> None:
    now = datetime.now(UTC)
    open_calls = [c for c in built.reference.calls.values() if c.final_state not in TERMINAL]
    stuck = sorted(
        (c for c in open_calls if c.last < now - timedelta(minutes=30)), key=lambda c: c.last
    )
    rows = ds.query("stuck_calls")
    assert [r["voice_id"] for r in rows] == [c.voice_id for c in stuck]
    assert len(rows) == 1 and rows[0]["final_state"] == "connected"  # the edge-case call
    minutes = (now - stuck[0].last).total_seconds() / 60
    assert rows[0]["minutes_since_last_event"] == pytest.approx(minutes, abs=2)
    assert rows[0]["last_event_at"] == utc_text(stuck[0].last)
    # A threshold longer than the call's age: not stuck yet.
    assert ds.query("stuck_calls", minutes=str(int(minutes) + 600)) == []
    assert len(ds.query("stuck_calls", minutes=str(int(minutes) - 600))) == 1


def test_webhook_lateness(ds: Datasette, built: Built) -> None:
    events = built.reference.events
    delays = [e.delay_ms / 1000 for e in events]
    rows = {r["class"]: r for r in ds.query("webhook_lateness")}
    everything = rows["all"]
    assert everything["events"] == len(events)
    assert everything["p50_s"] == approx(nearest_rank(delays, 50))
    assert everything["p95_s"] == approx(nearest_rank(delays, 95))
    assert everything["max_s"] == approx(max(delays))
    assert sum(r["events"] for name, r in rows.items() if name != "all") == len(events)
    since = "2024-03-18"
    recent = [
        e.delay_ms / 1000
        for e in events
        if utc_text(e.at + timedelta(milliseconds=e.delay_ms)) >= since
    ]
    subset = {r["class"]: r for r in ds.query("webhook_lateness", since=since)}
    assert subset["all"]["events"] == len(recent)
    assert subset["all"]["p50_s"] == approx(nearest_rank(recent, 50))
    assert subset["all"]["p95_s"] == approx(nearest_rank(recent, 95))


def test_rejections_by_error(ds: Datasette, built: Built) -> None:
    rejections = built.reference.rejections
    counts = Counter((r["error"], r["http_status"]) for r in rejections)
    rows = ds.query("rejections_by_error", token=OPERATOR_TOKEN)
    assert {(r["error"], r["http_status"]): r["rejections"] for r in rows} == counts
    for row in rows:
        times = [
            r["received_at"]
            for r in rejections
            if (r["error"], r["http_status"]) == (row["error"], row["http_status"])
        ]
        assert row["unresolved"] == len(times)
        assert (row["first_at"], row["last_at"]) == (min(times), max(times))
    assert ds.get(f"/{ds.name}/rejections_by_error.json").status_code == 403


def test_forwarding_failures(ds: Datasette, built: Built) -> None:
    forwarded = sum(1 for e in built.reference.events if state_of(e.raw) == built.forwarded_kind)
    rows = {r["subscription_id"]: r for r in ds.query("forwarding_failures", token=OPERATOR_TOKEN)}
    assert set(rows) == set(built.subscriptions.values())
    ok = rows[built.subscriptions["ok"]]
    assert (ok["failed_attempts"], ok["dead_deliveries"], ok["last_failure"]) == (0, 0, None)
    for role in ("failing", "unreachable"):
        row = rows[built.subscriptions[role]]
        # schedule (0, 0): two tries per delivery, then dead.
        assert row["failed_attempts"] == 2 * forwarded, role
        assert row["deliveries_with_failures"] == forwarded
        assert row["dead_deliveries"] == forwarded
        assert row["retrying_deliveries"] == 0
    assert rows[built.subscriptions["failing"]]["last_failure"] == "HTTP 500"
    assert "refused" in rows[built.subscriptions["unreachable"]]["last_failure"].lower()
    assert forwarded == 22
    assert ds.get(f"/{ds.name}/forwarding_failures.json").status_code == 403


def test_log_head(ds: Datasette, built: Built) -> None:
    """The head hash is recomputed here from the rows with the contract's definition."""
    conn = sqlite3.connect(built.db)
    conn.row_factory = sqlite3.Row
    prev = "0" * 64
    last: dict[str, Any] = {}
    for row in conn.execute("SELECT * FROM events ORDER BY seq"):
        last = dict(row)
        assert last["prev_hash"] == prev
        body = {k: v for k, v in last.items() if k not in ("prev_hash", "hash")}
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        prev = hashlib.sha256((prev + text).encode()).hexdigest()
    conn.close()
    rows = ds.query("log_head")
    assert len(rows) == 1
    head = rows[0]
    assert head["head_seq"] == head["events"] == len(built.reference.events) == last["seq"]
    assert head["head_hash"] == prev
    newest = built.reference.events[-1]
    assert head["occurred_at"] == utc_text(newest.at)
    assert head["projector_seq"] == head["head_seq"] and head["projector_lag"] == 0
