"""Running the gateway under gunicorn, configured from code rather than a file.

The settings are the gateway's defence against slow or abusive senders: a
bounded number of worker threads, short keep-alive, header limits, a worker
timeout, and (gateway/web/worker.py) first-byte and whole-request read deadlines,
so slow or silent clients cannot stall EnableX's deliveries.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

WEBHOOK_PREFIX = "/webhooks/enablex/"


def redact_path(path: str) -> str:
    """`/webhooks/enablex/<token>...` → `/webhooks/enablex/<redacted>`: the token is a secret."""
    if path.startswith(WEBHOOK_PREFIX) and len(path) > len(WEBHOOK_PREFIX):
        return WEBHOOK_PREFIX + "<redacted>"
    return path


class RedactingLogger(Logger):  # type: ignore[misc]
    """gunicorn's logger with the secret path segment removed from access-log atoms."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms = dict(super().atoms(resp, req, environ, request_time))
        path = environ.get("PATH_INFO", "")
        safe = redact_path(path)
        if safe != path:
            for key in ("r", "U"):
                if isinstance(atoms.get(key), str):
                    atoms[key] = atoms[key].replace(path, safe)
            atoms["q"] = ""
        return atoms


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    threads: int = 12
    # gthread plus deadlines for slow senders (gateway/web/worker.py); stock gthread lets
    # tricklers pin every thread and idle connections wedge the worker (gunicorn#2917).
    worker_class: str = "gateway.web.worker.CallgateThreadWorker"
    timeout: int = 30
    keepalive: int = 5
    # A new connection must send its first byte within this (EnableX sends at once).
    # Equal to keepalive so both kinds expire in order from the one FIFO sweep.
    first_byte_timeout: float = 5.0
    # A whole request (headers and body) must arrive within this of its first byte.
    # Well under EnableX's ~5 s patience: a queue of tricklers costs others at most this.
    read_timeout: float = 3.0
    # Connections per worker. Idle sockets are cheap (a poller entry each), and the
    # deadlines above reap abusers; a low cap only lets idle senders lock genuine ones out.
    worker_connections: int = 1000
    max_requests: int = 0
    access_log: bool = False
    # Pin each worker process to its own CPU (round robin when there are more workers).
    cpu_affinity: bool = True


def gunicorn_settings(options: ServeOptions) -> dict[str, Any]:
    """The gunicorn configuration `callgate serve` and the benchmarks share."""
    return {
        "bind": f"{options.host}:{options.port}",
        "workers": options.workers,
        "threads": options.threads,
        "worker_class": options.worker_class,
        # A worker silent this long is killed and replaced (stuck request guard).
        "timeout": options.timeout,
        "graceful_timeout": 10,
        "keepalive": options.keepalive,
        # Open-connection cap per worker: further connections wait in the backlog.
        "worker_connections": options.worker_connections,
        "backlog": 512,
        "limit_request_line": 8190,
        "limit_request_fields": 64,
        "limit_request_field_size": 8190,
        "max_requests": options.max_requests,
        "accesslog": "-" if options.access_log else None,
        "errorlog": "-",
        "loglevel": "info",
        "proc_name": "callgate-gateway",
        "logger_class": RedactingLogger,
        "child_exit": _child_exit,
        "post_worker_init": _deadline_setter(options),
        "pre_fork": _choose_cpu if options.cpu_affinity else None,
        "post_fork": _pin_to_cpu if options.cpu_affinity else None,
    }


def _choose_cpu(server: Any, worker: Any) -> None:
    """In the master, before fork: the allowed CPU with the fewest live workers.

    Why pin: on virtual machines a switch between processes costs far more than
    one between threads of a process (measured on the development VM: a request
    that blocks once for its group commit costs ~100 µs more CPU when another
    process runs meanwhile). A worker alone on its CPU mostly switches between
    its own threads, and its caches stay warm. A restarted worker takes the CPU
    its predecessor left free.
    """
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) < 2:
        worker.cpu = None
        return
    taken = [getattr(other, "cpu", None) for other in server.WORKERS.values()]
    worker.cpu = min(cpus, key=lambda cpu: (taken.count(cpu), cpu))


def _pin_to_cpu(server: Any, worker: Any) -> None:
    """In the new worker, before its threads exist (they inherit the affinity)."""
    if getattr(worker, "cpu", None) is not None:
        try:
            os.sched_setaffinity(0, {worker.cpu})
        except OSError as exc:  # e.g. a cpuset changed under us: run unpinned
            server.log.warning("could not pin worker %s to CPU %s: %s", worker.pid, worker.cpu, exc)


def _deadline_setter(options: ServeOptions) -> Any:
    """A `post_worker_init` hook handing ServeOptions' deadlines to our worker class.

    gunicorn has no settings of its own for them, and the hook keeps `worker_class`
    a plain import string. Other worker classes ignore the attributes.
    """

    def post_worker_init(worker: Any) -> None:
        worker.first_byte_timeout = options.first_byte_timeout
        worker.read_timeout = options.read_timeout

    return post_worker_init


def _child_exit(server: Any, worker: Any) -> None:
    """Drop a dead worker's live gauges from the multiprocess metrics directory."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def prepare_metrics_dir() -> str:
    """A fresh per-server directory for prometheus-client's multiprocess files."""
    existing = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if existing:
        os.makedirs(existing, exist_ok=True)
        return existing
    path = tempfile.mkdtemp(prefix="callgate-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


class ConfiguredApplication(BaseApplication):  # type: ignore[misc]
    """A gunicorn application configured from `ServeOptions` through `gunicorn_settings`,
    so `callgate serve` and the benchmark's minimal app cannot drift apart."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in gunicorn_settings(self.options).items():
            if value is not None and key in self.cfg.settings:
                self.cfg.set(key, value)


class GatewayServer(ConfiguredApplication):
    """gunicorn master whose workers each build the Flask app after fork."""

    def __init__(self, options: ServeOptions, db_path: str, log: str | None = None) -> None:
        self.db_path = db_path
        self.log = log  # `--log`: sqlite (None: $CALLGATE_LOG) or nats://…
        super().__init__(options)

    def load(self) -> Any:
        from gateway.config import Config
        from gateway.web.app import create_app

        return create_app(Config.from_env(db_path=self.db_path, log=self.log))


def serve(options: ServeOptions, db_path: str, log: str | None = None) -> None:
    """Block serving the gateway; metrics files are cleaned up when gunicorn exits."""
    created = os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None
    metrics_dir = prepare_metrics_dir()
    # Imported now, with the directory set, rather than first inside `_child_exit`:
    # that runs in the master's SIGCHLD handler, and when both workers exit at once the
    # second signal re-entered the half-done import (ImportError in the master).
    import prometheus_client.multiprocess  # noqa: F401
    try:
        GatewayServer(options, db_path, log).run()
    finally:
        if created:
            shutil.rmtree(metrics_dir, ignore_errors=True)
