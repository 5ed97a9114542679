"""``appliance route-test``: real DICOM files and a real configuration file, run as the admin
would run it; the report names every rule, the values it saw, and what would be sent where."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dsutils import split_dataset

from appliance.config import load, loads
from appliance.db import open_database
from appliance.intake import Intake
from appliance.routetest import route_test
from appliance.rules import Decision, Origin
from appliance.store import Store

REPO = Path(__file__).resolve().parent.parent

CONFIG = """\
node: {ae_title: EDGE}
destinations:
  central: {ae_title: PACS, host: pacs.example, port: 104}
  archive: {ae_title: ARCHIVE, host: archive.example, port: 104}
  research: {ae_title: RESEARCH, host: research.example, port: 104}
routes:
  - name: ct-from-scanners
    when:
      Modality: CT
      calling_ae: {in: [CT1, CT2]}
      source_ip: 10.1.0.0/16
    send_to: [central, archive]
    set: {InstitutionName: Clinic A}
    remove: [PatientComments]
    continue: true
  - name: scouts
    when: {SeriesDescription: {regex: "(?i)scout"}}
    discard: true
  - name: thin-slices
    when: {SliceThickness: {lt: 1}}
    send_to: [research]
  - name: no-body-part
    when: {not: {BodyPartExamined: {present: true}}}
  - name: default
    send_to: [central]
"""

# file -> its attributes
FILES = {
    "ct.dcm": {"Modality": "CT", "SeriesDescription": "Axial 0.5", "SliceThickness": "0.5",
               "BodyPartExamined": "CHEST"},
    "scout.dcm": {"Modality": "CT", "SeriesDescription": "SCOUT", "SliceThickness": "5",
                  "BodyPartExamined": "CHEST"},
    "us.dcm": {"Modality": "US", "SeriesDescription": "Liver"},
    "mr.dcm": {"Modality": "MR", "SeriesDescription": "T1 axial", "SliceThickness": "3", "BodyPartExamined": "HEAD"},
}

# What route-test prints for each file, sent by CT1 from 10.1.2.3 to EDGE.
EXPECTED = {
    "ct.dcm": """\
ct.dcm: SOPInstanceUID 1.2.826.0.1.3680043.10.1.1; calling_ae CT1, called_ae EDGE, source_ip 10.1.2.3
  routes[0] ct-from-scanners: matched
      yes Modality eq "CT"  (Modality = "CT")
      yes calling_ae in ["CT1", "CT2"]  (calling_ae = "CT1")
      yes source_ip in 10.1.0.0/16  (source_ip = 10.1.2.3)
      -> send_to central, archive; remove PatientComments; set InstitutionName = "Clinic A"; continue
  routes[1] scouts: not matched
      no  SeriesDescription regex "(?i)scout"  (SeriesDescription = "Axial 0.5")
  routes[2] thin-slices: matched
      yes SliceThickness < 1  (SliceThickness = "0.5")
      -> send_to research
  routes[3] no-body-part: not evaluated (routes[2] thin-slices matched and does not continue)
  routes[4] default: not evaluated (routes[2] thin-slices matched and does not continue)
  decision: send to central, archive, research (by routes[0] ct-from-scanners, routes[2] thin-slices)
      central: remove PatientComments; set InstitutionName = "Clinic A"
      archive: remove PatientComments; set InstitutionName = "Clinic A"
      research: no edits
""",
    "scout.dcm": """\
scout.dcm: SOPInstanceUID 1.2.826.0.1.3680043.10.1.2; calling_ae CT1, called_ae EDGE, source_ip 10.1.2.3
  routes[0] ct-from-scanners: matched
      yes Modality eq "CT"  (Modality = "CT")
      yes calling_ae in ["CT1", "CT2"]  (calling_ae = "CT1")
      yes source_ip in 10.1.0.0/16  (source_ip = 10.1.2.3)
      -> send_to central, archive; remove PatientComments; set InstitutionName = "Clinic A"; continue
  routes[1] scouts: matched
      yes SeriesDescription regex "(?i)scout"  (SeriesDescription = "SCOUT")
      -> discard
  routes[2] thin-slices: not evaluated (routes[1] scouts matched and does not continue)
  routes[3] no-body-part: not evaluated (routes[1] scouts matched and does not continue)
  routes[4] default: not evaluated (routes[1] scouts matched and does not continue)
  decision: discarded by routes[0] ct-from-scanners, routes[1] scouts
""",
    "us.dcm": """\
us.dcm: SOPInstanceUID 1.2.826.0.1.3680043.10.1.3; calling_ae CT1, called_ae EDGE, source_ip 10.1.2.3
  routes[0] ct-from-scanners: not matched
      no  Modality eq "CT"  (Modality = "US")
      yes calling_ae in ["CT1", "CT2"]  (calling_ae = "CT1")
      yes source_ip in 10.1.0.0/16  (source_ip = 10.1.2.3)
  routes[1] scouts: not matched
      no  SeriesDescription regex "(?i)scout"  (SeriesDescription = "Liver")
  routes[2] thin-slices: not matched
      no  SliceThickness < 1  (SliceThickness absent)
  routes[3] no-body-part: matched
      yes not:
          no  BodyPartExamined present  (BodyPartExamined absent)
      -> send nowhere (kept as unrouted)
  routes[4] default: not evaluated (routes[3] no-body-part matched and does not continue)
  decision: unrouted (matched routes[3] no-body-part, which send nowhere)
      the instance is kept in the cache and shown as unrouted
""",
    "mr.dcm": """\
mr.dcm: SOPInstanceUID 1.2.826.0.1.3680043.10.1.4; calling_ae CT1, called_ae EDGE, source_ip 10.1.2.3
  routes[0] ct-from-scanners: not matched
      no  Modality eq "CT"  (Modality = "MR")
      yes calling_ae in ["CT1", "CT2"]  (calling_ae = "CT1")
      yes source_ip in 10.1.0.0/16  (source_ip = 10.1.2.3)
  routes[1] scouts: not matched
      no  SeriesDescription regex "(?i)scout"  (SeriesDescription = "T1 axial")
  routes[2] thin-slices: not matched
      no  SliceThickness < 1  (SliceThickness = "3")
  routes[3] no-body-part: not matched
      no  not:
          yes BodyPartExamined present  (BodyPartExamined = "HEAD")
  routes[4] default: matched (no conditions)
      -> send_to central
  decision: send to central (by routes[4] default)
      central: no edits
""",
}


def write_instance(path: Path, number: int, attributes: dict[str, str]) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.SOPInstanceUID = UID(f"1.2.826.0.1.3680043.10.1.{number}")
    ds.PatientID = "PAT001"
    ds.PatientComments = "keep me at the source"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 2, 2, 8, 8, 7
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = bytes(4)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "appliance.yaml").write_text(CONFIG)
    for number, (name, attributes) in enumerate(FILES.items(), start=1):
        write_instance(tmp_path / name, number, attributes)
    (tmp_path / "notes.txt").write_text("not an image\n")
    return tmp_path


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("APPLIANCE_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "appliance", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def cli_has_route_test() -> bool:
    help_text = run_cli(REPO, "--help").stdout
    return "route-test" in help_text


needs_cli = pytest.mark.skipif(not cli_has_route_test(), reason="appliance/cli.py has no route-test subcommand")


@needs_cli
def test_the_report_of_each_file(workdir: Path) -> None:
    files = list(FILES)
    result = run_cli(workdir, "route-test", *files, "--config", "appliance.yaml",
                     "--calling-ae", "CT1", "--called-ae", "EDGE", "--source-ip", "10.1.2.3")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "\n".join(EXPECTED[f] for f in files)


@pytest.mark.parametrize("name", list(FILES))
def test_the_report_of_one_file_in_process(workdir: Path, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = load(workdir / "appliance.yaml")
    monkeypatch.chdir(workdir)  # the report names files as they were given
    assert route_test([name], config, Origin("CT1", "EDGE", "10.1.2.3")).text == EXPECTED[name]


@needs_cli
@pytest.mark.parametrize(("origin_args", "expected_line", "decision_line"), [
    ([], '      no  calling_ae in ["CT1", "CT2"]  (calling_ae not given)',
     "  decision: send to research (by routes[2] thin-slices)"),
    (["--calling-ae", "CT9", "--source-ip", "10.1.2.3"], '      no  calling_ae in ["CT1", "CT2"]  (calling_ae = "CT9")',
     "  decision: send to research (by routes[2] thin-slices)"),
    (["--calling-ae", "CT2", "--source-ip", "192.168.1.5"],
     "      no  source_ip in 10.1.0.0/16  (source_ip = 192.168.1.5)",
     "  decision: send to research (by routes[2] thin-slices)"),
    (["--calling-ae", "CT2", "--source-ip", "::ffff:10.1.9.9"],
     "      yes source_ip in 10.1.0.0/16  (source_ip = ::ffff:10.1.9.9)",
     "  decision: send to central, archive, research (by routes[0] ct-from-scanners, routes[2] thin-slices)"),
])
def test_where_the_instance_came_from_changes_the_decision(
    workdir: Path, origin_args: list[str], expected_line: str, decision_line: str
) -> None:
    result = run_cli(workdir, "route-test", "ct.dcm", "--config", "appliance.yaml", *origin_args)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert expected_line in lines
    assert decision_line in lines


@needs_cli
def test_a_file_that_cannot_be_routed_says_why_the_rest_go_on_and_the_exit_status_is_1(workdir: Path) -> None:
    cut = workdir / "cut.dcm"
    cut.write_bytes((workdir / "ct.dcm").read_bytes()[:-3])  # a copy that ran out of room
    result = run_cli(workdir, "route-test", "notes.txt", "mr.dcm", "cut.dcm", "missing.dcm", "--config",
                     "appliance.yaml")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("notes.txt: cannot route it: not a DICOM file: no DICM prefix after the 128-byte "
                        "preamble, and it does not start like a data set either")
    assert "  decision: send to central (by routes[4] default)" in lines
    assert "cut.dcm: cannot route it: truncated: its Pixel Data needs 4 bytes, the file ends after 1" in lines
    assert lines[-1] == "missing.dcm: cannot route it: No such file or directory"
    alone = run_cli(workdir, "route-test", "mr.dcm", "--config", "appliance.yaml")
    assert alone.returncode == 0, alone.stderr


def bare_data_set(path: Path, number: int, attributes: dict[str, str]) -> Path:
    """An instance as older archives hold it: its data set alone, Implicit VR Little Endian,
    without preamble and file meta."""
    ds = pydicom.dcmread(write_instance(path, number, attributes))
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[:2] == b"\x08\x00"
    return path


def test_a_bare_data_set_is_routed_as_appliance_send_routes_it(workdir: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    """send gives a bare data set the file meta the receiver writes (its transfer syntax read from
    the data set), and routes it on that: route-test says the same."""
    config = load(workdir / "appliance.yaml")
    bare_data_set(workdir / "bare.dcm", 5, {"Modality": "MR", "BodyPartExamined": "HEAD"})
    monkeypatch.chdir(workdir)
    before = sorted(p.name for p in workdir.iterdir())
    report = route_test(["bare.dcm"], config)
    assert report.unreadable == ()
    assert "  decision: send to central (by routes[4] default)" in report.text.splitlines()

    syntax = loads(CONFIG.split("routes:")[0] + "routes:\n"
                   "  - when: {TransferSyntaxUID: 1.2.840.10008.1.2, SOPInstanceUID: 1.2.826.0.1.3680043.10.1.5}\n"
                   "    send_to: [archive]\n", "appliance.yaml")
    assert '      yes TransferSyntaxUID eq "1.2.840.10008.1.2"  (TransferSyntaxUID = "1.2.840.10008.1.2")' \
        in route_test(["bare.dcm"], syntax).text.splitlines()
    assert sorted(p.name for p in workdir.iterdir()) == before  # the file with meta was made elsewhere


# A private element whose VR only the private dictionary knows: Siemens' NumberOfImagesInMosaic
# (0019,xx0A), US, in the block that (0019,0010) "SIEMENS MR HEADER" reserves.
PRIVATE_ROUTES = """\
storage: {path: data, disk: {min_free: 0%}}
destinations:
  central: {ae_title: PACS, host: pacs.example, port: 104}
routes:
  - name: mosaic
    when: {"(0019,100A)": 16, "(0019,100C)": {gt: 500}}
    send_to: [central]
"""


def private_instance(path: Path, syntax: UID) -> Path:
    ds = pydicom.dcmread(write_instance(path, 7 if syntax == ImplicitVRLittleEndian else 8, {"Modality": "MR"}))
    block = ds.private_block(0x0019, "SIEMENS MR HEADER", create=True)
    block.add_new(0x0A, "US", 16)
    block.add_new(0x0C, "IS", "1000")
    ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian], ids=["implicit", "explicit"])
def test_a_private_number_is_routed_live_as_route_test_shows(tmp_path: Path, syntax: UID) -> None:
    """In Implicit VR a private element's VR comes from the private dictionary, under its
    creator's name: intake must read that creator too, or the rule sees raw bytes."""
    config_path = tmp_path / "appliance.yaml"
    config_path.write_text(PRIVATE_ROUTES)
    config = load(config_path)
    source = private_instance(tmp_path / "mosaic.dcm", syntax)

    report = route_test([source], config)
    assert "      yes (0019,100A) eq \"16\"  ((0019,100A) = \"16\")" in report.text.splitlines(), report.text
    assert "  decision: send to central (by routes[0] mosaic)" in report.text.splitlines()

    store = Store(config.storage.root)
    store.prepare()
    db = open_database(config.storage.root)
    try:
        intake = Intake(config, db, store)
        meta, offset = split_dataset(source)
        for way, offset_known in (("received", True), ("sent", False)):  # the receiver's way, send's way
            received = store.incoming / f"{way}.dcm"
            shutil.copyfile(source, received)
            outcome = intake.admit(received, Origin(), transfer_syntax=str(meta.TransferSyntaxUID) if offset_known
                                   else None, dataset_offset=offset if offset_known else None)
            assert outcome.kind in ("stored", "replaced"), outcome
            instance = db.find_instance(str(meta.MediaStorageSOPInstanceUID))
            assert instance is not None and instance.decision is not None
            assert Decision.from_json(instance.decision).destinations == ("central",), way
    finally:
        db.close()


def test_a_held_destination_is_explained_per_study(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = loads(CONFIG.split("routes:")[0] + "routes:\n  - {send_to: [central], stable_after: 90s}\n",
                   "appliance.yaml")
    monkeypatch.chdir(workdir)
    assert "      central: no edits (held until its study has had no new instance for 90 s)" \
        in route_test(["mr.dcm"], config).text.splitlines()


@needs_cli
def test_a_bad_configuration_is_reported_with_its_line(workdir: Path) -> None:
    (workdir / "bad.yaml").write_text(CONFIG.replace("(?i)scout", "(?i)scout("))
    result = run_cli(workdir, "route-test", "ct.dcm", "--config", "bad.yaml")
    assert result.returncode == 1
    assert result.stdout == ""
    assert "bad.yaml:17:32: routes[1].when.SeriesDescription.regex: invalid regular expression" in result.stderr


@needs_cli
def test_nothing_is_sent_and_the_files_are_unchanged(workdir: Path) -> None:
    before = {p.name: p.read_bytes() for p in workdir.glob("*.dcm")}
    result = run_cli(workdir, "route-test", *FILES, "--config", "appliance.yaml", "--calling-ae", "CT1",
                     "--source-ip", "10.1.2.3")
    assert result.returncode == 0, result.stderr
    assert {p.name: p.read_bytes() for p in workdir.glob("*.dcm")} == before
    assert sorted(p.name for p in workdir.iterdir()) == sorted([*FILES, "appliance.yaml", "notes.txt"])
