"""pynetdicom's two association loops, woken by events instead of polling every millisecond.

pynetdicom 3.0 runs two threads per association: the DUL thread (reads PDUs, drives the state
machine, sends what the user queued) and the association thread (serves DIMSE requests). Both
loop on ``time.sleep(0.001)`` when idle. Each C-STORE crosses three of those sleeps — the
request waits for the DUL to look at the socket, the decoded message for the association thread,
the response for the DUL — about 2 ms of pure waiting per instance against a peer such as
``storescu`` that sends the next instance only after the last response; and each idle
association still wakes 2 000 times a second.

:func:`install` replaces the two loops (the bodies are pynetdicom's, step for step; only the
waiting differs):

* the DUL thread blocks in ``select()`` on the association's socket and an ``eventfd`` that
  :meth:`send_pdu` and :meth:`kill_dul` signal, so it wakes for incoming data and for outgoing
  primitives at once;
* the association thread blocks on a :class:`threading.Event` that the DUL thread sets after
  every state-machine action (a decoded DIMSE message, a release or abort request);
* both still wake every :data:`_TICK` seconds to see timers and kill flags, as the originals did.

It is process-wide, so it is installed once by each process that talks DICOM, and only for the
pynetdicom release it was written against (the loops are internal API).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import threading
from typing import Any

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ

log = logging.getLogger(__name__)
# the loops log under pynetdicom's names, as the originals did
_dul_log = logging.getLogger("pynetdicom.dul")
_assoc_log = logging.getLogger("pynetdicom.association")

# The pynetdicom releases whose loops these are (see the module docstring).
_WRITTEN_FOR = ("3.0.",)

# Longest wait without an event: bounds how late a timer (ARTIM, idle) or a kill flag is seen.
_TICK = 0.02

_installed = False


def install() -> bool:
    """Replace pynetdicom's loops in this process; ``False`` (and a warning) for another release."""
    global _installed
    if _installed:
        return True
    if not pynetdicom.__version__.startswith(_WRITTEN_FOR):
        log.warning("pynetdicom %s: keeping its polling loops (event-driven loops are for %s)",
                    pynetdicom.__version__, ", ".join(_WRITTEN_FOR))
        return False
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    DULServiceProvider.send_pdu = _dul_send_pdu  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _dul_kill  # type: ignore[method-assign]
    Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
    _installed = True
    return True


_original_send_pdu = DULServiceProvider.send_pdu
_original_kill_dul = DULServiceProvider.kill_dul


_fd_lock = threading.RLock()
_CLOSED = -1


def _dul_wakeup_fd(dul: Any) -> int:
    """The DUL's eventfd, made on first use (by whichever thread comes first); -1 once its loop ended."""
    fd = dul.__dict__.get("_appliance_wakeup")
    if fd is None:
        with _fd_lock:
            fd = dul.__dict__.get("_appliance_wakeup")
            if fd is None:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                dul._appliance_wakeup = fd
    return int(fd)


def _assoc_wakeup(assoc: Any) -> threading.Event:
    return assoc.__dict__.setdefault("_appliance_wakeup", threading.Event())  # type: ignore[no-any-return]


def _signal(dul: Any) -> None:
    with _fd_lock:  # never write to a number the loop has just closed (and the OS reused)
        fd = _dul_wakeup_fd(dul)
        if fd != _CLOSED:
            os.eventfd_write(fd, 1)


def _dul_send_pdu(self: Any, primitive: Any) -> None:
    _original_send_pdu(self, primitive)
    _signal(self)


def _dul_kill(self: Any) -> None:
    _original_kill_dul(self)
    _signal(self)


def _dul_wait(dul: Any, wakeup: int) -> None:
    """Block until the socket is readable, something was queued for the DUL, or a tick passed."""
    if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
        return
    timeout = _TICK
    if dul.artim_timer._start_time is not None and dul.artim_timer._end_time is None:
        timeout = max(0.0, min(timeout, dul.artim_timer.remaining))
    watched: list[Any] = [wakeup]
    raw = dul.socket.socket if dul.socket is not None else None
    if raw is not None and dul.socket._is_connected:
        if isinstance(raw, ssl.SSLSocket) and raw.pending():
            return  # decrypted bytes already buffered: select() would not see them
        watched.append(raw)
    try:
        ready, _, _ = select.select(watched, [], [], timeout)
    except (OSError, ValueError):  # the socket closed under us: let the loop find out
        return
    if wakeup in ready:
        try:
            os.eventfd_read(wakeup)
        except BlockingIOError:
            pass


def _dul_run_reactor(self: Any) -> None:
    """``DULServiceProvider.run_reactor`` with the idle sleep replaced by :func:`_dul_wait`."""
    self._idle_timer.start()
    wakeup = _dul_wakeup_fd(self)
    assoc_wakeup = _assoc_wakeup(self.assoc)
    idle = False
    try:
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                idle = True
            if idle:
                _dul_wait(self, wakeup)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                # one primitive to send **or** one PDU to read per turn, as in pynetdicom
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: any failure aborts the association
                _dul_log.error("Exception in DUL.run(), aborting association")
                _dul_log.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            self.state_machine.do_action(event)
            assoc_wakeup.set()  # a decoded message, a release or an abort may be waiting
            idle = False
    finally:
        assoc_wakeup.set()
        with _fd_lock:
            self._appliance_wakeup = _CLOSED
            os.close(wakeup)


def _assoc_run_reactor(self: Any) -> None:
    """``Association._run_reactor`` with the 1 ms sleep replaced by waiting for the DUL."""
    self._is_paused = False
    wakeup = _assoc_wakeup(self)
    while not self._kill:
        if self.dimse.msg_queue.empty():
            wakeup.wait(_TICK)
        wakeup.clear()

        # paused while the user sends DIMSE messages on this association itself
        self._is_paused = True
        self._reactor_checkpoint.wait()
        self._is_paused = False

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            _assoc_log.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return

        if self.acse.is_aborted():
            log_msg = "Association Aborted"
            if self.acse.is_aborted("a-p-abort"):
                log_msg += " (A-P-ABORT)"
            _assoc_log.info(log_msg)
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return

        if not self.dul.is_alive():
            self.kill()
            return

        if self.dul.idle_timer_expired():
            _assoc_log.error("Network timeout reached")
            if self.network_timeout_response == "A-RELEASE":
                self._is_paused = True
                self._reactor_checkpoint.wait()
                self.release()
                self._is_paused = False
            else:
                self.abort()
            self.kill()
            return

