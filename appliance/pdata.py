"""C-STORE messages moved between the socket and a file by the association's DUL thread
itself, without pynetdicom's per-PDU primitives, state-machine events and DIMSE queues.

pynetdicom turns every P-DATA-TF PDU into a PDU object and a primitive (copying each
fragment twice), runs it through the state machine, decodes the command set into a pydicom
data set, and hands the finished message to the association thread through a queue; the
response comes back to the DUL thread through another. For a CT slice that is about a third
of the receiver's CPU, and two thread hand-offs on the path of every acknowledgement. For the
one message that carries the appliance's traffic — a C-STORE — this module does the same
work directly, in the DUL thread (``reactor.py`` calls it):

* **receiving** (:class:`StoreReceiver`, our Storage SCP): a P-DATA-TF that starts a
  C-STORE-RQ has its command set decoded here and its data set fragments written straight
  from the receive buffer into a :class:`hotpath.ReceivedFile`; when the last fragment is in,
  pynetdicom's own ``StorageServiceClass.SCP`` runs the bound ``EVT_C_STORE`` handler and
  answers (same statuses, same response). Anything else — another command, a command set
  split over several PDVs, a request pynetdicom is already assembling — is left to pynetdicom,
  which then sees exactly the PDU it would have seen.

* **responses** (our forwarder, a Storage SCU): a P-DATA-TF holding exactly one plain
  C-STORE-RSP (status, IDs; no error comment or offending element) becomes the response
  primitive here and goes straight onto the DIMSE queue that ``send_c_store`` waits on — what
  pynetdicom would put there, without decoding the command set into a pydicom data set first.

Sending the other way (our forwarder's C-STORE-RQ from a cached file) is
``hotpath.FileMessage``.

The DICOM rules followed are PS3.8 9.3.5 (P-DATA-TF: a list of PDV items, each a 4-byte
length, a presentation context ID and a message control header) and PS3.7 6.3.1 / E.1
(command sets: Implicit VR Little Endian, group 0000).

Nothing here is used when handlers are bound to the events that report PDUs or DIMSE messages
(``EVT_DATA_RECV``, ``EVT_PDU_RECV``, ``EVT_DIMSE_RECV`` — pynetdicom's debug narration binds
them): those associations keep pynetdicom's path, so the narration stays complete.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass

from .hotpath import COMMAND, LAST, FileMeta, ReceivedFile, StoreChain, start_received_file

log = logging.getLogger(__name__)

# Events whose handlers expect to see every PDU or DIMSE message of the association.
_REPORTING_EVENTS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV, evt.EVT_DIMSE_RECV)

_C_STORE_RQ = 0x0001
_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
# The elements of a C-STORE-RSP taken here (PS3.7 9.3.1.2): group length, Affected SOP Class,
# Command Field, Message ID Being Responded To, Command Data Set Type, Status, Affected SOP
# Instance. One with anything more (an error comment, an offending element) is pynetdicom's.
_PLAIN_RSP = frozenset((0x0000, 0x0002, 0x0100, 0x0120, 0x0800, 0x0900, 0x1000))


class ProtocolError(ValueError):
    """The peer broke the upper layer's framing: the association must be aborted."""


def iter_pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """The PDV items of a P-DATA-TF PDU's body (after its 6-byte header), as
    (presentation context ID, message control header, fragment) — views, not copies."""
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < 6:
            raise ProtocolError(f"PDV item header cut off ({end - offset} bytes left)")
        (length,) = struct.unpack_from(">I", body, offset)
        if length < 2 or offset + 4 + length > end:
            raise ProtocolError(f"PDV item length {length} does not fit the PDU")
        yield body[offset + 4], body[offset + 5], body[offset + 6:offset + 4 + length]
        offset += 4 + length


def decode_command(raw: memoryview | bytes) -> dict[int, bytes]:
    """A command set (Implicit VR Little Endian, group 0000) as {element number: value}."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(raw)
    while offset < end:
        if end - offset < 8:
            raise ValueError("command element header cut off")
        group, element, length = struct.unpack_from("<HHI", raw, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise ValueError(f"not a command element: ({group:04X},{element:04X}) of length {length}")
        elements[element] = bytes(raw[offset:offset + length])
        offset += length
    return elements


def _us(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    return struct.unpack("<H", value)[0] if value is not None and len(value) == 2 else None


def _text(elements: dict[int, bytes], element: int) -> str | None:
    value = elements.get(element)
    return value.decode("ascii").rstrip("\x00 ") if value is not None else None


def c_store_request(elements: dict[int, bytes]) -> C_STORE | None:
    """The C-STORE-RQ primitive a command set describes, or None if it is not a complete one."""
    if _us(elements, 0x0100) != _C_STORE_RQ or _us(elements, 0x0800) in (None, _NO_DATA_SET):
        return None
    message_id, priority = _us(elements, 0x0110), _us(elements, 0x0700)
    sop_class, sop_instance = _text(elements, 0x0002), _text(elements, 0x1000)
    if message_id is None or not sop_class or not sop_instance:
        return None
    if priority is None:  # required, but what it says changes nothing here: taken as MEDIUM
        priority = 0x0000
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = priority
    if 0x1030 in elements:
        request.MoveOriginatorApplicationEntityTitle = _text(elements, 0x1030)
    if 0x1031 in elements:
        request.MoveOriginatorMessageID = _us(elements, 0x1031)
    return request


def c_store_response(elements: dict[int, bytes]) -> C_STORE | None:
    """The C-STORE-RSP primitive a plain response's command set describes, or None."""
    if (_us(elements, 0x0100) != _C_STORE_RSP or _us(elements, 0x0800) != _NO_DATA_SET
            or not elements.keys() <= _PLAIN_RSP):
        return None
    responding_to, status = _us(elements, 0x0120), _us(elements, 0x0900)
    if responding_to is None or status is None:
        return None
    response = C_STORE()
    response.MessageIDBeingRespondedTo = responding_to
    response.Status = status
    if 0x0002 in elements:
        response.AffectedSOPClassUID = _text(elements, 0x0002)
    if 0x1000 in elements:
        response.AffectedSOPInstanceUID = _text(elements, 0x1000)
    return response


class _Incoming:
    """A C-STORE-RQ whose data set is still arriving."""

    def __init__(self, context_id: int, context: Any, request: C_STORE, received: ReceivedFile) -> None:
        self.context_id = context_id
        self.context = context
        self.request = request
        self.received = received


# How long the DUL thread waits for the association's thread to mark an accepted association
# established (it sends the A-ASSOCIATE-AC, runs the EVT_ACCEPTED handlers, then sets the flag).
_ESTABLISHED_WAIT = 5.0


def _wait_established(assoc: Any) -> None:
    """Wait until the association's thread has marked it established. This thread can take a
    whole C-STORE — a small one, or one refused at once — between the A-ASSOCIATE-AC going out
    and that mark; pynetdicom's Storage SCP then takes the association for one aborted or
    released and drops the response, and the sender waits for it until its timeout (seen in
    1-3 of 300 associations whose one C-STORE was refused for want of room). That thread waits
    on nothing of this one's meanwhile."""
    if assoc.is_established:
        return
    deadline = time.monotonic() + _ESTABLISHED_WAIT
    while (not assoc.is_established and not assoc.is_aborted and not assoc.is_released and not assoc._kill
           and time.monotonic() < deadline):
        time.sleep(0.0005)


class StoreReceiver:
    """The direct receive path of one association (see the module docstring): C-STORE-RQs
    for our Storage SCP, C-STORE-RSPs for our forwarder. :meth:`take` is called by the DUL
    thread with each P-DATA-TF received while the association is established."""

    def __init__(self, assoc: Any) -> None:
        self.assoc = assoc
        self.incoming: _Incoming | None = None
        self.chain: StoreChain | None = None  # our SCU's C-STOREs sent back to back (hotpath)

    @staticmethod
    def attach(assoc: Any) -> bool:
        """Give ``assoc`` a direct receive path, unless it reports its PDUs or messages."""
        if any(assoc.get_handlers(event) for event in _REPORTING_EVENTS):
            return False
        assoc.dul._appliance_receiver = StoreReceiver(assoc)
        return True

    def take(self, body: memoryview) -> bool:
        """Handle one P-DATA-TF PDU body; False leaves it (all of it) to pynetdicom."""
        if self.incoming is None:
            try:
                pdvs = iter_pdvs(body)
                context_id, control, fragment = next(pdvs)
            except (ValueError, StopIteration):
                return False  # pynetdicom decodes it again, and answers as it does
            if not self.begin(context_id, control, fragment, lambda: next(pdvs, None) is None):
                return False
            if self.incoming is None:  # a response taken, or an abort begun
                return True
            self._fragments(pdvs)
            return True
        self._fragments(iter_pdvs(body))
        return True

    def discard(self) -> bool:
        """Remove the file of a data set still arriving (the association ended). True if any."""
        incoming, self.incoming = self.incoming, None
        if incoming is None:
            return False
        incoming.received.discard()
        return True

    def begin(self, context_id: int, control: int, fragment: memoryview, alone: Callable[[], bool]) -> bool:
        """The first PDV of a P-DATA-TF while no data set is arriving here. True: taken — a
        response, or a C-STORE-RQ whose data set fragments now come here (:attr:`incoming`),
        or an abort begun; False: pynetdicom's, with the whole PDU. ``alone``: whether it is
        the PDU's only PDV (a response is taken only then)."""
        assoc = self.assoc
        if assoc.dimse.message is not None or not assoc.dimse.msg_queue.empty() or assoc._sent_release:
            return False  # pynetdicom is assembling or holds a message, or is releasing: its turn
        try:
            if control != COMMAND | LAST:
                return False
            elements = decode_command(fragment)
            request = c_store_request(elements)
            response = c_store_response(elements) if request is None else None
            alone_ = response is not None and alone()
        except (ValueError, UnicodeDecodeError):
            return False  # pynetdicom decodes it again, and answers as it does
        context = assoc._accepted_cx.get(context_id)
        if context is None:
            return False
        if response is not None and alone_:
            response._context_id = context_id
            chain = self.chain
            if chain is None or not chain.take(response):
                assoc.dimse.msg_queue.put((context_id, response))  # as pynetdicom's receive_primitive does
            return True
        if request is None:
            if _us(elements, 0x0100) == _C_STORE_RQ and _us(elements, 0x0800) not in (None, _NO_DATA_SET):
                # Without these there is no answering it (pynetdicom would leave the sender
                # waiting for a response, or fail in its state machine): abort, as DCMTK does.
                self._abort("a C-STORE request without its Message ID or its Affected SOP Class or Instance UID")
                return True
            return False
        received = start_received_file(FileMeta(
            str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID), context.transfer_syntax[0]))
        request._context_id = context_id
        self.incoming = _Incoming(context_id, context, request, received)
        return True

    def _fragments(self, pdvs: Iterator[tuple[int, int, memoryview]]) -> None:
        """Write data set fragments; serve the request after the last one; abort the
        association if the peer breaks the framing."""
        try:
            self._write_fragments(pdvs)
        except ProtocolError as exc:
            self._abort(str(exc))

    def _write_fragments(self, pdvs: Iterator[tuple[int, int, memoryview]]) -> None:
        for context_id, control, fragment in pdvs:
            if self.incoming is None:
                # pynetdicom, too, drops what follows a finished message in the same PDU
                log.warning("ignored a PDV that follows the end of a C-STORE request in the same PDU")
                return
            self.check_fragment(context_id, control)
            self.write(fragment)
            if control & LAST:
                self.finish()

    def check_fragment(self, context_id: int, control: int) -> None:
        """Raise :class:`ProtocolError` unless a PDV is the next fragment of the data set
        arriving (:attr:`incoming` is set)."""
        incoming = self.incoming
        assert incoming is not None
        if context_id != incoming.context_id or control & COMMAND:
            raise ProtocolError(
                f"expected a data set fragment on context {incoming.context_id}, got a "
                f"{'command' if control & COMMAND else 'data set'} fragment on context {context_id}")

    def write(self, data: memoryview | bytes) -> None:
        """Data set bytes of the request arriving: a fragment, or a piece of one."""
        assert self.incoming is not None
        self.incoming.received.write(data)

    def finish(self) -> None:
        """The last fragment is in: serve the request."""
        incoming, self.incoming = self.incoming, None
        assert incoming is not None
        self._serve(incoming)

    def _serve(self, incoming: _Incoming) -> None:
        """What pynetdicom's association thread does with a finished C-STORE-RQ: run the
        Storage service class (the handler, its status, the response), here in the DUL thread."""
        request, received = incoming.request, incoming.received
        request._dataset_file = received  # type: ignore[assignment]  # pynetdicom types it as its NTF
        request._dataset_path = Path(received.name)
        assoc = self.assoc
        _wait_established(assoc)
        try:
            assoc.dimse.cancel_req = {}
            StorageServiceClass(assoc).SCP(request, incoming.context)
        except Exception:  # noqa: BLE001 - as pynetdicom's association thread: abort on any failure
            log.exception("C-STORE service failed; aborting the association")
            received.discard()
            assoc._abort_nonblocking()
        finally:
            assoc.dimse.cancel_req = {}

    def _abort(self, reason: str) -> None:
        """Abort as pynetdicom does on an invalid PDU (Evt19: A-ABORT from the service provider)."""
        log.error("aborting the association from %s: %s", self.assoc.requestor.address, reason)
        self.discard()
        self.assoc.dul.event_queue.put("Evt19")
