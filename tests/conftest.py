"""Shared fixtures: a deterministic corpus, and appliances run as real processes."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
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

    def make(config: dict | None = None, name: str = "box", start: bool = True) -> ApplianceProcess:
        box = ApplianceProcess(tmp_path / name, config)
        made.append(box)
        return box.start() if start else box

    yield make
    for box in made:
        box.stop()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 64 MB filesystem of its own (tmpfs), so "full" is real and nobody else's."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.fail("this test mounts a tmpfs and needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)
