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
import threading
import time
import zlib
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

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
# set whose stream is damaged (pydicom inflates it whole).
UNREADABLE = (InvalidDicomError, ValueError, EOFError, KeyError, TypeError, OverflowError, zlib.error)


@dataclass(frozen=True)
class Outcome:
    """What became of a received file. ``kind``: stored | replaced | kept-first | rejected |
    no-room | unreadable | failed."""

    kind: str
    size: int = 0
    detail: str = ""

    @property
    def acknowledged(self) -> bool:
        return self.kind in ("stored", "replaced", "kept-first")


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
        try:
            if config.routes and only_to is None:
                header = read_for_routing(received, config, transfer_syntax, dataset_offset)
            else:
                header = _read_header(received, _HEADER_TAGS, transfer_syntax, dataset_offset)
        except UNREADABLE as exc:
            return Outcome("unreadable", detail=f"cannot read its data set: {exc}")
        sop_uid = sop_instance_uid or _text(header, "SOPInstanceUID") or _meta(header, "MediaStorageSOPInstanceUID")
        sop_class = sop_class_uid or _text(header, "SOPClassUID") or _meta(header, "MediaStorageSOPClassUID")
        syntax = transfer_syntax or _meta(header, "TransferSyntaxUID")
        if not sop_uid or not sop_class or not syntax:
            return Outcome("unreadable", detail="no SOP Instance UID, SOP Class UID or transfer syntax")
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
        if deliveries and outcome.kind in ("stored", "replaced"):
            self._nudger.nudge()
        return outcome

    def _cache(self, received: Path, instance: Instance, deliveries: list[Delivery], rerouted: bool) -> Outcome:
        existing = self.db.find_instance(instance.sop_instance_uid)
        policy = self.config.node.on_duplicate
        if existing is not None and policy != "replace":
            outcome = "kept-first" if policy == "keep-first" else "rejected"
            self.db.record_duplicate(instance, outcome)
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
                self.store.discard(final)
            return Outcome("failed", detail=f"cannot index it: {exc}")
        if existing is not None:
            if existing.path != str(final):
                self.store.discard(Path(existing.path))
            if cancelled:
                log.warning("%s was replaced by a version its rules no longer send to %s: not sent there",
                            instance.sop_instance_uid, ", ".join(cancelled))
            return Outcome("replaced", instance.size, "replaced the cached copy (node.on_duplicate: replace)")
        return Outcome("stored", instance.size)


def read_for_routing(path: Path, config: Config, syntax: str | None = None, offset: int | None = None
                     ) -> pydicom.Dataset:
    """The header of ``path`` as intake reads it to index and route it under ``config``: what
    ``route-test`` shows must be what a received instance is routed on. ``syntax`` and
    ``offset``, when the caller knows them, say how and where its data set starts."""
    tags, with_meta = _tags_to_read(config)
    return _read_header(path, tags, syntax, offset, with_meta)


_tags_for_config: tuple[Config, frozenset[int], bool] | None = None


def _tags_to_read(config: Config) -> tuple[frozenset[int], bool]:
    """The elements to read for ``config``'s rules, and whether they test the file meta
    (group 0002); worked out once per configuration (one is in force at a time)."""
    global _tags_for_config
    known = _tags_for_config
    if known is None or known[0] is not config:
        tested = rules.tested_tags(config.routes)
        creators = {creator for creator in map(_private_creator, tested) if creator is not None}
        known = _tags_for_config = (config, _HEADER_TAGS | tested | creators,
                                    any(tag >> 16 == 0x0002 for tag in tested))
    return known[1], known[2]


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
                 with_meta: bool = False) -> pydicom.Dataset:
    """The data set up to its pixels (only ``tags`` if given; all if None), with the file meta
    if ``with_meta``. When the caller knows where the data set starts and how it is encoded,
    it is read from there: the receiver wrote the meta itself, and pydicom's ``dcmread``
    spends a third of a header read finding and checking it again."""
    specific: list[BaseTag | int] | None = [Tag(t) for t in tags] if tags is not None else None
    encoding = UID(syntax) if syntax else None
    if offset is None or encoding is None or not encoding.is_transfer_syntax or encoding.is_deflated:
        return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=specific)
    with open(path, "rb") as source:
        source.seek(offset)
        pixels = _PixelsAt()
        header = read_dataset(source, encoding.is_implicit_VR, encoding.is_little_endian,
                              stop_when=pixels, specific_tags=specific)
        if pixels.length is not None and pixels.length != 0xFFFFFFFF:
            # A sender that streams a file's bytes as they are (a router, a bulk sender) passes
            # a file cut short on its disk on as a data set cut short: its pixel data's length
            # says so. Refused like any data set that cannot be read (what DCMTK answers), so
            # that no corrupt image is acknowledged and forwarded. pydicom stops at the tag:
            # the value follows an 8-byte header, or 12 in explicit VR (OB, OW, UN...).
            header_size = 8 if encoding.is_implicit_VR or pixels.vr not in EXPLICIT_VR_LENGTH_32 else 12
            needed = source.tell() + header_size + pixels.length
            size = os.fstat(source.fileno()).st_size
            if needed > size:
                raise EOFError(f"truncated: its {Tag(pixels.tag)} needs {needed - size} more bytes than it has")
    if with_meta:
        header.file_meta = read_file_meta_info(path)
    return header




class _PixelsAt:
    """``stop_when`` for ``read_dataset``: stops at the pixel data (or whatever comes at or
    after its tag) and remembers that element's tag, VR and length."""

    def __init__(self) -> None:
        self.tag = 0
        self.vr: str | None = None
        self.length: int | None = None

    def __call__(self, tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag < 0x7FE00010:
            return False
        self.tag, self.vr, self.length = int(tag), vr, length
        return True


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
