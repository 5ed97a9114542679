"""pynetdicom as every part of the appliance uses it: :func:`application_entity` makes the AE
(with pynetdicom's loops made event-driven, see ``reactor.py``), and the handlers below tune
each association's socket, in both directions (our SCPs and our SCUs).

Bound as an ``EVT_CONN_OPEN`` handler, :func:`tune_socket` changes only the one association's
socket, never pynetdicom's classes:

* ``TCP_NODELAY``: pynetdicom never sets it, and against DCMTK-based peers (DCMTK itself,
  Orthanc) every DIMSE exchange then waits ~40 ms on Nagle and delayed ACKs (measured: 45 vs
  204 CT instances/s into storescp).
* a receive that fills one buffer with ``recv_into`` instead of pynetdicom's loop of 4 KiB
  ``recv()`` calls and bytearray appends: on this CPU-bound path it is worth ~15 % of
  receive throughput for CT-sized instances with large PDUs.

:func:`throttle_sends` (also on EVT_CONN_OPEN, for our SCUs) bounds how many PDUs wait to be
sent, so streaming a large file to a slow peer keeps memory flat.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
import time
import types
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.transport import AddressInformation, AssociationSocket

from . import hotpath, reactor


def application_entity(ae_title: str) -> AE:
    """A pynetdicom AE, in a process whose association loops wait on events (``reactor.py``)
    and whose C-STORE responses and received-file metas are encoded directly (``hotpath.py``).

    pynetdicom binds its "standard" logging handlers to every association unless told not to;
    they format a narrative of every PDU and DIMSE message (a fair share of the receive path's
    CPU) even when its logger discards them. They are bound only when that narrative is
    actually logged (``logging.level: debug``)."""
    reactor.install()
    hotpath.install()
    narrated = logging.getLogger("pynetdicom").isEnabledFor(logging.INFO)
    _config.LOG_HANDLER_LEVEL = "standard" if narrated else "none"
    return _ApplicationEntity(ae_title=ae_title)


class _ApplicationEntity(AE):
    """An AE whose outgoing associations remember why their connection failed, and whose
    association limit counts only associations that have not ended."""

    @property
    def active_associations(self) -> list[Association]:
        # pynetdicom counts every Association thread still alive against maximum_associations,
        # one released a moment ago while it closes its socket too: a modality or a print
        # console that associates again at once near the limit was refused.
        return [assoc for assoc in super().active_associations
                if not (assoc.is_released or assoc.is_aborted or assoc.is_rejected)]

    def _create_socket(self, assoc: Association, address: AddressInformation,
                       tls_args: tuple[ssl.SSLContext, str] | None) -> AssociationSocket:
        sock = _AssociationSocket(assoc, address=address)
        sock.tls_args = tls_args
        return sock


class _KeepsConnectError:
    """Mixed into a socket class: its ``connect`` keeps the error it failed with (a TLS one's, a
    failed handshake too), and whether it connected."""

    connect_error: OSError | None = None
    connected = False

    def connect(self, address: Any) -> None:
        try:
            super().connect(address)  # type: ignore[misc]
        except OSError as exc:
            self.connect_error = exc
            raise
        self.connected = True


class _TellingSocket(_KeepsConnectError, socket.socket):
    """A TCP socket that keeps why its connect failed."""


class TellingTLSSocket(_KeepsConnectError, ssl.SSLSocket):
    """The same for TLS, as an ``SSLContext.sslsocket_class``."""


_RawSocket = socket.socket  # the module, not the property below, in the class's annotations


class _AssociationSocket(AssociationSocket):
    """pynetdicom's requestor socket, keeping the last socket it used. pynetdicom logs why a
    connection failed and drops both the error and the socket; "refused" or "timed out" is what
    tells an admin whether the PACS or the link to it is down."""

    last_socket: _RawSocket | None = None

    @property  # type: ignore[override]
    def socket(self) -> _RawSocket | None:
        return self._socket

    @socket.setter
    def socket(self, value: _RawSocket | None) -> None:
        self._socket = value
        if value is not None:
            self.last_socket = value

    def _create_socket(self, address: AddressInformation) -> _RawSocket:
        # pynetdicom's own, but of the class that remembers its connect's error.
        family = socket.AF_INET if address.is_ipv4 else socket.AF_INET6
        sock = _TellingSocket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.assoc.network_timeout is not None:
            sock.settimeout(self.assoc.network_timeout)
        sock.bind(address.as_tuple)
        self._is_connected = False
        return sock


def rejection(assoc: Association) -> Any | None:
    """The peer's A-ASSOCIATE-RJ (pynetdicom's primitive), or None. Also one that pynetdicom
    left unread: when the peer rejects and closes at once (DCMTK does), the DUL thread may take
    the rejection and the close before the requesting thread looks, which then finds the
    socket closed and aborts as if the connection had failed; the rejection stays queued."""
    if assoc.is_rejected:
        return assoc.acceptor.primitive
    for item in list(assoc.dul.to_user_queue.queue):
        if isinstance(item, A_ASSOCIATE) and getattr(item, "result", None) in (0x01, 0x02):
            return item
    return None


def why_not_associated(assoc: Association, where: str, timeout: float | None) -> str:
    """Why an association we requested was neither established nor rejected, for an admin:
    the connection refused, unanswered (``timeout``: the connection timeout), failed otherwise,
    or made and then closed or left unanswered by the peer."""
    sock = assoc.dul.socket
    last = sock.last_socket if isinstance(sock, _AssociationSocket) else None
    error = getattr(last, "connect_error", None)
    connected = bool(getattr(last, "connected", False))
    if isinstance(error, ConnectionRefusedError):
        return f"connection to {where} refused: nothing listens on that port (the PACS is not running?)"
    if isinstance(error, (TimeoutError, socket.timeout)):
        return (f"no answer from {where} within {timeout:g} s: the host is down or cannot be reached"
                " (the VPN or a firewall)" if timeout else f"no answer from {where}")
    if isinstance(error, ssl.SSLError):
        return f"TLS with {where} failed: {error.reason or error}"
    if isinstance(error, OSError):
        text = error.strerror or errno.errorcode.get(error.errno or 0) or str(error)
        return f"cannot connect to {where}: {text}"
    not_dicom = assoc.dul.__dict__.get("_appliance_not_dicom")
    if not_dicom is not None:
        return f"connected to {where}, but it answered with {not_dicom}"
    if connected:
        return (f"connected to {where}, but no association: the peer closed the connection or did not"
                " answer the request in time (is it a DICOM service?)")
    return f"no association with {where} (refused, timed out or aborted)"


def _recv_exactly(self: Any, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with the same contract (blocking; short only when the peer
    closed), reading straight into one preallocated buffer."""
    if nr_bytes > reactor.PREALLOCATE_LIMIT:  # let the buffer grow only as data really arrives
        return bytearray(AssociationSocket.recv(self, nr_bytes))
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        count = self.socket.recv_into(view[received:], nr_bytes - received)
        if not count:
            del view
            return buffer[:received]
        received += count
    return buffer


# Bytes of PDUs an association may have waiting to be sent. pynetdicom's chunked send reads
# the file into PDUs as fast as it can and queues them without limit, so a 500 MB instance to
# a slow peer would sit in memory. A CT slice fits well under the bound, so the common case
# never waits.
_SEND_QUEUE_BYTES = 4 * 2**20


def _send_pdu_when_room(self: Any, primitive: Any) -> None:
    """``DULServiceProvider.send_pdu`` that waits while the send queue is full, as long as the
    DUL thread is alive to drain it (a dead link must not block the sender forever)."""
    queue = self.to_provider_queue
    peer_pdu = self.assoc.acceptor.maximum_length or _SEND_QUEUE_BYTES  # 0: the peer set no limit
    limit = max(4, _SEND_QUEUE_BYTES // max(peer_pdu, 4096))
    while queue.qsize() >= limit and self.is_alive() and not self._kill_thread:
        time.sleep(0.002)
    DULServiceProvider.send_pdu(self, primitive)


def throttle_sends(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for our SCUs: bound the memory of a large C-STORE (see above)."""
    dul = event.assoc.dul
    dul.send_pdu = types.MethodType(_send_pdu_when_room, dul)  # type: ignore[method-assign]


def tune_socket(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY, a send timeout and the one-buffer receive on this
    association."""
    assoc_socket = event.assoc.dul.socket
    raw = assoc_socket.socket if assoc_socket is not None else None
    if raw is None:
        return
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    timeout = event.assoc.network_timeout
    if timeout and raw.gettimeout() is None:
        # pynetdicom leaves a requestor's socket blocking without a timeout. A peer that stops
        # reading — a hung PACS whose TCP stack still answers — would then hold a send, the
        # association's thread and its worker for as long as the stall lasts: for ever; and
        # one that stops in the middle of a PDU it sends (the rest lost as a VPN drops) would
        # hold the read of that PDU so, and the abort that the ACSE or DIMSE timeout then
        # asks for waits on that thread. With these, a write or a read that makes no progress
        # for the network timeout fails, and the association ends as on any broken
        # connection (the instance: delivery unknown). A read is only made once the socket
        # is readable, so an association idle between batches is not affected.
        seconds = int(timeout)
        limit = struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000))
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
    if type(raw) is socket.socket and assoc_socket is not None:  # TLS sockets keep pynetdicom's pending() logic
        assoc_socket.recv = types.MethodType(_recv_exactly, assoc_socket)  # type: ignore[method-assign]
