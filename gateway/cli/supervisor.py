"""`callgate up`: every long-running part as a child process, stopped together.

Each part is an ordinary `callgate` subcommand in its own process group, so
the operator can also run them separately (systemd units, containers) with
exactly the same behaviour. One Ctrl-C (or SIGTERM) stops them all: SIGTERM
first, SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gateway.signals import stop_on_signals

GRACE_SECONDS = 10.0


def callgate_executable() -> list[str]:
    """The same `callgate` this process runs as (venv script, or `python -m`)."""
    script = Path(sys.executable).parent / "callgate"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "gateway"]


@dataclass
class Part:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    env: dict[str, str] | None = field(default=None, repr=False)  # None: the supervisor's


class Supervisor:
    """Starts parts, watches them, and tears everything down when one dies or on a signal."""

    def __init__(self, parts: Sequence[Part], env: dict[str, str] | None = None) -> None:
        self.parts = list(parts)
        self.env = env
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._restarting: set[str] = set()

    def _spawn(self, part: Part) -> None:
        env = part.env if part.env is not None else self.env
        part.process = subprocess.Popen(part.argv, env=env, start_new_session=True)

    def start(self) -> None:
        for part in self.parts:
            self._spawn(part)

    def restart(self, name: str, env: dict[str, str]) -> bool:
        """Stop part `name` (SIGTERM, SIGKILL after the grace period) and start it again
        with `env`; the other parts keep running, and `wait` does not count the stop as a
        death. False when everything is stopping anyway."""
        part = next(p for p in self.parts if p.name == name)
        with self._lock:
            if self.stopping.is_set():
                return False
            self._restarting.add(name)
        try:
            _stop_parts([part])
            with self._lock:
                if self.stopping.is_set():
                    return False
                part.env = env
                self._spawn(part)
            return True
        finally:
            with self._lock:
                self._restarting.discard(name)

    def wait(self) -> int:
        """Block until a signal or a part exits; return the exit code for `up`."""
        restore = stop_on_signals(self.stopping)
        try:
            while not self.stopping.is_set():
                for part in self.parts:
                    with self._lock:
                        exited = part.name not in self._restarting and (
                            part.process is not None and part.process.poll() is not None
                        )
                    if exited and part.process is not None:
                        print(
                            f"callgate up: {part.name} exited with {part.process.returncode}; "
                            "stopping everything",
                            file=sys.stderr,
                        )
                        self.stop()
                        return part.process.returncode or 1
                self.stopping.wait(0.5)
            self.stop()
            return 0
        finally:
            restore()

    def stop(self) -> None:
        with self._lock:
            self.stopping.set()  # no restart starts a part after this
        _stop_parts(self.parts)


def _stop_parts(parts: Sequence[Part]) -> None:
    """SIGTERM every part, SIGKILL whichever is still running after the grace period."""
    for part in parts:
        _signal(part, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    for part in parts:
        if part.process is None:
            continue
        try:
            part.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(part, signal.SIGKILL)
            part.process.wait()


def _signal(part: Part, sig: int) -> None:
    if part.process is not None and part.process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(part.process.pid, sig)
