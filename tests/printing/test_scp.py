"""The Print SCP against a pynetdicom Print SCU: every layout family, color, polarity, densities,
orientation, magnification, Presentation LUTs, annotations, statuses and error cases. Every
printed film is rendered with Ghostscript and checked where a person would look."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    BasicAnnotationBox,
    BasicColorPrintManagementMeta,
    BasicFilmBox,
    BasicFilmSession,
    BasicGrayscaleImageBox,
    BasicGrayscalePrintManagementMeta,
    PresentationLUT,
    Printer,
    PrinterConfigurationRetrieval,
    Verification,
)

from appliance.config import Timeouts
from appliance.printing import statuses

from ..peers import DCMTK_ENV, require_tool
from .conftest import RunningPrinter, ghostscript, printer
from .scu import PrintSCU, color_item, gray_item

FILM_W, FILM_H = 576, 720  # 8INX10IN at 72 dpi


def flat(value: int, size: int = 64, bits: int = 8) -> np.ndarray:
    return np.full((size, size), value, dtype=np.uint16 if bits > 8 else np.uint8)


def print_film(box: RunningPrinter, display_format: str, images: list[Any], color: bool = False,
               session: dict[str, Any] | None = None, image_attrs: dict[str, Any] | None = None,
               **film_attrs: Any) -> np.ndarray:
    """Print one film box through the SCP and return the first page as Ghostscript renders it."""
    before = len(box.printed_files())
    with PrintSCU(box.port, "TESTPRINT", color=color) as scu:
        assert scu.create_session(**(session or {})).status == 0
        film = scu.create_film_box(display_format, **film_attrs)
        assert film.status == 0, hex(film.status)
        for position, item in enumerate(images, start=1):
            if item is not None:
                reply = scu.set_image(film.dataset, position, item, color=color, **(image_attrs or {}))
                assert reply.status == 0, hex(reply.status)
        assert scu.print_film_box(film.uid) == 0
    box.wait_jobs(before + 1)
    files = box.printed_files()
    assert len(files) == before + 1
    pages = ghostscript(files[-1], device="png16m" if color else "pnggray")
    return pages[0]


def cell_centre(kind: str, counts: tuple[int, ...], position: int, width: int = FILM_W,
                height: int = FILM_H) -> tuple[int, int]:
    """(row, column) in page pixels of the middle of an image box, from the display format alone:
    ROW numbers left to right then down, COL top to bottom then right."""
    index, line = position - 1, 0
    while index >= counts[line]:
        index -= counts[line]
        line += 1
    n, lines = counts[line], len(counts)
    if kind == "ROW":
        return int((line + 0.5) / lines * height), int((index + 0.5) / n * width)
    return int((index + 0.5) / n * height), int((line + 0.5) / lines * width)


# ---- layouts -------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("display_format", "kind", "counts"),
    [
        (r"STANDARD\1,1", "ROW", (1,)),
        (r"STANDARD\2,3", "ROW", (2, 2, 2)),
        (r"STANDARD\3,2", "ROW", (3, 3)),
        (r"ROW\1,3", "ROW", (1, 3)),
        (r"COL\2,1,3", "COL", (2, 1, 3)),
    ],
)
def test_every_layout_family_puts_each_image_in_its_box(
    print_server: Callable[..., RunningPrinter], display_format: str, kind: str, counts: tuple[int, ...]
) -> None:
    box = print_server()
    cells = sum(counts)
    values = [20 + 30 * n for n in range(cells)]
    page = print_film(box, display_format, [gray_item(flat(v)) for v in values])
    assert page.shape == (FILM_H, FILM_W)
    for position, value in enumerate(values, start=1):
        y, x = cell_centre(kind, counts, position)
        assert abs(int(page[y, x]) - value) <= 1, f"{display_format} position {position} at ({y},{x})"
    # The default border on paper is WHITE.
    assert page[1, 1] == 255


def test_empty_image_boxes_and_borders_print_at_the_requested_density(
    print_server: Callable[..., RunningPrinter],
) -> None:
    box = print_server()
    page = print_film(box, r"STANDARD\2,1", [gray_item(flat(128)), None],
                      BorderDensity="150", EmptyImageDensity="BLACK")
    # 1.5 OD reflects 10^-1.5 of the light: 8/255.
    assert abs(int(page[2, 2]) - round(255 * 10**-1.5)) <= 1
    y, x = cell_centre("ROW", (2,), 2)
    assert page[y, x] == 0
    y, x = cell_centre("ROW", (2,), 1)
    assert abs(int(page[y, x]) - 128) <= 1


def test_square_image_keeps_its_aspect_ratio_in_a_tall_box(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    page = print_film(box, r"STANDARD\1,1", [gray_item(flat(0, size=64))], BorderDensity="WHITE")
    dark = np.argwhere(page < 128)
    height = dark[:, 0].max() - dark[:, 0].min() + 1
    width = dark[:, 1].max() - dark[:, 1].min() + 1
    assert abs(height - width) <= 2
    assert width > 0.9 * FILM_W


# ---- pixels --------------------------------------------------------------------------------------

def test_polarity_reverse_monochrome1_and_12_bit(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    images = [
        gray_item(flat(50)),                                        # 8-bit
        gray_item(flat(4095, bits=12), bits_stored=12),             # 12-bit white
        gray_item(flat(1024, bits=12), bits_stored=12),             # 12-bit quarter
        gray_item(flat(0), photometric="MONOCHROME1"),              # MONOCHROME1: 0 is white
    ]
    page = print_film(box, r"STANDARD\2,2", images)
    expected = [50, 255, round(1024 / 4095 * 255), 255]
    for position, value in enumerate(expected, start=1):
        y, x = cell_centre("ROW", (2, 2), position)
        assert abs(int(page[y, x]) - value) <= 1, position
    reversed_page = print_film(box, r"STANDARD\2,2", images, image_attrs={"Polarity": "REVERSE"})
    for position, value in enumerate(expected, start=1):
        y, x = cell_centre("ROW", (2, 2), position)
        assert abs(int(reversed_page[y, x]) - (255 - value)) <= 1, position


def test_color_film_with_both_planar_configurations(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    red = np.zeros((32, 48, 3), np.uint8)
    red[..., 0] = 220
    blue = np.zeros((32, 48, 3), np.uint8)
    blue[..., 2] = 200
    blue[..., 1] = 40
    page = print_film(box, r"STANDARD\2,1", [color_item(red, planar=0), color_item(blue, planar=1)], color=True)
    y, x = cell_centre("ROW", (2,), 1)
    assert np.abs(page[y, x].astype(int) - [220, 0, 0]).max() <= 2
    y, x = cell_centre("ROW", (2,), 2)
    assert np.abs(page[y, x].astype(int) - [0, 40, 200]).max() <= 2
    reversed_page = print_film(box, r"STANDARD\1,1", [color_item(red)], color=True,
                               image_attrs={"Polarity": "REVERSE"})
    assert np.abs(reversed_page[FILM_H // 2, FILM_W // 2].astype(int) - [35, 255, 255]).max() <= 2


def test_presentation_lut_table_maps_pixels(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT", plut=True) as scu:
        inverse = scu.create_plut(table=[255 - v for v in range(256)], bits=8)
        assert inverse.status == 0 and inverse.uid
        identity = scu.create_plut("IDENTITY")
        assert identity.status == 0 and identity.uid
        assert scu.create_session().status == 0
        film = scu.create_film_box(r"STANDARD\2,1", plut_uid=inverse.uid)
        assert film.status == 0
        assert scu.set_image(film.dataset, 1, gray_item(flat(40))).status == 0
        # An image box may name its own P-LUT, overriding the film box's.
        reply = scu.set_image(film.dataset, 2, gray_item(flat(40)),
                              ReferencedPresentationLUTSequence=film.dataset.ReferencedPresentationLUTSequence)
        assert reply.status == 0
        assert scu.print_film_box(film.uid) == 0
        assert scu.delete(BasicFilmBox, film.uid) == 0
    box.wait_jobs(1)
    page = ghostscript(box.printed_files()[0])[0]
    for position in (1, 2):
        y, x = cell_centre("ROW", (2,), position)
        assert abs(int(page[y, x]) - 215) <= 1


def test_presentation_lut_lin_od(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT", plut=True) as scu:
        lin_od = scu.create_plut("LIN OD")
        assert lin_od.status == 0
        scu.create_session()
        film = scu.create_film_box(r"STANDARD\1,1", plut_uid=lin_od.uid, MaxDensity=300)
        assert scu.set_image(film.dataset, 1, gray_item(flat(128))).status == 0
        assert scu.print_film_box(str(film.uid)) == 0
    box.wait_jobs(1)
    page = ghostscript(box.printed_files()[0])[0]
    # P-values linear in optical density: half way is 1.5 OD, 10^-1.5 of the light.
    density = 300 - 128 / 255 * 300
    assert abs(int(page[FILM_H // 2, FILM_W // 2]) - round(255 * 10 ** (-density / 100))) <= 1


@pytest.mark.parametrize("magnification", ["REPLICATE", "BILINEAR", "CUBIC"])
def test_magnification_types(print_server: Callable[..., RunningPrinter], magnification: str) -> None:
    # At 300 dpi the 8x8 checkerboard is magnified in numpy: replicated pixels stay pure black and
    # white; interpolation makes greys.
    box = print_server({"film": printer(resolution_dpi=300)})
    checker = (np.indices((8, 8)).sum(axis=0) % 2 * 255).astype(np.uint8)
    page = print_film(box, r"STANDARD\1,1", [gray_item(checker)], MagnificationType=magnification)
    middle = page[200:520, 100:476]
    greys = np.count_nonzero((middle > 20) & (middle < 235)) / middle.size
    if magnification == "REPLICATE":
        assert greys < 0.02
    else:
        assert greys > 0.2
    # Same layout whatever the interpolation: the top-left square is black.
    assert page[FILM_H // 2 - 250, 40] < 30


def test_magnification_none_prints_at_printer_resolution(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()  # 72 dpi: 144 pixels -> 2 inches -> 144 page pixels at 72 dpi
    page = print_film(box, r"STANDARD\1,1", [gray_item(flat(0, size=144))], MagnificationType="NONE")
    dark = np.argwhere(page < 128)
    assert abs((dark[:, 1].max() - dark[:, 1].min() + 1) - 144) <= 2


def test_requested_image_size_and_crop(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    # 50.8 mm = 2 inches = 144 page pixels.
    page = print_film(box, r"STANDARD\1,1", [gray_item(flat(0))], image_attrs={"RequestedImageSize": "50.8"})
    dark = np.argwhere(page < 128)
    assert abs((dark[:, 1].max() - dark[:, 1].min() + 1) - 144) <= 2
    with PrintSCU(box.port, "TESTPRINT") as scu:
        scu.create_session()
        film = scu.create_film_box(r"STANDARD\2,2")
        too_big = {"RequestedImageSize": "400"}
        assert scu.set_image(film.dataset, 1, gray_item(flat(0)), **too_big,
                             RequestedDecimateCropBehavior="FAIL").status == statuses.IMAGE_LARGER_THAN_BOX
        assert scu.set_image(film.dataset, 1, gray_item(flat(0)), **too_big,
                             RequestedDecimateCropBehavior="CROP").status == statuses.IMAGE_CROPPED
        assert scu.set_image(film.dataset, 2, gray_item(flat(0)), **too_big,
                             RequestedDecimateCropBehavior="DECIMATE").status == statuses.IMAGE_DECIMATED


def printed_page(box: RunningPrinter, scu: PrintSCU, film_uid: str) -> np.ndarray:
    """Print a film box on an open association; its page as Ghostscript renders it."""
    before = set(box.printed_files())
    assert scu.print_film_box(film_uid) == 0
    box.wait_jobs(len(before) + 1)
    (new,) = set(box.printed_files()) - before
    return ghostscript(new)[0]


# STANDARD\2,1 on 8INX10IN at 72 dpi: the image boxes' columns on the page.
LEFT_BOX = range(5, 287)
RIGHT_BOX = range(290, 571)


def dark_columns(page: np.ndarray) -> np.ndarray:
    return np.nonzero((page < 128).any(axis=0))[0]


def test_image_box_n_set_answers_for_the_attributes_it_kept_from_earlier_n_sets(
        print_server: Callable[..., RunningPrinter]) -> None:
    """An N-SET changes only the attributes it carries (PS3.7 10.1.3): a console that sends a new
    image without repeating Requested Decimate/Crop Behavior, Magnification Type or Requested
    Image Size keeps those of its earlier N-SET. The reply must say what then happens to the new
    image (PS3.4 H.4.3), and the film must print what the reply said, inside the image box."""
    box = print_server()
    small, large = gray_item(flat(0, size=64)), gray_item(flat(0, size=400))  # 400 pt: wider than a box
    with PrintSCU(box.port, "TESTPRINT") as scu:
        scu.create_session()
        # FAIL kept: the large image is refused and the box keeps its image.
        film = scu.create_film_box(r"STANDARD\2,1", MagnificationType="NONE")
        assert scu.set_image(film.dataset, 1, small, RequestedDecimateCropBehavior="FAIL").status == 0
        assert scu.set_image(film.dataset, 1, large).status == statuses.IMAGE_LARGER_THAN_BOX
        page = printed_page(box, scu, film.uid)
        columns = dark_columns(page)
        assert abs(len(columns) - 64) <= 2, f"box 1 printed {len(columns)} points wide, not its 64-pixel image"
        # CROP kept: cropped, said so, and nothing outside the box.
        film = scu.create_film_box(r"STANDARD\2,1", MagnificationType="NONE")
        assert scu.set_image(film.dataset, 1, small, RequestedDecimateCropBehavior="CROP").status == 0
        assert scu.set_image(film.dataset, 1, large).status == statuses.IMAGE_CROPPED
        columns = dark_columns(printed_page(box, scu, film.uid))
        assert columns.min() >= LEFT_BOX.start and columns.max() < LEFT_BOX.stop, (columns.min(), columns.max())
        assert len(columns) >= len(LEFT_BOX) - 4
        # The image box's Magnification Type NONE kept: the large image is shrunk, and said so.
        film = scu.create_film_box(r"STANDARD\2,1", MagnificationType="BILINEAR")
        assert scu.set_image(film.dataset, 1, small, MagnificationType="NONE").status == 0
        assert scu.set_image(film.dataset, 1, large).status == statuses.IMAGE_DEMAGNIFIED
        columns = dark_columns(printed_page(box, scu, film.uid))
        assert columns.min() >= LEFT_BOX.start and columns.max() < LEFT_BOX.stop, (columns.min(), columns.max())
        # Requested Image Size kept with DECIMATE: decimated again.
        film = scu.create_film_box(r"STANDARD\2,1")
        assert scu.set_image(film.dataset, 1, small, RequestedImageSize="400",
                             RequestedDecimateCropBehavior="DECIMATE").status == statuses.IMAGE_DECIMATED
        assert scu.set_image(film.dataset, 1, large).status == statuses.IMAGE_DECIMATED


def test_an_image_a_film_box_n_set_makes_too_large_stays_in_its_box(
        print_server: Callable[..., RunningPrinter]) -> None:
    """Magnification Type NONE set on the film box after its images: an image that fitted (and
    whose N-SET asked for FAIL rather than a smaller or cropped image) is now larger than its
    box. It must not be drawn over its neighbour, the border and off the film."""
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT") as scu:
        scu.create_session()
        film = scu.create_film_box(r"STANDARD\2,1")
        assert scu.set_image(film.dataset, 1, gray_item(flat(0, size=400)),
                             RequestedDecimateCropBehavior="FAIL").status == 0
        assert scu.set_film_box(film.uid, MagnificationType="NONE").status == 0
        page = printed_page(box, scu, film.uid)
    columns = dark_columns(page)
    assert columns.min() >= LEFT_BOX.start and columns.max() < LEFT_BOX.stop, (columns.min(), columns.max())
    assert page[FILM_H // 2, (RIGHT_BOX.start + RIGHT_BOX.stop) // 2] == 255


# ---- orientation, film size, paper ---------------------------------------------------------------

def test_landscape_film_is_turned_onto_portrait_paper(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    marker = np.full((60, 80), 255, np.uint8)
    marker[:30, :40] = 0  # the image's top-left quarter is black
    page = print_film(box, r"STANDARD\1,1", [gray_item(marker)], FilmOrientation="LANDSCAPE",
                      BorderDensity="WHITE")
    # Page stays portrait; the film's top edge runs along the paper's left edge, so the image's
    # top-left corner is at the bottom-left of the page.
    assert page.shape == (FILM_H, FILM_W)
    dark = np.argwhere(page < 128)
    rows, cols = dark[:, 0], dark[:, 1]
    assert rows.min() > FILM_H // 2 - 5  # the dark quarter is in the lower half
    assert cols.max() < FILM_W // 2 + 5  # and the left half


@pytest.mark.parametrize(("film_size", "paper", "page_size"), [
    ("14INX17IN", "A4", (842, 595)), ("8INX10IN", "LETTER", (792, 612)), ("24CMX30CM", "A3", (1191, 842)),
])
def test_film_size_is_mapped_to_paper_with_its_aspect_ratio(
    print_server: Callable[..., RunningPrinter], film_size: str, paper: str, page_size: tuple[int, int]
) -> None:
    from appliance.printing.layout import parse_film_size

    box = print_server({"film": printer(paper={film_size: paper}, margin_mm=4.0)})
    page = print_film(box, r"STANDARD\1,1", [gray_item(flat(128))], FilmSizeID=film_size, BorderDensity="BLACK")
    assert abs(page.shape[0] - page_size[0]) <= 1 and abs(page.shape[1] - page_size[1]) <= 1
    black = np.argwhere(page < 20)
    height = black[:, 0].max() - black[:, 0].min() + 1
    width = black[:, 1].max() - black[:, 1].min() + 1
    size = parse_film_size(film_size)
    assert size is not None
    assert abs(width / height - size[0] / size[1]) < 0.01
    # It fills the printable area (4 mm margins) in one dimension.
    margin = 4 / 25.4 * 72
    assert width >= page.shape[1] - 2 * margin - 2 or height >= page.shape[0] - 2 * margin - 2


def test_trim_draws_a_box_around_each_image(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    page = print_film(box, r"STANDARD\2,1", [gray_item(flat(255)), gray_item(flat(255))], Trim="YES")
    # A white image on a white border: only the trim line is dark, at the top edge of the cells.
    column = page[:, FILM_W // 4]
    assert np.count_nonzero(column < 128) >= 2


# ---- sessions, copies, annotations ---------------------------------------------------------------

def test_film_session_print_collates_all_film_boxes(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT") as scu:
        assert scu.create_session(NumberOfCopies=2, PrintPriority="HIGH", FilmSessionLabel="CT HEAD").status == 0
        for value in (30, 200):
            film = scu.create_film_box(r"STANDARD\1,1")
            assert film.status == 0
            assert scu.set_image(film.dataset, 1, gray_item(flat(value))).status == 0
        assert scu.print_session() == 0
        assert scu.delete(BasicFilmSession, scu.session_uid) == 0
    job = box.wait_jobs(1)[0]
    assert (job.pages, job.copies, job.priority, job.level) == (2, 2, "HIGH", "film session")
    pages = ghostscript(box.printed_files()[0])
    assert [int(p[FILM_H // 2, FILM_W // 2]) for p in pages] == [30, 200]


def test_annotation_text_is_printed(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT", annotation=True) as scu:
        scu.create_session()
        film = scu.create_film_box(r"STANDARD\1,1")
        annotations = film.dataset.ReferencedBasicAnnotationBoxSequence
        assert len(annotations) == 2
        assert scu.set_image(film.dataset, 1, gray_item(flat(255))).status == 0
        assert scu.set_annotation(film.dataset, 1, "DOE^JANE 1970-01-01").status == 0
        assert scu.print_film_box(film.uid) == 0
    box.wait_jobs(1)
    page = ghostscript(box.printed_files()[0])[0]
    band = page[FILM_H - 25 :, : FILM_W // 2]
    assert np.count_nonzero(band < 100) > 50  # black text on the white band
    assert np.count_nonzero(page[FILM_H - 25 :, FILM_W // 2 :] < 100) == 0  # box 2 is empty


def test_long_annotation_text_stays_inside_its_annotation_box(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT", annotation=True) as scu:
        scu.create_session()
        film = scu.create_film_box(r"STANDARD\1,1")
        assert scu.set_image(film.dataset, 1, gray_item(flat(255))).status == 0
        assert scu.set_annotation(film.dataset, 1, "W" * 64).status == 0  # 64 characters: the longest LO
        assert scu.set_annotation(film.dataset, 2, "ID 0012345678").status == 0
        assert scu.print_film_box(film.uid) == 0
    box.wait_jobs(1)
    page = ghostscript(box.printed_files()[0])[0]
    band = page[FILM_H - 25 :]
    dark = np.nonzero((band < 100).any(axis=0))[0]
    left, right = dark[dark < FILM_W // 2], dark[dark >= FILM_W // 2]
    # Each text in its own half of the band, with white between them; box 1's text shrunk to fit
    # still spans most of its box.
    assert left.size and right.size and left.max() < FILM_W // 2 - 2 and right.min() > FILM_W // 2
    assert left.max() - left.min() > FILM_W // 2 * 0.8


def test_printed_job_keeps_a_preview(print_server: Callable[..., RunningPrinter]) -> None:
    from PIL import Image

    box = print_server()
    print_film(box, r"STANDARD\2,1", [gray_item(flat(0)), None], BorderDensity="WHITE")
    job = box.wait_jobs(1)[0]
    assert job.preview_path is not None and job.ps_path is None  # spool PostScript removed once printed
    preview = np.asarray(Image.open(job.preview_path))
    assert max(preview.shape) == 480 and abs(preview.shape[1] / preview.shape[0] - 0.8) < 0.01
    assert preview[preview.shape[0] // 2, preview.shape[1] // 4] < 20
    assert preview[preview.shape[0] // 2, 3 * preview.shape[1] // 4] == 255


def test_dct_compression_prints(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server({"film": printer(compression="dct")})
    gradient = np.tile(np.linspace(0, 255, 128).astype(np.uint8), (128, 1))
    page = print_film(box, r"STANDARD\1,1", [gray_item(gradient)])
    row = page[FILM_H // 2, 20:FILM_W - 20].astype(int)
    assert row[0] < 10 and row[-1] > 245 and np.all(np.diff(row) >= -4)


# ---- statuses and errors -------------------------------------------------------------------------

def test_scp_assigned_uids_and_defaults_for_unsupported_values(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT") as scu:
        session = scu.create_session(assign=True, NumberOfCopies=500, MediumType="GLASS")
        # We minted the UID: the reply must be success so pynetdicom sends the UID.
        assert session.status == 0 and session.uid
        assert session.dataset.NumberOfCopies == 10 and session.dataset.MediumType == "PAPER"
        film = scu.create_film_box(r"STANDARD\1,1", assign=True, FilmOrientation="DIAGONAL", MaxDensity=900)
        assert film.status == 0 and film.uid
        assert film.dataset.FilmOrientation == "PORTRAIT" and film.dataset.MaxDensity == 300
        assert scu.set_image(film.dataset, 1, gray_item(flat(9))).status == 0
        assert scu.print_film_box(film.uid) == 0
    with PrintSCU(box.port, "TESTPRINT") as scu:
        scu.create_session()
        # The SCU supplied the UID: the standard's warnings.
        assert scu.create_film_box(r"STANDARD\1,1", FilmOrientation="DIAGONAL").status == \
            statuses.ATTRIBUTE_VALUE_OUT_OF_RANGE
        assert scu.create_film_box(r"STANDARD\1,1", MaxDensity=900).status == statuses.DENSITY_OUT_OF_RANGE
    box.wait_jobs(1)


def test_error_statuses(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT") as scu:
        # Print with no film box.
        assert scu.create_session().status == 0
        assert scu.print_session() == statuses.NO_FILM_BOXES
        # Film box without Referenced Film Session Sequence.
        assert scu.create_film_box(r"STANDARD\1,1", reference_session=False).status == statuses.MISSING_ATTRIBUTE
        assert scu.create_film_box(None).status == statuses.MISSING_ATTRIBUTE
        for bad in ("SLIDE", r"STANDARD\0,2", r"STANDARD\2", "FOO", r"ROW\a,b", r"CUSTOM\1"):
            assert scu.create_film_box(bad).status == statuses.INVALID_ATTRIBUTE_VALUE, bad
        # A second film session on the same association.
        first = scu.session_uid
        assert scu.create_session().status == statuses.DUPLICATE_SOP_INSTANCE
        scu.session_uid = first
        film = scu.create_film_box(r"STANDARD\1,2")
        assert film.status == 0
        # Film box with no images: warning, nothing printed.
        assert scu.print_film_box(film.uid) == statuses.FILM_BOX_HAS_NO_IMAGES
        # Image box N-SET errors.
        assert scu.set_image(film.dataset, 1, gray_item(flat(1)), ImageBoxPosition=2).status == \
            statuses.INVALID_ATTRIBUTE_VALUE
        item = gray_item(flat(1))
        del item.Rows
        assert scu.set_image(film.dataset, 1, item).status == statuses.MISSING_ATTRIBUTE
        item = gray_item(flat(1))
        item.BitsAllocated = 32
        assert scu.set_image(film.dataset, 1, item).status == statuses.INVALID_ATTRIBUTE_VALUE
        status, _ = scu.assoc.send_n_set(item, BasicGrayscaleImageBox, "1.2.3.4",
                                         meta_uid=BasicGrayscalePrintManagementMeta)
        assert status.Status == statuses.NO_SUCH_SOP_INSTANCE
        assert scu.print_film_box("1.2.3.4") == statuses.NO_SUCH_SOP_INSTANCE
        # Erasing an image (empty sequence) is allowed.
        assert scu.set_image(film.dataset, 1, gray_item(flat(1))).status == 0
        assert scu.set_image(film.dataset, 1, None).status == 0
        assert scu.delete(BasicFilmBox, film.uid) == 0
        assert scu.delete(BasicFilmBox, film.uid) == statuses.NO_SUCH_SOP_INSTANCE
    assert box.jobs() == []


def test_a_film_box_n_set_that_fails_changes_nothing(print_server: Callable[..., RunningPrinter]) -> None:
    """A failure status means the operation was not performed (PS3.7 C): a film box N-SET refused
    for a Presentation LUT that does not exist must leave every other attribute it carried unset."""
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT", plut=True) as scu:
        scu.create_session()
        film = scu.create_film_box(r"STANDARD\2,1", BorderDensity="WHITE", EmptyImageDensity="WHITE")
        assert scu.set_image(film.dataset, 1, gray_item(flat(128))).status == 0
        reply = scu.set_film_box(film.uid, plut_uid=generate_uid(), BorderDensity="BLACK",
                                 EmptyImageDensity="BLACK", MaxDensity=100, Trim="YES", MagnificationType="NONE")
        assert reply.status == statuses.INVALID_ATTRIBUTE_VALUE
        page = printed_page(box, scu, film.uid)
    assert page[1, 1] == 255, "border printed BLACK"
    y, x = cell_centre("ROW", (2,), 2)
    assert page[y, x] == 255, "empty image box printed BLACK"
    y, x = cell_centre("ROW", (2,), 1)
    assert abs(int(page[y, x]) - 128) <= 1, "image printed with Max Density 100"
    # Magnification NONE would print the 64-pixel image 64 points wide; fitted it fills its box.
    assert np.count_nonzero((page < 200).any(axis=0)) > 200, "image printed at Magnification Type NONE"
    # No trim line above the image.
    assert page[:150].min() == 255, "trim lines printed"


def test_called_ae_title_selects_the_printer(print_server: Callable[..., RunningPrinter], tmp_path: Any) -> None:
    box = print_server({
        "one": printer("PRINTONE", directory=str(tmp_path / "one")),
        "two": printer("PRINTTWO", directory=str(tmp_path / "two")),
    })
    with PrintSCU(box.port, "PRINTTWO") as scu:
        assert scu.printer_status().dataset.PrinterName == "two"
        scu.create_session()
        film = scu.create_film_box(r"STANDARD\1,1")
        scu.set_image(film.dataset, 1, gray_item(flat(1)))
        assert scu.print_film_box(film.uid) == 0
    job = box.wait_jobs(1)[0]
    assert job.printer == "two" and job.called_ae == "PRINTTWO"
    assert len(list((tmp_path / "two").glob("*.ps"))) == 1 and not (tmp_path / "one").exists()
    # DCMTK's echoscu, not a pynetdicom requestor: when the rejection arrives and the socket closes
    # before pynetdicom's requestor thread looks, it takes the closed socket for a failed connect
    # and reports an abort, with the A-ASSOCIATE-RJ unread in its queue.
    refused = subprocess.run([require_tool("echoscu"), "-aet", "TESTSCU", "-aec", "NOSUCHPRINTER", "127.0.0.1",
                              str(box.port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0
    assert "Called AE Title Not Recognized" in refused.stdout + refused.stderr


def test_a_console_that_associates_again_at_once_is_not_refused_at_the_limit(
        print_server: Callable[..., RunningPrinter]) -> None:
    """Consoles poll the printer on short associations, one after another. The association just
    released must not still count against max_associations while its thread winds down."""
    box = print_server(max_associations=1)
    refused = 0
    for _ in range(20):
        with PrintSCU(box.port, "TESTPRINT") as scu:
            if not scu.established:
                refused += 1
                continue
            assert scu.printer_status().status == 0
    assert refused == 0, f"{refused} of 20 associations refused"


def test_peers_that_stop_in_their_first_pdu_give_their_slot_back_after_the_network_timeout(
        print_server: Callable[..., RunningPrinter]) -> None:
    """A connection that sends the 6-byte header of an A-ASSOCIATE-RQ and then nothing (a link
    that died mid-PDU, a half-written request) holds one of print.max_associations. It must give
    it back after the network timeout, as the Storage SCP's do, or a few of them lock every
    console out of printing for as long as their sockets stay open: for ever, if they vanished."""
    box = print_server(max_associations=2, timeouts=Timeouts(connect=5, acse=2, dimse=5, network=2))
    peers = [socket.create_connection(("127.0.0.1", box.port)) for _ in range(2)]
    try:
        for peer in peers:
            peer.sendall(bytes([0x01, 0x00, 0x00, 0x00, 0x01, 0x00]))  # announces 256 bytes, sends none
        with PrintSCU(box.port, "TESTPRINT") as scu:
            assert not scu.established, "the silent peers hold no slot: the test shows nothing"
        time.sleep(3)
        echo = subprocess.run([require_tool("echoscu"), "-aet", "CONSOLE", "-aec", "TESTPRINT", "127.0.0.1",
                               str(box.port)], env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stdout + echo.stderr
    finally:
        for peer in peers:
            peer.close()


def test_printer_status_reflects_the_backend(print_server: Callable[..., RunningPrinter]) -> None:
    from .conftest import free_port

    box = print_server({
        "ok": printer("OK"),
        "down": printer("DOWN", backend="socket", host="127.0.0.1", socket_port=free_port()),
    })
    with PrintSCU(box.port, "OK") as scu:
        reply = scu.printer_status()
        assert (reply.status, reply.dataset.PrinterStatus, reply.dataset.PrinterStatusInfo) == (0, "NORMAL", "NORMAL")
        only = scu.printer_status([0x21100010])
        assert list(only.dataset.keys()) == [0x21100010]
    with PrintSCU(box.port, "DOWN") as scu:
        reply = scu.printer_status()
        assert (reply.dataset.PrinterStatus, reply.dataset.PrinterStatusInfo) == ("FAILURE", "PRINTER OFFLINE")


def test_a_console_checks_the_printer_on_an_association_of_its_own(
        print_server: Callable[..., RunningPrinter], caplog: pytest.LogCaptureFixture) -> None:
    """Before a print job, and to poll, consoles associate with only the Printer SOP class (and
    Verification). The N-GET answers as inside a Meta SOP class; film sessions, boxes and LUTs
    were not negotiated there: 0x0211, and the association carries on."""
    from .conftest import free_port

    caplog.set_level(logging.INFO, logger="appliance.printing")
    box = print_server({
        "ok": printer("OK"),
        "down": printer("DOWN", backend="socket", host="127.0.0.1", socket_port=free_port(), status_timeout=0.3),
    })
    asked = [0x21100010, 0x00081090, 0x21100099]  # Printer Status, Manufacturer Model Name, not an attribute
    with PrintSCU(box.port, "OK") as scu:
        inside_meta, inside_meta_asked = scu.printer_status(), scu.printer_status(asked)
    with PrintSCU(box.port, "OK", meta=False, printer=True, verification=True, calling_ae="CT_CONSOLE") as scu:
        assert scu.established
        assert {str(cx.abstract_syntax) for cx in scu.assoc.accepted_contexts} == {Printer, Verification}
        assert scu.assoc.send_c_echo().Status == 0
        alone, alone_asked = scu.printer_status(), scu.printer_status(asked)
        assert (alone.status, alone_asked.status) == (0, 0)
        assert alone.dataset == inside_meta.dataset and len(alone.dataset) == 9
        assert alone.dataset.PrinterStatus == "NORMAL" and alone.dataset.PrinterName == "ok"
        assert alone_asked.dataset == inside_meta_asked.dataset
        assert list(alone_asked.dataset.keys()) == [0x00081090, 0x21100010]

        session_uid, film_uid = generate_uid(), generate_uid()
        assert scu.create(BasicFilmSession, None, session_uid).status == statuses.UNRECOGNIZED_OPERATION
        film = Dataset()
        film.ImageDisplayFormat = r"STANDARD\1,1"
        assert scu.create(BasicFilmBox, film, film_uid).status == statuses.UNRECOGNIZED_OPERATION
        lut = Dataset()
        lut.PresentationLUTShape = "IDENTITY"
        assert scu.create(PresentationLUT, lut, None).status == statuses.UNRECOGNIZED_OPERATION
        image = Dataset()
        image.ImageBoxPosition = 1
        status, _ = scu.assoc.send_n_set(image, BasicGrayscaleImageBox, generate_uid(), meta_uid=Printer)
        assert status.Status == statuses.UNRECOGNIZED_OPERATION
        status, _ = scu.assoc.send_n_action(None, 1, BasicFilmSession, session_uid, meta_uid=Printer)
        assert status.Status == statuses.UNRECOGNIZED_OPERATION
        assert scu.delete(BasicFilmBox, film_uid) == statuses.UNRECOGNIZED_OPERATION
        assert scu.established and scu.printer_status().status == 0
    with PrintSCU(box.port, "DOWN", meta=False, printer=True, calling_ae="CT_CONSOLE") as scu:
        for _ in range(3):
            assert scu.printer_status().dataset.PrinterStatusInfo == "PRINTER OFFLINE"
    # The state is logged once for the console polling, as on a print association.
    offline = [r.getMessage() for r in caplog.records if "PRINTER OFFLINE" in r.getMessage()]
    assert len(offline) == 1 and offline[0].startswith("CT_CONSOLE -> DOWN")
    assert box.jobs() == []


def test_printer_configuration_retrieval_describes_this_printer(print_server: Callable[..., RunningPrinter]) -> None:
    """A modality asking for the printer's configuration (PS3.4 H.4.11), on an association of its
    own or beside a Meta SOP class, gets this printer as configured: the SOP classes, its film
    sizes on paper and density range, every STANDARD layout it accepts with the pixels each image
    box prints at the printer's resolution, and the bit depths it takes and prints."""
    ward = printer("WARD", default_film_size="8INX10IN", paper={"11INX14IN": "A3", "8INX10IN": "A4"},
                   min_density=20, max_density=250, resolution_dpi=100, default_magnification="CUBIC",
                   max_image_boxes=6, manufacturer="ACME Imaging", model_name="WardLaser 2")
    box = print_server({"ward": ward})
    with PrintSCU(box.port, "WARD", meta=False, configuration=True) as scu:
        assert scu.established
        reply = scu.printer_configuration()
        assert reply.status == 0 and list(reply.dataset.keys()) == [0x2000001E]
        # The attribute list filters as for the Printer N-GET: asked-for attributes it lacks are left out.
        assert scu.printer_configuration([0x2000001E]).dataset == reply.dataset
        absent = scu.printer_configuration([0x21100010])
        assert absent.status == 0 and not absent.dataset
    gray, color = reply.dataset.PrinterConfigurationSequence
    assert (gray.SOPClassesSupported[0], color.SOPClassesSupported[0]) == (BasicGrayscalePrintManagementMeta,
                                                                           BasicColorPrintManagementMeta)
    optional = {PresentationLUT, BasicAnnotationBox, PrinterConfigurationRetrieval}
    assert set(gray.SOPClassesSupported[1:]) == set(color.SOPClassesSupported[1:]) == optional
    assert (gray.MemoryBitDepth, color.MemoryBitDepth) == (16, 8)  # 12- and 16-bit gray; 8-bit RGB
    layouts = {rf"STANDARD\{c},{r}" for c in range(1, 7) for r in range(1, 7) if c * r <= 6}
    for item in (gray, color):
        assert item.PrintingBitDepth == 8 and item.MaximumMemoryAllocation == 0
        assert [(m.ItemNumber, m.MediumType, m.FilmSizeID, m.MinDensity, m.MaxDensity)
                for m in item.MediaInstalledSequence] == [(1, "PAPER", "8INX10IN", 20, 250),
                                                          (2, "PAPER", "11INX14IN", 20, 250)]
        assert len(item.OtherMediaAvailableSequence) == 0
        assert item.DefaultMagnificationType == "CUBIC"
        assert sorted(item.OtherMagnificationTypesAvailable) == ["BILINEAR", "NONE", "REPLICATE"]
        assert (item.DefaultPrinterResolutionID, item.DecimateCropResult) == ("STANDARD", "DEF DECIMATE")
        assert int(item.MaximumCollatedFilms) > 1  # film-session printing collates all films
        assert (item.Manufacturer, item.ManufacturerModelName, item.PrinterName) == \
            ("ACME Imaging", "WardLaser 2", "ward")
        formats = [(f.ImageDisplayFormat, f.FilmOrientation, f.FilmSizeID)
                   for f in item.SupportedImageDisplayFormatsSequence]
        assert len(formats) == len(set(formats))
        assert set(formats) == {(layout, orientation, size) for layout in layouts
                                for orientation in ("PORTRAIT", "LANDSCAPE") for size in ("8INX10IN", "11INX14IN")}
        for supported in item.SupportedImageDisplayFormatsSequence:
            assert (supported.PrinterResolutionID, supported.RequestedImageSizeFlag) == ("STANDARD", "YES")
            assert [float(v) for v in supported.PrinterPixelSpacing] == pytest.approx([0.254, 0.254])  # 100 dpi

    wanted = (r"STANDARD\2,1", "LANDSCAPE", "11INX14IN")
    layout = next(f for f in gray.SupportedImageDisplayFormatsSequence
                  if (f.ImageDisplayFormat, f.FilmOrientation, f.FilmSizeID) == wanted)
    # 14 x 11 inches at 100 dpi, less the margins and the gap between two boxes side by side.
    assert 1000 < layout.Rows < 1100 and 650 < layout.Columns < 700
    with PrintSCU(box.port, "WARD", configuration=True) as scu:
        assert scu.printer_configuration().dataset == reply.dataset
        # An image of the announced size prints whole at printer resolution; one a little larger
        # (a pixel of slack absorbs rounding) has to be shrunk.
        scu.create_session()
        film = scu.create_film_box(layout.ImageDisplayFormat, FilmOrientation="LANDSCAPE", FilmSizeID="11INX14IN",
                                   MagnificationType="NONE")
        assert film.status == 0
        announced = np.zeros((layout.Rows, layout.Columns), np.uint8)
        assert scu.set_image(film.dataset, 1, gray_item(announced)).status == 0
        wider = np.zeros((layout.Rows, layout.Columns + 2), np.uint8)
        assert scu.set_image(film.dataset, 2, gray_item(wider)).status == statuses.IMAGE_DEMAGNIFIED
        taller = np.zeros((layout.Rows + 2, layout.Columns), np.uint8)
        assert scu.set_image(film.dataset, 2, gray_item(taller)).status == statuses.IMAGE_DEMAGNIFIED


def test_verification(print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", box.port, ae_title="TESTPRINT")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def test_min_and_max_density(print_server: Callable[..., RunningPrinter], tmp_path: Path) -> None:
    # Max Density 1.0 OD: black pixels print at 10^-1 reflectance; paper stays white for white pixels.
    box = print_server()
    page = print_film(box, r"STANDARD\2,1", [gray_item(flat(0)), gray_item(flat(255))], MaxDensity=100)
    y, x = cell_centre("ROW", (2,), 1)
    assert abs(int(page[y, x]) - round(255 * 0.1)) <= 1
    y, x = cell_centre("ROW", (2,), 2)
    assert page[y, x] == 255
    # A printer configured to honour Min Density (paper_white: false) prints white pixels grey.
    grey = print_server({"film": printer(paper_white=False, directory=str(tmp_path / "grey"))}, root=tmp_path / "grey")
    page = print_film(grey, r"STANDARD\1,1", [gray_item(flat(255))], MinDensity=50)
    assert abs(int(page[FILM_H // 2, FILM_W // 2]) - round(255 * 10**-0.5)) <= 1


def test_an_instance_uid_already_in_use_is_refused_and_a_deleted_film_box_never_prints(
        print_server: Callable[..., RunningPrinter]) -> None:
    box = print_server()
    with PrintSCU(box.port, "TESTPRINT", plut=True) as scu:
        plut = scu.create_plut("IDENTITY")
        assert plut.status == 0 and plut.uid
        # A film session may not take the UID of an object that exists.
        assert scu.create(BasicFilmSession, None, plut.uid).status == statuses.DUPLICATE_SOP_INSTANCE
        assert scu.create_session().status == 0
        film = scu.create_film_box(r"STANDARD\1,1")
        assert film.status == 0
        assert scu.set_image(film.dataset, 1, gray_item(flat(40))).status == 0
        for uid in (film.uid, scu.session_uid, plut.uid):
            ds = Dataset()
            ds.ImageDisplayFormat = r"STANDARD\1,1"
            ref = Dataset()
            ref.ReferencedSOPClassUID = BasicFilmSession
            ref.ReferencedSOPInstanceUID = scu.session_uid
            ds.ReferencedFilmSessionSequence = Sequence([ref])
            assert scu.create(BasicFilmBox, ds, uid).status == statuses.DUPLICATE_SOP_INSTANCE, uid
        lut = Dataset()
        lut.PresentationLUTShape = "IDENTITY"
        assert scu.create(PresentationLUT, lut, film.uid, meta=False).status == statuses.DUPLICATE_SOP_INSTANCE
        # The refused creations made nothing: once the film box is deleted, the session has none.
        assert scu.delete(BasicFilmBox, film.uid) == 0
        assert scu.print_session() == statuses.NO_FILM_BOXES
    assert box.jobs() == []


def test_the_log_says_what_happened_once(print_server: Callable[..., RunningPrinter],
                                         caplog: pytest.LogCaptureFixture) -> None:
    from .conftest import free_port

    caplog.set_level(logging.INFO, logger="appliance.printing")
    box = print_server({"down": printer("DOWN", backend="socket", host="127.0.0.1", socket_port=free_port(),
                                        status_timeout=0.3)})

    def lines(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name.startswith("appliance.printing") and
                text in r.getMessage()]

    assert not PrintSCU(box.port, "NOSUCHPRINTER", calling_ae="CT_SCANNER").established
    assert lines("print association from CT_SCANNER refused")
    with PrintSCU(box.port, "DOWN", calling_ae="CT_SCANNER") as scu:
        # A console polling the printer's state: one line, not one per N-GET.
        for _ in range(3):
            assert scu.printer_status().dataset.PrinterStatus == "FAILURE"
        assert len(lines("PRINTER OFFLINE")) == 1
        scu.create_session()
        printed = scu.create_film_box(r"STANDARD\1,1")
        assert scu.set_image(printed.dataset, 1, gray_item(flat(9))).status == 0
        assert scu.print_film_box(printed.uid) == 0
        left = scu.create_film_box(r"STANDARD\1,1")
    # The printer is down: the film is queued, not printed.
    assert lines(f"film box {printed.uid} queued as job 1") and not lines("printed as job")
    discarded = lines("discarding")
    assert len(discarded) == 1 and "1 film box" in discarded[0] and left.uid in discarded[0]
    assert printed.uid not in discarded[0]
