"""1,000 simulated calls through a real gateway, with redeliveries and reordering: after
`callgate project` the `calls` and `broadcasts` tables equal the simulator's truth file."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest

from analytics import tables
from gateway.cli import main
from tests.conftest import CALLGATE, RunningServer, server_env

APP = "sim-e2e-app-0001"  # made up
CALLS = 1000
COLUMNS = ("final_state", "duration_s", "plays", "digits", "speech", "recording_url")


def _rows(db: str, sql: str) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql)]


def _as_list(value: Any) -> list[Any]:
    """`digits`/`speech` are JSON array text in the table (NULL read as empty)."""
    return json.loads(value) if isinstance(value, str) else list(value or [])


@pytest.mark.skipif("project" not in main.commands, reason="`callgate project` not available")
def test_thousand_calls_project_to_the_truth(tmp_path: Path) -> None:
    db = str(tmp_path / "cg.db")
    truth_path = tmp_path / "truth.jsonl"
    server = RunningServer(db, server_env(ENABLEX_APP_ID=APP)).start()
    try:
        sent = subprocess.run(
            [CALLGATE, "simulate", "--url", server.url, "--calls", str(CALLS), "--rate", "0",
             "--concurrency", "8", "--app-id", APP, "--duplicates", "0.05",
             "--reorder", "0.1", "--seed", "20240501", "--truth", str(truth_path),
             "--no-progress"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    finally:
        server.stop()
    assert sent.returncode == 0, sent.stdout + sent.stderr
    summary = dict(re.findall(r"^(\w+)\s+(\d+)", sent.stdout, re.M))
    redelivered = int(re.search(r"\((\d+) redeliveries\)", sent.stdout).group(1))  # type: ignore[union-attr]
    assert redelivered > 100 and int(summary["duplicates"]) == redelivered
    assert int(summary["refused"]) == 0 and int(summary["errors"]) == 0

    projected = subprocess.run(
        [CALLGATE, "project", "--db", db], capture_output=True, text=True, timeout=120
    )
    assert projected.returncode == 0, projected.stdout + projected.stderr

    truth = [json.loads(line) for line in truth_path.read_text().splitlines()]
    calls = {t["voice_id"]: t for t in truth if t["kind"] == "call"}
    broadcasts = {t["broadcast_id"]: t for t in truth if t["kind"] == "broadcast"}
    assert len(calls) == CALLS and broadcasts

    # The truth holds what was sent: compare with the cleartext (the operator's view).
    rows = {r["voice_id"]: r for r in _rows(db, tables.cleartext_select(tables.CALLS))}
    assert set(rows) == set(calls)
    mismatches = []
    for vid, want in calls.items():
        row = rows[vid]
        got = {c: row[c] for c in COLUMNS}
        got["digits"], got["speech"] = _as_list(got["digits"]), _as_list(got["speech"])
        expected = {c: want[c] for c in COLUMNS}
        if got != expected:
            diff = {c: (expected[c], got[c]) for c in COLUMNS if got[c] != expected[c]}
            mismatches.append((want["scenario"], vid, diff))
    assert not mismatches, f"{len(mismatches)} calls differ, e.g. {mismatches[:5]}"

    bc_rows = {r["broadcast_id"]: r for r in _rows(db, "SELECT * FROM broadcasts")}
    assert set(bc_rows) == set(broadcasts)
    for bid, want in broadcasts.items():
        row = bc_rows[bid]
        got_bc = (row["state"], row["successful_calls"], row["failed_calls"])
        assert got_bc == (want["state"], want["successful"], want["failed"]), bid
