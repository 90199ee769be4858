"""`callgate subscribe/subscriptions/unsubscribe/rotate-secret/forward/redeliver`.

Thin click wrappers over gateway.forward.subscriptions and gateway.forward.delivery; they
are registered on the `callgate` group in gateway/cli.py.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import timedelta

import click

from gateway.cli.options import check_keys, db_option
from gateway.config import Config
from gateway.forward import delivery, outbox
from gateway.forward.redeliver import redeliver
from gateway.forward.subscriptions import (
    SecretStore,
    SubscriptionError,
    create_subscription,
    list_subscriptions,
    rotate_secret,
    secrets_path,
    unsubscribe,
)
from gateway.signals import stop_on_signals


def _store(db: str) -> SecretStore:
    return SecretStore(secrets_path(db, Config.from_env(db_path=db).secrets_db))


@click.command("subscribe")
@click.argument("url")
@click.option(
    "--events",
    "-e",
    "patterns",
    multiple=True,
    metavar="PATTERN",
    help="Event types wanted, e.g. 'call.*', 'play.digitcollected', '*' (repeat or comma-separate;"
    " default every event).",
)
@click.option("--secret", help="Signing secret whsec_… (default: generate one, printed once).")
@click.option("--from-start", is_flag=True, help="Also deliver every event already in the log.")
@db_option
def subscribe_command(
    url: str, patterns: tuple[str, ...], secret: str | None, from_start: bool, db: str
) -> None:
    """Send normalised, signed events to URL (CloudEvents + Standard Webhooks)."""
    conn = outbox.open_db(db)
    store = _store(db)
    try:
        sub, signing = create_subscription(conn, store, url, patterns, secret, from_start)
    except SubscriptionError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        store.close()
        conn.close()
    click.echo(f"subscribed {sub.id} -> {sub.url} events={','.join(sub.patterns)}")
    if not secret:
        click.echo(f"secret: {signing}")
        click.echo("(shown once: store it now; verify deliveries with it)", err=True)


@click.command("subscriptions")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@db_option
def subscriptions_command(as_json: bool, db: str) -> None:
    """List subscriptions with their health: pending, dead, last success and failure."""
    conn = outbox.open_db(db)
    try:
        rows = list_subscriptions(conn)
    finally:
        conn.close()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no subscriptions")
        return
    for row in rows:
        state = (
            f"DISABLED {row['disabled_at']} ({row['disabled_reason']})"
            if row["disabled_at"]
            else "active"
        )
        click.echo(f"{row['id']}  {row['url']}  events={','.join(json.loads(row['events']))}")
        click.echo(
            f"    {state}; pending={row['pending']} delivered={row['delivered']} "
            f"dead={row['dead']} cancelled={row['cancelled']} cursor={row['cursor_seq']}"
        )
        click.echo(
            f"    last success={row['last_success_at'] or '-'}  "
            f"last failure={row['last_failure_at'] or '-'} {row['last_failure'] or ''}".rstrip()
        )


@click.command("unsubscribe")
@click.argument("subscription_id")
@db_option
def unsubscribe_command(subscription_id: str, db: str) -> None:
    """Stop sending to a subscription; its delivery history is kept."""
    conn = outbox.open_db(db)
    store = _store(db)
    try:
        cancelled = unsubscribe(conn, store, subscription_id)
    except SubscriptionError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        store.close()
        conn.close()
    click.echo(f"unsubscribed {subscription_id} ({cancelled} pending deliveries cancelled)")


@click.command("rotate-secret")
@click.argument("subscription_id")
@click.option("--secret", help="The new secret whsec_… (default: generate one, printed once).")
@click.option(
    "--overlap-hours",
    type=click.FloatRange(min=0),
    default=24.0,
    show_default=True,
    help="How long the old secret keeps signing alongside the new one.",
)
@db_option
def rotate_secret_command(
    subscription_id: str, secret: str | None, overlap_hours: float, db: str
) -> None:
    """Give a subscription a new signing secret; both sign during the overlap."""
    conn = outbox.open_db(db)
    store = _store(db)
    try:
        signing, expires = rotate_secret(
            conn, store, subscription_id, secret, timedelta(hours=overlap_hours)
        )
    except SubscriptionError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        store.close()
        conn.close()
    click.echo(f"rotated {subscription_id}; previous secrets stop signing at {expires}")
    if not secret:
        click.echo(f"secret: {signing}")


def _schedule(ctx: click.Context, param: click.Parameter, value: str | None) -> object:
    if value is None:
        return None
    try:
        return delivery.parse_schedule(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("forward")
@click.option("--follow", is_flag=True, help="Keep running, forwarding new events as they arrive.")
@click.option("--drain", is_flag=True, help="Without --follow: also wait out scheduled retries.")
@click.option(
    "--retry-schedule",
    envvar="CALLGATE_RETRY_SCHEDULE",
    callback=_schedule,
    help="Delays before each try, e.g. '0,5,5m,30m,2h' (default: Standard Webhooks' "
    "0,5s,5m,30m,2h,5h,10h,14h,20h,24h).",
)
@click.option("--workers", type=click.IntRange(min=1), help="Concurrent deliveries (default 8).")
@click.option("--timeout", type=click.FloatRange(min=0.1), help="Seconds per request (10).")
@click.option("--poll", type=click.FloatRange(min=0.01), help="Seconds between log polls (0.5).")
@db_option
def forward_command(
    follow: bool,
    drain: bool,
    retry_schedule: tuple[float, ...] | None,
    workers: int | None,
    timeout: float | None,
    poll: float | None,
    db: str,
) -> None:
    """Deliver logged events to the subscriptions (signed, retried, in per-call order)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    check_keys(db)
    options = delivery.ForwardOptions.from_config(
        Config.from_env(db_path=db),
        schedule=retry_schedule, workers=workers, timeout=timeout, poll_interval=poll
    )
    stop = threading.Event()
    stop_on_signals(stop)  # in-flight tries finish first
    with delivery.Forwarder(db, options) as fwd:
        stats = fwd.run(stop=stop, follow=follow, drain=drain)
        pending = fwd.conn.execute(
            "SELECT count(*) FROM deliveries WHERE status = 'pending'"
        ).fetchone()[0]
    click.echo(
        f"enqueued={stats.enqueued} attempts={stats.attempts} delivered={stats.delivered} "
        f"retrying={stats.retrying} dead={stats.dead} pending={pending}"
        + (f" disabled={','.join(stats.disabled)}" if stats.disabled else "")
    )


@click.command("redeliver")
@click.option("--event", "event_ids", multiple=True, metavar="EVENT_ID", help="An event id (ev_…).")
@click.option("--call", "voice_ids", multiple=True, metavar="VOICE_ID", help="A call's voice id.")
@click.option("--subscription", "subscription_id", metavar="ID", help="Only this subscription.")
@click.option("--since", help="Events at or after this time (ISO 8601, UTC if no zone).")
@click.option("--until", help="Events before this time.")
@click.option("--dead", is_flag=True, help="Dead-lettered deliveries.")
@click.option("--dry-run", is_flag=True, help="List what would be sent; change nothing.")
@db_option
def redeliver_command(
    event_ids: tuple[str, ...],
    voice_ids: tuple[str, ...],
    subscription_id: str | None,
    since: str | None,
    until: str | None,
    dead: bool,
    dry_run: bool,
    db: str,
) -> None:
    """Queue events again (same webhook-id); `callgate forward` then sends them."""
    conn = outbox.open_db(db)
    try:
        plan = redeliver(
            conn,
            event_ids=event_ids,
            voice_ids=voice_ids,
            subscription_id=subscription_id,
            since=since,
            until=until,
            dead=dead,
            dry_run=dry_run,
        )
    except (SubscriptionError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        conn.close()
    for item in plan:
        click.echo(
            f"{item.action:<22} {item.subscription_id} seq={item.seq} {item.event_id} "
            f"{item.type} {item.voice_id or '-'} {item.occurred_at} "
            f"(was {item.previous_status or 'not queued'})"
        )
    queued = sum(1 for item in plan if item.action in {"requeue", "create"})
    verb = "would queue" if dry_run else "queued"
    click.echo(f"{verb} {queued} deliveries ({len(plan) - queued} skipped)")


COMMANDS = (
    subscribe_command,
    subscriptions_command,
    unsubscribe_command,
    rotate_secret_command,
    forward_command,
    redeliver_command,
)
