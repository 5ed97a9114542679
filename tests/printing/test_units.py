"""Pure parts of the print SCP, checked against numbers worked out by hand: Film Size IDs,
paper fitting, densities, display formats, magnification, PNG prediction, CUPS state words,
and the ``print:`` section of the YAML configuration."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.config import ConfigError, loads
from appliance.printing import statuses
from appliance.printing.backends import cups_state_from_lpstat
from appliance.printing.errors import PrintError
from appliance.printing.layout import density_to_gray, parse_film_size, place_film
from appliance.printing.model import DisplayFormat
from appliance.printing.pixels import magnify
from appliance.printing.postscript import png_predict


@pytest.mark.parametrize(("film_size", "inches"), [
    ("8INX10IN", (8, 10)), ("8_5INX11IN", (8.5, 11)), ("14INX17IN", (14, 17)), ("24CMX30CM", (24 / 2.54, 30 / 2.54)),
    ("A4", (210 / 25.4, 297 / 25.4)), ("17INX14IN", (14, 17)),
])
def test_film_size_ids(film_size: str, inches: tuple[float, float]) -> None:
    assert parse_film_size(film_size) == pytest.approx(inches)


@pytest.mark.parametrize("bad", ["", "14X17", "A5X", "0INX10IN", "14INX17", "SLIDE"])
def test_bad_film_size_ids(bad: str) -> None:
    assert parse_film_size(bad) is None


@pytest.mark.parametrize(("film", "paper", "scale"), [
    # Scale to fit inside the paper with 4 mm margins (the research table, rounded).
    ("8INX10IN", "A4", 0.99), ("11INX14IN", "A4", 0.72), ("14INX17IN", "A4", 0.57), ("14INX17IN", "A3", 0.81),
    ("14INX17IN", "LETTER", 0.58), ("24CMX30CM", "A4", 0.84), ("10INX12IN", "LETTER", 0.82),
])
def test_film_fits_paper(film: str, paper: str, scale: float) -> None:
    size = parse_film_size(film)
    assert size is not None
    placement = place_film(size, "PORTRAIT", paper, "fit", 4.0)
    assert placement.scale == pytest.approx(scale, abs=0.006)
    landscape = place_film(size, "LANDSCAPE", paper, "fit", 4.0)
    assert landscape.rotated and landscape.scale == pytest.approx(scale, abs=0.006)
    assert place_film(size, "PORTRAIT", paper, "true-size", 4.0).scale <= 1.0


def test_density_words_and_numbers() -> None:
    assert density_to_gray("BLACK") == 0.0 and density_to_gray("WHITE") == 1.0
    assert density_to_gray(100) == pytest.approx(0.1) and density_to_gray("0") == 1.0


@pytest.mark.parametrize(("text", "kind", "counts"), [
    (r"STANDARD\3,2", "ROW", (3, 3)), (r"ROW\2,1", "ROW", (2, 1)), (r"COL\1,2,3", "COL", (1, 2, 3)),
    (r"standard\1,1", "ROW", (1,)),
])
def test_display_formats(text: str, kind: str, counts: tuple[int, ...]) -> None:
    parsed = DisplayFormat.parse(text, 48)
    assert (parsed.kind, parsed.counts) == (kind, counts)


@pytest.mark.parametrize("text", ["SLIDE", "SUPERSLIDE", r"CUSTOM\1", r"STANDARD\7,8", r"ROW\0", "STANDARD"])
def test_unsupported_display_formats(text: str) -> None:
    with pytest.raises(PrintError) as caught:
        DisplayFormat.parse(text, 48)
    assert caught.value.status == statuses.INVALID_ATTRIBUTE_VALUE


def test_magnification_keeps_flat_areas_and_edges() -> None:
    image = np.zeros((4, 4), np.uint8)
    image[:, 2:] = 200
    replicated = magnify(image, 3, "REPLICATE")
    assert replicated.shape == (12, 12) and set(np.unique(replicated)) == {0, 200}
    for kind in ("BILINEAR", "CUBIC"):
        smooth = magnify(image, 3, kind)
        assert smooth.shape == (12, 12)
        assert smooth[:, :4].max() <= 5 and smooth[:, 8:].min() >= 195  # flat areas stay flat
        assert 0 < smooth[0, 5] < 200 or 0 < smooth[0, 6] < 200  # the edge is interpolated
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[1, 1] = (255, 0, 0)
    assert magnify(rgb, 4, "BILINEAR").shape == (8, 8, 3)


def test_png_prediction_round_trips() -> None:
    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (5, 12), dtype=np.uint8)
    previous = rng.integers(0, 256, 12, dtype=np.uint8)
    filtered = png_predict(rows, previous, 3)
    # Undo the filters as a PNG decoder would.
    out = np.zeros_like(rows, dtype=np.int32)
    above = previous.astype(np.int32)
    for r in range(5):
        kind, data = filtered[r, 0], filtered[r, 1:].astype(np.int32)
        for i in range(12):
            left = out[r, i - 3] if i >= 3 else 0
            up_left = above[i - 3] if i >= 3 else 0
            if kind == 1:
                value = data[i] + left
            elif kind == 2:
                value = data[i] + above[i]
            else:
                guess = left + above[i] - up_left
                pa, pb, pc = abs(guess - left), abs(guess - above[i]), abs(guess - up_left)
                value = data[i] + (left if pa <= pb and pa <= pc else above[i] if pb <= pc else up_left)
            out[r, i] = value % 256
        above = out[r]
    assert np.array_equal(out, rows)


@pytest.mark.parametrize(("lpstat", "status", "info"), [
    ("printer ward is idle.  enabled since now\n\tAlerts: none\n", "NORMAL", "NORMAL"),
    ("printer ward is idle.  enabled since now\n\tAlerts: media-low-report toner-low-warning\n", "WARNING",
     "SUPPLY LOW"),
    ("printer ward now printing ward-3.  enabled since now\n\tAlerts: media-empty-error\n", "FAILURE", "SUPPLY EMPTY"),
    ("printer ward is idle.  enabled since now\n\tAlerts: door-open-error\n", "FAILURE", "COVER OPEN"),
    ("printer ward disabled since now -\n\treason unknown\n", "FAILURE", "PRINTER DOWN"),
])
def test_cups_state_words(lpstat: str, status: str, info: str) -> None:
    state = cups_state_from_lpstat(lpstat)
    assert (state.status, state.info) == (status, info)


GOOD = """
print:
  enabled: true
  port: 10400
  printers:
    ward:
      ae_title: WARDLASER
      backend: cups
      cups_queue: ward_laser
      paper: {14INX17IN: A3, 8INX10IN: LETTER}
      default_border_density: "150"
    archive:
      ae_title: ARCHIVE
      backend: directory
      directory: /srv/films
      pdf: true
      compression: dct
      retry: {initial_delay: 30s, max_delay: 10m}
"""


def test_print_section_of_the_configuration() -> None:
    config = loads(GOOD, "appliance.yaml")
    assert config.print.enabled and config.print.port == 10400
    found = config.print.printer_for("WARDLASER")
    assert found is not None
    name, ward = found
    assert name == "ward" and ward.paper["14INX17IN"] == "A3" and ward.default_border_density == "150"
    archive = config.print.printers["archive"]
    assert archive.pdf and archive.compression == "dct" and archive.retry.max_delay == 600.0


@pytest.mark.parametrize(("text", "message"), [
    (GOOD.replace("backend: cups", "backend: lpr"), "print.printers.ward.backend: expected one of cups"),
    (GOOD.replace("14INX17IN: A3", "14INX17IN: B9"), "print.printers.ward.paper.14INX17IN: expected a paper size"),
    (GOOD.replace("14INX17IN: A3", "14X17: A3"), "print.printers.ward.paper: expected Film Size IDs as keys"),
    (GOOD.replace("ae_title: ARCHIVE", "ae_title: WARDLASER"), "print.printers: expected printers with distinct"),
    (GOOD.replace("      cups_queue: ward_laser\n", ""), "print.printers: expected each printer's backend"),
    (GOOD.replace("port: 10400", "port: 104"), "port 104 is also used by node.port"),
    (GOOD.replace("pdf: true", "pdf: true\n      colour: yes"), "print.printers.archive.colour: unknown key"),
    # Durations where 0 means nothing: a printer retried in a busy loop, every job failed at its
    # first refusal, every status probe failed; and a backoff whose cap is below its start.
    (GOOD.replace("initial_delay: 30s", "initial_delay: 0s"),
     '18:15: print.printers.archive.retry.initial_delay: expected a duration above zero, such as "10s"'),
    (GOOD.replace("max_delay: 10m", "max_delay: 0s, give_up_after: 0d"),
     "18:50: print.printers.archive.retry.give_up_after: expected a duration above zero, such as \"3d\""),
    (GOOD.replace("compression: dct", "compression: dct\n      status_timeout: 0ms"),
     '18:7: print.printers.archive.status_timeout: expected a duration above zero, such as "2s", got "0ms"'),
    (GOOD.replace("max_delay: 10m", "max_delay: 10s"),
     "18:35: print.printers.archive.retry.max_delay: 10 s is shorter than initial_delay (30 s)"),
])
def test_configuration_errors_name_the_line_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads(text, "appliance.yaml")
    text_of_errors = str(caught.value)
    assert message in text_of_errors
    assert text_of_errors.startswith("appliance.yaml:")


def test_postscript_lines_stay_under_the_dsc_limit() -> None:
    import io

    from appliance.printing.layout import Rect
    from appliance.printing.postscript import PostScriptWriter

    out = io.BytesIO()
    writer = PostScriptWriter(out)
    writer.begin(1, 1008.0, 1224.0, "CT_SCANNER_16CHR " + "L" * 64, "Edge DICOM appliance print SCP")
    writer.begin_page(1008.0, 1224.0, "FILM")
    box = Rect(12.345, 23.456, 987.654, 1198.765)
    writer.image(box, 20000, 10, [np.zeros((10, 20000, 3), np.uint8)], color=True, interpolate=True, clip=box)
    writer.image_jpeg(box, np.zeros((16, 16, 3), np.uint8), 90, interpolate=True, clip=box)
    writer.text(box, 30.0, 18.0, 6.0, 0.0, "()\\" * 21 + "X")
    writer.end_page()
    writer.end()
    lines = out.getvalue().decode("ascii").splitlines()
    assert max(len(line) for line in lines) <= 255, max(lines, key=len)


def test_the_print_service_takes_the_nodes_timeouts(tmp_path: Path) -> None:
    """node.timeouts are the Print SCP's too (a silent peer gives its slot back after them)."""
    from appliance.app import _make_service

    text = f"node: {{timeouts: {{network: 7s, acse: 5s}}}}\nstorage: {{path: {tmp_path}}}\n" + GOOD
    service = _make_service("print", loads(text, "appliance.yaml"))
    assert (service.timeouts.network, service.timeouts.acse) == (7.0, 5.0)  # type: ignore[attr-defined]
