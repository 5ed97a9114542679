"""A DICOM file found on disk (a CD, a USB stick, an archive), before ``appliance send``
imports it: whether it is a complete instance, and why not when it is not.

A file on disk may have been cut short by an interrupted copy or a full stick. This walks its
elements' headers as intake does with what it receives (``intake.check_elements``: every value
within the file, compressed fragments and sequences up to their delimiters, the file ending
where an element ends) before anything is copied into the cache, so that no truncated image is
cached and forwarded, and the person importing it is told why. Media also hold files that are no
instance (a DICOMDIR, a desktop's index files) and, from older archives, bare data sets without
the preamble and file meta of PS3.10; those are given the meta the receiver writes, so that
every cached file is laid out alike.
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom.dataelem import RawDataElement
from pydicom.filereader import data_element_generator, read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)
from pydicom.valuerep import VR

from .hotpath import FileMeta, encode_file_meta
from .intake import Inflating, check_elements

_PREAMBLE = 128
_META_GROUP_LENGTH, _TRANSFER_SYNTAX = 0x00020000, 0x00020010
_META_SOP_CLASS, _META_SOP_INSTANCE = 0x00020002, 0x00020003
_VRS = frozenset(vr.value.encode() for vr in VR if len(vr.value) == 2)
_NOT_AN_INSTANCE = "a DICOMDIR (the index of a DICOM medium), not an instance"


class NotImportable(Exception):
    """Why a file is not imported; the message is for the person importing it."""


@dataclass(frozen=True)
class _Layout:
    """Where a file's data set starts, how it is encoded, and what its file meta says."""

    dataset_offset: int
    syntax: UID  # as its file meta names it (or as guessed from a bare data set)
    implicit: bool
    little: bool
    standard: bool  # preamble, DICM and file meta as PS3.10 lays them out
    meta_sop_class: str = ""
    meta_sop_instance: str = ""


def part10_file(copy: Path, name: str, directory: Path | None = None) -> Path:
    """``copy`` (a file from disk copied into ``incoming/``, ``name`` its original name) as a
    complete PS3.10 file to cache: ``copy`` itself, or a new file in ``directory`` (default:
    beside ``copy``) with a preamble and file meta in front of the data set when ``copy`` has
    none. ``copy`` is only read. Raises :class:`NotImportable`."""
    if name.upper() == "DICOMDIR":
        raise NotImportable(_NOT_AN_INSTANCE)
    size = copy.stat().st_size
    if size == 0:
        raise NotImportable("empty file")
    with open(copy, "rb") as source:
        layout = _layout(source)
        if layout.meta_sop_class == MediaStorageDirectoryStorage:
            raise NotImportable(_NOT_AN_INSTANCE)
        encapsulated = _check_complete(source, layout, size)
        if layout.standard:
            return copy
        if encapsulated and not layout.meta_sop_class:
            # Without a file meta nothing says which codec compressed the pixels.
            raise NotImportable("a data set without file meta whose pixel data is compressed: "
                                "its transfer syntax cannot be known")
        meta = _meta_for(source, layout)
        return _with_meta(source, layout.dataset_offset, meta, directory or copy.parent)


def _layout(source: BinaryIO) -> _Layout:
    head = source.read(_PREAMBLE + 8)
    if head[_PREAMBLE:_PREAMBLE + 4] == b"DICM":
        return _read_meta(source, _PREAMBLE + 4, standard=True)
    if head[:4] == b"DICM":  # the preamble left off by the writer
        return _read_meta(source, 4, standard=False)
    if len(head) >= 2 and struct.unpack_from("<H", head)[0] == 0x0002:  # the meta without preamble or DICM
        return _read_meta(source, 0, standard=False)
    syntax = _guess_syntax(head)
    if syntax is None:
        raise NotImportable("not a DICOM file: no DICM prefix after the 128-byte preamble, "
                            "and it does not start like a data set either")
    return _Layout(0, syntax, syntax.is_implicit_VR, syntax.is_little_endian, standard=False)


def _read_meta(source: BinaryIO, offset: int, standard: bool) -> _Layout:
    source.seek(offset)
    meta: dict[int, bytes] = {}
    dataset_offset = offset
    try:
        for element in data_element_generator(source, False, True, stop_when=_past_meta):
            if not isinstance(element, RawDataElement) or not isinstance(element.value, bytes) \
                    or len(element.value) < element.length:
                raise NotImportable("truncated: the file ends inside its file meta")
            meta[element.tag] = element.value
            dataset_offset = source.tell()
    except (ValueError, EOFError, OSError, struct.error) as exc:
        raise NotImportable("truncated: the file ends inside its file meta") from exc
    size = source.seek(0, os.SEEK_END)
    group_length = meta.get(_META_GROUP_LENGTH)
    if group_length is not None and len(group_length) == 4 \
            and size < offset + 12 + struct.unpack("<I", group_length)[0]:
        raise NotImportable("truncated: the file ends inside its file meta")
    if size < dataset_offset + 8:  # not even one element's header
        raise NotImportable("truncated: nothing after its file meta")
    syntax = UID(_text(meta.get(_TRANSFER_SYNTAX)))
    if not syntax:
        raise NotImportable("its file meta has no Transfer Syntax UID")
    encoding = syntax
    if not syntax.is_transfer_syntax:  # a private syntax: its encoding as the data set shows it
        source.seek(dataset_offset)
        guessed = _guess_syntax(source.read(8))
        if guessed is None:
            raise NotImportable(f"its data set, in the unknown transfer syntax {syntax}, cannot be read")
        encoding = guessed
    return _Layout(dataset_offset, syntax, encoding.is_implicit_VR, encoding.is_little_endian, standard,
                   _text(meta.get(_META_SOP_CLASS)), _text(meta.get(_META_SOP_INSTANCE)))


def _past_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag >> 16 != 0x0002


def _guess_syntax(head: bytes) -> UID | None:
    """The encoding of a data set from its first element, as DCMTK and pydicom guess it: every
    instance has group 0008 elements (SOP Class UID) and none before them, so its first tag is
    (0008,xxxx) in one byte order or the other; two letters of a VR after it mean explicit VR."""
    if len(head) < 8:
        return None
    explicit = head[4:6] in _VRS
    if struct.unpack_from("<H", head)[0] == 0x0008:
        return ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian
    if struct.unpack_from(">H", head)[0] == 0x0008 and explicit:  # no implicit VR big endian syntax exists
        return ExplicitVRBigEndian
    return None


def _check_complete(source: BinaryIO, layout: _Layout, size: int) -> bool:
    """Raise :class:`NotImportable` unless every element of the data set ends within the file.
    Only the elements' headers are read (the values are seeked over, compressed pixel data and
    sequences walked to their delimiters; a deflated data set is inflated on the way, a step at
    a time, and never held whole). Returns whether the pixel data is compressed (of undefined
    length)."""
    source.seek(layout.dataset_offset)
    deflated = layout.syntax.is_transfer_syntax and layout.syntax.is_deflated
    walked: BinaryIO = Inflating(source) if deflated else source  # type: ignore[assignment]
    try:
        try:
            return check_elements(walked, layout.implicit, layout.little, sys.maxsize if deflated else size)
        finally:
            if isinstance(walked, Inflating):
                walked.check_ended()  # a deflate stream cut short says more than where the walk stopped
    except zlib.error as exc:
        raise NotImportable(f"its deflated data set is damaged: {exc}") from exc
    except (EOFError, ValueError) as exc:
        raise NotImportable(str(exc)) from exc


def _meta_for(source: BinaryIO, layout: _Layout) -> FileMeta:
    """The file meta to write in front of a data set that came without a standard one."""
    sop_class, sop_instance = layout.meta_sop_class, layout.meta_sop_instance
    if not (sop_class and sop_instance):
        source.seek(layout.dataset_offset)
        header = read_dataset(source, layout.implicit, layout.little,
                              stop_when=lambda tag, vr, length: tag > 0x00080018,
                              specific_tags=[Tag("SOPClassUID"), Tag("SOPInstanceUID")])
        sop_class = sop_class or _text(header.get_item("SOPClassUID"))
        sop_instance = sop_instance or _text(header.get_item("SOPInstanceUID"))
    if not (sop_class and sop_instance):
        raise NotImportable("a data set without file meta, SOP Class UID or SOP Instance UID")
    return FileMeta(sop_class, sop_instance, layout.syntax)


def _with_meta(source: BinaryIO, dataset_offset: int, meta: FileMeta, directory: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=directory, suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(b"\x00" * _PREAMBLE + b"DICM" + encode_file_meta(meta))
            source.seek(dataset_offset)
            shutil.copyfileobj(source, out, 1 << 20)
    except BaseException:
        os.unlink(name)
        raise
    return Path(name)


def _text(value: object) -> str:
    raw = getattr(value, "value", value)
    if isinstance(raw, bytes):
        return raw.decode("ascii", "replace").strip(" \x00")
    return "" if raw is None else str(raw).strip(" \x00")
