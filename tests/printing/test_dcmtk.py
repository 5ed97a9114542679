"""DCMTK's print client (dcmpsprt renders a print job, dcmprscu sends it) prints to our SCP:
the code base inside many modality consoles, so what it does is what we must accept."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from .conftest import RunningPrinter, ghostscript, printer

pytestmark = pytest.mark.skipif(
    not (shutil.which("dcmpsprt") and shutil.which("dcmprscu")), reason="needs Debian's dcmtk"
)


def write_image(path: Path, pixels: np.ndarray, bits_stored: int) -> Path:
    """A Secondary Capture image: what a console would print."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = "PRINT^TEST", "P1", "OT"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 8 if bits_stored == 8 else 16
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    ds.PixelData = pixels.astype(np.uint8 if bits_stored == 8 else "<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


class Dcmtk:
    """A dcmpsprt/dcmprscu working directory pointed at our SCP."""

    def __init__(self, directory: Path, port: int, ae_title: str, twelve_bit: bool = False,
                 plut: bool = False, annotation: bool = False) -> None:
        self.dir = directory
        for sub in ("spool", "database", "lut"):
            (directory / sub).mkdir(parents=True, exist_ok=True)
        lines = [
            "[[GENERAL]]", "[PRINT]", "Directory = spool", "[DATABASE]", "Directory = database",
            "[LUT]", "Directory = lut", "", "[[COMMUNICATION]]", "[TARGET]", "Type = PRINTER",
            f"Aetitle = {ae_title}", "Hostname = 127.0.0.1", f"Port = {port}", "MaxPDU = 32768",
            "DisplayFormat = 1,1\\1,2\\2,1\\2,2\\2,3\\3,4", "FilmSizeID = 8INX10IN\\14INX17IN\\A4",
            "MediumType = PAPER", f"Supports12Bit = {'true' if twelve_bit else 'false'}",
            f"SupportsPresentationLUT = {'true' if plut else 'false'}",
        ]
        if annotation:
            lines.append("Annotation = 1\\LABEL")
        (directory / "print.cfg").write_text("\n".join(lines) + "\n")

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "TCP_NODELAY": "1"}
        return subprocess.run(list(args), cwd=self.dir, env=env, capture_output=True, text=True, timeout=120,
                              check=False)

    def print_images(self, images: list[Path], layout: tuple[int, int], *extra: str,
                     session_print: bool = False) -> subprocess.CompletedProcess[str]:
        for old in (self.dir / "database").glob("*.dcm"):
            old.unlink()
        render = self.run("dcmpsprt", "-c", "print.cfg", "-p", "TARGET", "--layout", str(layout[0]),
                          str(layout[1]), "--filmsize", "8INX10IN", *extra, *[str(p) for p in images])
        assert render.returncode == 0, render.stderr
        stored = sorted((self.dir / "database").glob("SP_*.dcm"))
        assert stored, f"dcmpsprt made no print job: {render.stdout}{render.stderr}"
        options = ["--session-print"] if session_print else []
        return self.run("dcmprscu", "-c", "print.cfg", "-p", "TARGET", "-v", *options, str(stored[0]))


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "images"
    folder.mkdir()
    ramp8 = np.tile(np.arange(256, dtype=np.uint8), (200, 1))
    dark = np.full((128, 128), 10, np.uint8)
    bright = np.full((128, 128), 240, np.uint8)
    ramp12 = np.tile(np.linspace(0, 4095, 256).astype(np.uint16), (200, 1))
    return {
        "ramp8": write_image(folder / "ramp8.dcm", ramp8, 8),
        "dark": write_image(folder / "dark.dcm", dark, 8),
        "bright": write_image(folder / "bright.dcm", bright, 8),
        "ramp12": write_image(folder / "ramp12.dcm", ramp12, 12),
    }


def test_single_image_8_bit(print_server: Callable[..., RunningPrinter], images: dict[str, Path],
                            tmp_path: Path) -> None:
    box = print_server()
    dcmtk = Dcmtk(tmp_path / "dcmtk", box.port, "TESTPRINT")
    done = dcmtk.print_images([images["ramp8"]], (1, 1))
    assert done.returncode == 0, done.stdout + done.stderr
    job = box.wait_jobs(1)[0]
    assert job.calling_ae and job.pages == 1
    page = ghostscript(box.printed_files()[0])[0]
    # A left-to-right ramp: dark on the left of the image, bright on the right.
    row = page[page.shape[0] // 2]
    image_columns = np.nonzero(row < 250)[0]
    assert row[image_columns.min() + 3] < 30 and row[image_columns.max() - 3] > 220


def test_2x3_grayscale_8_bit(print_server: Callable[..., RunningPrinter], images: dict[str, Path],
                             tmp_path: Path) -> None:
    box = print_server()
    dcmtk = Dcmtk(tmp_path / "dcmtk", box.port, "TESTPRINT")
    order = [images["dark"], images["bright"]] * 3
    done = dcmtk.print_images(order, (2, 3))
    assert done.returncode == 0, done.stdout + done.stderr
    box.wait_jobs(1)
    page = ghostscript(box.printed_files()[0])[0]
    height, width = page.shape
    # dcmpsprt --layout 2 3 = STANDARD\2,3: 2 columns, 3 rows, numbered left to right.
    for position in range(6):
        row, column = divmod(position, 2)
        value = int(page[int((row + 0.5) / 3 * height), int((column + 0.5) / 2 * width)])
        assert (value < 40) if position % 2 == 0 else (value > 200), (position, value)


# (dcmpsprt --lin-od still sends IDENTITY to a printer and renders LIN OD into the bitmap.)
@pytest.mark.parametrize(("option", "shape"), [("--identity", "IDENTITY")])
def test_12_bit_with_presentation_lut(print_server: Callable[..., RunningPrinter], images: dict[str, Path],
                                      tmp_path: Path, caplog: pytest.LogCaptureFixture, option: str,
                                      shape: str) -> None:
    caplog.set_level(logging.INFO, logger="appliance.printing")
    box = print_server()
    dcmtk = Dcmtk(tmp_path / "dcmtk", box.port, "TESTPRINT", twelve_bit=True, plut=True)
    done = dcmtk.print_images([images["ramp12"]], (1, 1), option)
    assert done.returncode == 0, done.stdout + done.stderr
    said = caplog.text
    assert "Presentation LUT" in said and shape in said
    assert "MONOCHROME2 12-bit" in said
    box.wait_jobs(1)
    page = ghostscript(box.printed_files()[0])[0]
    row = page[page.shape[0] // 2].astype(int)
    image_columns = np.nonzero(row < 250)[0]
    inside = row[image_columns.min() + 3 : image_columns.max() - 3]
    assert inside[0] < 30 and inside[-1] > 220
    assert np.all(np.diff(inside) >= -3)  # monotonic ramp: the 12-bit data was mapped, not wrapped


def test_12_bit_without_presentation_lut(print_server: Callable[..., RunningPrinter], images: dict[str, Path],
                                         tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="appliance.printing")
    box = print_server()
    dcmtk = Dcmtk(tmp_path / "dcmtk", box.port, "TESTPRINT", twelve_bit=True)
    done = dcmtk.print_images([images["ramp12"], images["dark"]], (1, 2))
    assert done.returncode == 0, done.stdout + done.stderr
    box.wait_jobs(1)
    assert caplog.text.count("MONOCHROME2 12-bit") == 2 and "Presentation LUT" not in caplog.text
    page = ghostscript(box.printed_files()[0])[0]
    # --layout 1 2: one column, two rows; the ramp on top, the dark image below.
    top, bottom = page[: page.shape[0] // 2], page[page.shape[0] // 2 :]
    assert top.min() < 30 and top.max() == 255 and np.median(bottom[bottom < 250]) < 30


def test_session_level_print(print_server: Callable[..., RunningPrinter], images: dict[str, Path],
                             tmp_path: Path) -> None:
    box = print_server()
    dcmtk = Dcmtk(tmp_path / "dcmtk", box.port, "TESTPRINT")
    done = dcmtk.print_images([images["bright"], images["dark"]], (2, 1), session_print=True)
    assert done.returncode == 0, done.stdout + done.stderr
    job = box.wait_jobs(1)[0]
    assert job.level == "film session"


def test_annotation_box(print_server: Callable[..., RunningPrinter], images: dict[str, Path],
                        tmp_path: Path) -> None:
    box = print_server({"film": printer(annotation_boxes=1)})
    dcmtk = Dcmtk(tmp_path / "dcmtk", box.port, "TESTPRINT", annotation=True)
    done = dcmtk.print_images([images["bright"]], (1, 1), "--annotation", "LEFT KNEE", "-pd", "-pn", "-pl")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "not enough Annotation Boxes" not in done.stdout + done.stderr
    box.wait_jobs(1)
    ps = box.printed_files()[0].read_text(errors="replace")
    assert "(LEFT KNEE)" in ps
    page = ghostscript(box.printed_files()[0])[0]
    assert np.count_nonzero(page[-25:] < 100) > 30  # the text is on the film, in the bottom band
