"""intake reads a received file's header from where the data set starts (the receiver wrote
the file meta itself); what it indexes and routes on must be what pydicom's dcmread gives."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pynetdicom.dsutils import split_dataset

from appliance import rules
from appliance.config import loads
from appliance.intake import HEADER_TAGS, _read_header, _tags_to_read, _text
from appliance.rules import Origin


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
        routed = _read_header(path, None, syntax, offset, with_meta=True)
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


ROUTES = """
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}
  other: {ae_title: OTHER, host: 127.0.0.1, port: 105}
routes:
  - when: {all: [{Modality: CT}, {not: {SliceThickness: {gt: 2}}}, {calling_ae: CT1}]}
    send_to: [pacs]
  - when: {any: [{Modality: {in: [US, MG]}}, {not: {BodyPartExamined: {present: true}}}]}
    send_to: [other]
    continue: true
  - when: {"(0002,0010)": {glob: "1.2.840.10008.1.2.4.*"}, "(0008,0080)": {regex: "(?i)clinic"}}
    send_to: [pacs]
  - when: {Rows: {ge: 512}, SeriesDescription: {present: false}}
    send_to: [other]
"""


def test_rules_see_in_the_elements_they_test_what_they_would_see_in_the_whole_header(
        corpus: dict[str, list[Path]]) -> None:
    config = loads(ROUTES, "appliance.yaml")
    tags, with_meta = _tags_to_read(config)
    assert rules.tested_tags(config.routes) == {
        0x00080060, 0x00180050, 0x00180015, 0x00020010, 0x00080080, 0x00280010, 0x0008103E}
    assert with_meta and tags >= rules.tested_tags(config.routes)
    origins = [Origin("CT1", "EDGE", "127.0.0.1"), Origin("US1", "EDGE", "10.0.0.1")]
    matched: set[int] = set()
    for name in ("ct", "mr", "us", "mg", "rle", "jpegls", "j2k"):
        for path in corpus[name][:2]:
            meta, offset = split_dataset(path)
            syntax = str(meta.TransferSyntaxUID)
            whole = _read_header(path, None, syntax, offset, with_meta=True)
            tested = _read_header(path, tags, syntax, offset, with_meta)
            for origin in origins:
                decision = rules.decide(config.routes, tested, origin)
                assert decision == rules.decide(config.routes, whole, origin)
                matched.update(rule.index for rule in decision.rules)
    assert matched == {0, 1, 2, 3}  # every rule decided something somewhere


# ---- elements whose VR depends on another ("US or SS") ----------------------------------------

def signed_implicit_ct(path: Path, seed: str) -> pydicom.Dataset:
    """An Implicit VR Little Endian CT of signed pixels (Pixel Representation 1) whose Pixel
    Padding Value is -2000: in Implicit VR nothing but Pixel Representation says that its
    "US or SS" value is signed."""
    from pydicom.uid import ImplicitVRLittleEndian

    from .corpus import Series, make_instance

    ds = make_instance(seed, 1, 1, 1, Series("CT", 1, 64, 64))
    ds.PixelRepresentation = 1
    ds.PixelPaddingValue = -2000
    ds["PixelPaddingValue"].VR = "SS"
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return ds


SIGNED_ROUTES = {"routes": [{"when": {"PixelPaddingValue": -2000}, "send_to": ["signed"]},
                            {"send_to": ["other"]}]}


def test_a_rule_on_a_signed_value_matches_in_implicit_vr(appliance_factory, tmp_path) -> None:
    """A rule `PixelPaddingValue: -2000` routes an Implicit VR CT with signed pixels: the
    receiver reads Pixel Representation with the element, as pydicom needs to tell SS from US
    (without it the value read 63536 and the rule never matched); route-test agrees."""
    from pydicom.uid import ImplicitVRLittleEndian
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from .pacs import closed_port, deliveries, destination

    box = appliance_factory({"destinations": {"signed": destination("SIGNED", closed_port()),
                                              "other": destination("OTHER", closed_port())},
                             **SIGNED_ROUTES})
    ds = signed_implicit_ct(tmp_path / "signed.dcm", "signed")
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE")
    assert assoc.is_established
    try:
        assert int(assoc.send_c_store(tmp_path / "signed.dcm").Status) == 0x0000
    finally:
        assoc.release()
    assert {r["destination"] for r in deliveries(box).values()} == {"signed"}, dict(deliveries(box))
    explained = box.cli("route-test", str(tmp_path / "signed.dcm")).stdout
    assert "signed" in explained and "63536" not in explained, explained
    assert ds.PixelPaddingValue == -2000


def test_the_elements_read_for_a_rule_on_an_ambiguous_vr_include_what_resolves_it() -> None:
    config = loads("destinations: {signed: {ae_title: S, host: 127.0.0.1, port: 104},"
                   " other: {ae_title: O, host: 127.0.0.1, port: 104}}\n"
                   "routes: [{when: {PixelPaddingValue: -2000}, send_to: [signed]}, {send_to: [other]}]\n",
                   "appliance.yaml")
    tags, _ = _tags_to_read(config)
    assert {0x00280103, 0x00280100} <= tags  # Pixel Representation, Bits Allocated


# ---- what is not needed is not parsed ----------------------------------------------------------

def enhanced_ct(path: Path, seed: str, frames: int) -> pydicom.Dataset:
    """An enhanced multi-frame CT whose Per-frame Functional Groups Sequence (5200,9230) holds
    ``frames`` items of nested sequences (about 300 bytes each), all of undefined length."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    from .corpus import Series, make_instance

    ds = make_instance(seed, 1, 1, 1, Series("CT", 1, 64, 64))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.NumberOfFrames = 1

    def item(keyword: str, **values: object) -> Sequence:
        inner = Dataset()
        for key, value in values.items():
            setattr(inner, key, value)
        return Sequence([inner])

    groups = []
    for n in range(frames):
        group = Dataset()
        group.PlanePositionSequence = item("PlanePosition", ImagePositionPatient=[-125.0, -125.0, n * 0.625])
        group.PlaneOrientationSequence = item("PlaneOrientation", ImageOrientationPatient=[1, 0, 0, 0, 1, 0])
        group.FrameContentSequence = item("FrameContent", FrameAcquisitionNumber=n, InStackPositionNumber=n + 1,
                                          DimensionIndexValues=[1, n + 1], StackID="1")
        group.PixelValueTransformationSequence = item("Rescale", RescaleIntercept=-1024, RescaleSlope=1,
                                                      RescaleType="HU")
        group.FrameVOILUTSequence = item("VOI", WindowCenter=40, WindowWidth=400)
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)

    def undefined_lengths(dataset: Dataset) -> None:  # as scanners write them (pydicom would not)
        for element in dataset:
            if element.VR == "SQ":
                element.is_undefined_length = True
                for inner in element.value:
                    inner.is_undefined_length_sequence_item = True
                    undefined_lengths(inner)

    undefined_lengths(ds)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_a_long_functional_groups_sequence_is_checked_not_parsed(appliance_factory, tmp_path) -> None:
    """An enhanced CT with 6 MB of per-frame functional groups after the elements the index
    needs: the receiver stops reading at the highest element it needs, and only walks the
    rest's element headers to see that it is whole — its peak RSS grows by a few MB, where
    parsing the sequence took 170 MB (and 6 s). The instance is stored and indexed."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, _config

    from .test_refused_data_sets import cached_uids, peak_rss_mb

    path = tmp_path / "enhanced.dcm"
    ds = enhanced_ct(path, "enhanced", 16000)
    assert path.stat().st_size > 4_000_000
    box = appliance_factory()
    assert box.process is not None
    before = peak_rss_mb(box.process.pid)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2.1", ExplicitVRLittleEndian)
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", box.port, ae_title="EDGE")
        assert assoc.is_established
        status = int(assoc.send_c_store(path).Status)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    grown = peak_rss_mb(box.process.pid) - before
    assert status == 0x0000
    assert cached_uids(box) == {ds.SOPInstanceUID}
    assert grown < 12, f"the receiver's peak RSS grew by {grown:.0f} MB"
