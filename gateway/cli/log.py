"""`callgate verify`, `reprocess` and `ingest`: operations on the event log."""

from __future__ import annotations

import click

from gateway.cli.options import check_keys, db_option
from gateway.db import connect, log_head


@click.command("verify")
@db_option
@click.option("--head", is_flag=True, help="Print the head seq and hash, to anchor elsewhere.")
def verify(db: str, head: bool) -> None:
    """Walk the event log's hash chain; exit 1 naming the first broken seq."""
    from gateway.log import eventlog

    conn = _open(db)
    if head:
        seq, digest = log_head(conn)
        click.echo(f"{seq} {digest}")
        return
    result = eventlog.verify(conn)
    if result.ok:
        click.echo(f"ok: {result.checked} events, head seq {result.head_seq} {result.head_hash}")
        return
    click.echo(
        f"BROKEN at seq {result.first_bad_seq}: {result.reason} "
        f"({result.checked} events verified before it)",
        err=True,
    )
    raise SystemExit(1)


@click.command("reprocess")
@db_option
def reprocess(db: str) -> None:
    """Re-run every unresolved rejection through the current config (e.g. a new app id)."""
    from gateway.config import Config
    from gateway.log.intake import reprocess as run

    check_keys(db)
    summary = run(_open(db), Config.from_env(db_path=db))
    click.echo(
        f"tried {summary.tried}: {summary.events} new events, {summary.duplicates} duplicates, "
        f"{summary.still_rejected} still rejected; {summary.never_retried} refused before "
        "interpretation (wrong token or method) never retried"
    )


@click.command("ingest")
@db_option
@click.argument("file", type=click.File("r"))
def ingest(db: str, file) -> None:  # type: ignore[no-untyped-def]
    """Import captured requests: JSONL of {headers, body}, through the same path as HTTP."""
    import json

    from gateway.config import Config
    from gateway.log.intake import ingest_request
    from gateway.wire.ingest import Headers

    config = Config.from_env(db_path=db)
    check_keys(db)
    conn = _open(db)
    counts = {"accepted": 0, "duplicate": 0, "rejected": 0, "unreadable": 0}
    for number, line in enumerate(file, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            headers = Headers.of(record.get("headers") or {})
            body = record.get("body", "")
            body_bytes = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        except (ValueError, AttributeError, TypeError) as exc:
            counts["unreadable"] += 1
            click.echo(f"line {number}: not a {{headers, body}} JSON object ({exc})", err=True)
            continue
        outcome = ingest_request(conn, config, headers, body_bytes, path="cli:ingest")
        key = "rejected" if outcome.error else ("duplicate" if outcome.duplicate else "accepted")
        counts[key] += 1
        if outcome.error:
            click.echo(f"line {number}: {outcome.error}: {outcome.body['detail']}", err=True)
    click.echo(" ".join(f"{k}={v}" for k, v in counts.items()))
    if counts["unreadable"]:
        raise SystemExit(1)


def _open(db: str):  # type: ignore[no-untyped-def]
    from gateway.log import eventlog

    conn = connect(db)
    eventlog.ensure_schema(conn)
    return conn


COMMANDS = (verify, reprocess, ingest)
