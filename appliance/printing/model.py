"""The print hierarchy of one association: film session, film boxes, image boxes, annotation
boxes and Presentation LUTs, with the rules of PS3.4 Annex H for creating, setting, printing and
deleting them.

Every operation returns ``(status, response attributes)`` or raises ``PrintError``; nothing here
knows about the network. Unsupported values of optional attributes are replaced by the default
documented in CONFORMANCE.md; the reply is then 0x0116 (or 0xB605 for densities) when the SCU
supplied the SOP Instance UID, and 0x0000 when we minted it, because pynetdicom only returns a
minted UID with a success status.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from . import statuses
from .errors import PrintError
from .layout import (
    Rect,
    annotation_band_height,
    cell_rects,
    film_area,
    parse_density,
    parse_film_size,
    place_image,
)
from .pixels import ImagePixels, PresentationLut, decode_image
from .settings import PrinterConfig

LOG = logging.getLogger(__name__)

# SOP classes (PS3.4 H); kept here so this module needs no network library.
GRAYSCALE_META = "1.2.840.10008.5.1.1.9"
COLOR_META = "1.2.840.10008.5.1.1.18"
FILM_SESSION = "1.2.840.10008.5.1.1.1"
FILM_BOX = "1.2.840.10008.5.1.1.2"
GRAYSCALE_IMAGE_BOX = "1.2.840.10008.5.1.1.4"
COLOR_IMAGE_BOX = "1.2.840.10008.5.1.1.4.1"
ANNOTATION_BOX = "1.2.840.10008.5.1.1.15"
PRINTER = "1.2.840.10008.5.1.1.16"
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"
PRESENTATION_LUT = "1.2.840.10008.5.1.1.23"
PRINTER_CONFIGURATION = "1.2.840.10008.5.1.1.16.376"
PRINTER_CONFIGURATION_INSTANCE = "1.2.840.10008.5.1.1.17.376"

# What the SCP offers (PS3.4 H.3): the Meta SOP classes, and the optional SOP classes that may
# be negotiated with them.
META_SOP_CLASSES = (GRAYSCALE_META, COLOR_META)
OPTIONAL_SOP_CLASSES = (PRESENTATION_LUT, ANNOTATION_BOX, PRINTER_CONFIGURATION)

# Pixels one association may hold before image box N-SETs fail with 0xC605 (a Pi has little RAM).
MAX_ASSOCIATION_BYTES = 512 * 2**20

# Image boxes in one row (ROW, STANDARD) or one column (COL), and rows or columns in a film.
MAX_BOXES_PER_LINE = 12

MAGNIFICATIONS = ("REPLICATE", "BILINEAR", "CUBIC", "NONE")
PRIORITIES = ("HIGH", "MED", "LOW")
MEDIUM_TYPES = ("PAPER", "CLEAR FILM", "BLUE FILM", "MAMMO CLEAR FILM", "MAMMO BLUE FILM")
# Everything prints on paper; another Medium Type a modality asks for is recorded and echoed.
PRINTED_MEDIUM = "PAPER"


@dataclass(frozen=True)
class DisplayFormat:
    """Image Display Format as rows (ROW) or columns (COL) of box counts."""

    text: str
    kind: Literal["ROW", "COL"]
    counts: tuple[int, ...]

    @property
    def cells(self) -> int:
        return sum(self.counts)

    @staticmethod
    def parse(text: str, max_cells: int) -> DisplayFormat:
        """``STANDARD\\C,R`` (C columns, R rows), ``ROW\\R1,R2,...``, ``COL\\C1,C2,...``.
        SLIDE, SUPERSLIDE and CUSTOM are not supported (0x0106)."""
        clean = text.strip().upper()
        kind, _, rest = clean.partition("\\")
        try:
            numbers = tuple(int(part) for part in rest.split(","))
        except ValueError:
            numbers = ()
        if kind == "STANDARD" and len(numbers) == 2 and min(numbers) >= 1:
            columns, rows = numbers
            result = DisplayFormat(clean, "ROW", (columns,) * rows)
        elif kind in ("ROW", "COL") and numbers and min(numbers) >= 1:
            result = DisplayFormat(clean, kind, numbers)  # type: ignore[arg-type]
        else:
            raise PrintError(statuses.INVALID_ATTRIBUTE_VALUE, f"Image Display Format {text!r} not supported")
        if result.cells > max_cells or max(result.counts) > MAX_BOXES_PER_LINE \
                or len(result.counts) > MAX_BOXES_PER_LINE:
            raise PrintError(statuses.INVALID_ATTRIBUTE_VALUE, f"Image Display Format {text!r}: too many boxes")
        return result


@dataclass
class ImageBox:
    uid: str
    sop_class: str
    position: int
    pixels: ImagePixels | None = None
    polarity: str = "NORMAL"
    magnification: str | None = None  # None: the film box's
    smoothing: str | None = None
    min_density: int | None = None
    max_density: int | None = None
    requested_size_mm: float | None = None
    decimate_crop: str | None = None
    plut: PresentationLut | None = None
    configuration: str = ""

    @property
    def color(self) -> bool:
        return self.sop_class == COLOR_IMAGE_BOX


@dataclass
class AnnotationBox:
    uid: str
    position: int
    text: str = ""


@dataclass
class FilmBox:
    uid: str
    display_format: DisplayFormat
    orientation: str
    film_size_id: str
    magnification: str
    border_density: str | int
    empty_image_density: str | int
    min_density: int
    max_density: int
    trim: bool
    smoothing: str = ""
    configuration: str = ""
    resolution: str = "STANDARD"
    illumination: int = 2000
    reflected_ambient_light: int = 10
    plut: PresentationLut | None = None
    plut_uid: str | None = None
    image_boxes: list[ImageBox] = field(default_factory=list)
    annotations: list[AnnotationBox] = field(default_factory=list)
    # Queued for printing as it is now (False again once it is changed).
    printed: bool = False

    @property
    def film_size(self) -> tuple[float, float]:
        size = parse_film_size(self.film_size_id)
        assert size is not None  # validated at creation
        return size

    @property
    def has_images(self) -> bool:
        return any(box.pixels is not None for box in self.image_boxes)

    def film_points(self) -> tuple[float, float]:
        return oriented_film_points(self.film_size, self.orientation)

    def cells(self) -> list[Rect]:
        """Image box rectangles in film points, position 1 first."""
        return image_box_rects(self.film_size, self.orientation, self.display_format, bool(self.annotations))


def oriented_film_points(film_size: tuple[float, float], orientation: str) -> tuple[float, float]:
    """A film's (width, height) in points, as oriented; ``film_size`` in inches, portrait."""
    width, height = (v * 72.0 for v in film_size)
    return (height, width) if orientation == "LANDSCAPE" else (width, height)


def image_box_rects(film_size: tuple[float, float], orientation: str, display_format: DisplayFormat,
                    annotations: bool) -> list[Rect]:
    """The image box rectangles of a film box, in film points, position 1 first; a film box with
    annotation boxes keeps a band at the bottom for their text."""
    film_w, film_h = oriented_film_points(film_size, orientation)
    band = annotation_band_height(film_w, film_h) if annotations else 0.0
    area, gap = film_area(film_w, film_h, band)
    return cell_rects(display_format.kind, display_format.counts, area, gap)


@dataclass
class FilmSession:
    uid: str
    copies: int = 1
    priority: str = "MED"
    medium: str = PRINTED_MEDIUM
    destination: str = "MAGAZINE"
    label: str = ""
    owner: str = ""
    film_boxes: list[FilmBox] = field(default_factory=list)


@dataclass(frozen=True)
class PrintRequest:
    """What an N-ACTION asks to print: films in order, with the session's settings."""

    films: tuple[FilmBox, ...]
    session: FilmSession
    level: Literal["film box", "film session"]


class _Outcome:
    """Collects the replies' warnings while attributes are read."""

    def __init__(self, uid_supplied: bool, context: str) -> None:
        self.uid_supplied = uid_supplied
        self.context = context
        self.status = statuses.SUCCESS

    def default(self, keyword: str, value: object, replacement: object, status: int | None = None) -> None:
        LOG.warning("%s: %s %r not supported, using %r", self.context, keyword, value, replacement)
        if self.uid_supplied and self.status == statuses.SUCCESS:
            self.status = status if status is not None else statuses.ATTRIBUTE_VALUE_OUT_OF_RANGE


def _text(ds: Dataset, keyword: str) -> str | None:
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    value = ds[keyword].value
    return str(value).strip().upper()


def _int(ds: Dataset, keyword: str) -> int | None:
    if keyword not in ds or ds[keyword].value in (None, ""):
        return None
    try:
        return int(ds[keyword].value)
    except (TypeError, ValueError):
        return -1


class PrintAssociation:
    """The print objects of one association (the standard's scope for them)."""

    def __init__(self, printer_name: str, printer: PrinterConfig, calling_ae: str, annotations: bool) -> None:
        self.printer_name = printer_name
        self.printer = printer
        self.calling_ae = calling_ae
        self.annotations_negotiated = annotations
        self.session: FilmSession | None = None
        self.pluts: dict[str, PresentationLut] = {}
        self.film_boxes: dict[str, FilmBox] = {}
        self.image_boxes: dict[str, tuple[FilmBox, ImageBox]] = {}
        self.annotation_boxes: dict[str, tuple[FilmBox, AnnotationBox]] = {}

    def _context(self, what: str, uid: str | None) -> str:
        return f"{self.calling_ae} -> {self.printer.ae_title.strip()} {what} {uid or '(new)'}"

    def _check_new_uid(self, uid: str | None, what: str) -> None:
        """An SCU-supplied SOP Instance UID must not name an object that exists (PS3.7 C.4.2:
        0x0111); accepting it would leave two objects under one UID, one of them unreachable."""
        if uid is None:
            return
        in_use = (
            (self.session is not None and self.session.uid == uid)
            or uid in self.film_boxes
            or uid in self.image_boxes
            or uid in self.annotation_boxes
            or uid in self.pluts
        )
        if in_use:
            raise PrintError(statuses.DUPLICATE_SOP_INSTANCE, f"{what}: SOP Instance UID {uid} is already in use")

    # ---- film session ----

    def create_film_session(self, uid: str | None, attrs: Dataset) -> tuple[int, Dataset]:
        if self.session is not None:
            raise PrintError(statuses.DUPLICATE_SOP_INSTANCE, "a film session already exists on this association")
        self._check_new_uid(uid, "film session")
        session = FilmSession(uid or generate_uid())
        outcome = _Outcome(uid is not None, self._context("film session", session.uid))
        self._apply_session(session, attrs, outcome)
        self.session = session
        response = self._session_attributes(session)
        if uid is None:
            response.AffectedSOPInstanceUID = session.uid
        return outcome.status, response

    def set_film_session(self, uid: str, attrs: Dataset) -> tuple[int, Dataset]:
        session = self._session(uid)
        outcome = _Outcome(True, self._context("film session", uid))
        self._apply_session(session, attrs, outcome)
        return outcome.status, self._session_attributes(session)

    def _apply_session(self, session: FilmSession, attrs: Dataset, outcome: _Outcome) -> None:
        copies = _int(attrs, "NumberOfCopies")
        if copies is not None:
            if 1 <= copies <= self.printer.max_copies:
                session.copies = copies
            else:
                clamped = min(max(copies, 1), self.printer.max_copies)
                outcome.default("NumberOfCopies", copies, clamped)
                session.copies = clamped
        priority = _text(attrs, "PrintPriority")
        if priority is not None:
            if priority in PRIORITIES:
                session.priority = priority
            else:
                outcome.default("PrintPriority", priority, "MED")
        medium = _text(attrs, "MediumType")
        if medium is not None:
            # Everything prints on paper here; the requested medium is recorded and echoed.
            if medium in MEDIUM_TYPES:
                session.medium = medium
            else:
                outcome.default("MediumType", medium, PRINTED_MEDIUM)
        destination = _text(attrs, "FilmDestination")
        if destination is not None:
            if destination in ("MAGAZINE", "PROCESSOR") or destination.startswith("BIN_"):
                session.destination = destination
            else:
                outcome.default("FilmDestination", destination, "MAGAZINE")
        if "FilmSessionLabel" in attrs:
            session.label = str(attrs.FilmSessionLabel or "")
        if "OwnerID" in attrs:
            session.owner = str(attrs.OwnerID or "")
        if "MemoryAllocation" in attrs and attrs.MemoryAllocation not in (None, ""):
            LOG.info("%s: Memory Allocation is not supported, ignored", outcome.context)
            if outcome.uid_supplied and outcome.status == statuses.SUCCESS:
                outcome.status = statuses.MEMORY_ALLOCATION_NOT_SUPPORTED

    @staticmethod
    def _session_attributes(session: FilmSession) -> Dataset:
        ds = Dataset()
        ds.NumberOfCopies = session.copies
        ds.PrintPriority = session.priority
        ds.MediumType = session.medium
        ds.FilmDestination = session.destination
        ds.FilmSessionLabel = session.label
        ds.OwnerID = session.owner
        return ds

    def _session(self, uid: str) -> FilmSession:
        if self.session is None or self.session.uid != uid:
            raise PrintError(statuses.NO_SUCH_SOP_INSTANCE, f"no film session {uid}")
        return self.session

    def delete_film_session(self, uid: str) -> int:
        session = self._session(uid)
        for box in list(session.film_boxes):
            self._forget_film_box(box)
        self.session = None
        return statuses.SUCCESS

    # ---- film box ----

    def create_film_box(self, uid: str | None, attrs: Dataset, color: bool) -> tuple[int, Dataset]:
        if "ImageDisplayFormat" not in attrs or not attrs.ImageDisplayFormat:
            raise PrintError(statuses.MISSING_ATTRIBUTE, "Image Display Format is missing")
        references = attrs.get("ReferencedFilmSessionSequence")
        if not references:
            raise PrintError(statuses.MISSING_ATTRIBUTE, "Referenced Film Session Sequence is missing")
        session_uid = str(references[0].get("ReferencedSOPInstanceUID", ""))
        if self.session is None or session_uid != self.session.uid:
            raise PrintError(statuses.INVALID_ATTRIBUTE_VALUE, f"film session {session_uid!r} does not exist")
        self._check_new_uid(uid, "film box")
        display = DisplayFormat.parse(str(attrs.ImageDisplayFormat), self.printer.max_image_boxes)
        printer = self.printer
        box_uid = uid or generate_uid()
        outcome = _Outcome(uid is not None, self._context("film box", box_uid))
        film = FilmBox(
            uid=box_uid,
            display_format=display,
            orientation=printer.default_orientation,
            film_size_id=printer.default_film_size,
            magnification=printer.default_magnification,
            border_density=parse_density(printer.default_border_density) or "WHITE",
            empty_image_density=parse_density(printer.default_empty_image_density) or "WHITE",
            min_density=printer.min_density,
            max_density=printer.max_density,
            trim=False,
        )
        orientation = _text(attrs, "FilmOrientation")
        if orientation is not None:
            if orientation in ("PORTRAIT", "LANDSCAPE"):
                film.orientation = orientation
            else:
                outcome.default("FilmOrientation", orientation, film.orientation)
        size = _text(attrs, "FilmSizeID")
        if size is not None:
            if parse_film_size(size) is not None:
                film.film_size_id = size
            else:
                outcome.default("FilmSizeID", size, film.film_size_id)
        for name, value in self._film_box_changes(film, attrs, outcome).items():
            setattr(film, name, value)
        for keyword, name in (("Illumination", "illumination"), ("ReflectedAmbientLight", "reflected_ambient_light")):
            value = _int(attrs, keyword)
            if value is not None and value >= 0:
                setattr(film, name, value)
        resolution = _text(attrs, "RequestedResolutionID")
        if resolution is not None:
            if resolution in ("STANDARD", "HIGH"):
                film.resolution = resolution
            else:
                outcome.default("RequestedResolutionID", resolution, "STANDARD")
        image_class = COLOR_IMAGE_BOX if color else GRAYSCALE_IMAGE_BOX
        film.image_boxes = [ImageBox(generate_uid(), image_class, n + 1) for n in range(display.cells)]
        if self.annotations_negotiated:
            film.annotations = [AnnotationBox(generate_uid(), n + 1) for n in range(printer.annotation_boxes)]
        self.session.film_boxes.append(film)
        self.film_boxes[film.uid] = film
        for image_box in film.image_boxes:
            self.image_boxes[image_box.uid] = (film, image_box)
        for annotation in film.annotations:
            self.annotation_boxes[annotation.uid] = (film, annotation)
        LOG.info(
            "%s: created %s %s %s with %d image boxes", outcome.context, display.text, film.film_size_id,
            film.orientation, display.cells,
        )
        response = self._film_box_attributes(film)
        if uid is None:
            response.AffectedSOPInstanceUID = film.uid
        return outcome.status, response

    def set_film_box(self, uid: str, attrs: Dataset) -> tuple[int, Dataset]:
        film = self._film_box(uid)
        if self.session is not None and self.session.film_boxes and self.session.film_boxes[-1] is not film:
            raise PrintError(statuses.INVALID_ATTRIBUTE_VALUE, "only the last created film box may be changed")
        outcome = _Outcome(True, self._context("film box", uid))
        changes = self._film_box_changes(film, attrs, outcome)
        for name, value in changes.items():
            setattr(film, name, value)
        film.printed = False
        return outcome.status, self._film_box_attributes(film)

    def _film_box_changes(self, film: FilmBox, attrs: Dataset, outcome: _Outcome) -> dict[str, object]:
        """The film box attributes an N-CREATE or N-SET asks for, by field, checked and not yet
        applied: a request that fails (a Presentation LUT that does not exist) must change
        nothing (PS3.7 C: a failure status means the operation was not performed)."""
        changes: dict[str, object] = {}
        magnification = _text(attrs, "MagnificationType")
        if magnification is not None:
            if magnification in MAGNIFICATIONS:
                changes["magnification"] = magnification
            else:
                outcome.default("MagnificationType", magnification, film.magnification)
        if "SmoothingType" in attrs:
            changes["smoothing"] = str(attrs.SmoothingType or "")
        for keyword, name in (("BorderDensity", "border_density"), ("EmptyImageDensity", "empty_image_density")):
            if keyword in attrs and attrs[keyword].value not in (None, ""):
                density = parse_density(attrs[keyword].value)
                if density is None:
                    outcome.default(keyword, attrs[keyword].value, getattr(film, name))
                else:
                    changes[name] = density
        changes["min_density"], changes["max_density"] = self._densities(
            attrs, film.min_density, film.max_density, outcome
        )
        trim = _text(attrs, "Trim")
        if trim is not None:
            if trim in ("YES", "NO"):
                changes["trim"] = trim == "YES"
            else:
                outcome.default("Trim", trim, "NO")
        if "ConfigurationInformation" in attrs:
            changes["configuration"] = str(attrs.ConfigurationInformation or "")
        if "ReferencedPresentationLUTSequence" in attrs and attrs.ReferencedPresentationLUTSequence:
            plut_uid = str(attrs.ReferencedPresentationLUTSequence[0].ReferencedSOPInstanceUID)
            changes["plut"] = self._plut(plut_uid)
            changes["plut_uid"] = plut_uid
        return changes

    def _densities(self, attrs: Dataset, low: int, high: int, outcome: _Outcome) -> tuple[int, int]:
        printer = self.printer
        for keyword in ("MinDensity", "MaxDensity"):
            value = _int(attrs, keyword)
            if value is None:
                continue
            clamped = min(max(value, printer.min_density), printer.max_density)
            if clamped != value:
                outcome.default(keyword, value, clamped, statuses.DENSITY_OUT_OF_RANGE)
            if keyword == "MinDensity":
                low = clamped
            else:
                high = clamped
        if low > high:
            outcome.default("MinDensity", low, high, statuses.DENSITY_OUT_OF_RANGE)
            low = high
        return low, high

    def _film_box_attributes(self, film: FilmBox) -> Dataset:
        ds = Dataset()
        ds.ImageDisplayFormat = film.display_format.text
        ds.FilmOrientation = film.orientation
        ds.FilmSizeID = film.film_size_id
        ds.MagnificationType = film.magnification
        ds.SmoothingType = film.smoothing
        ds.BorderDensity = str(film.border_density)
        ds.EmptyImageDensity = str(film.empty_image_density)
        ds.MinDensity = film.min_density
        ds.MaxDensity = film.max_density
        ds.Trim = "YES" if film.trim else "NO"
        ds.ConfigurationInformation = film.configuration
        ds.RequestedResolutionID = film.resolution
        ds.Illumination = film.illumination
        ds.ReflectedAmbientLight = film.reflected_ambient_light
        session_ref = Dataset()
        session_ref.ReferencedSOPClassUID = FILM_SESSION
        session_ref.ReferencedSOPInstanceUID = self.session.uid if self.session else ""
        ds.ReferencedFilmSessionSequence = Sequence([session_ref])
        if film.plut_uid:
            plut_ref = Dataset()
            plut_ref.ReferencedSOPClassUID = PRESENTATION_LUT
            plut_ref.ReferencedSOPInstanceUID = film.plut_uid
            ds.ReferencedPresentationLUTSequence = Sequence([plut_ref])
        items = []
        for box in film.image_boxes:
            item = Dataset()
            item.ReferencedSOPClassUID = box.sop_class
            item.ReferencedSOPInstanceUID = box.uid
            items.append(item)
        ds.ReferencedImageBoxSequence = Sequence(items)
        if film.annotations:
            notes = []
            for annotation in film.annotations:
                item = Dataset()
                item.ReferencedSOPClassUID = ANNOTATION_BOX
                item.ReferencedSOPInstanceUID = annotation.uid
                notes.append(item)
            ds.ReferencedBasicAnnotationBoxSequence = Sequence(notes)
        return ds

    def _film_box(self, uid: str) -> FilmBox:
        film = self.film_boxes.get(uid)
        if film is None:
            raise PrintError(statuses.NO_SUCH_SOP_INSTANCE, f"no film box {uid}")
        return film

    def delete_film_box(self, uid: str) -> int:
        film = self._film_box(uid)
        self._forget_film_box(film)
        return statuses.SUCCESS

    def _forget_film_box(self, film: FilmBox) -> None:
        self.film_boxes.pop(film.uid, None)
        for box in film.image_boxes:
            self.image_boxes.pop(box.uid, None)
        for annotation in film.annotations:
            self.annotation_boxes.pop(annotation.uid, None)
        if self.session is not None and film in self.session.film_boxes:
            self.session.film_boxes.remove(film)

    # ---- image box ----

    def _held_bytes(self) -> int:
        return sum(box.pixels.data.nbytes for _, box in self.image_boxes.values() if box.pixels is not None)

    def set_image_box(self, sop_class: str, uid: str, attrs: Dataset) -> tuple[int, Dataset]:
        found = self.image_boxes.get(uid)
        if found is None:
            raise PrintError(statuses.NO_SUCH_SOP_INSTANCE, f"no image box {uid}")
        film, box = found
        if sop_class != box.sop_class:
            raise PrintError(statuses.CLASS_INSTANCE_CONFLICT, f"image box {uid} is a {box.sop_class}")
        context = self._context("image box", uid)
        outcome = _Outcome(True, context)
        position = _int(attrs, "ImageBoxPosition")
        if position is None:
            raise PrintError(statuses.MISSING_ATTRIBUTE, "Image Box Position is missing")
        if position != box.position:
            raise PrintError(statuses.INVALID_ATTRIBUTE_VALUE, f"Image Box Position {position}, box is {box.position}")
        keyword = "BasicColorImageSequence" if box.color else "BasicGrayscaleImageSequence"
        if keyword not in attrs:
            raise PrintError(statuses.MISSING_ATTRIBUTE, f"{keyword} is missing")
        sequence = attrs[keyword].value
        pixels = decode_image(sequence[0], box.color) if sequence else None
        if pixels is not None:
            if self._held_bytes() + pixels.data.nbytes > MAX_ASSOCIATION_BYTES:
                raise PrintError(statuses.INSUFFICIENT_MEMORY, "too much image data on one association")
        polarity = _text(attrs, "Polarity")
        new_polarity = box.polarity
        if polarity is not None:
            if polarity in ("NORMAL", "REVERSE"):
                new_polarity = polarity
            else:
                outcome.default("Polarity", polarity, "NORMAL")
                new_polarity = "NORMAL"
        # What decides the image's size in its box, as the box will have it: an N-SET changes only
        # the attributes it carries (PS3.7 10.1.3), and one sent empty goes back to its default.
        magnification = box.magnification
        if "MagnificationType" in attrs:
            magnification = _text(attrs, "MagnificationType")
            if magnification is not None and magnification not in MAGNIFICATIONS:
                outcome.default("MagnificationType", magnification, film.magnification)
                magnification = None
        requested = box.requested_size_mm
        if "RequestedImageSize" in attrs:
            requested = None
            if attrs.RequestedImageSize not in (None, ""):
                try:
                    requested = float(attrs.RequestedImageSize)
                except (TypeError, ValueError):
                    requested = -1.0
                if requested <= 0:
                    outcome.default("RequestedImageSize", attrs.RequestedImageSize, None)
                    requested = None
        behaviour = box.decimate_crop
        if "RequestedDecimateCropBehavior" in attrs:
            behaviour = _text(attrs, "RequestedDecimateCropBehavior")
            if behaviour is not None and behaviour not in ("DECIMATE", "CROP", "FAIL"):
                outcome.default("RequestedDecimateCropBehavior", behaviour, "DECIMATE")
                behaviour = "DECIMATE"
        plut = box.plut
        if "ReferencedPresentationLUTSequence" in attrs and attrs.ReferencedPresentationLUTSequence:
            plut = self._plut(str(attrs.ReferencedPresentationLUTSequence[0].ReferencedSOPInstanceUID))
        low, high = self._densities(
            attrs,
            box.min_density if box.min_density is not None else film.min_density,
            box.max_density if box.max_density is not None else film.max_density,
            outcome,
        )
        # Does it fit its box? Checked now so the modality hears about it on this N-SET, with
        # what the box will print it with.
        if pixels is not None:
            cell = film.cells()[box.position - 1]
            placed = place_image(
                cell, pixels.rows, pixels.columns, pixels.aspect, magnification or film.magnification,
                requested, behaviour, self.printer.resolution_dpi,
            )
            if placed.outcome == "too-large":
                raise PrintError(statuses.IMAGE_LARGER_THAN_BOX, "image is larger than its image box")
            if placed.outcome == "cropped" and outcome.status == statuses.SUCCESS:
                outcome.status = statuses.IMAGE_CROPPED
            if placed.outcome == "demagnified" and outcome.status == statuses.SUCCESS:
                outcome.status = statuses.IMAGE_DECIMATED if behaviour == "DECIMATE" else statuses.IMAGE_DEMAGNIFIED
        box.pixels = pixels
        film.printed = False
        box.polarity = new_polarity
        box.magnification = magnification
        if "SmoothingType" in attrs:
            box.smoothing = str(attrs.SmoothingType or "")
        if "MinDensity" in attrs:
            box.min_density = low
        if "MaxDensity" in attrs:
            box.max_density = high
        box.requested_size_mm = requested
        box.decimate_crop = behaviour
        box.plut = plut
        if "ConfigurationInformation" in attrs:
            box.configuration = str(attrs.ConfigurationInformation or "")
        LOG.info(
            "%s: position %d %s", context, box.position,
            f"{pixels.columns}x{pixels.rows} {pixels.photometric} {pixels.bits_stored}-bit" if pixels else "erased",
        )
        response = Dataset()
        response.ImageBoxPosition = box.position
        response.Polarity = box.polarity
        return outcome.status, response

    # ---- annotation box ----

    def set_annotation_box(self, uid: str, attrs: Dataset) -> tuple[int, Dataset]:
        found = self.annotation_boxes.get(uid)
        if found is None:
            raise PrintError(statuses.NO_SUCH_SOP_INSTANCE, f"no annotation box {uid}")
        film, annotation = found
        position = _int(attrs, "AnnotationPosition")
        if position is None:
            raise PrintError(statuses.MISSING_ATTRIBUTE, "Annotation Position is missing")
        if position != annotation.position:
            raise PrintError(
                statuses.INVALID_ATTRIBUTE_VALUE, f"Annotation Position {position}, box is {annotation.position}"
            )
        annotation.text = str(attrs.get("TextString", "") or "")
        film.printed = False
        response = Dataset()
        response.AnnotationPosition = annotation.position
        response.TextString = annotation.text
        return statuses.SUCCESS, response

    # ---- presentation LUT ----

    def create_presentation_lut(self, uid: str | None, attrs: Dataset) -> tuple[int, Dataset]:
        self._check_new_uid(uid, "Presentation LUT")
        lut = PresentationLut.from_dataset(attrs)
        lut_uid = uid or generate_uid()
        self.pluts[lut_uid] = lut
        LOG.info("%s: %s", self._context("Presentation LUT", lut_uid),
                 f"{len(lut.table)}-entry table" if lut.table is not None else lut.shape)
        response = Dataset()
        if lut.shape != "TABLE":
            response.PresentationLUTShape = lut.shape
        if uid is None:
            response.AffectedSOPInstanceUID = lut_uid
        return statuses.SUCCESS, response

    def _plut(self, uid: str) -> PresentationLut:
        lut = self.pluts.get(uid)
        if lut is None:
            raise PrintError(statuses.INVALID_ATTRIBUTE_VALUE, f"Presentation LUT {uid} does not exist")
        return lut

    def delete_presentation_lut(self, uid: str) -> int:
        # Film and image boxes hold the LUT itself, so deleting the instance cannot break them.
        if self.pluts.pop(uid, None) is None:
            raise PrintError(statuses.NO_SUCH_SOP_INSTANCE, f"no Presentation LUT {uid}")
        return statuses.SUCCESS

    # ---- printing ----

    def printed(self, request: PrintRequest) -> None:
        """The request's films are in the print queue: releasing the association loses nothing."""
        for film in request.films:
            film.printed = True

    def print_film_box(self, uid: str) -> tuple[int, PrintRequest | None]:
        film = self._film_box(uid)
        assert self.session is not None
        if not film.has_images:
            LOG.warning("%s: film box has no images; nothing printed", self._context("film box", uid))
            return statuses.FILM_BOX_HAS_NO_IMAGES, None
        return statuses.SUCCESS, PrintRequest((film,), self.session, "film box")

    def print_film_session(self, uid: str) -> tuple[int, PrintRequest | None]:
        session = self._session(uid)
        if not session.film_boxes:
            raise PrintError(statuses.NO_FILM_BOXES, "the film session has no film boxes")
        films = tuple(film for film in session.film_boxes if film.has_images)
        if not films:
            LOG.warning("%s: no film box has images; nothing printed", self._context("film session", uid))
            return statuses.SESSION_HAS_NO_IMAGES, None
        return statuses.SUCCESS, PrintRequest(films, session, "film session")
