"""Film geometry: Film Size IDs, paper, where a film sits on the page, where each image box and
each image sits on the film, and what a DICOM density looks like as a gray level.

Everything here is pure arithmetic in PostScript points (1/72 inch); film coordinates have their
origin at the film's bottom-left corner, as PostScript's do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

POINTS_PER_INCH = 72.0
MM_PER_INCH = 25.4

# Portrait paper sizes in points.
PAPER_POINTS: dict[str, tuple[float, float]] = {
    "A5": (419.53, 595.28),
    "A4": (595.28, 841.89),
    "A3": (841.89, 1190.55),
    "LETTER": (612.0, 792.0),
    "LEGAL": (612.0, 1008.0),
    "TABLOID": (792.0, 1224.0),
}
# Media names lp understands for the same papers.
PAPER_MEDIA = {"A5": "A5", "A4": "A4", "A3": "A3", "LETTER": "Letter", "LEGAL": "Legal", "TABLOID": "Tabloid"}

# Film Size IDs that are not of the <w>INX<h>IN / <w>CMX<h>CM form (PS3.3 C.13.8).
_NAMED_FILM_SIZES = {"A4": (210 / MM_PER_INCH, 297 / MM_PER_INCH), "A3": (297 / MM_PER_INCH, 420 / MM_PER_INCH)}
_FILM_SIZE = re.compile(r"(\d+(?:_\d+)?)(IN|CM)X(\d+(?:_\d+)?)(IN|CM)")

# Space between image boxes and around them, as a fraction of the film's shorter side.
CELL_GAP_FRACTION = 0.01


def parse_film_size(film_size_id: str) -> tuple[float, float] | None:
    """Film Size ID -> (width, height) in inches, width <= height; None if not a film size.

    ``8_5INX11IN`` uses "_" as the decimal point. Any <w>INX<h>IN or <w>CMX<h>CM is accepted,
    so a site can configure sizes outside the standard's list (e.g. 17INX17IN)."""
    text = film_size_id.strip().upper()
    if text in _NAMED_FILM_SIZES:
        return _NAMED_FILM_SIZES[text]
    match = _FILM_SIZE.fullmatch(text)
    if not match:
        return None
    width, height = (float(match.group(i).replace("_", ".")) for i in (1, 3))
    width /= 2.54 if match.group(2) == "CM" else 1.0
    height /= 2.54 if match.group(4) == "CM" else 1.0
    if not (0.5 <= width <= 60 and 0.5 <= height <= 60):
        return None
    return (min(width, height), max(width, height))


@dataclass(frozen=True)
class Rect:
    x: float
    y: float
    w: float
    h: float

    def contains(self, other: Rect, tolerance: float = 0.5) -> bool:
        return other.w <= self.w + tolerance and other.h <= self.h + tolerance


@dataclass(frozen=True)
class Placement:
    """A film on a page. The page is always portrait paper; a landscape film is turned a
    quarter turn counter-clockwise (its top edge along the paper's left edge), which is what
    a portrait-only paper tray can print."""

    paper: str
    page_w: float
    page_h: float
    film_w: float  # film points, as oriented (landscape: wider than high)
    film_h: float
    scale: float  # paper points per film point
    rotated: bool
    # Where the film's origin lands on the page, after rotation, in page points.
    origin_x: float
    origin_y: float

    @property
    def media(self) -> str:
        return PAPER_MEDIA.get(self.paper, self.paper)


def place_film(
    film_size: tuple[float, float],
    orientation: Literal["PORTRAIT", "LANDSCAPE"],
    paper: str,
    scaling: Literal["fit", "true-size"],
    margin_mm: float,
) -> Placement:
    """Centre a film on its paper with the printer's unprintable margin, keeping its aspect ratio."""
    width_in, height_in = film_size
    film_w, film_h = width_in * POINTS_PER_INCH, height_in * POINTS_PER_INCH
    if orientation == "LANDSCAPE":
        film_w, film_h = film_h, film_w
    paper = paper.upper()
    if paper == "FILM":
        # The page is the film itself (film printers, archives, PDFs): portrait always.
        page_w, page_h = min(film_w, film_h), max(film_w, film_h)
        margin = 0.0
    else:
        page_w, page_h = PAPER_POINTS[paper]
        margin = margin_mm / MM_PER_INCH * POINTS_PER_INCH
    rotated = film_w > film_h
    # The film's extent along the page's x and y axes.
    along_x, along_y = (film_h, film_w) if rotated else (film_w, film_h)
    fit = min((page_w - 2 * margin) / along_x, (page_h - 2 * margin) / along_y)
    scale = fit if scaling == "fit" else min(1.0, fit)
    used_x, used_y = along_x * scale, along_y * scale
    left, bottom = (page_w - used_x) / 2, (page_h - used_y) / 2
    # Rotating 90 degrees counter-clockwise maps film (0,0) to the page's bottom-right corner
    # of the used area.
    origin_x, origin_y = (left + used_x, bottom) if rotated else (left, bottom)
    return Placement(paper, page_w, page_h, film_w, film_h, scale, rotated, origin_x, origin_y)


def film_area(film_w: float, film_h: float, annotation_band: float) -> tuple[Rect, float]:
    """The film's area for image boxes (above the annotation band) and the gap between boxes."""
    gap = CELL_GAP_FRACTION * min(film_w, film_h)
    return Rect(gap, gap + annotation_band, film_w - 2 * gap, film_h - 2 * gap - annotation_band), gap


def annotation_band_height(film_w: float, film_h: float) -> float:
    """Height reserved at the bottom of a film for annotation text: 3 % of it, at least 14 pt."""
    return max(14.0, 0.03 * film_h)


def cell_rects(kind: Literal["ROW", "COL"], counts: tuple[int, ...], area: Rect, gap: float) -> list[Rect]:
    """Image box rectangles in Image Box Position order (position 1 first).

    ROW: ``counts[i]`` boxes in row i, rows top to bottom, numbered left to right then down.
    COL: ``counts[i]`` boxes in column i, columns left to right, numbered top to bottom then
    right. (STANDARD\\C,R is ROW with R rows of C boxes.)"""
    rects: list[Rect] = []
    lines = len(counts)
    if kind == "ROW":
        row_h = (area.h - gap * (lines - 1)) / lines
        for r, n in enumerate(counts):
            cell_w = (area.w - gap * (n - 1)) / n
            y = area.y + area.h - (r + 1) * row_h - r * gap
            rects.extend(Rect(area.x + c * (cell_w + gap), y, cell_w, row_h) for c in range(n))
    else:
        col_w = (area.w - gap * (lines - 1)) / lines
        for c, n in enumerate(counts):
            cell_h = (area.h - gap * (n - 1)) / n
            x = area.x + c * (col_w + gap)
            rects.extend(
                Rect(x, area.y + area.h - (r + 1) * cell_h - r * gap, col_w, cell_h) for r in range(n)
            )
    return rects


Outcome = Literal["fit", "cropped", "demagnified", "too-large"]


@dataclass(frozen=True)
class ImagePlacement:
    rect: Rect  # where the whole image is drawn (may extend past the cell when cropped)
    clip: bool  # draw through a clip to the cell: whatever extends past it is not printed
    outcome: Outcome


def place_image(
    cell: Rect,
    rows: int,
    columns: int,
    aspect: tuple[int, int],
    magnification: str,
    requested_size_mm: float | None,
    decimate_crop: str | None,
    resolution_dpi: int,
) -> ImagePlacement:
    """Where an image goes in its box: its requested width (Requested Image Size, mm), its size at
    printer resolution (Magnification Type NONE), or as large as fits; centred.

    An image larger than its box is shrunk to fit ("demagnified"), cropped (CROP) or refused
    (FAIL), as Requested Decimate/Crop Behavior asks. The image box N-SET refuses a FAIL image
    that does not fit; one that a later change (the film box's Magnification Type) made too
    large is placed as for CROP, so that no image is ever drawn outside its box (PS3.3 C.13.5)."""
    vertical, horizontal = aspect
    width_units, height_units = columns * horizontal, rows * vertical
    if requested_size_mm:
        w = requested_size_mm / MM_PER_INCH * POINTS_PER_INCH
        h = w * height_units / width_units
    elif magnification == "NONE":
        w = columns / resolution_dpi * POINTS_PER_INCH
        h = w * height_units / width_units
    else:
        fit = min(cell.w / width_units, cell.h / height_units)
        w, h = width_units * fit, height_units * fit
    outcome: Outcome = "fit"
    clip = False
    if not cell.contains(Rect(0, 0, w, h)):
        if decimate_crop == "FAIL":
            outcome, clip = "too-large", True
        elif decimate_crop == "CROP":
            outcome, clip = "cropped", True
        else:
            fit = min(cell.w / w, cell.h / h)
            w, h = w * fit, h * fit
            outcome = "demagnified"
    rect = Rect(cell.x + (cell.w - w) / 2, cell.y + (cell.h - h) / 2, w, h)
    return ImagePlacement(rect, clip, outcome)


def magnification_factor(
    rows: int, columns: int, printed_w_pt: float, printed_h_pt: float, resolution_dpi: int, max_pixels: int
) -> int:
    """The integer factor by which to magnify an image in numpy so it approaches the printer's
    resolution in its printed size, without exceeding ``max_pixels`` output pixels."""
    dots_w = printed_w_pt / POINTS_PER_INCH * resolution_dpi
    dots_h = printed_h_pt / POINTS_PER_INCH * resolution_dpi
    factor = int(min(dots_w / columns, dots_h / rows))
    if max_pixels > 0:
        factor = min(factor, int(math.sqrt(max_pixels / (rows * columns))))
    return max(1, min(factor, 16))


def density_to_gray(density: str | int) -> float:
    """A DICOM density (BLACK, WHITE, or hundredths of optical density) as a PostScript gray
    level: the fraction of light the paper reflects, 10^-OD."""
    if isinstance(density, str):
        word = density.strip().upper()
        if word == "BLACK":
            return 0.0
        if word == "WHITE":
            return 1.0
        density = int(word)
    return 10.0 ** (-density / 100.0)


def parse_density(value: object) -> str | int | None:
    """Border/Empty Image Density as sent: BLACK, WHITE or an integer string; None if invalid."""
    text = str(value).strip().upper()
    if text in ("BLACK", "WHITE"):
        return text
    if text.isdigit() and int(text) <= 400:
        return int(text)
    return None
