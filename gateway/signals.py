"""Turning SIGTERM/SIGINT into a `threading.Event`, without the signal-handler deadlock.

A handler that calls `event.set()` directly can deadlock: Python runs handlers
in the main thread between bytecodes, and if that thread is inside
`event.wait()` it may hold the event's (non-reentrant) condition lock, which
`set()` then waits for forever. Setting the event from a short-lived thread
avoids that, so every long-running command stops promptly on one signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def stop_on_signals(event: threading.Event) -> Callable[[], None]:
    """Install handlers that set `event`; returns a function restoring the previous ones.

    Only the main thread can install handlers; elsewhere this is a no-op and the
    caller is expected to set the event itself.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum: int, frame: FrameType | None) -> None:
        threading.Thread(target=event.set, name="callgate-stop", daemon=True).start()

    previous: dict[int, Any] = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
