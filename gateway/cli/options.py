"""Options shared by every command."""

from __future__ import annotations

import sqlite3

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


def check_keys(db: str) -> None:
    """Start-up check of the key store (gateway/log/keystore.py): a missing, foreign or
    wrongly keyed store stops the command here with the reason, exit 1, never later
    mid-request and never by sealing with a fresh store."""
    from gateway.config import Config
    from gateway.db import connect
    from gateway.log import eventlog, keystore

    try:
        conn = connect(db)
    except sqlite3.Error as exc:
        click.echo(f"warning: key store not checked yet ({exc}); checked again on first use",
                   err=True)
        return
    try:
        eventlog.ensure_schema(conn)
        keystore.for_database(conn, Config.from_env(db_path=db))
    except keystore.KeyStoreError as exc:
        raise click.ClickException(str(exc)) from None
    except (sqlite3.Error, OSError) as exc:
        # A full or failing disk: the gateway must still boot and answer 503 until it
        # recovers; the writer opens (and checks) the key store on its first commit.
        click.echo(f"warning: key store not checked yet ({exc}); checked again on first use",
                   err=True)
    finally:
        conn.close()
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
