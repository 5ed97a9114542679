"""A nudge from the processes that queue deliveries (the receiver, ``appliance send`` and
``appliance retry``) to the forwarder, which otherwise finds new work by looking at the queue
every ``forwarder.POLL`` seconds. With it, an instance starts on its way to the PACS as soon
as its row is committed, instead of up to a poll later.

A datagram on a Unix socket in Linux's abstract namespace, named after the data directory: no
file to create, clean up or keep short (a socket path is limited to 108 bytes), and one name
per appliance on the machine. It carries no data; anyone may send it, and all it causes is a
look at the queue. Losing one (no forwarder yet, a full socket buffer) costs at most a poll.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# At most one nudge per this many seconds from one sender: while intake runs at hundreds of
# instances a second the forwarder is busy anyway, and it looks at the queue after each batch.
_SPACING = 0.01


def _address(data_root: Path) -> bytes:
    digest = hashlib.sha256(str(data_root.resolve()).encode()).hexdigest()[:24]
    return b"\0dicom-appliance-forwarder-" + digest.encode()


class Nudger:
    """The sending side: :meth:`nudge` after committing new deliveries. Never blocks or fails."""

    def __init__(self, data_root: Path) -> None:
        self._address = _address(data_root)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self._last = 0.0

    def nudge(self) -> None:
        now = time.monotonic()
        if now - self._last < _SPACING:
            return
        self._last = now
        try:
            self._socket.sendto(b"!", self._address)
        except OSError:  # no forwarder listening (yet), or its buffer is full: it will poll
            pass

    def close(self) -> None:
        self._socket.close()


class Listener:
    """The forwarder's side: a thread that calls ``on_nudge`` for each nudge received."""

    def __init__(self, data_root: Path, on_nudge: Callable[[], None]) -> None:
        self._address = _address(data_root)
        self._on_nudge = on_nudge
        self._socket: socket.socket | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Listen; False (and the forwarder only polls) if the name is taken — another
        forwarder of the same data directory is running."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(self._address)
        except OSError as exc:
            sock.close()
            log.warning("cannot listen for new-work nudges (%s): new work is found by polling", exc)
            return False
        sock.settimeout(1.0)  # to see a stop request
        self._socket = sock
        self._thread = threading.Thread(target=self._run, name="forward-nudges", daemon=True)
        self._thread.start()
        return True

    def _run(self) -> None:
        assert self._socket is not None
        while not self._stopping.is_set():
            try:
                self._socket.recv(16)
            except TimeoutError:
                continue
            except OSError:
                return
            self._on_nudge()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self._socket is not None:
            self._socket.close()
