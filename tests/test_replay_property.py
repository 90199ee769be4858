"""Property: the projections are a function of the SET of logged events.

Whatever order the corpus webhooks arrive in, however many are redelivered, and
however the projector's batches fall, the projection tables equal those of
in-order arrival (up to the columns that record arrival itself: seq and
lateness), and a full rebuild equals the incremental result row for row.
"""

from __future__ import annotations

import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from analytics import folds, projector
from tests.helpers_analytics import (
    Snapshot,
    append_all,
    canonical,
    corpus,
    normalised,
    open_log,
    snapshot,
    unique_raw,
)

ALL_RAW: list[dict[str, Any]] = [raw for flow in corpus() for raw in flow.events]
UNIQUE = len(unique_raw(ALL_RAW))


def replay(order: list[dict[str, Any]], chunk: int, batch: int, directory: str) -> Snapshot:
    """Deliver `order` in chunks, projecting `batch` events after each chunk, then catch up.
    Returns the incremental tables after checking that a rebuild reproduces them exactly."""
    conn = open_log(str(Path(directory) / "log.db"))
    try:
        for start in range(0, len(order), chunk):
            append_all(conn, order[start : start + chunk])
            projector.project_once(conn, batch=batch)
        projector.project_all(conn, batch=batch)
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == UNIQUE
        incremental = snapshot(conn)
        projector.rebuild(conn)
        assert snapshot(conn) == incremental, "rebuild differs from the incremental projection"
        return snapshot(conn, drop_arrival=True)
    finally:
        conn.close()


@cache
def in_order() -> Snapshot:
    with tempfile.TemporaryDirectory() as directory:
        return replay(ALL_RAW, chunk=len(ALL_RAW), batch=len(ALL_RAW), directory=directory)


@st.composite
def deliveries(draw: st.DrawFn) -> list[dict[str, Any]]:
    """A permutation of every corpus event plus redeliveries of random events anywhere."""
    order = [ALL_RAW[i] for i in draw(st.permutations(range(len(ALL_RAW))))]
    redeliveries = draw(
        st.lists(
            st.tuples(st.integers(0, len(ALL_RAW) - 1), st.integers(0, len(ALL_RAW))),
            max_size=25,
        )
    )
    for index, position in redeliveries:
        order.insert(position, ALL_RAW[index])
    return order


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(order=deliveries(), chunk=st.integers(1, 60), batch=st.integers(1, 80))
def test_any_arrival_order_with_redeliveries_projects_like_in_order(
    order: list[dict[str, Any]], chunk: int, batch: int
) -> None:
    reference = in_order()
    with tempfile.TemporaryDirectory() as directory:
        shuffled = replay(order, chunk, batch, directory)
    assert shuffled.keys() == reference.keys()
    for table, rows in reference.items():
        assert shuffled[table] == rows, f"{table} depends on arrival order"


def test_in_order_reference_is_not_empty() -> None:
    """Guard against a vacuous property: the reference really holds the corpus' calls."""
    reference = in_order()
    voice_ids = {e["voice_id"] for e in normalised(ALL_RAW) if e["voice_id"]}
    assert len(reference["calls"]) == len(voice_ids) > 20
    assert len(reference["timeline"]) == UNIQUE
    assert reference["broadcasts"] and reference["plays"] and reference["dtmf"]


@cache
def corpus_calls() -> dict[str, list[dict[str, Any]]]:
    by_call: dict[str, list[dict[str, Any]]] = {}
    for event in normalised(ALL_RAW):
        if event["voice_id"]:
            by_call.setdefault(event["voice_id"], []).append(event)
    return by_call


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_pure_fold_ignores_input_order(data: st.DataObject) -> None:
    by_call = corpus_calls()
    voice_id = data.draw(st.sampled_from(sorted(by_call)))
    calls = by_call[voice_id]
    shuffled = data.draw(st.permutations(calls))
    assert folds.project_call(shuffled) == folds.project_call(calls)
    # Re-numbering arrival (seq) while keeping event times changes only arrival columns.
    renumbered = [dict(e, seq=s) for e, s in zip(calls, data.draw(st.permutations(
        [e["seq"] for e in calls])), strict=True)]  # fmt: skip
    a, b = folds.project_call(calls)["calls"], folds.project_call(renumbered)["calls"]
    for column in ("final_state", "duration_s", "digits", "speech", "plays", "recording_url",
                   "bridge_state", "event_classes", "hold_seconds", "ring_seconds"):  # fmt: skip
        assert a[column] == b[column], column


def test_redelivered_events_are_logged_once() -> None:
    keys = {canonical(raw) for raw in ALL_RAW}
    assert UNIQUE == len(keys) < len(ALL_RAW)
