"""The ``print:`` section of the configuration, as frozen dataclasses.

``appliance/config.py`` reads this section with the mechanism in ``appliance/yamlschema.py``: each
field's type hint says how its YAML value is read and checked, a field with a default is optional,
unknown keys are errors. The print SCP listens on ONE port; each printer answers to its own called
AE title on that port, so a modality is configured with (AE title, host, port) per printer.

Example::

    print:
      enabled: true
      port: 10400
      printers:
        ward:
          ae_title: WARDLASER
          backend: cups
          cups_queue: ward_laser
          paper: {14INX17IN: A3, 11INX14IN: A3}
          default_paper: A4
        archive:
          ae_title: FILMARCHIVE
          backend: directory
          directory: /var/lib/appliance/print/archive
          pdf: true
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Literal

from ..valuetypes import DURATION, AETitle, BindAddress, Duration, Port, above_zero
from ..yamlschema import Check

# ---- value types of this section (the shared ones come from valuetypes) ----

# Densities are in hundredths of optical density, as DICOM sends them (150 = 1.5 OD).
DensityValue = Annotated[int, Check(lambda d: 0 <= d <= 400, "a density 0-400 (hundredths of OD)")]
DensityWord = Annotated[str, Check(lambda s: s in ("BLACK", "WHITE") or (s.isdigit() and int(s) <= 400),
                                   'BLACK, WHITE or a density such as "150"')]

PAPER_NAMES = ("A4", "A3", "A5", "LETTER", "LEGAL", "TABLOID", "FILM")
Paper = Annotated[str, Check(lambda s: s.upper() in PAPER_NAMES, "a paper size: " + ", ".join(PAPER_NAMES))]


def _is_film_size(text: str) -> bool:
    # Imported late: layout imports nothing from here, but keep the settings module light.
    from .layout import parse_film_size

    return parse_film_size(text) is not None


FilmSize = Annotated[str, Check(_is_film_size, 'a Film Size ID such as "14INX17IN", "24CMX30CM", "A4"')]
def _film_size_keys(mapping: Mapping[str, str]) -> bool:
    return all(_is_film_size(key) for key in mapping)


# Type aliases are built here, at import: an annotation is evaluated later with the class as its
# globals, where a lambda could not see this module's functions.
PaperMap = Annotated[Mapping[str, Paper], Check(_film_size_keys, "Film Size IDs as keys")]
CalibrationLut = Annotated[
    tuple[int, ...],
    Check(lambda t: len(t) == 256 and all(0 <= v <= 255 for v in t), "a list of 256 values 0-255"),
]


@dataclass(frozen=True)
class PrintRetry:
    """Backoff for a printer that does not take a job: first delay, growth, cap, and when to give
    up (``max_attempts`` 0 = keep trying; ``give_up_after`` since the job was queued)."""

    # 0 would resend to a printer that is off as fast as it refuses; max_delay is at least
    # initial_delay (config.py's cross-check, as for a destination).
    initial_delay: Annotated[float, DURATION, above_zero("10s")] = 10.0
    factor: Annotated[float, Check(lambda f: f >= 1.0, "a number of at least 1")] = 2.0
    max_delay: Annotated[float, DURATION, above_zero("5m")] = 300.0
    max_attempts: Annotated[int, Check(lambda n: n >= 0, "0 (no limit) or more")] = 0
    give_up_after: Annotated[float, DURATION, above_zero(
        "3d", "0 would fail every job at its first refusal: for that write max_attempts: 1")] = 3 * 86400.0


@dataclass(frozen=True)
class PrinterConfig:
    """One printer, selected by the called AE title a modality uses."""

    ae_title: AETitle
    # cups: `lp -d cups_queue`; socket: raw TCP (AppSocket/JetDirect) to host:socket_port;
    # directory: PostScript (and optionally PDF) files in `directory`, readable by all (0644).
    backend: Literal["cups", "socket", "directory"]
    description: str = ""
    cups_queue: str | None = None
    # host:port or a socket path of the CUPS scheduler; none = the system default.
    cups_server: str | None = None
    host: str | None = None
    socket_port: Port = 9100
    directory: str | None = None
    pdf: bool = False
    # Film Size ID -> paper; film sizes not listed go on default_paper. Printer Configuration
    # Retrieval lists default_film_size and these film sizes as the media installed.
    paper: PaperMap = field(default_factory=lambda: MappingProxyType({}))
    default_paper: Paper = "A4"
    # fit: scale each film to fill the printable area; true-size: 1:1 unless it does not fit.
    scaling: Literal["fit", "true-size"] = "fit"
    margin_mm: Annotated[float, Check(lambda m: 0 <= m <= 30, "0-30 mm")] = 4.0
    # Defaults for film box attributes the modality does not send (or sends unsupported values of).
    default_film_size: FilmSize = "14INX17IN"
    default_orientation: Literal["PORTRAIT", "LANDSCAPE"] = "PORTRAIT"
    default_magnification: Literal["REPLICATE", "BILINEAR", "CUBIC", "NONE"] = "BILINEAR"
    # On paper a black border wastes toner: WHITE unless the modality asks for something else.
    default_border_density: DensityWord = "WHITE"
    default_empty_image_density: DensityWord = "WHITE"
    # The printable density range; requested Min/Max Density are clamped to it.
    min_density: DensityValue = 0
    max_density: DensityValue = 300
    # Paper is white: a film's Min Density (film base + fog) is not printed as grey.
    paper_white: bool = True
    # Resolution the printer renders at, for magnification and Magnification Type NONE.
    resolution_dpi: Annotated[int, Check(lambda d: 72 <= d <= 1200, "72-1200")] = 300
    # Small images are magnified in numpy by an integer factor up to this many output pixels.
    max_magnified_pixels: Annotated[int, Check(lambda n: n >= 0, "0 or more")] = 12_000_000
    calibration_lut: CalibrationLut | None = None
    compression: Literal["flate", "dct"] = "flate"
    jpeg_quality: Annotated[int, Check(lambda q: 50 <= q <= 100, "50-100")] = 92
    # Annotation boxes created per film box when the modality negotiates Basic Annotation Box.
    annotation_boxes: Annotated[int, Check(lambda n: 0 <= n <= 8, "0-8")] = 2
    max_copies: Annotated[int, Check(lambda n: 1 <= n <= 99, "1-99")] = 10
    max_image_boxes: Annotated[int, Check(lambda n: 1 <= n <= 100, "1-100")] = 48
    manufacturer: str = "Edge DICOM appliance"
    model_name: str = "PostScript print server"
    retry: PrintRetry = field(default_factory=PrintRetry)
    # Seconds a printer-status probe (for Printer N-GET) may take; 0 would make every probe fail.
    status_timeout: Annotated[float, DURATION, above_zero("2s")] = 2.0


def _unique_ae_titles(printers: Mapping[str, PrinterConfig]) -> bool:
    titles = [p.ae_title.strip() for p in printers.values()]
    return len(titles) == len(set(titles))


def _backends_complete(printers: Mapping[str, PrinterConfig]) -> bool:
    return all(backend_problem(p) is None for p in printers.values())


def backend_problem(printer: PrinterConfig) -> str | None:
    """What is missing for the printer's backend, or None."""
    if printer.backend == "cups" and not printer.cups_queue:
        return "backend cups needs cups_queue"
    if printer.backend == "socket" and not printer.host:
        return "backend socket needs host"
    if printer.backend == "directory" and not printer.directory:
        return "backend directory needs directory"
    return None


Printers = Annotated[
    Mapping[str, PrinterConfig],
    Check(_unique_ae_titles, "printers with distinct AE titles"),
    Check(_backends_complete, "each printer's backend settings (cups_queue / host / directory)"),
]


@dataclass(frozen=True)
class PrintConfig:
    """The print SCP: one listening port, one AE title per printer."""

    enabled: bool = False
    bind_address: BindAddress = "0.0.0.0"
    port: Port = 10400
    max_associations: Annotated[int, Check(lambda n: n >= 1, "an integer of at least 1")] = 4
    # Empty = any calling AE title.
    allowed_calling_aes: tuple[AETitle, ...] = ()
    printers: Printers = field(default_factory=lambda: MappingProxyType({}))
    # Printed jobs keep their preview (and row) this long; their PostScript is removed at once.
    keep_printed_for: Duration = 30 * 86400.0

    def printer_for(self, called_ae: str) -> tuple[str, PrinterConfig] | None:
        """The (name, printer) a called AE title selects."""
        for name, printer in self.printers.items():
            if printer.ae_title.strip() == called_ae.strip():
                return name, printer
        return None
