"""The per-instance work of a C-STORE that pynetdicom does generically, done directly: the
command sets of the request (sent from a cached file) and of the response, the received
file's meta, and the file a received data set is streamed into.

pynetdicom builds command sets and file metas as pydicom data sets — an object per element,
validated, then encoded (twice, for the command's group length). That is ~0.5 ms of CPU per
instance on this class of machine, a tenth of the receiver's whole cost for a CT slice, for
~100 bytes whose layout is fixed by the standard:

* a command set: Implicit VR Little Endian, elements in tag order, (0000,0000) holding the
  length of the rest (PS3.7 6.3.1, E.1);
* the file meta: Explicit VR Little Endian, group 0002 with its group length (PS3.10 7.1).

:func:`install` puts them where pynetdicom calls its own; anything they do not cover (an
error comment or offending element, a C-MOVE originator, a data set in memory rather than in
a file, a peer PDU limit too small for one fragment, handlers bound to the sent message) goes
the original way. The output is byte-for-byte what pynetdicom would send or write
(tests/test_hotpath.py).

pynetdicom's chunked send (``send_c_store`` of a file's path) reads the file into a primitive
per PDU, each of which crosses a queue and the state machine and is copied three times on its
way to the socket. :class:`FileMessage` queues the whole message as one item instead, and the
DUL thread (``reactor.py``) writes its PDUs from the file into one buffer and onto the socket,
a megabyte per system call: the same bytes on the wire.

pynetdicom's chunked receive streams each data set into a ``NamedTemporaryFile``: a buffered,
wrapped file with a random name, flushed after every fragment, which the receiver then reads
back to hash. :class:`ReceivedFile` takes its place: unbuffered writes, a SHA-256 kept as the
bytes go through (no second pass over the file), and a file that removes itself if it is
dropped while still in ``incoming/`` — the instance of an association aborted mid-transfer,
which would otherwise stay there until the next start.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import logging
import math
import os
import queue
import socket
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, NamedTuple

import pynetdicom
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, dimse, dimse_messages, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

# The pynetdicom releases whose internals these stand in for (as in reactor.py).
_WRITTEN_FOR = ("3.0.",)

_installed = False

COMMAND = 0x01  # PDV message control header: a command (not data set) fragment
LAST = 0x02  # PDV message control header: the last fragment of the command or data set

# Events whose handlers expect to see every PDU or DIMSE message sent on the association.
_REPORTING_SENT = (evt.EVT_DATA_SENT, evt.EVT_PDU_SENT, evt.EVT_DIMSE_SENT)

# Bytes of PDUs put together per system call when sending from a file.
_SEND_BUFFER = 2**20
# The largest data set a chain sends while the previous outcome is being recorded
# (StoreChain._take). A larger one would hold the record back for its whole transfer —
# longer than the commit it overlaps — and, were the peer to stop reading, indefinitely.
_OVERLAP_MAX = _SEND_BUFFER


def install() -> bool:
    """Route pynetdicom's C-STORE command sets, received-file meta and received files through
    here; ``False`` for a pynetdicom release other than the one these call sites are from."""
    global _installed
    if _installed:
        return True
    if not pynetdicom.__version__.startswith(_WRITTEN_FOR):
        return False
    dimse_messages.create_file_meta = _create_file_meta  # type: ignore[assignment]
    dimse_messages.write_file_meta_info = _write_file_meta_info  # type: ignore[assignment]
    dimse_messages.NamedTemporaryFile = ReceivedFile  # type: ignore[assignment,misc]
    dimse.DIMSEServiceProvider.send_msg = _send_msg  # type: ignore[method-assign]
    _installed = True
    return True


# ---- the file a received data set is streamed into ----------------------------------------------


def _discard(state: list[Any]) -> None:
    """Finalizer of a :class:`ReceivedFile`: close it if still open, remove it if still there."""
    fd, name = state
    if fd >= 0:
        os.close(fd)
        state[0] = -1
    try:
        os.unlink(name)
    except OSError:  # moved into the cache, or already removed by pynetdicom
        pass


class ReceivedFile:
    """Stands in for the ``NamedTemporaryFile(delete=False, mode="wb", suffix=...)`` that
    pynetdicom's chunked receive creates in ``tempfile``'s directory (see the module docstring)."""

    _numbers = itertools.count()

    def __init__(self, delete: bool = False, mode: str = "wb", suffix: str = "", **_: Any) -> None:
        directory = tempfile.gettempdir()
        # Why the file could not be created or written (a full disk: ENOSPC; a failing one: EIO).
        # The data set is still taken to its end, so that its sender gets an answer (0xA700)
        # and the association goes on, instead of the DUL thread failing and aborting it.
        self.failure: OSError | None = None
        fd = -1
        while True:
            name = os.path.join(directory, f"rx-{os.getpid()}-{next(self._numbers)}{suffix}")
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:  # left by an earlier process with the same pid
                continue
            except OSError as exc:
                self.failure = exc
                break
        self.name = name
        self.file = self  # pynetdicom calls ``.file.flush()``
        self.size = 0
        self.dataset_offset: int | None = None  # set once the file meta is written
        self._sha256 = hashlib.sha256()
        self._state: list[Any] = [fd, name if fd >= 0 else ""]
        self._finalizer = weakref.finalize(self, _discard, self._state)

    def write(self, data: bytes | memoryview) -> int:
        if self.failure is None:
            self._sha256.update(data)
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._state[0], view):]
            except OSError as exc:
                self.failure = exc
                self._finalizer()  # close and remove it now: give the space back at once
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""

    def close(self) -> None:
        if self._state[0] >= 0:
            os.close(self._state[0])
            self._state[0] = -1

    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def discard(self) -> None:
        """Close and remove it now (it is never admitted)."""
        self._finalizer()


def discard_partial(assoc: Any) -> bool:
    """Remove the file of a data set still arriving on an association that has ended (aborted,
    or its connection lost mid-instance). True if there was one."""
    direct = assoc.dul.__dict__.get("_appliance_receiver")  # pdata.StoreReceiver
    if direct is not None and direct.discard():
        return True
    message = getattr(assoc.dimse, "message", None)  # pynetdicom keeps only an unfinished message
    received = getattr(message, "_data_set_file", None)
    if isinstance(received, ReceivedFile):
        received.discard()
        return True
    return False


# ---- file meta (PS3.10 7.1) -------------------------------------------------------------------


class FileMeta(NamedTuple):
    """What pynetdicom's chunked receive puts in a received file's meta."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    implementation_uid: str = PYNETDICOM_IMPLEMENTATION_UID
    implementation_version: str = PYNETDICOM_IMPLEMENTATION_VERSION


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":  # 4-byte length form, two reserved bytes
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _sh(text: str) -> bytes:
    raw = text.encode("ascii")
    return raw + b" " if len(raw) % 2 else raw


def encode_file_meta(meta: FileMeta) -> bytes:
    """Group 0002 as pydicom's ``write_file_meta_info`` writes it (no preamble or DICM)."""
    body = b"".join((
        _explicit(0x0002, 0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, 0x0002, b"UI", _ui(meta.sop_class_uid)),
        _explicit(0x0002, 0x0003, b"UI", _ui(meta.sop_instance_uid)),
        _explicit(0x0002, 0x0010, b"UI", _ui(meta.transfer_syntax)),
        _explicit(0x0002, 0x0012, b"UI", _ui(meta.implementation_uid)),
        _explicit(0x0002, 0x0013, b"SH", _sh(meta.implementation_version)),
    ))
    return _explicit(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


def _create_file_meta(*, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> FileMeta:
    return FileMeta(str(sop_class_uid), str(sop_instance_uid), str(transfer_syntax))


def _write_file_meta_info(fp: BinaryIO, file_meta: FileMeta, enforce_standard: bool = True) -> None:
    fp.write(encode_file_meta(file_meta))
    if isinstance(fp, ReceivedFile):
        fp.dataset_offset = fp.size  # the data set starts here


def start_received_file(meta: FileMeta) -> ReceivedFile:
    """A new received file with its preamble and file meta written, as pynetdicom's chunked
    receive starts one; the data set goes after."""
    received = ReceivedFile(suffix=".dcm")
    received.write(b"\x00" * 128 + b"DICM")
    _write_file_meta_info(received, meta)  # type: ignore[arg-type]
    return received


# ---- C-STORE command sets (PS3.7 9.3.1, E.1) ---------------------------------------------


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_c_store_rsp(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP, or None if it needs an element this does not write."""
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    parts = []
    if primitive.AffectedSOPClassUID is not None:
        parts.append(_implicit(0x0002, _ui(primitive.AffectedSOPClassUID)))
    parts.append(_implicit(0x0100, _us(0x8001)))
    parts.append(_implicit(0x0120, _us(int(primitive.MessageIDBeingRespondedTo))))  # type: ignore[arg-type]
    parts.append(_implicit(0x0800, _us(0x0101)))  # no data set
    parts.append(_implicit(0x0900, _us(int(primitive.Status))))  # type: ignore[arg-type]
    if primitive.AffectedSOPInstanceUID is not None:
        parts.append(_implicit(0x1000, _ui(primitive.AffectedSOPInstanceUID)))
    body = b"".join(parts)
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def encode_c_store_rq(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RQ whose data set follows, or None if it names a C-MOVE
    originator (left to pynetdicom)."""
    if primitive.MoveOriginatorApplicationEntityTitle is not None or primitive.MoveOriginatorMessageID is not None:
        return None
    return encode_c_store_rq_fields(int(primitive.MessageID), primitive.AffectedSOPClassUID,  # type: ignore[arg-type]
                                    primitive.AffectedSOPInstanceUID, int(primitive.Priority))  # type: ignore[arg-type]


def encode_c_store_rq_fields(message_id: int, sop_class: str, sop_instance: str, priority: int = 2) -> bytes:
    """The command set of a C-STORE-RQ (medium priority by default, as ``send_c_store``)."""
    body = b"".join((
        _implicit(0x0002, _ui(sop_class)),
        _implicit(0x0100, _us(0x0001)),
        _implicit(0x0110, _us(message_id)),
        _implicit(0x0700, _us(priority)),
        _implicit(0x0800, _us(0x0001)),  # a data set follows
        _implicit(0x1000, _ui(sop_instance)),
    ))
    return _implicit(0x0000, struct.pack("<I", len(body))) + body


def _file_pdvs(path: Any, offset: int, max_pdu: int) -> Iterator[bytes]:
    """A data set streamed from a file, as pynetdicom's chunked send cuts it: PDVs of at most
    ``max_pdu - 6`` bytes (one if 0), all flagged "data, more follows" but the last."""
    with open(path, "rb") as source:
        length = source.seek(0, 2) - source.seek(offset)
        size = length if max_pdu == 0 else max_pdu - 6
        count = 1 if max_pdu == 0 else math.ceil(length / size)
        for _ in range(count - 1):
            yield b"\x00" + source.read(size)
        yield b"\x02" + source.read(size)


# ---- a C-STORE-RQ sent from a file by the DUL thread ------------------------------------------


class FileMessage:
    """A C-STORE-RQ whose data set is read from a file, queued to the DUL as one item. The
    file is opened by the caller, so that removing it afterwards (a temporary copy) is safe;
    the DUL closes it when the message is sent or dropped."""

    def __init__(self, context_id: int, command: bytes, source: io.BufferedReader, length: int,
                 max_pdu: int) -> None:
        self.context_id = context_id
        self.command = command
        self.source = source
        self.length = length  # bytes of data set from the source's current position
        self.max_pdu = max_pdu  # the peer's limit; 0 = none
        self._held = b""  # the end of the message, while send(hold_back=True) keeps it
        # Set when the DUL thread is done with it: sent whole, dropped, failed or abandoned.
        # The wait for its response starts then: a large instance on a slow link may take
        # longer to send than the DIMSE timeout allows the peer to answer.
        self.done = threading.Event()
        self.done_at = 0.0  # time.monotonic() of ``done``

    @staticmethod
    def usable(assoc: Any) -> bool:
        """Whether an association can send this way (nobody watches its PDUs one by one)."""
        return not any(assoc.get_handlers(event) for event in _REPORTING_SENT)

    def send(self, dul: Any, hold_back: bool = False) -> None:
        """Write all its PDUs (DUL thread). On a connection error the DUL gets Evt17, as
        pynetdicom's ``AssociationSocket.send`` gives it; outside the established state the
        message is dropped (the association is ending: the sender gets no response).

        ``hold_back`` keeps the last byte of the last PDU for :meth:`send_rest`: until it goes
        out, the peer has all of the request but cannot act on it."""
        try:
            if dul.state_machine.current_state != "Sta6":
                log.debug("dropped a C-STORE-RQ queued as the association left the established state")
                return
            raw = dul.socket.socket
            raw.sendall(_pdu_header(len(self.command) + 6, self.context_id, COMMAND | LAST) + self.command)
            self._send_data_set(dul, raw, hold_back)
        except OSError as exc:
            self._held = b""
            _connection_lost(dul, exc)
        finally:
            self.source.close()
            if not self._held:
                self._finish()

    def send_rest(self, dul: Any) -> None:
        """Write what :meth:`send` held back (DUL thread); nothing if the send failed."""
        held, self._held = self._held, b""
        try:
            if held:
                dul.socket.socket.sendall(held)
        except OSError as exc:
            _connection_lost(dul, exc)
        finally:
            self._finish()

    def abandon(self, dul: Any) -> None:
        """Never complete a request sent with its last byte held back: the connection is shut
        down, so the peer sees it end mid-PDU (and stores nothing of it), and the DUL sees it
        closed. The association is lost."""
        self._held = b""
        try:
            dul.socket.socket.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            log.debug("shutting down the connection failed: %s", exc)
        finally:
            self._finish()

    def _finish(self) -> None:
        self.done_at = time.monotonic()
        self.done.set()

    def wait_sent(self, assoc: Any) -> None:
        """Wait (sender's thread) until the DUL thread is done with this message, or has ended
        without it. Each write makes progress within the network timeout or fails
        (``dicomnet.tune_socket``), so this ends."""
        while not self.done.wait(1.0):
            if not assoc.dul.is_alive():
                return

    def _send_data_set(self, dul: Any, raw: Any, hold_back: bool = False) -> None:
        """The data set as pynetdicom cuts it (fragments of ``max_pdu - 6`` bytes, one PDV per
        PDU, the last flagged), assembled in one fixed buffer and sent whenever it is full."""
        remaining = self.length
        fragment = max(1, remaining if not self.max_pdu else self.max_pdu - 6)
        pdus = max(1, -(-remaining // fragment))
        buffer = bytearray(min(_SEND_BUFFER, remaining + 12 * pdus))
        view = memoryview(buffer)
        used = 0

        def flush() -> None:
            nonlocal used
            raw.sendall(view[:used])
            used = 0
            dul._idle_timer.restart()  # the peer is taking data: the link is not idle

        for _ in range(pdus):
            size = min(fragment, remaining)
            remaining -= size
            if used + 12 > len(buffer):
                flush()
            control = LAST if remaining == 0 else 0
            struct.pack_into(">BBIIBB", buffer, used, 0x04, 0x00, size + 6, size + 2, self.context_id, control)
            used += 12
            while size:
                if used == len(buffer):
                    flush()
                count = min(size, len(buffer) - used)
                if self.source.readinto(view[used:used + count]) != count:
                    raise OSError(f"the file being sent is shorter than its {self.length} bytes of data set")
                used += count
                size -= count
        if hold_back:
            used -= 1
            self._held = bytes(view[used:used + 1])
        flush()


def _connection_lost(dul: Any, exc: OSError) -> None:
    """A send of a C-STORE-RQ failed: the DUL gets Evt17, as pynetdicom's
    ``AssociationSocket.send`` gives it."""
    log.debug("sending a C-STORE-RQ failed: %s", exc)
    dul.event_queue.put("Evt17")


def data_set_offset(source: BinaryIO) -> int | None:
    """Where the data set of a DICOM file starts, read from its file meta's group length
    (PS3.10 7.1: preamble, ``DICM``, then (0002,0000) UL); None if the file does not start so."""
    head = source.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:140] != b"\x02\x00\x00\x00UL\x04\x00":
        return None
    return 144 + int(struct.unpack_from("<I", head, 140)[0])


class StoreUnsupported(Exception):
    """This C-STORE cannot go the direct way (:func:`store_file`); use ``send_c_store``."""


def _file_store_message(assoc: Any, context_id: int, path: str, sop_class: str, sop_instance: str,
                        message_id: int) -> FileMessage:
    """The C-STORE-RQ of a cached file as one :class:`FileMessage` (its file opened); raises
    :class:`StoreUnsupported` or ``OSError`` as :func:`store_file` documents."""
    command = encode_c_store_rq_fields(message_id, sop_class, sop_instance)
    max_pdu = assoc.dimse.maximum_pdu_size
    if not FileMessage.usable(assoc) or (max_pdu and len(command) > max_pdu - 6):
        raise StoreUnsupported("handlers watch the messages, or the peer's PDU limit is too small")
    source = open(path, "rb")
    try:
        offset = data_set_offset(source)
        if offset is None:
            raise StoreUnsupported(f"{path} does not start with a standard file meta")
        length = source.seek(0, 2) - source.seek(offset)
    except BaseException:
        source.close()
        raise
    return FileMessage(context_id, command, source, length, max_pdu)


def _pause_reactor(assoc: Any) -> None:
    """As pynetdicom's ``send_*()``: the association's own loop must not take the response."""
    if not assoc.is_established:
        raise RuntimeError("the association is not established")
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)


def _valid_response(assoc: Any, response: Any, message_id: int) -> bool:
    """Whether ``response`` answers our C-STORE-RQ ``message_id``. If not, the association is
    aborted (as pynetdicom does) and what was wrong is kept on it for the attempt's record
    (:func:`invalid_response_of`): "no response" would not be true."""
    if (isinstance(response, C_STORE) and response.is_valid_response
            and response.MessageIDBeingRespondedTo == message_id):
        return True
    if isinstance(response, C_STORE):
        status = getattr(response, "Status", None)
        what = (f"a C-STORE response to message {response.MessageIDBeingRespondedTo}"
                f" (status {'none' if status is None else f'0x{int(status):04X}'}), not to ours, {message_id}")
    else:
        what = f"a {type(response).__name__} message, not the C-STORE response to message {message_id}"
    assoc._appliance_invalid_response = f"the peer answered with {what}: association aborted"
    log.error("C-STORE: %s", assoc._appliance_invalid_response)
    assoc.abort()
    return False


def invalid_response_of(assoc: Any) -> str | None:
    """What was wrong with the last response the association's peer sent in place of a
    C-STORE response (:func:`_valid_response`), once; None if nothing."""
    return assoc.__dict__.pop("_appliance_invalid_response", None)


def store_file(assoc: Any, context_id: int, path: str, sop_class: str, sop_instance: str,
               message_id: int) -> C_STORE | None:
    """``Association.send_c_store`` of a cached file whose UIDs are already known (the
    forwarder's database has them): no pydicom read of the file meta, no primitive, the
    response taken as the primitive the DUL thread decoded. The same messages on the wire,
    and the same waiting: the reactor paused, the DIMSE timeout, and on no response
    (timeout, abort, lost connection) pynetdicom's handling and None.

    Raises :class:`StoreUnsupported` when the association's messages are watched by handlers,
    the peer's PDU limit is too small for the command, or the file does not start with a
    standard file meta; ``OSError`` when the file cannot be opened."""
    message = _file_store_message(assoc, context_id, path, sop_class, sop_instance, message_id)
    try:
        _pause_reactor(assoc)
    except RuntimeError:
        message.source.close()
        raise
    try:
        assoc.dul.send_pdu(message)
        message.wait_sent(assoc)
        _, response = assoc.dimse.get_msg(block=True)  # the DIMSE timeout, from the last byte sent
    finally:
        assoc._reactor_checkpoint.set()
    if response is None:
        assoc._handle_no_response()
        return None
    return response if _valid_response(assoc, response, message_id) else None


class ChainItem(NamedTuple):
    """One C-STORE of a :class:`StoreChain`: a cached file and what its request names."""

    context_id: int
    path: str
    sop_class: str
    sop_instance: str


_CHAIN_ENDED = object()  # put on the DIMSE queue by the DUL thread when a chain stops itself


class StoreChain:
    """C-STOREs of cached files sent back to back by the DUL thread.

    :func:`store_file` hands every response from the DUL thread to the waiting sender and every
    request back — two thread switches per instance on the path the next instance waits on.
    A chain sends its first request as store_file does; then the DUL thread, as it decodes
    each response (``pdata``), asks ``delivered(response)`` whether the chain goes on, and if
    so sends the next request but for its last byte, has ``record(index, response)`` record
    the outcome, and only then sends that last byte. The peer receives the next instance while
    the outcome is recorded — which is what the next instance would otherwise wait for — but
    cannot store it before: a crash leaves at most one instance stored and unrecorded, as
    store_file does. (A data set over ``_OVERLAP_MAX`` goes out whole after the record.)

    A response that is not ``delivered`` (a failure status), one pynetdicom decodes (with an
    error comment), no response within the DIMSE timeout, an abort, or a next file that cannot
    be opened ends the chain, and :meth:`run` reports where, for the sender to deal with that
    instance its usual way. So does a ``record`` that raises; the next request, if held back,
    is then abandoned with the association (:meth:`FileMessage.abandon`)."""

    def __init__(self, assoc: Any, items: list[ChainItem], first_message_id: int,
                 delivered: Callable[[C_STORE], bool], record: Callable[[int, C_STORE], None],
                 halted: Callable[[], bool]) -> None:
        self.assoc = assoc
        self.items = items
        self.delivered = delivered
        self.record = record
        self.halted = halted
        self.message_id = first_message_id
        self.index = 0  # the item whose response is awaited
        self.awaited: FileMessage | None = None  # its request; the DIMSE timeout runs from its last byte
        self.next_sent = True  # whether items[index] went out
        self._ended = False
        # Held by the DUL thread while it takes a response, and by the sender when it gives up
        # waiting: a response that comes as the DIMSE timeout expires is either taken (and the
        # wait goes on) or left alone, never recorded by both.
        self._lock = threading.Lock()

    def run(self) -> tuple[int, C_STORE | None, bool]:
        """Send the items; returns (how many were recorded, the response of the next one or
        None, whether that next one was sent). Waits at most the DIMSE timeout for each
        response; on no response, pynetdicom's handling (an abort)."""
        assoc, first = self.assoc, self.items[0]
        message = _file_store_message(assoc, first.context_id, first.path, first.sop_class, first.sop_instance,
                                      self.message_id)
        receiver = getattr(assoc.dul, "_appliance_receiver", None)
        if receiver is None:
            message.source.close()
            raise StoreUnsupported("the association has no direct receive path")
        try:
            _pause_reactor(assoc)
        except RuntimeError:
            message.source.close()
            raise
        receiver.chain = self
        self.awaited = message
        try:
            assoc.dul.send_pdu(message)
            return self._wait()
        finally:
            receiver.chain = None
            self._ended = True
            assoc._reactor_checkpoint.set()

    def _wait(self) -> tuple[int, C_STORE | None, bool]:
        assoc = self.assoc
        while True:
            try:
                _, response = assoc.dimse.msg_queue.get(timeout=self._patience())
            except queue.Empty:
                with self._lock:
                    if self._patience() != 0.0:  # a request still going out, or answered meanwhile
                        continue
                    self._ended = True
                response = None
            if response is _CHAIN_ENDED:
                return self.index, None, self.next_sent
            if response is None:
                assoc._handle_no_response()
                return self.index, None, True
            self._ended = True  # the sender has the instance now: nothing more is taken for it
            if not _valid_response(assoc, response, self.message_id):
                return self.index, None, True
            return self.index, response, True

    def _patience(self) -> float | None:
        """How much longer to wait for the awaited response: the DIMSE timeout counted from the
        last byte of its request (None: no timeout); while the request is still going out, a
        second at a time (its writes are bounded by the network timeout)."""
        timeout = self.assoc.dimse.dimse_timeout
        message = self.awaited
        if message is None or timeout is None:
            return timeout
        if not message.done.is_set():
            return 1.0 if self.assoc.dul.is_alive() else 0.0
        return max(0.0, timeout - (time.monotonic() - message.done_at))

    def take(self, response: C_STORE) -> bool:
        """DUL thread: a decoded C-STORE-RSP. True if the chain dealt with it (recorded, and the
        next request sent or the chain ended); False leaves it to the waiting sender."""
        with self._lock:
            return self._take(response)

    def _take(self, response: C_STORE) -> bool:
        if self._ended or response.MessageIDBeingRespondedTo != self.message_id:
            return False
        try:
            goes_on = self.delivered(response)
        except Exception:  # noqa: BLE001 - the sender deals with the response its usual way
            log.exception("judging a C-STORE response failed in the DUL thread")
            goes_on = False
        if not goes_on:
            self._ended = True
            return False
        following = self._following()
        held = following if following is not None and following.length <= _OVERLAP_MAX else None
        if held is not None:
            held.send(self.assoc.dul, hold_back=True)
        try:
            self.record(self.index, response)
        except BaseException as exc:
            self._ended = True
            if held is not None:
                held.abandon(self.assoc.dul)
            elif following is not None:
                following.source.close()
            if not isinstance(exc, Exception):
                raise
            # the sender records it again, and sees the error itself
            log.exception("recording a C-STORE outcome failed in the DUL thread")
            return False
        self.index += 1
        if following is None:
            self._end(sent=False)
            return True
        self.message_id = self.message_id % 0xFFFF + 1
        self.awaited = following
        if held is not None:
            held.send_rest(self.assoc.dul)
        else:
            following.send(self.assoc.dul)
        return True

    def _following(self) -> FileMessage | None:
        """The request after the one just answered, its file opened; None if the chain ends
        there (the last item, halted, or a file that cannot be sent this way)."""
        index = self.index + 1
        if index == len(self.items) or self.halted():
            return None
        item = self.items[index]
        try:
            return _file_store_message(self.assoc, item.context_id, item.path, item.sop_class,
                                       item.sop_instance, self.message_id % 0xFFFF + 1)
        except (OSError, StoreUnsupported) as exc:
            log.debug("chain ends before %s: %s", item.path, exc)
        except Exception:  # noqa: BLE001 - e.g. a UID that cannot be encoded: the sender sends it its way
            log.exception("preparing the C-STORE of %s failed in the DUL thread", item.path)
        return None

    def _end(self, sent: bool) -> None:
        self._ended = True
        self.next_sent = sent
        self.assoc.dimse.msg_queue.put((None, _CHAIN_ENDED))


def _pdu_header(length: int, context_id: int, control: int) -> bytes:
    """A P-DATA-TF PDU header and its one PDV item's header, for ``length - 6`` bytes of fragment."""
    return struct.pack(">BBIIBB", 0x04, 0x00, length, length - 4, context_id, control)


_original_send_msg = dimse.DIMSEServiceProvider.send_msg


def _send_msg(self: Any, primitive: Any, context_id: int) -> None:
    """``DIMSEServiceProvider.send_msg``: a C-STORE-RSP, or a C-STORE-RQ sent from a file
    (pynetdicom's chunked send, as the forwarder uses it), goes out with its command set
    encoded here — the latter as one :class:`FileMessage` when nobody watches its PDUs;
    anything else goes pynetdicom's way."""
    if isinstance(primitive, C_STORE) and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT):
        dataset = None
        if primitive.MessageIDBeingRespondedTo is not None:
            command = encode_c_store_rsp(primitive)
        else:
            dataset = getattr(primitive, "_dataset_path", None)
            command = encode_c_store_rq(primitive) if dataset is not None else None
        max_pdu = self.maximum_pdu_size
        if command is not None and (not max_pdu or len(command) <= max_pdu - 6):
            if dataset is not None and FileMessage.usable(self.assoc):
                source = open(dataset[0], "rb")  # closed by FileMessage.send, in the DUL thread
                length = source.seek(0, 2) - source.seek(dataset[1])
                message = FileMessage(context_id, command, source, length, max_pdu)
                self.dul.send_pdu(message)
                message.wait_sent(self.assoc)  # send_c_store's DIMSE timeout then runs from the last byte
                return
            pdvs = _file_pdvs(dataset[0], dataset[1], max_pdu) if dataset is not None else iter(())
            for pdv in itertools.chain((b"\x03" + command,), pdvs):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, pdv))
                self.dul.send_pdu(pdata)
            return
    _original_send_msg(self, primitive, context_id)
