"""`callgate simulate`: the command line over gateway.simulate.sender."""

from __future__ import annotations

import secrets

import click

from gateway.config import Config
from gateway.simulate.generator import DEMO_APP_ID
from gateway.simulate.sender import (
    ALGORITHMS,
    ENCODINGS,
    FORMATS,
    SPELLINGS,
    WireOptions,
    arrival_gap,
    backdated_simulation,
    send_simulation,
    webhook_url,
    write_truth,
)


def _default_app_id() -> str:
    ids = Config.from_env().app_ids
    return ids[0] if ids else DEMO_APP_ID


def _probability(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise click.BadParameter("must be between 0 and 1")
    return value


@click.command("simulate")
@click.option(
    "--url",
    required=True,
    help="Gateway webhook URL (a bare http://host:port gets /webhooks/enablex).",
)
@click.option(
    "--calls",
    default=100,
    show_default=True,
    type=click.IntRange(min=0),
    help="Calls to simulate (broadcast legs count as calls).",
)
@click.option(
    "--concurrency",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Parallel keep-alive connections.",
)
@click.option(
    "--rate",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="New calls per wall-clock second; 0 = no pacing, send as fast as possible.",
)
@click.option(
    "--time-scale",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Event-time seconds per wall-clock second (timestamps stay realistic).",
)
@click.option(
    "--app-id",
    default=None,
    help="App id to encrypt with [default: first of $ENABLEX_APP_ID, else the demo id].",
)
@click.option(
    "--algorithm",
    default="aes-256-cbc",
    show_default=True,
    type=click.Choice(ALGORITHMS, case_sensitive=False),
)
@click.option(
    "--format",
    "fmt",
    default="hex",
    show_default=True,
    type=click.Choice(FORMATS),
    help="x-format: how the ciphertext is written.",
)
@click.option(
    "--encoding",
    default="utf8",
    show_default=True,
    type=click.Choice(ENCODINGS),
    help="x-encoding: how the plaintext is written before encryption.",
)
@click.option(
    "--header-spelling",
    default="algoritm",
    show_default=True,
    type=click.Choice(SPELLINGS),
    help="x-algoritm (EnableX samples), x-algorithm (docs) or both.",
)
@click.option("--plain", is_flag=True, help="Send plain JSON bodies without encryption headers.")
@click.option(
    "--duplicates",
    default=0.0,
    show_default=True,
    callback=_probability,
    help="Chance that an event is redelivered (identical body).",
)
@click.option(
    "--reorder",
    default=0.0,
    show_default=True,
    callback=_probability,
    help="Chance that an event arrives after the call's next event.",
)
@click.option("--seed", default=None, type=int, help="Random seed [default: random, printed].")
@click.option(
    "--truth",
    type=click.Path(dir_okay=False, writable=True),
    help="Write the expected call state per call to this JSONL file.",
)
@click.option(
    "--progress/--no-progress", default=True, show_default=True, help="Show a progress bar."
)
@click.pass_context
def simulate_command(
    ctx,
    url,
    calls,
    concurrency,
    rate,
    time_scale,
    app_id,
    algorithm,
    fmt,
    encoding,
    header_spelling,
    plain,
    duplicates,
    reorder,
    seed,
    truth,
    progress,
):
    """Send realistic simulated EnableX call traffic (encrypted like EnableX) to a gateway.

    Inbound IVR with DTMF, menu timeouts and retries; outbound TTS; bridges with failing
    legs; recordings; speech recognition; room joins; hold/transfer; busy and no-answer
    calls; broadcasts with summaries. Exits 1 if any request was refused or failed.
    """
    seed = secrets.randbits(32) if seed is None else seed
    sim = backdated_simulation(
        calls,
        seed=seed,
        arrival_gap_s=arrival_gap(rate, time_scale),
        duplicates=duplicates,
        reorder=reorder,
    )
    click.echo(
        f"seed {seed}: {len(sim.calls)} calls ({len(sim.broadcasts)} broadcasts), "
        f"{sim.event_count} events + {sim.redeliveries} redeliveries "
        f"over {sim.span_ms / 1000:.0f}s of event time",
        err=True,
    )
    if truth:
        write_truth(sim, truth)
        click.echo(f"truth written to {truth}", err=True)
    wire = WireOptions(
        app_id or _default_app_id(), algorithm.lower(), fmt, encoding, header_spelling, plain
    )
    pace = time_scale if rate > 0 else None
    target = webhook_url(url)
    if progress:
        with click.progressbar(
            length=len(sim.deliveries), label="sending", file=click.get_text_stream("stderr")
        ) as bar:
            report = send_simulation(
                sim,
                target,
                wire,
                concurrency=concurrency,
                time_scale=pace,
                on_done=lambda: bar.update(1),
            )
    else:
        report = send_simulation(sim, target, wire, concurrency=concurrency, time_scale=pace)
    click.echo(report.summary())
    if not report.ok:
        ctx.exit(1)
