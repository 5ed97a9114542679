"""What the receive benchmark sends: 500 CT-sized instances, and one ~500 MB instance.

The CT series comes from the shared deterministic corpus. The large instance is a multi-frame
16-bit secondary capture written frame by frame: the header with pydicom, then the Pixel Data
element's header and value appended by hand, so generating it never holds more than one frame
(8 MB) in memory.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ..corpus import Series, write_series

MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


def ct_series(out: Path, count: int = 500) -> list[Path]:
    """``count`` CT instances, 512×512×16 bit (525,632 bytes each), one study and series."""
    return write_series(out, "receive-bench", 1, 1, Series("CT", count, 512, 512))


def write_large_instance(path: Path, frames: int = 60, rows: int = 2048, columns: int = 2048) -> Path:
    """One multi-frame instance of ``frames × rows × columns × 2`` bytes of pixels (60 frames of
    2048² ≈ 503 MB): zeros with seeded noise in a band of every frame, Explicit VR Little Endian."""
    uid = generate_uid(entropy_srcs=["receive-bench", "large", str(frames), str(rows), str(columns)])
    ds = Dataset()
    ds.SOPClassUID = MULTIFRAME_WORD_SC
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[uid, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[uid, "series"])
    ds.PatientName = "TEST^LARGE"
    ds.PatientID = "LARGE001"
    ds.StudyDate = "20261125"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    frame_bytes = rows * columns * 2
    rng = np.random.default_rng(20261125)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        ds.save_as(f, enforce_file_format=True)
        # (7FE0,0010) OW, explicit VR little endian: tag, VR, two reserved bytes, 32-bit length.
        f.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", frames * frame_bytes))
        frame = np.zeros((rows, columns), dtype=np.uint16)
        band = slice(rows // 4, rows // 2)
        for _ in range(frames):
            frame[band] = rng.integers(0, 4096, (band.stop - band.start, columns), dtype=np.uint16)
            f.write(frame.tobytes())
    return path
