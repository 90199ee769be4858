"""The `callgate` command line. Each command is a thin wrapper over a module function."""

from __future__ import annotations

import click

from gateway.config import DEFAULT_DB


def db_option(func):  # type: ignore[no-untyped-def]
    """`--db` on every command, defaulting to $CALLGATE_DB then data/callgate.db."""
    return click.option(
        "--db",
        "db",
        envvar="CALLGATE_DB",
        default=DEFAULT_DB,
        show_default=True,
        type=click.Path(dir_okay=False),
        help="SQLite database file (overrides $CALLGATE_DB).",
    )(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="callgate")
def main() -> None:
    """callgate: receiver, event log, call history and forwarder for EnableX Voice webhooks."""


# --- registered commands ---
