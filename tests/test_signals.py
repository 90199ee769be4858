"""SIGTERM stops a waiting main thread, even when it lands inside `Event.wait()`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.conftest import REPO

# The signal is raised while the main thread holds the event's condition lock, which
# is where `Event.wait()` keeps it between its checks. A handler that called
# `event.set()` directly deadlocks here (the flaky `project --follow` shutdown);
# ours must let the main thread finish and see the event set.
CHILD = textwrap.dedent(
    """
    import signal, threading
    from gateway.signals import stop_on_signals
    stop = threading.Event()
    restore = stop_on_signals(stop)
    with stop._cond:
        signal.raise_signal(signal.SIGTERM)
    print("stopped" if stop.wait(5) else "not stopped", flush=True)
    restore()
    """
)


def test_signal_inside_event_wait_does_not_deadlock() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "stopped", out.stderr
