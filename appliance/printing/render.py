"""Films to pages: one PostScript page per film box (and a small PNG preview of the films).

Each image box is drawn once at its own resolution (magnified by an integer factor in numpy when
it is much smaller than its printed size) and scaled into place by the PostScript CTM; the film
itself is never rasterised here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from .layout import Placement, Rect, density_to_gray, magnification_factor, place_film, place_image
from .model import FilmBox, ImageBox, PrintRequest
from .pixels import CHUNK_ROWS, color_lut, gray_lut, iter_chunks, magnify, printed
from .postscript import PostScriptWriter
from .settings import PrinterConfig

PREVIEW_LONG_SIDE = 480
# Annotation text is not shrunk below this size on paper (points), to stay readable.
MIN_ANNOTATION_POINTS = 6.0


@dataclass(frozen=True)
class RenderResult:
    pages: int
    media: str  # paper of the first page, as lp names it


def paper_for(film: FilmBox, printer: PrinterConfig) -> str:
    return printer.paper.get(film.film_size_id, printer.default_paper).upper()


def placement_for(film: FilmBox, printer: PrinterConfig) -> Placement:
    return place_film(
        film.film_size, film.orientation, paper_for(film, printer),  # type: ignore[arg-type]
        printer.scaling, printer.margin_mm,
    )


def _lut(film: FilmBox, box: ImageBox, printer: PrinterConfig) -> np.ndarray:
    assert box.pixels is not None
    reverse = box.polarity == "REVERSE"
    if box.pixels.is_color:
        return color_lut(reverse)
    return gray_lut(
        box.pixels,
        box.plut if box.plut is not None else film.plut,
        reverse,
        box.min_density if box.min_density is not None else film.min_density,
        box.max_density if box.max_density is not None else film.max_density,
        printer.paper_white,
        printer.calibration_lut,
    )


def _rows(image: np.ndarray) -> list[np.ndarray]:
    return [image[start : start + CHUNK_ROWS] for start in range(0, image.shape[0], CHUNK_ROWS)]


def _draw_image(writer: PostScriptWriter, film: FilmBox, box: ImageBox, cell: Rect, scale: float,
                printer: PrinterConfig) -> None:
    pixels = box.pixels
    assert pixels is not None
    magnification = box.magnification or film.magnification
    placed = place_image(
        cell, pixels.rows, pixels.columns, pixels.aspect, magnification, box.requested_size_mm,
        box.decimate_crop, printer.resolution_dpi,
    )
    lut = _lut(film, box, printer)
    clip = cell if placed.clip else None
    interpolate = magnification in ("BILINEAR", "CUBIC")
    factor = 1
    if magnification in ("REPLICATE", "BILINEAR", "CUBIC"):
        factor = magnification_factor(
            pixels.rows, pixels.columns, placed.rect.w * scale, placed.rect.h * scale,
            printer.resolution_dpi, printer.max_magnified_pixels,
        )
    if factor == 1 and printer.compression == "flate":
        # The common case for CR/DX/CT: stream straight from the received pixels.
        writer.image(placed.rect, pixels.columns, pixels.rows, iter_chunks(pixels, lut),
                     color=pixels.is_color, interpolate=interpolate, clip=clip)
        return
    image = magnify(printed(pixels, lut), factor, magnification)
    if printer.compression == "dct":
        writer.image_jpeg(placed.rect, image, printer.jpeg_quality, interpolate=interpolate, clip=clip)
    else:
        writer.image(placed.rect, image.shape[1], image.shape[0], _rows(image),
                     color=pixels.is_color, interpolate=interpolate, clip=clip)


def render_postscript(request: PrintRequest, printer: PrinterConfig, out: BinaryIO, title: str) -> RenderResult:
    """Write the films of a print request as a PostScript Level 3 document."""
    placements = [placement_for(film, printer) for film in request.films]
    writer = PostScriptWriter(out)
    first = placements[0]
    writer.begin(len(request.films), first.page_w, first.page_h, title, "Edge DICOM appliance print SCP")
    for film, placement in zip(request.films, placements, strict=True):
        writer.begin_page(placement.page_w, placement.page_h, placement.media)
        writer.film_transform(placement)
        border = density_to_gray(film.border_density)
        empty = density_to_gray(film.empty_image_density)
        # Trim lines and text must show against the border.
        contrast = 0.0 if border > 0.5 else 1.0
        writer.fill_rect(Rect(0, 0, placement.film_w, placement.film_h), border)
        for box, cell in zip(film.image_boxes, film.cells(), strict=True):
            if box.pixels is None:
                writer.fill_rect(cell, empty)
                continue
            _draw_image(writer, film, box, cell, placement.scale, printer)
            if film.trim:
                writer.stroke_rect(cell, contrast, 0.75)
        _draw_annotations(writer, film, placement, contrast)
        writer.end_page()
    writer.end()
    return RenderResult(len(request.films), first.media)


def _draw_annotations(writer: PostScriptWriter, film: FilmBox, placement: Placement, gray: float) -> None:
    """Annotation boxes side by side in the band at the bottom of the film, position 1 leftmost."""
    if not film.annotations:
        return
    from .layout import annotation_band_height, film_area

    band = annotation_band_height(placement.film_w, placement.film_h)
    area, gap = film_area(placement.film_w, placement.film_h, band)
    width = area.w / len(film.annotations)
    size = band * 0.6
    # Shrunk to fit its box, but no smaller than this on paper; the rest is clipped.
    min_size = min(size, MIN_ANNOTATION_POINTS / placement.scale)
    for annotation in film.annotations:
        if annotation.text:
            x = area.x + (annotation.position - 1) * width
            # Each text in its own box, with white space before the next one.
            box = Rect(x, gap, width - size * 0.5, band)
            writer.text(box, gap + band * 0.25, size, min_size, gray, annotation.text)


# ---- preview -----------------------------------------------------------------------------------

def render_preview(film: FilmBox, printer: PrinterConfig) -> np.ndarray:
    """A small raster of the film as oriented (not as placed on paper), 8-bit gray or RGB."""
    film_w, film_h = film.film_points()
    scale = PREVIEW_LONG_SIDE / max(film_w, film_h)
    width, height = max(1, round(film_w * scale)), max(1, round(film_h * scale))
    color = any(box.pixels is not None and box.pixels.is_color for box in film.image_boxes)
    shape = (height, width, 3) if color else (height, width)
    canvas = np.full(shape, round(density_to_gray(film.border_density) * 255), dtype=np.uint8)

    def pixel_box(rect: Rect) -> tuple[int, int, int, int]:
        x0, x1 = round(rect.x * scale), round((rect.x + rect.w) * scale)
        y0, y1 = round((film_h - rect.y - rect.h) * scale), round((film_h - rect.y) * scale)
        return max(0, y0), min(height, y1), max(0, x0), min(width, x1)

    for box, cell in zip(film.image_boxes, film.cells(), strict=True):
        cy0, cy1, cx0, cx1 = pixel_box(cell)
        if box.pixels is None:
            canvas[cy0:cy1, cx0:cx1] = round(density_to_gray(film.empty_image_density) * 255)
            continue
        pixels = box.pixels
        placed = place_image(
            cell, pixels.rows, pixels.columns, pixels.aspect, box.magnification or film.magnification,
            box.requested_size_mm, box.decimate_crop, printer.resolution_dpi,
        )
        y0, y1, x0, x1 = pixel_box(placed.rect)
        if placed.clip:
            y0, y1, x0, x1 = max(y0, cy0), min(y1, cy1), max(x0, cx0), min(x1, cx1)
        if y1 <= y0 or x1 <= x0:
            continue
        full_y0, full_y1, full_x0, full_x1 = pixel_box(placed.rect) if not placed.clip else (
            round((film_h - placed.rect.y - placed.rect.h) * scale), round((film_h - placed.rect.y) * scale),
            round(placed.rect.x * scale), round((placed.rect.x + placed.rect.w) * scale),
        )
        rows_index = ((np.arange(y0, y1) - full_y0 + 0.5) / max(full_y1 - full_y0, 1) * pixels.rows).astype(int)
        cols_index = ((np.arange(x0, x1) - full_x0 + 0.5) / max(full_x1 - full_x0, 1) * pixels.columns).astype(int)
        sample = pixels.data[np.clip(rows_index, 0, pixels.rows - 1)][:, np.clip(cols_index, 0, pixels.columns - 1)]
        tile = _lut(film, box, printer)[sample]
        if color and tile.ndim == 2:
            tile = np.repeat(tile[:, :, None], 3, axis=2)
        canvas[y0:y1, x0:x1] = tile
    return canvas
