"""What goes on the wire for one delivery, when it cannot be the cached file itself.

* :func:`edited_copy`: the rule's tag edits applied to the header, written beside the cache,
  with everything from the pixel data on copied byte for byte — so a 500 MB instance with an
  edited InstitutionName is streamed, never loaded, and its pixel data is never re-encoded.
* :func:`decoded_copy`: the instance decompressed (and edited), for a destination that accepts
  no compressed transfer syntax, written beside the cache one frame at a time — an ultrasound cine
  loop decodes to gigabytes, and memory holds one frame of it.
* :func:`decoded`: an uncompressed instance re-encoded in memory, for a destination that takes
  another uncompressed transfer syntax (rare).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from . import rules


def edited_copy(source: Path, edits: Sequence[rules.TagEdit], directory: Path) -> Path:
    """A new file in ``directory``: ``source`` with ``edits`` applied. The caller removes it."""
    fd, temp = tempfile.mkstemp(dir=directory, suffix=".dcm")
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            header = pydicom.dcmread(src, stop_before_pixels=True)
            if header.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
                # The whole data set is one deflate stream: there is no tail to copy as is.
                whole = pydicom.dcmread(source)
                rules.apply_edits(whole, edits)
                whole.save_as(out, enforce_file_format=True)
                return Path(temp)
            tail = src.tell()  # pydicom stops with the file at the pixel data's tag
            rules.apply_edits(header, edits)
            header.save_as(out, enforce_file_format=True)
            src.seek(tail)
            shutil.copyfileobj(src, out, 1 << 20)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def decoded_copy(source: Path, edits: Sequence[rules.TagEdit], syntax: UID, directory: Path) -> Path:
    """A new file in ``directory``: the compressed instance ``source`` decoded into ``syntax``
    (Explicit or Implicit VR Little Endian) with ``edits`` applied. The caller removes it.

    What pydicom's ``Dataset.decompress()`` makes of it (the same pixel bytes, photometric
    interpretation and planar configuration; the SOP Instance UID kept), but streamed: the
    header is written, then each frame as it is decoded (``iter_pixels`` reads the file frame by
    frame), then the pixel data's length. Elements after the pixel data (trailing padding) are
    not copied."""
    fd, temp = tempfile.mkstemp(dir=directory, suffix=".dcm")
    try:
        with os.fdopen(fd, "w+b") as out:
            header = pydicom.dcmread(source, stop_before_pixels=True)
            frames_expected = int(header.get("NumberOfFrames", 1) or 1)
            if int(header.get("SamplesPerPixel", 1)) > 1:
                # Decoded as pydicom decodes by default: YCbCr converted to RGB, samples interleaved.
                if str(header.PhotometricInterpretation).startswith("YBR"):
                    header.PhotometricInterpretation = "RGB"
                header.PlanarConfiguration = 0
            header.file_meta.TransferSyntaxUID = syntax
            rules.apply_edits(header, edits)
            header.save_as(out, enforce_file_format=True)
            out.write(struct.pack("<HH", 0x7FE0, 0x0010))
            if not syntax.is_implicit_VR:
                out.write(b"OB\0\0" if int(header.BitsAllocated) <= 8 else b"OW\0\0")
            length_at = out.tell()
            out.write(b"\0\0\0\0")
            length = frames = 0
            for frame in iter_pixels(source):
                data = frame.astype(frame.dtype.newbyteorder("<"), copy=False).tobytes()
                out.write(data)
                length += len(data)
                frames += 1
            if frames != frames_expected:
                raise ValueError(f"decoded {frames} frame(s), the data set says {frames_expected}")
            if length % 2:
                out.write(b"\0")
                length += 1
            if length >= 2**32 - 1:  # PS3.5 7.1.1: a 32-bit length, 0xFFFFFFFF meaning undefined
                raise ValueError(f"decoded, its pixel data would be {length} bytes: more than DICOM allows")
            out.seek(length_at)
            out.write(struct.pack("<I", length))
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def decoded(source: Path, edits: Sequence[rules.TagEdit]) -> tuple[Dataset, bool]:
    """The instance in an uncompressed transfer syntax, edited; and whether it was decompressed."""
    dataset = pydicom.dcmread(source)
    decompressed = dataset.file_meta.TransferSyntaxUID.is_compressed
    if decompressed:
        # To Explicit VR Little Endian (pylibjpeg/pyjpegls decoders). The same instance, only
        # decoded: it keeps its SOP Instance UID (pydicom would otherwise mint a new one).
        dataset.decompress(generate_instance_uid=False)
    rules.apply_edits(dataset, edits)
    return dataset, decompressed
