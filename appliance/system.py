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
    pynetdicom_log = logging.getLogger("pynetdicom")
    pynetdicom_log.setLevel(logging.WARNING if level != "debug" else logging.DEBUG)
    for log_handler in root.handlers:
        log_handler.addFilter(_drop_pynetdicom_logging_bug)
        log_handler.addFilter(_demote_pynetdicom_outage_errors)


# What pynetdicom logs at ERROR when a peer is down or says no: an ordinary outage for a box
# behind a VPN, which the forwarder reports itself (a WARNING naming the destination, the
# reason and the retry), and `appliance echo` in its answer. Shown at INFO beside it.
_PYNETDICOM_OUTAGE = ("Association request failed: unable to connect to remote", "TCP Initialisation Error:",
                      "Association Rejected", "Result: Rejected", "Reason: ", "Association Aborted",
                      "Connection closed before the entire PDU was received")


def _demote_pynetdicom_outage_errors(record: logging.LogRecord) -> bool:
    if record.levelno == logging.ERROR and record.name.startswith("pynetdicom"):
        if isinstance(record.msg, (ConnectionError, TimeoutError)):
            # The traceback pynetdicom logs after "Connection closed before the entire PDU was
            # received" for a peer that reset the connection (a PACS restarting): that line
            # says it; thirty lines of traceback for it at every restart say nothing more.
            return False
        if str(record.msg).startswith(_PYNETDICOM_OUTAGE):
            record.levelno, record.levelname = logging.INFO, "INFO"
    return True


def _drop_pynetdicom_logging_bug(record: logging.LogRecord) -> bool:
    """pynetdicom 3.0.4's own message-logging handler (bound to EVT_DIMSE_RECV) raises on an
    N-GET with an empty attribute list, which DCMTK's print client always sends, and the
    traceback is logged as an ERROR on every such request. We bind nothing to EVT_DIMSE_RECV,
    so an exception there is never ours: drop it rather than alarm whoever reads the journal."""
    if not record.name.startswith("pynetdicom"):
        return True
    if "EVT_DIMSE_RECV" in str(record.msg):
        return False
    if record.exc_info and record.exc_info[2] is not None:
        frame = record.exc_info[2]
        while frame.tb_next is not None:
            frame = frame.tb_next
        if frame.tb_frame.f_code.co_name.startswith("_recv_") and "_handlers" in frame.tb_frame.f_code.co_filename:
            return False
    return True


def notify(state: str) -> None:
    """Tell systemd (Type=notify) about our state: READY=1, STATUS=..., WATCHDOG=1, STOPPING=1."""
    if _daemon is not None and os.environ.get("NOTIFY_SOCKET"):
        try:
            _daemon.notify(state)
        except OSError as exc:  # telling systemd must never stop the box
            log.warning("cannot notify systemd (%s): %s", state.split("\n")[0], exc)


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
