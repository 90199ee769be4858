"""Options shared by every command."""

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
