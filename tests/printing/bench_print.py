"""Print benchmarks, each run in a fresh process so its peak RSS is its own.

    python -m tests.printing.bench_print render  --film 14INX17IN --rows 3000 --cols 2500
    python -m tests.printing.bench_print network --film 17INX17IN --rows 5440 --cols 5440

``render`` times turning one film box (already received) into its PostScript; ``network``
runs the whole path in this process as the Print SCP (association, N-SET of the image, N-ACTION,
render, spool, directory printer) with the SCU in a child process. Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import MappingProxyType

import numpy as np


def synthetic_radiograph(rows: int, columns: int, bits: int = 12, seed: int = 7) -> np.ndarray:
    """A CR/DX-like image: collimated background, smooth 'anatomy', a little quantum noise.
    Made a block of rows at a time so the benchmark's peak memory is the image, not its maths."""
    rng = np.random.default_rng(seed)
    top = (1 << bits) - 1
    out = np.empty((rows, columns), dtype=np.uint16)
    x = np.linspace(-1.0, 1.0, columns, dtype=np.float32)[None, :]
    for start in range(0, rows, 256):
        y = np.linspace(-1.0, 1.0, rows, dtype=np.float32)[start : start + 256, None]
        body = np.exp(-((x / 0.55) ** 2 + (y / 0.8) ** 2) * 1.5)
        block = 0.08 * top + 0.55 * top * body
        block += 0.2 * top * np.exp(-((x - 0.15) ** 2 + (y + 0.2) ** 2) / 0.02)  # a dense structure
        block += 0.05 * top * np.sin(8 * np.pi * y) * body  # ribs-like modulation
        block += rng.normal(0.0, top * 0.003, size=block.shape).astype(np.float32)
        collimated = (np.abs(x) > 0.9) | (np.abs(y) > 0.92)
        block[np.broadcast_to(collimated, block.shape)] = 0.97 * top
        out[start : start + 256] = np.clip(block, 0, top)
    return out


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_render(film: str, rows: int, columns: int, compression: str) -> dict[str, object]:
    from pydicom.dataset import Dataset

    from appliance.printing.model import PrintAssociation
    from appliance.printing.render import render_postscript
    from appliance.printing.settings import PrinterConfig

    from .scu import gray_item

    pixels = synthetic_radiograph(rows, columns)
    printer = PrinterConfig(ae_title="BENCH", backend="directory", directory="/tmp", compression=compression)
    state = PrintAssociation("bench", printer, "BENCHSCU", annotations=False)
    state.create_film_session(None, Dataset())
    assert state.session is not None
    attrs = Dataset()
    attrs.ImageDisplayFormat = r"STANDARD\1,1"
    attrs.FilmSizeID = film
    ref = Dataset()
    ref.ReferencedSOPInstanceUID = state.session.uid
    attrs.ReferencedFilmSessionSequence = [ref]
    _, film_box = state.create_film_box(None, attrs, color=False)
    box_uid = film_box.ReferencedImageBoxSequence[0].ReferencedSOPInstanceUID
    image = Dataset()
    image.ImageBoxPosition = 1
    image.BasicGrayscaleImageSequence = [gray_item(pixels, bits_stored=12)]
    raw_bytes = pixels.nbytes
    del pixels
    state.set_image_box("1.2.840.10008.5.1.1.4", box_uid, image)
    del image
    _, request = state.print_film_box(film_box.AffectedSOPInstanceUID)
    assert request is not None
    before = _peak_rss_mb()
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "film.ps"
        started = time.perf_counter()
        with out.open("wb") as handle:
            render_postscript(request, printer, handle, "bench")
        seconds = time.perf_counter() - started
        size = out.stat().st_size
    return {
        "bench": "render", "film": film, "image": f"{columns}x{rows} 12-bit", "compression": compression,
        "seconds": round(seconds, 3), "peak_rss_mb": round(_peak_rss_mb(), 1),
        "rss_before_render_mb": round(before, 1), "raw_bytes": raw_bytes, "ps_bytes": size,
        "ps_over_raw": round(size / raw_bytes, 3),
    }


def _scu(port: int, film: str, rows: int, columns: int, result: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    from .scu import PrintSCU, gray_item

    pixels = synthetic_radiograph(rows, columns)
    item = gray_item(pixels, bits_stored=12)
    del pixels
    started = time.perf_counter()
    with PrintSCU(port, "BENCH") as scu:
        scu.create_session()
        box = scu.create_film_box(r"STANDARD\1,1", FilmSizeID=film)
        set_status = scu.set_image(box.dataset, 1, item).status
        action_status = scu.print_film_box(box.uid)
    result.put({"set": set_status, "action": action_status, "seconds": time.perf_counter() - started})


def bench_network(film: str, rows: int, columns: int, compression: str) -> dict[str, object]:
    from appliance.db import list_print_jobs
    from appliance.printing.service import PrintService
    from appliance.printing.settings import PrintConfig, PrinterConfig

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        printer = PrinterConfig(ae_title="BENCH", backend="directory", directory=str(root / "out"),
                                compression=compression)
        config = PrintConfig(enabled=True, bind_address="127.0.0.1", printers=MappingProxyType({"bench": printer}))
        service = PrintService(config, root, port=0)
        service.start()
        try:
            queue: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()  # type: ignore[type-arg]
            child = multiprocessing.get_context("spawn").Process(
                target=_scu, args=(service.port, film, rows, columns, queue)
            )
            child.start()
            scu = queue.get(timeout=600)
            child.join(60)
            assert service.db is not None
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                jobs = list_print_jobs(service.db)
                if jobs and jobs[0].state in ("printed", "failed"):
                    break
                time.sleep(0.1)
            job = jobs[0]
        finally:
            service.stop()
    return {
        "bench": "network", "film": film, "image": f"{columns}x{rows} 12-bit", "compression": compression,
        "n_set_status": scu["set"], "n_action_status": scu["action"], "job_state": job.state,
        "scu_seconds": round(scu["seconds"], 2), "scp_peak_rss_mb": round(_peak_rss_mb(), 1),
        "raw_bytes": rows * columns * 2, "ps_bytes": job.ps_size,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["render", "network"])
    parser.add_argument("--film", default="14INX17IN")
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--cols", type=int, default=2500)
    parser.add_argument("--compression", choices=["flate", "dct"], default="flate")
    args = parser.parse_args(argv)
    bench = bench_render if args.mode == "render" else bench_network
    print(json.dumps(bench(args.film, args.rows, args.cols, args.compression)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
