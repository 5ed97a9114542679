"""Taking one received file into the appliance: read its header, route it, make it durable in
the cache, index it and queue its deliveries — in that order, with one commit at the end.

Both ways in use this: the Storage SCP (a file pynetdicom streamed into ``incoming/``) and
``appliance send`` (a file copied there from disk). The caller answers its sender only from
the :class:`Outcome`: ``stored`` means the file and its row are durable.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import struct
import sys
import threading
import time
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.datadict import dictionary_description, dictionary_VR
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_file_meta_info, read_preamble
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32, VR

from . import rules
from .config import Config
from .db import Database, Delivery, Instance
from .rules import Origin
from .store import Store, digest_file
from .wakeup import Nudger

log = logging.getLogger(__name__)

# What is read of each instance: the index columns, and the elements the rules test
# (``rules.tested_tags``) — pydicom then converts only those, not the whole header.
HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "PatientID", "PatientName", "StudyDate",
               "AccessionNumber", "Modality", "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID"]
_HEADER_TAGS = frozenset(int(Tag(keyword)) for keyword in HEADER_TAGS)

# What reading a header raises when its data set cannot be read. zlib.error: a deflated data
# set whose stream is damaged.
UNREADABLE = (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, OverflowError, zlib.error)


@dataclass(frozen=True)
class Outcome:
    """What became of a received file. ``kind``: stored | replaced | kept-first | rejected |
    queued (``only_to``: already cached, the cached copy queued there) | no-room | unreadable |
    mismatch (not the instance its C-STORE request names) | failed."""

    kind: str
    size: int = 0
    detail: str = ""

    @property
    def acknowledged(self) -> bool:
        return self.kind in ("stored", "replaced", "kept-first", "queued")


class Intake:
    """Admits files into one appliance's cache and database."""

    def __init__(self, config: Config, db: Database, store: Store) -> None:
        self.config = config
        self.db = db
        self.store = store
        # The same SOP Instance UID arriving on two associations at once must not interleave.
        self._uid_locks = [threading.Lock() for _ in range(64)]
        self._nudger = Nudger(config.storage.root)  # tells the forwarder that work was queued

    def admit(self, received: Path, origin: Origin, sop_class_uid: str | None = None,
              sop_instance_uid: str | None = None, transfer_syntax: str | None = None,
              only_to: str | None = None, digest: tuple[int, str] | None = None,
              dataset_offset: int | None = None) -> Outcome:
        """Cache ``received`` (a complete file in ``store.incoming``); on any outcome but a
        stored one the file is left for the caller (pynetdicom or the CLI) to remove.
        ``only_to`` sends it to one destination instead of routing it; ``digest`` is its size
        and SHA-256 when the caller already knows them (the receiver hashes as it writes), and
        ``dataset_offset`` where the data set starts (after the file meta it wrote)."""
        config = self.config
        if not self.store.has_room(config.storage.disk.min_free):
            free = self.store.usage().free
            return Outcome("no-room", detail=f"{free / 1e6:.0f} MB free is below storage.disk.min_free "
                                             f"({config.storage.disk.min_free})")
        trailing: list[int] = []
        try:
            if config.routes and only_to is None:
                header = read_for_routing(received, config, transfer_syntax, dataset_offset, trailing)
            else:
                header = _read_header(received, _HEADER_TAGS, transfer_syntax, dataset_offset, trailing=trailing)
        except UNREADABLE as exc:
            return Outcome("unreadable", detail=f"cannot read its data set: {exc}")
        if trailing and trailing[0]:
            # Padding after the last element (a writer's NUL) is no part of the data set, and
            # passed on it could make it of odd length: the cache keeps the data set alone.
            try:
                os.truncate(received, os.stat(received).st_size - trailing[0])
            except OSError as exc:
                return Outcome("failed", detail=f"cannot remove the padding after its last element: {exc}")
            digest = None
        # An instance says what it is itself (SOP Common, type 1): a data set without these is
        # none, whatever the C-STORE request or the file meta name (an empty data set, say).
        own_uid, own_class = _text(header, "SOPInstanceUID"), _text(header, "SOPClassUID")
        if not own_uid or not own_class:
            return Outcome("unreadable", detail="its data set has no SOP Instance UID or no SOP Class UID")
        # The C-STORE request names the instance too (PS3.7 9.3.1.1): the index and the file
        # meta would take its UIDs, a PACS the data set's. Refused as DCMTK and Orthanc do.
        if sop_class_uid is not None and sop_class_uid.strip(" \x00") != own_class:
            return Outcome("mismatch", detail=f"its data set is of SOP Class {own_class}, "
                                              f"its request says {sop_class_uid}")
        if sop_instance_uid is not None and sop_instance_uid.strip(" \x00") != own_uid:
            return Outcome("mismatch", detail=f"its data set is SOP Instance {own_uid}, "
                                              f"its request says {sop_instance_uid}")
        sop_uid, sop_class = own_uid, own_class
        syntax = transfer_syntax or _meta(header, "TransferSyntaxUID")
        if not syntax:
            return Outcome("unreadable", detail="no transfer syntax")
        if only_to is not None:
            decision = rules.Decision(deliveries=(rules.Delivery(only_to),))
        elif config.routes:
            decision = rules.decide(config.routes, header, origin)
        else:
            decision = None
        try:
            size, sha256 = digest if digest is not None else digest_file(received)
        except OSError as exc:
            return Outcome("failed", detail=f"cannot read it back: {exc}")
        instance = Instance(
            sop_instance_uid=sop_uid, sop_class_uid=sop_class,
            study_instance_uid=_text(header, "StudyInstanceUID") or "unknown",
            series_instance_uid=_text(header, "SeriesInstanceUID") or "unknown",
            patient_id=_text(header, "PatientID"), patient_name=_text(header, "PatientName"),
            study_date=_text(header, "StudyDate"), accession_number=_text(header, "AccessionNumber"),
            modality=_text(header, "Modality"), transfer_syntax=syntax,
            calling_ae=origin.calling_ae, called_ae=origin.called_ae, source_ip=origin.source_ip,
            size=size, sha256=sha256, path="", received_at=time.time(),
            decision=decision.to_json() if decision is not None else None,
        )
        deliveries = [Delivery(d.destination, d.stable_after, rules.edits_to_json(d.edits))
                      for d in (decision.deliveries if decision else ())]
        with self._uid_locks[hash(sop_uid) % len(self._uid_locks)]:
            outcome = self._cache(received, instance, deliveries, rerouted=only_to is None)
        if deliveries and outcome.kind in ("stored", "replaced", "queued"):
            self._nudger.nudge()
        return outcome

    def _cache(self, received: Path, instance: Instance, deliveries: list[Delivery], rerouted: bool) -> Outcome:
        where = f"{instance.calling_ae}@{instance.source_ip} {instance.sop_instance_uid}"
        try:
            existing = self.db.find_instance(instance.sop_instance_uid)
        except Exception as exc:  # noqa: BLE001 - any database failure refuses (nothing is written yet)
            return Outcome("failed", detail=f"cannot look it up in the index: {exc}")
        policy = self.config.node.on_duplicate
        if existing is not None and policy != "replace" and not rerouted:
            # `appliance send --to`: the admin asks for this instance to go there. The policy
            # says which copy is the instance (the cached one); it does not undo the request.
            try:
                queued = self.db.queue_cached(existing, deliveries)
            except Exception as exc:  # noqa: BLE001 - any database failure: nothing was queued
                return Outcome("failed", detail=f"cannot queue it: {exc}")
            if queued:
                return Outcome("queued", existing.size, f"already cached (node.on_duplicate is {policy}): "
                                                        f"the cached copy is queued")
            existing = None  # evicted since it was looked up: this copy is cached in its place
        if existing is not None and policy != "replace":
            outcome = "kept-first" if policy == "keep-first" else "rejected"
            try:
                self.db.record_duplicate(instance, outcome)
            except Exception as exc:  # noqa: BLE001 - see below
                # Only the count of receptions misses one: the first copy is durable, so the
                # answer stays the policy's. A failure would have the modality send it again.
                log.error("%s: cannot record a repeated C-STORE (%s): %s", where, outcome, exc)
            return Outcome(outcome, instance.size, f"already cached; node.on_duplicate is {policy}")
        try:
            final = self.store.admit(received, instance.study_instance_uid, instance.sop_instance_uid, instance.sha256)
        except OSError as exc:
            return Outcome("failed", detail=f"cannot write it durably into the cache: {exc}")
        instance = dataclasses.replace(instance, path=str(final))
        try:
            cancelled = self.db.store_instance(instance, existing, deliveries, rerouted)
        except Exception as exc:  # noqa: BLE001 - any database failure must refuse, and remove the file
            if existing is None or existing.path != str(final):
                self._discard(final, where, "the unindexed copy")
            return Outcome("failed", detail=f"cannot index it: {exc}")
        # Committed: the instance is durable and acknowledged whatever happens from here on.
        if existing is not None:
            if existing.path != str(final):
                self._discard(Path(existing.path), where, "the replaced copy")
            if cancelled:
                log.warning("%s was replaced by a version its rules no longer send to %s: not sent there",
                            instance.sop_instance_uid, ", ".join(cancelled))
            return Outcome("replaced", instance.size, "replaced the cached copy (node.on_duplicate: replace)")
        return Outcome("stored", instance.size)

    def _discard(self, path: Path, where: str, what: str) -> None:
        """Remove a cache file no row points at; one left behind (an I/O error) is removed at
        the next start, with every other such file (``Store.recover``)."""
        try:
            self.store.discard(path)
        except OSError as exc:
            log.error("%s: cannot remove %s %s (removed at the next start): %s", where, what, path, exc)


def read_for_routing(path: Path, config: Config, syntax: str | None = None, offset: int | None = None,
                     trailing: list[int] | None = None) -> pydicom.Dataset:
    """The header of ``path`` as intake reads it to index and route it under ``config``: what
    ``route-test`` shows must be what a received instance is routed on. ``syntax`` and
    ``offset``, when the caller knows them, say how and where its data set starts."""
    tags, with_meta = _tags_to_read(config)
    return _read_header(path, tags, syntax, offset, with_meta, trailing)


_tags_for_config: tuple[Config, frozenset[int], bool] | None = None


def _tags_to_read(config: Config) -> tuple[frozenset[int], bool]:
    """The elements to read for ``config``'s rules, and whether they test the file meta
    (group 0002); worked out once per configuration (one is in force at a time)."""
    global _tags_for_config
    known = _tags_for_config
    if known is None or known[0] is not config:
        tested = rules.tested_tags(config.routes)
        creators = {creator for creator in map(_private_creator, tested) if creator is not None}
        resolving = _RESOLVING_VR if any(_ambiguous(tag) for tag in tested) else frozenset()
        known = _tags_for_config = (config, _HEADER_TAGS | tested | creators | resolving,
                                    any(tag >> 16 == 0x0002 for tag in tested))
    return known[1], known[2]


# What tells pydicom the VR of an element whose dictionary VR is ambiguous, when the data set
# does not (Implicit VR): Pixel Representation makes a "US or SS" value signed or not, Bits
# Allocated an "OB or OW" one bytes or words. Without it pydicom takes US: a rule on Pixel
# Padding Value -2000 would see 63536 and never match.
_RESOLVING_VR = frozenset((0x00280103, 0x00280100))


def _ambiguous(tag: int) -> bool:
    try:
        return " or " in dictionary_VR(tag)
    except KeyError:
        return False


def _private_creator(tag: int) -> int | None:
    """The private creator element (gggg,00xx) that reserves the block of a private element
    (gggg,xxee), or None when there is none (a public element, or a creator itself). In
    Implicit VR only the creator's text lets pydicom look the element's VR up in its private
    dictionary; without it the value stays raw bytes, and a rule on a private number would see
    other text than in the whole header."""
    group, element = tag >> 16, tag & 0xFFFF
    if group % 2 == 0 or element < 0x1000:
        return None
    return group << 16 | element >> 8


def _read_header(path: Path, tags: Collection[int | str] | None, syntax: str | None, offset: int | None,
                 with_meta: bool = False, trailing: list[int] | None = None) -> pydicom.Dataset:
    """The data set up to its pixels (only ``tags`` if given; all if None), with the file meta
    if ``with_meta``. When the caller knows where the data set starts and how it is encoded,
    it is read from there: the receiver wrote the meta itself, and pydicom's ``dcmread``
    spends a third of a header read finding and checking it again. Otherwise ``path`` is a
    PS3.10 file (``appliance send`` makes every file one), whose meta says both.

    Raises :class:`Truncated` (an ``EOFError``) or ``ValueError`` unless every element of the
    data set, the pixel data's included, ends within the file, and the file ends where an
    element ends (see :func:`check_elements`), and unless the data set is of even length.
    ``trailing`` gets how many bytes of padding follow its last element (see :meth:`Intake.admit`)."""
    specific: list[BaseTag | int] | None = [Tag(t) for t in tags] if tags is not None else None
    meta: FileMetaDataset | None = None
    with open(path, "rb") as raw:
        if offset is None or not syntax:
            read_preamble(raw, False)
            meta = _read_file_meta_info(raw)
            syntax = syntax or str(meta.get("TransferSyntaxUID", ""))
        else:
            raw.seek(offset)
        start = raw.tell()
        encoding = UID(syntax)
        if encoding.is_transfer_syntax:
            implicit, little = encoding.is_implicit_VR, encoding.is_little_endian
        else:  # a private syntax: as its first element shows (pydicom tells implicit VR itself)
            implicit, little = False, raw.read(2) != b"\x00\x08"
            raw.seek(start)
        deflated = encoding.is_transfer_syntax and encoding.is_deflated
        source: BinaryIO = Inflating(raw) if deflated else raw  # type: ignore[assignment]
        stop = _StopAfter(max((t for t in specific if t >> 16 != 0x0002), default=0xFFFFFFFF)
                          if specific is not None else 0xFFFFFFFF)
        try:
            try:
                header = read_dataset(source, implicit, little, stop_when=stop, specific_tags=specific)
                if not stop.reached:
                    # pydicom read to the end of the file, which tells nothing of where it ended:
                    # a value it skipped or read may run past it, the last header may be cut off.
                    if deflated:
                        source = Inflating(raw, start)  # type: ignore[assignment]
                    else:
                        raw.seek(start)
                # A sender that streams a file's bytes as they are (a router, a bulk sender)
                # passes a file cut short on its disk on as a data set cut short. Refused like
                # any data set that cannot be read (what DCMTK answers), so that no corrupt
                # image is acknowledged and forwarded. Only element headers are read, the values
                # are seeked over; a deflated data set is inflated on the way and let go.
                read_implicit, read_little = header.original_encoding  # pydicom corrects a wrong VR guess
                file_size = os.fstat(raw.fileno()).st_size
                walk = _ElementWalk(source, bool(read_little), sys.maxsize if deflated else file_size)
                walk.elements(bool(read_implicit), within=None)
                # Every value is of even length (PS3.5 7.1.1; a deflated stream is padded to one,
                # A.5), so a data set is too. One of odd length cannot be passed on: DCMTK, and
                # the PACS built on it, abort on its odd fragment, and it would wait in the queue
                # for ever. An odd value makes it so: refused before it is acknowledged, as DCMTK
                # does. So may a byte of padding after its last element, which is no part of it.
                tail = 0 if deflated else walk.tail
                if (file_size - start - tail) % 2:
                    raise ValueError(f"its data set is {file_size - start - tail} bytes long: an odd length, where"
                                     " every DICOM value is of even length (PS3.5 7.1.1); a PACS that checks it"
                                     " would refuse it")
                if trailing is not None:
                    trailing.append(tail)
            finally:
                if isinstance(source, Inflating):
                    source.check_ended()  # a deflate stream cut short says more than where reading stopped
        except OSError as exc:
            if exc.errno is not None:  # the disk's, not the data set's
                raise
            # pydicom ran out of file inside an undefined-length sequence.
            raise Truncated(f"truncated: {exc}") from exc
    if with_meta and meta is None:
        meta = read_file_meta_info(path)
    if meta is not None:
        header.file_meta = meta
    return header


class Inflating:
    """A deflated data set (Deflated Explicit VR Little Endian: raw deflate after the file
    meta) read as the data set it inflates to, without holding it: a few hundred KB on the
    wire may inflate to gigabytes. Forward only; the last :data:`KEEP` bytes before the
    position are kept, for the few bytes pydicom steps back. Inflates :data:`STEP` at a time.
    A stream cut short reads as a data set that ends there; :meth:`check_ended` tells."""

    STEP = 1 << 16
    KEEP = 1 << 16

    def __init__(self, raw: BinaryIO, start: int | None = None) -> None:
        if start is not None:
            raw.seek(start)
        self._raw = raw
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = bytearray()
        self._buffer_at = 0  # the data set's offset of _buffer[0]
        self._position = 0
        self._input_ended = False

    def _inflate(self) -> bool:
        """Append what the next step inflates to; False at the end of the stream (or of the
        file). zlib.error for a damaged stream."""
        inflater = self._inflater
        while not inflater.eof:
            data = inflater.unconsumed_tail
            if not data:
                data = self._raw.read(self.STEP)
                if not data:
                    self._input_ended = True
                    return False
            out = inflater.decompress(data, self.STEP)
            if out:
                self._buffer += out
                return True
        return False

    def _let_go(self) -> None:
        behind = self._position - self._buffer_at - self.KEEP
        if behind > self.STEP:
            del self._buffer[:behind]
            self._buffer_at += behind

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            raise ValueError("a deflated data set is read a value at a time")
        while self._buffer_at + len(self._buffer) < self._position + size and self._inflate():
            pass
        at = self._position - self._buffer_at
        data = bytes(self._buffer[at:at + size])
        self._position += len(data)
        self._let_go()
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        """Where it got to: ``offset``, or the end of the data set if that comes first."""
        target = offset if whence == os.SEEK_SET else self._position + offset
        if whence not in (os.SEEK_SET, os.SEEK_CUR) or target < self._buffer_at:
            raise ValueError("a deflated data set is read forward only")
        while self._buffer_at + len(self._buffer) < target:
            self._position = self._buffer_at + len(self._buffer)
            self._let_go()
            if not self._inflate():
                break
        self._position = min(target, self._buffer_at + len(self._buffer))
        return self._position

    def tell(self) -> int:
        return self._position

    def check_ended(self) -> None:
        """Raise :class:`Truncated` if the file ended before the deflate stream did."""
        if not self._inflater.eof and (self._input_ended or not self._inflate_to_end()):
            raise Truncated("truncated: the file ends inside its deflated (compressed) data set")

    def _inflate_to_end(self) -> bool:
        while self._inflate():
            self._position = self._buffer_at + len(self._buffer)
            self._let_go()
        return self._inflater.eof


class _StopAfter:
    """``stop_when`` for ``read_dataset``: stops at the first element past ``last`` (the
    highest tag wanted), or at the pixel data (or whatever comes at or after its tag), where
    pydicom leaves the file at the start of that element. What comes after is only walked
    (:func:`check_elements`): pydicom would parse every undefined-length sequence on the way,
    wanted or not: 6 MB of an enhanced multi-frame's per-frame functional groups took 170 MB of
    memory and 6 s (walked: 0.4 s, nothing kept)."""

    def __init__(self, last: int) -> None:
        self.last = min(last, 0x7FE0000F)
        self.reached = False

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag <= self.last:
            return False
        self.reached = True
        return True


class Truncated(EOFError):
    """A data set that ends before its elements do; the message says where, for a person."""


_UNDEFINED_LENGTH = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_LONG_VRS = frozenset(vr.encode() for vr in EXPLICIT_VR_LENGTH_32)  # a 4-byte length after 2 reserved bytes
_VRS = frozenset(vr.value.encode() for vr in VR)
# What a file may hold after its last element, as pydicom reads it: a pad byte after an odd
# length, a few NULs from a writer that rounds its files up.
_TAIL_PADDING = frozenset(b"\x00 ")


def check_elements(source: BinaryIO, implicit: bool, little: bool, size: int) -> bool:
    """Walk the elements of a data set from ``source``'s position (the start of an element) to
    the end of the file, reading only their headers: every defined length must end within the
    file (``size`` bytes; a source that cannot seek past its end may pass ``sys.maxsize``),
    every undefined-length value — a sequence, compressed pixel data — must reach its
    delimiter, and the file must end where an element ends. Raises :class:`Truncated`, or
    ``ValueError`` for a structure that is not DICOM's. Returns whether the pixel data is
    encapsulated (of undefined length)."""
    return _ElementWalk(source, little, size).elements(implicit, within=None)


class _ElementWalk:
    def __init__(self, source: BinaryIO, little: bool, size: int) -> None:
        self.source, self.little = source, little
        self.read, self.seek, self.tell = source.read, source.seek, source.tell
        self.size = size
        order = "<" if little else ">"
        self.header = struct.Struct(order + "HHI")  # tag and 4-byte length: implicit VR, items, delimiters
        self.short_length = struct.Struct(order + "H")
        self.long_length = struct.Struct(order + "I")
        self.tail = 0  # bytes of padding (NUL, space) after the last element

    def elements(self, implicit: bool | None, within: int | None) -> bool:
        """The elements from the position to the end of the file (``within`` None), or to the
        delimiter of the undefined-length item they are in (``within``: the top-level element
        holding it, named in messages); ``implicit`` None: as the first element shows.
        Returns whether the pixel data is encapsulated."""
        read = self.read
        encapsulated = False
        while True:
            head = read(8)
            if len(head) < 8:
                if within is None and set(head) <= _TAIL_PADDING:
                    self.tail = len(head)
                    return encapsulated
                if within is not None:
                    raise Truncated(f"truncated: the file ends inside its {_name(within)}")
                raise Truncated(f"truncated: the file ends inside the header of an element at byte "
                                f"{self.tell() - len(head)}")
            group, element, length = self.header.unpack(head)
            tag = group << 16 | element
            if implicit is None:
                implicit = head[4:6] not in _VRS
            if tag == _ITEM_END:
                if within is None:  # a stray one, which pydicom reads past
                    continue
                return encapsulated
            vr = b""
            if not implicit:
                vr = head[4:6]
                if vr in _LONG_VRS:
                    tail = read(4)
                    if len(tail) < 4:
                        raise Truncated(f"truncated: the file ends inside the header of its {_name(within or tag)}")
                    (length,) = self.long_length.unpack(tail)
                elif b"AA" <= vr <= b"ZZ":
                    (length,) = self.short_length.unpack_from(head, 6)
                # else: not a VR — an implicit VR element in an explicit data set, as pydicom reads it
            if length == _UNDEFINED_LENGTH:
                # Items either way, each of defined length (fragments) or delimited.
                holder = within if within is not None else tag
                if vr == b"UN":  # a sequence whose VR the writer did not know (PS3.5 6.2.2)
                    self.little_endian().items(None, holder)
                else:
                    self.items(implicit, holder)
                encapsulated = encapsulated or tag == _PIXEL_DATA
                continue
            start = self.tell()
            end = self.seek(start + length)
            if start + length > self.size or end != start + length:
                if within is not None:
                    raise Truncated(f"truncated: the file ends inside its {_name(within)}")
                raise Truncated(f"truncated: its {_name(tag)} needs {length} bytes, the file ends after "
                                f"{max(0, min(self.size, end) - start)}")

    def little_endian(self) -> _ElementWalk:
        """This walk in Little Endian: what an undefined-length UN holds in any transfer syntax."""
        return self if self.little else _ElementWalk(self.source, True, self.size)

    def items(self, implicit: bool | None, within: int) -> None:
        """The items of an undefined-length value, from the position to its sequence delimiter.
        ``implicit`` None: each item as its first element shows — an undefined-length UN's
        are Implicit VR by the standard, and Explicit VR from writers that kept the VRs of a
        private sequence they did not know, which pydicom reads too."""
        while True:
            head = self.read(8)
            if len(head) < 8:
                raise Truncated(f"truncated: the file ends inside its {_name(within)}")
            group, element, length = self.header.unpack(head)
            tag = group << 16 | element
            if tag == _SEQUENCE_END:
                return
            if tag != _ITEM:
                raise ValueError(f"damaged: its {_name(within)} holds {Tag(tag)} where an item belongs")
            if length == _UNDEFINED_LENGTH:
                self.elements(implicit, within)
                continue
            start = self.tell()
            if start + length > self.size or self.seek(start + length) != start + length:
                raise Truncated(f"truncated: the file ends inside its {_name(within)}")


def _name(tag: int) -> str:
    try:
        return dictionary_description(tag)
    except KeyError:
        return str(Tag(tag))


# Attributes whose value is ASCII by their VR (UI, DA, CS): read from the raw bytes, without
# pydicom's per-value conversion and validation (a tenth of a header read).
_ASCII = {"StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "StudyDate", "Modality"}


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    if keyword in _ASCII:
        element = ds.get_item(keyword)
        if element is None:
            return ""
        if isinstance(element.value, bytes):
            return element.value.decode("ascii", "replace").strip(" \x00")
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _meta(ds: pydicom.Dataset, keyword: str) -> str:
    meta = getattr(ds, "file_meta", None)
    value = meta.get(keyword) if meta is not None else None
    return "" if value is None else str(value).strip()
