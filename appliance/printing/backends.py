"""Printer backends: how a spooled PostScript file reaches paper, and how the printer's state is
read for the Printer N-GET.

* ``cups``: ``lp -d QUEUE`` (copies collated by CUPS), state from ``lpstat -l -p QUEUE``;
* ``socket``: raw TCP to an AppSocket/JetDirect port (9100), one connection per copy,
  state from whether the port accepts a connection;
* ``directory``: a durable copy of the PostScript (and a PDF made by ``ps2pdf`` if asked),
  readable by all (0644), state from whether the directory is writable.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from ..durable import durable_copy, place
from .settings import PrinterConfig

LOG = logging.getLogger(__name__)

SEND_TIMEOUT = 120.0
# A directory printer's files are read by the admin's other tools (a file share, a script
# collecting the PDFs), as other users: readable by all, whatever the service's umask (the
# systemd unit's is 0027). The directory itself keeps the mode it is made with.
ARCHIVED_FILE_MODE = 0o644
# lp's -q range is 1..100 (default 50).
_LP_PRIORITY = {"HIGH": 80, "MED": 50, "LOW": 20}


class BackendError(Exception):
    """The printer did not take the job; the spool retries it later."""


@dataclass(frozen=True)
class PrinterState:
    """Printer Status (2110,0010) and Printer Status Info (2110,0020) as DICOM words them."""

    status: Literal["NORMAL", "WARNING", "FAILURE"]
    info: str
    detail: str = ""


NORMAL = PrinterState("NORMAL", "NORMAL")


class Backend(Protocol):
    def send(self, path: Path, copies: int, priority: str, media: str, title: str,
             copy_sent: Callable[[], None]) -> None: ...

    def state(self) -> PrinterState: ...


# ---- CUPS --------------------------------------------------------------------------------------

# IPP printer-state-reasons (without -error/-warning/-report suffix) -> DICOM status and info.
_CUPS_REASONS: dict[str, PrinterState] = {
    "media-empty": PrinterState("FAILURE", "SUPPLY EMPTY"),
    "media-needed": PrinterState("FAILURE", "SUPPLY EMPTY"),
    "media-low": PrinterState("WARNING", "SUPPLY LOW"),
    "toner-empty": PrinterState("FAILURE", "SUPPLY EMPTY"),
    "marker-supply-empty": PrinterState("FAILURE", "SUPPLY EMPTY"),
    "toner-low": PrinterState("WARNING", "SUPPLY LOW"),
    "marker-supply-low": PrinterState("WARNING", "SUPPLY LOW"),
    "media-jam": PrinterState("FAILURE", "FILM JAM"),
    "door-open": PrinterState("FAILURE", "COVER OPEN"),
    "cover-open": PrinterState("FAILURE", "COVER OPEN"),
    "offline": PrinterState("FAILURE", "PRINTER OFFLINE"),
    "shutdown": PrinterState("FAILURE", "PRINTER DOWN"),
    "connecting-to-device": PrinterState("WARNING", "PRINTER OFFLINE"),
    "paused": PrinterState("FAILURE", "PRINTER DOWN"),
}


def cups_state_from_lpstat(output: str) -> PrinterState:
    """Map ``lpstat -l -p QUEUE`` output onto Printer Status / Printer Status Info."""
    worst = NORMAL
    lines = output.splitlines()
    if lines and " disabled" in lines[0]:
        worst = PrinterState("FAILURE", "PRINTER DOWN", lines[0].strip())
    for line in lines:
        text = line.strip()
        if not text.startswith("Alerts:"):
            continue
        for reason in text.removeprefix("Alerts:").split():
            base = reason
            for suffix in ("-error", "-warning", "-report"):
                base = base.removesuffix(suffix)
            state = _CUPS_REASONS.get(base)
            if state is None:
                continue
            if reason.endswith("-report"):
                continue
            rank = {"NORMAL": 0, "WARNING": 1, "FAILURE": 2}
            if rank[state.status] > rank[worst.status]:
                worst = PrinterState(state.status, state.info, reason)
    return worst


class CupsBackend:
    def __init__(self, printer: PrinterConfig) -> None:
        self.printer = printer

    def _server(self) -> list[str]:
        return ["-h", self.printer.cups_server] if self.printer.cups_server else []

    def send(self, path: Path, copies: int, priority: str, media: str, title: str,
             copy_sent: Callable[[], None]) -> None:
        command = [
            "lp", *self._server(), "-d", str(self.printer.cups_queue), "-n", str(copies),
            "-o", "collate=true", "-q", str(_LP_PRIORITY.get(priority, 50)), "-t", title,
        ]
        if media and media != "FILM":
            command += ["-o", f"media={media}"]
        command += ["--", str(path)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=SEND_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"lp: {exc}") from exc
        if done.returncode != 0:
            raise BackendError(f"lp exit {done.returncode}: {(done.stderr or done.stdout).strip()}")
        LOG.info("printer %s: %s", self.printer.cups_queue, done.stdout.strip())
        for _ in range(copies):
            copy_sent()

    def state(self) -> PrinterState:
        command = ["lpstat", *self._server(), "-l", "-p", str(self.printer.cups_queue)]
        try:
            done = subprocess.run(command, capture_output=True, text=True,
                                  timeout=self.printer.status_timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return PrinterState("FAILURE", "PRINTER OFFLINE", f"lpstat: {exc}")
        if done.returncode != 0:
            return PrinterState("FAILURE", "PRINTER OFFLINE", (done.stderr or done.stdout).strip())
        return cups_state_from_lpstat(done.stdout)


# ---- raw socket (AppSocket / JetDirect) --------------------------------------------------------

class SocketBackend:
    def __init__(self, printer: PrinterConfig) -> None:
        self.printer = printer

    def send(self, path: Path, copies: int, priority: str, media: str, title: str,
             copy_sent: Callable[[], None]) -> None:
        address = (str(self.printer.host), self.printer.socket_port)
        for _ in range(copies):
            try:
                with socket.create_connection(address, timeout=max(self.printer.status_timeout, 5.0)) as conn:
                    conn.settimeout(SEND_TIMEOUT)
                    with path.open("rb") as source:
                        while block := source.read(1 << 16):
                            conn.sendall(block)
                    conn.shutdown(socket.SHUT_WR)
                    # AppSocket printers may talk back (status); read until they close, briefly.
                    conn.settimeout(5.0)
                    try:
                        while conn.recv(4096):
                            pass
                    except TimeoutError:
                        pass
            except OSError as exc:
                raise BackendError(f"{address[0]}:{address[1]}: {exc}") from exc
            copy_sent()

    def state(self) -> PrinterState:
        address = (str(self.printer.host), self.printer.socket_port)
        try:
            with socket.create_connection(address, timeout=self.printer.status_timeout):
                return NORMAL
        except OSError as exc:
            return PrinterState("FAILURE", "PRINTER OFFLINE", f"{address[0]}:{address[1]}: {exc}")


# ---- directory ---------------------------------------------------------------------------------

class DirectoryBackend:
    def __init__(self, printer: PrinterConfig) -> None:
        self.printer = printer
        self.directory = Path(str(printer.directory))

    def send(self, path: Path, copies: int, priority: str, media: str, title: str,
             copy_sent: Callable[[], None]) -> None:
        target = self.directory / path.name
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            durable_copy(path, target, ARCHIVED_FILE_MODE)
            if self.printer.pdf:
                self._pdf(path, target.with_suffix(".pdf"))
        except OSError as exc:
            raise BackendError(f"{self.directory}: {exc}") from exc
        for _ in range(copies):
            copy_sent()

    @staticmethod
    def _pdf(source: Path, target: Path) -> None:
        if shutil.which("ps2pdf") is None:
            raise BackendError("pdf archiving needs ps2pdf (Ghostscript), which is not installed")
        temp = target.with_name(f".{target.name}.tmp")
        try:
            done = subprocess.run(["ps2pdf", str(source), str(temp)], capture_output=True, text=True,
                                  timeout=SEND_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BackendError(f"ps2pdf: {exc}") from exc
        if done.returncode != 0:
            temp.unlink(missing_ok=True)
            raise BackendError(f"ps2pdf exit {done.returncode}: {done.stderr.strip()}")
        with temp.open("rb") as written:
            # ps2pdf creates it after the umask.
            os.fchmod(written.fileno(), ARCHIVED_FILE_MODE)
            os.fsync(written.fileno())
        place(temp, target)

    def state(self) -> PrinterState:
        directory = self.directory
        if directory.is_dir() and os.access(directory, os.W_OK | os.X_OK):
            return NORMAL
        if not directory.exists() and os.access(directory.parent, os.W_OK | os.X_OK):
            return NORMAL  # made on first job
        return PrinterState("FAILURE", "PRINTER DOWN", f"{directory} is not writable")


def make_backend(printer: PrinterConfig) -> Backend:
    if printer.backend == "cups":
        return CupsBackend(printer)
    if printer.backend == "socket":
        return SocketBackend(printer)
    return DirectoryBackend(printer)


class CachedState:
    """Printer state for N-GETs, probed at most every few seconds (a modality may poll)."""

    def __init__(self, backend: Backend, max_age: float = 3.0) -> None:
        self.backend = backend
        self.max_age = max_age
        self._lock = threading.Lock()
        self._at = 0.0
        self._state = NORMAL

    def get(self) -> PrinterState:
        with self._lock:
            if time.monotonic() - self._at > self.max_age:
                self._state = self.backend.state()
                self._at = time.monotonic()
            return self._state
