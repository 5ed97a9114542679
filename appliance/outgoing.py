"""What goes on the wire for one delivery, when it cannot be the cached file itself.

* :func:`edited_copy`: the rule's tag edits applied to the header, written beside the cache,
  with everything from the pixel data on copied byte for byte — so a 500 MB instance with an
  edited InstitutionName is streamed, never loaded, and its pixel data is never re-encoded.
* :func:`decoded`: the instance decompressed to Explicit VR Little Endian (and edited), for a
  destination that accepts no compressed transfer syntax. Decoding needs the pixels in memory.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

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
