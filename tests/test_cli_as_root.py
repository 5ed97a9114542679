"""The ``appliance`` command run as root on a box whose service runs as its own user
(systemd's ``User=``): what it creates in the data directory must be the service's to use.
These tests need root (CI runs as root); they fail, never skip, without it."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .corpus import Series, write_series
from .pacs import closed_port, destination
from .peers import REPO, free_port


@pytest.fixture
def service_home() -> Iterator[Path]:
    """A directory the service's user (``nobody`` here) can reach, outside pytest's root-only
    temporary directory; its ``data`` belongs to that user, as systemd's StateDirectory does."""
    if os.geteuid() != 0:
        pytest.fail("this test runs the appliance command as root (CI runs as root)")
    home = Path(tempfile.mkdtemp(prefix="appliance-service-"))
    try:
        home.chmod(0o755)
        nobody = pwd.getpwnam("nobody")
        (home / "data").mkdir()
        os.chown(home / "data", nobody.pw_uid, nobody.pw_gid)
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


def appliance(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """An ``appliance`` subcommand, run as root."""
    return subprocess.run([sys.executable, "-m", "appliance", *args, "--config", str(config)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# What the service does with the data directory, as its user: the forwarder reads a cached file,
# the receiver adds one to the study's directory and records it, eviction deletes one. Debian's
# own Python runs it: this one may be installed where that user cannot read (pyenv under /root).
_SERVICE_USES = """
import pathlib, sqlite3, sys
data = pathlib.Path(sys.argv[1])
[cached] = data.glob("cache/*/*.dcm")
cached.read_bytes()
(cached.parent / "next.dcm").write_bytes(b"x")
db = sqlite3.connect(data / "appliance.db", isolation_level=None)
db.execute("BEGIN IMMEDIATE")
db.execute("UPDATE instances SET receive_count = receive_count + 1")
db.execute("COMMIT")
db.close()
cached.unlink()
"""


def test_commands_run_as_root_leave_the_data_directory_to_the_service_user(service_home: Path, tmp_path: Path
                                                                           ) -> None:
    """With the service stopped, root imports an image (from a directory only root can read),
    looks at the queue and the cache, and retries dead letters. Everything this creates in the
    data directory belongs to the service's user, which can then read the cached file, add
    one to its study's directory, write to the database and delete the file."""
    nobody = pwd.getpwnam("nobody")
    data = service_home / "data"
    config = service_home / "appliance.yaml"
    config.write_text(yaml.safe_dump({
        "node": {"ae_title": "EDGE", "bind_address": "127.0.0.1", "port": free_port()},
        "storage": {"path": str(data), "disk": {"min_free": "0%"}},
        "web": {"enabled": False},
        "destinations": {"central": destination("CENTRAL", closed_port())},
        "routes": [{"send_to": ["central"]}],
    }))
    image = write_series(tmp_path / "ct", "as-root", 1, 1, Series("CT", 1, 64, 64))[0]
    assert tmp_path.parent.parent.stat().st_mode & 0o077 == 0  # only root can read the image

    result = appliance(config, "send", str(image))
    assert "imported 1, skipped 0" in result.stdout, result.stdout + result.stderr
    for command in (["queue"], ["ls"], ["retry", "--all"], ["print-jobs"]):
        result = appliance(config, *command)
        assert result.returncode == 0, result.stdout + result.stderr
    created = [data, *sorted(data.rglob("*"))]
    assert any(p.suffix == ".dcm" for p in created), created
    wrong = [(str(p), p.stat().st_uid, p.stat().st_gid) for p in created
             if (p.stat().st_uid, p.stat().st_gid) != (nobody.pw_uid, nobody.pw_gid)]
    assert not wrong, f"not the service user's ({nobody.pw_uid}:{nobody.pw_gid}): {wrong}"

    used = subprocess.run(["/usr/bin/python3", "-c", _SERVICE_USES, str(data)], user=nobody.pw_uid,
                          group=nobody.pw_gid, extra_groups=[], capture_output=True, text=True, timeout=60)
    assert used.returncode == 0, used.stderr
