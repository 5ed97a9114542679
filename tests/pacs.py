"""Destinations for the forwarding tests: real peers the appliance sends to, and the means to
read back what they received.

* :class:`Orthanc` — Debian's Orthanc as the central PACS, with its own JSON configuration and
  fresh storage, checked over its REST API;
* :class:`StoreSCP` — DCMTK's ``storescp`` writing what it receives into a directory (with
  ``+uf`` every reception is its own file, so duplicates can be counted);
* :class:`RecordingSCP` — a pynetdicom Storage SCP in this process that records every C-STORE
  (association, SOP Instance UID, transfer syntax, data set) and injects faults: a status to
  answer, a delay, a restricted list of transfer syntaxes;
* :class:`ReadingSCP` — a pynetdicom Storage SCP that counts the bytes it reads and can stop
  reading in the middle of an instance (a PACS whose storage hangs);
* :class:`Blackhole` — a TCP port that accepts connections and never says a word (a hung PACS).

Orthanc and DCMTK run with ``TCP_NODELAY=1``; without it each C-STORE waits ~40 ms on Nagle.
The helpers at the end read the appliance's forwarding state the way an operator does: the
``appliance queue --json`` command, and (read-only) the delivery and attempt history in its database.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .corpus import CR, CT, DX, MG, MR, SC, US
from .peers import DCMTK_ENV, ApplianceProcess, free_port, require_tool, wait_for_port

SUCCESS_STATUSES = {0x0000, 0xB000, 0xB006, 0xB007}
# What a RecordingSCP's ``respond`` returns to abort the association instead of answering (a PACS
# that chokes on one instance).
ABORT = -1


def wait_until(predicate: Callable[[], Any], timeout: float, message: str | Callable[[], str],
               interval: float = 0.1) -> Any:
    """Poll until ``predicate()`` is truthy and return its value; fail with ``message`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"after {timeout:g} s: {text}")
        time.sleep(interval)


def _stop_process(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    """Signal a peer and wait for its pid to be gone (a restart on the same port needs that)."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


# ---- Orthanc ------------------------------------------------------------------------------------

class Orthanc:
    """Orthanc run directly, with fresh storage under ``workdir`` and free DICOM and HTTP ports.

    The ports and the storage survive :meth:`stop` / :meth:`start`, so a restarted Orthanc is
    the same PACS. ``modalities`` are its DicomModalities (for Orthanc acting as a router),
    ``lua`` the text of a Lua script it loads.
    """

    USER, PASSWORD = "edge", "edge-test"

    def __init__(self, workdir: Path, ae_title: str = "ORTHANC", modalities: dict[str, dict[str, Any]] | None = None,
                 lua: str | None = None) -> None:
        self.workdir = workdir
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.storage = workdir / "storage"
        self.config_path = workdir / "orthanc.json"
        self.log_path = workdir / "orthanc.log"
        self.process: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(exist_ok=True)
        scripts: list[str] = []
        if lua is not None:
            script = workdir / "script.lua"
            script.write_text(lua)
            scripts.append(str(script))
        config = {
            "Name": f"TEST_{ae_title}",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "StorageCompression": False,
            "Plugins": [],
            "LuaScripts": scripts,
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.USER: self.PASSWORD},
            "DicomServerEnabled": True,
            "DicomAet": ae_title,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": False,
            "DicomScpTimeout": 30,
            "DicomScuTimeout": 10,
            "DicomThreadsCount": 4,
            "DicomModalities": {
                name: [m["AET"], m.get("Host", "127.0.0.1"), m["Port"]] for name, m in (modalities or {}).items()
            },
            "SaveJobs": False,
            "StableAge": 1,
            "OverwriteInstances": True,
            "SyncStorageArea": True,
            "WebDavEnabled": False,
            "HttpThreadsCount": 10,
            "DeidentifyLogs": False,
        }
        self.config_path.write_text(json.dumps(config, indent=2))

    # -- process --

    def start(self, timeout: float = 30) -> Orthanc:
        """Start and wait until both the REST API and the DICOM port answer. A missing binary
        or a start-up failure is a test failure, never a skip."""
        binary = require_tool("Orthanc")
        log = open(self.workdir / "orthanc.stdout", "ab")
        self.process = subprocess.Popen(
            [binary, f"--logfile={self.log_path}", str(self.config_path)],
            env={**os.environ, "TCP_NODELAY": "1"}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                self.get("/system")
                break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Orthanc did not answer within {timeout} s:\n{self.log_tail()}") from None
                time.sleep(0.1)
        wait_for_port(self.dicom_port, timeout=max(1.0, deadline - time.monotonic()), process=self.process)
        return self

    def stop(self) -> None:
        """SIGTERM, then wait for the pid to exit."""
        _stop_process(self.process)

    def kill(self) -> None:
        _stop_process(self.process, signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        text = ""
        for path in (self.log_path, self.workdir / "orthanc.stdout"):
            if path.exists():
                text += "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) + "\n"
        return text

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- REST API --

    def request(self, method: str, path: str, body: bytes | str | None = None) -> bytes:
        data = body.encode() if isinstance(body, str) else body
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=data, method=method)
        token = base64.b64encode(f"{self.USER}:{self.PASSWORD}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as response:
            return bytes(response.read())

    def get(self, path: str) -> Any:
        return json.loads(self.request("GET", path))

    def count(self) -> int:
        """How many instances Orthanc stores (``/statistics``)."""
        return int(self.get("/statistics")["CountInstances"])

    def lookup(self, sop_instance_uid: str) -> str | None:
        """Orthanc's id of the instance with this SOP Instance UID, or None."""
        found = json.loads(self.request("POST", "/tools/lookup", sop_instance_uid))
        return next((item["ID"] for item in found if item["Type"] == "Instance"), None)

    def _id(self, sop_instance_uid: str) -> str:
        orthanc_id = self.lookup(sop_instance_uid)
        assert orthanc_id, f"{sop_instance_uid} is not in Orthanc"
        return orthanc_id

    def tags(self, sop_instance_uid: str) -> dict[str, Any]:
        """The stored instance's tags by keyword (``/instances/<id>/simplified-tags``)."""
        return dict(self.get(f"/instances/{self._id(sop_instance_uid)}/simplified-tags"))

    def transfer_syntax(self, sop_instance_uid: str) -> str:
        return self.request("GET", f"/instances/{self._id(sop_instance_uid)}/metadata/TransferSyntax").decode()

    def dataset(self, sop_instance_uid: str) -> Dataset:
        """The stored file, read back with pydicom."""
        import io

        return pydicom.dcmread(io.BytesIO(self.request("GET", f"/instances/{self._id(sop_instance_uid)}/file")))

    def sop_instance_uids(self) -> set[str]:
        """Every SOP Instance UID Orthanc stores."""
        instances = self.get("/instances?expand")
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in instances}


# ---- DCMTK storescp -------------------------------------------------------------------------------

class StoreSCP:
    """DCMTK's ``storescp`` accepting every transfer syntax (``+xa``) into ``out``.

    ``unique=True`` (``+uf``) writes each reception to its own file, so a SOP instance stored
    twice is two files; ``flags`` adds fault options such as ``--refuse`` or ``--abort-after``.
    """

    def __init__(self, out: Path, ae_title: str = "STORESCP", unique: bool = False,
                 flags: Iterable[str] = (), port: int | None = None) -> None:
        self.out = out
        self.ae_title = ae_title
        self.unique = unique
        self.flags = list(flags)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = out.parent / f"{out.name}.storescp.log"

    def start(self) -> StoreSCP:
        require_tool("storescp")
        self.out.mkdir(parents=True, exist_ok=True)
        cmd = ["storescp", "-aet", self.ae_title, "-od", str(self.out), "+xa", "-fe", ".dcm",
               *(["+uf"] if self.unique else []), *self.flags, str(self.port)]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, env=DCMTK_ENV, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
        log.close()
        wait_for_port(self.port, process=self.process)
        return self

    def stop(self) -> None:
        _stop_process(self.process)

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def files(self) -> list[Path]:
        return sorted(self.out.glob("*.dcm")) if self.out.exists() else []

    def receptions(self) -> Counter[str]:
        """How many times each SOP Instance UID was received (files that are still being
        written are not counted yet)."""
        counts: Counter[str] = Counter()
        for path in self.files():
            try:
                counts[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] += 1
            except Exception:  # noqa: BLE001 - a file storescp is still writing
                continue
        return counts

    def datasets(self) -> dict[str, Dataset]:
        return {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in self.files())}


# ---- a recording, fault-injecting pynetdicom SCP --------------------------------------------------

@dataclass(frozen=True)
class Reception:
    """One C-STORE as the SCP saw it, and what it answered."""

    association: int  # 1, 2, ... in order of the associations' first C-STORE
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    status: int
    at: float  # time.time() when the request arrived
    calling_ae: str
    dataset: Dataset | None

    @property
    def stored(self) -> bool:
        return self.status in SUCCESS_STATUSES


#: The storage classes of the test corpus; a lean list keeps association set-up cheap.
CORPUS_SOP_CLASSES = (CT, MR, US, CR, DX, MG, SC)


class _ServedSCP:
    """What the pynetdicom SCPs here share: :meth:`start` serves on ``self.port`` (in
    ``self._server``), :meth:`stop` shuts it down; usable as a context manager."""

    _server: Any = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RecordingSCP(_ServedSCP):
    """A Storage SCP in this process, on a free port, recording every C-STORE.

    Faults, switchable while it runs:
      * ``status``: what to answer (``0xA900``, ``0xA700``, ``0xB000``...); or ``respond``, a
        function ``(sop_instance_uid, nth_time_seen) -> status`` that overrides it (``ABORT``:
        abort the association instead);
      * ``delay``: seconds to wait before answering each C-STORE;
      * ``transfer_syntaxes`` (at construction): the only syntaxes it accepts;
      * ``max_associations`` (at construction): more at once are rejected (transient, local limit).
    """

    def __init__(self, ae_title: str = "RECORDER", transfer_syntaxes: Iterable[str] = ALL_TRANSFER_SYNTAXES,
                 sop_classes: Iterable[str] = CORPUS_SOP_CLASSES, status: int = 0x0000, delay: float = 0.0,
                 keep_datasets: bool = True, port: int | None = None, max_associations: int = 20) -> None:
        self.ae_title = ae_title
        self.max_associations = max_associations
        self.port = port or free_port()
        self.transfer_syntaxes = list(transfer_syntaxes)
        self.sop_classes = list(sop_classes)
        self.status = status
        self.respond: Callable[[str, int], int] | None = None
        self.delay = delay
        self.keep_datasets = keep_datasets
        self.aborts = 0
        #: The most associations seen in the middle of a C-STORE at the same moment.
        self.max_concurrent = 0
        self._active = 0
        self._lock = threading.Lock()
        self._receptions: list[Reception] = []
        self._associations: dict[object, int] = {}
        self._seen: Counter[str] = Counter()
        self._server: Any = None

    def start(self) -> RecordingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        ae.maximum_associations = self.max_associations  # beyond it: rejected (transient)
        ae.network_timeout = 30
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, self.transfer_syntaxes)
        ae.add_supported_context(Verification)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ABORTED, self._on_abort)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def _on_abort(self, event: evt.Event) -> None:
        with self._lock:
            self.aborts += 1

    def _on_store(self, event: evt.Event) -> int:
        at = time.time()
        uid = str(event.request.AffectedSOPInstanceUID)
        with self._lock:
            association = self._associations.setdefault(event.assoc, len(self._associations) + 1)
            self._seen[uid] += 1
            nth = self._seen[uid]
            self._active += 1
            self.max_concurrent = max(self.max_concurrent, self._active)
        try:
            dataset: Dataset | None = None
            if self.keep_datasets:
                dataset = event.dataset
                dataset.file_meta = event.file_meta
            if self.delay:
                time.sleep(self.delay)
            status = self.respond(uid, nth) if self.respond is not None else self.status
        finally:
            with self._lock:
                self._active -= 1
        if status == ABORT:
            event.assoc.abort()
            return 0xC000  # never sent: the association is gone
        reception = Reception(association, uid, str(event.request.AffectedSOPClassUID),
                              str(event.context.transfer_syntax), int(status), at,
                              event.assoc.requestor.ae_title, dataset)
        with self._lock:
            self._receptions.append(reception)
        return int(status)

    # -- what was received --

    def receptions(self) -> list[Reception]:
        """Every C-STORE, in the order the answers were decided."""
        with self._lock:
            return list(self._receptions)

    def stored(self) -> list[Reception]:
        """The C-STOREs answered with success or a warning."""
        return [r for r in self.receptions() if r.stored]

    def stored_uids(self) -> Counter[str]:
        return Counter(r.sop_instance_uid for r in self.stored())

    def clear(self) -> None:
        with self._lock:
            self._receptions.clear()
            self._seen.clear()


class ReadingSCP(_ServedSCP):
    """A pynetdicom Storage SCP for CT in Explicit VR Little Endian, with 16 KB PDUs, that
    counts the bytes of every complete PDU it reads (``received``) and records each stored SOP
    Instance UID with that count at the moment (``stored``). ``on_data(received)`` runs in the
    association's own thread as each PDU is read: a handler that blocks stops the reading, as a
    PACS whose storage hangs would."""

    def __init__(self, ae_title: str = "RECORDER", on_data: Callable[[int], None] | None = None) -> None:
        self.ae_title = ae_title
        self.on_data = on_data
        self.port = free_port()
        self.received = 0
        self.stored: list[tuple[str, int]] = []

    def start(self) -> ReadingSCP:
        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 16384
        ae.add_supported_context(CT, pydicom.uid.ExplicitVRLittleEndian)
        handlers = [(evt.EVT_DATA_RECV, self._on_data), (evt.EVT_C_STORE, self._on_store)]
        self._server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def _on_data(self, event: evt.Event) -> None:
        self.received += len(event.data)
        if self.on_data is not None:
            self.on_data(self.received)

    def _on_store(self, event: evt.Event) -> int:
        self.stored.append((str(event.request.AffectedSOPInstanceUID), self.received))
        return 0x0000


class Blackhole:
    """A port that accepts TCP connections and never answers: a PACS that hangs."""

    def __init__(self) -> None:
        self.port = free_port()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", self.port))
        self._sock.listen(64)
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def start(self) -> Blackhole:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self._held:
            conn.close()
        self._sock.close()

    def __enter__(self) -> Blackhole:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def closed_port() -> int:
    """A port nothing listens on: connections are refused (a PACS that is down)."""
    return free_port()


# ---- the appliance's forwarding state, as an operator reads it -------------------------------------

def destination(ae_title: str, port: int, **overrides: Any) -> dict[str, Any]:
    """A destination entry with the short timeouts and backoff the tests need."""
    entry: dict[str, Any] = {
        "ae_title": ae_title, "host": "127.0.0.1", "port": port, "max_associations": 1,
        "retry": {"initial_delay": "1s", "max_delay": "3s", "jitter": 0.1},
        "timeouts": {"connect": "3s", "acse": "5s", "dimse": "10s", "network": "10s"},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(entry.get(key), dict):
            entry[key] = {**entry[key], **value}
        else:
            entry[key] = value
    return entry


def queue(box: ApplianceProcess) -> dict[str, Any]:
    """``appliance queue --json``."""
    proc = box.cli("queue", "--json")
    return dict(json.loads(proc.stdout))


def queue_of(box: ApplianceProcess, name: str) -> dict[str, Any]:
    """The ``appliance queue --json`` entry of one destination."""
    for entry in queue(box)["destinations"]:
        if entry["name"] == name:
            return dict(entry)
    raise AssertionError(f"destination {name!r} is not in `appliance queue --json`")


def _db(box: ApplianceProcess) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{box.data / 'appliance.db'}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def cache_rows(box: ApplianceProcess) -> dict[str, sqlite3.Row]:
    """The cache index (``instances``) by SOP Instance UID, read-only."""
    conn = _db(box)
    try:
        return {r["sop_instance_uid"]: r for r in conn.execute("SELECT * FROM instances")}
    finally:
        conn.close()


def deliveries(box: ApplianceProcess, name: str | None = None) -> dict[str, sqlite3.Row]:
    """Delivery rows by SOP Instance UID (of one destination, or all when each instance has one)."""
    sql = ("SELECT d.*, i.sop_instance_uid FROM deliveries d JOIN instances i ON i.id = d.instance_id"
           + (" WHERE d.destination = ?" if name else ""))
    conn = _db(box)
    try:
        return {r["sop_instance_uid"]: r for r in conn.execute(sql, (name,) if name else ())}
    finally:
        conn.close()


def attempts(box: ApplianceProcess, name: str) -> dict[str, list[sqlite3.Row]]:
    """The recorded attempts per SOP Instance UID to one destination, oldest first."""
    conn = _db(box)
    try:
        rows = conn.execute(
            "SELECT a.*, i.sop_instance_uid FROM attempts a JOIN deliveries d ON d.id = a.delivery_id"
            " JOIN instances i ON i.id = d.instance_id WHERE d.destination = ? ORDER BY a.at, a.id", (name,))
        result: dict[str, list[sqlite3.Row]] = {}
        for row in rows:
            result.setdefault(row["sop_instance_uid"], []).append(row)
        return result
    finally:
        conn.close()


def as_status(value: object) -> int | None:
    """A status as the database records it (an integer, or text such as ``0xA900``/``A900``)."""
    if value is None or value == "":
        return None
    if isinstance(value, int):
        return value
    text = str(value).strip()
    return int(text, 16) if not text.lower().startswith("0x") else int(text, 0)


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
