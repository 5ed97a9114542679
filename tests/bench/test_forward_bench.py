"""Forward benchmark: how long 500 CT take from a modality to the central PACS through the
appliance, next to sending straight to the PACS and to routing through a second Orthanc.

Run with ``make bench`` (or ``.venv/bin/python -m pytest -m bench -s tests/bench/test_forward_bench.py``).
Every path ends at a fresh Orthanc (empty storage, ``TCP_NODELAY=1``) on 127.0.0.1; DCMTK
``storescu`` sends the 500 CT (512×512×16 bit, 0.53 MB each) on one association. The clock
starts when storescu is started and stops when Orthanc's ``/statistics`` counts 500 instances.
Each run also records the CPU time the whole machine was busy (``/proc/stat``) and the central
Orthanc's own CPU time: on a small machine where the PACS runs beside the appliance, the two
compete for the same CPUs, and these say how much of the machine each path needed.

* **direct**: storescu straight into Orthanc;
* **appliance**: storescu into the appliance, which forwards to Orthanc (``max_associations: 1``,
  or ``BENCH_FORWARD_ASSOCIATIONS``; ``BENCH_PACS_CPU=N`` runs the central Orthanc alone on CPU N);
  also its intake time (storescu's exit) and its peak RSS (``VmHWM``) during the run;
* **appliance-intake-only** (a reference): storescu into the appliance with no routes, until
  storescu exits — what receiving alone costs;
* **orthanc-router**: storescu into a second Orthanc whose Lua ``OnStoredInstance`` calls
  ``SendToModality`` for every instance it receives.
* **large instance**: one ~503 MB multi-frame instance (``data.write_large_instance``) through
  the appliance to a DCMTK storescp: the appliance's peak RSS, which should stay far below the
  instance's size (chunked receive into the cache, chunked send from it).

Targets (reported, never asserted): appliance ≤ 1.15 × direct, and ≤ 0.8 × orthanc-router.
Rounds are interleaved, the order rotated each round, medians reported (``BENCH_ROUNDS``,
default 3). ``os.sync()`` runs between runs. What is asserted: every instance arrived.
Results: stdout, ``bench-results/forward.json`` and ``forward.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..corpus import Series, write_series
from ..pacs import Orthanc, StoreSCP, destination, queue_of, wait_until
from ..peers import REPO, ApplianceProcess, storescu
from .data import write_large_instance

pytestmark = pytest.mark.bench

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
# The destination's max_associations (the appliance's parallel associations to Orthanc).
ASSOCIATIONS = int(os.environ.get("BENCH_FORWARD_ASSOCIATIONS", "1"))
# The CPU the central Orthanc runs on alone, the other CPUs running the rest (storescu, the
# appliance, the router Orthanc): at a site, the PACS is on a machine of its own, and does not
# compete with the modality and the box for their CPUs. Unset: everything shares every CPU.
PACS_CPU = os.environ.get("BENCH_PACS_CPU")
CT_COUNT = 500
RESULTS_DIR = REPO / "bench-results"
TARGET_DIRECT, TARGET_ROUTER = 1.15, 0.8

ROUTER_LUA = """
function OnStoredInstance(instanceId, tags, metadata, origin)
  if origin["RequestOrigin"] == "DicomProtocol" then
    SendToModality(instanceId, "central")
  end
end
"""


@pytest.fixture(scope="session")
def removed_at_session_end() -> Iterator[list[Path]]:
    """Directories to remove once every benchmark has run. Not sooner: on ext4 without a journal
    (this benchmark machine's), creating files is slower for minutes after a large delete, and
    that would slow the benchmarks that follow."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, removed_at_session_end: list[Path]) -> Path:
    # ~10 GB: each round's Orthanc storage and appliance cache, and the large instance. Left
    # behind, a few runs fill a small disk, and pytest's removal of old ones at the start of a
    # later run would slow that run (as above).
    path = tmp_path_factory.mktemp("forward-bench")
    removed_at_session_end.append(path)
    return path


@pytest.fixture(scope="module")
def ct_files(workspace: Path) -> list[Path]:
    return write_series(workspace / "ct", "forward-bench", 1, 1, Series("CT", CT_COUNT, 512, 512))


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_busy_seconds() -> float:
    """CPU time the whole machine spent busy (all CPUs, every process and the kernel's own
    threads: writeback, softirqs), from the first line of /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def _pin(pid: int, cpus: set[int]) -> None:
    """Every thread of ``pid`` onto ``cpus`` (threads it starts later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


@pytest.fixture(scope="module", autouse=True)
def pacs_cpu() -> Iterator[None]:
    """With ``BENCH_PACS_CPU``: this process, and so every peer it starts, off that CPU."""
    before = os.sched_getaffinity(0)
    if PACS_CPU is not None:
        os.sched_setaffinity(0, before - {int(PACS_CPU)})
    yield
    os.sched_setaffinity(0, before)


def _deliver(sender_port: int, aec: str, files: list[Path], central: Orthanc) -> dict[str, float]:
    """storescu the files; the time until storescu exits and until Orthanc holds them all, and
    the CPU time the machine and the central Orthanc spent meanwhile."""
    assert central.process is not None
    if PACS_CPU is not None:
        _pin(central.process.pid, {int(PACS_CPU)})
    central_cpu = _cpu_seconds(central.process.pid)
    busy = _machine_busy_seconds()
    start = time.monotonic()
    result = storescu(sender_port, files, aec=aec)
    sent = time.monotonic() - start
    assert result.returncode == 0 and len(result.succeeded) == len(files), result.output[-2000:]
    wait_until(lambda: central.count() >= len(files), 300,
               lambda: f"Orthanc holds {central.count()} of {len(files)}", interval=0.02)
    arrived = time.monotonic() - start
    return {"sent_s": sent, "arrived_s": arrived,
            "machine_busy_cpu_s": _machine_busy_seconds() - busy,
            "central_cpu_s": _cpu_seconds(central.process.pid) - central_cpu}


def run_direct(workdir: Path, files: list[Path]) -> dict[str, float]:
    with Orthanc(workdir / "central") as central:
        return _deliver(central.dicom_port, central.ae_title, files, central)


def run_appliance(workdir: Path, files: list[Path]) -> dict[str, float]:
    with Orthanc(workdir / "central") as central:
        box = ApplianceProcess(workdir / "box", {
            "destinations": {"central": destination(central.ae_title, central.dicom_port,
                                                    max_associations=ASSOCIATIONS)},
            "routes": [{"send_to": ["central"]}],
        }).start()
        try:
            assert box.process is not None
            pid = box.process.pid
            # The appliance is a process tree: the receiver, and its forwarder child.
            tree = [pid, *map(int, subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                  text=True).stdout.split())]
            cpu_before = sum(_cpu_seconds(p) for p in tree)
            times = _deliver(box.port, box.ae_title, files, central)
            peaks = [_kib(p, "VmHWM") / 1024 for p in tree]
            times["rss_peak_mb"] = sum(peaks)  # all processes together (an upper bound)
            times["rss_peak_largest_mb"] = max(peaks)
            times["cpu_s"] = sum(_cpu_seconds(p) for p in tree) - cpu_before
            times["child_processes"] = len(tree) - 1
            return times
        finally:
            box.stop()


def run_intake_only(workdir: Path, files: list[Path]) -> dict[str, float]:
    """The appliance with no routes: what receiving alone costs, for reading the appliance row."""
    box = ApplianceProcess(workdir / "box", {}).start()
    try:
        start = time.monotonic()
        result = storescu(box.port, files, aec=box.ae_title)
        sent = time.monotonic() - start
        assert result.returncode == 0 and len(result.succeeded) == len(files), result.output[-2000:]
        return {"sent_s": sent, "arrived_s": sent}
    finally:
        box.stop()


def run_orthanc_router(workdir: Path, files: list[Path]) -> dict[str, float]:
    with Orthanc(workdir / "central") as central:
        modalities = {"central": {"AET": central.ae_title, "Port": central.dicom_port}}
        with Orthanc(workdir / "router", ae_title="ROUTER", modalities=modalities, lua=ROUTER_LUA) as router:
            return _deliver(router.dicom_port, router.ae_title, files, central)


SCENARIOS: dict[str, Callable[[Path, list[Path]], dict[str, float]]] = {
    "direct": run_direct,
    "appliance": run_appliance,
    "orthanc-router": run_orthanc_router,
    "appliance-intake-only": run_intake_only,
}


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        return "?"


@pytest.fixture(scope="module")
def results() -> Iterator[dict[str, list[dict[str, float]]]]:
    """Runs per scenario; written out at the end of the module even if a run failed."""
    collected: dict[str, list[dict[str, float]]] = {name: [] for name in SCENARIOS}
    collected["large-instance"] = []
    started = time.time()
    load_before = os.getloadavg()[0]
    yield collected
    write_report(collected, started, load_before)


def write_report(runs: dict[str, list[dict[str, float]]], started: float, load_before: float) -> None:
    arrived = {name: _median([r["arrived_s"] for r in runs[name]]) for name in SCENARIOS}
    large = runs.get("large-instance") or []
    appliance = runs["appliance"]
    round_ratios = [a["arrived_s"] / d["arrived_s"] for a, d in zip(appliance, runs["direct"], strict=False)]
    summary: dict[str, Any] = {
        "instances": CT_COUNT,
        "rounds": ROUNDS,
        "median_arrived_s": arrived,
        "inst_per_s": {name: CT_COUNT / t if t == t and t else float("nan") for name, t in arrived.items()},
        "ratio_appliance_to_direct": arrived["appliance"] / arrived["direct"] if arrived["direct"] else None,
        # Each round's own ratio: the two paths of a round ran minutes apart at most, so a change
        # in the machine's other load between rounds cancels out of these.
        "round_ratios_appliance_to_direct": round_ratios,
        "median_round_ratio_appliance_to_direct": _median(round_ratios),
        "ratio_appliance_to_orthanc_router": (arrived["appliance"] / arrived["orthanc-router"]
                                              if arrived["orthanc-router"] else None),
        "appliance_intake_s": _median([r["sent_s"] for r in appliance]),
        "appliance_rss_peak_mb": max((r["rss_peak_mb"] for r in appliance), default=float("nan")),
        "appliance_rss_peak_largest_mb": max((r["rss_peak_largest_mb"] for r in appliance), default=float("nan")),
        "appliance_cpu_s": _median([r["cpu_s"] for r in appliance]),
        "machine_busy_cpu_s": {name: _median([r["machine_busy_cpu_s"] for r in runs[name]
                                              if "machine_busy_cpu_s" in r]) for name in SCENARIOS},
        "central_cpu_s": {name: _median([r["central_cpu_s"] for r in runs[name] if "central_cpu_s" in r])
                          for name in SCENARIOS},
        "targets": {"appliance_to_direct": TARGET_DIRECT, "appliance_to_orthanc_router": TARGET_ROUTER},
        "runs": runs,
        "machine": {
            "cpus": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "orthanc": _version(["Orthanc", "--version"]), "dcmtk": _version(["storescu", "--version"]),
            "commit": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
            "pacs_cpu": PACS_CPU,
        },
        "duration_s": time.time() - started,
    }

    def fmt(value: Any, digits: int = 2) -> str:
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    rows = [
        ["direct (storescu → Orthanc)", fmt(arrived["direct"]), fmt(summary["inst_per_s"]["direct"], 1), "1.00", "-"],
        ["appliance (storescu → appliance → Orthanc)", fmt(arrived["appliance"]),
         fmt(summary["inst_per_s"]["appliance"], 1), fmt(summary["ratio_appliance_to_direct"]),
         f"≤ {TARGET_DIRECT}"],
        ["Orthanc as router (storescu → Orthanc + Lua → Orthanc)", fmt(arrived["orthanc-router"]),
         fmt(summary["inst_per_s"]["orthanc-router"], 1),
         fmt(arrived["orthanc-router"] / arrived["direct"] if arrived["direct"] else float("nan")),
         f"appliance/router = {fmt(summary['ratio_appliance_to_orthanc_router'])} (≤ {TARGET_ROUTER})"],
        ["reference: appliance intake only (no routes; storescu exit)", fmt(arrived["appliance-intake-only"]),
         fmt(summary["inst_per_s"]["appliance-intake-only"], 1),
         fmt(arrived["appliance-intake-only"] / arrived["direct"] if arrived["direct"] else float("nan")), "-"],
    ]
    m = summary["machine"]
    lines = [
        "## Forward benchmark",
        "",
        "Reproduce: `make bench` or `.venv/bin/python -m pytest -m bench -s tests/bench/test_forward_bench.py`.",
        "",
        f"{CT_COUNT} CT (512×512×16 bit) on one storescu association; time from starting storescu until "
        f"Orthanc's /statistics counts all {CT_COUNT}; medians of {ROUNDS} interleaved rounds. "
        f"Machine: {m['cpus']} CPUs, kernel {m['kernel']}, Python {m['python']}, {m['orthanc']}, {m['dcmtk']}; "
        f"commit {m['commit']}; load average {fmt(m['load_average_before'])} before, "
        f"{fmt(m['load_average_after'])} after."
        + (f" The central Orthanc alone on CPU {PACS_CPU}, everything else on the others (BENCH_PACS_CPU)."
           if PACS_CPU is not None else ""),
        "",
        "| path | seconds to all in Orthanc | inst/s | × direct | target |",
        "|---|---|---|---|---|",
        *["| " + " | ".join(row) + " |" for row in rows],
        "",
        f"- Appliance intake (storescu exit): {fmt(summary['appliance_intake_s'])} s; appliance CPU "
        f"{fmt(summary['appliance_cpu_s'])} s (all its processes); peak RSS (VmHWM) "
        f"{fmt(summary['appliance_rss_peak_mb'], 1)} MB summed over its processes, "
        f"{fmt(summary['appliance_rss_peak_largest_mb'], 1)} MB the largest.",
        "- CPU time while each path ran (medians; the machine has "
        f"{m['cpus']} CPUs, so a path that takes t seconds has {m['cpus']}·t CPU-seconds available): "
        + "; ".join(f"{name}: machine busy {fmt(summary['machine_busy_cpu_s'][name])} CPU-s, the central Orthanc "
                    f"{fmt(summary['central_cpu_s'][name])}" for name in ("direct", "appliance", "orthanc-router")),
        "- Appliance ÷ direct, round by round: " + " / ".join(fmt(r) for r in round_ratios)
        + f" (median {fmt(summary['median_round_ratio_appliance_to_direct'])}).",
        "- Per run (s): " + "; ".join(f"{name} " + " / ".join(fmt(r["arrived_s"]) for r in runs[name])
                                      for name in SCENARIOS),
        *[f"- One {fmt(r['size_mb'], 0)} MB instance through the appliance to storescp: {fmt(r['arrived_s'])} s, "
          f"appliance peak RSS (VmHWM) {fmt(r['rss_peak_mb'], 1)} MB." for r in large],
        "",
    ]
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "forward.json").write_text(json.dumps(summary, indent=2) + "\n")
    (RESULTS_DIR / "forward.md").write_text("\n".join(lines))
    print("\n" + "\n".join(lines), flush=True)
    print(f"written: {RESULTS_DIR / 'forward.json'}, {RESULTS_DIR / 'forward.md'}", flush=True)


def test_forward_500_ct(workspace: Path, ct_files: list[Path], results: dict[str, list[dict[str, float]]]) -> None:
    """Every path delivers all 500 instances in every round; the times go to the report."""
    names = list(SCENARIOS)
    for round_no in range(ROUNDS):
        order = names[round_no % len(names):] + names[:round_no % len(names)]
        for name in order:
            os.sync()
            run = SCENARIOS[name](workspace / f"{name}-{round_no}", ct_files)
            results[name].append(run)
            print(f"round {round_no + 1} {name}: {run}", flush=True)


def test_forward_large_instance_memory(workspace: Path, results: dict[str, list[dict[str, float]]]) -> None:
    """A ~503 MB instance is received and forwarded whole; the appliance's peak RSS is reported."""
    large = write_large_instance(workspace / "large" / "large.dcm")
    os.sync()
    with StoreSCP(workspace / "large-scp", ae_title="LARGE") as scp:
        box = ApplianceProcess(workspace / "large-box", {
            "destinations": {"large": destination(scp.ae_title, scp.port,
                                                  timeouts={"dimse": "120s", "network": "120s"})},
            "routes": [{"send_to": ["large"]}],
        }).start()
        try:
            assert box.process is not None
            tree = [box.process.pid, *map(int, subprocess.run(["pgrep", "-P", str(box.process.pid)],
                                                              capture_output=True, text=True).stdout.split())]
            start = time.monotonic()
            result = storescu(box.port, [large])
            assert result.returncode == 0 and len(result.succeeded) == 1, result.output[-2000:]
            wait_until(lambda: queue_of(box, "large")["delivered"] == 1, 300,
                       lambda: f"not delivered: {queue_of(box, 'large')}", interval=0.2)
            run = {"size_mb": large.stat().st_size / 1e6, "arrived_s": time.monotonic() - start,
                   # the largest of its processes: the receiver, or the forwarder that sent it
                   "rss_peak_mb": max(_kib(p, "VmHWM") / 1024 for p in tree)}
        finally:
            box.stop()
        received = scp.files()
        assert len(received) == 1 and received[0].stat().st_size >= large.stat().st_size - 1024
    results["large-instance"].append(run)
    print(f"large instance: {run}", flush=True)
