"""The HTTP ceiling for bench/ingest.py: a one-route Flask app under callgate's gunicorn settings.

It does no decryption, validation or storage, so its requests/s is what Flask + gunicorn
alone can answer on this machine with the very settings `callgate serve` uses (taken from
`gateway.web.server.gunicorn_settings`); callgate's rate divided by this one is the ratio the
ingest benchmark reports.

    .venv/bin/python bench/minimal_app.py --port 8100 [--workers N] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.web.server import ConfiguredApplication, ServeOptions  # noqa: E402

_DEFAULTS = ServeOptions()


def create_app() -> Flask:
    """One POST route shaped like the webhook: it reads the body so I/O is comparable."""
    app = Flask("callgate-bench-minimal")

    @app.post("/webhooks/enablex")
    def webhook() -> Response:
        request.get_data()
        return jsonify(status="accepted", duplicate=False)

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify(status="ok")

    return app


class MinimalServer(ConfiguredApplication):
    """gunicorn configured exactly like GatewayServer, serving the minimal app instead."""

    def load_config(self) -> None:
        super().load_config()
        self.cfg.set("proc_name", "callgate-bench-minimal")

    def load(self) -> Any:
        return create_app()


def options_for(host: str, port: int, workers: int | None, threads: int | None) -> ServeOptions:
    """ServeOptions as `callgate serve` builds them; unset values keep callgate's defaults."""
    return ServeOptions(
        host=host,
        port=port,
        workers=_DEFAULTS.workers if workers is None else workers,
        threads=_DEFAULTS.threads if threads is None else threads,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    MinimalServer(options_for(args.host, args.port, args.workers, args.threads)).run()


if __name__ == "__main__":
    main()
