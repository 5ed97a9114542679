"""The rule engine: conditions, decisions, tag edits and the errors a bad rule gives at load."""

from __future__ import annotations

import hashlib
import struct
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from appliance.config import ConfigError, loads
from appliance.rules import (
    Decision,
    Delivery,
    MatchedRule,
    Origin,
    TagEdit,
    TagRef,
    apply_edits,
    check,
    decide,
    read_condition,
    route_problems,
)
from appliance.yamlschema import Context, compose

CT_SOP_CLASS = UID("1.2.840.10008.5.1.4.1.1.2")


def make_dataset() -> Dataset:
    """A CT header with one element of each kind the operators must handle."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.4.5")
    ds.SOPClassUID = CT_SOP_CLASS
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.Modality = "CT"
    ds.InstitutionName = "St Mary's Hospital"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SliceThickness = "2.50"
    ds.SeriesNumber = "3"
    ds.Rows = 512
    ds.BodyPartExamined = ""  # type 2: present but empty
    ds.PatientName = "Doe^John"
    ds.PatientID = "00123"
    ds.BurnedInAnnotation = "NO"
    ds.AccessionNumber = "A123"
    ds.StudyDate = "20240315"
    ds.StudyTime = "1015"  # 10:15, a valid short form (PS3.5 6.2 TM)
    ds.AcquisitionDateTime = "20240315101500.123456+0100"
    # An FL as read from a file: the float32 nearest 29.97.
    ds.RecommendedDisplayFrameRateInFloat = struct.unpack("<f", struct.pack("<f", 29.97))[0]
    ds.SeriesDescription = "Scout 2"
    ds.ReferencedImageSequence = DicomSequence([Dataset()])
    ds.private_block(0x0009, "ACME 1.0", create=True).add_new(0x01, "LO", "EDGE-PRIVATE")
    # A private element whose VR is unknown (as read from an implicit VR file).
    ds.add_new(0x00111001, "UN", b"X\\Y ")
    return ds


CT1_V4 = Origin("CT1", "EDGE", "10.1.2.3")
CT1_V6 = Origin("CT1", "EDGE", "fd00:1::5")
CT1_MAPPED = Origin("CT1", "EDGE", "::ffff:10.1.2.3")
UNKNOWN = Origin()


def condition(text: str):  # type: ignore[no-untyped-def]
    ctx = Context("test.yaml")
    node = compose(text, ctx)
    assert node is not None
    parsed = read_condition(node, "when", ctx)
    assert not ctx.problems, [str(p) for p in ctx.problems]
    return parsed


CONDITIONS = [
    # equality, case-sensitive
    ("{Modality: CT}", CT1_V4, True),
    ('{Modality: {glob: "c*"}}', CT1_V4, False),  # a pattern is not a value: not checked against the VR
    ('{Modality: {regex: "(?i)^ct$"}}', CT1_V4, True),
    ("{Modality: {eq: CT}}", CT1_V4, True),
    ("{Modality: {ne: CT}}", CT1_V4, False),
    ("{Modality: {ne: MR}}", CT1_V4, True),
    ("{Manufacturer: {ne: ACME}}", CT1_V4, True),  # absent: ne is not-eq
    # list membership
    ("{Modality: [MR, CT]}", CT1_V4, True),
    ("{Modality: {in: [MR, US]}}", CT1_V4, False),
    # glob and regex, by tag or keyword
    ('{"(0008,0080)": {glob: "St Mary*"}}', CT1_V4, True),
    ('{InstitutionName: {glob: "st mary*"}}', CT1_V4, False),
    ('{SeriesDescription: {regex: "(?i)scout"}}', CT1_V4, True),
    ('{SeriesDescription: {regex: "^scout"}}', CT1_V4, False),
    ('{PatientName: {glob: "Doe^*"}}', CT1_V4, True),
    # multi-valued: any value, or the whole value
    ("{ImageType: AXIAL}", CT1_V4, True),
    ("{ImageType: 'ORIGINAL\\PRIMARY\\AXIAL'}", CT1_V4, True),
    ("{ImageType: 'ORIGINAL\\SECONDARY'}", CT1_V4, False),
    ('{ImageType: {glob: "DERIVED*"}}', CT1_V4, False),
    ("{ImageType: {regex: '^ORIGINAL\\\\PRIMARY'}}", CT1_V4, True),  # YAML '' keeps both backslashes
    # numbers: numeric VRs compare as numbers, others as text
    ("{SliceThickness: 2.5}", CT1_V4, True),
    ("{SliceThickness: {gt: 2.5}}", CT1_V4, False),
    ("{SliceThickness: {ge: 2.5}}", CT1_V4, True),
    ("{SliceThickness: {gt: 2, lt: 3}}", CT1_V4, True),
    ("{SliceThickness: {gt: 2, lt: 2.4}}", CT1_V4, False),
    ("{Rows: 512}", CT1_V4, True),
    ("{Rows: {le: 511}}", CT1_V4, False),
    ("{SeriesNumber: 03}", CT1_V4, True),
    ("{PatientID: 00123}", CT1_V4, True),
    ("{PatientID: 123}", CT1_V4, False),
    ("{BurnedInAnnotation: NO}", CT1_V4, True),  # YAML 1.1 would have read a boolean
    ("{StudyDate: {ge: 20240101, lt: 20250101}}", CT1_V4, True),
    ("{StudyDate: 20240315}", CT1_V4, True),
    ("{StudyTime: {in: [1015, '10:15:00']}}", CT1_V4, True),
    ("{AcquisitionDateTime: {ne: 20240315101500.123456+0100}}", CT1_V4, False),
    ("{SeriesNumber: 3.0}", CT1_V4, True),
    ("{SOPInstanceUID: {in: [1.2.3.4.5, 1.2.3.04]}}", CT1_V4, True),  # leading zeros exist in the wild
    ("{StudyDate: {gt: 20240315}}", CT1_V4, False),
    # times compare written out in full: 1015 is 10:15:00
    ("{StudyTime: {ge: 100000}}", CT1_V4, True),
    ("{StudyTime: {ge: 1000, lt: 1016}}", CT1_V4, True),
    ("{StudyTime: {gt: 101500}}", CT1_V4, False),
    ("{StudyTime: {le: '10:15:00'}}", CT1_V4, True),
    ("{AcquisitionDateTime: {gt: 20240315101500.123455}}", CT1_V4, True),  # every digit counts
    ("{AcquisitionDateTime: {lt: 20240315101500.123456}}", CT1_V4, False),
    ("{AcquisitionDateTime: {ge: 2024, lt: 2025}}", CT1_V4, True),
    # an FL compares at its own precision
    ("{RecommendedDisplayFrameRateInFloat: 29.97}", CT1_V4, True),
    ("{RecommendedDisplayFrameRateInFloat: {in: ['29.970', 30]}}", CT1_V4, True),
    ("{RecommendedDisplayFrameRateInFloat: {ge: 29.97, le: 29.97}}", CT1_V4, True),
    ("{RecommendedDisplayFrameRateInFloat: {gt: 29.97}}", CT1_V4, False),
    ("{RecommendedDisplayFrameRateInFloat: {glob: '29.97'}}", CT1_V4, True),
    ("{AccessionNumber: {gt: 5}}", CT1_V4, False),  # not a number: no match, no crash
    # presence; absent and empty elements
    ("{Manufacturer: {present: false}}", CT1_V4, True),
    ("{Manufacturer: {present: true}}", CT1_V4, False),
    ("{Manufacturer: ACME}", CT1_V4, False),
    ("{Manufacturer: {gt: 1}}", CT1_V4, False),
    ('{Manufacturer: {regex: "."}}', CT1_V4, False),
    ("{BodyPartExamined: {present: true}}", CT1_V4, False),
    ("{not: {BodyPartExamined: {present: true}}}", CT1_V4, True),
    ("{ReferencedImageSequence: {present: true}}", CT1_V4, True),
    # private elements, unknown VR, file meta
    ('{"(0009,1001)": EDGE-PRIVATE}', CT1_V4, True),
    ('{"(0011,1001)": Y}', CT1_V4, True),
    ("{TransferSyntaxUID: 1.2.840.10008.1.2.1}", CT1_V4, True),
    # combinators
    ("{any: [{Modality: MR}, {Modality: CT}]}", CT1_V4, True),
    ("{all: [{Modality: CT}, {Modality: MR}]}", CT1_V4, False),
    ("{Modality: CT, Rows: 256}", CT1_V4, False),
    ("{not: {Modality: CT}}", CT1_V4, False),
    ("{any: [{not: {Modality: CT}}, {all: [{Rows: 512}, {SeriesNumber: 3}]}]}", CT1_V4, True),
    # the association
    ("{calling_ae: CT1}", CT1_V4, True),
    ("{calling_ae: ct1}", CT1_V4, False),
    ('{calling_ae: {glob: "CT*"}}', CT1_V4, True),
    ("{called_ae: EDGE}", CT1_V4, True),
    ("{called_ae: {in: [PACS, ARCHIVE]}}", CT1_V4, False),
    ("{calling_ae: CT1}", UNKNOWN, False),
    # the spaces that pad an AE title or a value count on neither side
    ('{calling_ae: "CT1 "}', CT1_V4, True),
    ('{calling_ae: {in: [" CT1", CT2]}}', CT1_V4, True),
    ('{calling_ae: {ne: "CT1  "}}', CT1_V4, False),
    ('{Modality: "CT "}', CT1_V4, True),
    ('{"(0009,1001)": {glob: "EDGE-* "}}', CT1_V4, True),
    ("{calling_ae: {present: false}}", UNKNOWN, True),
    # source networks, IPv4 and IPv6
    ("{source_ip: 10.1.0.0/16}", CT1_V4, True),
    ("{source_ip: 10.2.0.0/16}", CT1_V4, False),
    ("{source_ip: [192.168.0.0/16, 10.1.2.3]}", CT1_V4, True),
    ("{source_ip: {in: [10.0.0.0/8]}}", CT1_V4, True),
    ("{source_ip: fd00::/8}", CT1_V6, True),
    ("{source_ip: 10.0.0.0/8}", CT1_V6, False),
    ("{source_ip: fd00::/8}", CT1_V4, False),
    ("{source_ip: 10.1.0.0/16}", CT1_MAPPED, True),
    ("{source_ip: 0.0.0.0/0}", UNKNOWN, False),
]


@pytest.mark.parametrize(("when", "origin", "expected"), CONDITIONS,
                         ids=[f"{c[0]}-{c[1].source_ip}" for c in CONDITIONS])
def test_condition(when: str, origin: Origin, expected: bool) -> None:
    assert check(condition(when), make_dataset(), origin).matched is expected


def test_a_failed_condition_shows_the_value_it_saw() -> None:
    trace = check(condition("{Modality: MR, Manufacturer: ACME, ImageType: LOCALIZER}"), make_dataset(), CT1_V4)
    assert trace.lines() == [
        "no  all of:",
        '    no  Modality eq "MR"  (Modality = "CT")',
        '    no  Manufacturer eq "ACME"  (Manufacturer absent)',
        '    no  ImageType eq "LOCALIZER"  (ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"])',
    ]


def test_a_comparison_shows_its_operand_as_written() -> None:
    trace = check(condition("{StudyDate: {ge: 20240101}, SliceThickness: {ge: 1.5e1}, "
                            "RecommendedDisplayFrameRateInFloat: {lt: 30}}"), make_dataset(), CT1_V4)
    assert trace.lines() == [
        "no  all of:",
        '    yes StudyDate >= 20240101  (StudyDate = "20240315")',
        '    no  SliceThickness >= 1.5e1  (SliceThickness = "2.50")',
        '    yes RecommendedDisplayFrameRateInFloat < 30  (RecommendedDisplayFrameRateInFloat = "29.97")',
    ]


def test_an_empty_dataset_matches_nothing_but_absence() -> None:
    empty = Dataset()
    for when, _, _ in CONDITIONS:
        parsed = condition(when)
        check(parsed, empty, UNKNOWN)  # never raises
    assert check(condition("{Modality: {present: false}}"), empty, UNKNOWN).matched
    assert not check(condition("{TransferSyntaxUID: {present: true}}"), empty, UNKNOWN).matched


def test_malformed_values_from_a_modality_never_crash_a_rule() -> None:
    """Values as a careless modality sends them, converted only when a rule reads them."""
    ds = Dataset()
    raw = {0x00200011: ("IS", b"abc "), 0x00180050: ("DS", b"x.y "), 0x00080060: ("CS", b"\xff\xfe"),
           0x00280010: ("US", b"\x01"), 0x00100010: ("PN", b"\xc3\x28"), 0x00081140: ("SQ", b"garbage")}
    for tag, (vr, value) in raw.items():
        ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about each invalid value
        for when, _, _ in CONDITIONS:
            check(condition(when), ds, CT1_V4)
        trace = check(condition("{Rows: 1, ReferencedImageSequence: {present: true}, SeriesNumber: {gt: 1}}"),
                      ds, CT1_V4)
    assert [p.matched for p in trace.parts] == [False, False, False]
    assert trace.parts[0].seen.startswith("Rows unreadable: ")


# ---- decisions ---------------------------------------------------------------------------------

DESTINATIONS = """\
destinations:
  a: {ae_title: A, host: a.example, port: 104}
  b: {ae_title: B, host: b.example, port: 104}
  c: {ae_title: C, host: c.example, port: 104}
"""


def routes(text: str):  # type: ignore[no-untyped-def]
    return loads(DESTINATIONS + "routes:\n" + text, "appliance.yaml").routes


def test_first_match_wins() -> None:
    decision = decide(routes("""
  - {name: ct, when: {Modality: CT}, send_to: [a]}
  - {when: {Modality: CT}, send_to: [b]}
"""), make_dataset(), CT1_V4)
    assert decision.destinations == ("a",)
    assert decision.rules == (MatchedRule(0, "ct"),)
    assert decision.status == "routed"


def test_continue_adds_destinations_as_a_union() -> None:
    decision = decide(routes("""
  - {when: {Modality: CT}, send_to: [a, b], continue: true}
  - {when: {Modality: MR}, send_to: [c]}
  - {send_to: [b, c]}
  - {send_to: [a]}
"""), make_dataset(), CT1_V4)
    assert decision.destinations == ("a", "b", "c")
    assert [r.index for r in decision.rules] == [0, 2]


def test_discard_drops_every_destination_and_stops() -> None:
    decision = decide(routes("""
  - {send_to: [a], continue: true}
  - {when: {SeriesDescription: {regex: "(?i)scout"}}, discard: true}
  - {send_to: [b]}
"""), make_dataset(), CT1_V4)
    assert decision.status == "discarded"
    assert decision.deliveries == ()
    assert [r.index for r in decision.rules] == [0, 1]


def test_default_rule_catches_the_rest() -> None:
    decision = decide(routes("""
  - {when: {Modality: MR}, send_to: [a]}
  - {name: default, send_to: [b]}
"""), make_dataset(), CT1_V4)
    assert decision.destinations == ("b",)
    assert decision.rules == (MatchedRule(1, "default"),)


def test_an_instance_no_rule_matches_is_unrouted_not_deleted() -> None:
    decision = decide(routes("- {when: {Modality: MR}, send_to: [a]}\n"), make_dataset(), CT1_V4)
    assert (decision.status, decision.rules, decision.discarded) == ("unrouted", (), False)
    assert decision.describe() == "unrouted (no rule matched)"
    # A matching rule without actions holds the instance: first match wins, nothing is sent.
    held = decide(routes("""
  - {when: {SliceThickness: {gt: 2}}}
  - {send_to: [a]}
"""), make_dataset(), CT1_V4)
    assert (held.status, [r.index for r in held.rules]) == ("unrouted", [0])
    assert decide((), make_dataset(), CT1_V4).status == "unrouted"


def test_edits_belong_to_the_destinations_of_their_rule() -> None:
    decision = decide(routes("""
  - send_to: [a]
    set: {InstitutionName: X, StationName: S1}
    continue: true
  - send_to: [a, b]
    set: {InstitutionName: Y}
    remove: [StationName]
    continue: true
  - send_to: [c]
"""), make_dataset(), CT1_V4)
    institution, station = TagRef(0x00080080, "InstitutionName"), TagRef(0x00081010, "StationName")
    assert decision.edits_for("a") == (TagEdit("set", institution, "LO", ("Y",)), TagEdit("remove", station))
    assert decision.edits_for("b") == (TagEdit("remove", station), TagEdit("set", institution, "LO", ("Y",)))
    assert decision.edits_for("c") == ()


def test_stable_after_is_the_longest_for_a_destination() -> None:
    decision = decide(routes("""
  - {send_to: [a], stable_after: 30s, continue: true}
  - {send_to: [a, b], stable_after: 2m, continue: true}
  - {send_to: [c]}
"""), make_dataset(), CT1_V4)
    assert [(d.destination, d.stable_after) for d in decision.deliveries] == [("a", 120.0), ("b", 120.0), ("c", None)]


@pytest.mark.parametrize("decision", [
    Decision(),
    Decision((MatchedRule(2, "scouts"),), (), discarded=True),
    Decision(
        (MatchedRule(0, "ct"), MatchedRule(3)),
        (
            Delivery("central", (
                TagEdit("remove", TagRef(0x00104000, "PatientComments")),
                TagEdit("set", TagRef(0x00080080, "InstitutionName"), "LO", ("Klinik Zürich",)),
                TagEdit("set", TagRef(0x00080008, "ImageType"), "CS", ("DERIVED", "SECONDARY")),
                TagEdit("set", TagRef(0x00081010, "StationName"), "SH", ()),
                TagEdit("remove", TagRef(0x00091001)),
            ), 90.0),
            Delivery("archive"),
        ),
    ),
], ids=["unrouted", "discarded", "routed"])
def test_a_decision_survives_json(decision: Decision) -> None:
    text = decision.to_json()
    assert Decision.from_json(text) == decision
    assert Decision.from_json(text).status == decision.status


@pytest.mark.parametrize("text", ["", "{}", '{"version": 2}', '{"version": 1, "rules": 5}', "[1]",
                                  '{"version":1,"rules":[],"discarded":false,'
                                  '"deliveries":[{"destination":"a","edits":[{"action":"zap","tag":"(0008,0080)"}]}]}'])
def test_a_damaged_decision_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        Decision.from_json(text)


def test_the_decision_of_a_config_survives_json() -> None:
    decision = decide(routes("""
  - send_to: [a, b]
    set: {InstitutionName: "Clinic A", "(0010,0021)": EDGE, ImageType: [DERIVED, SECONDARY]}
    remove: [PatientComments, "(0009,1001)"]
"""), make_dataset(), CT1_V4)
    assert Decision.from_json(decision.to_json()) == decision


# ---- applying edits ----------------------------------------------------------------------------

def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_apply_edits_changes_the_copy_and_never_the_cached_file(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.PatientComments = "call the ward"
    ds.StationName = "CT-ROOM-1"
    cached = write(ds, tmp_path / "cached.dcm")
    before = sha256(cached)
    decision = decide(routes("""
  - send_to: [a]
    set:
      InstitutionName: Clinic A
      ImageType: [DERIVED, SECONDARY]
      NumberOfSlices: 256
      PixelSpacing: [0.5, "0.5"]
      SliceThickness: "1.25"
      StationName: ""
    remove: [PatientComments, "(0009,1001)", Manufacturer]
"""), pydicom.dcmread(cached), CT1_V4)
    edits = Decision.from_json(decision.to_json()).edits_for("a")  # as the forwarder gets them

    copy = pydicom.dcmread(cached)
    apply_edits(copy, edits)
    sent = write(copy, tmp_path / "sent.dcm")

    assert sha256(cached) == before
    original = pydicom.dcmread(cached)
    assert (original.InstitutionName, original.PatientComments, original.Rows) == ("St Mary's Hospital",
                                                                                   "call the ward", 512)
    assert original[0x00091001].value == "EDGE-PRIVATE"
    edited = pydicom.dcmread(sent)
    assert edited.InstitutionName == "Clinic A"
    assert list(edited.ImageType) == ["DERIVED", "SECONDARY"]
    assert edited.NumberOfSlices == 256 and edited.Rows == 512
    assert [str(v) for v in edited.PixelSpacing] == ["0.5", "0.5"]
    assert str(edited.SliceThickness) == "1.25"
    assert "StationName" in edited and edited.StationName == ""
    assert "PatientComments" not in edited and 0x00091001 not in edited
    assert edited.SOPInstanceUID == original.SOPInstanceUID


def test_text_the_character_set_cannot_hold_switches_the_copy_to_utf8(tmp_path: Path) -> None:
    latin1 = make_dataset()
    latin1.SpecificCharacterSet = "ISO_IR 100"
    latin1.PatientName = "Müller^Jürgen"
    cached = write(latin1, tmp_path / "latin1.dcm")

    fits = pydicom.dcmread(cached)
    apply_edits(fits, [TagEdit("set", TagRef(0x00080080, "InstitutionName"), "LO", ("Klinik Zürich",))])
    assert fits.SpecificCharacterSet == "ISO_IR 100"

    copy = pydicom.dcmread(cached)
    apply_edits(copy, [TagEdit("set", TagRef(0x00080080, "InstitutionName"), "LO", ("Клиника",))])
    edited = pydicom.dcmread(write(copy, tmp_path / "sent.dcm"))
    assert edited.SpecificCharacterSet == "ISO_IR 192"
    assert (edited.InstitutionName, str(edited.PatientName)) == ("Клиника", "Müller^Jürgen")

    ascii_only = make_dataset()  # no SpecificCharacterSet: the default repertoire is ASCII
    apply_edits(ascii_only, [TagEdit("set", TagRef(0x00080080, "InstitutionName"), "LO", ("Zürich",))])
    assert ascii_only.SpecificCharacterSet == "ISO_IR 192"


# ---- errors at load ----------------------------------------------------------------------------

# Each snippet starts at line 6 of the file (after DESTINATIONS and "routes:").
BAD_ROUTES = [
    ('- when: {Modality: {regex: "(unclosed"}}',
     '6:21: routes[0].when.Modality.regex: invalid regular expression: missing ), unterminated subpattern'),
    ("- when: {SeriesDescription: {regex: 'a{4294967296}'}}",
     "6:30: routes[0].when.SeriesDescription.regex: invalid regular expression: the repetition number is too large"),
    ("- when: {SeriesDescription: {regex: '" + "(" * 1000 + ")" * 1000 + "'}}",
     "6:30: routes[0].when.SeriesDescription.regex: invalid regular expression: nested too deeply"),
    ("- when: {Modallity: CT}",
     '6:10: routes[0].when.Modallity: unknown DICOM keyword "Modallity" (did you mean "Modality"?)'),
    ('- when: {"(0008,008G)": CT}', '6:10: routes[0].when.(0008,008G): malformed tag "(0008,008G)"'),
    ("- when:\n    00080080: CT", '7:5: routes[0].when.00080080: malformed tag "00080080"'),
    ("- when: {Modality: {glob: CT, like: C}}", '6:31: routes[0].when.Modality.like: unknown operator "like"'),
    ("- when: {source_ip: 10.0.0.300/8}", '6:10: routes[0].when.source_ip: expected an address or network'),
    ("- when: {source_ip: [10.0.0.0/8, nope]}", '6:34: routes[0].when.source_ip[1]: expected an address or network'),
    ("- when: {SliceThickness: {gt: thick}}", '6:27: routes[0].when.SliceThickness.gt: expected a number, got "thick"'),
    ("- when: {Modality: {present: maybe}}", '6:21: routes[0].when.Modality.present: expected true or false'),
    ("- when: {Modality: }",
     "6:10: routes[0].when.Modality: expected a value, a list or a mapping of operators, got nothing"),
    ("- when: {Modality: []}", "6:10: routes[0].when.Modality: expected a non-empty list of values"),
    ("- when: {any: {Modality: CT}}",
     "6:10: routes[0].when.any: expected a non-empty list of conditions, got a mapping"),
    ("- when: {not: [{Modality: CT}]}", "6:10: routes[0].when.not: expected a mapping of conditions, got a list"),
    ("- when: {any: [{Modality: CT}, {Rows: {gt: x}}]}", "6:40: routes[0].when.any[1].Rows.gt: expected a number"),
    ("- when: {ReferencedImageSequence: CT}",
     "6:10: routes[0].when.ReferencedImageSequence: ReferencedImageSequence is a sequence; it can only be tested"),
    ("- when: {PixelData: {present: true}}", "6:10: routes[0].when.PixelData: pixel data is not read when routing"),
    ('- when: {"(7FE1,1001)": {present: true}}',
     '6:10: routes[0].when.(7FE1,1001): (7FE1,1001) comes after the pixel data, which is not read when routing'),
    ("- when: CT", '6:9: routes[0].when: expected a mapping of conditions, got "CT"'),
    ("- when:\n  send_to: [a]", "6:8: routes[0].when: expected a mapping of conditions, got nothing"),
    ("- when: {}", "6:9: routes[0].when: expected at least one condition, got an empty mapping"),
    ("- {send_to: [a]}\n- {send_to: [b]}\n- when: {Modality: {regex: '['}}",
     "8:21: routes[2].when.Modality.regex: invalid regular expression"),
    # set
    ("- {send_to: [a], set: {Modality: ct}}", '6:24: routes[0].set.Modality: "ct" does not fit Modality (VR CS): '
                                              "expected a code string"),
    ("- {send_to: [a], set: {SeriesNumber: 3.5}}", '6:24: routes[0].set.SeriesNumber: "3.5" does not fit '
                                                   "SeriesNumber (VR IS): expected an integer"),
    ("- {send_to: [a], set: {NumberOfSlices: 70000}}",
     '6:24: routes[0].set.NumberOfSlices: "70000" does not fit NumberOfSlices (VR US): expected an integer from 0 '
     "to 65535"),
    ("- {send_to: [a], set: {StudyDate: 20241399}}", '6:24: routes[0].set.StudyDate: "20241399" does not fit '
                                                     "StudyDate (VR DA): expected a date YYYYMMDD"),
    ("- {send_to: [a], set: {StationName: ABCDEFGHIJKLMNOPQ}}", "6:24: routes[0].set.StationName: "
     '"ABCDEFGHIJKLMNOPQ" does not fit StationName (VR SH): The value length (17) exceeds the maximum length of 16'),
    ("- {send_to: [a], set: {InstitutionName: 'A\\B'}}", "6:24: routes[0].set.InstitutionName: \"A\\B\" does not "
     "fit InstitutionName (VR LO): a backslash separates values"),
    ("- {send_to: [a], set: {InstitutionName: [A, B]}}", "6:24: routes[0].set.InstitutionName: InstitutionName "
                                                         "takes one value, got a list of 2"),
    ("- {send_to: [a], set: {ImageType: [DERIVED, x]}}", '6:45: routes[0].set.ImageType[1]: "x" does not fit'),
    ('- {send_to: [a], set: {"(0009,1001)": x}}', "6:24: routes[0].set.(0009,1001): (0009,1001) is not in the "
                                                  "DICOM dictionary"),
    ("- {send_to: [a], set: {ReferencedImageSequence: x}}", "6:24: routes[0].set.ReferencedImageSequence: "
                                                            "ReferencedImageSequence is a sequence"),
    ("- {send_to: [a], set: {SOPInstanceUID: 1.2.3}}", "6:24: routes[0].set.SOPInstanceUID: the SOP Instance UID"),
    ("- {send_to: [a], set: {TransferSyntaxUID: 1.2.840.10008.1.2}}", "6:24: routes[0].set.TransferSyntaxUID: "
                                                                      "file meta information (group 0002)"),
    # as many values as the element takes (its VM in the DICOM dictionary)
    ("- {send_to: [a], set: {PixelSpacing: 0.5}}", "6:24: routes[0].set.PixelSpacing: PixelSpacing takes 2 values, "
                                                   "got one (write the values as a list)"),
    ("- {send_to: [a], set: {ImagePositionPatient: [1, 2]}}", "6:24: routes[0].set.ImagePositionPatient: "
                                                              "ImagePositionPatient takes 3 values, got a list of 2"),
    ("- {send_to: [a], set: {ShutterShape: [RECTANGULAR, CIRCULAR, POLYGONAL, RECTANGULAR]}}",
     "6:24: routes[0].set.ShutterShape: ShutterShape takes 1 to 3 values, got a list of 4"),
    ("- {send_to: [a], set: {ImageType: DERIVED}}",
     "6:24: routes[0].set.ImageType: ImageType takes 2 or more values, got one (write the values as a list)"),
    ("- {send_to: [a], set: {VerticesOfThePolygonalShutter: [1, 2, 3]}}",
     "6:24: routes[0].set.VerticesOfThePolygonalShutter: VerticesOfThePolygonalShutter takes pairs of values "
     "(2, 4, 6 ...), got a list of 3"),
    ("- {send_to: [a], set: {ReferringPhysicianName: a^b^c^d^e^f}}",
     '6:24: routes[0].set.ReferringPhysicianName: "a^b^c^d^e^f" does not fit ReferringPhysicianName (VR PN): a '
     "person name has at most 5 components (family^given^middle^prefix^suffix)"),
    ("- {send_to: [a], set: {ReferringPhysicianName: 'Doe^J=a^b^c^d^e^f'}}",
     '6:24: routes[0].set.ReferringPhysicianName: "Doe^J=a^b^c^d^e^f" does not fit ReferringPhysicianName (VR PN): '
     "a person name has at most 5 components"),
    ("- {send_to: [a], set: {MessageID: 5}}", "6:24: routes[0].set.MessageID: command elements (group 0000) belong "
                                              "to the DIMSE message, not to the data set, and cannot be edited"),
    ("- {send_to: [a], remove: [CommandGroupLength]}", "6:27: routes[0].remove[0]: command elements (group 0000)"),
    ("- {send_to: [a], set: [Modality]}", "6:23: routes[0].set: expected a mapping of keyword or tag to value"),
    # remove
    ("- {send_to: [a], remove: PatientComments}", "6:26: routes[0].remove: expected a list of keywords or tags"),
    ("- {send_to: [a], remove: [PatientComments, Comments]}", '6:44: routes[0].remove[1]: unknown DICOM keyword'),
    ("- {send_to: [a], remove: [PatientComments, PatientComments]}",
     "6:44: routes[0].remove[1]: PatientComments is already listed at routes[0].remove[0]"),
    ("- {send_to: [a], remove: [SOPClassUID]}", "6:27: routes[0].remove[0]: the SOP Class UID addresses"),
    # pixel data is sent as it is
    ("- {send_to: [a], set: {PixelData: x}}",
     "6:24: routes[0].set.PixelData: PixelData is sent as it is; pixel data cannot be edited"),
    ("- {send_to: [a], remove: [StationName, PixelData]}",
     "6:40: routes[0].remove[1]: PixelData is sent as it is; pixel data cannot be edited"),
    # nor can what describes it: the copy would describe its pixels wrongly
    ("- {send_to: [a], set: {Rows: 256}}",
     "6:24: routes[0].set.Rows: Rows describes the pixel data, which is sent as it is: a copy with it edited "
     "would describe its pixels wrongly"),
    ("- {send_to: [a], remove: [StationName, BitsStored]}",
     "6:40: routes[0].remove[1]: BitsStored describes the pixel data, which is sent as it is"),
    ("- {send_to: [a], set: {PhotometricInterpretation: RGB}}",
     "6:24: routes[0].set.PhotometricInterpretation: PhotometricInterpretation describes the pixel data"),
    ('- {send_to: [a], remove: ["(0028,0008)"]}', "6:27: routes[0].remove[0]: NumberOfFrames describes the pixel data"),
    ("- {send_to: [a], remove: [RedPaletteColorLookupTableData]}",
     "6:27: routes[0].remove[0]: RedPaletteColorLookupTableData describes the pixel data"),
    ('- {send_to: [a], remove: ["(7FE0,0008)"]}',
     "6:27: routes[0].remove[0]: FloatPixelData is sent as it is; pixel data cannot be edited"),
    ("- {send_to: [a], remove: [DoubleFloatPixelData]}",
     "6:27: routes[0].remove[0]: DoubleFloatPixelData is sent as it is; pixel data cannot be edited"),
    # a hold of nothing is no hold
    ("- {send_to: [a], stable_after: 0s}", '6:18: routes[0].stable_after: expected a duration above zero, such as '
                                           '"30s" (leave stable_after out to send without waiting), got "0s"'),
    # dates and times compared must be dates and times
    ("- when: {StudyTime: {ge: 100}}", '6:22: routes[0].when.StudyTime.ge: expected a time HHMMSS.FFFFFF '
                                      '(trailing parts optional) to compare StudyTime with, got "100"'),
    ("- when: {StudyDate: {lt: 2024}}",
     '6:22: routes[0].when.StudyDate.lt: expected a date YYYYMMDD to compare StudyDate with, got "2024"'),
    # values an element cannot hold: eq, ne and in never match them
    ("- when: {Modality: ct}", '6:10: routes[0].when.Modality: Modality (VR CS) cannot hold "ct": expected a code '
                               'string: upper-case letters, digits, space and underscore, up to 16 characters (write '
                               '"CT"; for a match that ignores case write {regex: "(?i)^ct$"})'),
    ("- when: {Modality: [CT, mr]}", '6:25: routes[0].when.Modality[1]: Modality (VR CS) cannot hold "mr"'),
    ("- when: {Modality: {ne: ct}}", '6:21: routes[0].when.Modality.ne: Modality (VR CS) cannot hold "ct"'),
    ("- when: {Modality: {in: [CT, mr]}}", '6:30: routes[0].when.Modality.in[1]: Modality (VR CS) cannot hold "mr"'),
    ("- when: {ImageType: 'ORIGINAL\\primary'}",
     '6:10: routes[0].when.ImageType: ImageType (VR CS) cannot hold "primary": expected a code string'),
    ("- when: {StudyDate: 2024-01-01}",
     '6:10: routes[0].when.StudyDate: StudyDate (VR DA) cannot hold "2024-01-01": expected a date YYYYMMDD '
     "(write 20240101)"),
    ("- when: {StudyTime: noon}", '6:10: routes[0].when.StudyTime: StudyTime (VR TM) cannot hold "noon": '
                                  "expected a time HHMMSS.FFFFFF"),
    ("- when: {AcquisitionDateTime: '2024-03-15T10:15'}",
     '6:10: routes[0].when.AcquisitionDateTime: AcquisitionDateTime (VR DT) cannot hold "2024-03-15T10:15": '
     "expected a date and time"),
    ("- when: {SliceThickness: thin}",
     '6:10: routes[0].when.SliceThickness: SliceThickness (VR DS) cannot hold "thin": expected a number'),
    ("- when: {SeriesNumber: 3.5}",
     '6:10: routes[0].when.SeriesNumber: SeriesNumber (VR IS) cannot hold "3.5": expected an integer'),
    ("- when: {Rows: 70000}",
     '6:10: routes[0].when.Rows: Rows (VR US) cannot hold "70000": expected an integer from 0 to 65535'),
    ("- when: {PatientAge: 45Y}",
     '6:10: routes[0].when.PatientAge: PatientAge (VR AS) cannot hold "45Y": expected an age such as 045Y'),
    ("- when: {StudyInstanceUID: 1.2.840.abc}",
     '6:10: routes[0].when.StudyInstanceUID: StudyInstanceUID (VR UI) cannot hold "1.2.840.abc": expected a UID'),
    ("- when: {Modality: ''}", "6:10: routes[0].when.Modality: an empty value matches nothing (an empty element "
                               "counts as absent): to test that Modality is empty or absent write {present: false}"),
    # AE titles that cannot exist
    ("- when: {calling_ae: ABCDEFGHIJKLMNOPQ}",
     '6:10: routes[0].when.calling_ae: expected an AE title (1-16 printable ASCII characters, no backslash), '
     'got "ABCDEFGHIJKLMNOPQ"'),
    ('- when: {called_ae: {in: [EDGE, "  "]}}', '6:10: routes[0].when.called_ae: expected an AE title'),
]


@pytest.mark.parametrize(("snippet", "expected"), BAD_ROUTES, ids=[b[1].split(": ")[1] for b in BAD_ROUTES])
def test_a_bad_rule_is_reported_at_its_line_and_key(snippet: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads(DESTINATIONS + "routes:\n" + snippet + "\n", "appliance.yaml")
    messages = [str(p) for p in caught.value.problems]
    assert len(messages) == 1, messages
    assert messages[0].startswith("appliance.yaml:" + expected), messages[0]


def test_every_bad_rule_of_a_file_is_reported() -> None:
    with pytest.raises(ConfigError) as caught:
        loads(DESTINATIONS + "routes:\n- when: {Modallity: CT, Rows: {gt: x}}\n  set: {Modality: ct}\n",
              "appliance.yaml")
    assert [(p.line, p.column, p.path) for p in caught.value.problems] == [
        (6, 10, "routes[0].when.Modallity"), (6, 32, "routes[0].when.Rows.gt"), (7, 9, "routes[0].set.Modality"),
    ]


@pytest.mark.parametrize(("snippet", "expected"), [
    ("- {send_to: [a], set: {StationName: X}, remove: [StationName]}",
     [("set", "StationName is both set and removed")]),
    ("- {set: {StationName: X}}", [("set", "tag edits apply to this rule's send_to destinations, and it has none")]),
    ("- {when: {Modality: CT}, discard: true, continue: true}",
     [("continue", "a rule that discards stops evaluation; it cannot continue")]),
    ("- {when: {Modality: CT}, stable_after: 30s}",
     [("stable_after", "stable_after needs send_to: it holds the study for this rule's destinations, "
                       "and it has none")]),
    ("- {send_to: [a], set: {StationName: X}, remove: [PatientComments], continue: true}", []),
    # values in the numbers their elements take; a person name of 5 components in each of 3 groups
    ("- send_to: [a]\n  set:\n    PixelSpacing: ['0.5', '0.5']\n    ImageType: [DERIVED, SECONDARY, AXIAL]\n"
     "    OtherPatientNames: Doe^J\n    ShutterShape: [RECTANGULAR, CIRCULAR]\n    PatientOrientation: ''\n"
     "    ReferringPhysicianName: 'Doe^John^A^Dr^Jr=Y^Z^^^=P^Q'\n"
     "    VerticesOfThePolygonalShutter: [1, 2, 3, 4, 5, 6]", []),
    # elements after the pixel data stay editable (the forwarder applies those edits)
    ('- {send_to: [a], remove: ["(7FE1,1010)"]}', []),
])
def test_contradictions_within_a_rule(snippet: str, expected: list[tuple[str, str]]) -> None:
    """Contradictions are configuration errors, located at the rule's key."""
    if not expected:
        (route,) = routes(snippet + "\n")
        assert route_problems(route) == []
        return
    with pytest.raises(ConfigError) as caught:
        loads(DESTINATIONS + "routes:\n" + snippet + "\n", "appliance.yaml")
    assert [(p.path, p.message) for p in caught.value.problems] == [(f"routes[0].{k}", m) for k, m in expected]
