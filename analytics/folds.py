"""Pure folds: the logged events of one call (or one broadcast) → the rows users see.

No SQL, no clock, no I/O: the projector and the rebuild feed these the events
of the log, tests feed them plain dicts. The result depends only on the set of
events, never on the order they are passed in: events are sorted by event time,
ties by seq (WIRE.md §4.2), and the rules are WIRE.md §5. The gateway classifies
each event without context, so a `failed`/`initiated` is re-derived here from
the call's history: after a call-level `connected` it is a bridge leg (§4.7.6).

The fold functions return tuples in the column order of `analytics.tables` (the
rebuild writes millions of them; tuples skip per-row dict overhead);
`project_call` / `project_broadcast` return the same rows as dicts, plus the
call's timeline (stored as a view over `events` + `timeline_marks`, see tables.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, date, datetime
from functools import lru_cache
from typing import Any, NamedTuple

import orjson

from gateway.wire.schemas import LEG_STATES, classify

Event = Mapping[str, Any]
Row = tuple[Any, ...]

CALL_FIELDS: tuple[str, ...] = (
    "voice_id", "direction", "from_number", "to_number", "final_state", "started_at",
    "ringing_at", "answered_at", "ended_at", "last_event_at", "ring_seconds", "duration_s",
    "hold_seconds", "disconnect_reason", "disconnect_reason_normalised", "plays", "digits",
    "speech", "speech_results",
    "recording_url", "recording_duration_s", "bridge_state", "transfer_to", "owner_ref",
    "channel_id", "room_id", "broadcast_id", "event_count", "unknown_events",
    "out_of_order_events", "event_classes", "first_seq", "last_seq",
)  # fmt: skip
PLAY_FIELDS: tuple[str, ...] = (
    "voice_id", "play_id", "prompt_ref", "final_state", "digits", "speech_result",
    "speech_text", "started_at", "finished_at", "event_count", "first_seq", "last_seq",
)  # fmt: skip
RECORDING_FIELDS: tuple[str, ...] = (
    "voice_id", "recording_id", "state", "started_at", "completed_at", "recording_url",
    "duration_s", "description", "event_count", "first_seq", "last_seq",
)  # fmt: skip
DTMF_FIELDS: tuple[str, ...] = (
    "voice_id", "position", "occurred_at", "digits", "source", "play_id", "prompt_ref", "seq",
)  # fmt: skip
SPEECH_FIELDS: tuple[str, ...] = (
    "voice_id", "position", "occurred_at", "result", "text", "confidence", "reason",
    "play_id", "prompt_ref", "seq",
)  # fmt: skip
BROADCAST_FIELDS: tuple[str, ...] = (
    "broadcast_id", "state", "from_number", "successful_calls", "failed_calls", "total_calls",
    "totals_source", "legs", "legs_answered", "started_at", "completed_at", "call_info",
    "event_count", "first_seq", "last_seq",
)  # fmt: skip
TIMELINE_FIELDS: tuple[str, ...] = (
    "seq", "voice_id", "broadcast_id", "position", "occurred_at", "received_at", "class",
    "state", "play_id", "prompt_ref", "digits", "text", "reason", "arrived_late",
)  # fmt: skip
# The timeline is a view over `events`; only what the log cannot say by itself is stored:
# events whose class the fold re-derived, or that arrived after a later-timed event.
MARK_FIELDS: tuple[str, ...] = ("seq", "voice_id", "broadcast_id", "class", "arrived_late")

_CALL = "call"
_EPOCH_DAY = date(1970, 1, 1)
_EMPTY = "[]"
_NONE_LATE: frozenset[int] = frozenset()
_LEG_CLASSES = frozenset({"call", "bridge"})  # classes a bridge-leg state may be stored under
_NOT_FINISHED = "initiated"  # any other play state means the play has run (finished_at)


class CallRow(NamedTuple):
    """One `calls` row, in the table's column order (tests/test_folds.py checks it)."""

    voice_id: str
    direction: str | None
    from_number: str | None
    to_number: str | None
    final_state: str | None
    started_at: str
    ringing_at: str | None
    answered_at: str | None
    ended_at: str | None
    last_event_at: str
    ring_seconds: float | None
    duration_s: int | None
    hold_seconds: float
    disconnect_reason: str | None
    disconnect_reason_normalised: str | None
    plays: int
    digits: str
    speech: str
    speech_results: str
    recording_url: str | None
    recording_duration_s: Any
    bridge_state: str | None
    transfer_to: str | None
    owner_ref: str | None
    channel_id: str | None
    room_id: str | None
    broadcast_id: str | None
    event_count: int
    unknown_events: int
    out_of_order_events: int
    event_classes: str
    first_seq: int
    last_seq: int


# Slots of a play's running state (a list, mutated in the hot loop; see `_new_play`).
_P_PROMPT, _P_STATE, _P_STARTED, _P_FINISHED, _P_DIGITS = 0, 1, 2, 3, 4
_P_SPEECH_RESULT, _P_SPEECH_TEXT, _P_COUNT, _P_FIRST, _P_LAST = 5, 6, 7, 8, 9
# Slots of a recording's running state (see `_touch_recording`).
_R_STATE, _R_STARTED, _R_COMPLETED, _R_URL, _R_DURATION = 0, 1, 2, 3, 4
_R_DESCRIPTION, _R_COUNT, _R_FIRST, _R_LAST = 5, 6, 7, 8


class CallRows(NamedTuple):
    """Everything one call contributes to the projections, as table-ordered tuples."""

    call: Row
    plays: list[Row]
    recordings: list[Row]
    dtmf: list[Row]
    speech: list[Row]
    marks: list[Row]
    timeline: list[Row]  # only filled when asked for (the stored timeline is a view)


class BroadcastRows(NamedTuple):
    """One broadcast row, plus marks/timeline rows of its summary events (they have no call)."""

    broadcast: Row
    marks: list[Row]
    timeline: list[Row]


def order_key(event: Event) -> tuple[str, int]:
    """Event time, ties by seq: the one order every fold uses."""
    return (event["occurred_at"], event["seq"])


def sort_events(events: Iterable[Event]) -> list[Event]:
    return sorted(events, key=order_key)


def json_text(value: Any) -> str:
    """Compact JSON text for array/object columns (stable: keys sorted)."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


_CLASS_NAMES = ("call", "play", "speech", "recording", "dtmf", "bridge", "broadcast", "unknown")


@lru_cache(maxsize=4096)
def _classes_json(counts: tuple[int, ...]) -> str:
    """event_classes text for per-class counts in _CLASS_NAMES order (cached: calls of one
    shape share their counts, and building + dumping the dict costs more than the lookup)."""
    return json_text(
        {name: count for name, count in zip(_CLASS_NAMES, counts, strict=True) if count}
    )


@lru_cache(maxsize=65536)
def _minute_ms(minute: str) -> int:
    """Milliseconds since the epoch of "YYYY-MM-DDTHH:MM" (cached: a call's events share
    a handful of minutes, and parsing the date is most of the cost)."""
    return (
        (date.fromisoformat(minute[:10]) - _EPOCH_DAY).days * 86_400_000
        + int(minute[11:13]) * 3_600_000
        + int(minute[14:16]) * 60_000
    )


def epoch_ms(at: str) -> int:
    """Milliseconds since the epoch of a stored UTC time; integers keep floor() exact.

    The log stores one fixed-width form (YYYY-MM-DDTHH:MM:SS.mmmZ), parsed here by
    slicing (seconds and milliseconds as one integer "SSmmm"); anything else goes
    through datetime.fromisoformat."""
    if len(at) == 24 and at[23] == "Z" and at[10] == "T" and at[19] == ".":
        tail = at[17:19] + at[20:23]
        if tail.isdigit():
            try:
                return _minute_ms(at[:16]) + int(tail)
            except ValueError:
                pass
    moment = datetime.fromisoformat(at)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if start is None or end is None:
        return None
    return (epoch_ms(end) - epoch_ms(start)) / 1000


def late_seqs(seqs: list[int]) -> frozenset[int]:
    """Seqs (given in event-time order) of events that arrived after a later-timed event.

    In (time, seq) order an event is late iff some event after it in that order
    has a smaller seq, i.e. was logged earlier although it happened later.
    """
    if seqs == sorted(seqs):  # the common case, checked in C
        return _NONE_LATE
    late = set()
    smallest_after = seqs[-1]
    for seq in reversed(seqs):
        if smallest_after < seq:
            late.add(seq)
        else:
            smallest_after = seq
    return frozenset(late)


def refine_class(event: Event, connected_before: bool) -> str:
    """The class of an event given the call's history so far (only bridge legs change)."""
    cls = event["class"]
    if cls in _LEG_CLASSES and event["state"] in LEG_STATES:
        return classify(
            event.get("raw_state", event["state"]),
            event.get("playstate"),
            event.get("recordstate"),
            has_recording_id="recording_id" in event,
            description=event.get("description"),
            connected_before=connected_before,
        )
    return cls


def _reason(ev: Event) -> Any:
    return ev.get("disconnect_reason") or ev.get("reason")


# Disconnect reasons that mean the same thing, under one name (README "Normalised
# disconnect reasons"); the outcome rules of the canned queries read these names.
REASON_SYNONYMS: dict[str, str] = {
    "user_busy": "busy",
    "noanswer": "no_answer",
    "no_user_response": "no_answer",
    "not_answered": "no_answer",
    "ring_timeout": "no_answer",
    "call_rejected": "rejected",
    "declined": "rejected",
}
_REASON_SEPARATORS = re.compile(r"[\s_\-]+")


def normalise_reason(reason: Any) -> str | None:
    """One spelling per disconnect reason, so `NO_ANSWER`, `No Answer` and `no-answer` count
    as one: trimmed, lower case, runs of spaces, hyphens and underscores as one `_`, then
    the synonyms above. NULL for a missing or blank reason, or one that is not text."""
    if isinstance(reason, bool) or not isinstance(reason, str | int | float):
        return None
    return _normalise_reason_text(str(reason))


@lru_cache(maxsize=1024)
def _normalise_reason_text(reason: str) -> str | None:
    """Cached: a log has a handful of spellings, and the fold runs once per call."""
    text = _REASON_SEPARATORS.sub("_", reason.strip().lower()).strip("_")
    if not text:
        return None
    return REASON_SYNONYMS.get(text, text)


def timeline_row(ev: Event, position: int, cls: str, late: bool) -> Row:
    """One event as the timeline view shows it (the fold's definition of that view). Digits
    and text are those of the event's dtmf and speech rows: the view joins them from there
    (in their public or cleartext form), never from the payload."""
    state = ev["state"]
    keyed = cls == "dtmf" or (cls == "play" and state == "digitcollected")
    return (
        ev["seq"], ev.get("voice_id"), ev.get("broadcast_id"), position, ev["occurred_at"],
        ev.get("received_at"), cls, state, ev.get("play_id"), ev.get("prompt_ref"),
        ev.get("digits") if keyed else None, ev.get("text") if cls == "speech" else None,
        _reason(ev), 1 if late else 0,
    )  # fmt: skip


def fold_call(events: list[Event], timeline: bool = False) -> CallRows:
    """One call's events, ALREADY in (occurred_at, seq) order → its rows.

    This is the rebuild's hot loop (a million events): locals and plain counters
    instead of helpers where it matters.
    """
    first = events[0]
    voice_id = first["voice_id"]
    seqs = [e["seq"] for e in events]
    late = late_seqs(seqs)

    connected = False  # a call-level connected happened earlier in event time
    terminal = False  # the call is disconnected: nothing changes final_state any more
    final_state = None
    final_failed: Event | None = None
    disconnected: Event | None = None
    inbound = False
    from_number = to_number = None
    ringing_at = incoming_at = answered_at = None
    hold_started: str | None = None
    hold_ms = 0
    bridge_state = None
    transfer_to = owner_ref = channel_id = room_id = broadcast_id = None
    recording_url = None
    recording_duration = None
    digits: list[str] = []
    speech_texts: list[str] = []
    speech_results: list[str] = []
    n_call = n_play = n_speech = n_recording = n_dtmf = n_bridge = n_broadcast = n_unknown = 0
    plays: dict[str, list[Any]] = {}
    recordings: dict[str, list[Any]] = {}
    dtmf_rows: list[Row] = []
    speech_rows: list[Row] = []
    marks: list[Row] = []
    rows: list[Row] = []

    for ev in events:
        cls = stored = ev["class"]
        state = ev["state"]
        if state in LEG_STATES and cls in _LEG_CLASSES:
            cls = refine_class(ev, connected)
        if cls == "call":
            n_call += 1
            at = ev["occurred_at"]
            if from_number is None:
                from_number = ev.get("from")
            if to_number is None:
                to_number = ev.get("to")
            if state == "connected":
                if not connected:
                    connected = True
                    answered_at = at
            elif state == "disconnected":
                if disconnected is None:
                    disconnected = ev
                    if hold_started is not None:
                        hold_ms += epoch_ms(at) - epoch_ms(hold_started)
                        hold_started = None
            elif state == "ringing":
                if ringing_at is None:
                    ringing_at = at
            elif state == "incomingcall":
                inbound = True
                if incoming_at is None:
                    incoming_at = at
            elif state == "hold":
                if hold_started is None and not terminal:
                    hold_started = at
            elif state == "unhold" and hold_started is not None and not terminal:
                hold_ms += epoch_ms(at) - epoch_ms(hold_started)
                hold_started = None
            if not terminal:
                final_state = state
                if state == "disconnected":
                    terminal = True
                elif state == "failed":
                    final_failed = ev
            if "transfer_to" in ev:
                transfer_to = ev["transfer_to"] or transfer_to
            if owner_ref is None and "owner_ref" in ev:
                owner_ref = ev["owner_ref"]
            if channel_id is None and "channel_id" in ev:
                channel_id = ev["channel_id"]
        elif cls == "play":
            n_play += 1
            play_id = ev.get("play_id")
            if play_id:
                entry = plays.get(play_id)
                if entry is None:
                    entry = plays[play_id] = _new_play(ev)
                else:
                    _touch_play(entry, ev, state)
            if state == "digitcollected" and "digits" in ev:
                value = ev["digits"]
                digits.append(value)
                dtmf_rows.append(
                    (voice_id, len(digits), ev["occurred_at"], value, "play", play_id,
                     ev.get("prompt_ref"), ev["seq"])
                )  # fmt: skip
                if play_id:
                    entry[_P_DIGITS].append(value)
        elif cls == "speech":
            n_speech += 1
            play_id = ev.get("play_id")
            text = ev.get("text")
            if state is not None:
                speech_results.append(state)
                if state == "recognized" and text:
                    speech_texts.append(text)
            speech_rows.append(
                (voice_id, len(speech_rows) + 1, ev["occurred_at"], state, text,
                 ev.get("confidence"), ev.get("reason"), play_id, ev.get("prompt_ref"), ev["seq"])
            )  # fmt: skip
            if play_id:
                play_state = ev.get("playstate") or state
                entry = plays.get(play_id)
                if entry is None:
                    entry = plays[play_id] = _new_play(ev, play_state)
                else:
                    _touch_play(entry, ev, play_state)
                entry[_P_SPEECH_RESULT] = state
                if text:
                    entry[_P_SPEECH_TEXT] = text
        elif cls == "recording":
            n_recording += 1
            _touch_recording(recordings, ev, state)
        elif cls == "dtmf":
            n_dtmf += 1
            if "digits" in ev:
                value = ev["digits"]
                digits.append(value)
                dtmf_rows.append(
                    (voice_id, len(digits), ev["occurred_at"], value, "dtmf", ev.get("play_id"),
                     ev.get("prompt_ref"), ev["seq"])
                )  # fmt: skip
        elif cls == "bridge":
            n_bridge += 1
            bridge_state = state
        elif cls == "broadcast":
            n_broadcast += 1
        else:
            n_unknown += 1

        if "recording_url" in ev:
            recording_url = ev["recording_url"] or recording_url
        if "recording_duration" in ev:
            recording_duration = ev["recording_duration"]
        if broadcast_id is None and "broadcast_id" in ev:
            broadcast_id = ev["broadcast_id"]
        if "room_id" in ev:
            room_id = ev["room_id"] or room_id
        if cls != stored or (late and ev["seq"] in late):
            marks.append((ev["seq"], voice_id, ev.get("broadcast_id"), cls,
                          1 if ev["seq"] in late else 0))  # fmt: skip
        if timeline:
            rows.append(timeline_row(ev, len(rows) + 1, cls, ev["seq"] in late))

    end_event = disconnected
    if end_event is None and final_state == "failed":
        end_event = final_failed
    ended_at = end_event["occurred_at"] if end_event is not None else None
    reason = _reason(end_event) if end_event is not None else None
    ring_from = ringing_at or incoming_at
    ring_seconds, duration_s = _durations(ring_from, answered_at, ended_at, disconnected)
    classes = _classes_json(
        (n_call, n_play, n_speech, n_recording, n_dtmf, n_bridge, n_broadcast, n_unknown)
    )
    # In seq order (the common case) the ends of `seqs` are its extremes.
    first_seq, last_seq = (min(seqs), max(seqs)) if late else (seqs[0], seqs[-1])
    call = CallRow(
        voice_id=voice_id,
        direction=_direction(broadcast_id, inbound, n_call),
        from_number=from_number,
        to_number=to_number,
        final_state=final_state,
        started_at=first["occurred_at"],
        ringing_at=ring_from,
        answered_at=answered_at,
        ended_at=ended_at,
        last_event_at=events[-1]["occurred_at"],
        ring_seconds=ring_seconds,
        duration_s=duration_s,
        hold_seconds=hold_ms / 1000,
        disconnect_reason=reason,
        disconnect_reason_normalised=normalise_reason(reason),
        plays=len(plays),
        digits=json_text(digits) if digits else _EMPTY,
        speech=json_text(speech_texts) if speech_texts else _EMPTY,
        speech_results=json_text(speech_results) if speech_results else _EMPTY,
        recording_url=recording_url,
        recording_duration_s=recording_duration,
        bridge_state=bridge_state,
        transfer_to=transfer_to,
        owner_ref=owner_ref,
        channel_id=channel_id,
        room_id=room_id,
        broadcast_id=broadcast_id,
        event_count=len(events),
        unknown_events=n_unknown,
        out_of_order_events=len(late),
        event_classes=classes,
        first_seq=first_seq,
        last_seq=last_seq,
    )
    play_rows = [
        (voice_id, pid, e[_P_PROMPT], e[_P_STATE],
         json_text(e[_P_DIGITS]) if e[_P_DIGITS] else _EMPTY, e[_P_SPEECH_RESULT],
         e[_P_SPEECH_TEXT], e[_P_STARTED], e[_P_FINISHED], e[_P_COUNT], e[_P_FIRST], e[_P_LAST])
        for pid, e in sorted(plays.items())
    ]  # fmt: skip
    recording_rows = _recording_rows(voice_id, recordings, recording_url, recording_duration)
    return CallRows(call, play_rows, recording_rows, dtmf_rows, speech_rows, marks, rows)


def _durations(
    ring_from: str | None, answered_at: str | None, ended_at: str | None,
    disconnected: Event | None,
) -> tuple[float | None, int | None]:
    """(ring_seconds, duration_s): ringing until answered (else until the end), and talk
    time floor(first disconnected − first connected), NULL when either end is missing."""
    answered_ms = epoch_ms(answered_at) if answered_at is not None else 0
    duration_s = None
    if answered_at is not None and disconnected is not None:
        duration_s = (epoch_ms(disconnected["occurred_at"]) - answered_ms) // 1000
    ring_to = answered_at or ended_at
    if ring_from is None or ring_to is None:
        return None, duration_s
    to_ms = answered_ms if ring_to is answered_at else epoch_ms(ring_to)
    return (to_ms - epoch_ms(ring_from)) / 1000, duration_s


def _direction(broadcast_id: str | None, inbound: bool, n_call: int) -> str | None:
    if broadcast_id is not None:
        return "broadcast"
    if inbound:
        return "inbound"
    return "outbound" if n_call else None


def _new_play(ev: Event, state: str | None = None) -> list[Any]:
    """A play's running state: [prompt_ref, final_state, started_at, finished_at, digits,
    speech_result, speech_text, event_count, first_seq, last_seq]."""
    if state is None:
        state = ev["state"]
    at = ev["occurred_at"]
    seq = ev["seq"]
    finished = None if state is None or state == _NOT_FINISHED else at
    return [ev.get("prompt_ref") or None, state, at, finished, [], None, None, 1, seq, seq]


def _touch_play(entry: list[Any], ev: Event, state: str | None) -> None:
    """Fold a later event of the same play into its running state (see `_new_play`)."""
    prompt = ev.get("prompt_ref")
    if prompt:
        entry[_P_PROMPT] = prompt
    if state is not None:
        entry[_P_STATE] = state
        if state != _NOT_FINISHED:
            entry[_P_FINISHED] = ev["occurred_at"]
    entry[_P_COUNT] += 1
    seq = ev["seq"]
    if seq < entry[_P_FIRST]:
        entry[_P_FIRST] = seq
    elif seq > entry[_P_LAST]:
        entry[_P_LAST] = seq


def _touch_recording(recordings: dict[str, list[Any]], ev: Event, state: str | None) -> None:
    """[state, started_at, completed_at, url, duration, description, count, first, last]."""
    at = ev["occurred_at"]
    seq = ev["seq"]
    key = ev.get("recording_id") or ""
    entry = recordings.get(key)
    if entry is None:
        entry = recordings[key] = [None, None, None, None, None, None, 0, seq, seq]
    if state is not None:
        entry[_R_STATE] = state
        if state == "started" and entry[_R_STARTED] is None:
            entry[_R_STARTED] = at
        elif state == "completed" and entry[_R_COMPLETED] is None:
            entry[_R_COMPLETED] = at
    value = ev.get("recording_url")
    if value:
        entry[_R_URL] = value
    value = ev.get("recording_duration")
    if value is not None:
        entry[_R_DURATION] = value
    value = ev.get("description")
    if value:
        entry[_R_DESCRIPTION] = value
    entry[_R_COUNT] += 1
    if seq < entry[_R_FIRST]:
        entry[_R_FIRST] = seq
    if seq > entry[_R_LAST]:
        entry[_R_LAST] = seq


def _recording_rows(
    voice_id: str,
    recordings: dict[str, list[Any]],
    call_url: str | None,
    call_duration: Any,
) -> list[Row]:
    """Recordings of the call; the URL often travels only on `disconnected` (seed shape), so
    a call's URL fills its single recording, or stands for one when no recording event came."""
    if not recordings:
        if call_url is None:
            return []
        return [(voice_id, "", None, None, None, call_url, call_duration, None, 0, None, None)]
    rows = []
    single = len(recordings) == 1
    for key, e in sorted(recordings.items()):
        url, duration = e[_R_URL], e[_R_DURATION]
        if single and url is None:
            url = call_url
        if single and duration is None:
            duration = call_duration
        rows.append(
            (voice_id, key, e[_R_STATE], e[_R_STARTED], e[_R_COMPLETED], url, duration,
             e[_R_DESCRIPTION], e[_R_COUNT], e[_R_FIRST], e[_R_LAST])
        )  # fmt: skip
    return rows


def fold_broadcast(events: list[Event], timeline: bool = False) -> BroadcastRows:
    """One broadcast's events (summaries and legs), ALREADY in (occurred_at, seq) order.

    Totals come from the last summary carrying resultSet numbers, else are counted
    from the last broadcast_call_info (state "completed" = successful). Of a leg's
    events only voice_id, class, state, occurred_at and seq are read (the projector
    passes just those), so legs never need decoding.
    """
    broadcast_id = events[0]["broadcast_id"]
    state = None
    from_number = None
    completed_at = None
    explicit: tuple[Any, Any] | None = None
    call_info: list[Any] | None = None
    legs: set[str] = set()
    answered: set[str] = set()
    seqs = [e["seq"] for e in events]
    late = late_seqs(seqs)
    marks: list[Row] = []
    rows: list[Row] = []
    for ev in events:
        voice_id = ev.get("voice_id")
        cls = ev["class"]
        if voice_id:
            legs.add(voice_id)
            if cls == _CALL and ev["state"] == "connected":
                answered.add(voice_id)
            if cls != "broadcast":
                continue
        if cls == "broadcast":
            state = ev["state"]
            completed_at = ev["occurred_at"]
        if ev.get("from"):
            from_number = ev["from"]
        ok, failed = ev.get("broadcast_successful"), ev.get("broadcast_failed")
        if ok is not None or failed is not None:
            explicit = (ok, failed)
        if ev.get("broadcast_call_info") is not None:
            call_info = ev["broadcast_call_info"]
        if not voice_id:  # a summary belongs to no call: its timeline rows come from here
            is_late = ev["seq"] in late
            if is_late:
                marks.append((ev["seq"], None, broadcast_id, cls, 1))
            if timeline:
                rows.append(timeline_row(ev, len(rows) + 1, cls, is_late))
    successful = failed_calls = None
    source = None
    if explicit is not None:
        successful, failed_calls = explicit
        source = "resultSet"
    elif call_info is not None:
        successful = sum(
            1
            for item in call_info
            if isinstance(item, Mapping) and str(item.get("state", "")).lower() == "completed"
        )
        failed_calls = len(call_info) - successful
        source = "broadcast_call_info"
    total = None
    if successful is not None and failed_calls is not None:
        total = successful + failed_calls
    row = (
        broadcast_id, state, from_number, successful, failed_calls, total, source, len(legs),
        len(answered), events[0]["occurred_at"], completed_at,
        json_text(call_info) if call_info is not None else None, len(events), min(seqs),
        max(seqs),
    )  # fmt: skip
    return BroadcastRows(row, marks, rows)


def _as_dicts(fields: tuple[str, ...], rows: list[Row]) -> list[dict[str, Any]]:
    return [dict(zip(fields, row, strict=True)) for row in rows]


def project_call(events: Iterable[Event]) -> dict[str, Any]:
    """A call's events in any order → {"calls": row, "plays": [...], "recordings": [...],
    "dtmf": [...], "speech": [...], "timeline": [...]} (rows as dicts)."""
    ordered = sort_events(events)
    if not ordered:
        raise ValueError("project_call needs at least one event")
    voice_ids = {e["voice_id"] for e in ordered}
    if len(voice_ids) != 1 or None in voice_ids:
        raise ValueError(f"project_call folds one call, got {sorted(map(str, voice_ids))}")
    rows = fold_call(ordered, timeline=True)
    return {
        "calls": dict(zip(CALL_FIELDS, rows.call, strict=True)),
        "plays": _as_dicts(PLAY_FIELDS, rows.plays),
        "recordings": _as_dicts(RECORDING_FIELDS, rows.recordings),
        "dtmf": _as_dicts(DTMF_FIELDS, rows.dtmf),
        "speech": _as_dicts(SPEECH_FIELDS, rows.speech),
        "timeline": _as_dicts(TIMELINE_FIELDS, rows.timeline),
    }


def project_broadcast(events: Iterable[Event]) -> dict[str, Any]:
    """A broadcast's events (summaries + legs, any order) → {"broadcasts": row,
    "timeline": [summary rows]}."""
    ordered = sort_events(events)
    if not ordered:
        raise ValueError("project_broadcast needs at least one event")
    ids = {e.get("broadcast_id") for e in ordered}
    if len(ids) != 1 or None in ids:
        raise ValueError(f"project_broadcast folds one broadcast, got {sorted(map(str, ids))}")
    rows = fold_broadcast(ordered, timeline=True)
    return {
        "broadcasts": dict(zip(BROADCAST_FIELDS, rows.broadcast, strict=True)),
        "timeline": _as_dicts(TIMELINE_FIELDS, rows.timeline),
    }
