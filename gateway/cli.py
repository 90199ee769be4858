"""The `callgate` command line. Each command is a thin wrapper over a module function."""

from __future__ import annotations

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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="callgate")
def main() -> None:
    """callgate: receiver, event log, call history and forwarder for EnableX Voice webhooks."""


@main.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port to bind.")
@click.option("--workers", default=2, show_default=True, type=int, help="Worker processes.")
@click.option(
    "--threads",
    default=12,
    show_default=True,
    type=int,
    help="Threads per worker (each waits for its group commit; more of them make bigger batches).",
)
@click.option("--access-log/--no-access-log", default=False, help="gunicorn access log.")
@click.option(
    "--idle-timeout",
    default=5,
    show_default=True,
    type=click.IntRange(min=1),
    help="Seconds a new or kept-alive connection may stay silent before it is closed.",
)
@click.option(
    "--read-timeout",
    default=3.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds a whole request (headers and body) may take to arrive.",
)
@click.option(
    "--cpu-affinity/--no-cpu-affinity",
    default=True,
    show_default=True,
    help="Pin each worker process to its own CPU (turn off when the host's CPUs are "
    "shared with other busy services).",
)
def serve(
    db: str,
    host: str,
    port: int,
    workers: int,
    threads: int,
    access_log: bool,
    idle_timeout: int,
    read_timeout: float,
    cpu_affinity: bool,
) -> None:
    """Serve the webhook gateway under gunicorn (POST /webhooks/enablex)."""
    from gateway.server import ServeOptions
    from gateway.server import serve as run_server

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
    )


@main.command()
@db_option
@click.option("--head", is_flag=True, help="Print the head seq and hash, to anchor elsewhere.")
def verify(db: str, head: bool) -> None:
    """Walk the event log's hash chain; exit 1 naming the first broken seq."""
    from gateway import eventlog

    conn = _open(db)
    if head:
        seq, digest = eventlog.head(conn)
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


@main.command()
@db_option
def reprocess(db: str) -> None:
    """Re-run every unresolved rejection through the current config (e.g. a new app id)."""
    from gateway.config import Config
    from gateway.ingest import reprocess as run

    summary = run(_open(db), Config.from_env(db_path=db))
    click.echo(
        f"tried {summary.tried}: {summary.events} new events, {summary.duplicates} duplicates, "
        f"{summary.still_rejected} still rejected"
    )


@main.command()
@db_option
@click.argument("file", type=click.File("r"))
def ingest(db: str, file) -> None:  # type: ignore[no-untyped-def]
    """Import captured requests: JSONL of {headers, body}, through the same path as HTTP."""
    import json

    from gateway.config import Config
    from gateway.ingest import Headers, ingest_request

    config = Config.from_env(db_path=db)
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


@main.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for all servers.")
@click.option("--port", default=8000, show_default=True, type=int, help="Gateway port.")
@click.option("--datasette-port", default=8001, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="Gateway workers.")
@click.option("--demo", is_flag=True, help="Play a few hundred simulated calls (demo app id).")
@click.option(
    "--demo-if-empty", is_flag=True, help="Like --demo, but only when the log has no events."
)
@click.option("--no-forward", is_flag=True, help="Do not start the forwarder.")
def up(
    db: str,
    host: str,
    port: int,
    datasette_port: int,
    workers: int,
    demo: bool,
    demo_if_empty: bool,
    no_forward: bool,
) -> None:
    """The main job: gateway + projector + forwarder + Datasette; Ctrl-C stops all."""
    import os
    import threading

    from gateway import eventlog
    from gateway.supervisor import Part, Supervisor, callgate_executable

    conn = _open(db)
    empty = eventlog.head(conn)[0] == 0
    conn.close()
    env = dict(os.environ)
    play_demo = demo or (demo_if_empty and empty)
    if play_demo:
        from gateway.simulate import DEMO_APP_ID

        ids = [i for i in env.get("ENABLEX_APP_ID", "").split(",") if i]
        env["ENABLEX_APP_ID"] = ",".join([*ids, DEMO_APP_ID])
    exe = callgate_executable()
    parts = [
        Part(
            "gateway",
            [
                *exe,
                "serve",
                "--db",
                db,
                "--host",
                host,
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
        ),
    ]
    for name, argv in (
        ("project", ["project", "--follow"]),
        ("forward", ["forward", "--follow"]),
        ("datasette", ["datasette", "--host", host, "--port", str(datasette_port)]),
    ):
        if name in main.commands and not (name == "forward" and no_forward):
            parts.append(Part(name, [*exe, *argv, "--db", db]))
    supervisor = Supervisor(parts, env)
    supervisor.start()
    click.echo(
        f"callgate up: gateway http://{host}:{port}/webhooks/enablex  "
        f"datasette http://{host}:{datasette_port}/  (Ctrl-C stops all)"
    )
    if play_demo:
        threading.Thread(
            target=_play_demo, args=(f"http://{host}:{port}", supervisor), daemon=True
        ).start()
    raise SystemExit(supervisor.wait())


def _play_demo(base_url: str, supervisor) -> None:  # type: ignore[no-untyped-def]
    """Wait for the gateway, then send the labelled demo traffic into it."""
    import os
    import time

    import httpx

    from gateway.simulate import run_demo

    for _ in range(100):
        if supervisor.stopping.is_set():
            return
        try:
            if httpx.get(base_url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    click.echo("callgate up: playing demo calls (app id label: demo) ...")
    token = os.environ.get("CALLGATE_WEBHOOK_TOKEN")
    run_demo(base_url + "/webhooks/enablex" + (f"/{token}" if token else ""))
    click.echo("callgate up: demo traffic sent")


def _open(db: str):  # type: ignore[no-untyped-def]
    from gateway import eventlog

    conn = eventlog.connect(db)
    eventlog.ensure_schema(conn)
    return conn


# --- registered commands ---
from gateway.simulate_commands import simulate_command  # noqa: E402

main.add_command(simulate_command)
from gateway.forward_commands import COMMANDS as _FORWARD_COMMANDS  # noqa: E402

for _command in _FORWARD_COMMANDS:
    main.add_command(_command)
from analytics.datasette_commands import datasette as _datasette_command  # noqa: E402

main.add_command(_datasette_command)
from analytics.commands import COMMANDS as _ANALYTICS_COMMANDS  # noqa: E402

for _command in _ANALYTICS_COMMANDS:
    main.add_command(_command)
