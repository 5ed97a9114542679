"""Receive benchmark: the appliance's Storage SCP next to DCMTK's storescp and Orthanc.

Run with ``make bench`` (or ``.venv/bin/python -m pytest -m bench -s tests/bench/test_receive_bench.py``).
Every number is measured in the same run as the peer it is compared with, on 127.0.0.1,
each receiver a fresh process with empty storage (see ``receivers.py``). The scenarios:

1. **One association, 500 CT** (512×512×16 bit, 0.53 MB each): DCMTK ``storescu`` (one process,
   all 500 files) into the appliance, storescp and Orthanc; 3 interleaved rounds, the order
   rotated each round so no receiver always follows the same one. Wall time of storescu
   from exec to exit; medians; ratios appliance/Orthanc and appliance/storescp.
2. **500 one-instance associations**: a pynetdicom SCU in this process opens 500 associations
   one after the other, each storing one CT, into the appliance and storescp (3 interleaved
   rounds, medians). It sets TCP_NODELAY on its socket (``appliance.dicomnet.tune_socket``),
   proposes one context per transfer syntax and streams each file unchanged
   (``STORE_SEND_CHUNKED_DATASET``), so the sender costs the same for both receivers.
3. **Peak RSS** (``VmHWM`` just before stopping) of each receiver while receiving 5 000 CT
   (storescu ``--repeat 10`` over the 500 files, one association; repeats replace the same
   SOP instances) and while receiving one ~503 MB instance.

Durability differs and is part of what is compared: storescp writes without fsync; Orthanc
fsyncs each file and commits its SQLite index; the appliance acknowledges only after fsync,
rename, directory fsync and a SQLite commit (synchronous=FULL). ``os.sync()`` runs between
runs so a run does not pay for the previous one's writeback.

Benchmarks report, they do not assert timing targets; they do assert that every instance
arrived. Results go to stdout and to ``bench-results/receive.json`` and ``receive.md``.
``BENCH_ROUNDS`` (default 3) sets the rounds of scenarios 1 and 2.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from appliance.dicomnet import tune_socket

from ..peers import DCMTK_ENV, StoreResult, parse_storescu
from .data import ct_series, write_large_instance
from .receivers import Appliance, Orthanc, Receiver, Storescp, dcmtk_tool, running
from .report import Report, median, ratio

pytestmark = pytest.mark.bench

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
CT_COUNT = 500
REPEAT = 10  # scenario 3: 10 × 500 = 5 000 C-STOREs
CALLING_AE = "MODALITY"


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("receive-bench")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # ~800 MB of inputs: not worth keeping


@pytest.fixture(scope="module")
def ct_files(workspace: Path) -> list[Path]:
    return ct_series(workspace / "ct", CT_COUNT)


@pytest.fixture(scope="module")
def large_file(workspace: Path) -> Path:
    return write_large_instance(workspace / "large" / "large.dcm")


@pytest.fixture(scope="module")
def report() -> Iterator[Report]:
    collected = Report()
    yield collected
    collected.write()


# ---- senders -------------------------------------------------------------------------------------

def storescu(receiver: Receiver, files: list[Path], repeat: int = 1) -> tuple[float, StoreResult]:
    """DCMTK storescu, one process and one association for all files; its wall time from exec
    to exit and, from its ``-v`` log, which stores were acknowledged with success."""
    argv = [dcmtk_tool("storescu"), "-v", "-aet", CALLING_AE, "-aec", receiver.ae_title]
    if repeat > 1:
        argv += ["--repeat", str(repeat)]  # the whole file list, again, on the same association
    argv += ["127.0.0.1", str(receiver.port), *map(str, files)]
    start = time.perf_counter()
    proc = subprocess.run(argv, env=DCMTK_ENV, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return seconds, parse_storescu(proc.returncode, proc.stdout + proc.stderr)


def one_instance_associations(receiver: Receiver, files: list[Path]) -> tuple[float, list[str]]:
    """One association per file, sequentially, from a pynetdicom SCU; the wall time and the
    problems (association refused, non-success status)."""
    ae = AE(ae_title=CALLING_AE)
    # One context per transfer syntax: with both in one context a pynetdicom acceptor may pick
    # Implicit VR and the SCU would re-encode every data set.
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    handlers = [(evt.EVT_CONN_OPEN, tune_socket)]
    problems: list[str] = []
    chunked, netlog = _config.STORE_SEND_CHUNKED_DATASET, logging.getLogger("pynetdicom")
    level = netlog.level
    # Stream each file as stored (no decode) and keep pynetdicom's per-association INFO lines
    # out of pytest's log capture: both are sender cost that has nothing to do with the receiver.
    _config.STORE_SEND_CHUNKED_DATASET = True
    netlog.setLevel(logging.WARNING)
    try:
        start = time.perf_counter()
        for path in files:
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title=receiver.ae_title, evt_handlers=handlers)
            if not assoc.is_established:
                problems.append(f"{path.name}: association not established")
                continue
            status = assoc.send_c_store(path)
            assoc.release()
            if int(status.get("Status", -1)) != 0:
                problems.append(f"{path.name}: status {status.get('Status', 'none')}")
        seconds = time.perf_counter() - start
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        netlog.setLevel(level)
    return seconds, problems


def _check_all_stored(receiver: Receiver, result: StoreResult, sent: int, distinct: int) -> None:
    assert not result.failed and len(result.succeeded) == sent, (
        f"{receiver.name}: {len(result.succeeded)}/{sent} acknowledged, {len(result.failed)} failed; "
        f"storescu rc {result.returncode}\n{result.output[-2000:]}\n{receiver.log_tail()}"
    )
    assert receiver.stored() == distinct, f"{receiver.name} holds {receiver.stored()}, not {distinct}"


# ---- scenarios -----------------------------------------------------------------------------------

def test_one_association_500_ct(workspace: Path, ct_files: list[Path], report: Report) -> None:
    kinds: list[type[Receiver]] = [Appliance, Storescp, Orthanc]
    megabytes = sum(p.stat().st_size for p in ct_files) / 1e6
    runs: dict[str, list[dict[str, float]]] = {k.name: [] for k in kinds}
    for round_ in range(ROUNDS):
        for kind in kinds[round_ % 3 :] + kinds[: round_ % 3]:
            with running(kind, workspace / f"s1-{kind.name}-{round_}") as receiver:
                cpu = receiver.cpu_seconds()
                seconds, result = storescu(receiver, ct_files)
                cpu = receiver.cpu_seconds() - cpu
                _check_all_stored(receiver, result, len(ct_files), len(ct_files))
                runs[kind.name].append({
                    "wall_s": seconds, "inst_per_s": len(ct_files) / seconds, "mb_per_s": megabytes / seconds,
                    "rx_cpu_s": cpu, "rx_cpu_ms_per_inst": cpu * 1000 / len(ct_files),
                    "peak_rss_mb": receiver.peak_rss_mb(),
                })
    med = {name: {key: median([r[key] for r in rs]) for key in rs[0]} for name, rs in runs.items()}
    rate = {name: m["inst_per_s"] for name, m in med.items()}
    ratios = {
        "appliance/orthanc": ratio(rate["appliance"], rate["orthanc"]),
        "appliance/storescp": ratio(rate["appliance"], rate["dcmtk-storescp"]),
        "appliance/orthanc per round": [ratio(a["inst_per_s"], o["inst_per_s"])
                                        for a, o in zip(runs["appliance"], runs["orthanc"], strict=True)],
    }
    report.section(
        "one_association_500_ct",
        {"instances": len(ct_files), "megabytes": megabytes, "rounds": ROUNDS, "runs": runs, "median": med,
         "ratios": ratios, "target": "appliance >= 1.2 x orthanc"},
        f"1. One association, {len(ct_files)} CT ({megabytes:.0f} MB), sender DCMTK storescu; "
        f"medians of {ROUNDS} interleaved runs",
        ["receiver", "inst/s", "per run inst/s", "MB/s", "wall s", "rx CPU ms/inst", "peak RSS MB"],
        [[name, m["inst_per_s"], [r["inst_per_s"] for r in runs[name]], m["mb_per_s"], m["wall_s"],
          m["rx_cpu_ms_per_inst"], m["peak_rss_mb"]] for name, m in med.items()],
        [f"appliance / Orthanc = **{ratios['appliance/orthanc']:.2f}×** (target ≥ 1.2×; per round: "
         + " / ".join(f"{r:.2f}" for r in ratios["appliance/orthanc per round"]) + ")",
         f"appliance / storescp = **{ratios['appliance/storescp']:.2f}×**",
         "durability: appliance fsync + rename + dir fsync + SQLite FULL commit before each ack; "
         "Orthanc fsync + SQLite index; storescp no fsync"],
    )


def test_500_one_instance_associations(workspace: Path, ct_files: list[Path], report: Report) -> None:
    kinds: list[type[Receiver]] = [Appliance, Storescp]
    runs: dict[str, list[dict[str, float]]] = {k.name: [] for k in kinds}
    for round_ in range(ROUNDS):
        for kind in kinds[round_ % 2 :] + kinds[: round_ % 2]:
            with running(kind, workspace / f"s2-{kind.name}-{round_}") as receiver:
                cpu = receiver.cpu_seconds()
                seconds, problems = one_instance_associations(receiver, ct_files)
                cpu = receiver.cpu_seconds() - cpu
                assert not problems, f"{receiver.name}: {problems[:5]}\n{receiver.log_tail()}"
                assert receiver.stored() == len(ct_files)
                runs[kind.name].append({
                    "wall_s": seconds, "ms_per_assoc": seconds * 1000 / len(ct_files),
                    "rx_cpu_ms_per_assoc": cpu * 1000 / len(ct_files), "peak_rss_mb": receiver.peak_rss_mb(),
                })
    med = {name: {key: median([r[key] for r in rs]) for key in rs[0]} for name, rs in runs.items()}
    appliance_vs_storescp = ratio(med["appliance"]["ms_per_assoc"], med["dcmtk-storescp"]["ms_per_assoc"])
    report.section(
        "one_instance_associations",
        {"associations": len(ct_files), "rounds": ROUNDS, "runs": runs, "median": med,
         "ratios": {"appliance/storescp ms per association": appliance_vs_storescp},
         "target": "appliance <= 2 x storescp"},
        f"2. {len(ct_files)} associations × 1 CT each, sender pynetdicom SCU (TCP_NODELAY); "
        f"medians of {ROUNDS} interleaved runs",
        ["receiver", "ms/association", "per run ms", "total s", "rx CPU ms/association", "peak RSS MB"],
        [[name, m["ms_per_assoc"], [r["ms_per_assoc"] for r in runs[name]], m["wall_s"], m["rx_cpu_ms_per_assoc"],
          m["peak_rss_mb"]] for name, m in med.items()],
        [f"appliance / storescp time per association = **{appliance_vs_storescp:.2f}×** (target ≤ 2×)",
         "the sender is Python: its own per-association cost is in both numbers"],
    )


def _memory_run(kind: type[Receiver], workdir: Path, files: list[Path], repeat: int) -> dict[str, float]:
    with running(kind, workdir) as receiver:
        idle = receiver.peak_rss_mb()
        cpu = receiver.cpu_seconds()
        seconds, result = storescu(receiver, files, repeat=repeat)
        cpu = receiver.cpu_seconds() - cpu
        _check_all_stored(receiver, result, len(files) * repeat, len(files))
        megabytes = sum(p.stat().st_size for p in files) * repeat / 1e6
        return {
            "instances": len(files) * repeat, "megabytes": megabytes, "wall_s": seconds,
            "inst_per_s": len(files) * repeat / seconds, "mb_per_s": megabytes / seconds, "rx_cpu_s": cpu,
            "start_rss_mb": idle, "peak_rss_mb": receiver.peak_rss_mb(),
        }


def test_peak_rss(workspace: Path, ct_files: list[Path], large_file: Path, report: Report) -> None:
    kinds: list[type[Receiver]] = [Appliance, Storescp, Orthanc]
    many = {k.name: _memory_run(k, workspace / f"s3-many-{k.name}", ct_files, REPEAT) for k in kinds}
    large = {k.name: _memory_run(k, workspace / f"s3-large-{k.name}", [large_file], 1) for k in kinds}
    size = large_file.stat().st_size / 1e6
    report.section(
        "peak_rss",
        {"many": many, "large": large, "large_instance_mb": size},
        "3. Peak RSS (VmHWM) of each receiver, one fresh process per column, sender DCMTK storescu "
        "(one association)",
        ["receiver", "peak RSS after start-up MB", f"{REPEAT * len(ct_files)} CT: peak RSS MB", "inst/s",
         f"1 × {size:.0f} MB: peak RSS MB", "MB/s", "s"],
        [[name, many[name]["start_rss_mb"], many[name]["peak_rss_mb"], many[name]["inst_per_s"],
          large[name]["peak_rss_mb"], large[name]["mb_per_s"], large[name]["wall_s"]] for name in many],
        [f"{REPEAT * len(ct_files)} CT = the {len(ct_files)} files sent {REPEAT} times on one association "
         "(storescu --repeat); each repeat replaces the same SOP instances",
         "the large instance: multi-frame 16-bit secondary capture, 60 frames of 2048×2048, one C-STORE"],
    )
