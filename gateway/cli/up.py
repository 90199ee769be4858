"""`callgate up`: the main job — gateway, projector, forwarder and Datasette together."""

from __future__ import annotations

from pathlib import Path

import click

from gateway.cli.log import _open
from gateway.cli.options import check_keys, db_option
from gateway.cli.supervisor import Part, Supervisor
from gateway.db import log_head
from gateway.log.nats_local import LocalCluster
from gateway.simulate.sender import DEMO_CALLS


@click.command("up")
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address for all servers.")
@click.option("--port", default=8000, show_default=True, type=int, help="Gateway port.")
@click.option("--datasette-port", default=8001, show_default=True, type=int)
@click.option("--workers", default=2, show_default=True, type=int, help="Gateway workers.")
@click.option(
    "--demo", is_flag=True,
    help="Play simulated calls of the last 14 days (demo app id) into the gateway.",
)
@click.option(
    "--demo-if-empty", is_flag=True, help="Like --demo, but only when the log has no events."
)
@click.option(
    "--demo-calls", default=DEMO_CALLS, show_default=True, type=click.IntRange(min=1),
    help="How many demo calls --demo plays.",
)
@click.option("--no-forward", is_flag=True, help="Do not start the forwarder.")
@click.option(
    "--replicate",
    "replica_url",
    metavar="URL",
    help="Also stream the log to URL with Litestream (see `callgate replicate`).",
)
@click.option(
    "--nats",
    is_flag=True,
    help="High-availability layout on this machine: a 3-node NATS cluster (loopback, "
    "stores under <db dir>/nats), two stateless gateways on --port and --port+1, an active "
    "and a standby archiver into --db.",
)
def up(
    db: str,
    host: str,
    port: int,
    datasette_port: int,
    workers: int,
    demo: bool,
    demo_if_empty: bool,
    demo_calls: int,
    no_forward: bool,
    replica_url: str | None,
    nats: bool,
) -> None:
    """The main job: gateway + projector + forwarder + Datasette; Ctrl-C stops all."""
    import os
    import threading

    from gateway.cli.supervisor import callgate_executable

    check_keys(db)
    conn = _open(db)
    empty = log_head(conn)[0] == 0
    conn.close()
    env = dict(os.environ)
    after_demo = dict(env)  # the demo app id is public: valid only while the demo plays
    play_demo = demo or (demo_if_empty and empty)
    if play_demo:
        from gateway.config import Config
        from gateway.simulate.generator import DEMO_APP_ID

        ids = Config.from_env(env=env).app_ids
        env["ENABLEX_APP_ID"] = ",".join([*ids, DEMO_APP_ID])
    exe = callgate_executable()
    parts = []
    if replica_url:
        from gateway.config import Config

        if Config.from_env(env=env).checkpoint == "truncate":
            click.echo("callgate up: --replicate: gateway checkpoints switched to passive")
            env["CALLGATE_CHECKPOINT"] = "passive"  # TRUNCATE would stall beside Litestream
        parts.append(Part("replicate", [*exe, "replicate", replica_url, "--db", db]))
    serve = [*exe, "serve", "--db", db, "--host", host, "--workers", str(workers)]
    if nats:
        parts += _nats_parts(db, serve, port, exe)
    else:
        parts.append(Part("gateway", [*serve, "--port", str(port)]))
    for name, argv in (
        ("project", ["project", "--follow"]),
        ("forward", ["forward", "--follow"]),
        ("datasette", ["datasette", "--host", host, "--port", str(datasette_port)]),
    ):
        if not (name == "forward" and no_forward):
            parts.append(Part(name, [*exe, *argv, "--db", db]))
    supervisor = Supervisor(parts, env)
    supervisor.start()
    gateways = f"http://{host}:{port}/webhooks/enablex"
    if nats:
        gateways += f" and http://{host}:{port + 1}/webhooks/enablex (NATS)"
    click.echo(
        f"callgate up: gateway {gateways}  "
        f"datasette http://{host}:{datasette_port}/  (Ctrl-C stops all)"
    )
    if play_demo:
        threading.Thread(
            target=_play_demo, args=(f"http://{host}:{port}", supervisor, demo_calls, after_demo),
            daemon=True,
        ).start()
    raise SystemExit(supervisor.wait())


def _nats_parts(db: str, serve: list[str], port: int, exe: list[str]) -> list[Part]:
    """Three NATS servers, two gateways publishing to them, two archivers (one stands by)."""
    cluster = LocalCluster(Path(db).resolve().parent / "nats")
    parts = [Part(node.name, cluster.argv(i)) for i, node in enumerate(cluster.nodes)]
    for number, gateway_port in enumerate((port, port + 1), start=1):
        parts.append(
            Part(f"gateway-{number}", [*serve, "--port", str(gateway_port), "--log", cluster.url])
        )
    for name in ("archive", "archive-standby"):
        parts.append(Part(name, [*exe, "archive", "--follow", "--log", cluster.url, "--db", db]))
    return parts


def _play_demo(
    base_url: str, supervisor: Supervisor, calls: int, after_demo: dict[str, str]
) -> None:
    """Wait for the gateway, send the labelled demo traffic into it, then restart it
    without the demo app id: that id is in the source code, so anyone could encrypt
    events with it for as long as the gateway accepts it."""
    from gateway.config import Config
    from gateway.simulate.sender import run_demo

    if not _wait_healthy(base_url, supervisor):
        return
    click.echo(f"callgate up: playing {calls} demo calls of the last 14 days (app id label: "
               "demo) ...")
    token = Config.from_env().webhook_token
    try:
        report = run_demo(base_url + "/webhooks/enablex" + (f"/{token}" if token else ""), calls)
        click.echo(f"callgate up: demo traffic sent ({report.acknowledged} of {report.planned} "
                   "webhooks accepted)")
    finally:
        gateways = [p.name for p in supervisor.parts if p.name.startswith("gateway")]
        if all(supervisor.restart(name, after_demo) for name in gateways):
            _wait_healthy(base_url, supervisor)
            click.echo("callgate up: demo app id dropped (the gateway accepts ENABLEX_APP_ID only)")


def _wait_healthy(base_url: str, supervisor: Supervisor) -> bool:
    """Until the gateway answers /healthz (False if everything stops first)."""
    import time

    import httpx

    for _ in range(150):
        if supervisor.stopping.is_set():
            return False
        try:
            if httpx.get(base_url + "/healthz", timeout=1).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False
