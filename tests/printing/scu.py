"""A small pynetdicom Print SCU for the tests: what a modality does, one DIMSE at a time, with
every status visible to the test."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicAnnotationBox,
    BasicColorPrintManagementMeta,
    BasicFilmBox,
    BasicFilmSession,
    BasicGrayscalePrintManagementMeta,
    PresentationLUT,
    Printer,
    PrinterConfigurationRetrieval,
    PrinterConfigurationRetrievalInstance,
    PrinterInstance,
    Verification,
)


@dataclass
class Reply:
    status: int
    dataset: Dataset | None
    # For N-CREATE: the instance UID the SCP put in the response (assigned or echoed).
    uid: str | None = None


def gray_item(pixels: np.ndarray, bits_stored: int = 8, photometric: str = "MONOCHROME2") -> Dataset:
    item = Dataset()
    item.SamplesPerPixel = 1
    item.PhotometricInterpretation = photometric
    item.Rows, item.Columns = pixels.shape
    if bits_stored == 8:
        item.BitsAllocated, item.BitsStored, item.HighBit = 8, 8, 7
        item.PixelData = pixels.astype(np.uint8).tobytes()
    else:
        item.BitsAllocated, item.BitsStored, item.HighBit = 16, bits_stored, bits_stored - 1
        item.PixelData = pixels.astype("<u2").tobytes()
    item.PixelRepresentation = 0
    return item


def color_item(rgb: np.ndarray, planar: int = 0) -> Dataset:
    item = Dataset()
    item.SamplesPerPixel = 3
    item.PhotometricInterpretation = "RGB"
    item.PlanarConfiguration = planar
    item.Rows, item.Columns = rgb.shape[:2]
    item.BitsAllocated, item.BitsStored, item.HighBit = 8, 8, 7
    item.PixelRepresentation = 0
    data = rgb.astype(np.uint8)
    item.PixelData = (data.transpose(2, 0, 1) if planar else data).tobytes()
    return item


class PrintSCU:
    """One association to a Print SCP. ``meta=False`` proposes no Meta SOP class, as a console
    that only checks the printer does (``printer=True``: the Printer SOP class on its own;
    ``configuration=True``: Printer Configuration Retrieval); requests then go through the
    Printer SOP class's context."""

    def __init__(self, port: int, called_ae: str, color: bool = False, annotation: bool = False,
                 plut: bool = False, calling_ae: str = "TESTSCU", meta: bool = True, printer: bool = False,
                 verification: bool = False, configuration: bool = False) -> None:
        meta_class = BasicColorPrintManagementMeta if color else BasicGrayscalePrintManagementMeta
        self.meta = meta_class if meta else Printer
        ae = AE(ae_title=calling_ae)
        proposed = ((meta, meta_class), (printer, Printer), (verification, Verification),
                    (configuration, PrinterConfigurationRetrieval), (annotation, BasicAnnotationBox),
                    (plut, PresentationLUT))
        for wanted, sop_class in proposed:
            if wanted:
                ae.add_requested_context(sop_class)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        self._created_uid: str | None = None
        handlers = [(evt.EVT_DIMSE_RECV, self._on_dimse)]
        self.assoc: Association = ae.associate("127.0.0.1", port, ae_title=called_ae, evt_handlers=handlers)
        self.session_uid: str | None = None

    def _on_dimse(self, event: evt.Event) -> None:
        # pynetdicom does not return the N-CREATE-RSP's Affected SOP Instance UID; catch it here.
        command = event.message.command_set
        if int(command.CommandField) == 0x8140:  # N-CREATE-RSP
            self._created_uid = str(command.get("AffectedSOPInstanceUID", "") or "") or None

    @property
    def established(self) -> bool:
        return bool(self.assoc.is_established)

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()

    def __enter__(self) -> PrintSCU:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @staticmethod
    def _status(status: Dataset) -> int:
        return int(status.Status) if "Status" in status else -1

    def printer_status(self, identifiers: Sequence[int] = ()) -> Reply:
        status, ds = self.assoc.send_n_get(list(identifiers), Printer, PrinterInstance, meta_uid=self.meta)
        return Reply(self._status(status), ds)

    def printer_configuration(self, identifiers: Sequence[int] = ()) -> Reply:
        status, ds = self.assoc.send_n_get(list(identifiers), PrinterConfigurationRetrieval,
                                           PrinterConfigurationRetrievalInstance)
        return Reply(self._status(status), ds)

    def create(self, sop_class: str, ds: Dataset | None, uid: str | None, meta: bool = True) -> Reply:
        self._created_uid = None
        # An empty data set must go as no data set: pynetdicom announces one and sends no bytes.
        ds = ds if ds is not None and len(ds) else None
        status, reply = self.assoc.send_n_create(ds, sop_class, uid, meta_uid=self.meta if meta else None)
        return Reply(self._status(status), reply, self._created_uid or uid)

    def create_session(self, assign: bool = False, **attrs: object) -> Reply:
        ds = Dataset()
        for key, value in attrs.items():
            setattr(ds, key, value)
        reply = self.create(BasicFilmSession, ds, None if assign else generate_uid())
        self.session_uid = reply.uid
        return reply

    def create_film_box(self, display_format: str | None, assign: bool = False, reference_session: bool = True,
                        plut_uid: str | None = None, **attrs: object) -> Reply:
        ds = Dataset()
        if display_format is not None:
            ds.ImageDisplayFormat = display_format
        if reference_session:
            ds.ReferencedFilmSessionSequence = _referenced(BasicFilmSession, self.session_uid)
        if plut_uid:
            ds.ReferencedPresentationLUTSequence = _referenced(PresentationLUT, plut_uid)
        for key, value in attrs.items():
            setattr(ds, key, value)
        return self.create(BasicFilmBox, ds, None if assign else generate_uid())

    def create_plut(self, shape: str | None = "IDENTITY", table: Sequence[int] | None = None,
                    bits: int = 8) -> Reply:
        ds = Dataset()
        if table is not None:
            item = Dataset()
            item.LUTDescriptor = [len(table), 0, bits]
            item.LUTData = np.asarray(table, dtype="<u2").tobytes()
            ds.PresentationLUTSequence = DicomSequence([item])
        elif shape:
            ds.PresentationLUTShape = shape
        self._created_uid = None
        status, reply = self.assoc.send_n_create(ds, PresentationLUT, None)
        return Reply(self._status(status), reply, self._created_uid)

    def set_image(self, film_box: Dataset, position: int, item: Dataset | None, color: bool = False,
                  **attrs: object) -> Reply:
        ref = film_box.ReferencedImageBoxSequence[position - 1]
        ds = Dataset()
        ds.ImageBoxPosition = position
        keyword = "BasicColorImageSequence" if color else "BasicGrayscaleImageSequence"
        setattr(ds, keyword, DicomSequence([item] if item is not None else []))
        for key, value in attrs.items():
            setattr(ds, key, value)
        status, reply = self.assoc.send_n_set(ds, ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID,
                                              meta_uid=self.meta)
        return Reply(self._status(status), reply)

    def set_film_box(self, uid: str, plut_uid: str | None = None, **attrs: object) -> Reply:
        ds = Dataset()
        if plut_uid:
            ds.ReferencedPresentationLUTSequence = _referenced(PresentationLUT, plut_uid)
        for key, value in attrs.items():
            setattr(ds, key, value)
        status, reply = self.assoc.send_n_set(ds, BasicFilmBox, uid, meta_uid=self.meta)
        return Reply(self._status(status), reply)

    def set_annotation(self, film_box: Dataset, position: int, text: str) -> Reply:
        ref = film_box.ReferencedBasicAnnotationBoxSequence[position - 1]
        ds = Dataset()
        ds.AnnotationPosition = position
        ds.TextString = text
        status, reply = self.assoc.send_n_set(ds, ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID)
        return Reply(self._status(status), reply)

    def print_film_box(self, uid: str) -> int:
        status, _ = self.assoc.send_n_action(None, 1, BasicFilmBox, uid, meta_uid=self.meta)
        return self._status(status)

    def print_session(self) -> int:
        status, _ = self.assoc.send_n_action(None, 1, BasicFilmSession, self.session_uid, meta_uid=self.meta)
        return self._status(status)

    def delete(self, sop_class: str, uid: str) -> int:
        status = self.assoc.send_n_delete(sop_class, uid, meta_uid=self.meta)
        return self._status(status)


def _referenced(sop_class: str, uid: str) -> DicomSequence:
    """A one-item sequence referencing an instance (Referenced SOP Class / Instance UID)."""
    ref = Dataset()
    ref.ReferencedSOPClassUID = sop_class
    ref.ReferencedSOPInstanceUID = uid
    return DicomSequence([ref])
