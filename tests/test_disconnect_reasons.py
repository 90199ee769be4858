"""calls.disconnect_reason_normalised: the README's rules against every spelling the corpus
and the demo generator send, and against the spellings EnableX's docs list."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from analytics.folds import normalise_reason, project_call
from gateway.simulate.generator import generate
from tests.corpus import flows
from tests.helpers_analytics import normalised

# spelling as sent -> the one name it is counted under (README "Normalised disconnect reasons")
RULES = {
    "NO_ANSWER": "no_answer",
    "No Answer": "no_answer",
    "no_answer": "no_answer",
    "no-answer": "no_answer",
    "  No  Answer ": "no_answer",
    "noanswer": "no_answer",
    "NoAnswer": "no_answer",
    "no_user_response": "no_answer",
    "Not Answered": "no_answer",
    "ring_timeout": "no_answer",
    "User Busy": "busy",
    "user_busy": "busy",
    "busy": "busy",
    "BUSY": "busy",
    "Rejected": "rejected",
    "call_rejected": "rejected",
    "Declined": "rejected",
    "Normal Clearing": "normal_clearing",
    "normal_clearing": "normal_clearing",
    "hangup_by_api": "hangup_by_api",
    "remote_hangup": "remote_hangup",
    "Timeout": "timeout",
}


def test_rules() -> None:
    for spelling, expected in RULES.items():
        assert normalise_reason(spelling) == expected, spelling


@pytest.mark.parametrize("value", [None, "", "   ", "_", {"code": 1}, ["busy"], True])
def test_no_reason_is_null(value: object) -> None:
    assert normalise_reason(value) is None


def _corpus_reasons() -> set[str]:
    found = set()
    for flow in flows():
        for raw in flow.events:
            for key in ("disconnect_reason", "reason"):
                if isinstance(raw.get(key), str) and raw.get("state") in (
                    "disconnected", "failed"
                ):
                    found.add(raw[key])
    return found


def _generator_reasons() -> set[str]:
    sim = generate(600, seed=7, start=datetime(2024, 5, 1, tzinfo=UTC))
    found = set()
    for delivery in sim.deliveries:
        raw = delivery.payload
        if raw.get("state") in ("disconnected", "failed"):
            for key in ("disconnect_reason", "reason"):
                if isinstance(raw.get(key), str):
                    found.add(raw[key])
    return found


def test_every_spelling_sent_is_covered_by_the_rules() -> None:
    """A new spelling in the corpus or the generator must get a decision in RULES."""
    corpus, generated = _corpus_reasons(), _generator_reasons()
    assert {"Normal Clearing", "busy", "no_answer", "hangup_by_api"} <= corpus
    assert {"NO_ANSWER", "No Answer", "no_answer", "User Busy", "busy"} <= generated
    assert (corpus | generated) - set(RULES) == set()


def test_the_fold_keeps_the_raw_reason_beside_the_normalised_one() -> None:
    row = project_call(normalised([
        {"voice_id": "v1", "state": "initiated", "timestamp": "2024-05-01T10:00:00Z"},
        {"voice_id": "v1", "state": "disconnected", "disconnect_reason": "User Busy",
         "timestamp": "2024-05-01T10:00:04Z"},
    ]))["calls"]  # fmt: skip
    assert (row["disconnect_reason"], row["disconnect_reason_normalised"]) == ("User Busy", "busy")
