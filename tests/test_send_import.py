"""``appliance send`` with what a CD, a USB stick or an old archive holds (truncated files, a
DICOMDIR, stray files, bare data sets), and ``appliance queue`` after a destination was removed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.fileset import FileSet
from pydicom.uid import DeflatedExplicitVRLittleEndian, RLELossless

from appliance.config import loads
from appliance.db import open_database
from appliance.diskfile import NotImportable
from appliance.intake import Intake
from appliance.rules import Origin
from appliance.store import Store

from .corpus import Series, compress, make_instance, write_series
from .pacs import RecordingSCP, cache_rows, closed_port, destination, queue, sop_uid, wait_until
from .peers import REPO


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as peers:
        yield peers


def cut(source: Path, target: Path, keep: int) -> Path:
    """``source``'s first ``keep`` bytes (``keep`` < 0: all but the last ``-keep``): a copy
    interrupted, or a medium that filled up."""
    data = source.read_bytes()
    target.write_bytes(data[:keep])
    return target


def bare_data_set(target: Path, seed: str) -> pydicom.Dataset:
    """An instance written as a bare data set, Implicit VR Little Endian, without preamble and
    file meta, as older archives hold them."""
    ds = make_instance(seed, 1, 9, 1, Series("CT", 1, 64, 64))
    del ds.file_meta
    pydicom.dcmwrite(target, ds, implicit_vr=True, little_endian=True)
    assert target.read_bytes()[:2] == b"\x08\x00"  # the data set starts at byte 0
    return ds


def skipped_reasons(stderr: str) -> dict[str, str]:
    """``skipped PATH: REASON`` lines (between progress bars) as {file name: reason}."""
    reasons = {}
    for line in stderr.replace("\r", "\n").splitlines():
        if line.startswith("skipped "):
            path, _, reason = line[len("skipped "):].partition(": ")
            reasons[Path(path).name] = reason
    return reasons


def test_send_imports_only_whole_instances_and_says_why_it_skips_the_rest(appliance_factory, stack,
                                                                          tmp_path) -> None:
    """A directory as a medium holds it: two good CTs, a CT cut off in its pixel data, an RLE
    one cut off in its fragments, a DICOMDIR, an empty file, a text file and a bare data set.
    The good ones and the bare one reach the PACS whole; every other is named with its reason;
    the exit status is 1. A second run adds nothing to the cache."""
    pacs = stack.enter_context(RecordingSCP("PACS"))
    box = appliance_factory({"destinations": {"pacs": destination(pacs.ae_title, pacs.port)},
                             "routes": [{"send_to": ["pacs"]}]})
    medium = tmp_path / "medium"
    good = write_series(medium / "good", "import", 1, 1, Series("CT", 2, 64, 64))
    elsewhere = tmp_path / "elsewhere"
    whole = write_series(elsewhere, "import", 1, 2, Series("CT", 2, 64, 64))
    size = len(whole[0].read_bytes())
    truncated = cut(whole[0], medium / "truncated.dcm", size // 2)
    rle = compress(whole[1], elsewhere / "rle.dcm", RLELossless)
    truncated_rle = cut(rle, medium / "truncated-rle.dcm", -40)
    fileset = FileSet()
    for path in good:
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "fileset")
    shutil.copy(tmp_path / "fileset" / "DICOMDIR", medium / "DICOMDIR")
    (medium / "empty.dcm").write_bytes(b"")
    (medium / "notes.txt").write_text("scanned on the old console\n")
    bare = bare_data_set(medium / "bare", "import")

    result = box.cli("send", str(medium), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "imported 3, skipped 5" in result.stdout, result.stdout + result.stderr
    pixels_at = size - 64 * 64 * 2  # the pixel data is the last element
    assert skipped_reasons(result.stderr) == {
        truncated.name: f"truncated: its Pixel Data needs 8192 bytes, the file ends after {size // 2 - pixels_at}",
        truncated_rle.name: "truncated: the file ends inside its Pixel Data",
        "DICOMDIR": "a DICOMDIR (the index of a DICOM medium), not an instance",
        "empty.dcm": "empty file",
        "notes.txt": "not a DICOM file: no DICM prefix after the 128-byte preamble, "
                     "and it does not start like a data set either",
    }, result.stderr

    expected = {sop_uid(p) for p in good} | {bare.SOPInstanceUID}
    assert set(cache_rows(box)) == expected
    wait_until(lambda: set(pacs.stored_uids()) == expected, 30, lambda: f"queue: {queue(box)}")
    received = {r.sop_instance_uid: r.dataset for r in pacs.stored()}
    for path in good:
        assert received[sop_uid(path)].PixelData == pydicom.dcmread(path).PixelData
    assert received[bare.SOPInstanceUID].PixelData == bare.PixelData
    # The bare data set is cached as a PS3.10 file, its data set byte for byte.
    cached_bare = Path(cache_rows(box)[bare.SOPInstanceUID]["path"]).read_bytes()
    assert cached_bare[128:132] == b"DICM"
    assert cached_bare.endswith((medium / "bare").read_bytes())
    cached_meta = pydicom.dcmread(cache_rows(box)[bare.SOPInstanceUID]["path"]).file_meta
    assert cached_meta.TransferSyntaxUID == "1.2.840.10008.1.2"

    again = box.cli("send", str(medium), check=False)
    assert again.returncode == 1 and "skipped 5" in again.stdout, again.stdout + again.stderr
    assert set(cache_rows(box)) == expected  # the same instances, no new rows


def test_send_refuses_what_cannot_be_read_whole(appliance_factory, tmp_path) -> None:
    """Without a running forwarder: a deflated file cut short, a bare data set whose pixel data
    is compressed (nothing says how), a file with a file meta but without the preamble, and
    one that is only a file meta."""
    box = appliance_factory(start=False)
    source = tmp_path / "source"
    plain = write_series(source, "refuse", 1, 1, Series("CT", 2, 64, 64))
    ds = pydicom.dcmread(plain[0])
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(source / "deflated.dcm", enforce_file_format=True)
    medium = tmp_path / "medium"
    medium.mkdir()
    cut(source / "deflated.dcm", medium / "deflated-cut.dcm", -20)
    compressed = pydicom.dcmread(compress(plain[0], source / "rle.dcm", RLELossless))
    del compressed.file_meta
    compressed.preamble = None
    pydicom.dcmwrite(medium / "bare-rle", compressed, implicit_vr=False, little_endian=True)
    (medium / "no-preamble.dcm").write_bytes(plain[1].read_bytes()[128:])
    meta_end = 132 + 12 + int.from_bytes(plain[0].read_bytes()[140:144], "little")
    cut(plain[0], medium / "only-meta.dcm", meta_end)

    result = box.cli("send", str(medium), check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "imported 1, skipped 3" in result.stdout, result.stdout + result.stderr
    assert skipped_reasons(result.stderr) == {
        "deflated-cut.dcm": "truncated: the file ends inside its deflated (compressed) data set",
        "bare-rle": "a data set without file meta whose pixel data is compressed: "
                    "its transfer syntax cannot be known",
        "only-meta.dcm": "truncated: nothing after its file meta",
    }, result.stderr
    assert set(cache_rows(box)) == {sop_uid(plain[1])}
    assert Path(cache_rows(box)[sop_uid(plain[1])]["path"]).read_bytes()[128:132] == b"DICM"


def test_queue_marks_a_destination_that_is_no_longer_configured(appliance_factory, tmp_path) -> None:
    """Items queued for a destination that a new configuration no longer has stay in the queue;
    ``appliance queue`` marks it "(not configured)" and ``--json`` says ``configured: false``."""
    box = appliance_factory({"destinations": {"central": destination("CENTRAL", closed_port()),
                                              "old": destination("OLD", closed_port())},
                             "routes": [{"send_to": ["central"]}]}, start=False)
    files = write_series(tmp_path / "import", "removed", 1, 1, Series("CT", 2, 64, 64))
    imported = box.cli("send", str(files[0].parent), "--to", "old")
    assert "imported 2, skipped 0" in imported.stdout
    # Not a terminal: no progress bar drawn over itself, only the end.
    assert imported.stderr.strip() == "2/2 done", repr(imported.stderr)
    assert "imported 1, skipped 0" in box.cli("send", str(files[0]), "--to", "central").stdout
    config = yaml.safe_load(box.config_path.read_text())
    del config["destinations"]["old"]
    box.write_config(config)

    entries = {d["name"]: d for d in json.loads(box.cli("queue", "--json").stdout)["destinations"]}
    assert entries["old"]["configured"] is False and entries["old"]["pending"] == 2, entries
    assert entries["central"]["configured"] is True and entries["central"]["pending"] == 1, entries
    table = box.cli("queue").stdout
    rows = {line.split()[0]: line for line in table.splitlines()[1:] if line and not line.startswith(" ")}
    assert "(not configured)" in rows["old"], table
    assert "(not configured)" not in rows["central"], table
    # Its dead letters can still be put back; a name that has nothing is a typo.
    assert box.cli("retry", "old").returncode == 0
    assert box.cli("retry", "olde", check=False).returncode == 2
    # The journal says so too, where an admin looks after editing the file.
    box.start()
    wait_until(lambda: "destination old is no longer configured: 2 instance(s) not delivered there wait for it"
               in box.log(), 10, lambda: box.log()[-2000:])
    assert "destination central is no longer configured" not in box.log()
    # It was renamed, say: what waits for it goes to the new name.
    refused = box.cli("move", "central", "old", check=False)
    assert refused.returncode == 2 and "still configured" in refused.stderr, refused.stderr
    assert box.cli("move", "old", "central").stdout.strip() == (
        "1 instance(s) waiting for old now wait for central; 1 that central already has (or is sending) stay with old")
    entries = {d["name"]: d for d in json.loads(box.cli("queue", "--json").stdout)["destinations"]}
    assert entries["old"]["pending"] == 1 and entries["central"]["pending"] + entries["central"]["in_flight"] == 2, \
        entries


def test_a_damaged_deflated_data_set_is_refused_as_unreadable(tmp_path) -> None:
    """The receiver's way in: a deflated data set whose compressed stream is damaged is answered
    as unreadable (0xC000, logged as such), not with the handler's exception."""
    config = loads(f"storage: {{path: {tmp_path / 'data'}, disk: {{min_free: '0%'}}}}\n")
    store = Store(config.storage.root)
    store.prepare()
    db = open_database(config.storage.root)
    try:
        plain = write_series(tmp_path / "source", "deflated", 1, 1, Series("CT", 1, 64, 64))[0]
        ds = pydicom.dcmread(plain)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
        received = cut(tmp_path / "deflated.dcm", store.incoming / "received.dcm", -30)
        outcome = Intake(config, db, store).admit(received, Origin("MODALITY", "EDGE", "127.0.0.1"))
    finally:
        db.close()
    assert outcome.kind == "unreadable" and "ends inside its deflated" in outcome.detail, outcome


def test_checking_a_deflated_file_whole_does_not_inflate_it_in_memory(tmp_path) -> None:
    """``appliance send`` checks that a deflated file is whole, and intake reads its header,
    a step of the stream at a time: 300 KB that inflate to 200 MiB of pixels take a few MB
    of memory to check and read, not the 200 MiB inflated (nor twice that)."""
    import tracemalloc

    from appliance.diskfile import part10_file
    from appliance.intake import HEADER_TAGS, _read_header

    from .test_refused_data_sets import deflated_zeros

    bomb, ds = deflated_zeros(tmp_path / "bomb.dcm", "bomb", 200)
    cut_bomb, _ = deflated_zeros(tmp_path / "cut.dcm", "bomb-cut", 200, cut=20)
    tracemalloc.start()
    try:
        assert part10_file(bomb, bomb.name) == bomb
        header = _read_header(bomb, HEADER_TAGS, None, None)
        with pytest.raises(NotImportable, match="ends inside its deflated"):
            part10_file(cut_bomb, cut_bomb.name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header.SOPInstanceUID == ds.SOPInstanceUID
    assert peak < 8 << 20, f"{peak / 1e6:.0f} MB at the peak"


@pytest.mark.parametrize("policy", ["keep-first", "reject", "replace"])
def test_send_to_a_destination_queues_an_instance_already_cached_whatever_the_duplicate_policy(
        appliance_factory, tmp_path, policy: str) -> None:
    """An admin sends files the box already has to one more destination (`send --to`): each is
    queued there, also when node.on_duplicate keeps the first copy or rejects repeats — the
    admin asked for it to go there — and the count says so. Under keep-first and reject the
    cached copy is what goes, and it stays the one cached."""
    box = appliance_factory({"node": {"on_duplicate": policy},
                             "destinations": {"central": destination("CENTRAL", closed_port()),
                                              "backup": destination("BACKUP", closed_port())},
                             "routes": [{"send_to": ["central"]}]}, start=False)
    files = write_series(tmp_path / "import", "resend", 1, 1, Series("CT", 2, 64, 64))
    assert "imported 2, skipped 0" in box.cli("send", str(files[0].parent)).stdout
    cached = {uid: row["path"] for uid, row in cache_rows(box).items()}

    again = box.cli("send", str(files[0].parent), "--to", "backup", check=False)
    assert again.returncode == 0 and "imported 2, skipped 0" in again.stdout, again.stdout + again.stderr
    entries = {d["name"]: d for d in json.loads(box.cli("queue", "--json").stdout)["destinations"]}
    assert entries["backup"]["pending"] == 2, entries
    assert entries["central"]["pending"] == 2, entries  # what the rules queued is left as it was
    if policy != "replace":
        assert {uid: row["path"] for uid, row in cache_rows(box).items()} == cached


def test_a_listing_piped_into_a_reader_that_stops_early_ends_quietly(appliance_factory, tmp_path) -> None:
    """`appliance ls | head -1` on a box with many studies: no traceback for the lines head
    did not want."""
    box = appliance_factory({}, start=False)
    for study in range(300):
        write_series(tmp_path / "import" / str(study), f"many-{study}", 1, 1, Series("CT", 1, 16, 16))
    assert "imported 300" in box.cli("send", str(tmp_path / "import")).stdout
    listing = subprocess.run(f"{sys.executable} -m appliance ls --config {box.config_path} | head -1", shell=True,
                             cwd=REPO, capture_output=True, text=True, timeout=120)
    assert listing.stdout.startswith("PATIENT") and listing.stderr == "", listing.stderr


def test_an_import_waits_while_start_up_clears_leftovers(appliance_factory, tmp_path) -> None:
    """The other side of start-up's clearing: while it runs (held here by the test), `appliance
    send` imports nothing; then it goes on."""
    box = appliance_factory({}, start=False)
    files = write_series(tmp_path / "import", "while-clearing", 1, 1, Series("CT", 3, 16, 16))
    with Store(box.data).clearing():
        sender = subprocess.Popen([sys.executable, "-m", "appliance", "send", str(tmp_path / "import"),
                                   "--config", str(box.config_path)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert sender.poll() is None and not list((box.data / "cache").rglob("*.dcm"))
    out, err = sender.communicate(timeout=60)
    assert sender.returncode == 0 and "imported 3, skipped 0" in out, out + err
    assert set(cache_rows(box)) == {sop_uid(p) for p in files}
