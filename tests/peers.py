"""Real peers for the tests: the appliance as a separate process, and DCMTK's tools.

Everything listens on 127.0.0.1 on free ports. DCMTK tools run with TCP_NODELAY=1: without it
every C-STORE waits ~40 ms on Nagle and delayed ACKs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    """The path of a peer's executable; a missing peer is a failure, never a silent skip."""
    path = shutil.which(name)
    assert path, f"{name} is not installed: `make test` installs the Debian packages the tests need"
    return path


def build_preload_library(source: Path, library: Path, *libraries: str) -> Path:
    """Compile a test's LD_PRELOAD fault injector (``tests/wallclock``, ``tests/resolver``) with
    the C compiler the setup installs; ``libraries`` are linker flags such as ``-ldl``."""
    subprocess.run([require_tool("gcc"), "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", str(library),
                    str(source), *libraries], check=True, capture_output=True)
    return library


def answer_each_connection(server: socket.socket, reply: bytes, linger: float = 0.0) -> None:
    """A peer that speaks the wrong thing: every connection to ``server`` (bound) gets ``reply``
    once it has sent something, and is closed ``linger`` seconds later. Runs in a thread until
    ``server`` is closed."""
    server.listen(5)

    def serve() -> None:
        try:
            while True:
                conn, _ = server.accept()
                with conn:
                    conn.recv(65536)
                    conn.sendall(reply)
                    time.sleep(linger)
        except OSError:  # the server socket was closed: the test is over
            pass

    threading.Thread(target=serve, daemon=True).start()


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


class NotifySocket:
    """systemd's end of sd_notify, for an appliance started by a test: a datagram socket in the
    abstract namespace, given to the appliance as NOTIFY_SOCKET."""

    _count = 0

    def __init__(self) -> None:
        NotifySocket._count += 1
        self.address = f"@appliance-test-{os.getpid()}-{NotifySocket._count}"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._socket.bind("\0" + self.address[1:])
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float, process: subprocess.Popen[bytes] | None = None) -> None:
        """Until a notification holds ``line`` (``READY=1``)."""
        deadline = time.monotonic() + timeout
        while not any(line in message.splitlines() for message in self.messages):
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"process exited with {process.returncode} before notifying {line}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {line} from the appliance after {timeout} s; got {self.messages}")
            self._socket.settimeout(min(remaining, 0.5))
            try:
                self.messages.append(self._socket.recv(4096).decode())
            except TimeoutError:
                pass

    def close(self) -> None:
        self._socket.close()


@dataclass
class StoreResult:
    """What DCMTK's storescu reported: which files it saw acknowledged with success."""

    returncode: int
    output: str
    succeeded: list[Path] = field(default_factory=list)
    failed: list[Path] = field(default_factory=list)


def storescu(port: int, files: list[Path], aec: str = "EDGE", aet: str = "MODALITY", extra: list[str] | None = None,
             timeout: float = 600) -> StoreResult:
    """Send files on one association with DCMTK's storescu, -v to learn each file's outcome."""
    require_tool("storescu")
    cmd = ["storescu", "-v", "-nh", "-aet", aet, "-aec", aec, *(extra or []), "127.0.0.1", str(port),
           *map(str, files)]
    proc = subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=timeout)
    return parse_storescu(proc.returncode, proc.stdout + proc.stderr)


_SENDING = re.compile(r"^I: Sending file: (.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+)\)$")


def parse_storescu(returncode: int, output: str) -> StoreResult:
    result = StoreResult(returncode, output)
    current: Path | None = None
    for line in output.splitlines():
        if m := _SENDING.match(line):
            current = Path(m.group(1))
        elif (m := _RESPONSE.match(line)) and current is not None:
            (result.succeeded if m.group(1) == "Success" else result.failed).append(current)
            current = None
    return result


def read_until_acknowledged(sender: subprocess.Popen[str], count: int) -> str:
    """Read a running ``storescu -v``'s output until it has seen ``count`` successful responses
    (or it ended); returns what was read. Lets a test act at a chosen point of a stream,
    however fast the receiver is."""
    assert sender.stdout is not None
    seen: list[str] = []
    acknowledged = 0
    for line in sender.stdout:
        seen.append(line)
        if line.rstrip("\n") == "I: Received Store Response (Success)":
            acknowledged += 1
            if acknowledged >= count:
                break
    return "".join(seen)


class ApplianceProcess:
    """``python -m appliance run`` with a generated configuration, as a modality would see it."""

    def __init__(self, workdir: Path, config: dict | None = None, ae_title: str = "EDGE",
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.env = env or {}  # added to the process's environment
        self.port = free_port()
        self.ae_title = ae_title
        self.data = workdir / "data"
        self.config_path = workdir / "appliance.yaml"
        self.log_path = workdir / "appliance.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.notify: NotifySocket | None = None
        base: dict = {
            "node": {"ae_title": ae_title, "bind_address": "127.0.0.1", "port": self.port},
            "storage": {"path": str(self.data), "disk": {"min_free": "0%"}},
            "web": {"enabled": False},
        }
        for section, values in (config or {}).items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section] = {**base[section], **values}
            else:
                base[section] = values
        self.data = Path(base["storage"]["path"])
        self.write_config(base)

    def write_config(self, config: dict) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self, wait: bool = True) -> ApplianceProcess:
        """Start it; with ``wait``, until it told systemd it is ready (READY=1: the receiver
        listens and the forwarder runs), as a box that has been up a while would be."""
        log = open(self.log_path, "ab")
        if self.notify is not None:
            self.notify.close()
        self.notify = NotifySocket()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "--config", str(self.config_path)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env, "NOTIFY_SOCKET": self.notify.address},
        )
        log.close()
        if wait:
            wait_for_port(self.port, process=self.process)
            self.notify.wait_for("READY=1", 60, self.process)
        return self

    def kill(self) -> None:
        """SIGKILL: the power cut of a test."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)

    def reload(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run an ``appliance`` subcommand against this appliance's configuration."""
        proc = subprocess.run(
            [sys.executable, "-m", "appliance", *args, "--config", str(self.config_path)],
            cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, **self.env},
        )
        if check:
            assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc
