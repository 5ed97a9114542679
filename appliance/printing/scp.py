"""The Print SCP on the network: one pynetdicom AE on one port, answering to one called AE
title per configured printer, with Basic Grayscale and Basic Color Print Management Meta,
Presentation LUT, Basic Annotation Box, Printer Configuration Retrieval and Verification, and
the Printer SOP class on its own for consoles that check the printer's state on an association
of its own.

Handlers are thin: find the association's print state, call the session model, turn a
``PrintError`` into its status. State lives per association and disappears with it (the
standard's implicit N-DELETE). No N-EVENT-REPORT is ever sent: modalities poll the printer with
N-GET, and an unsolicited request from the SCP collides with the SCU's next request.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import N_ACTION, N_CREATE, N_DELETE, N_GET, N_SET
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from .. import __version__
from ..config import Timeouts
from ..dicomnet import application_entity, tune_socket
from . import model, statuses
from .backends import PrinterState
from .configuration import printer_configuration
from .errors import PrintError
from .model import PrintAssociation, PrintRequest
from .settings import PrintConfig

LOG = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"
TRANSFER_SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]

Submit = Callable[[PrintRequest, str, str], int]
StateOf = Callable[[str], PrinterState]


def _only_asked_for(ds: Dataset, wanted: list[BaseTag]) -> Dataset:
    """An N-GET's attribute list applied: all attributes when it is empty; asked-for attributes
    we do not have are left out rather than failing the N-GET."""
    if not wanted:
        return ds
    kept = Dataset()
    for tag in wanted:
        if tag in ds:
            kept[tag] = ds[tag]
    return kept


class PrintSCP:
    """Accepts print associations and keeps each one's film session."""

    def __init__(self, config: PrintConfig, submit: Submit, printer_state: StateOf, port: int | None = None,
                 timeouts: Timeouts | None = None) -> None:
        self.config = config
        self.timeouts = timeouts or Timeouts()
        self.submit = submit
        self.printer_state = printer_state
        self.port = port if port is not None else config.port
        self._states: dict[int, PrintAssociation] = {}
        # The printer states last logged, by printer: a console polling with N-GET every few
        # seconds must not write a line each time.
        self._logged_states: dict[str, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self.server: ThreadedAssociationServer | None = None

    # ---- lifecycle ----

    def start(self) -> None:
        titles = [p.ae_title.strip() for p in self.config.printers.values()]
        if not titles:
            raise ValueError("print SCP: no printers configured")
        ae = application_entity(titles[0])
        # The called AE title picks the printer (see _on_requested); others are rejected.
        ae.require_called_aet = True
        if self.config.allowed_calling_aes:
            ae.require_calling_aet = [t.strip() for t in self.config.allowed_calling_aes]
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = 0  # image box N-SETs are 0.25-60 MB: no reason to split them finely
        # The Storage SCP's timeouts and socket tuning (tune_socket): without a receive timeout a
        # peer that stops in the middle of a PDU (its first, or an image box N-SET) holds the
        # association's thread, and one of max_associations, for as long as its socket is open.
        ae.connection_timeout = self.timeouts.connect
        ae.acse_timeout = self.timeouts.acse
        ae.dimse_timeout = self.timeouts.dimse
        ae.network_timeout = self.timeouts.network
        # Printer on its own: PS3.4 H.3.1 lets an association negotiate only the printer-related
        # SOP classes, and consoles poll the printer's state that way.
        for uid in (*model.META_SOP_CLASSES, *model.OPTIONAL_SOP_CLASSES, model.PRINTER, VERIFICATION):
            ae.add_supported_context(uid, TRANSFER_SYNTAXES)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, tune_socket),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_N_GET, self._on_n_get),
            (evt.EVT_N_CREATE, self._on_n_create),
            (evt.EVT_N_SET, self._on_n_set),
            (evt.EVT_N_ACTION, self._on_n_action),
            (evt.EVT_N_DELETE, self._on_n_delete),
            (evt.EVT_C_ECHO, lambda event: statuses.SUCCESS),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        server = ae.start_server((self.config.bind_address, self.port), block=False, evt_handlers=handlers)
        assert server is not None  # non-blocking start returns the server
        self.server = server
        self.port = int(server.server_address[1])
        LOG.info("print SCP listening on %s:%d for %s", self.config.bind_address, self.port, ", ".join(titles))

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # ---- association state ----

    def _on_requested(self, event: Event) -> None:
        primitive = event.assoc.requestor.primitive
        called = str(primitive.called_ae_title if primitive is not None else "").strip()
        found = self.config.printer_for(called)
        if found is not None:
            # Accepting checks the called AE title against ours: make ours the one called.
            event.assoc.acceptor.ae_title = found[1].ae_title.strip()
        else:
            # The requestor's AE title is set only once the association is accepted.
            calling = str(primitive.calling_ae_title if primitive is not None else "").strip()
            LOG.warning("print association from %s refused: unknown called AE title %r", calling, called)

    def _state(self, assoc: Association) -> PrintAssociation:
        key = id(assoc)
        with self._lock:
            state = self._states.get(key)
            if state is None:
                found = self.config.printer_for(assoc.acceptor.ae_title)
                if found is None:  # cannot happen: the association was accepted for this title
                    raise PrintError(statuses.PROCESSING_FAILURE, "no printer for this association")
                name, printer = found
                annotations = any(cx.abstract_syntax == model.ANNOTATION_BOX for cx in assoc.accepted_contexts)
                state = PrintAssociation(name, printer, str(assoc.requestor.ae_title).strip(), annotations)
                self._states[key] = state
            return state

    def _on_closed(self, event: Event) -> None:
        with self._lock:
            state = self._states.pop(id(event.assoc), None)
        unprinted = [uid for uid, film in state.film_boxes.items() if not film.printed] if state else []
        if state is not None and unprinted:
            LOG.info("%s -> %s: association ended; discarding %d film box(es) %s", state.calling_ae,
                     state.printer.ae_title.strip(), len(unprinted), ", ".join(unprinted))

    @staticmethod
    def _require_meta(assoc: Association) -> None:
        """Film sessions, film boxes, image boxes, annotation boxes and Presentation LUTs come with
        a Meta SOP class (PS3.4 H.3.1). pynetdicom hands a request to its handler by the request's
        SOP class whatever context it came on, so an association that negotiated only the Printer
        SOP class would otherwise print: it gets "unrecognized operation" (not agreed on it)."""
        if not any(cx.abstract_syntax in model.META_SOP_CLASSES for cx in assoc.accepted_contexts):
            raise PrintError(statuses.UNRECOGNIZED_OPERATION, "no Print Management Meta SOP class on this association")

    def _guard(self, event: Event, what: str, call: Callable[[PrintAssociation], Any], needs_meta: bool = True) -> Any:
        """Run a model call; PrintError -> its status (no dataset); anything else -> 0x0110."""
        failure_shape = what in ("N-DELETE",)
        try:
            if needs_meta:
                self._require_meta(event.assoc)
            return call(self._state(event.assoc))
        except PrintError as exc:
            LOG.warning("%s -> %s %s: %s", event.assoc.requestor.ae_title, event.assoc.acceptor.ae_title, what, exc)
            return exc.status if failure_shape else (exc.status, None)
        except Exception:
            LOG.exception("%s -> %s %s failed", event.assoc.requestor.ae_title, event.assoc.acceptor.ae_title, what)
            return statuses.PROCESSING_FAILURE if failure_shape else (statuses.PROCESSING_FAILURE, None)

    # ---- DIMSE-N ----

    def _on_n_get(self, event: Event) -> tuple[int, Dataset | None]:
        request = cast(N_GET, event.request)
        sop_class = str(request.RequestedSOPClassUID)
        uid = str(request.RequestedSOPInstanceUID)

        def get(state: PrintAssociation) -> tuple[int, Dataset | None]:
            wanted = [Tag(t) for t in (event.attribute_identifiers or [])]
            if sop_class == model.PRINTER:
                if uid != model.PRINTER_INSTANCE:
                    raise PrintError(statuses.NO_SUCH_SOP_INSTANCE, "N-GET of a Printer other than the well-known one")
                return statuses.SUCCESS, _only_asked_for(self._printer(state), wanted)
            if sop_class == model.PRINTER_CONFIGURATION:
                if uid != model.PRINTER_CONFIGURATION_INSTANCE:
                    raise PrintError(statuses.NO_SUCH_SOP_INSTANCE,
                                     "N-GET of a Printer Configuration other than the well-known one")
                configuration = printer_configuration(state.printer_name, state.printer)
                return statuses.SUCCESS, _only_asked_for(configuration, wanted)
            raise PrintError(statuses.NO_SUCH_SOP_CLASS, f"N-GET of {sop_class} not supported")

        return self._guard(event, "N-GET", get, needs_meta=False)  # type: ignore[no-any-return]

    def _printer(self, state: PrintAssociation) -> Dataset:
        """The Printer SOP instance: its state as the backend reports it, logged when it changes."""
        printer_state = self.printer_state(state.printer_name)
        ds = Dataset()
        ds.PrinterStatus = printer_state.status
        ds.PrinterStatusInfo = printer_state.info
        ds.PrinterName = state.printer_name[:64]
        ds.Manufacturer = state.printer.manufacturer
        ds.ManufacturerModelName = state.printer.model_name
        ds.DeviceSerialNumber = ""
        ds.SoftwareVersions = __version__
        ds.DateOfLastCalibration = ""
        ds.TimeOfLastCalibration = ""
        self._log_printer_state(state, printer_state)
        return ds

    def _log_printer_state(self, state: PrintAssociation, printer_state: PrinterState) -> None:
        """One line when a printer's state, as modalities see it, changes."""
        seen = (printer_state.status, printer_state.info)
        with self._lock:
            before = self._logged_states.get(state.printer_name, ("NORMAL", "NORMAL"))
            self._logged_states[state.printer_name] = seen
        if seen != before:
            LOG.info("%s -> %s: printer %s %s (%s)", state.calling_ae, state.printer.ae_title.strip(),
                     printer_state.status, printer_state.info, printer_state.detail or "was " + " ".join(before))

    def _on_n_create(self, event: Event) -> tuple[int, Dataset | None]:
        request = cast(N_CREATE, event.request)
        sop_class = str(request.AffectedSOPClassUID)
        uid = str(request.AffectedSOPInstanceUID) if request.AffectedSOPInstanceUID else None
        attrs = event.attribute_list or Dataset()
        color = event.context.abstract_syntax == model.COLOR_META

        def create(state: PrintAssociation) -> tuple[int, Dataset]:
            if sop_class == model.FILM_SESSION:
                return state.create_film_session(uid, attrs)
            if sop_class == model.FILM_BOX:
                return state.create_film_box(uid, attrs, color)
            if sop_class == model.PRESENTATION_LUT:
                return state.create_presentation_lut(uid, attrs)
            raise PrintError(statuses.NO_SUCH_SOP_CLASS, f"N-CREATE of {sop_class} not supported")

        return self._guard(event, f"N-CREATE {sop_class}", create)  # type: ignore[no-any-return]

    def _on_n_set(self, event: Event) -> tuple[int, Dataset | None]:
        request = cast(N_SET, event.request)
        sop_class = str(request.RequestedSOPClassUID)
        uid = str(request.RequestedSOPInstanceUID)
        attrs = event.modification_list or Dataset()

        def set_(state: PrintAssociation) -> tuple[int, Dataset]:
            if sop_class in (model.GRAYSCALE_IMAGE_BOX, model.COLOR_IMAGE_BOX):
                return state.set_image_box(sop_class, uid, attrs)
            if sop_class == model.FILM_BOX:
                return state.set_film_box(uid, attrs)
            if sop_class == model.FILM_SESSION:
                return state.set_film_session(uid, attrs)
            if sop_class == model.ANNOTATION_BOX:
                return state.set_annotation_box(uid, attrs)
            raise PrintError(statuses.NO_SUCH_SOP_CLASS, f"N-SET of {sop_class} not supported")

        return self._guard(event, f"N-SET {sop_class} {uid}", set_)  # type: ignore[no-any-return]

    def _on_n_action(self, event: Event) -> tuple[int, Dataset | None]:
        request = cast(N_ACTION, event.request)
        sop_class = str(request.RequestedSOPClassUID)
        uid = str(request.RequestedSOPInstanceUID)

        def action(state: PrintAssociation) -> tuple[int, Dataset | None]:
            if request.ActionTypeID != 1:
                raise PrintError(statuses.NO_SUCH_ACTION_TYPE, f"Action Type {request.ActionTypeID}")
            if sop_class == model.FILM_BOX:
                status, job = state.print_film_box(uid)
            elif sop_class == model.FILM_SESSION:
                status, job = state.print_film_session(uid)
            else:
                raise PrintError(statuses.NO_SUCH_SOP_CLASS, f"N-ACTION of {sop_class} not supported")
            if job is not None:
                job_id = self.submit(job, state.printer_name, state.calling_ae)
                state.printed(job)
                # The spool prints it when the printer takes it; its log says when.
                LOG.info("%s -> %s: %s %s queued as job %d (%s)", state.calling_ae,
                         state.printer.ae_title.strip(), job.level, uid, job_id,
                         ", ".join(film.uid for film in job.films))
            # Print Job SOP class is not offered, so the reply carries no Referenced Print Job.
            return status, None

        return self._guard(event, f"N-ACTION {sop_class} {uid}", action)  # type: ignore[no-any-return]

    def _on_n_delete(self, event: Event) -> int:
        request = cast(N_DELETE, event.request)
        sop_class = str(request.RequestedSOPClassUID)
        uid = str(request.RequestedSOPInstanceUID)

        def delete(state: PrintAssociation) -> int:
            if sop_class == model.FILM_SESSION:
                return state.delete_film_session(uid)
            if sop_class == model.FILM_BOX:
                return state.delete_film_box(uid)
            if sop_class == model.PRESENTATION_LUT:
                return state.delete_presentation_lut(uid)
            raise PrintError(statuses.NO_SUCH_SOP_CLASS, f"N-DELETE of {sop_class} not supported")

        return self._guard(event, "N-DELETE", delete)  # type: ignore[no-any-return]
