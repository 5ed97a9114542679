"""The three C-STORE receivers the receive benchmark compares, behind one small interface.

* the appliance (``python -m appliance run``, shipped defaults, full durability);
* DCMTK's ``storescp`` (``+xa -fe .dcm -od DIR``: writes each file, no fsync);
* Orthanc (fsync of every file, its own SQLite index, ``StorageCompression`` off).

Each is a fresh process with an empty storage directory, started on a free port and stopped
(SIGTERM, then SIGKILL) by :func:`running`, also when the benchmark fails. DCMTK and Orthanc
run with ``TCP_NODELAY=1``: without it each C-STORE waits ~40 ms on Nagle + delayed ACK, and
the benchmark would measure that timer instead of the receiver. Neither can be bound to
127.0.0.1 only (no such option), so they listen on a random high port.

What is read from ``/proc`` and why:

* ``VmHWM`` (peak resident set) just before stopping: every scenario starts a fresh process,
  so it is the peak of that scenario alone (plus start-up);
* ``utime + stime`` of the whole thread group, before and after the sender runs, so the CPU
  figure is the receive work without process start-up.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..peers import DCMTK_ENV, ApplianceProcess, free_port, wait_for_port

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def dcmtk_tool(name: str) -> str:
    """DCMTK's executable ``name``. An activated venv puts pynetdicom's own ``storescu`` and
    ``storescp`` apps first on PATH; those are not the peer this benchmark means."""
    dirs = os.environ.get("PATH", "").split(os.pathsep) + ["/usr/bin"]
    for directory in dirs:
        path = Path(directory) / name
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        probe = subprocess.run([str(path), "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if "dcmtk" in (probe.stdout + probe.stderr).lower():
            return str(path)
    raise AssertionError(f"DCMTK's {name} is not installed: `make bench` installs the Debian package dcmtk")


def tool_version(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    # DCMTK says "$dcmtk: storescp v3.6.7 2022-04-22 $"
    return lines[0].strip().strip("$").replace("dcmtk:", "DCMTK").strip() if lines else "?"


def proc_status_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` memory field (``VmHWM``, ``VmRSS``) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU of the process and all its threads so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def _stop(process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


class Receiver:
    """One receiver process: start it, point a sender at ``port``/``ae_title``, count what it
    stored, read its memory and CPU, stop it."""

    name = "?"
    ae_title = "?"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()

    @property
    def pid(self) -> int:
        raise NotImplementedError

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def stored(self) -> int:
        """How many distinct instances the receiver holds now."""
        raise NotImplementedError

    def peak_rss_mb(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") * 1024 / 1e6

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the receiver's log, for a failure message."""
        logs = sorted(self.workdir.glob("*.log"))
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:] for log in logs)

    def cleanup(self) -> None:
        """Remove what it stored: the next run must start from an empty disk as well."""
        shutil.rmtree(self.workdir, ignore_errors=True)


class Appliance(Receiver):
    name = "appliance"
    ae_title = "EDGE"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.box = ApplianceProcess(workdir, ae_title=self.ae_title)  # the shipped defaults
        self.port = self.box.port

    @property
    def pid(self) -> int:
        assert self.box.process is not None
        return self.box.process.pid

    def start(self) -> None:
        self.box.start()

    def stop(self) -> None:
        self.box.stop()

    def stored(self) -> int:
        # WAL mode: a reader alongside the running appliance sees every committed row.
        with sqlite3.connect(self.box.data / "appliance.db") as conn:
            return int(conn.execute("SELECT COUNT(*) FROM instances WHERE state = 'cached'").fetchone()[0])


class Storescp(Receiver):
    name = "dcmtk-storescp"
    ae_title = "STORESCP"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.out = workdir / "out"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / "storescp.log", "ab") as log:
            self.process = subprocess.Popen(
                [dcmtk_tool("storescp"), "-aet", self.ae_title, "+xa", "-fe", ".dcm", "-od", str(self.out),
                 str(self.port)],
                env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_for_port(self.port, process=self.process)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)

    def stored(self) -> int:
        # storescp names files by SOP Instance UID, so a repeated instance overwrites its file.
        return sum(1 for _ in self.out.glob("*.dcm"))


class Orthanc(Receiver):
    name = "orthanc"
    ae_title = "ORTHANC"
    _user, _password = "bench", "benchpw"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.http_port = free_port()
        self.storage = workdir / "storage"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def config(self) -> dict:
        """The peers note's configuration, on our ports and storage; fsync on, no compression."""
        return {
            "Name": "BENCH_ORTHANC",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "StorageCompression": False,
            "SyncStorageArea": True,
            "Plugins": [],
            "LuaScripts": [],
            "HttpServerEnabled": True,  # only to read /statistics; refuses remote clients
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self._user: self._password},
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": False,
            "DicomScpTimeout": 30,
            "DicomThreadsCount": 4,
            "DicomModalities": {},
            "SaveJobs": False,
            "StableAge": 5,
            "OverwriteInstances": True,  # like the appliance's node.on_duplicate: replace
            "MetricsEnabled": True,
            "WebDavEnabled": False,
            "HttpThreadsCount": 10,
        }

    def start(self) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "orthanc.json"
        config.write_text(json.dumps(self.config(), indent=2))
        orthanc = shutil.which("Orthanc")
        assert orthanc, "Orthanc is not installed: `make bench` installs the Debian package orthanc"
        self.process = subprocess.Popen(
            [orthanc, f"--logfile={self.workdir / 'orthanc.log'}", str(config)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
        )
        wait_for_port(self.port, process=self.process)
        deadline = time.monotonic() + 20
        while True:  # the DICOM port opens before the REST API answers
            try:
                self._get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise
                time.sleep(0.05)

    def _get(self, path: str) -> dict:
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}")
        token = base64.b64encode(f"{self._user}:{self._password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return dict(json.load(response))

    def stop(self) -> None:
        # Orthanc needs ~1.5 s to exit after SIGTERM; wait for it, so its ports are free again.
        if self.process is not None:
            _stop(self.process)

    def stored(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


RECEIVERS: dict[str, type[Receiver]] = {r.name: r for r in (Appliance, Storescp, Orthanc)}


@contextmanager
def running(kind: type[Receiver], workdir: Path) -> Iterator[Receiver]:
    """A fresh receiver with empty storage; stopped and its storage removed afterwards, and
    ``sync`` run so the next run does not pay for this one's writeback."""
    receiver = kind(workdir)
    try:
        receiver.start()
        yield receiver
    finally:
        receiver.stop()
        receiver.cleanup()
        os.sync()
