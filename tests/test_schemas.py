"""WIRE.md §4 normalisation rules, one by one, on plain dicts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from marshmallow import ValidationError

from gateway.wire.schemas import EventError, EventSchema, classify, normalise, parse_timestamp

NOW = "2030-01-01T00:00:00.000Z"


def norm(**raw: object) -> dict:
    return normalise({"voice_id": "v1", **raw}, NOW)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-11T09:15:00Z", "2024-03-11T09:15:00.000Z"),
        ("2024-03-11T09:15:09.4Z", "2024-03-11T09:15:09.400Z"),
        ("2024-03-11T09:15:09.123456Z", "2024-03-11T09:15:09.123Z"),
        ("2024-03-11T09:15Z", "2024-03-11T09:15:00.000Z"),
        ("2021-02-18T12:47-00Z", "2021-02-18T12:47:00.000Z"),
        ("2021-02-18T18:17:40+05:30", "2021-02-18T12:47:40.000Z"),
        ("2021-02-18T07:17:40-0530", "2021-02-18T12:47:40.000Z"),
        ("2021-02-18 12:47:40", "2021-02-18T12:47:40.000Z"),
        (1710148500, "2024-03-11T09:15:00.000Z"),
        (1710148500250, "2024-03-11T09:15:00.250Z"),
        ("yesterday", None),
        ("2024-13-40T99:99:99Z", None),
        (None, None),
        (True, None),
    ],
)
def test_timestamps(value, expected) -> None:
    assert parse_timestamp(value) == expected


def test_voice_id_spellings_and_first_non_empty() -> None:
    for key in ("voice_id", "voice_Id", "voiceId", "VoiceId"):
        assert normalise({key: "abc", "state": "ringing"}, NOW)["voice_id"] == "abc"
    assert normalise({"voice_id": "", "voice_Id": "x2"}, NOW)["voice_id"] == "x2"


def test_missing_ids_and_non_objects() -> None:
    with pytest.raises(EventError) as missing:
        normalise({"state": "connected"}, NOW)
    assert missing.value.code == "missing_voice_id"
    for bad in ([], "text", 3, None):
        with pytest.raises(EventError) as not_object:
            normalise(bad, NOW)
        assert not_object.value.code == "bad_event"
    summary = normalise({"broadcast_id": "b1", "state": "broadcastcomplete"}, NOW)
    assert summary["voice_id"] is None and summary["class"] == "broadcast"


def test_states_are_folded() -> None:
    assert norm(state="incoming call")["state"] == "incomingcall"
    assert norm(state="Incomingcall")["state"] == "incomingcall"
    assert norm(state="", playstate="initiated")["class"] == "play"
    assert norm(state=5)["class"] == "unknown"
    assert norm(status="connected")["class"] == "unknown"
    assert norm(playstateus="PlayFinished")["state"] == "playfinished"


def test_digits() -> None:
    assert norm(state="dtmfcollected", digit=12345)["digits"] == "12345"
    assert norm(state="dtmfcollected", digit=0)["digits"] == "0"
    assert norm(playstate="digitcollected", digits="40021#")["digits"] == "40021#"
    assert "digits" not in norm(state="dtmfcollected")


def test_time_falls_back_to_arrival() -> None:
    event = norm(state="ringing")
    assert event["occurred_at"] == NOW and event["time_source"] == "received"


@pytest.mark.parametrize(
    ("raw", "cls", "state"),
    [
        ({"state": "broadcastcall_complete"}, "broadcast", "broadcastcall_complete"),
        ({"state": "recognized", "playstate": "speech_recognized"}, "speech", "recognized"),
        ({"state": "timeout", "playstate": "speech_recognized"}, "speech", "timeout"),
        ({"playstate": "speechunrecognized"}, "speech", "unrecognized"),
        ({"playstate": "speechtimeout"}, "speech", "timeout"),
        ({"recordstate": "completed"}, "recording", "completed"),
        ({"state": "started", "description": "Recording Started"}, "recording", "started"),
        ({"state": "failed", "recording_id": "r1"}, "recording", "failed"),
        ({"state": "failed", "description": "RECORDING could not start"}, "recording", "failed"),
        ({"state": "dtmfcollected", "digit": 1}, "dtmf", "dtmfcollected"),
        ({"playstate": "menutimeout"}, "play", "menutimeout"),
        ({"playstate": "failed"}, "play", "failed"),
        ({"state": "bridged"}, "bridge", "bridged"),
        ({"state": "failed"}, "call", "failed"),
        ({"state": "joined"}, "call", "joined"),
        ({"state": "teleported"}, "unknown", "teleported"),
        ({}, "unknown", None),
    ],
)
def test_classes(raw, cls, state) -> None:
    event = norm(**raw)
    assert (event["class"], event["state"]) == (cls, state)


def test_leg_states_after_connect_are_bridge() -> None:
    assert classify("failed", None, None, connected_before=True) == "bridge"
    assert classify("initiated", None, None, connected_before=True) == "bridge"
    assert classify("disconnected", None, None, connected_before=True) == "call"


def test_broadcast_totals_and_text_aliases() -> None:
    legacy = normalise({"broadcast_id": "b", "state": "broadcastcomplete",
                        "resultSet": {"successfull_calls": 2, "failed_calls": 1}}, NOW)
    assert (legacy["broadcast_successful"], legacy["broadcast_failed"]) == (2, 1)
    spoken = norm(playstate="speechrecognized", recognized_phrase="sales")
    assert spoken["text"] == "sales"


@given(st.dictionaries(st.text(max_size=12), st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5),
                                                                       children, max_size=3),
    max_leaves=8)))
def test_any_object_normalises_or_is_refused_with_a_code(raw) -> None:
    try:
        event = normalise({"voice_Id": "v", **raw}, NOW)
    except EventError as exc:
        assert exc.code in {"bad_event", "missing_voice_id"}
        return
    assert event["class"] in {"call", "play", "speech", "recording", "dtmf", "bridge",
                              "broadcast", "unknown"}
    assert len(event["occurred_at"]) == len(NOW)


def test_extra_text_must_be_text_to_validate() -> None:
    # fold_aliases only ever puts text there; the schema still refuses anything else.
    field = EventSchema().fields["extra_text"]
    assert field.deserialize({"from": "919876543210"}) == {"from": "919876543210"}
    with pytest.raises(ValidationError):
        field.deserialize({"from": 919876543210})
    assert normalise({"voice_id": "v", "from": 919876543210}, NOW)["from"] == "919876543210"


def test_numbers_past_float_or_64_bits_become_absent_not_an_error() -> None:
    """normalise() never raises on a number: an integer past float (OverflowError before)
    times the event by its arrival, and whole floats past 64 bits stay floats, so every
    normalised event can be written back as JSON (orjson writes 64-bit integers only)."""
    huge = 10**400
    received = "2024-03-11T09:15:09.000Z"
    for sign in (1, -1):
        event = normalise({"voice_id": "v", "state": "connected", "timestamp": sign * huge},
                          received)
        assert event["occurred_at"] == received
    assert parse_timestamp(huge) is None
    call = normalise({"voice_id": "v", "state": "connected", "recording_duration": "1e300",
                      "confidence": "nan"}, received)
    assert call["recording_duration"] == 1e300 and isinstance(call["recording_duration"], float)
    assert call.get("confidence") is None
    summary = normalise({"broadcast_id": "b", "state": "broadcastcomplete",
                         "resultSet": {"failed_calls": "1e400", "successful_calls": 7.0}}, received)
    assert summary.get("broadcast_failed") is None and summary["broadcast_successful"] == 7
