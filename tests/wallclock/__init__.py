"""Step the wall clock of the appliance under test, as NTP's first answer (a box without a
battery-backed clock) or an admin's ``date -s`` steps a real box's, without touching the
machine's clock: an LD_PRELOAD library (``shift.c``), built here with the C compiler that the
setup installs. The monotonic and boot-time clocks stay as they are, as they do in a real step."""

from __future__ import annotations

import os
from pathlib import Path

from ..peers import build_preload_library

SOURCE = Path(__file__).with_name("shift.c")


class WallClock:
    """A step file and the environment that makes a process (and its children) read it."""

    def __init__(self, workdir: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.library = build_preload_library(SOURCE, workdir / "wallclock-shift.so", "-ldl", "-lpthread")
        self.file = workdir / "wallclock-shift"
        self.shift = 0.0
        self._write()

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(self.library), "WALLCLOCK_SHIFT_FILE": str(self.file)}

    def step(self, seconds: float) -> None:
        """Step the clock by ``seconds`` (negative: back); processes see it within 50 ms."""
        self.shift += seconds
        self._write()

    def _write(self) -> None:
        temp = self.file.with_suffix(".new")
        temp.write_text(f"{self.shift:.3f}\n")
        os.replace(temp, self.file)
