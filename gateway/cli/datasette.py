"""`callgate datasette`: serve the call history and analytics with Datasette."""

from __future__ import annotations

import os
import sys

import click

from analytics import tables
from analytics.datasette_app import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    TOKEN_ENV,
    datasette_argv,
    operator_token_problem,
)
from gateway.cli.options import db_option
from gateway.config import Config
from gateway.db import connect
from gateway.forward import outbox
from gateway.log import eventlog


def prepare_database(db: str | os.PathLike[str]) -> None:
    """Create the file and every table Datasette should describe (all idempotent).

    Datasette refuses a missing file, and a table created later would appear
    only after a restart in some pages, so the log, projection and forwarding
    schemas are ensured up front.
    """
    conn = connect(str(db))
    try:
        eventlog.ensure_schema(conn)
        tables.create_tables(conn)
        outbox.ensure_schema(conn)
    finally:
        conn.close()


@click.command("datasette")
@db_option
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Interface to bind.")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int, help="TCP port.")
def datasette(db: str, host: str, port: int) -> None:
    """Serve the database in Datasette (mutable, WAL-aware) with callgate's metadata.

    Anonymous visitors see calls, the projections and the aggregate queries and
    dashboards; the event log's payloads, rejections and forwarding tables and
    arbitrary SQL need the operator token: send `Authorization: Bearer $TOKEN`
    with the token set in $CALLGATE_DATASETTE_TOKEN.
    """
    prepare_database(db)
    config = Config.from_env(db_path=db)
    if config.datasette_token is not None and not config.datasette_token.isascii():
        raise click.ClickException(f"{TOKEN_ENV} must be ASCII text")
    problem = operator_token_problem(config.datasette_token)
    if problem:
        click.echo(f"callgate datasette: warning: {problem}", err=True)
    argv = datasette_argv(db, host, port, token_configured=config.datasette_token is not None)
    click.echo(f"callgate datasette: serving {db} on http://{host}:{port}/", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process: Ctrl-C and SIGTERM go straight to Datasette.
    os.execve(argv[0], argv, dict(os.environ))


__all__ = ["datasette", "prepare_database", "TOKEN_ENV"]
