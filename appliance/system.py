"""The appliance's contact with its host: logging (journal or terminal), systemd notification
(READY, STATUS, WATCHDOG, STOPPING) and signals (SIGHUP reload, SIGTERM/SIGINT stop).

Under systemd (``JOURNAL_STREAM`` or ``NOTIFY_SOCKET`` set) logs go to the journal with
structured fields; elsewhere to the terminal. Without systemd, notifications are no-ops.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

try:
    from systemd import daemon as _daemon  # type: ignore[attr-defined]
    from systemd import journal as _journal  # type: ignore[attr-defined]
except ImportError:  # a development machine without libsystemd: terminal logging, no notify
    _daemon = None
    _journal = None

log = logging.getLogger(__name__)


def setup_logging(level: str = "info") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler
    if _journal is not None and os.environ.get("JOURNAL_STREAM"):
        handler = _journal.JournalHandler(SYSLOG_IDENTIFIER="appliance")
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # pynetdicom narrates every PDU at INFO; its warnings and errors are what matter here.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "debug" else logging.DEBUG)


def notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1."""
    if _daemon is not None and os.environ.get("NOTIFY_SOCKET"):
        _daemon.notify(state)


def watchdog_interval() -> float | None:
    """Half the watchdog period systemd asked for (WATCHDOG_USEC), or None when not watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or (os.environ.get("WATCHDOG_PID") and os.environ["WATCHDOG_PID"] != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Signals:
    """SIGTERM/SIGINT set ``stop``; SIGHUP calls ``on_reload`` from the main loop."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()

    def install(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload.set())

    def wait(self, timeout: float, on_reload: Callable[[], object]) -> bool:
        """Sleep up to ``timeout``; handle a reload; True when asked to stop."""
        self.stop.wait(timeout)
        if self.reload.is_set():
            self.reload.clear()
            on_reload()
        return self.stop.is_set()
