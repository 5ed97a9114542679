"""Fixtures for the print SCP tests: a running PrintService on a free loopback port with
printers of any backend, Ghostscript to look at what was printed, and waiting helpers."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import pytest
from PIL import Image

from appliance.config import Timeouts
from appliance.db import PrintJob
from appliance.printing.jobs import list_jobs
from appliance.printing.service import PrintService
from appliance.printing.settings import PrintConfig, PrinterConfig, PrintRetry
from appliance.valuetypes import Space


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def printer(ae_title: str = "TESTPRINT", **overrides: Any) -> PrinterConfig:
    """A printer writing to a directory, on paper the size of the film (pixel checks are exact
    at 72 dpi), resolution 72 dpi so images are not magnified unless a test asks."""
    base = PrinterConfig(
        ae_title=ae_title, backend="directory", directory="/nonexistent", default_paper="FILM",
        default_film_size="8INX10IN", resolution_dpi=72, margin_mm=0.0,
        retry=PrintRetry(initial_delay=0.2, factor=1.0, max_delay=0.5),
    )
    return replace(base, **overrides)


class RunningPrinter:
    """A started PrintService and what it wrote."""

    def __init__(self, service: PrintService, root: Path, out: Path) -> None:
        self.service = service
        self.root = root
        self.out = out

    @property
    def port(self) -> int:
        return self.service.port

    def jobs(self) -> list[PrintJob]:
        return list_jobs(self.root)

    def wait_jobs(self, count: int, state: str = "printed", timeout: float = 20.0) -> list[PrintJob]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = [j for j in self.jobs() if j.state == state]
            if len(jobs) >= count:
                return sorted(jobs, key=lambda j: j.id)
            time.sleep(0.05)
        have = [(j.id, j.state, j.last_error) for j in self.jobs()]
        raise AssertionError(f"expected {count} {state} job(s), have: {have}")

    def printed_files(self, suffix: str = ".ps") -> list[Path]:
        return sorted(self.out.glob(f"*{suffix}"))


@pytest.fixture
def print_server(tmp_path: Path) -> Iterator[Callable[..., RunningPrinter]]:
    """``print_server(printers={"name": PrinterConfig}, root=, min_free=, timeouts=, **PrintConfig fields)``
    -> RunningPrinter. Directory printers without a directory write to ``tmp_path/out``."""
    started: list[PrintService] = []

    def start(printers: dict[str, PrinterConfig] | None = None, root: Path | None = None,
              min_free: Space | None = None, timeouts: Timeouts | None = None, **config: Any) -> RunningPrinter:
        out = tmp_path / "out"
        printers = printers or {"film": printer()}
        printers = {
            name: (replace(p, directory=str(out)) if p.backend == "directory" and p.directory == "/nonexistent" else p)
            for name, p in printers.items()
        }
        settings = PrintConfig(enabled=True, bind_address="127.0.0.1", port=free_port(),
                               printers=MappingProxyType(printers), **config)
        directories = [Path(str(p.directory)) for p in printers.values() if p.backend == "directory"]
        out = directories[0] if directories else out
        data = root or tmp_path / "data"
        service = PrintService(settings, data, port=0, min_free=min_free, timeouts=timeouts)
        service.start()
        started.append(service)
        return RunningPrinter(service, data, out)

    yield start
    for service in started:
        service.stop()
    # Every PostScript any test printed must be valid for a real interpreter, not just the pages
    # a test looked at, and keep DSC's line length for the spoolers that parse it.
    for ps in sorted(tmp_path.rglob("*.ps")):
        if ps.read_bytes().startswith(b"%!PS"):
            assert ghostscript(ps, dpi=9), ps
            assert max(len(line) for line in ps.read_bytes().splitlines()) <= 255, ps


def ghostscript(ps: Path, dpi: int = 72, device: str = "pnggray") -> list[np.ndarray]:
    """Render every page of a PostScript file; returns the pages as arrays (row 0 = top)."""
    assert shutil.which("gs"), "Ghostscript (gs) is needed"
    out = ps.parent / f"{ps.stem}-gs"
    out.mkdir(exist_ok=True)
    done = subprocess.run(
        ["gs", "-q", "-dSAFER", "-dBATCH", "-dNOPAUSE", f"-sDEVICE={device}", f"-r{dpi}",
         f"-sOutputFile={out}/page-%03d.png", str(ps)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, f"gs failed: {done.stderr or done.stdout}"
    return [np.asarray(Image.open(p)) for p in sorted(out.glob("page-*.png"))]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")
