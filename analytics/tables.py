"""Projection tables: one declaration gives the DDL, the column order and the docs.

Every table here is derived from `events` only and can be dropped and rebuilt
at any time (`callgate rebuild`). The column order is the order the folds emit
rows in; the per-column descriptions are what metadata.yml copies for Datasette.
Units are in the names: `_at` is UTC text `YYYY-MM-DDTHH:MM:SS.mmmZ`, `_s` and
`_seconds` are seconds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property

from analytics import folds, summaries
from gateway.db import transaction

STAGING_SUFFIX = "__rebuild"
# The projector's row in `checkpoints` (reset when a projection's shape changed).
PROJECTOR_CHECKPOINT = "projector"


@dataclass(frozen=True, eq=False)
class Table:
    """A projection table: columns as (name, SQL type, description), plus keys and indexes."""

    name: str
    description: str
    columns: tuple[tuple[str, str, str], ...]
    primary_key: tuple[str, ...] = ()
    without_rowid: bool = False
    # (index name, columns SQL, optional WHERE clause of a partial index, unique)
    indexes: tuple[tuple[str, str, str, bool], ...] = field(default_factory=tuple)
    # (column, other table, other column): declared so Datasette links a row to its call
    # and lists a call's rows under "Links from other tables". SQLite does not enforce
    # them (foreign_keys stays off), so projection order and rebuilds are unaffected.
    foreign_keys: tuple[tuple[str, str, str], ...] = ()

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.columns)

    def create_sql(self, name: str | None = None) -> str:
        body = [f'"{col}" {sqltype}' for col, sqltype, _ in self.columns]
        if self.primary_key:
            body.append("PRIMARY KEY (" + ", ".join(f'"{c}"' for c in self.primary_key) + ")")
        for col, other, other_col in self.foreign_keys:
            body.append(f'FOREIGN KEY ("{col}") REFERENCES "{other}" ("{other_col}")')
        suffix = " WITHOUT ROWID" if self.without_rowid else ""
        return f'CREATE TABLE IF NOT EXISTS "{name or self.name}" ({", ".join(body)}){suffix}'

    def index_sql(self) -> list[str]:
        return [
            sql.replace(" INDEX ", " INDEX IF NOT EXISTS ", 1)
            for _, sql in self.index_definitions()
        ]

    def index_definitions(self) -> list[tuple[str, str]]:
        """(name, CREATE INDEX statement) exactly as SQLite keeps it in sqlite_master.sql,
        so an index whose definition changed since a database was built is recognised."""
        out = []
        for index, cols, where, unique in self.indexes:
            kind = "UNIQUE INDEX" if unique else "INDEX"
            clause = f" WHERE {where}" if where else ""
            out.append((index, f'CREATE {kind} "{index}" ON "{self.name}" ({cols}){clause}'))
        return out

    def shape_differs(self, conn: sqlite3.Connection) -> bool:
        """True when the stored table (if any) has other columns or foreign keys than
        declared: a database built by an older callgate, to be re-projected."""
        stored = [row[1] for row in conn.execute(f'PRAGMA table_info("{self.name}")')]
        if not stored:
            return False
        keys = {
            (row[3], row[2], row[4])
            for row in conn.execute(f'PRAGMA foreign_key_list("{self.name}")')
        }
        return tuple(stored) != self.column_names or keys != set(self.foreign_keys)

    @cached_property
    def insert_sql(self) -> str:
        return self.insert_sql_into(self.name)

    def insert_sql_into(self, name: str) -> str:
        cols = ", ".join(f'"{c}"' for c in self.column_names)
        marks = ", ".join("?" for _ in self.columns)
        return f'INSERT INTO "{name}" ({cols}) VALUES ({marks})'

    @property
    def staging_name(self) -> str:
        """Where a rebuild fills this table before swapping it in."""
        return self.name + STAGING_SUFFIX


# Expressions shared by index definitions and the canned queries of metadata.yml: SQLite
# uses an index on an expression only for the same expression (tests check the plans).
STARTED_DAY = 'substr("started_at", 1, 10)'
DIRECTION_GROUP = "coalesce(\"direction\", 'unknown')"
TIME_TO_ANSWER_MS = (
    'CAST(round((julianday("answered_at") - julianday("started_at")) * 86400000.0) AS INTEGER)'
)
ANSWERED = '"answered_at" IS NOT NULL AND "started_at" IS NOT NULL'
RING_MS = 'CAST(round("ring_seconds" * 1000.0) AS INTEGER)'
RUNG = '"ring_seconds" IS NOT NULL'
ACTIVE_UNTIL = 'coalesce("ended_at", "last_event_at")'
# A call's rows in plays, recordings, dtmf and speech point at it (Datasette links them).
TO_CALL = ("voice_id", "calls", "voice_id")

CALLS = Table(
    "calls",
    "One row per call (voice_id): its state folded from every logged event, in event time.",
    (
        ("voice_id", "TEXT NOT NULL", "EnableX voice id of the call."),
        ("direction", "TEXT", "inbound (an incomingcall was seen), broadcast (a broadcast leg) "
         "or outbound; NULL when the call has no call-level event."),
        ("from_number", "TEXT", "Caller number, from the first call-level event carrying one "
         "(bridge legs carry other numbers and are ignored); public form (see calls_private)."),
        ("to_number", "TEXT", "Called number, from the first call-level event carrying one; "
         "public form."),
        ("final_state", "TEXT", "Last call-level state by event time; disconnected is terminal. "
         "Recording, speech and bridge states never become the call state."),
        ("started_at", "TEXT", "Event time of the call's earliest event."),
        ("ringing_at", "TEXT", "First ringing (outbound) or incomingcall (inbound) event time."),
        ("answered_at", "TEXT", "First connected event time."),
        ("ended_at", "TEXT", "First disconnected event time, else the time of the final failed."),
        ("last_event_at", "TEXT", "Event time of the call's latest event."),
        ("ring_seconds", "REAL", "Seconds from ringing_at to answered_at (or to ended_at when "
         "never answered)."),
        ("duration_s", "INTEGER", "Talk time: floor(first disconnected - first connected) in "
         "seconds; NULL when either is missing."),
        ("hold_seconds", "REAL", "Seconds spent between hold and unhold (an open hold ends at "
         "disconnected)."),
        ("disconnect_reason", "TEXT", "disconnect_reason (or reason) of the event that ended "
         "the call."),
        ("disconnect_reason_normalised", "TEXT", "disconnect_reason in one spelling per "
         "reason: lower case, spaces and hyphens as _, synonyms merged (user_busy -> busy, "
         "noanswer -> no_answer, ...; README)."),
        ("plays", "INTEGER", "Number of distinct play_id on play and speech events."),
        ("digits", "TEXT", "JSON array of digit strings (play digitcollected and dtmf events) "
         "in event-time order; public form (menu choices of 1-2 keys as keyed)."),
        ("speech", "TEXT", "JSON array of recognised speech texts, in event-time order (NULL "
         "unless CALLGATE_PUBLIC_PII=full; see calls_private)."),
        ("speech_results", "TEXT", "JSON array of every speech result (recognized, "
         "unrecognized, timeout), in event-time order."),
        ("recording_url", "TEXT", "Last non-empty recording_url on any event of the call, its "
         "app-id segment replaced by the app label."),
        ("recording_duration_s", "REAL", "Last recording_duration (seconds) on any event."),
        ("bridge_state", "TEXT", "Last bridge-level state (bridging, bridged, "
         "bridge_disconnected, or a leg's failed/initiated after connected)."),
        ("transfer_to", "TEXT", "Last transfer target number seen; public form."),
        ("owner_ref", "TEXT", "First owner_ref on a call-level event."),
        ("channel_id", "TEXT", "First channel_id on a call-level event."),
        ("room_id", "TEXT", "Last room_id on any event of the call (the room it joined)."),
        ("broadcast_id", "TEXT", "Broadcast this call is a leg of, if any."),
        ("event_count", "INTEGER", "Number of logged (deduplicated) events of the call."),
        ("unknown_events", "INTEGER", "Events of a kind or state callgate does not know."),
        ("out_of_order_events", "INTEGER", "Events that arrived (by seq) after an event "
         "with a later event time."),
        ("event_classes", "TEXT", "JSON object: number of events per class (after bridge "
         "legs are re-derived from event order)."),
        ("first_seq", "INTEGER", "Lowest events.seq of the call."),
        ("last_seq", "INTEGER", "Highest events.seq of the call."),
    ),
    primary_key=("voice_id",),
    foreign_keys=(("broadcast_id", "broadcasts", "broadcast_id"),),
    # Besides the lookups Datasette's table pages make, the canned queries of metadata.yml
    # each read one of these indexes in order instead of the table (SQLite 3.40 uses an
    # index on expressions only when the query spells the same expression, and treats it
    # as covering only when the plain columns the query names are in it too). Generated
    # columns would not help: any query naming one reads the table row.
    indexes=(
        ("calls_started_at", '"started_at"', "", False),
        ("calls_final_state", '"final_state", "started_at"', "", False),
        # + answered_at: recording_coverage counts answered calls per direction from it
        ("calls_direction", '"direction", "started_at", "answered_at"', "", False),
        ("calls_broadcast_id", '"broadcast_id"', '"broadcast_id" IS NOT NULL', False),
        # calls_per_day, asr_ner_per_day, acd_per_day: grouped per day without a sort
        ("calls_started_day", f"{STARTED_DAY}, \"direction\", \"final_state\", "
         '"disconnect_reason_normalised", "answered_at", "duration_s", "started_at"', "", False),
        # disconnect_reasons
        ("calls_ended", '"final_state", "disconnect_reason_normalised", "disconnect_reason", '
         '"answered_at"', "", False),
        # answer_and_ring_times: each direction's values, and all of them, in order
        ("calls_answer_ms_by_direction", f'{DIRECTION_GROUP}, {TIME_TO_ANSWER_MS}, '
         '"direction", "answered_at", "started_at"', ANSWERED, False),
        ("calls_answer_ms", f'{TIME_TO_ANSWER_MS}, "answered_at", "started_at"', ANSWERED, False),
        # time_to_answer_per_day: each day's values in order
        ("calls_answer_ms_by_day", f'{STARTED_DAY}, {TIME_TO_ANSWER_MS}, "answered_at", '
         '"started_at"', ANSWERED, False),
        ("calls_ring_ms_by_direction", f'{DIRECTION_GROUP}, {RING_MS}, "direction", '
         '"ring_seconds"', RUNG, False),
        ("calls_ring_ms", f'{RING_MS}, "ring_seconds"', RUNG, False),
        # hourly_concurrency: the calls still active after a given moment
        ("calls_active_until", ACTIVE_UNTIL, "", False),
    ),
)

PLAYS = Table(
    "plays",
    "One row per play (prompt) of a call, keyed by play_id.",
    (
        ("voice_id", "TEXT NOT NULL", "Call the play belongs to."),
        ("play_id", "TEXT NOT NULL", "EnableX play id."),
        ("prompt_ref", "TEXT", "Last non-empty prompt_ref of the play."),
        ("final_state", "TEXT", "Last playstate by event time (playfinished, digitcollected, "
         "menutimeout, speechrecognized, ...)."),
        ("digits", "TEXT", "JSON array of digits collected by this play; public form."),
        ("speech_result", "TEXT", "Last speech result of this play, if it listened for speech."),
        ("speech_text", "TEXT", "Last recognised text of this play (NULL unless "
         "CALLGATE_PUBLIC_PII=full)."),
        ("started_at", "TEXT", "Time of the play's first event (normally initiated)."),
        ("finished_at", "TEXT", "Time of the play's last event that is not initiated."),
        ("event_count", "INTEGER", "Events of this play."),
        ("first_seq", "INTEGER", "Lowest events.seq of the play."),
        ("last_seq", "INTEGER", "Highest events.seq of the play."),
    ),
    primary_key=("voice_id", "play_id"),
    foreign_keys=(TO_CALL,),
    without_rowid=True,
    # + final_state, digits, speech_result: ivr_prompt_outcomes groups plays from it
    indexes=(
        ("plays_prompt_ref", '"prompt_ref", "final_state", "digits", "speech_result"', "", False),
    ),
)

RECORDINGS = Table(
    "recordings",
    "One row per recording of a call (by recording_id; '' when EnableX sent none).",
    (
        ("voice_id", "TEXT NOT NULL", "Call that was recorded."),
        ("recording_id", "TEXT NOT NULL", "EnableX recording id, '' when not sent."),
        ("state", "TEXT", "Last recording state (started, completed, failed, ...)."),
        ("started_at", "TEXT", "First started event time."),
        ("completed_at", "TEXT", "First completed event time."),
        ("recording_url", "TEXT", "Last non-empty recording_url of the recording (or of the "
         "call, when the call has exactly one recording), app id replaced by its label."),
        ("duration_s", "REAL", "Recording length in seconds as reported by EnableX."),
        ("description", "TEXT", "Last description sent with the recording events."),
        ("event_count", "INTEGER", "Recording events of this recording."),
        ("first_seq", "INTEGER", "Lowest events.seq of the recording (NULL if only known "
         "from call events)."),
        ("last_seq", "INTEGER", "Highest events.seq of the recording."),
    ),
    primary_key=("voice_id", "recording_id"),
    foreign_keys=(TO_CALL,),
    without_rowid=True,
)

DTMF = Table(
    "dtmf",
    "Every digit input of a call, from play digitcollected and dtmfcollected events.",
    (
        ("voice_id", "TEXT NOT NULL", "Call the digits were keyed in."),
        ("position", "INTEGER NOT NULL", "1-based order of this input within the call."),
        ("occurred_at", "TEXT", "Event time."),
        ("digits", "TEXT", "Digits as a string (0 stays \"0\"); public form: longer than 2 "
         "keys masked as one * per key."),
        ("source", "TEXT", "play (digitcollected of a play) or dtmf (dtmfcollected)."),
        ("play_id", "TEXT", "Play that collected the digits, if any."),
        ("prompt_ref", "TEXT", "prompt_ref of that play, if sent."),
        ("seq", "INTEGER", "events.seq of the event."),
    ),
    primary_key=("voice_id", "position"),
    foreign_keys=(TO_CALL,),
    without_rowid=True,
)

SPEECH = Table(
    "speech",
    "Every speech-recognition result of a call.",
    (
        ("voice_id", "TEXT NOT NULL", "Call that was listened to."),
        ("position", "INTEGER NOT NULL", "1-based order of this result within the call."),
        ("occurred_at", "TEXT", "Event time."),
        ("result", "TEXT", "recognized, unrecognized or timeout."),
        ("text", "TEXT", "Recognised text (text or recognized_phrase); NULL unless "
         "CALLGATE_PUBLIC_PII=full."),
        ("confidence", "REAL", "Recogniser confidence, when sent."),
        ("reason", "TEXT", "reason sent with the result."),
        ("play_id", "TEXT", "Play that listened, if sent."),
        ("prompt_ref", "TEXT", "prompt_ref of that play, if sent."),
        ("seq", "INTEGER", "events.seq of the event."),
    ),
    primary_key=("voice_id", "position"),
    foreign_keys=(TO_CALL,),
    without_rowid=True,
)

BROADCASTS = Table(
    "broadcasts",
    "One row per broadcast: its summary event(s) and its legs.",
    (
        ("broadcast_id", "TEXT NOT NULL", "EnableX broadcast id."),
        ("state", "TEXT", "Last summary state (broadcastcomplete, broadcastcall_complete); "
         "NULL until the summary arrives."),
        ("from_number", "TEXT", "Caller id of the broadcast (from its summary event); public "
         "form."),
        ("successful_calls", "INTEGER", "resultSet.successfull_calls, else broadcast_call_info "
         "entries whose state is completed."),
        ("failed_calls", "INTEGER", "resultSet.failed_calls, else the other "
         "broadcast_call_info entries."),
        ("total_calls", "INTEGER", "successful_calls + failed_calls when both are known."),
        ("totals_source", "TEXT", "resultSet or broadcast_call_info: where the totals came from."),
        ("legs", "INTEGER", "Distinct leg calls (voice_id) seen with this broadcast_id."),
        ("legs_answered", "INTEGER", "Legs with a connected event."),
        ("started_at", "TEXT", "Event time of the broadcast's earliest event."),
        ("completed_at", "TEXT", "Event time of the last summary event."),
        ("call_info", "TEXT", "broadcast_call_info of the last summary (JSON array; numbers in "
         "public form)."),
        ("event_count", "INTEGER", "Events carrying this broadcast_id (summaries and legs)."),
        ("first_seq", "INTEGER", "Lowest events.seq carrying this broadcast_id."),
        ("last_seq", "INTEGER", "Highest events.seq carrying this broadcast_id."),
    ),
    primary_key=("broadcast_id",),
)

TIMELINE_MARKS = Table(
    "timeline_marks",
    "What the timeline view needs beyond the log: events whose class was re-derived from the "
    "call's history, or that arrived after a later-timed event.",
    (
        ("seq", "INTEGER NOT NULL", "events.seq of the event."),
        ("voice_id", "TEXT", "Call of the event; NULL for broadcast summaries."),
        ("broadcast_id", "TEXT", "Broadcast id carried by the event."),
        ("class", "TEXT NOT NULL", "Class after re-derivation (a failed/initiated after "
         "connected is a bridge leg)."),
        ("arrived_late", "INTEGER NOT NULL", "1 when an event with a later event time of the "
         "same call (or broadcast) was logged before it."),
    ),
    primary_key=("seq",),
    indexes=(
        ("timeline_marks_voice_id", '"voice_id"', "", False),
        ("timeline_marks_broadcast", '"broadcast_id"', '"voice_id" IS NULL', False),
    ),
)

# Every logged event in call order. A view, not a table: the log already holds one row
# per event with the indexes a timeline needs (voice_id, occurred_at, seq) and
# (occurred_at), so a rebuild never copies a million rows; only timeline_marks is stored.
# `position` is a correlated count over that index: computed only for rows shown.
TIMELINE_VIEW = "timeline"
TIMELINE_PRIVATE_VIEW = "timeline_private"
TIMELINE_DESCRIPTION = (
    "Every logged event in call order (event time, ties by seq) with its class re-derived "
    "from the call's history. Filter by voice_id and sort by occurred_at, seq."
)
TIMELINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("seq", "events.seq of the event (its position in the log)."),
    ("voice_id", "Call of the event; NULL for broadcast summaries."),
    ("broadcast_id", "Broadcast id carried by the event."),
    ("position", "1-based order within the call (or within the broadcast's summaries)."),
    ("occurred_at", "Event time (UTC)."),
    ("received_at", "When callgate received it (UTC)."),
    ("class", "call, play, speech, recording, dtmf, bridge, broadcast or unknown; a "
     "failed/initiated after connected is a bridge leg."),
    ("state", "State within the class (play: playstate; speech: result)."),
    ("play_id", "Play id, when sent."),
    ("prompt_ref", "prompt_ref, when sent."),
    ("digits", "Digits keyed in (the event's dtmf row), in public form."),
    ("text", "Speech text (the event's speech row); NULL unless CALLGATE_PUBLIC_PII=full."),
    ("reason", "disconnect_reason or reason, when sent."),
    ("arrived_late", "1 when an event with a later event time arrived first."),
)
_CLEARTEXT_TIMELINE = {"digits": "Digits keyed in, cleartext.", "text": "Speech text, cleartext."}
TIMELINE_PRIVATE_COLUMNS: tuple[tuple[str, str], ...] = tuple(
    (name, _CLEARTEXT_TIMELINE.get(name, text)) for name, text in TIMELINE_COLUMNS
)


def _timeline_sql(name: str, private: bool) -> str:
    """The timeline view over the log. Digits and speech text come from the dtmf and speech
    rows of the same event, never from the payload: the public view shows their public
    form, the operator's view joins the cleartext in."""
    digits, text, joins = "d.digits", "s.text", ""
    if private:
        digits, text = "dp.digits", "sp.text"
        joins = (
            "\nLEFT JOIN dtmf_private AS dp ON dp.voice_id = d.voice_id "
            "AND dp.position = d.position"
            "\nLEFT JOIN speech_private AS sp ON sp.voice_id = s.voice_id "
            "AND sp.position = s.position"
        )
    return f"""CREATE VIEW "{name}" AS
SELECT e.seq AS seq, e.voice_id AS voice_id, e.broadcast_id AS broadcast_id,
       CASE WHEN e.voice_id IS NOT NULL THEN
         (SELECT count(*) FROM events AS p WHERE p.voice_id = e.voice_id
            AND (p.occurred_at < e.occurred_at
                 OR (p.occurred_at = e.occurred_at AND p.seq <= e.seq)))
       ELSE
         (SELECT count(*) FROM events AS p WHERE p.broadcast_id = e.broadcast_id
            AND p.voice_id IS NULL AND (p.occurred_at < e.occurred_at
                 OR (p.occurred_at = e.occurred_at AND p.seq <= e.seq)))
       END AS position,
       e.occurred_at AS occurred_at, e.received_at AS received_at,
       COALESCE(m.class, e.class) AS class, e.state AS state,
       json_extract(e.payload, '$.play_id') AS play_id,
       json_extract(e.payload, '$.prompt_ref') AS prompt_ref,
       {digits} AS digits,
       {text} AS text,
       COALESCE(NULLIF(json_extract(e.payload, '$.disconnect_reason'), ''),
                json_extract(e.payload, '$.reason')) AS reason,
       COALESCE(m.arrived_late, 0) AS arrived_late
FROM events AS e LEFT JOIN timeline_marks AS m ON m.seq = e.seq
LEFT JOIN dtmf AS d ON d.voice_id = e.voice_id AND d.seq = e.seq
LEFT JOIN speech AS s ON s.voice_id = e.voice_id AND s.seq = e.seq{joins}"""


# name -> CREATE VIEW statement, exactly as SQLite keeps it in sqlite_master.sql, so a view
# whose definition changed since a database was built is recognised and replaced.
VIEWS: dict[str, str] = {
    TIMELINE_VIEW: _timeline_sql(TIMELINE_VIEW, private=False),
    TIMELINE_PRIVATE_VIEW: _timeline_sql(TIMELINE_PRIVATE_VIEW, private=True),
}

CHECKPOINTS = Table(
    "checkpoints",
    "How far each consumer of the log has got (name 'projector': the projections; "
    "'lateness_histogram': that summary).",
    (
        ("name", "TEXT NOT NULL", "Consumer name."),
        ("seq", "INTEGER NOT NULL", "Highest events.seq fully reflected by that consumer."),
        ("updated_at", "TEXT", "When the checkpoint last moved (UTC)."),
    ),
    primary_key=("name",),
)

# Summaries (analytics/summaries.py): what peak_concurrency and webhook_lateness read
# instead of sweeping every call or histogramming every event on each request.
HOURLY_CONCURRENCY = Table(
    summaries.CONCURRENCY,
    "Per UTC hour: the most calls active at one moment and the calls that started "
    "(peak_concurrency). Derived from calls; kept up to date by the projector.",
    (
        ("hour", "TEXT NOT NULL", "Start of the hour (UTC, YYYY-MM-DDTHH:00:00Z)."),
        ("peak_concurrent_calls", "INTEGER NOT NULL", "Most calls active at one moment of the "
         "hour: a call is active from started_at until ended_at (until last_event_at while "
         "it has not ended), end excluded."),
        ("calls_started", "INTEGER NOT NULL", "Calls whose started_at is in the hour."),
    ),
    primary_key=("hour",),
    without_rowid=True,
)

LATENESS_HISTOGRAM = Table(
    summaries.LATENESS,
    "Logged events per received day, class and lateness (received_at - occurred_at) in "
    "milliseconds, for webhook_lateness; events without a timestamp of their own are left "
    "out. Only grows: checkpoints row 'lateness_histogram' says how far it has got.",
    (
        ("received_day", "TEXT NOT NULL", "UTC day of received_at (YYYY-MM-DD)."),
        ("class", "TEXT NOT NULL", "Event class as logged (events.class)."),
        ("ms", "INTEGER NOT NULL", "received_at - occurred_at in milliseconds (negative when "
         "EnableX's clock is ahead)."),
        ("events", "INTEGER NOT NULL", "Number of events."),
        ("first_seq", "INTEGER NOT NULL", "Lowest events.seq among them."),
        ("last_seq", "INTEGER NOT NULL", "Highest events.seq among them."),
    ),
    primary_key=("class", "ms", "received_day"),
    without_rowid=True,
)

_FIELDS = {
    CALLS: folds.CALL_FIELDS,
    PLAYS: folds.PLAY_FIELDS,
    RECORDINGS: folds.RECORDING_FIELDS,
    DTMF: folds.DTMF_FIELDS,
    SPEECH: folds.SPEECH_FIELDS,
    BROADCASTS: folds.BROADCAST_FIELDS,
    TIMELINE_MARKS: folds.MARK_FIELDS,
}
for _table, _fields in _FIELDS.items():  # the folds emit positional rows: orders must agree
    if _table.column_names != _fields:
        raise RuntimeError(f"analytics.tables.{_table.name} columns differ from the fold's rows")
if tuple(name for name, _ in TIMELINE_COLUMNS) != folds.TIMELINE_FIELDS:
    raise RuntimeError("analytics.tables.TIMELINE_COLUMNS differ from the fold's timeline rows")

# Personal (and secret) columns of the public tables, each with its kind (the public form
# analytics/privacy.py gives it). The public table holds that form; `<table>_private`,
# operator only, holds the cleartext keyed like the public row. The projector writes
# cleartext nowhere else.
PRIVATE_SUFFIX = "_private"
PERSONAL: dict[str, tuple[tuple[str, str], ...]] = {
    CALLS.name: (
        ("from_number", "number"), ("to_number", "number"), ("transfer_to", "number"),
        ("digits", "digit_list"), ("speech", "text"), ("recording_url", "url"),
    ),
    PLAYS.name: (("digits", "digit_list"), ("speech_text", "text")),
    RECORDINGS.name: (("recording_url", "url"),),
    DTMF.name: (("digits", "digits"),),
    SPEECH.name: (("text", "text"),),
    BROADCASTS.name: (("from_number", "number"), ("call_info", "call_info")),
}  # fmt: skip
_CLEARTEXT = {
    "from_number": "Caller number as EnableX sent it.",
    "to_number": "Called number as EnableX sent it.",
    "transfer_to": "Transfer target number as EnableX sent it.",
    "digits": "Digits as keyed in.",
    "speech": "JSON array of recognised speech texts.",
    "speech_text": "Last recognised text of this play.",
    "text": "Recognised text.",
    "recording_url": "recording_url as EnableX sent it (with the app id).",
    "call_info": "broadcast_call_info of the last summary (JSON array, numbers as sent).",
}


def _private_table(table: Table) -> Table:
    """`<table>_private`: the key of `table`, then its personal columns in cleartext."""
    types = {name: sqltype for name, sqltype, _ in table.columns}
    keys = {name: text for name, _, text in table.columns if name in table.primary_key}
    columns = tuple((name, types[name], keys[name]) for name in table.primary_key)
    columns += tuple((name, types[name], _CLEARTEXT[name]) for name, _ in PERSONAL[table.name])
    return Table(
        table.name + PRIVATE_SUFFIX,
        f"Operator only: the cleartext personal fields of {table.name} (which holds their "
        "public form), keyed like it.",
        columns,
        primary_key=table.primary_key,
        without_rowid=True,
    )


PUBLIC_WITH_PRIVATE: tuple[Table, ...] = (CALLS, PLAYS, RECORDINGS, DTMF, SPEECH, BROADCASTS)
PRIVATE: dict[str, Table] = {t.name: _private_table(t) for t in PUBLIC_WITH_PRIVATE}

# Tables a rebuild drops and re-creates (checkpoints is shared, so it is only updated).
PROJECTIONS: tuple[Table, ...] = (
    CALLS, PLAYS, RECORDINGS, DTMF, SPEECH, BROADCASTS, TIMELINE_MARKS, *PRIVATE.values(),
)  # fmt: skip
# Kept by analytics/summaries.py rather than by the folds.
SUMMARIES: tuple[Table, ...] = (HOURLY_CONCURRENCY, LATENESS_HISTOGRAM)
ALL_TABLES: tuple[Table, ...] = (*PROJECTIONS, *SUMMARIES, CHECKPOINTS)
# What anonymous visitors must never read (metadata.yml: allow operator).
OPERATOR_ONLY: tuple[str, ...] = (*(t.name for t in PRIVATE.values()), TIMELINE_PRIVATE_VIEW)


def cleartext_select(table: Table) -> str:
    """SELECT of `table`'s columns with its personal columns' cleartext joined in from
    `<table>_private` (how an operator, or a test, reads whole rows as EnableX sent them)."""
    private = PRIVATE[table.name]
    personal = {name for name, _ in PERSONAL[table.name]}
    columns = ", ".join(
        f'p."{name}" AS "{name}"' if name in personal else f't."{name}" AS "{name}"'
        for name in table.column_names
    )
    on = " AND ".join(f't."{k}" = p."{k}"' for k in table.primary_key)
    return f'SELECT {columns} FROM "{table.name}" AS t JOIN "{private.name}" AS p ON {on}'


# For metadata.yml: a description per column of every table and view.
COLUMN_DESCRIPTIONS: dict[str, dict[str, str]] = {
    **{t.name: {name: text for name, _, text in t.columns} for t in ALL_TABLES},
    TIMELINE_VIEW: dict(TIMELINE_COLUMNS),
    TIMELINE_PRIVATE_VIEW: dict(TIMELINE_PRIVATE_COLUMNS),
}


def create_tables(conn: sqlite3.Connection, indexes: bool = True) -> None:
    """Idempotent: create every projection and summary table (and the indexes unless bulk
    loading) and the timeline views. Needs the `events` table (gateway.log.eventlog.ensure_schema).

    A database built by an older callgate gets what it lacks: new indexes, indexes whose
    definition changed (rebuilt), and new summary tables, filled before they are used
    (the lateness histogram only partly inside a caller's transaction: see
    fill_new_summaries)."""
    have = {
        row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    drop_outdated(conn)
    for table in ALL_TABLES:
        conn.execute(table.create_sql())
    if indexes:
        create_indexes(conn)
    create_views(conn)
    fill_new_summaries(conn, {t.name for t in SUMMARIES} - have)


def drop_outdated(conn: sqlite3.Connection) -> list[str]:
    """Drop projection tables whose stored shape is not the declared one (a column or a
    foreign key added since the database was built) and reset the projector's checkpoint,
    so it folds the whole log again into the new shapes. Returns the dropped names.

    Projections are derived data: re-projecting is always correct, and cheaper to get
    right than a migration per column. The indexes of a dropped table go with it."""
    outdated = [t.name for t in PROJECTIONS if t.shape_differs(conn)]
    if outdated:
        with transaction(conn):
            for name in outdated:
                conn.execute(f'DROP TABLE "{name}"')
            conn.execute(CHECKPOINTS.create_sql())
            conn.execute("DELETE FROM checkpoints WHERE name = ?", (PROJECTOR_CHECKPOINT,))
    return outdated


def create_views(conn: sqlite3.Connection) -> None:
    """The timeline views; one stored with another definition (an older callgate read
    digits and text from the payload) is replaced."""
    stored = {
        name: (kind, sql)
        for name, kind, sql in conn.execute("SELECT name, type, sql FROM sqlite_master")
    }
    for name, sql in VIEWS.items():
        kind, have = stored.get(name, (None, None))
        if kind == "table":  # an early build stored the timeline: a rebuild replaces it
            continue
        if have == sql:
            continue
        if kind == "view":
            conn.execute(f'DROP VIEW "{name}"')
        conn.execute(sql)


def create_indexes(conn: sqlite3.Connection) -> None:
    """Indexes are built after a bulk load: one sort beats a million B-tree inserts. An
    index whose stored definition differs from the declared one is dropped and rebuilt."""
    stored = dict(
        conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
    )
    for table in ALL_TABLES:
        for name, sql in table.index_definitions():
            if name in stored and stored[name] != sql:
                conn.execute(f'DROP INDEX "{name}"')
            conn.execute(sql.replace(" INDEX ", " INDEX IF NOT EXISTS ", 1))


def fill_new_summaries(conn: sqlite3.Connection, created: set[str]) -> None:
    """Fill summary tables that were just created. hourly_concurrency must be complete
    before it is read. The lateness histogram is filled completely in autocommit mode (a
    transaction per chunk); inside a caller's transaction only one chunk, so the write lock
    is not held for long: the canned query reads what is not summarised yet from the log,
    and the projector summarises the rest batch by batch."""
    if HOURLY_CONCURRENCY.name in created:
        summaries.rebuild_concurrency(conn)
    if LATENESS_HISTOGRAM.name in created:
        summaries.reset_lateness(conn)
        limit = summaries.LATENESS_CHUNK if conn.in_transaction else None
        summaries.refresh_lateness(conn, max_events=limit)


def refresh_summaries(conn: sqlite3.Connection, voice_ids: Iterable[str]) -> None:
    """For the projector, after it replaced the rows of `voice_ids` in the same
    transaction: recompute the hours those calls touch, summarise newly logged events."""
    summaries.refresh_calls(conn, voice_ids)
    summaries.refresh_lateness(conn, max_events=summaries.LATENESS_PER_BATCH)


def create_staging(conn: sqlite3.Connection) -> None:
    """Fresh, index-free staging copies of the projections for a rebuild to fill."""
    drop_staging(conn)
    for table in PROJECTIONS:
        conn.execute(table.create_sql(table.staging_name))


def drop_staging(conn: sqlite3.Connection) -> None:
    """Remove what an interrupted rebuild left behind."""
    for table in PROJECTIONS:
        conn.execute(f'DROP TABLE IF EXISTS "{table.staging_name}"')


def swap_in_staging(conn: sqlite3.Connection) -> None:
    """Replace the projections with their staging copies, then index them, restore the
    timeline view and recompute hourly_concurrency from the new calls. Call inside the
    transaction that makes the new tables visible. (lateness_histogram is kept: the log
    only grows, so it is extended, never recomputed; drop it to have it rebuilt.)"""
    drop_projections(conn)
    for table in PROJECTIONS:
        conn.execute(f'ALTER TABLE "{table.staging_name}" RENAME TO "{table.name}"')
    create_tables(conn)
    summaries.rebuild_concurrency(conn)
    summaries.refresh_lateness(conn, max_events=summaries.LATENESS_CHUNK)


def drop_projections(conn: sqlite3.Connection) -> None:
    """Drop the derived tables and the views over them (never `events`, never
    `checkpoints`)."""
    for name in VIEWS:
        kind = conn.execute("SELECT type FROM sqlite_master WHERE name = ?", (name,)).fetchone()
        if kind is not None:  # a view now; an early build stored the timeline as a table
            conn.execute(f'DROP {"VIEW" if kind[0] == "view" else "TABLE"} "{name}"')
    for table in PROJECTIONS:
        conn.execute(f'DROP TABLE IF EXISTS "{table.name}"')
