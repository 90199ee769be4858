"""One way to run a real server as a subprocess in tests: its own process group (so a
kill reaches gunicorn's workers and Datasette's children too), output to a file (a pipe
nobody reads fills up and blocks the server mid-test), a readiness wait, and a stop that
escalates from SIGTERM to SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

RECEIVER = Path(__file__).resolve().parent / "receiver.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None,
              any_status: bool = False) -> None:
    """Until `url` answers below 500 (or at all, with `any_status`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500 or any_status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


def wait_for_line(path: Path, prefix: str, proc: subprocess.Popen[bytes],
                  timeout: float = 20.0) -> str:
    """Until the server's log file has a line starting with `prefix` (its readiness line)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if line.startswith(prefix):
                    return line
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {path.read_text()[-2000:]}")
        time.sleep(0.05)
    raise TimeoutError(f"no {prefix!r} line in {path}")


class Subprocess:
    """A server process: `start(argv, ready)` then `stop()`/`kill()`; usable as a context."""

    def __init__(self, log_path: Path, env: Mapping[str, str] | None = None,
                 cwd: str | None = None) -> None:
        self.log_path = Path(log_path)
        self.env = dict(os.environ if env is None else env)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self, argv: Sequence[str], ready: Callable[[], object] | None = None) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                list(argv), env=self.env, cwd=self.cwd, stdout=log, stderr=log,
                start_new_session=True,
            )
        if ready is not None:
            try:
                ready()
            except BaseException:
                self.kill()
                raise

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20.0) -> None:
        """Signal the whole process group and wait for the leader."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=timeout)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM (graceful), then SIGKILL if it does not exit within `grace`."""
        try:
            self.kill(signal.SIGTERM, timeout=grace)
        except subprocess.TimeoutExpired:
            self.kill(signal.SIGKILL)

    def __enter__(self) -> Subprocess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Receiver(Subprocess):
    """tests/receiver.py as a subprocess; `records()` reads what it logged."""

    def __init__(self, tmp: Path, *args: str, secrets: tuple[str, ...] = (), port: int = 0):
        stamp = time.monotonic_ns()
        super().__init__(tmp / f"receiver-{stamp}.out")
        self.log = tmp / f"received-{stamp}.jsonl"
        self.args = [*args]
        for secret in secrets:
            self.args += ["--secret", secret]
        self.port = port or free_port()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start(self) -> Receiver:
        self.launch(
            [sys.executable, str(RECEIVER), "--port", str(self.port), "--log", str(self.log),
             *self.args],
            lambda: wait_for_line(self.log_path, "listening", self.proc),  # type: ignore[arg-type]
        )
        return self

    def records(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines() if line]
