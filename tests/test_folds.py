"""The pure folds against the EnableX corpus and the WIRE.md §5 rules, with plain dicts."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest

from analytics import folds, tables
from analytics.folds import project_broadcast, project_call
from gateway.wire.schemas import normalise
from tests.helpers_analytics import RECEIVED_AT, check_call, corpus, expected_calls, normalised

FLOWS = corpus()
VOICE = "vid-0001"


def by_call(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    calls: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event["voice_id"] is not None:
            calls.setdefault(event["voice_id"], []).append(event)
    return calls


def by_broadcast(events: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        if event.get("broadcast_id"):
            found.setdefault(event["broadcast_id"], []).append(event)
    return found


@pytest.mark.parametrize("flow", FLOWS, ids=[f.name for f in FLOWS])
def test_corpus_flow(flow: Any) -> None:
    events = normalised(flow.events)
    expect = flow.expect
    calls = by_call(events)
    wanted = expected_calls(expect)
    assert set(calls) == set(wanted)
    for voice_id, want in wanted.items():
        projection = project_call(calls[voice_id])
        check_call(projection["calls"], want, flow.name)
        if "recording_states" in want:
            states = [
                r["state"] for r in projection["timeline"] if r["class"] == "recording"
            ]
            assert states == want["recording_states"]
    if "unique_events" in expect and "calls" in expect:
        assert len(events) == expect["unique_events"]
    if "broadcast" in expect:
        want = expect["broadcast"]
        row = project_broadcast(by_broadcast(events)[want["broadcast_id"]])["broadcasts"]
        assert (row["state"], row["successful_calls"], row["failed_calls"]) == (
            want["state"],
            want["successful"],
            want["failed"],
        )
        assert row["legs"] == len(wanted)


@pytest.mark.parametrize("flow", FLOWS, ids=[f.name for f in FLOWS])
def test_corpus_any_input_order_gives_the_same_rows(flow: Any) -> None:
    """The fold sorts by (occurred_at, seq) itself: the list order passed in is irrelevant."""
    rng = random.Random(flow.name)
    for events in by_call(normalised(flow.events)).values():
        reference = project_call(events)
        for _ in range(5):
            shuffled = events[:]
            rng.shuffle(shuffled)
            assert project_call(shuffled) == reference


# --- focused rules (WIRE.md §4.7, §5) -------------------------------------------------


def ev(seq: int, at: str, **raw: Any) -> dict[str, Any]:
    """A normalised event built through the real normaliser, at second `at` of a minute."""
    raw.setdefault("voice_id", VOICE)
    raw["timestamp"] = f"2024-05-01T10:00:{at}Z" if len(at) <= 6 else at
    event = normalise(raw, RECEIVED_AT)
    event["seq"] = seq
    event["received_at"] = RECEIVED_AT
    return event


def call(*events: dict[str, Any]) -> dict[str, Any]:
    return project_call(list(events))["calls"]


def test_disconnected_is_terminal_even_when_later_events_follow() -> None:
    row = call(
        ev(1, "00", state="initiated"),
        ev(2, "05", state="connected"),
        ev(3, "20", state="disconnected", disconnect_reason="User Busy"),
        ev(4, "25", state="connected"),  # a late redelivery with a later time: no revival
        ev(5, "26", state="hold"),
    )
    assert row["final_state"] == "disconnected"
    assert row["ended_at"] == "2024-05-01T10:00:20.000Z"
    assert row["disconnect_reason"] == "User Busy"
    assert row["duration_s"] == 15


def test_bridge_leg_failed_after_connected_leaves_call_connected() -> None:
    events = [
        ev(1, "00", state="incomingcall", **{"from": "111", "to": "222"}),
        ev(2, "02", state="connected", **{"from": "111", "to": "222"}),
        ev(3, "05", state="initiated", **{"from": "222", "to": "333"}),
        ev(4, "09", state="failed", **{"from": "222", "to": "333"}),
    ]
    assert events[3]["class"] == "call"  # the gateway's context-free guess
    projection = project_call(events)
    row = projection["calls"]
    assert row["final_state"] == "connected"
    assert row["bridge_state"] == "failed"
    assert (row["from_number"], row["to_number"]) == ("111", "222")
    assert json.loads(row["event_classes"]) == {"call": 2, "bridge": 2}
    assert [r["class"] for r in projection["timeline"]] == ["call", "call", "bridge", "bridge"]


def test_failed_before_connected_fails_the_call() -> None:
    row = call(
        ev(1, "00", state="initiated"),
        ev(2, "03", state="ringing"),
        ev(3, "40", state="failed", reason="no_answer"),
    )
    assert row["final_state"] == "failed"
    assert row["ended_at"] == "2024-05-01T10:00:40.000Z"
    assert row["disconnect_reason"] == "no_answer"
    assert row["duration_s"] is None
    assert row["ring_seconds"] == 37.0
    assert row["direction"] == "outbound"


def test_bridge_leg_rule_uses_event_time_not_arrival() -> None:
    """A `failed` that happened BEFORE connected but arrived after it is the call's own."""
    row = call(
        ev(1, "00", state="initiated"),
        ev(2, "10", state="connected"),
        ev(3, "05", state="failed"),
    )
    assert json.loads(row["event_classes"]) == {"call": 3}
    assert row["final_state"] == "connected"  # failed (t=5) then connected (t=10)
    assert row["bridge_state"] is None


def test_recording_speech_and_bridge_states_never_become_the_call_state() -> None:
    row = call(
        ev(1, "00", state="connected"),
        ev(2, "01", state="bridged"),
        ev(3, "02", state="started", description="Recording Started"),
        ev(4, "03", state="completed", description="Recording Completed"),
        ev(5, "04", state="recognized", text="yes", playstate="speech_recognized"),
        ev(6, "05", state="failed", recording_id="rec-1"),
        ev(7, "06", state="dtmfcollected", digit=3),
    )
    assert row["final_state"] == "connected"
    assert row["bridge_state"] == "bridged"
    assert json.loads(row["speech"]) == ["yes"]
    assert json.loads(row["digits"]) == ["3"]


def test_duration_is_floored_from_first_connected_to_first_disconnected() -> None:
    row = call(
        ev(1, "10.900", state="connected"),
        ev(2, "12.000", state="connected"),
        ev(3, "20.850", state="disconnected"),
        ev(4, "30.000", state="disconnected"),
    )
    assert row["duration_s"] == 9  # 9.95 s → 9
    assert row["answered_at"] == "2024-05-01T10:00:10.900Z"


def test_duration_across_a_day_boundary_and_offsets() -> None:
    row = call(
        ev(1, "2024-05-01T23:59:30+00:00", state="connected"),
        ev(2, "2024-05-02T05:30:45+05:30", state="disconnected"),  # = 00:00:45Z
    )
    assert row["duration_s"] == 75


def test_digits_in_event_time_order_zero_kept_and_plays_counted() -> None:
    row = call(
        ev(1, "00", state="connected"),
        ev(5, "09", state="dtmfcollected", digit=0),
        ev(3, "04", play_id="p1", playstate="digitcollected", digits="12"),
        ev(2, "02", play_id="p1", playstate="initiated"),
        ev(4, "05", play_id="p2", playstate="initiated"),
        ev(6, "10", play_id="", playstate="initiated"),
        ev(7, "11", play_id="p3", state="timeout", playstate="speech_recognized"),
    )
    assert json.loads(row["digits"]) == ["12", "0"]
    assert row["plays"] == 3  # p1, p2 and the speech play p3; empty play_id ignored
    assert json.loads(row["speech_results"]) == ["timeout"]
    assert json.loads(row["speech"]) == []


def test_play_rows_track_prompt_final_state_digits_and_times() -> None:
    projection = project_call(
        [
            ev(1, "00", play_id="p1", playstate="initiated", prompt_ref="menu"),
            ev(2, "05", play_id="p1", playstate="digitcollected", digit="4"),
            ev(3, "06", play_id="p1", playstate="playfinished"),
            ev(4, "07", play_id="p2", playstate="initiated", prompt_ref="asr"),
            ev(5, "09", play_id="p2", playstate="speechrecognized", text="sales"),
        ]
    )
    plays = {p["play_id"]: p for p in projection["plays"]}
    assert plays["p1"]["prompt_ref"] == "menu"
    assert plays["p1"]["final_state"] == "playfinished"
    assert json.loads(plays["p1"]["digits"]) == ["4"]
    assert plays["p1"]["started_at"] == "2024-05-01T10:00:00.000Z"
    assert plays["p1"]["finished_at"] == "2024-05-01T10:00:06.000Z"
    assert plays["p1"]["event_count"] == 3
    assert (plays["p2"]["speech_result"], plays["p2"]["speech_text"]) == ("recognized", "sales")
    assert projection["dtmf"][0]["source"] == "play"
    assert projection["speech"][0]["text"] == "sales"


def test_recording_url_is_the_last_non_empty_by_event_time() -> None:
    projection = project_call(
        [
            ev(1, "00", state="connected"),
            ev(4, "30", state="disconnected", recording_url="", recording_duration=25),
            ev(3, "20", recordstate="completed", recording_id="r2", recording_url="u2"),
            ev(2, "10", recordstate="completed", recording_id="r1", recording_url="u1"),
        ]
    )
    row = projection["calls"]
    assert row["recording_url"] == "u2"
    assert row["recording_duration_s"] == 25
    assert {(r["recording_id"], r["recording_url"]) for r in projection["recordings"]} == {
        ("r1", "u1"),
        ("r2", "u2"),
    }


def test_seed_recording_gets_its_url_from_the_hangup_event() -> None:
    projection = project_call(
        [
            ev(1, "00", state="connected"),
            ev(2, "01", state="started", description="Recording Started"),
            ev(3, "31", state="completed", description="Recording Completed"),
            ev(4, "40", state="disconnected", recording_url="u", recording_duration=30),
        ]
    )
    [recording] = projection["recordings"]
    assert (recording["state"], recording["recording_url"], recording["duration_s"]) == (
        "completed",
        "u",
        30,
    )
    assert recording["started_at"] == "2024-05-01T10:00:01.000Z"


def test_hold_seconds_sum_closed_and_open_holds() -> None:
    row = call(
        ev(1, "00", state="connected"),
        ev(2, "10", state="hold"),
        ev(3, "15.500", state="unhold"),
        ev(4, "20", state="hold"),
        ev(5, "50", state="disconnected"),
    )
    assert row["hold_seconds"] == 35.5
    assert row["final_state"] == "disconnected"


def test_unknown_events_are_counted_and_change_nothing() -> None:
    row = call(
        ev(1, "00", state="connected"),
        ev(2, "05", state="somethingnew"),
        ev(3, "06", voiceId=VOICE, state="Mystery State"),
    )
    assert row["final_state"] == "connected"
    assert row["unknown_events"] == 2
    assert json.loads(row["event_classes"]) == {"call": 1, "unknown": 2}


def test_ties_in_event_time_are_broken_by_seq() -> None:
    first = call(ev(1, "05", state="joined"), ev(2, "05", state="hold"))
    second = call(ev(2, "05", state="joined"), ev(1, "05", state="hold"))
    assert (first["final_state"], second["final_state"]) == ("hold", "joined")


def test_out_of_order_arrivals_are_counted_and_marked() -> None:
    projection = project_call(
        [
            ev(1, "00", state="initiated"),
            ev(2, "07", state="connected"),
            ev(3, "02", state="ringing"),  # happened before seq 2, arrived after it
            ev(4, "20", state="disconnected"),
            ev(5, "19", play_id="p", playstate="playfinished"),
        ]
    )
    assert projection["calls"]["out_of_order_events"] == 2
    late = [r["seq"] for r in projection["timeline"] if r["arrived_late"]]
    assert late == [3, 5]
    assert [r["position"] for r in projection["timeline"]] == [1, 2, 3, 4, 5]
    assert [r["seq"] for r in projection["timeline"]] == [1, 3, 2, 5, 4]
    assert projection["calls"]["ringing_at"] == "2024-05-01T10:00:02.000Z"
    assert projection["calls"]["ring_seconds"] == 5.0


def test_late_seqs_matches_a_brute_force_definition() -> None:
    rng = random.Random(3)
    for _ in range(200):
        seqs = list(range(1, rng.randrange(1, 12)))
        rng.shuffle(seqs)
        brute = {s for i, s in enumerate(seqs) if any(t < s for t in seqs[i + 1 :])}
        assert folds.late_seqs(seqs) == brute


def test_direction_and_identity_fields() -> None:
    inbound = call(
        ev(1, "00", state="incoming call", channel_id="ch-1", **{"from": "1", "to": "2"}),
        ev(2, "01", state="connected", channel_id="ch-2"),
        ev(3, "02", state="joined", room_id="room-9"),
        ev(4, "03", state="transferring", transfer_to="77", **{"from": "2", "to": "77"}),
    )
    assert (inbound["direction"], inbound["channel_id"], inbound["room_id"]) == (
        "inbound",
        "ch-1",
        "room-9",
    )
    assert (inbound["from_number"], inbound["to_number"], inbound["transfer_to"]) == (
        "1",
        "2",
        "77",
    )
    leg = call(ev(1, "00", state="initiated", broadcast_id="b1", owner_ref="o"))
    assert (leg["direction"], leg["broadcast_id"], leg["owner_ref"]) == ("broadcast", "b1", "o")
    only_plays = call(ev(1, "00", play_id="p", playstate="initiated"))
    assert (only_plays["direction"], only_plays["final_state"]) == (None, None)


def b_ev(seq: int, at: str, **raw: Any) -> dict[str, Any]:
    raw.setdefault("broadcast_id", "b-1")
    raw["timestamp"] = f"2024-05-01T10:00:{at}Z"
    event = normalise(raw, RECEIVED_AT)
    event["seq"] = seq
    return event


def test_broadcast_totals_prefer_result_set_then_call_info() -> None:
    legs = [
        b_ev(1, "00", voice_id="v1", state="connected"),
        b_ev(2, "01", voice_id="v2", state="initiated"),
    ]
    info = [
        {"voice_id": "v1", "state": "completed"},
        {"voice_id": "v2", "state": "failed"},
        {"voice_id": "v3", "state": "Completed"},
    ]
    counted = project_broadcast(
        [*legs, b_ev(3, "09", state="broadcastcall_complete", broadcast_call_info=info)]
    )["broadcasts"]
    assert (counted["successful_calls"], counted["failed_calls"], counted["total_calls"]) == (
        2,
        1,
        3,
    )
    assert counted["totals_source"] == "broadcast_call_info"
    assert (counted["legs"], counted["legs_answered"]) == (2, 1)
    explicit = project_broadcast(
        [
            *legs,
            b_ev(
                3,
                "09",
                state="broadcastcomplete",
                resultSet={"successfull_calls": 5, "failed_calls": 4},
                broadcast_call_info=info,
            ),
        ]
    )["broadcasts"]
    assert (explicit["successful_calls"], explicit["failed_calls"]) == (5, 4)
    assert explicit["state"] == "broadcastcomplete"
    pending = project_broadcast(legs)["broadcasts"]
    assert (pending["state"], pending["successful_calls"], pending["legs"]) == (None, None, 2)


def test_fold_fields_match_the_table_columns() -> None:
    assert tables.CALLS.column_names == folds.CALL_FIELDS
    assert tuple(name for name, _ in tables.TIMELINE_COLUMNS) == folds.TIMELINE_FIELDS
    assert all(text for cols in tables.COLUMN_DESCRIPTIONS.values() for text in cols.values())


def test_project_call_refuses_mixed_or_empty_input() -> None:
    with pytest.raises(ValueError):
        project_call([])
    with pytest.raises(ValueError):
        project_call([ev(1, "00", state="connected"), ev(2, "01", voice_id="x", state="hold")])


def test_every_permutation_of_a_small_call_folds_identically() -> None:
    events = [
        ev(1, "00", state="initiated"),
        ev(2, "03", state="connected"),
        ev(3, "04", state="failed"),
        ev(4, "09", state="disconnected"),
    ]
    results = {json.dumps(project_call(list(p))["calls"]) for p in itertools.permutations(events)}
    assert len(results) == 1


def test_call_row_fields_are_the_calls_columns_in_order() -> None:
    """fold_call builds `calls` rows by name; the names must be the table's, in its order."""
    from analytics import folds, tables

    assert list(folds.CallRow._fields) == [column[0] for column in tables.CALLS.columns]
