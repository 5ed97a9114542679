"""intake reads a received file's header from where the data set starts (the receiver wrote
the file meta itself); what it indexes and routes on must be what pydicom's dcmread gives."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pynetdicom.dsutils import split_dataset

from appliance.intake import HEADER_TAGS, _read_header, _text


@pytest.mark.parametrize("name", ["ct", "mr", "us", "cr", "dx", "mg", "rle", "jpegls", "j2k"])
def test_header_from_the_data_set_offset_is_dcmreads(corpus: dict[str, list[Path]], name: str) -> None:
    for path in corpus[name][:3]:
        meta, offset = split_dataset(path)
        syntax = str(meta.TransferSyntaxUID)
        reference = pydicom.dcmread(path, stop_before_pixels=True)
        for tags in (HEADER_TAGS, None):
            header = _read_header(path, tags, syntax, offset)
            for keyword in HEADER_TAGS:
                assert _text(header, keyword) == (str(reference.get(keyword, "")).strip()), (path, keyword)
        routed = _read_header(path, None, syntax, offset)
        assert routed.file_meta.TransferSyntaxUID == syntax  # rules may test (0002,xxxx)
        assert "PixelData" not in routed
        assert {e.tag: e.value for e in routed} == {e.tag: e.value for e in reference}  # what rules see


def test_a_latin1_patient_name_is_decoded(tmp_path: Path) -> None:
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    path = tmp_path / "latin1.dcm"
    ds.save_as(path, enforce_file_format=True)
    meta, offset = split_dataset(path)
    header = _read_header(path, HEADER_TAGS, str(meta.TransferSyntaxUID), offset)
    assert _text(header, "PatientName") == "Müller^Jürgen"
