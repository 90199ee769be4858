"""`callgate project` and `callgate rebuild`: thin click wrappers over analytics.projector."""

from __future__ import annotations

import time

import click

from gateway.cli.options import check_keys, db_option
from gateway.db import connect


@click.command("project")
@db_option
@click.option("--follow", is_flag=True, help="Keep polling the log; stop on SIGTERM/Ctrl-C.")
@click.option(
    "--interval", default=0.2, show_default=True, type=float, help="Poll interval (s)."
)
@click.option(
    "--batch", default=2000, show_default=True, type=int, help="Events per transaction."
)
def project(db: str, follow: bool, interval: float, batch: int) -> None:
    """Bring the projections (calls, plays, ...) up to date with the event log."""
    from analytics import projector

    check_keys(db)
    if follow:
        click.echo(f"projecting {db} (following; Ctrl-C stops)", err=True)
        total = projector.follow(db, interval=interval, batch=batch)
        click.echo(f"stopped after projecting {total} events", err=True)
        return
    conn = connect(db, synchronous="NORMAL")
    try:
        started = time.perf_counter()
        total = projector.project_all(conn, batch)
        done, head = projector.lag(conn)
    finally:
        conn.close()
    click.echo(
        f"projected {total} events in {time.perf_counter() - started:.2f}s; "
        f"checkpoint {done} of {head}"
    )


@click.command("rebuild")
@db_option
def rebuild(db: str) -> None:
    """Rebuild every projection from the whole log; swapped in atomically (one transaction)."""
    from analytics import projector

    check_keys(db)
    conn = connect(db, synchronous="NORMAL")
    try:
        started = time.perf_counter()
        stderr = click.get_text_stream("stderr")
        with click.progressbar(length=1, label="rebuilding", file=stderr) as bar:
            shown = [0]

            def progress(done: int, total: int) -> None:
                bar.length = max(total, 1)
                bar.update(done - shown[0])
                shown[0] = done

            n = projector.rebuild(conn, progress=progress)
        elapsed = time.perf_counter() - started
    finally:
        conn.close()
    rate = n / elapsed if elapsed > 0 else 0.0
    click.echo(f"rebuilt projections from {n} events in {elapsed:.2f}s ({rate:,.0f} events/s)")


COMMANDS = (project, rebuild)
