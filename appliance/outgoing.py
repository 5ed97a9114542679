"""What goes on the wire for one delivery, when it cannot be the cached file itself.

Each function writes a new file beside the cache, which the forwarder sends in chunks and then
removes: memory stays flat whatever the size of the instance, even on a Raspberry Pi (but for a
Deflated source, rare, which pydicom inflates whole).

* :func:`edited_copy`: the rule's tag edits applied to the header, with everything from the pixel
  data on copied byte for byte — so a 500 MB instance with an edited InstitutionName is streamed,
  never loaded, and its pixel data is never re-encoded.
* :func:`decoded_copy`: the instance decompressed (and edited), for a destination that accepts
  no compressed transfer syntax, written one frame at a time — an ultrasound cine loop decodes to
  gigabytes, and memory holds one frame of it.
* :func:`reencoded_copy`: an uncompressed instance (and edited) in another uncompressed transfer
  syntax, for a destination that does not accept its own — typically an Explicit VR Little Endian
  CT, mammogram or breast tomosynthesis to an old PACS that takes only Implicit VR. The header is
  re-encoded by pydicom, the pixel data copied in chunks: its bytes are the same in both little
  endian syntaxes, only its element's header differs.

:func:`decoded_copy` and :func:`reencoded_copy` carry the elements after the pixel data (private
groups such as GE's (7FE1,xxxx); small, so read whole) re-encoded like the header, and drop Data
Set Trailing Padding (FFFC,FFFC): PS3.5 7.2 gives it no meaning and lets it be removed, and the
size it padded the source's encoding to means nothing in another encoding.
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pydicom
from pydicom.charset import default_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.filewriter import write_dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from . import rules

_TRAILING_PADDING = 0xFFFCFFFC
_PIXEL_DATA = 0x7FE00010
_CHUNK = 1 << 20
_UNDEFINED_LENGTH = 0xFFFFFFFF
# VRs whose values pydicom keeps as bytes though they are words in the data set's byte order,
# and the bytes per word: from a big endian source we swap them (pydicom converts numbers only).
_WORD_SIZE = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


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
            if any(edit.element.tag > _PIXEL_DATA for edit in edits):
                _edited_after_pixels(src, out, header, edits)
                return Path(temp)
            rules.apply_edits(header, edits)
            header.save_as(out, enforce_file_format=True)
            src.seek(tail)
            shutil.copyfileobj(src, out, _CHUNK)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def _edited_after_pixels(src: BinaryIO, out: BinaryIO, header: Dataset, edits: Sequence[rules.TagEdit]) -> None:
    """:func:`edited_copy` when an edit is for an element after the pixel data (a private group
    such as GE's (7FE1,xxxx)): the header written edited, the pixel data element copied byte for
    byte (its header, its value, the fragments of a compressed one), then the elements after it
    edited and re-encoded, in the file's own syntax. Data Set Trailing Padding is dropped."""
    start = src.tell()
    pixels, end = _read_past_pixels(src, header)
    rules.apply_edits(header, edits)
    after = _split_after(header, pixels) if pixels is not None else Dataset()
    header.save_as(out, enforce_file_format=True)
    if pixels is not None:
        _copy_range(src, out, start, end - start, 1)
        _write_elements(out, after, header.file_meta.TransferSyntaxUID, header)


def decoded_copy(source: Path, edits: Sequence[rules.TagEdit], syntax: UID, directory: Path) -> Path:
    """A new file in ``directory``: the compressed instance ``source`` decoded into ``syntax``
    (Explicit or Implicit VR Little Endian) with ``edits`` applied. The caller removes it.

    What pydicom's ``Dataset.decompress()`` makes of it (the same pixel bytes, photometric
    interpretation and planar configuration; the SOP Instance UID kept), but streamed: the
    header is written, then each frame as it is decoded (``iter_pixels`` reads the file frame by
    frame), then the pixel data's length, then the elements after the pixel data (Data Set
    Trailing Padding dropped)."""
    fd, temp = tempfile.mkstemp(dir=directory, suffix=".dcm")
    try:
        with open(source, "rb") as src, os.fdopen(fd, "w+b") as out:
            dataset = pydicom.dcmread(src, stop_before_pixels=True)
            pixels, _ = _read_past_pixels(src, dataset)
            if pixels is None:
                raise ValueError("it has no pixel data to decode")
            frames_expected = int(dataset.get("NumberOfFrames", 1) or 1)
            if int(dataset.get("SamplesPerPixel", 1)) > 1:
                # Decoded as pydicom decodes by default: YCbCr converted to RGB, samples interleaved.
                if str(dataset.PhotometricInterpretation).startswith("YBR"):
                    dataset.PhotometricInterpretation = "RGB"
                dataset.PlanarConfiguration = 0
            dataset.file_meta.TransferSyntaxUID = syntax
            rules.apply_edits(dataset, edits)
            after = _split_after(dataset, pixels)
            dataset.save_as(out, enforce_file_format=True)
            length_at = _write_pixel_header(out, 0x7FE00010, "OB" if int(dataset.BitsAllocated) <= 8 else "OW",
                                            0, syntax)
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
            if length >= _UNDEFINED_LENGTH:  # PS3.5 7.1.1: a 32-bit length, 0xFFFFFFFF meaning undefined
                raise ValueError(f"decoded, its pixel data would be {length} bytes: more than DICOM allows")
            _write_elements(out, after, syntax, dataset)
            out.seek(length_at)
            out.write(struct.pack("<I", length))
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def reencoded_copy(source: Path, edits: Sequence[rules.TagEdit], syntax: UID, directory: Path) -> Path:
    """A new file in ``directory``: the uncompressed instance ``source`` in ``syntax`` (Explicit
    or Implicit VR Little Endian) with ``edits`` applied. The caller removes it.

    What pydicom makes of it in memory (every value the same, the SOP Instance UID kept), but
    its pixel data — Pixel Data, Float or Double Float Pixel Data — is never loaded: it is copied
    from ``source`` in chunks between the re-encoded elements before and after it.

    An Explicit VR Big Endian source (retired, rare) is streamed too: its pixel data is
    byte-swapped a chunk at a time, and so are its other OW, OF, OL, OD and OV values (pydicom
    re-encodes numbers, not those); a UN value is left as it is, its structure being unknown.
    A Deflated Explicit VR Little Endian source is re-encoded in memory: its data set is one
    deflate stream, which pydicom inflates whole (and few modalities send it)."""
    if syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        raise ValueError(f"cannot re-encode into {syntax.name}")
    fd, temp = tempfile.mkstemp(dir=directory, suffix=".dcm")
    try:
        with open(source, "rb") as src, os.fdopen(fd, "wb") as out:
            dataset = pydicom.dcmread(src, stop_before_pixels=True)
            original = dataset.file_meta.TransferSyntaxUID
            if original.is_compressed:
                raise ValueError(f"{original.name} is compressed: it is decoded, not re-encoded")
            if original.is_deflated:
                # One deflate stream, which pydicom inflates whole: nothing to stream from.
                whole = pydicom.dcmread(source)
                whole.pop(_TRAILING_PADDING, None)
                whole.file_meta.TransferSyntaxUID = syntax
                rules.apply_edits(whole, edits)
                whole.save_as(out, enforce_file_format=True)
                return Path(temp)
            # stop_before_pixels left src at the pixel data's tag; pydicom reads that element's
            # header and skips its value, then reads the elements after it into the data set
            # (so that the edits, and a change of character set, apply to them too). pydicom
            # writes the elements before the pixel data and those after it in the new syntax;
            # between them goes the pixel data element, by hand: in both little endian syntaxes
            # its value is the same bytes, copied from src in chunks, and only its header differs
            # (Implicit VR: tag, 32-bit length; Explicit VR: tag, VR, 2 reserved bytes, 32-bit length).
            pixels, _ = _read_past_pixels(src, dataset)
            dataset.file_meta.TransferSyntaxUID = syntax
            rules.apply_edits(dataset, edits)
            after = _split_after(dataset, pixels) if pixels is not None else Dataset()
            if not original.is_little_endian:
                _swap_to_little_endian(dataset)
                _swap_to_little_endian(after)
            # dcmwrite, as save_as refuses to change the byte order (it swaps no OW values; we did).
            pydicom.dcmwrite(out, dataset, enforce_file_format=True)
            if pixels is not None:
                vr = pixels.VR or _implicit_pixel_vr(pixels.tag, dataset)
                word_size = 1 if original.is_little_endian else _WORD_SIZE.get(vr, 1)
                _write_pixel_header(out, pixels.tag, vr, pixels.length, syntax)
                _copy_value(src, out, pixels, word_size)
                _write_elements(out, after, syntax, dataset)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return Path(temp)


def _read_past_pixels(src: BinaryIO, dataset: Dataset) -> tuple[RawDataElement | None, int]:
    """Read on in ``src`` from where ``stop_before_pixels`` left it (at the pixel data's tag):
    return the pixel data element without its value — ``value_tell`` and ``length`` say where
    it is — and where the element ends in ``src`` (after the fragments of a compressed one);
    add the elements after it to ``dataset``; take Data Set Trailing Padding out. None if there
    is no pixel data (then ``stop_before_pixels`` read to the end)."""
    syntax = dataset.file_meta.TransferSyntaxUID
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    # defer_size=0: pydicom skips the value instead of reading it, also an encapsulated one of
    # undefined length (it walks its fragments), and leaves the file after it.
    pixels = next(data_element_generator(src, implicit, little, defer_size=0), None)
    end = src.tell()
    if pixels is not None:
        if not isinstance(pixels, RawDataElement):
            raise ValueError(f"its pixel data {pixels.tag} is a sequence")
        dataset.update(read_dataset(src, implicit, little, parent_encoding=dataset.original_character_set))
    dataset.pop(_TRAILING_PADDING, None)
    return pixels, end


def _split_after(dataset: Dataset, pixels: RawDataElement) -> Dataset:
    """Take the elements after the pixel data out of ``dataset`` (they go after it on the wire)."""
    after = dataset[pixels.tag:]
    del dataset[pixels.tag:]
    return after


def _implicit_pixel_vr(tag: int, dataset: Dataset) -> str:
    """The VR of pixel data read without one: OW for Pixel Data of more than 8 bits allocated,
    else OB (PS3.5 A.2 allows both); OF and OD for Float and Double Float Pixel Data."""
    if tag == 0x7FE00010:
        return "OW" if int(dataset.BitsAllocated) > 8 else "OB"
    return str(dictionary_VR(tag))


def _write_pixel_header(out: BinaryIO, tag: int, vr: str, length: int, syntax: UID) -> int:
    """Write the header of the pixel data element in ``syntax``; return where its length is."""
    out.write(struct.pack("<HH", tag >> 16, tag & 0xFFFF))
    if not syntax.is_implicit_VR:
        out.write(vr.encode("ascii") + b"\0\0")  # OB, OW, OF, OD: two reserved bytes, a 32-bit length
    length_at = out.tell()
    out.write(struct.pack("<I", length))
    return length_at


def _copy_value(src: BinaryIO, out: BinaryIO, element: RawDataElement, word_size: int) -> None:
    """Copy ``element``'s value from ``src`` to ``out`` in chunks, swapping the byte order of
    each word of ``word_size`` bytes (1: copied as it is)."""
    if element.length == _UNDEFINED_LENGTH:
        raise ValueError("its pixel data is encapsulated in an uncompressed transfer syntax")
    if element.length % word_size:
        raise ValueError(f"its pixel data's length {element.length} is not a whole number of {word_size}-byte words")
    _copy_range(src, out, element.value_tell, element.length, word_size)


def _copy_range(src: BinaryIO, out: BinaryIO, start: int, length: int, word_size: int) -> None:
    """Copy ``length`` bytes of the pixel data from ``start`` in ``src`` to ``out`` in chunks,
    swapping the byte order of each word of ``word_size`` bytes (1: copied as they are)."""
    src.seek(start)
    left = length
    while left:
        chunk = src.read(min(left, _CHUNK))  # a multiple of every word size
        if not chunk:
            raise EOFError(f"the file ends {left} bytes into its pixel data")
        out.write(chunk if word_size == 1 else _swapped(chunk, word_size))
        left -= len(chunk)


def _swap_to_little_endian(dataset: Dataset) -> None:
    """Swap the byte order of the values pydicom keeps as bytes (``_WORD_SIZE``), in sequences too."""
    for element in dataset.iterall():
        size = _WORD_SIZE.get(str(element.VR))
        if size and isinstance(element.value, bytes):
            element.value = _swapped(element.value, size)


def _swapped(data: bytes, size: int) -> bytes:
    return np.frombuffer(data, f"u{size}").byteswap().tobytes()


def _write_elements(out: BinaryIO, elements: Dataset, syntax: UID, parent: Dataset) -> None:
    """Write ``elements`` (those after the pixel data) in ``syntax``, their text in ``parent``'s
    character set."""
    fp = DicomFileLike(out)
    fp.is_implicit_VR, fp.is_little_endian = syntax.is_implicit_VR, True
    charset: Any = parent.get("SpecificCharacterSet") or default_encoding
    write_dataset(fp, elements, parent_encoding=charset)
