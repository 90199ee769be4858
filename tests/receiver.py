"""A real webhook receiver for the forwarder tests and the benchmark (run as a subprocess).

It verifies every request with the `standardwebhooks` library, once per
configured secret (so a test can show that the old and the new secret both
verify during a rotation overlap), and appends one JSON line per request to
`--log`: what arrived, which secrets verified it and what it answered. It can
misbehave on purpose: fail the first N tries of each webhook id (optionally
only for one subject, with a Retry-After), or answer 410 Gone.

    python tests/receiver.py --port 0 --log got.jsonl --secret whsec_… [--fail-first 2]

Prints `listening <port>` on stdout once it accepts connections.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError


class Receiver(ThreadingHTTPServer):
    """Server state shared by the handler threads: settings, try counts, the log file."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], args: argparse.Namespace) -> None:
        super().__init__(address, Handler)
        self.args = args
        self.hooks = [Webhook(secret) for secret in args.secret]
        self.lock = threading.Lock()
        self.tries: Counter[str] = Counter()
        log_path = Path(args.log)
        if log_path.exists():  # a restarted receiver keeps counting tries per webhook id
            for line in log_path.read_text().splitlines():
                if line.strip():
                    self.tries[json.loads(line).get("webhook_id") or ""] += 1
        self.log = log_path.open("a", encoding="utf-8")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the forwarder's client expects
    disable_nagle_algorithm = True
    wbufsize = 64 * 1024  # headers and body leave in one write (flushed per request)
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet: the JSONL log is the record."""

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        arrived = time.time()
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        text = body.decode("utf-8", "replace")
        headers = {k.lower(): v for k, v in self.headers.items()}
        verified = []
        for hook in self.server.hooks:
            try:
                hook.verify(text, headers, json_parse=False)
                verified.append(True)
            except (WebhookVerificationError, ValueError):  # ValueError: malformed headers
                verified.append(False)
        try:
            envelope = json.loads(text)
        except ValueError:
            envelope = None
        msg_id = headers.get("webhook-id", "")
        args = self.server.args
        with self.server.lock:
            self.server.tries[msg_id] += 1
            attempt = self.server.tries[msg_id]
        extra: dict[str, str] = {}
        if args.delay_ms:
            time.sleep(args.delay_ms / 1000)
        subject = envelope.get("subject") if isinstance(envelope, dict) else None
        if self.server.hooks and not any(verified):
            status = 401
        elif args.gone:
            status = 410
        elif attempt <= args.fail_first and args.fail_subject in (None, subject):
            status = args.fail_status
            if args.retry_after is not None:
                extra["Retry-After"] = str(args.retry_after)
        else:
            status = 200
        record = {
            "received_at": arrived,
            "answered_at": time.time(),
            "webhook_id": msg_id,
            "webhook_timestamp": headers.get("webhook-timestamp"),
            "signatures": len(headers.get("webhook-signature", "").split()),
            "verified": verified,
            "content_type": headers.get("content-type"),
            "path": self.path,
            "try": attempt,
            "status": status,
            "envelope": envelope,
        }
        line = json.dumps(record, sort_keys=True) + "\n"
        with self.server.lock:
            self.server.log.write(line)
            self.server.log.flush()
        reply = json.dumps({"ok": 200 <= status < 300, "try": attempt}).encode()
        self.send_response(status)
        for name, value in extra.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log", required=True, help="JSONL file, one line per request")
    parser.add_argument("--secret", action="append", default=[], help="verify with (repeat)")
    parser.add_argument("--fail-first", type=int, default=0, help="fail tries 1..N of each id")
    parser.add_argument("--fail-status", type=int, default=503)
    parser.add_argument("--fail-subject", help="only fail events with this subject")
    parser.add_argument("--retry-after", help="Retry-After header value on failures")
    parser.add_argument("--gone", action="store_true", help="answer every request 410 Gone")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="think time per request")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = Receiver((args.host, args.port), args)
    print(f"listening {server.server_address[1]}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server.log.close()


if __name__ == "__main__":
    sys.exit(main())
