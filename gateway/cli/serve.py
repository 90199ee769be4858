"""`callgate serve`: the webhook gateway under gunicorn."""

from __future__ import annotations

import click

from gateway.cli.options import check_keys, db_option, log_config, log_option
from gateway.config import Config
from gateway.web.server import ServeOptions
from gateway.web.server import serve as run_server

DEFAULTS = ServeOptions()


@click.command("serve")
@db_option
@log_option
@click.option("--host", default=DEFAULTS.host, show_default=True, help="Address to bind.")
@click.option("--port", default=DEFAULTS.port, show_default=True, type=int, help="Port to bind.")
@click.option(
    "--workers", default=DEFAULTS.workers, show_default=True, type=int, help="Worker processes."
)
@click.option(
    "--threads",
    default=DEFAULTS.threads,
    show_default=True,
    type=int,
    help="Threads per worker (each waits for its group commit; more of them make bigger batches).",
)
@click.option("--access-log/--no-access-log", default=False, help="gunicorn access log.")
@click.option(
    "--idle-timeout",
    default=DEFAULTS.keepalive,
    show_default=True,
    type=click.IntRange(min=1),
    help="Seconds a new or kept-alive connection may stay silent before it is closed.",
)
@click.option(
    "--read-timeout",
    default=DEFAULTS.read_timeout,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a whole request (headers and body) may take to arrive.",
)
@click.option(
    "--cpu-affinity/--no-cpu-affinity",
    default=DEFAULTS.cpu_affinity,
    show_default=True,
    help="Pin each worker process to its own CPU (turn off when the host's CPUs are "
    "shared with other busy services).",
)
def serve(
    db: str,
    log: str,
    host: str,
    port: int,
    workers: int,
    threads: int,
    access_log: bool,
    idle_timeout: int,
    read_timeout: float,
    cpu_affinity: bool,
) -> None:
    """Serve the webhook gateway under gunicorn (POST /webhooks/enablex).

    With --log nats://…, the gateway keeps no state: it answers 2xx once JetStream
    acknowledged the event, and `callgate archive` fills the SQLite log.
    """
    config = log_config(db, log)
    if config.open_endpoint_problem:
        click.echo(f"callgate serve: warning: {config.open_endpoint_problem}", err=True)
    if config.nats_servers:
        _check_stream(config)
    else:
        check_keys(db)
    run_server(
        ServeOptions(
            host=host,
            port=port,
            workers=workers,
            threads=threads,
            access_log=access_log,
            # One value for both: the worker expires them from one FIFO sweep.
            keepalive=idle_timeout,
            first_byte_timeout=float(idle_timeout),
            read_timeout=read_timeout,
            cpu_affinity=cpu_affinity,
        ),
        db,
        log,
    )


def _check_stream(config: Config) -> None:
    """Refuse to start on a stream whose settings break "2xx means stored"; warn if NATS
    cannot be reached yet (the gateway then answers 503 until it can)."""
    from gateway.log.nats_log import NatsSettings, Unavailable, UnsafeStream, prepare_stream

    try:
        prepare_stream(NatsSettings.from_config(config))
    except UnsafeStream as exc:
        click.echo(f"callgate serve: {exc}", err=True)
        raise SystemExit(1) from None
    except Unavailable as exc:
        click.echo(f"callgate serve: warning: {exc}; answering 503 until it answers", err=True)
