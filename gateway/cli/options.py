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


def log_option(func):  # type: ignore[no-untyped-def]
    """`--log`: the embedded SQLite log (default) or a NATS JetStream cluster."""
    return click.option(
        "--log",
        "log",
        envvar="CALLGATE_LOG",
        default="sqlite",
        show_default=True,
        metavar="sqlite|nats://HOST:PORT[,HOST:PORT...]",
        help="Event log backend (overrides $CALLGATE_LOG).",
    )(func)


def log_config(db: str, log: str):  # type: ignore[no-untyped-def]
    """The Config for `--db`/`--log`; a malformed `--log` is a clear error, exit 1."""
    from gateway.config import Config, LogURLError

    config = Config.from_env(db_path=db, log=log)
    try:
        config.nats_servers  # noqa: B018 (parses, raising on a bad value)
    except LogURLError as exc:
        click.echo(f"callgate: {exc}", err=True)
        raise SystemExit(1) from None
    return config
