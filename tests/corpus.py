"""A deterministic DICOM corpus built with pydicom: several modalities and sizes, uncompressed
and compressed. Same seed, same UIDs and pixels, so reruns reproduce the same instances."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
US = "1.2.840.10008.5.1.4.1.1.6.1"
CR = "1.2.840.10008.5.1.4.1.1.1"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
MG = "1.2.840.10008.5.1.4.1.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"

_MODALITY_CLASS = {"CT": CT, "MR": MR, "US": US, "CR": CR, "DX": DX, "MG": MG, "OT": SC}


@dataclass(frozen=True)
class Series:
    modality: str
    count: int
    rows: int
    columns: int
    rgb: bool = False


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def make_instance(
    seed: str, study: int, series: int, number: int, spec: Series, patient: str = "PAT001"
) -> Dataset:
    """One instance with plausible identifying attributes and seeded pixels."""
    rng = np.random.default_rng(zlib.crc32(repr((seed, study, series, number)).encode()))
    ds = Dataset()
    ds.SOPClassUID = _MODALITY_CLASS[spec.modality]
    ds.SOPInstanceUID = _uid(seed, study, series, number)
    ds.StudyInstanceUID = _uid(seed, "study", study)
    ds.SeriesInstanceUID = _uid(seed, "series", study, series)
    ds.PatientName = f"TEST^{patient}"
    ds.PatientID = patient
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20261125"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{study:04d}"
    ds.StudyID = str(study)
    ds.Modality = spec.modality
    ds.SeriesNumber = series
    ds.InstanceNumber = number
    ds.InstitutionName = "Test Clinic"
    ds.Rows, ds.Columns = spec.rows, spec.columns
    if spec.rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        pixels = rng.integers(0, 256, (spec.rows, spec.columns, 3), dtype=np.uint8)
        pixels[: spec.rows // 4] = 0  # large black areas, as in real ultrasound
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        yy, xx = np.mgrid[0 : spec.rows, 0 : spec.columns]
        dy, dx = (yy - spec.rows / 2) / (spec.rows / 2.4), (xx - spec.columns / 2) / (spec.columns / 2.2)
        phantom = dy**2 + dx**2 < 1
        pixels = (phantom * 1000 + rng.normal(0, 30, (spec.rows, spec.columns)) + 24).clip(0, 4095).astype(np.uint16)
        if spec.modality == "CT":
            ds.RescaleIntercept = -1024
            ds.RescaleSlope = 1
            ds.SliceThickness = 1.0
            ds.ImagePositionPatient = [0, 0, float(number)]
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def write_series(out: Path, seed: str, study: int, series: int, spec: Series, patient: str = "PAT001") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(1, spec.count + 1):
        ds = make_instance(seed, study, series, number, spec, patient)
        path = out / f"{spec.modality}_{study}_{series}_{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def compress(src: Path, dst: Path, syntax: str) -> Path:
    """Re-encode a file in a compressed transfer syntax (pydicom + pylibjpeg/pyjpegls encoders)."""
    import pydicom

    ds = pydicom.dcmread(src)
    ds.compress(syntax)
    # A distinct instance, so the compressed copy and its source can be cached side by side.
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(ds.SOPInstanceUID, syntax)
    dst.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(dst, enforce_file_format=True)
    return dst


COMPRESSED_SYNTAXES = {"rle": RLELossless, "jpegls": JPEGLSLossless, "j2k": JPEG2000Lossless}


def mixed_corpus(out: Path, seed: str = "corpus") -> dict[str, list[Path]]:
    """Several modalities and sizes, plus the same images compressed three ways."""
    sets = {
        "ct": write_series(out / "ct", seed, 1, 1, Series("CT", 12, 512, 512)),
        "mr": write_series(out / "mr", seed, 2, 1, Series("MR", 6, 256, 256), patient="PAT002"),
        "us": write_series(out / "us", seed, 3, 1, Series("US", 4, 480, 640, rgb=True), patient="PAT003"),
        "cr": write_series(out / "cr", seed, 4, 1, Series("CR", 1, 3000, 2500), patient="PAT004"),
        "dx": write_series(out / "dx", seed, 5, 1, Series("DX", 2, 2048, 1600), patient="PAT005"),
        "mg": write_series(out / "mg", seed, 6, 1, Series("MG", 2, 2048, 1536), patient="PAT006"),
    }
    for name, syntax in COMPRESSED_SYNTAXES.items():
        sets[name] = [
            compress(p, out / name / p.name, syntax) for p in sets["ct"][:2] + sets["us"][:1]
        ]
    return sets
