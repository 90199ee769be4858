"""Docs are a contract: every command is in the README, has --help and takes --db."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from tests.conftest import CALLGATE

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
REQUIRED = {"serve", "up", "project", "rebuild", "verify", "reprocess", "forward", "subscribe",
            "subscriptions", "unsubscribe", "redeliver", "datasette", "simulate", "ingest"}


def test_the_design_contract_commands_exist() -> None:
    assert set(main.commands) >= REQUIRED


@pytest.mark.parametrize("name", sorted(main.commands))
def test_command_is_documented_and_takes_db(name: str) -> None:
    assert re.search(rf"`callgate {re.escape(name)}\b", README), f"{name} missing from README"
    params = {p.name for p in main.commands[name].params}
    if name != "simulate":  # simulate talks HTTP to a gateway, it never opens the database
        assert "db" in params, f"{name} has no --db"


def test_help_runs_for_every_command() -> None:
    runner = CliRunner()
    for name in main.commands:
        out = runner.invoke(main, [name, "--help"])
        assert out.exit_code == 0 and "Usage:" in out.output, name


def test_the_installed_console_script_runs() -> None:
    out = subprocess.run([CALLGATE, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "serve" in out.stdout
