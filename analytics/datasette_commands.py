"""`callgate datasette`: serve the call history and analytics with Datasette."""

from __future__ import annotations

import os
import sys

import click

from analytics.datasette_app import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    TOKEN_ENV,
    datasette_argv,
    operator_token_problem,
    prepare_database,
)
from gateway.cli import db_option


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
    problem = operator_token_problem()
    if problem:
        click.echo(f"callgate datasette: warning: {problem}", err=True)
    argv = datasette_argv(db, host, port)
    click.echo(f"callgate datasette: serving {db} on http://{host}:{port}/", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # Replace this process: Ctrl-C and SIGTERM go straight to Datasette.
    os.execve(argv[0], argv, dict(os.environ))


__all__ = ["datasette", "TOKEN_ENV"]
