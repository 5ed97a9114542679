"""pynetdicom's two association loops, woken by events instead of polling every millisecond.

pynetdicom 3.0 runs two threads per association: the DUL thread (reads PDUs, drives the state
machine, sends what the user queued) and the association thread (serves DIMSE requests). Both
loop on ``time.sleep(0.001)`` when idle. Each C-STORE crosses three of those sleeps — the
request waits for the DUL to look at the socket, the decoded message for the association thread,
the response for the DUL — about 2 ms of pure waiting per instance against a peer such as
``storescu`` that sends the next instance only after the last response; and each idle
association still wakes 2 000 times a second.

:func:`install` replaces the two loops (the bodies are pynetdicom's, step for step; only the
waiting differs). Neither loop wakes on a clock: each sleeps until it has something to do, and
every source of work wakes the loop that takes it — an idle association costs no CPU.

* The DUL thread blocks in ``select()`` on the association's socket and an ``eventfd``, for at
  most what is left of the ARTIM timer while that runs. It wakes for

  - bytes, or the end, on the socket: the peer's PDUs. TLS bytes already decrypted, which
    ``select()`` cannot see, are read before it waits;
  - the eventfd, written by :meth:`send_pdu` (a primitive to send: an A-ASSOCIATE answer, a
    DIMSE message, a release, an abort), by :meth:`kill_dul` and :meth:`stop_dul` (its stop
    flag), and by the association thread as it ends: pynetdicom's acceptor closes the
    connection then, possibly under a DUL waiting on it, and a socket closed by another thread
    is no event for ``select()`` until the connection changes state (if ever: a link gone down
    never acknowledges the FIN);
  - the ARTIM timer falling due: no A-ASSOCIATE-RQ after the connection (Sta2), or a peer that
    does not close after the release or abort (Sta13).

  What it queues for itself (a PDU's state-machine event, a closed connection) it takes in the
  same turn, and the eventfd is written only while it waits, so a C-STORE's dozens of PDUs
  cost one write.

* The association thread blocks on a :class:`threading.Event`, for at most what is left of the
  network timeout's idle timer. It wakes for

  - every state-machine action of the DUL thread: a decoded DIMSE message, a release or an
    abort from the peer;
  - a C-STORE response the DUL thread decoded itself (``pdata.py``) and queued with no action
    of the state machine: the sender waiting on the queue takes it, and one nobody waits for
    is the loop's, as pynetdicom's;
  - ``Association.kill()`` from another thread (its stop flag);
  - the end of the DUL thread, which sets a flag first: it wakes the loop for the last time
    while ``is_alive()`` still says True, and the loop must not wait again on a DUL that
    stopped without a release or abort for it (an abort that does not wait, as every abort
    from an event handler, leaves none);
  - the idle timer falling due: the network timeout, which ends the association.

* Both also wake after :data:`_BACKSTOP` seconds without any of these. Nothing relies on it:
  a wake by it that finds work logs a warning and counts in :data:`missed_wakeups`, which the
  tests require to stay 0. It is there so that a source overlooked costs seconds, not a stalled
  association.
* ``_is_paused``, which pynetdicom's SCU-side ``send_*()`` wait for, is handled so that a stale
  value can never let the user and the loop both take a response (see :func:`_assoc_run_reactor`).
  It is True while the loop waits, so a ``send_*()`` never has to wake it.

It also puts pynetdicom's ``Timer`` (the ARTIM timer and the network timeout's idle timer) on the
monotonic clock. It measured with ``time.time()``: when the wall clock stepped forward (NTP's
first answer on a box without a battery-backed clock), every association that was between two
messages — a modality holding one open through an exam — was aborted at once as idle; a step
back kept a vanished peer's association open for the size of the step.

The DUL loop also moves the appliance's own traffic past pynetdicom's per-PDU machinery (see
``pdata.py`` and ``hotpath.py``): a P-DATA-TF received while established goes first to the
association's direct C-STORE receiver, if it has one, and a C-STORE-RQ queued as one
``hotpath.FileMessage`` is written straight from its file.

It is process-wide, so it is installed once by each process that talks DICOM, and only for the
pynetdicom release it was written against (the loops are internal API).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import ssl
import struct
import threading
import time
import types
from typing import Any

import pynetdicom
import pynetdicom.timer
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT, A_P_ABORT, A_RELEASE

from .hotpath import COMMAND, LAST, FileMessage
from .pdata import ProtocolError

log = logging.getLogger(__name__)
# the loops log under pynetdicom's names, as the originals did
_dul_log = logging.getLogger("pynetdicom.dul")
_assoc_log = logging.getLogger("pynetdicom.association")

# The pynetdicom releases whose loops these are (see the module docstring).
_WRITTEN_FOR = ("3.0.",)

# Longest wait without an event or a timer falling due. Nothing relies on it: every source of
# work signals the loop that takes it (see the module docstring). It only bounds the harm of a
# source overlooked, and a wake by it that finds work is logged as a missed wakeup (_missed).
_BACKSTOP = 5.0

# How many times a loop woke by the backstop and found work nobody had signalled (each is
# logged as a warning). Stays 0 unless a wakeup source was overlooked.
missed_wakeups = 0
_missed_lock = threading.Lock()

_installed = False
# What pynetdicom's timer module sees as ``time``: its timers measure on the monotonic clock.
_MONOTONIC = types.SimpleNamespace(time=time.monotonic)


def install() -> bool:
    """Replace pynetdicom's loops in this process; ``False`` (and a warning) for another release."""
    global _installed
    if _installed:
        return True
    if not pynetdicom.__version__.startswith(_WRITTEN_FOR):
        log.warning("pynetdicom %s: keeping its polling loops (event-driven loops are for %s)",
                    pynetdicom.__version__, ", ".join(_WRITTEN_FOR))
        return False
    pynetdicom.timer.time = _MONOTONIC  # type: ignore[assignment]  # Timer reads only .time()
    DULServiceProvider.run_reactor = _dul_run_reactor  # type: ignore[method-assign]
    DULServiceProvider.send_pdu = _dul_send_pdu  # type: ignore[method-assign]
    DULServiceProvider.kill_dul = _dul_kill  # type: ignore[method-assign]
    DULServiceProvider.stop_dul = _dul_stop  # type: ignore[method-assign]
    Association._run_reactor = _assoc_run_reactor  # type: ignore[method-assign]
    Association.kill = _assoc_kill  # type: ignore[method-assign]
    Association.run_reactor = _assoc_thread  # type: ignore[method-assign]
    _installed = True
    return True


_original_send_pdu = DULServiceProvider.send_pdu
_original_kill_dul = DULServiceProvider.kill_dul
_original_assoc_thread = Association.run_reactor


class _Wakeup:
    """How other threads wake one DUL loop: an eventfd, written only while the loop waits on it
    (a C-STORE queues dozens of PDUs; one write per idle period is enough)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.waiting = False
        self._lock = threading.Lock()
        self._closed = False

    def signal(self) -> None:
        # The loop sets ``waiting`` *before* it looks at its queues and flags one last time, so
        # a signaller that still sees False has queued its work early enough to be seen.
        if self.waiting:
            with self._lock:  # never write to a number the loop has closed (and the OS reused)
                if not self._closed:
                    os.eventfd_write(self.fd, 1)

    def drain(self) -> bool:
        """Reset the eventfd; whether it had been written."""
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            return False
        return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.fd)


_creation_lock = threading.Lock()


def _wakeup_of(dul: Any) -> _Wakeup:
    """The DUL's wakeup, made on first use by whichever thread comes first."""
    wakeup = dul.__dict__.get("_appliance_wakeup")
    if wakeup is None:
        with _creation_lock:
            wakeup = dul.__dict__.get("_appliance_wakeup")
            if wakeup is None:
                wakeup = dul._appliance_wakeup = _Wakeup()
    return wakeup  # type: ignore[no-any-return]


def _assoc_wakeup(assoc: Any) -> threading.Event:
    return assoc.__dict__.setdefault("_appliance_wakeup", threading.Event())  # type: ignore[no-any-return]


def _dul_send_pdu(self: Any, primitive: Any) -> None:
    _original_send_pdu(self, primitive)
    _wakeup_of(self).signal()


def _dul_kill(self: Any) -> None:
    _original_kill_dul(self)
    _wakeup_of(self).signal()


def _dul_stop(self: Any) -> bool:
    """``DULServiceProvider.stop_dul``: as pynetdicom's, but wakes the loop to see the flag."""
    if self.state_machine.current_state != "Sta1":
        return False
    self._kill_thread = True
    _wakeup_of(self).signal()
    while self.is_alive():
        time.sleep(self._run_loop_delay)
    return True


def _running(timer: Any) -> bool:
    """Whether a pynetdicom ``Timer`` is started, not stopped, and has a timeout at all."""
    return timer.timeout is not None and timer._start_time is not None and timer._end_time is None


def _missed(loop: str, what: str) -> None:
    """A loop woke by the backstop and found work that no signal told it about."""
    global missed_wakeups
    with _missed_lock:
        missed_wakeups += 1
    log.warning("the %s loop woke by its %g s backstop and found %s: that wakeup was not signalled",
                loop, _BACKSTOP, what)


def _readable(dul: Any) -> bool | None:
    """Whether the DUL's socket has bytes (or an end) to read; None if it has no open socket."""
    raw = dul.socket.socket if dul.socket is not None else None
    if raw is None or not dul.socket._is_connected:
        return None
    if isinstance(raw, ssl.SSLSocket) and raw.pending():
        return True  # decrypted bytes already buffered: select() would not see them
    try:
        return bool(select.select([raw], [], [], 0)[0])
    except (OSError, ValueError):
        return True  # closed under us: the loop's next read finds out


def _dul_pending(dul: Any) -> str:
    """What the DUL loop would act on now, or ''."""
    if dul._kill_thread:
        return "its stop flag set"
    if not dul.to_provider_queue.empty():
        return "a primitive queued to send"
    if not dul.event_queue.empty():
        return "a state-machine event queued"
    if _running(dul.artim_timer) and dul.artim_timer.expired:
        return "the ARTIM timer expired"
    if _readable(dul):
        return "data to read on its socket"
    return ""


def _dul_wait(dul: Any, wakeup: _Wakeup) -> None:
    """Block until the socket is readable, something is queued for the DUL or its stop flag set
    (each signals the eventfd), or the ARTIM timer falls due."""
    wakeup.waiting = True
    try:
        if not dul.to_provider_queue.empty() or not dul.event_queue.empty() or dul._kill_thread:
            return
        timeout, by_backstop = _BACKSTOP, True
        if _running(dul.artim_timer):
            remaining = max(0.0, dul.artim_timer.remaining)
            if remaining < timeout:
                timeout, by_backstop = remaining, False
        watched: list[Any] = [wakeup.fd]
        raw = dul.socket.socket if dul.socket is not None else None
        if raw is not None and dul.socket._is_connected:
            if isinstance(raw, ssl.SSLSocket) and raw.pending():
                return  # decrypted bytes already buffered: select() would not see them
            watched.append(raw)
        try:
            ready, _, _ = select.select(watched, [], [], timeout)
        except (OSError, ValueError):  # the socket closed under us: let the loop find out
            return
        if wakeup.fd in ready:
            wakeup.drain()
        elif by_backstop and not ready:
            pending = _dul_pending(dul)
            if pending and not wakeup.drain():  # (a signal written since select() timed out is not missed)
                _missed("DUL", pending)
    finally:
        wakeup.waiting = False


def _dul_run_reactor(self: Any) -> None:
    """``DULServiceProvider.run_reactor`` with the idle sleep replaced by :func:`_dul_wait`."""
    self._idle_timer.start()
    wakeup = _wakeup_of(self)
    assoc_wakeup = _assoc_wakeup(self.assoc)
    idle = False
    acceptor, requested = self.assoc.is_acceptor, False  # requested: an A-ASSOCIATE-RQ has come
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
                if _process_primitive(self):
                    pass
                elif _transport_event(self):
                    self._idle_timer.restart()
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: any failure aborts the association
                _abort_on_failure(self, exc)
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                idle = True
                continue
            try:
                self.state_machine.do_action(event)
            except Exception as exc:  # noqa: BLE001 - pynetdicom let this end the thread, with no A-ABORT
                # A request pynetdicom cannot take (a command split over PDVs on a context never
                # accepted, a split C-STORE without its UIDs) raised here, in the state machine,
                # and the thread died: the peer got no A-ABORT and waited for a response.
                _abort_on_failure(self, exc)
                return
            if acceptor and not requested:
                state = self.state_machine.current_state
                if state == "Sta1":
                    # The peer closed the connection (or sent garbage) before any A-ASSOCIATE-RQ:
                    # a TCP health check, a port scan. pynetdicom's acceptor would wait out the
                    # ACSE timeout for the request, holding one of node.max_associations, so
                    # a check every second kept modalities out. End its wait now.
                    self.to_user_queue.put(None)
                    requested = True
                elif state not in ("Sta2", "Sta13"):
                    requested = True
            assoc_wakeup.set()  # a decoded message, a release or an abort may be waiting
            idle = False
    finally:
        # Before is_alive() turns False: the association loop must not take a DUL that is
        # ending for one that goes on, and wait for a wakeup that will never come again.
        self._appliance_ended = True
        assoc_wakeup.set()
        wakeup.close()


def _abort_on_failure(dul: Any, exc: Exception) -> None:
    """What pynetdicom's loop does when handling a PDU or primitive fails: log it, send an
    A-ABORT (service provider) and end the association and the thread."""
    _dul_log.error("Exception in DUL.run(), aborting association")
    _dul_log.exception(exc)
    abort_pdu = A_ABORT_RQ()
    abort_pdu.source = 0x02
    abort_pdu.reason_diagnostic = 0x00
    try:
        dul.socket.send(abort_pdu.encode())
    except Exception:  # noqa: BLE001 - a connection already gone: the association ends all the same
        pass
    dul.assoc.is_aborted = True
    dul.assoc.is_established = False
    dul.assoc._kill = True
    dul._kill_thread = True
    # pynetdicom reported no end of the association on this path: the handlers that remove a
    # partly received file and close the association's record never ran.
    evt.trigger(dul.assoc, evt.EVT_ABORTED, {})


def _process_primitive(dul: Any) -> bool:
    """``DULServiceProvider._process_recv_primitive``, except that a C-STORE-RQ queued as one
    ``hotpath.FileMessage`` is written to the socket here, by this thread, PDU after PDU."""
    try:
        head = dul.to_provider_queue.queue[0]
    except IndexError:
        return False
    if isinstance(head, FileMessage):
        dul.to_provider_queue.get(False)
        head.send(dul)
        return True
    return bool(dul._process_recv_primitive())


def _transport_event(dul: Any) -> bool:
    """``DULServiceProvider._is_transport_event``, reading with :func:`_read_pdu`. A peer
    that sent what is not DICOM is not read further (see :func:`_not_dicom`): its connection
    is closed once the state machine has answered it."""
    if dul.state_machine.current_state == "Sta13":
        if dul.__dict__.get("_appliance_not_dicom") is not None:
            dul.socket.close()
            return True
        if dul.socket and dul.socket.ready:
            _read_pdu(dul)
            return True
        dul.socket.close()
        return True
    if dul.socket and dul.socket.ready:
        _read_pdu(dul)
        return True
    return False


def _read_pdu(dul: Any) -> None:
    """``DULServiceProvider._read_pdu_data``, step for step, except that a P-DATA-TF received
    while the association is established goes first to the association's direct C-STORE
    receiver (``pdata.StoreReceiver``), if it has one, and to pynetdicom only if that leaves it;
    and that a PDU type that does not exist ends the reading (:func:`_not_dicom`)."""
    receiver = dul.__dict__.get("_appliance_receiver")
    try:
        header = dul.socket.recv(6)
    except (OSError, TimeoutError) as exc:  # a peer that reset the connection, the network timeout
        _dul_log.info("Connection closed before the entire PDU was received: %s", exc)
        dul.event_queue.put("Evt17")
        return
    try:
        pdu_type, _, pdu_length = struct.unpack(">BBL", header)
    except struct.error:
        dul.event_queue.put("Evt17")
        return
    if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07) or (pdu_type in _FOUR_BYTE_PDUS and pdu_length != 4):
        _not_dicom(dul, bytes(header))
        dul.event_queue.put("Evt19")
        return
    body: bytes | bytearray
    try:
        if pdu_type == 0x04 and dul.state_machine.current_state == "Sta6":
            local = dul.assoc.acceptor if dul.assoc.is_acceptor else dul.assoc.requestor
            limit = local.maximum_length or 0  # 0: this side announced no limit
            if receiver is not None and pdu_length > _STREAM_ABOVE:
                streamed = _stream_pdata(dul, receiver, pdu_length, limit)
                if streamed is None:
                    if not dul.assoc.dimse.msg_queue.empty():
                        _assoc_wakeup(dul.assoc).set()  # as below
                    return
                body = streamed
            else:
                body = _recv_body(dul, pdu_length)
        else:
            body = _recv_body(dul, pdu_length)
    except (OSError, TimeoutError) as exc:
        _dul_log.info("Connection closed before the entire PDU was received: %s", exc)
        dul.event_queue.put("Evt17")
        return
    except ProtocolError as exc:
        peer = dul.assoc.requestor if dul.assoc.is_acceptor else dul.assoc.acceptor
        log.error("aborting the association with %s: %s", peer.address, exc)
        if receiver is not None:
            receiver.discard()
        dul._appliance_not_dicom = f"a P-DATA-TF that was refused: {exc}"  # the rest is not read
        dul.event_queue.put("Evt19")
        return
    if len(body) != pdu_length:
        _dul_log.error(f"The received PDU is shorter than expected ({6 + len(body)} of "
                       f"{6 + pdu_length} bytes received)")
        dul.event_queue.put("Evt17")
        return
    if (receiver is not None and pdu_type == 0x04 and dul.state_machine.current_state == "Sta6"
            and receiver.take(memoryview(body))):
        if not dul.assoc.dimse.msg_queue.empty():
            # A response decoded directly (pdata) and queued without a state-machine action:
            # a sender waits for it on the queue itself, but one nobody waits for is the
            # association loop's to take, as it takes what pynetdicom queues.
            _assoc_wakeup(dul.assoc).set()
        return
    if pdu_type == 0x03:
        body = _readable_rejection(dul, body)
    try:
        pdu, event = dul._decode_pdu(bytes(header) + bytes(body))
        dul.event_queue.put(event)
    except Exception as exc:  # noqa: BLE001 - as pynetdicom: an undecodable PDU is Evt19
        _dul_log.error("Unable to decode the received PDU data")
        _dul_log.exception(exc)
        dul.event_queue.put("Evt19")
        return
    dul._recv_pdu.put(pdu)


# A P-DATA-TF longer than this, to a direct C-STORE receiver, is read a PDV and a piece at a
# time (:func:`_stream_pdata`). Shorter ones are read whole: storescu's are 16 or 128 KiB, and
# one read into one buffer is the cheapest way in.
_STREAM_ABOVE = 1 << 20
_STREAM_PIECE = 1 << 20
# A command set is a few hundred bytes; a first PDV longer than this is not read as one.
_COMMAND_LIMIT = 1 << 16
_PDV_HEADER = struct.Struct(">IBB")
# A PDU length comes from the peer: never allocate more than this up front on its word alone.
PREALLOCATE_LIMIT = 16 * 2**20


def _fill(dul: Any, view: memoryview) -> int:
    """Fill ``view`` from the association's socket; how many bytes came (fewer only when the
    peer closed). Each piece that arrives restarts the network timeout, which limits a pause,
    not a PDU: a sender on a slow link takes minutes over one 4 MiB PDU, its data flowing all
    the while. A read that waits the whole timeout for nothing fails (the socket's timeout)."""
    raw, timer = dul.socket.socket, dul._idle_timer
    received, size = 0, len(view)
    while received < size:
        count = raw.recv_into(view[received:], size - received)
        if not count:
            break
        received += count
        timer.restart()
    return received


def _recv_body(dul: Any, size: int) -> bytearray:
    """The next ``size`` bytes (fewer only when the peer closed), in one buffer."""
    if size <= PREALLOCATE_LIMIT:
        buffer = bytearray(size)
        received = _fill(dul, memoryview(buffer))
        return buffer if received == size else buffer[:received]
    buffer = bytearray()  # grown only as the data really arrives
    while len(buffer) < size:
        piece = bytearray(min(PREALLOCATE_LIMIT, size - len(buffer)))
        received = _fill(dul, memoryview(piece))
        buffer += piece[:received]
        if received < len(piece):
            break
    return buffer


class _Cut(OSError):
    """The connection ended inside a PDU."""


def _recv_exact(dul: Any, size: int) -> bytearray:
    body = _recv_body(dul, size)
    if len(body) != size:
        raise _Cut(f"connection closed {size - len(body)} bytes short of the end of a PDV")
    return body


def _too_long(pdu_length: int, limit: int) -> str:
    # PS3.8 9.3.5, D.1: a peer may not send more than the other side announced. A PDU of over
    # _STREAM_ABOVE that does, and is no C-STORE's data set (written into its file as it
    # arrives, whatever its PDUs' length), would be held whole in memory: refused, as DCMTK
    # refuses it. One under _STREAM_ABOVE costs no more than a megabyte, and is taken.
    return f"a P-DATA-TF PDU of {pdu_length} bytes, above the {limit} this side announced as its maximum"


def _stream_pdata(dul: Any, receiver: Any, pdu_length: int, limit: int) -> bytearray | None:
    """Read a P-DATA-TF of more than :data:`_STREAM_ABOVE` bytes a PDV, and a megabyte, at a
    time: the data set fragments of a C-STORE-RQ go into its file as they arrive, so that an
    instance sent in one PDU — to a box whose ``node.max_pdu`` is 0 (no limit), or by a peer
    that ignores the limit — never sits in memory. Returns the PDU's body when it is no
    C-STORE's (read whole, and handled as any other PDU); None when it was handled here.
    Raises ``pdata.ProtocolError`` for a PDV that does not fit, ``OSError`` when the
    connection ends inside it."""
    remaining = pdu_length
    piece = bytearray(_STREAM_PIECE)
    first = receiver.incoming is None
    while remaining:
        if remaining < 6:
            raise ProtocolError(f"PDV item header cut off ({remaining} bytes left)")
        item = _recv_exact(dul, 6)
        remaining -= 6
        length, context_id, control = _PDV_HEADER.unpack(item)
        if length < 2 or length - 2 > remaining:
            raise ProtocolError(f"PDV item length {length} does not fit the PDU")
        size = length - 2
        if first:
            first = False
            if not control & COMMAND or size > _COMMAND_LIMIT:
                if limit and pdu_length > limit:
                    raise ProtocolError(_too_long(pdu_length, limit))
                return item + _recv_body(dul, remaining)  # pynetdicom's
            fragment = _recv_exact(dul, size)
            remaining -= size
            alone = (lambda: True) if remaining == 0 else (lambda: False)
            if not receiver.begin(context_id, control, memoryview(fragment), alone):
                if limit and pdu_length > limit:
                    raise ProtocolError(_too_long(pdu_length, limit))
                return item + fragment + _recv_body(dul, remaining)
            if receiver.incoming is None:  # a response taken (alone in its PDU), or an abort begun
                if remaining:
                    dul._appliance_not_dicom = "a P-DATA-TF that was aborted"
                return None
            continue
        taking = receiver.incoming is not None
        if taking:
            receiver.check_fragment(context_id, control)
        else:  # pynetdicom, too, drops what follows a finished message in the same PDU
            log.warning("ignored a PDV that follows the end of a C-STORE request in the same PDU")
        while size:
            view = memoryview(piece)[:min(size, _STREAM_PIECE)]
            if _fill(dul, view) != len(view):
                raise _Cut("connection closed inside a data set fragment")
            size -= len(view)
            remaining -= len(view)
            if taking:
                receiver.write(view)
            del view
        if taking and control & LAST:
            receiver.finish()
    return None


def _readable_rejection(dul: Any, body: bytes | bytearray) -> bytes | bytearray:
    """An A-ASSOCIATE-RJ's body (reserved, result, source, reason) with values PS3.8 9.3.4 does
    not define replaced by ones it does: pynetdicom's state machine raised on them, in the DUL
    thread, which died with a traceback on stderr instead of reporting a rejection. An unknown
    result is taken as "for now" (so the destination is tried again, never dead-lettered on a
    guess), an unknown source as the peer's application, an unknown reason as none given."""
    _, result, source, reason = bytes(body)
    readable = (result if result in (1, 2) else 2, source if source in (1, 2, 3) else 1,
                reason if reason in (1, 2, 3, 7) else 1)
    if readable == (result, source, reason):
        return body
    log.warning("%s:%s rejected the association with values PS3.8 does not define (result %d, source %d,"
                " reason %d): read as result %d, source %d, reason %d", dul.assoc.acceptor.address,
                dul.assoc.acceptor.port, result, source, reason, *readable)
    return bytes((0, *readable))


# A-ASSOCIATE-RJ, A-RELEASE-RQ, A-RELEASE-RP and A-ABORT: their length is always 4 (PS3.8 9.3).
# Another length is no such PDU; pynetdicom would wait for that many bytes (up to 4 GiB).
_FOUR_BYTE_PDUS = (0x03, 0x05, 0x06, 0x07)

# A source address that sent what is not DICOM is named in the journal at most this often: a
# load balancer's HTTP health check, or a modality set up for TLS retrying every few seconds,
# must not fill the journal (on an SD card) with the same line.
_NOT_DICOM_LOG_EVERY = 3600.0
_not_dicom_logged: dict[str, float] = {}
_not_dicom_lock = threading.Lock()


def describe_not_dicom(first: bytes, from_client: bool) -> str:
    """What the first bytes a peer sent, which are no DICOM PDU, most likely are;
    ``from_client``: the peer connected to us (else we connected to it, as a PACS)."""
    if first[:1] in (b"\x15", b"\x16") and first[1:2] == b"\x03":  # a TLS alert or handshake record
        return ("a TLS handshake: the sender is set up to use TLS, this port is not" if from_client
                else "TLS: that port expects TLS (set the destination's tls)")
    if first[:4] in (b"GET ", b"POST", b"HEAD", b"PUT ", b"OPTI", b"DELE", b"PATC", b"CONN", b"HTTP"):
        return ("an HTTP request, not DICOM (a web browser, or a health check)" if from_client
                else "HTTP, not DICOM: that is a web port, not the PACS's DICOM port")
    if first[:4] == b"SSH-":
        return "SSH, not DICOM"
    return "bytes that are no DICOM PDU: " + first.hex(" ")


def _not_dicom(dul: Any, header: bytes) -> None:
    """The peer sent a PDU type that does not exist: whatever it speaks, it is not the DICOM
    upper layer, and nothing after these bytes can be framed. pynetdicom went on reading six
    bytes at a time, logging an error and sending an A-ABORT for each — thousands of lines
    for one HTTP request — until the peer closed. Here the state machine answers once (an
    A-ABORT, as PS3.8 asks), then :func:`_transport_event` closes the connection. What it was
    is kept on the DUL for :func:`dicomnet.why_not_associated` (our side requested the
    association) or logged, once an hour per source address (a peer connected to us)."""
    if dul.__dict__.get("_appliance_not_dicom") is not None:
        return
    assoc = dul.assoc
    what = dul._appliance_not_dicom = describe_not_dicom(header, from_client=assoc.is_acceptor)
    if not assoc.is_acceptor:
        return
    address = str(assoc.requestor.address)
    now = time.monotonic()
    with _not_dicom_lock:
        last = _not_dicom_logged.get(address)
        if last is not None and now - last < _NOT_DICOM_LOG_EVERY:
            return
        if len(_not_dicom_logged) >= 1000:
            _not_dicom_logged.clear()
        _not_dicom_logged[address] = now
    log.warning("connection from %s:%s closed: it sent %s (said at most once an hour for this address)",
                address, assoc.requestor.port, what)


def _assoc_run_reactor(self: Any) -> None:
    """``Association._run_reactor`` with the 1 ms sleep replaced by waiting for the DUL.

    pynetdicom's ``send_*()`` and ``release()`` (our SCU side) clear ``_reactor_checkpoint``,
    wait until ``_is_paused`` reads True, then use the DIMSE queues themselves. So
    ``_is_paused`` is True only where this loop will look at the checkpoint again before it
    touches anything — while it waits idle, or for the checkpoint — and is reset *before* the
    checkpoint is read, so a stale True can never let the user and this loop both take a
    response off the queue."""
    self._is_paused = False
    wakeup = _assoc_wakeup(self)
    while not self._kill:
        self._is_paused = False
        if not self._reactor_checkpoint.is_set():
            self._is_paused = True
            self._reactor_checkpoint.wait()
            continue

        context_id, msg = self.dimse.get_msg(block=False)
        if msg:
            self._serve_request(msg, context_id)

        if self.is_established and self.acse.is_release_requested():
            # Marked released before the A-RELEASE-RP goes: a requestor that associates again
            # the moment it has the answer must find this one no longer counted as active
            # (dicomnet's AE counts only associations that have not ended).
            self.is_released = True
            self.is_established = False
            self.acse.send_release(is_response=True)
            _assoc_log.info("Association Released")
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

        if not self.dul.is_alive() or self.dul.__dict__.get("_appliance_ended"):
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

        self._is_paused = True  # idle: nothing is touched before the checkpoint is read again
        if self.dimse.msg_queue.empty():
            timeout, by_backstop = _BACKSTOP, True
            idle_timer = self.dul._idle_timer
            if _running(idle_timer):
                remaining = max(0.0, idle_timer.remaining)
                if remaining < timeout:
                    timeout, by_backstop = remaining, False
            if not wakeup.wait(timeout) and by_backstop:
                pending = _assoc_pending(self)
                if pending and not wakeup.is_set():  # (a signal since the wait timed out is not missed)
                    _missed("association", pending)
        wakeup.clear()


def _assoc_pending(assoc: Any) -> str:
    """What the association loop would act on now, or ''."""
    if assoc._kill:
        return "its stop flag set"
    if not assoc._reactor_checkpoint.is_set():
        return ""  # paused: a sender takes what comes
    if not assoc.dimse.msg_queue.empty():
        return "a DIMSE message queued"
    head = assoc.dul.peek_next_pdu()
    if isinstance(head, (A_ABORT, A_P_ABORT)) or (isinstance(head, A_RELEASE) and head.result is None):
        return "a release or abort from the peer"
    if not assoc.dul.is_alive() or assoc.dul.__dict__.get("_appliance_ended"):
        return "its DUL thread ended"
    return ""


def _assoc_thread(self: Any) -> None:
    """``Association.run_reactor``, the association thread's body: pynetdicom's, then a wakeup
    for the DUL. Leaving, pynetdicom's acceptor closes the connection — while the DUL may still
    wait on it, if the association loop ended on a kill() from another thread — and a socket
    closed by another thread is no event for select() until the connection changes state."""
    try:
        _original_assoc_thread(self)
    finally:
        wakeup = self.dul.__dict__.get("_appliance_wakeup")  # none if the DUL never ran
        if wakeup is not None:
            wakeup.signal()


def _assoc_kill(self: Any) -> None:
    """``Association.kill``: as pynetdicom's, but wakes the association loop to see the flag."""
    self._reactor_checkpoint.set()
    self._kill = True
    self.is_established = False
    self._is_paused = True
    _assoc_wakeup(self).set()
    while self.dul.is_alive() and not self.dul.stop_dul():
        time.sleep(0.01)

