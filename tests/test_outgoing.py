"""What goes on the wire when it cannot be the cached file: a compressed instance decoded for a
destination that takes no compressed syntax is written frame by frame, and is what pydicom's own
``decompress()`` makes of it — the same pixel bytes and image attributes, the same UIDs — for
RLE, JPEG-LS, JPEG 2000, JPEG Baseline (encoded by DCMTK's ``dcmcjpeg``, YCbCr 4:2:2) and JPEG
Lossless SV1 (``dcmcjpeg`` too),
single- and multi-frame, into Explicit and Implicit VR Little Endian."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from appliance import outgoing, rules

from .corpus import Series, write_series
from .peers import DCMTK_ENV, require_tool


def multiframe(single: Path, frames: int, out: Path) -> Path:
    """A multi-frame instance made of ``frames`` shifted copies of ``single``'s image."""
    ds = pydicom.dcmread(single)
    pixels = ds.PixelData
    ds.NumberOfFrames = frames
    ds.PixelData = b"".join(pixels[i * 3:] + pixels[:i * 3] for i in range(frames))
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Compressed instances, by a name that says how they were made."""
    require_tool("dcmcjpeg")
    out = tmp_path_factory.mktemp("outgoing")
    us = write_series(out / "us", "outgoing", 1, 1, Series("US", 1, 120, 160, rgb=True))[0]
    ct = write_series(out / "ct", "outgoing", 2, 1, Series("CT", 1, 128, 128))[0]
    cine = multiframe(us, 6, out / "cine.dcm")
    made: dict[str, Path] = {}
    for name, plain in (("ct", ct), ("us", us), ("cine", cine)):
        for syntax in ("rle", "jpegls", "j2k"):
            ds = pydicom.dcmread(plain)
            ds.compress({"rle": RLELossless, "jpegls": "1.2.840.10008.1.2.4.80",
                         "j2k": "1.2.840.10008.1.2.4.90"}[syntax])
            made[f"{name}-{syntax}"] = out / f"{name}-{syntax}.dcm"
            ds.save_as(made[f"{name}-{syntax}"], enforce_file_format=True)
    for name, plain in (("us", us), ("cine", cine)):  # 8-bit colour: JPEG Baseline, YBR_FULL_422
        made[f"{name}-jpeg"] = out / f"{name}-jpeg.dcm"
        subprocess.run(["dcmcjpeg", "+eb", str(plain), str(made[f"{name}-jpeg"])], env=DCMTK_ENV, check=True)
    # 16-bit grey: JPEG Lossless, first-order prediction (SV1), what CR and DX send most
    made["ct-jpeg-lossless"] = out / "ct-jpeg-lossless.dcm"
    subprocess.run(["dcmcjpeg", "+e1", str(ct), str(made["ct-jpeg-lossless"])], env=DCMTK_ENV, check=True)
    return made


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
@pytest.mark.parametrize("name", ["ct-rle", "ct-jpegls", "ct-j2k", "ct-jpeg-lossless",
                                  "us-rle", "us-jpegls", "us-j2k", "us-jpeg",
                                  "cine-rle", "cine-jpegls", "cine-j2k", "cine-jpeg"])
def test_a_decoded_copy_is_what_pydicom_decompress_makes(sources: dict[str, Path], name: str, syntax: UID,
                                                         tmp_path: Path) -> None:
    source = sources[name]
    assert UID(pydicom.dcmread(source, stop_before_pixels=True).file_meta.TransferSyntaxUID).is_compressed
    copy_path = outgoing.decoded_copy(source, [], syntax, tmp_path)
    copy = pydicom.dcmread(copy_path)
    expected = pydicom.dcmread(source)
    expected.decompress(generate_instance_uid=False)

    assert copy.file_meta.TransferSyntaxUID == syntax
    assert copy.file_meta.MediaStorageSOPInstanceUID == expected.SOPInstanceUID
    assert copy.PixelData == expected.PixelData
    for element in expected:
        if element.tag != 0x7FE00010:
            assert element.tag in copy and copy[element.tag].value == element.value, element
    assert set(copy.keys()) == set(expected.keys())


def test_a_decoded_copy_carries_the_rules_edits(sources: dict[str, Path], tmp_path: Path) -> None:
    edits = [rules.TagEdit("set", rules.TagRef(0x00080080, "InstitutionName"), "LO", ("EDGE CLINIC",))]
    copy = pydicom.dcmread(outgoing.decoded_copy(sources["cine-jpeg"], edits, ExplicitVRLittleEndian, tmp_path))
    assert copy.InstitutionName == "EDGE CLINIC"
    assert copy.NumberOfFrames == 6 and copy.PhotometricInterpretation == "RGB"
