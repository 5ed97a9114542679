"""``make bench`` for printing: the targets of the print SCP, measured in fresh processes.

* a 14"x17" film with one 2500x3000 12-bit image renders in <= 2 s with peak RSS <= 150 MB, and
  its PostScript is <= 1/3 of the raw pixel size;
* the worst case, a 17"x17" film at 320 dpi (5440x5440, 59 MB of 12-in-16-bit pixels), goes the
  whole way (association, N-SET, N-ACTION, render, spool, printer) in a bounded amount of memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[2]
# The worst case may use this much memory in the SCP process: well inside a 1 GB Raspberry Pi.
WORST_CASE_RSS_MB = 400


def run_bench(*args: str) -> dict[str, object]:
    done = subprocess.run([sys.executable, "-m", "tests.printing.bench_print", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    print("\nBENCH", json.dumps(result))
    return result


@pytest.mark.parametrize("compression", ["flate", "dct"])
def test_render_14x17_with_a_2500x3000_12_bit_image(compression: str) -> None:
    result = run_bench("render", "--film", "14INX17IN", "--rows", "3000", "--cols", "2500",
                       "--compression", compression)
    assert float(result["seconds"]) <= 2.0  # type: ignore[arg-type]
    assert float(result["peak_rss_mb"]) <= 150  # type: ignore[arg-type]
    assert float(result["ps_over_raw"]) <= 1 / 3  # type: ignore[arg-type]


def test_worst_case_17x17_at_320_dpi_prints_end_to_end() -> None:
    result = run_bench("network", "--film", "17INX17IN", "--rows", "5440", "--cols", "5440")
    assert result["n_set_status"] == 0 and result["n_action_status"] == 0
    assert result["job_state"] == "printed"
    assert float(result["scp_peak_rss_mb"]) <= WORST_CASE_RSS_MB  # type: ignore[arg-type]
