"""What goes on the wire when it cannot be the cached file.

A compressed instance decoded for a destination that takes no compressed syntax is written frame
by frame, and is what pydicom's own ``decompress()`` makes of it — the same pixel bytes and image
attributes, the same UIDs — for RLE, JPEG-LS, JPEG 2000, JPEG Baseline (encoded by DCMTK's
``dcmcjpeg``, YCbCr 4:2:2) and JPEG Lossless SV1 (``dcmcjpeg`` too), single- and multi-frame,
into Explicit and Implicit VR Little Endian.

An uncompressed instance re-encoded for a destination that takes another uncompressed syntax is
what pydicom makes of it in memory — every value, the pixel bytes, the UIDs — for 8- and 16-bit,
single- and multi-frame images, float pixel data and none, from Explicit, Implicit and Deflated
sources; from a Big Endian one it has the same pixel values and words; and 200 MiB of pixel data
are re-encoded by a process that never holds more than 100 MB.

Both keep the elements after the pixel data (a private group), and drop Data Set Trailing Padding.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from appliance import outgoing, rules

from .corpus import Series, make_instance, write_series
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


# ---- elements after the pixel data --------------------------------------------------------------

PRIVATE_TAG = 0x7FE11001  # in the block of the private creator "EDGE TEST" (7FE1,0010)
PRIVATE_VALUE = bytes(range(1, 11))
TRAILING_PADDING = 0xFFFCFFFC


def with_trailing_elements(ds: Dataset) -> Dataset:
    """``ds`` with what some modalities write after the pixel data: a private group (as GE's
    (7FE1,xxxx)) and Data Set Trailing Padding."""
    ds.private_block(0x7FE1, "EDGE TEST", create=True).add_new(0x01, "OB", PRIVATE_VALUE)
    ds.add_new(TRAILING_PADDING, "OB", b"\0" * 64)
    return ds


def assert_same_elements(copy: Dataset, expected: Dataset) -> None:
    """Every element of ``expected`` is in ``copy`` with the same value, and no other."""
    for element in expected:
        assert element.tag in copy and copy[element.tag].value == element.value, element
    assert set(copy.keys()) == set(expected.keys())


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_a_decoded_copy_keeps_the_elements_after_the_pixel_data(sources: dict[str, Path], syntax: UID,
                                                                tmp_path: Path) -> None:
    source = tmp_path / "cine-rle-private.dcm"
    with_trailing_elements(pydicom.dcmread(sources["cine-rle"])).save_as(source, enforce_file_format=True)
    copy = pydicom.dcmread(outgoing.decoded_copy(source, [], syntax, tmp_path))
    expected = pydicom.dcmread(source)
    expected.decompress(generate_instance_uid=False)
    del expected[TRAILING_PADDING]

    assert copy[PRIVATE_TAG].value == PRIVATE_VALUE
    assert copy.PixelData == expected.PixelData
    assert_same_elements(copy, expected)


# ---- re-encoded: uncompressed to another uncompressed syntax -------------------------------------

_OWN_SYNTAX = {"explicit": ExplicitVRLittleEndian, "implicit": ImplicitVRLittleEndian,
               "deflated": DeflatedExplicitVRLittleEndian}


@pytest.fixture(scope="module")
def plain_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uncompressed instances with elements after their pixel data, by kind and transfer syntax
    (``ct-implicit``): 16-bit grey and 8-bit colour, single- and multi-frame, float pixel data
    and none (a non-image instance ends with the private group)."""
    out = tmp_path_factory.mktemp("plain")
    ct = write_series(out / "ct", "plain", 1, 1, Series("CT", 1, 64, 48))[0]
    us = write_series(out / "us", "plain", 2, 1, Series("US", 1, 40, 56, rgb=True))[0]
    kinds = {"ct": pydicom.dcmread(ct), "ct-frames": pydicom.dcmread(multiframe(ct, 3, out / "ct-frames.dcm")),
             "us": pydicom.dcmread(us), "cine": pydicom.dcmread(multiframe(us, 6, out / "cine.dcm"))}
    floats = pydicom.dcmread(ct)
    floats.FloatPixelData = (np.frombuffer(floats.PixelData, "<u2").astype("<f4") / 7).tobytes()
    floats.BitsAllocated = 32
    del floats.PixelData, floats.BitsStored, floats.HighBit, floats.PixelRepresentation
    kinds["float"] = floats
    kinds["no-pixels"] = pydicom.dcmread(ct)
    del kinds["no-pixels"].PixelData
    made: dict[str, Path] = {}
    for kind, ds in kinds.items():
        with_trailing_elements(ds)
        for name in ("explicit", "implicit"):
            ds.file_meta.TransferSyntaxUID = _OWN_SYNTAX[name]
            made[f"{kind}-{name}"] = out / f"{kind}-{name}.dcm"
            ds.save_as(made[f"{kind}-{name}"], enforce_file_format=True)
    kinds["ct"].file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    made["ct-deflated"] = out / "ct-deflated.dcm"
    kinds["ct"].save_as(made["ct-deflated"], enforce_file_format=True)
    return made


EDITS = (rules.TagEdit("set", rules.TagRef(0x00080080, "InstitutionName"), "LO", ("Klinik Müller",)),
         rules.TagEdit("remove", rules.TagRef(0x00100030, "PatientBirthDate")))


_KINDS = ("ct", "ct-frames", "us", "cine", "float", "no-pixels")


@pytest.mark.parametrize("edits", [(), EDITS], ids=["as-is", "edited"])
@pytest.mark.parametrize("name, syntax", [
    *(pytest.param(f"{kind}-explicit", ImplicitVRLittleEndian, id=f"{kind}-explicit-to-implicit") for kind in _KINDS),
    *(pytest.param(f"{kind}-implicit", ExplicitVRLittleEndian, id=f"{kind}-implicit-to-explicit") for kind in _KINDS),
    pytest.param("ct-deflated", ImplicitVRLittleEndian, id="ct-deflated-to-implicit"),
    pytest.param("ct-deflated", ExplicitVRLittleEndian, id="ct-deflated-to-explicit"),
])
def test_a_reencoded_copy_is_what_pydicom_makes_in_memory(plain_sources: dict[str, Path], name: str, syntax: UID,
                                                          edits: tuple[rules.TagEdit, ...], tmp_path: Path) -> None:
    source = plain_sources[name]
    copy = pydicom.dcmread(outgoing.reencoded_copy(source, edits, syntax, tmp_path))
    expected = pydicom.dcmread(source)
    rules.apply_edits(expected, edits)
    del expected[TRAILING_PADDING]

    assert copy.file_meta.TransferSyntaxUID == syntax
    assert copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID == expected.SOPInstanceUID
    for pixels in ("PixelData", "FloatPixelData"):
        assert copy.get(pixels) == expected.get(pixels), pixels  # bytes for bytes
    assert copy[PRIVATE_TAG].value == PRIVATE_VALUE
    if edits:
        assert copy.InstitutionName == "Klinik Müller" and "PatientBirthDate" not in copy
    assert_same_elements(copy, expected)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian], ids=["explicit", "implicit"])
def test_a_big_endian_instance_is_reencoded_with_its_words_swapped(syntax: UID, tmp_path: Path) -> None:
    """Explicit VR Big Endian (retired): the 16-bit pixel values and the words of an OW element
    are the same numbers in the copy; the 1.5 MiB of pixel data are swapped chunk by chunk."""
    ds = with_trailing_elements(make_instance("big-endian", 1, 1, 1, Series("CT", 1, 512, 512)))
    frames = np.stack([np.roll(ds.pixel_array, 7 * i) for i in range(3)])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.astype(">u2").tobytes()
    lut = np.arange(1, 65536, 300, dtype=np.uint16)  # no word reads the same swapped
    ds.add_new(0x00281201, "OW", lut.astype(">u2").tobytes())  # Red Palette Color Lookup Table Data
    ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
    source = tmp_path / "big-endian.dcm"
    ds.save_as(source, enforce_file_format=True)
    original = pydicom.dcmread(source)

    copy = pydicom.dcmread(outgoing.reencoded_copy(source, [], syntax, tmp_path))
    assert copy.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(copy.pixel_array, frames)
    np.testing.assert_array_equal(original.pixel_array, frames)  # what pydicom reads from the source
    assert copy.RedPaletteColorLookupTableData == lut.astype("<u2").tobytes()
    assert copy[PRIVATE_TAG].value == PRIVATE_VALUE and TRAILING_PADDING not in copy
    assert copy.Rows == 512 and copy.RescaleIntercept == -1024 and copy.SOPInstanceUID == original.SOPInstanceUID


def large_instance(path: Path, frames: int, rows: int, columns: int) -> str:
    """An Explicit VR Little Endian CT of ``frames`` 16-bit frames, its pixel data appended a
    frame at a time (never whole in memory); returns the pixel data's SHA-256."""
    ds = make_instance("large", 1, 1, 1, Series("CT", 1, rows, columns))
    ds.NumberOfFrames = frames
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    digest = hashlib.sha256()
    frame = np.arange(rows * columns, dtype="<u2")
    with open(path, "ab") as out:
        out.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", frames * rows * columns * 2))
        for i in range(frames):
            data = np.roll(frame, i).tobytes()
            out.write(data)
            digest.update(data)
    return digest.hexdigest()


def implicit_pixel_data_digest(path: Path) -> str:
    """The SHA-256 of an Implicit VR file's pixel data, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as src:
        pydicom.dcmread(src, stop_before_pixels=True)
        tag_group, tag_element, left = struct.unpack("<HHI", src.read(8))
        assert (tag_group, tag_element) == (0x7FE0, 0x0010)
        while left:
            chunk = src.read(min(left, 1 << 20))
            assert chunk, "the copy ends inside its pixel data"
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


# The peak as VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forked parent.
_REENCODE_AND_REPORT_PEAK = """
import sys
from pathlib import Path
from pydicom.uid import ImplicitVRLittleEndian
from appliance import outgoing
copy = outgoing.reencoded_copy(Path(sys.argv[1]), [], ImplicitVRLittleEndian, Path(sys.argv[2]))
status = Path("/proc/self/status").read_text().splitlines()
print(copy, next(line.split()[1] for line in status if line.startswith("VmHWM:")))  # kB
"""


def test_a_large_instance_is_reencoded_in_flat_memory(tmp_path: Path) -> None:
    """200 MiB of Explicit VR pixel data (400 frames of 512×512, 16-bit: a breast tomosynthesis
    volume) re-encoded into Implicit VR by a process whose peak memory stays under 100 MB."""
    frames, rows, columns = 400, 512, 512
    source = tmp_path / "tomo.dcm"
    digest = large_instance(source, frames, rows, columns)
    pixel_mb = frames * rows * columns * 2 / 2**20
    done = subprocess.run([sys.executable, "-c", _REENCODE_AND_REPORT_PEAK, str(source), str(tmp_path)],
                          capture_output=True, text=True, check=True)
    copy_path, peak_kb = done.stdout.split()
    peak_mb = int(peak_kb) / 1024

    copy = pydicom.dcmread(copy_path, stop_before_pixels=True)
    assert copy.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian and copy.NumberOfFrames == frames
    assert implicit_pixel_data_digest(Path(copy_path)) == digest
    assert peak_mb < 100, f"peak {peak_mb:.0f} MB to re-encode {pixel_mb:.0f} MiB of pixel data"


@pytest.mark.parametrize("name", ["plain", "ct-rle"])
def test_an_edited_copy_applies_edits_to_elements_after_the_pixel_data(sources: dict[str, Path], name: str,
                                                                       tmp_path: Path) -> None:
    """A rule that removes a private group stored after the pixel data (as GE's (7FE1,xxxx)),
    and sets a header element: both apply; the pixel data (plain, or compressed fragments) is
    the source's byte for byte; the copy stays in the source's transfer syntax."""
    ds = make_instance("edited-after", 1, 1, 1, Series("CT", 1, 64, 64)) if name == "plain" \
        else pydicom.dcmread(sources[name])
    source = tmp_path / f"{name}-private.dcm"
    with_trailing_elements(ds).save_as(source, enforce_file_format=True)
    edits = [rules.TagEdit("remove", rules.TagRef(PRIVATE_TAG)),
             rules.TagEdit("set", rules.TagRef(0x00080080, "InstitutionName"), "LO", ("Klinik Süd",))]
    copy = pydicom.dcmread(outgoing.edited_copy(source, edits, tmp_path))
    expected = pydicom.dcmread(source)
    del expected[PRIVATE_TAG], expected[TRAILING_PADDING]
    expected.InstitutionName = "Klinik Süd"
    expected.SpecificCharacterSet = copy.SpecificCharacterSet  # the edit chose one that holds "ü"
    assert copy.file_meta.TransferSyntaxUID == expected.file_meta.TransferSyntaxUID
    assert copy.PixelData == expected.PixelData
    assert copy.InstitutionName == "Klinik Süd"
    assert PRIVATE_TAG not in copy and 0x7FE10010 in copy  # the creator was not asked to go
    assert_same_elements(copy, expected)
