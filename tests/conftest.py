"""Shared fixtures: a deterministic corpus, and appliances run as real processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .corpus import mixed_corpus
from .peers import ApplianceProcess


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    return mixed_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def appliance_factory(tmp_path: Path) -> Iterator[Callable[..., ApplianceProcess]]:
    """Make (and finally stop) appliances: ``appliance_factory(config_overrides)``."""
    made: list[ApplianceProcess] = []

    def make(config: dict | None = None, name: str = "box", start: bool = True,
             env: dict[str, str] | None = None) -> ApplianceProcess:
        box = ApplianceProcess(tmp_path / name, config, env=env)
        made.append(box)
        return box.start() if start else box

    yield make
    for box in made:
        box.stop()


@contextmanager
def mounted_tmpfs(mount: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -o size=``) on the existing directory ``mount``, so that a
    full disk is real and nobody else's; unmounted on exit."""
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@contextmanager
def tmpfs_dir(parent: Path, name: str, size: str) -> Iterator[Path]:
    """A new directory ``parent/name`` that is a filesystem of its own, of ``size`` (tmpfs)."""
    mount = parent / name
    mount.mkdir()
    with mounted_tmpfs(mount, size):
        yield mount


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MB filesystem of its own (tmpfs)."""
    with tmpfs_dir(tmp_path, "small", "64m") as mount:
        yield mount
