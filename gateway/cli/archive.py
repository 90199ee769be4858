"""`callgate archive`: copy the NATS JetStream stream into the hash-chained SQLite log."""

from __future__ import annotations

import asyncio
import signal

import click

from gateway.cli.options import check_keys, db_option, log_config, log_option


@click.command("archive")
@log_option
@db_option
@click.option("--follow", is_flag=True, help="Keep archiving; stand by while another is active.")
@click.option(
    "--lock-ttl",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.5),
    help="Seconds after which a silent archiver's lock expires and a standby takes over "
    "(fixed when the lock bucket is first created).",
)
@click.option(
    "--purge-after",
    default=600.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds after archiving when a call's messages are purged from the stream "
    "(personal data leaves NATS; the stream's max_age bounds the rest).",
)
@click.option("--no-purge", is_flag=True, help="Never purge; rely on the stream's max_age.")
@click.option(
    "--wait",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait at start for the stream and the lock bucket to answer (a cluster "
    "that has just started elects its leaders first) before exiting with an error.",
)
def archive(
    log: str,
    db: str,
    follow: bool,
    lock_ttl: float,
    purge_after: float,
    no_purge: bool,
    wait: float,
) -> None:
    """Append the stream, in order, to the SQLite log; ack each message after its commit.

    One archiver is active at a time (a lock in the NATS KV bucket <stream>_locks);
    with --follow a second one stands by and takes over when the first dies.
    """
    from gateway.log.archiver import ArchiveError, ArchiveOptions, Archiver
    from gateway.log.nats_log import ERRORS, NatsSettings, Unavailable, UnsafeStream

    config = log_config(db, log)
    if not config.nats_servers:
        click.echo("callgate archive: pass --log nats://host:port[,...] (a stream)", err=True)
        raise SystemExit(1)
    check_keys(db)  # the archive seals what it appends: never with a missing or foreign store
    options = ArchiveOptions(
        db_path=db,
        follow=follow,
        lock_ttl=lock_ttl,
        purge_after=None if no_purge else purge_after,
        wait=wait,
    )

    async def run() -> None:
        archiver = Archiver(NatsSettings.from_config(config), options, say=_say)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, archiver.stop.set)
        counts = await archiver.run()
        _say(
            f"callgate archive: {counts.events} events, {counts.duplicates} duplicates, "
            f"{counts.rejections} rejections, {counts.unreadable} unreadable, "
            f"{counts.skipped} already archived, {counts.purged_subjects} subjects purged"
        )

    try:
        asyncio.run(run())
    except (ArchiveError, UnsafeStream, Unavailable) as exc:
        click.echo(f"callgate archive: {exc}", err=True)
        raise SystemExit(1) from None
    except ERRORS as exc:
        # The type only: a NATS error's text may carry a server URL with credentials.
        click.echo(
            f"callgate archive: the stream did not answer ({type(exc).__name__}); is every "
            "server up, with JetStream, and does the cluster have a quorum?",
            err=True,
        )
        raise SystemExit(1) from None


def _say(text: str) -> None:
    click.echo(text, err=True)


COMMANDS = [archive]
