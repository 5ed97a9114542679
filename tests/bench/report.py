"""Collects the receive benchmark's numbers; writes them as JSON and a markdown table and
prints the table. Written at the end of the module even when a scenario failed, so a partial
run still leaves what it measured."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom

from ..peers import REPO
from .receivers import dcmtk_tool, tool_version

RESULTS_DIR = REPO / "bench-results"
COMMANDS = ["make bench", ".venv/bin/python -m pytest -m bench -s tests/bench/test_receive_bench.py"]


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def _git_head() -> str:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or "?"


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "cpu": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "orthanc": tool_version(["Orthanc", "--version"]),
        "dcmtk": tool_version([dcmtk_tool("storescp"), "--version"]),
        "commit": _git_head(),
    }


def _fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list):
        return " / ".join(_fmt(v, digits) for v in value)
    return str(value)


class Report:
    def __init__(self) -> None:
        self.started = time.time()
        self.load_before = os.getloadavg()
        self.data: dict[str, Any] = {"commands": COMMANDS, "machine": machine()}
        self.tables: dict[str, str] = {}

    def section(self, key: str, data: dict[str, Any], title: str, header: list[str], rows: list[list[Any]],
                notes: list[str]) -> None:
        """Record one scenario: its raw numbers, and a markdown table printed right away."""
        self.data[key] = data
        lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_fmt(cell) for cell in row) + " |" for row in rows]
        lines += [""] + [f"- {note}" for note in notes]
        self.tables[key] = "\n".join(lines)
        print("\n" + self.tables[key] + "\n", flush=True)

    def markdown(self) -> str:
        m = self.data["machine"]
        load = self.data.get("load_average", {})
        head = [
            "## Receive benchmark",
            "",
            f"Reproduce: `{COMMANDS[0]}` or `{COMMANDS[1]}`.",
            "",
            f"Machine: {m['cpus']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}, "
            f"pynetdicom {m['pynetdicom']}, pydicom {m['pydicom']}, {m['orthanc']}, {m['dcmtk']}; "
            f"commit {m['commit']}. "
            f"Load average (1 min) {_fmt(load.get('before', float('nan')), 2)} before, "
            f"{_fmt(load.get('after', float('nan')), 2)} after: other jobs may share this machine, "
            f"so compare ratios measured in the same run rather than absolute numbers across runs. "
            f"Took {_fmt(self.data.get('duration_s', float('nan')), 0)} s.",
            "",
        ]
        return "\n".join(head + [self.tables[k] + "\n" for k in self.tables])

    def write(self) -> Path:
        self.data["duration_s"] = time.time() - self.started
        self.data["load_average"] = {"before": self.load_before[0], "after": os.getloadavg()[0]}
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "receive.json").write_text(json.dumps(self.data, indent=2) + "\n")
        text = self.markdown()
        (RESULTS_DIR / "receive.md").write_text(text)
        print("\n" + text, flush=True)
        print(f"written: {RESULTS_DIR / 'receive.json'}, {RESULTS_DIR / 'receive.md'}", flush=True)
        return RESULTS_DIR
