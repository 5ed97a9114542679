"""The Printer Configuration Retrieval answer (PS3.4 H.4.11, PS3.3 Printer Configuration module):
what one printer supports, read from its configuration and from the limits the session model
enforces, so that a modality choosing film sizes, layouts and densities from it is never refused.

Pure: a printer's configuration in, the N-GET's attributes out.
"""

from __future__ import annotations

import math

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .errors import PrintError
from .layout import MM_PER_INCH, POINTS_PER_INCH, parse_film_size
from .model import (
    COLOR_META,
    MAGNIFICATIONS,
    MAX_BOXES_PER_LINE,
    META_SOP_CLASSES,
    OPTIONAL_SOP_CLASSES,
    PRINTED_MEDIUM,
    DisplayFormat,
    image_box_rects,
)
from .pixels import COLOR_BITS, GRAY_BIT_DEPTHS
from .postscript import BITS_PER_COMPONENT
from .settings import PrinterConfig

# Film boxes answer Requested Resolution ID HIGH too, but print at the printer's one resolution.
PRINTER_RESOLUTION_ID = "STANDARD"
# Maximum Collated Films must be a number; the SCP sets no limit on the films of a session (only
# on the pixels one association holds), so it is the largest an IS can carry.
NO_FILM_LIMIT = 2**31 - 1


def installed_film_sizes(printer: PrinterConfig) -> list[str]:
    """The default film size first (the standard's item 1 is the printer's default), then every
    film size the printer has a paper for."""
    sizes = [printer.default_film_size.strip().upper()]
    for size in printer.paper:
        if size.strip().upper() not in sizes:
            sizes.append(size.strip().upper())
    return sizes


def standard_display_formats(printer: PrinterConfig) -> list[DisplayFormat]:
    """Every STANDARD\\C,R a film box N-CREATE accepts on this printer, fewest boxes first."""
    formats = []
    for columns in range(1, MAX_BOXES_PER_LINE + 1):
        for rows in range(1, MAX_BOXES_PER_LINE + 1):
            try:
                formats.append(DisplayFormat.parse(f"STANDARD\\{columns},{rows}", printer.max_image_boxes))
            except PrintError:
                continue
    return sorted(formats, key=lambda f: (f.cells, f.counts[0]))


def printer_configuration(printer_name: str, printer: PrinterConfig) -> Dataset:
    """Printer Configuration Sequence: one item per Meta SOP class."""
    ds = Dataset()
    ds.PrinterConfigurationSequence = Sequence(
        [_configuration(printer_name, printer, meta) for meta in META_SOP_CLASSES]
    )
    return ds


def _configuration(printer_name: str, printer: PrinterConfig, meta: str) -> Dataset:
    item = Dataset()
    item.SOPClassesSupported = [meta, *OPTIONAL_SOP_CLASSES]
    item.MaximumMemoryAllocation = 0  # the standard's value when Memory Allocation is not supported
    item.MemoryBitDepth = COLOR_BITS if meta == COLOR_META else max(stored for _, stored in GRAY_BIT_DEPTHS)
    item.PrintingBitDepth = BITS_PER_COMPONENT
    item.MediaInstalledSequence = Sequence([
        _medium(number, size, printer) for number, size in enumerate(installed_film_sizes(printer), start=1)
    ])
    # Every film size the printer takes is installed: paper is all it prints on.
    item.OtherMediaAvailableSequence = Sequence([])
    item.SupportedImageDisplayFormatsSequence = Sequence([
        _display_format(display, orientation, size, printer)
        for size in installed_film_sizes(printer)
        for orientation in ("PORTRAIT", "LANDSCAPE")
        for display in standard_display_formats(printer)
    ])
    item.DefaultPrinterResolutionID = PRINTER_RESOLUTION_ID
    item.DefaultMagnificationType = printer.default_magnification
    item.OtherMagnificationTypesAvailable = [m for m in MAGNIFICATIONS if m != printer.default_magnification]
    # Smoothing Type is recorded and echoed but changes nothing: there is no smoothing type.
    item.DefaultSmoothingType = ""
    item.OtherSmoothingTypesAvailable = ""
    item.ConfigurationInformationDescription = (
        "Configuration Information is recorded and echoed; it does not change the print. Tone is set"
        " by Presentation LUTs and the printer's calibration."
    )
    item.MaximumCollatedFilms = NO_FILM_LIMIT
    # Requested Decimate/Crop Behavior is honoured; without it a too-large image is shrunk.
    item.DecimateCropResult = "DEF DECIMATE"
    item.Manufacturer = printer.manufacturer
    item.ManufacturerModelName = printer.model_name
    item.PrinterName = printer_name[:64]
    return item


def _medium(number: int, film_size: str, printer: PrinterConfig) -> Dataset:
    medium = Dataset()
    medium.ItemNumber = number
    medium.MediumType = PRINTED_MEDIUM
    medium.FilmSizeID = film_size
    medium.MinDensity = printer.min_density
    medium.MaxDensity = printer.max_density
    return medium


def _display_format(display: DisplayFormat, orientation: str, film_size: str, printer: PrinterConfig) -> Dataset:
    """One layout on one film: the printable pixels of each of its image boxes (all the same size
    in a STANDARD layout) at the printer's resolution, which is also the largest image Magnification
    Type NONE prints without shrinking it."""
    size = parse_film_size(film_size)
    assert size is not None  # validated with the configuration
    box = image_box_rects(size, orientation, display, annotations=False)[0]
    dots_per_point = printer.resolution_dpi / POINTS_PER_INCH
    spacing = MM_PER_INCH / printer.resolution_dpi
    item = Dataset()
    item.Rows = math.floor(box.h * dots_per_point)
    item.Columns = math.floor(box.w * dots_per_point)
    item.ImageDisplayFormat = display.text
    item.FilmOrientation = orientation
    item.FilmSizeID = film_size
    item.PrinterResolutionID = PRINTER_RESOLUTION_ID
    item.PrinterPixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    item.RequestedImageSizeFlag = "YES"
    return item
