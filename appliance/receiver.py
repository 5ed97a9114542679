"""The Storage SCP: answers C-ECHO and C-STORE, and acknowledges an instance only once it is
durable (file fsync'd and renamed into the cache, directory fsync'd, row committed).

pynetdicom plays the DICOM role; the handlers here only decode the event, call ``store`` and
``db``, and return a status from ``statuses``. Two process-wide pynetdicom switches are set
where the receiver is built, and why:

* ``STORE_RECV_CHUNKED_DATASET``: each C-STORE data set is streamed to a file in the cache's
  ``incoming/`` directory as it arrives, so a 500 MB instance never sits in memory, and it is
  stored exactly as received (no decoding, any transfer syntax);
* ``UNRESTRICTED_STORAGE_SERVICE``: every proposed storage context is accepted with the
  proposed transfer syntax — compressed and private classes included — without building a
  list of every class × every syntax, which costs ~50 ms of CPU per association.

Associations are vetted when the A-ASSOCIATE-RQ arrives (called AE, calling AE, source
network) and rejected with a logged reason.
"""

from __future__ import annotations

import ipaddress
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.uid import UID, UID_dictionary
from pynetdicom import AE, _config, acse, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from . import statuses
from .config import Config
from .db import Database
from .dicomnet import application_entity, tune_socket
from .hotpath import ReceivedFile, discard_partial
from .intake import Intake
from .pdata import StoreReceiver
from .rules import Origin
from .store import Store

log = logging.getLogger(__name__)

_ALL_UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2"]


def negotiate_storage(rq_contexts: list[PresentationContext], ac_contexts: list[PresentationContext],
                      roles: dict[UID, tuple[bool | None, bool | None]] | None = None,
                      ) -> tuple[list[PresentationContext], list[Any]]:
    """Presentation contexts for a Storage SCP of every SOP class: what pynetdicom's
    ``negotiate_unrestricted`` does (which :meth:`Receiver.start` replaces with this), without
    what it gets wrong for a box that must pass on everything it acknowledges:

    * it accepted the first transfer syntax proposed, even one nobody knows (a vendor's
      private syntax): instances acknowledged, then never forwarded. Here the first proposed
      that is a transfer syntax is taken, and a context with none is refused (result 4), as
      DCMTK's storescp refuses it, so the modality knows;
    * it took every SOP class pynetdicom has no service for as a storage class, among them
      Modality Worklist and Color Palette Query/Retrieve: a modality probing for a worklist was
      told there is one. Only storage classes (and private and unknown ones, which may be
      storage) are accepted; any other is negotiated against the supported contexts (C-ECHO),
      so refused (result 3);
    * it answered SCP/SCU role selection by echoing the proposal, agreeing to act as Storage
      SCU too. Here the requestor may be SCU, never SCP: a context proposing it only as SCP
      (a C-GET's) is refused, one proposing both is answered SCU only.
    """
    supported = {cx.abstract_syntax for cx in ac_contexts}
    storage: dict[str, PresentationContext] = {}
    for rq in rq_contexts:
        uid = rq.abstract_syntax
        if uid in supported or not _storage_class(str(uid)):
            continue
        offered = storage.setdefault(str(uid), _storage_context(str(uid)))
        for syntax in rq.transfer_syntax:  # the requestor's order; every proposal of the class
            if UID(syntax).is_transfer_syntax and syntax not in offered.transfer_syntax:
                offered.add_transfer_syntax(syntax)
    return negotiate_as_acceptor(rq_contexts, [*ac_contexts, *storage.values()], roles)


def _storage_context(uid: str) -> PresentationContext:
    context = PresentationContext()
    context.abstract_syntax = UID(uid)
    context.scu_role, context.scp_role = True, False  # the requestor may send, never be sent to
    return context


_STORAGE_CLASS_UIDS = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())


def _storage_class(uid: str) -> bool:
    """Whether a SOP class is one to store: a storage class, or one not known to be anything
    else — private (a vendor's), or a standard one newer than pydicom's dictionary."""
    known = UID(uid)
    if uid in _STORAGE_CLASS_UIDS or known.is_private or uid not in UID_dictionary:
        return True
    return known.type == "SOP Class" and known.name.endswith(" Storage")


@dataclass
class _AssociationStats:
    origin: Origin
    opened: float = field(default_factory=time.monotonic)
    stored: int = 0
    bytes: int = 0
    refused: int = 0
    warned: set[str] = field(default_factory=set)  # reasons for refusing already in the journal


class Receiver:
    """The Storage SCP of one appliance. ``config`` is read per C-STORE, so a reload applies
    to new work (its timeouts to new associations); the AE title, address and port apply at
    :meth:`start`."""

    def __init__(self, config: Config, db: Database, store: Store) -> None:
        self.intake = Intake(config, db, store)
        self.store = store
        self._server: ThreadedAssociationServer | None = None
        self._ae: AE | None = None
        self._stats: dict[int, _AssociationStats] = {}
        self.address: tuple[str, int] = ("", 0)

    @property
    def config(self) -> Config:
        return self.intake.config

    @config.setter
    def config(self, config: Config) -> None:
        self.intake.config = config
        if self._ae is not None:  # for the associations that come next
            self._set_timeouts(self._ae, config)

    @staticmethod
    def _set_timeouts(ae: AE, config: Config) -> None:
        timeouts = config.node.timeouts
        ae.connection_timeout = timeouts.connect
        ae.acse_timeout = timeouts.acse
        ae.dimse_timeout = timeouts.dimse
        ae.network_timeout = timeouts.network

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        node = self.config.node
        _config.UNRESTRICTED_STORAGE_SERVICE = True
        acse.negotiate_unrestricted = negotiate_storage  # type: ignore[assignment]
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom's chunked receive writes to tempfile's directory: make it ours, on the
        # cache's filesystem, so admitting a file is a rename.
        tempfile.tempdir = str(self.store.incoming)

        ae = application_entity(node.ae_title)
        ae.add_supported_context(Verification, _ALL_UNCOMPRESSED)
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu
        ae.require_called_aet = False  # checked in _on_requested, with the reason logged
        self._set_timeouts(ae, self.config)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, tune_socket),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = ae.start_server((node.bind_address, node.port), block=False, evt_handlers=handlers)
        assert server is not None  # block=False returns the running server
        self._server, self._ae = server, ae
        self.address = cast(tuple[str, int], server.server_address[:2])
        log.info("Storage SCP %s listening on %s:%d", node.ae_title, *self.address)

    def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop accepting; let open associations finish for up to ``drain_seconds``; abort the rest."""
        if self._server is None or self._ae is None:
            return
        self._server.shutdown()
        deadline = time.monotonic() + drain_seconds

        def busy() -> list[Association]:
            # Released or rejected associations only wait for the peer to close the socket.
            return [a for a in self._ae.active_associations if a.is_established]  # type: ignore[union-attr]

        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        if busy():
            log.warning("aborting %d association(s) still open at shutdown", len(busy()))
        self._ae.shutdown()
        self._server = None

    # ---- association vetting ----------------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        node = self.config.node
        origin = _origin_of(assoc)
        calling, called, source_ip = origin.calling_ae, origin.called_ae, origin.source_ip
        reason = None
        if node.require_called_ae and called != node.ae_title.strip():
            reason, rj = f'called AE title "{called}" is not ours ("{node.ae_title}")', statuses.REJECT_CALLED_AE
        elif node.allowed_calling_aes and calling not in [a.strip() for a in node.allowed_calling_aes]:
            reason, rj = f'calling AE title "{calling}" is not in node.allowed_calling_aes', statuses.REJECT_CALLING_AE
        elif node.allowed_networks and not _in_networks(source_ip, node.allowed_networks):
            reason, rj = f"source address {source_ip} is not in node.allowed_networks", statuses.REJECT_NO_REASON
        if reason is None:
            StoreReceiver.attach(assoc)  # C-STOREs received by the DUL thread itself (pdata.py)
            return
        log.warning("rejected association from %s@%s to %s: %s", calling, source_ip, called, reason)
        assoc.acse.send_reject(*rj)
        assoc.kill()

    def _on_accepted(self, event: evt.Event) -> None:
        origin = _origin_of(event.assoc)
        self._stats[id(event.assoc)] = _AssociationStats(origin)
        log.info("association from %s@%s to %s accepted", origin.calling_ae, origin.source_ip, origin.called_ae)

    def _on_closed(self, event: evt.Event) -> None:
        if discard_partial(event.assoc):
            log.info("removed the partly received instance of an association that ended mid-transfer")
        stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        seconds = time.monotonic() - stats.opened
        log.info(
            "association from %s@%s %s after %.1f s: %d stored (%.1f MB), %d refused",
            stats.origin.calling_ae, stats.origin.source_ip, how, seconds,
            stats.stored, stats.bytes / 1e6, stats.refused,
        )

    # ---- DIMSE ------------------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return statuses.SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        origin = _origin_of(event.assoc)
        sop_uid = str(cast(Any, event.request).AffectedSOPInstanceUID)
        stats = self._stats.get(id(event.assoc))
        status, size = self._store(event, origin, sop_uid, stats)
        if stats is not None:
            if status == statuses.SUCCESS:
                stats.stored += 1
                stats.bytes += size
            else:
                stats.refused += 1
        return status

    def _store(self, event: evt.Event, origin: Origin, sop_uid: str,
               stats: _AssociationStats | None) -> tuple[int, int]:
        """Cache one received instance; returns the status to answer and its size."""
        received = getattr(event.request, "_dataset_file", None)  # hashed as it was written
        where = f"{origin.calling_ae}@{origin.source_ip} {sop_uid}"
        if isinstance(received, ReceivedFile) and received.failure is not None:
            _warn_once(stats, "unwritable", "refused %s: cannot write it to %s: %s", where, self.intake.store.incoming,
                       received.failure)
            return statuses.OUT_OF_RESOURCES, 0
        if event.dataset_path is None:
            # A request whose command says it has no data set (Data Set Type 0101H): nothing to store.
            log.warning("refused %s: its C-STORE request carries no data set", where)
            return statuses.CANNOT_UNDERSTAND, 0
        outcome = self.intake.admit(
            Path(event.dataset_path), origin, sop_class_uid=str(event.request.AffectedSOPClassUID),
            sop_instance_uid=sop_uid, transfer_syntax=str(event.context.transfer_syntax),
            digest=(received.size, received.sha256()) if isinstance(received, ReceivedFile) else None,
            dataset_offset=received.dataset_offset if isinstance(received, ReceivedFile) else None,
        )
        if outcome.kind == "replaced":
            log.info("%s %s", where, outcome.detail)
        elif outcome.kind == "no-room":
            _warn_once(stats, "no-room", "refused %s: %s", where, outcome.detail)
        elif not outcome.acknowledged or outcome.kind == "kept-first":
            log.log(logging.INFO if outcome.kind == "kept-first" else logging.WARNING, "%s %s: %s",
                    "kept the first copy of" if outcome.kind == "kept-first" else "refused", where, outcome.detail)
        return _STATUS_OF[outcome.kind], outcome.size


def _warn_once(stats: _AssociationStats | None, reason: str, message: str, *args: object) -> None:
    """A refusal for the box's own state (its disk full): the journal says it once per
    association, and the association's closing line counts them all. A modality sending a
    study to a full box would otherwise add a line per instance to the journal on that disk."""
    if stats is not None and reason in stats.warned:
        log.debug(message, *args)
        return
    if stats is not None:
        stats.warned.add(reason)
        message += " (the others refused for this on the association are counted when it closes)"
    log.warning(message, *args)


_STATUS_OF = {
    "stored": statuses.SUCCESS,
    "replaced": statuses.SUCCESS,
    "kept-first": statuses.SUCCESS,
    "queued": statuses.SUCCESS,  # (only `appliance send --to` asks for it)
    "rejected": statuses.DUPLICATE_SOP_INSTANCE,
    "no-room": statuses.OUT_OF_RESOURCES,
    "failed": statuses.OUT_OF_RESOURCES,
    "unreadable": statuses.CANNOT_UNDERSTAND,
    "mismatch": statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
}


def _origin_of(assoc: Association) -> Origin:
    """Calling/called AE titles as the A-ASSOCIATE-RQ gave them (available before negotiation)."""
    rq = assoc.requestor
    primitive: Any = rq.primitive
    calling = primitive.calling_ae_title if primitive is not None else rq.ae_title
    called = primitive.called_ae_title if primitive is not None else assoc.acceptor.ae_title
    return Origin(calling_ae=(calling or "").strip(), called_ae=(called or "").strip(), source_ip=rq.address)


def _in_networks(address: str, networks: tuple[Any, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks if net.version == ip.version)
