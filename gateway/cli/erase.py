"""`callgate erase`: forget a caller (or a call, or everything past retention) for good."""

from __future__ import annotations

import contextlib
import sqlite3
import sys
from collections.abc import Iterator

import click

from gateway.cli.options import check_keys, db_option


@click.command("erase")
@click.option("--number", metavar="NUMBER", help="A phone number (any format; '-' reads stdin).")
@click.option("--call", "voice_id", metavar="VOICE_ID", help="One call's voice id.")
@click.option(
    "--older-than",
    type=click.FloatRange(min=0),
    metavar="DAYS",
    help="Every call whose key is older than DAYS days.",
)
@click.option(
    "--retention",
    is_flag=True,
    help="Like --older-than $CALLGATE_RETENTION_DAYS (run it daily, e.g. from cron).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to wait for the log's writers (if the log stays busy, nothing is "
    "erased); then for readers to let each WAL be emptied, 10 s at most.",
)
@db_option
def erase(
    number: str | None,
    voice_id: str | None,
    older_than: float | None,
    retention: bool,
    yes: bool,
    wait: float,
    db: str,
) -> None:
    """Destroy the data keys of every call involving NUMBER (or of one call): their
    personal fields become unreadable everywhere, the log keeps every row and verifies."""
    from analytics import projector
    from gateway.config import Config
    from gateway.db import connect
    from gateway.log import erasure, keystore, sealing

    config = Config.from_env(db_path=db)
    if retention:
        if config.retention_days is None:
            raise click.ClickException("--retention needs CALLGATE_RETENTION_DAYS to be set")
        older_than = config.retention_days
    chosen = [
        name
        for name, value in (
            ("--number", number),
            ("--call", voice_id),
            ("--older-than/--retention", older_than),
        )
        if value is not None
    ]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --number, --call, --older-than, --retention")
    if number == "-":
        number = sys.stdin.readline().strip()
    check_keys(db)
    conn = connect(db)
    projector.ensure_tables(conn)
    store = keystore.for_database(conn, config)
    if number is not None:
        if sealing.digits_of(number) is None:
            raise click.ClickException("--number must contain digits")
        plan, what, reason = (
            erasure.plan_number(conn, store, config, number),
            "this number",
            "number",
        )
    elif voice_id is not None:
        plan, what, reason = erasure.plan_call(conn, store, config, voice_id), "this call", "call"
    else:
        assert older_than is not None
        plan = erasure.plan_older_than(conn, store, older_than)
        what, reason = f"calls older than {older_than:g} days", "retention"
    if not plan.units:
        if reason == "retention":
            click.echo(f"nothing to erase: no {what}")
            return
        click.echo(
            f"nothing to erase: no call or stored request involves {what} "
            "(or it was erased already)",
            err=True,
        )
        raise SystemExit(1)
    summary = (
        f"{len(plan.calls)} call(s), {len(plan.broadcasts)} broadcast(s) and "
        f"{plan.requests} refused request(s)"
    )
    if not yes:
        click.confirm(f"Destroy the keys of {summary}? This cannot be undone", abort=True)
    try:
        seq = erasure.destroy(conn, store, plan, reason, wait)
    except erasure.ErasureFailed as exc:
        raise click.ClickException(str(exc)) from None
    done = f"erased {summary} (audit event seq {seq}): the values are unreadable"
    scrub_wait = min(wait, erasure.SCRUB_WAIT_SECONDS)
    # The key store first: the keys' old bytes must go even if a later step fails, and a
    # second run would find nothing to erase.
    with _after_erasure(done, f"the destroyed keys' old bytes may stay in {store.path} "
                        "and its WAL until it is VACUUMed"):
        keys_clean = erasure.scrub(store.conn, scrub_wait)
    with _after_erasure(done, "their projections keep the values until `callgate project` "
                        "re-folds them from the audit event"):
        projector.reproject(conn, plan.calls, plan.broadcasts)
    with _after_erasure(done, "their old bytes may stay in the database's free pages and "
                        "WAL until it is VACUUMed"):
        clean = erasure.scrub(conn, scrub_wait)
    conn.close()
    click.echo(f"erased {summary}; audit event seq {seq}")
    if not keys_clean:
        click.echo(
            "warning: readers kept the key store's WAL from being truncated: copies of the "
            f"destroyed keys stay in {store.path}-wal until every process using the key "
            "store (gateway, projector, forwarder) has stopped, when SQLite removes it",
            err=True,
        )
    if not clean:
        click.echo(
            "warning: readers kept the WAL from being truncated: erased values stay in "
            f"{db}-wal until it is (stop Datasette and the projector, then run "
            "`callgate verify`, which checkpoints)",
            err=True,
        )


@contextlib.contextmanager
def _after_erasure(done: str, consequence: str) -> Iterator[None]:
    """A step after the keys were destroyed: a storage error is a clear message saying
    what did happen and what it leaves, never a traceback."""
    try:
        yield
    except sqlite3.Error as exc:
        raise click.ClickException(
            f"{done}, but a later step failed ({type(exc).__name__}: {exc}): {consequence}"
        ) from None
