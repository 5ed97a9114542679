"""The rule engine: which destinations a received instance goes to, with which tag edits.

This module owns the routing rule language: reading the ``when``, ``set`` and ``remove`` parts
of a rule from the configuration (``config.Route`` declares the rest), deciding for one
instance, explaining that decision, and applying the recorded tag edits to the copy that is
sent. It is pure: a data set and where it came from go in, a :class:`Decision` comes out; it
reads no files, opens no sockets and touches no database. ``routetest.py`` is the one place
that reads files in order to explain decisions.

Rules
=====

``routes:`` is an ordered list. Rules are tried top to bottom; the first rule whose ``when``
holds decides, unless it says ``continue: true``, in which case later rules are tried too and
their destinations are added. A rule without ``when`` matches every instance (a default rule,
usually last). An instance that no rule sends anywhere is kept in the cache and shown as
*unrouted*; it is never deleted because of a rule, except by ``discard: true``.

.. code-block:: yaml

    routes:
      - name: ct-to-central
        when:
          Modality: CT                         # a scalar: equality
          "(0008,0080)": {glob: "St Mary*"}   # a tag as (gggg,eeee), an operator mapping
          calling_ae: [CT_SCANNER1, CT_SCANNER2]   # a list: one of these
          source_ip: 10.1.0.0/16
        send_to: [central, archive]
        set: {InstitutionName: "Clinic A", "(0010,0021)": EDGE}
        remove: [PatientComments]
        continue: true
      - when: {any: [{Modality: [US, MG]}, {not: {BodyPartExamined: {present: true}}}]}
        send_to: [central]
      - when: {SeriesDescription: {regex: "(?i)scout"}}
        discard: true
      - when: {SliceThickness: {gt: 2.5}}      # matches, sends nowhere: kept as unrouted
      - send_to: [central]                     # default rule

Conditions (``when``)
---------------------
A mapping: every entry must hold (``all``). Each key is one of

* a DICOM keyword as pydicom spells it (``Modality``, ``StudyDescription``) or a tag written
  ``(gggg,eeee)`` in hexadecimal — needed for private tags. A private element is read with
  its private creator, so that its VR is known (in Implicit VR too) when pydicom's private
  dictionary has it; otherwise its bytes are read as text. File meta elements (group 0002,
  e.g. ``TransferSyntaxUID``) are looked up in the file meta information. Pixel data is not
  read when routing, so it cannot be tested;
* ``calling_ae`` / ``called_ae``: the AE titles of the association that sent the instance
  (spaces around a title are not significant, on either side: ``"CT1 "`` is ``CT1``);
* ``source_ip``: an address or network (``10.1.0.0/16``, ``fd00::/8``, ``192.168.5.20``), or a
  list of them: matches when the sender's address is inside one of them. IPv4 senders that
  reach an IPv6 socket (``::ffff:10.1.2.3``) are matched as IPv4;
* ``all: [conditions...]``, ``any: [conditions...]``, ``not: {conditions}``.

The value of a keyword, tag or AE key is a scalar (equality), a list (one of), or a mapping of
operators, all of which must hold:

========================  ===================================================================
``eq: V``                 equal to V (what a bare scalar means)
``ne: V``                 exactly ``not`` of ``eq``: also true when the element is absent
``in: [V, ...]``          equal to one of them (what a bare list means)
``glob: "St Mary*"``      shell wildcard over the whole value: ``*``, ``?``, ``[abc]``
``regex: "(?i)scout"``    Python regular expression found anywhere in the value (anchor
                          with ``^...$``); ``(?i)`` makes it case-insensitive
``lt/le/gt/ge: N``        numeric comparison; a value that is not a number does not match
                          (dates and times: see below)
``present: true|false``   the element exists and has a non-empty value (or not)
========================  ===================================================================

Values are compared as the text written in the file: YAML's guesses do not apply, so
``PatientID: 00123`` means the text ``00123`` and ``BurnedInAnnotation: NO`` the text ``NO``.
The spaces that pad a DICOM value are not part of it, in the file or in the rule (trailing ones
for LT, ST and UT, leading ones too for the others).
Comparisons are case-sensitive (code strings such as ``Modality`` are upper case by definition,
and AE titles are case-sensitive); use ``regex`` with ``(?i)`` when case must not matter. For numeric elements (VR
IS, DS, US, SS, UL, SL, UV, SV, FL, FD), ``eq``/``ne``/``in`` compare numbers, so ``SliceThickness:
2.5`` matches ``2.50``. A float is seen as the shortest text its precision holds: an FL (32
bits) of 29.97 is ``29.97``, not ``29.969999313354492``.

Dates (DA, ``StudyDate: {ge: 20240101}``), times (TM) and date-times (DT) compare as numbers
with ``lt``/``le``/``gt``/``ge``, each side written out in full first: a date as YYYYMMDD; a time
as HHMMSS.FFFFFF, so ``1015`` (10:15, a valid short form) is ``101500`` and ``StudyTime: {ge:
100000}`` holds for it, and ``{ge: 1000}`` means 10:00 too; a date-time as
YYYYMMDDHHMMSS.FFFFFF, a missing month or day taken as 01 and missing time as 00, its UTC offset
left aside. An operand that is no such date or time is an error at load; ``eq``, ``in`` and the
text operators see the value as written.

An ``eq``, ``ne`` or ``in`` value that the element cannot hold, so that it would never match, is
an error at load too: a code string (CS) not in upper case (``Modality: ct``), a date (DA) not
YYYYMMDD (``StudyDate: 2024-01-01``), a time or date-time in no form of its VR, a word for a
number (``SliceThickness: thin``) or a fraction for an integer (IS, US...), an age (AS) not like
``045Y``, a UID (UI) that is not numbers and dots, an empty value (which matches nothing: an
empty element counts as absent). Free text (LO, SH, PN...) of any form is taken, and ``glob``
and ``regex`` operands are patterns, not values.

An absent element never makes a rule fail with an error: it simply matches nothing except
``present: false`` and ``ne``. An element that is present but empty (a DICOM type 2 element)
counts as not present. A multi-valued element (``ImageType``, VM > 1) matches when *any* of
its values matches; text operators also see the whole value joined by backslashes, so
``ImageType: 'DERIVED\\SECONDARY'`` tests the exact value. Each operator of a mapping is checked
on its own: ``{ge: 1, lt: 5}`` on a multi-valued element may be met by different values.
Sequences and binary elements (OB, OW, ...) can only be tested with ``present``.

Actions
-------
* ``send_to: [destination, ...]`` — fan-out; over ``continue`` rules the destinations add up.
* ``set: {keyword or tag: value}`` and ``remove: [keyword or tag, ...]`` — edits made to the
  copy sent to *this rule's* destinations; the cached original is never changed. A value is
  checked against the element's VR when the configuration is loaded, and their number against
  its VM (``PixelSpacing: [0.5, 0.5]``); a list sets several values; ``""`` sets an empty value.
  Within one rule removals happen before ``set``; when two matching rules send to the same
  destination, their edits apply in rule order (the later rule wins for the same tag). Non-ASCII
  text switches the copy to UTF-8 (``ISO_IR 192``) when its character set cannot hold it.
  Command elements (group 0000), file meta, sequences, binary elements, private tags (for
  ``set``), pixel data (``PixelData``, ``FloatPixelData``, ``DoubleFloatPixelData``: sent as
  they are) and what describes it (``Rows``, ``Columns``, ``BitsAllocated``, ``BitsStored``,
  ``HighBit``, ``SamplesPerPixel``, ``PhotometricInterpretation``, ``PixelRepresentation``,
  ``PlanarConfiguration``, ``NumberOfFrames``, the palette color lookup tables),
  ``SOPClassUID``, ``SOPInstanceUID`` and ``SpecificCharacterSet`` cannot be edited; elements
  after the pixel data (a private group 7FE1) can.
* ``discard: true`` — the instance is sent nowhere, not even to destinations named by earlier
  ``continue`` rules; evaluation stops.
* ``continue: true`` — keep evaluating the following rules after this one matched.
* ``stable_after: 2m`` — recorded per destination (the longest of the matching rules) for the
  forwarder to hold the instance's study until no new instance of it has arrived for that long;
  it needs ``send_to``.
"""

from __future__ import annotations

import difflib
import fnmatch
import ipaddress
import json
import math
import re
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydicom import config as pydicom_config
from pydicom import datadict, valuerep
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .valuetypes import is_ae_title
from .yamlschema import INVALID, Context, describe, join, mapping_items, scalar_value

if TYPE_CHECKING:
    from .config import Route

__all__ = [
    "AllOf", "AnyOf", "Condition", "Decision", "Delivery", "ElementCondition", "Evaluation", "MatchedRule",
    "NotOf", "Origin", "OriginCondition", "OriginLike", "RuleOutcome", "SourceIPCondition", "TagEdit", "TagRef",
    "Trace", "ValueTest", "apply_edits", "check", "decide", "evaluate", "explain", "parse_tag", "read_condition",
    "read_tag_edits", "read_tag_list", "route_problems", "tested_tags", "value_problem",
]


# ---- where an instance came from ---------------------------------------------------------------

class OriginLike(Protocol):
    """Anything that says which association delivered an instance (the receiver has its own)."""

    @property
    def calling_ae(self) -> str: ...
    @property
    def called_ae(self) -> str: ...
    @property
    def source_ip(self) -> str: ...


@dataclass(frozen=True)
class Origin:
    """The association an instance arrived on; empty strings when unknown (route-test)."""

    calling_ae: str = ""
    called_ae: str = ""
    source_ip: str = ""


# ---- tags --------------------------------------------------------------------------------------

_TAG_TEXT = re.compile(r"\(\s*([0-9A-Fa-f]{4})\s*,\s*([0-9A-Fa-f]{4})\s*\)")


@dataclass(frozen=True)
class TagRef:
    """A data element named in a rule: its tag, and its keyword when the dictionary has one."""

    tag: int
    keyword: str = ""

    @property
    def hex(self) -> str:
        return f"({self.tag >> 16:04X},{self.tag & 0xFFFF:04X})"

    @property
    def vr(self) -> str | None:
        """The dictionary VR (``"US or SS"`` for ambiguous ones), None for unknown tags."""
        try:
            return str(datadict.dictionary_VR(self.tag))
        except KeyError:
            return None

    def __str__(self) -> str:
        return self.keyword or self.hex


def parse_tag(text: str) -> TagRef:
    """``Modality`` or ``(0008,0060)`` -> :class:`TagRef`; ValueError says what is wrong."""
    match = _TAG_TEXT.fullmatch(text.strip())
    if match:
        tag = int(match.group(1) + match.group(2), 16)
        keyword = datadict.keyword_for_tag(tag) if datadict.dictionary_has_tag(tag) else ""
        return TagRef(tag, keyword)
    if text.startswith("(") or re.fullmatch(r"[0-9A-Fa-f]{4}\s*,?\s*[0-9A-Fa-f]{4}", text.strip()):
        raise ValueError(f'malformed tag "{text}" (write a tag as (gggg,eeee) in hexadecimal, e.g. (0008,0080))')
    found = datadict.tag_for_keyword(text)
    if found is None:
        close = difflib.get_close_matches(text, datadict.keyword_dict.keys(), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise ValueError(f'unknown DICOM keyword "{text}"{hint}')
    return TagRef(found, text)


# ---- conditions (parsed forms) -----------------------------------------------------------------

Operator = Literal["eq", "ne", "in", "glob", "regex", "lt", "le", "gt", "ge", "present"]
OPERATORS: tuple[str, ...] = ("eq", "ne", "in", "glob", "regex", "lt", "le", "gt", "ge", "present")
_NUMERIC_OPERATORS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">="}


@dataclass(frozen=True)
class ValueTest:
    """One operator and its operand: text for eq/ne/glob, a tuple of texts for in, a compiled
    pattern for regex, the number as written for lt/le/gt/ge, a bool for present."""

    operator: Operator
    operand: Any

    def __str__(self) -> str:
        op, value = self.operator, self.operand
        if op == "present":
            return "present" if value else "absent"
        if op == "in":
            return "in [" + ", ".join(_quote(v) for v in value) + "]"
        if op == "regex":
            return f"regex {_quote(value.pattern)}"
        if op in _NUMERIC_OPERATORS:
            return f"{_NUMERIC_OPERATORS[op]} {value}"
        return f"{op} {_quote(value)}"


@dataclass(frozen=True)
class ElementCondition:
    """Tests on one data element of the instance."""

    element: TagRef
    tests: tuple[ValueTest, ...]


@dataclass(frozen=True)
class OriginCondition:
    """Tests on the calling or called AE title of the association."""

    field: Literal["calling_ae", "called_ae"]
    tests: tuple[ValueTest, ...]


@dataclass(frozen=True)
class SourceIPCondition:
    """The sender's address lies in one of these networks."""

    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True)
class AllOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class NotOf:
    condition: Condition


Condition = ElementCondition | OriginCondition | SourceIPCondition | AllOf | AnyOf | NotOf


# ---- tag edits (parsed forms) ------------------------------------------------------------------

@dataclass(frozen=True)
class TagEdit:
    """Set an element to ``value`` (checked against ``vr`` at load), or remove it."""

    action: Literal["set", "remove"]
    element: TagRef
    vr: str = ""
    value: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.action == "remove":
            return f"remove {self.element}"
        if not self.value:
            return f"set {self.element} empty"
        shown = _quote(self.value[0]) if len(self.value) == 1 else "[" + ", ".join(map(_quote, self.value)) + "]"
        return f"set {self.element} = {shown}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"action": self.action, "tag": self.element.hex}
        if self.element.keyword:
            data["keyword"] = self.element.keyword
        if self.action == "set":
            data["vr"] = self.vr
            data["value"] = list(self.value)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TagEdit:
        match = _TAG_TEXT.fullmatch(data["tag"])
        if not match or data["action"] not in ("set", "remove"):
            raise ValueError(f"not a recorded tag edit: {data!r}")
        element = TagRef(int(match.group(1) + match.group(2), 16), data.get("keyword", ""))
        if data["action"] == "remove":
            return cls("remove", element)
        return cls("set", element, str(data["vr"]), tuple(str(v) for v in data["value"]))


# ---- reading rules from the configuration ------------------------------------------------------

# Element VRs whose values are numbers: eq/ne/in compare them numerically.
_NUMERIC_VRS = {"IS", "DS", "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"}
_INTEGER_RANGES = {
    "US": (0, 2**16 - 1), "SS": (-(2**15), 2**15 - 1), "UL": (0, 2**32 - 1), "SL": (-(2**31), 2**31 - 1),
    "UV": (0, 2**64 - 1), "SV": (-(2**63), 2**63 - 1), "IS": (-(2**31), 2**31 - 1),
}
# Text VRs whose single value may hold a backslash (they are never multi-valued).
_FREE_TEXT_VRS = {"LT", "ST", "UT"}
_SETTABLE_VRS = {
    "AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT",
    "US", "SS", "UL", "SL", "UV", "SV", "FL", "FD",
}
# A C-STORE is addressed by these; the character set is managed by apply_edits.
_PROTECTED = {
    0x00080016: "the SOP Class UID addresses the C-STORE and cannot be edited",
    0x00080018: "the SOP Instance UID addresses the C-STORE and cannot be edited",
    0x00080005: "the character set is chosen by the appliance when an edit needs it",
}
# The forwarder copies the pixel data from the cached file as it is (streamed, or decoded a
# frame at a time); an edit of it would be silently left out. Float Pixel Data, Double Float
# Pixel Data, Pixel Data.
_PIXEL_DATA = {0x7FE00008, 0x7FE00009, 0x7FE00010}
# What says how to read those pixels (the Image Pixel module, PS3.3 C.7.6.3, and the palette of
# PALETTE COLOR images): a copy with one of them edited would describe its pixels wrongly.
_DESCRIBES_PIXELS = {
    0x00280002,  # SamplesPerPixel
    0x00280004,  # PhotometricInterpretation
    0x00280006,  # PlanarConfiguration
    0x00280008,  # NumberOfFrames
    0x00280010,  # Rows
    0x00280011,  # Columns
    0x00280100,  # BitsAllocated
    0x00280101,  # BitsStored
    0x00280102,  # HighBit
    0x00280103,  # PixelRepresentation
    0x00281101, 0x00281102, 0x00281103,  # Red, Green, Blue Palette Color Lookup Table Descriptor
    0x00281201, 0x00281202, 0x00281203,  # Red, Green, Blue Palette Color Lookup Table Data
    0x00281221, 0x00281222, 0x00281223,  # Segmented Red, Green, Blue Palette Color Lookup Table Data
}


def _failed(value: object) -> bool:
    """Whether a read returned INVALID (its problem is already reported)."""
    return value is INVALID


def read_condition(node: Node, path: str, ctx: Context) -> Condition:
    """Read a rule's ``when``: a mapping of conditions (see the module docstring)."""
    if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
        ctx.error(node, path, "expected a mapping of conditions, got nothing "
                              "(leave out `when` for a rule that matches every instance)")
        return INVALID
    return _read_conditions(node, path, ctx, node)


def _read_conditions(node: Node, path: str, ctx: Context, at: Node) -> Condition:
    if not isinstance(node, MappingNode):
        ctx.error(at, path, f"expected a mapping of conditions, got {describe(node)}")
        return INVALID
    if not node.value:
        ctx.error(at, path, "expected at least one condition, got an empty mapping")
        return INVALID
    parts: list[Condition] = []
    for key, key_node, value_node in mapping_items(node, path, ctx):
        parts.append(_read_one(key, key_node, value_node, join(path, key), ctx))
    if any(p is INVALID for p in parts) or len(parts) < len(node.value):
        return INVALID
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def _read_one(key: str, key_node: Node, node: Node, path: str, ctx: Context) -> Condition:
    if key in ("all", "any"):
        if not isinstance(node, SequenceNode) or not node.value:
            ctx.error(key_node, path, f"expected a non-empty list of conditions, got {describe(node)}")
            return INVALID
        items = [_read_conditions(item, f"{path}[{i}]", ctx, item) for i, item in enumerate(node.value)]
        if any(i is INVALID for i in items):
            return INVALID
        return AllOf(tuple(items)) if key == "all" else AnyOf(tuple(items))
    if key == "not":
        inner = _read_conditions(node, path, ctx, key_node)
        return INVALID if inner is INVALID else NotOf(inner)
    if key == "source_ip":
        return _read_networks(key_node, node, path, ctx)
    if key in ("calling_ae", "called_ae"):
        tests = _read_tests(key_node, node, path, ctx, key, None, None)
        if _failed(tests):
            return INVALID
        # Spaces around an AE title are not significant (PS3.5 6.2), and the association's
        # titles are compared without them.
        tests = _without_padding(tests, str.strip)
        for test in tests:
            titles = test.operand if test.operator == "in" else (test.operand,)
            if test.operator in ("eq", "ne", "in") and not all(is_ae_title(t) for t in titles):
                bad = next(t for t in titles if not is_ae_title(t))
                ctx.error(key_node, path, f'expected an AE title (1-16 printable ASCII characters, no backslash), '
                                          f'got "{bad}"')
                return INVALID
        return OriginCondition(key, tests)  # type: ignore[arg-type]
    try:
        element = parse_tag(key)
    except ValueError as exc:
        ctx.error(key_node, path, str(exc))
        return INVALID
    if element.tag >> 16 == 0x7FE0:
        ctx.error(key_node, path, "pixel data is not read when routing and cannot be tested")
        return INVALID
    if element.tag > 0x7FE00010:
        # The header is read up to the pixel data (reading on would walk every frame).
        ctx.error(key_node, path, f"{element} comes after the pixel data, which is not read when routing:"
                                  " it cannot be tested")
        return INVALID
    tests = _read_tests(key_node, node, path, ctx, str(element), element.vr,
                        lambda text: _operand_problem(str(element), element.vr, text))
    if _failed(tests):
        return INVALID
    # The element's values are compared without their padding; so is what the rule says.
    return ElementCondition(element, _without_padding(tests, str.rstrip if element.vr in _FREE_TEXT_VRS
                                                               else str.strip))


def _without_padding(tests: tuple[ValueTest, ...], strip: Callable[[str], str]) -> tuple[ValueTest, ...]:
    """``tests`` with the spaces around their values (not their patterns) taken off."""
    def stripped(test: ValueTest) -> ValueTest:
        if test.operator in ("eq", "ne", "glob"):
            return ValueTest(test.operator, strip(test.operand))
        if test.operator == "in":
            return ValueTest("in", tuple(strip(v) for v in test.operand))
        return test
    return tuple(stripped(t) for t in tests)


OperandCheck = Callable[[str], str | None]


def _read_tests(key_node: Node, node: Node, path: str, ctx: Context, name: str, vr: str | None,
                check_operand: OperandCheck | None) -> tuple[ValueTest, ...]:
    """The tests of one condition; ``check_operand`` says what is wrong with an eq, ne or in
    operand (a value the element cannot hold), or None."""
    if isinstance(node, ScalarNode):
        if node.tag.endswith(":null"):
            ctx.error(key_node, path, f"expected a value, a list or a mapping of operators, got nothing "
                                      f"(to test that {name} is absent write {{present: false}})")
            return INVALID
        if _bad_operands(check_operand, [(key_node, path, node.value)], ctx):
            return INVALID
        tests: tuple[ValueTest, ...] = (ValueTest("eq", node.value),)
    elif isinstance(node, SequenceNode):
        values = _read_texts(key_node, node, path, ctx)
        if _failed(values) or _bad_operands(check_operand, _items(node, path), ctx):
            return INVALID
        tests = (ValueTest("in", values),)
    else:
        assert isinstance(node, MappingNode)
        items = mapping_items(node, path, ctx)
        if not node.value:
            ctx.error(key_node, path, "expected at least one operator, got an empty mapping")
            return INVALID
        read = [_read_test(op, op_node, value, join(path, op), ctx, name, vr, check_operand)
                for op, op_node, value in items]
        if any(t is INVALID for t in read) or len(read) < len(node.value):
            return INVALID
        tests = tuple(read)
    if vr is not None and (vr == "SQ" or vr.startswith("O") or vr == "UN"):
        for test in tests:
            if test.operator != "present":
                what = "a sequence" if vr == "SQ" else f"binary (VR {vr})"
                ctx.error(key_node, path, f"{name} is {what}; it can only be tested with `present`")
                return INVALID
    return tests


def _read_test(op: str, op_node: Node, node: Node, path: str, ctx: Context, name: str, vr: str | None,
               check_operand: OperandCheck | None) -> ValueTest:
    if op not in OPERATORS:
        ctx.error(op_node, path, f'unknown operator "{op}" (operators: {", ".join(OPERATORS)})')
        return INVALID
    if op == "in":
        values = _read_texts(op_node, node, path, ctx)
        if _failed(values) or _bad_operands(check_operand, _items(node, path), ctx):
            return INVALID
        return ValueTest("in", values)
    if not isinstance(node, ScalarNode) or node.tag.endswith(":null"):
        ctx.error(op_node, path, f"expected a single value, got {describe(node)}")
        return INVALID
    text = node.value
    if op == "present":
        flag = scalar_value(node)
        if not isinstance(flag, bool):
            ctx.error(op_node, path, f"expected true or false, got {describe(node)}")
            return INVALID
        return ValueTest("present", flag)
    if op == "regex":
        try:
            return ValueTest("regex", re.compile(text))
        except (re.error, OverflowError) as exc:  # OverflowError: a{4294967296}
            ctx.error(op_node, path, f"invalid regular expression: {exc}")
            return INVALID
        except RecursionError:  # Python's parser recurses once per nested group
            ctx.error(op_node, path, "invalid regular expression: nested too deeply")
            return INVALID
    if op in _NUMERIC_OPERATORS:
        if vr in _TIME_VRS:
            if _comparable(text, vr) is None:
                ctx.error(op_node, path, f"expected {_VR_FORMS[vr]} to compare {name} with, got {describe(node)}")
                return INVALID
        elif _comparable(text, None) is None:
            ctx.error(op_node, path, f"expected a number, got {describe(node)}")
            return INVALID
        return ValueTest(op, text)  # type: ignore[arg-type]
    if op in ("eq", "ne") and _bad_operands(check_operand, [(op_node, path, text)], ctx):
        return INVALID
    return ValueTest(op, text)  # type: ignore[arg-type]


def _items(node: Node, path: str) -> list[tuple[Node, str, str]]:
    """(item node, path, text) of a list of values already read by :func:`_read_texts`."""
    return [(item, f"{path}[{i}]", item.value) for i, item in enumerate(node.value)]


def _bad_operands(check_operand: OperandCheck | None, operands: list[tuple[Node, str, str]], ctx: Context) -> bool:
    """Report the first operand (its node, path, text) the element cannot hold; True if any."""
    if check_operand is None:
        return False
    for at, path, text in operands:
        problem = check_operand(text)
        if problem:
            ctx.error(at, path, problem)
            return True
    return False


_INTEGER_VRS = {"IS", "US", "SS", "UL", "SL", "UV", "SV"}
_US_DATE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")


def _operand_problem(name: str, vr: str | None, text: str) -> str | None:
    """Why the element ``name`` (VR ``vr``) cannot hold ``text``, an eq/ne/in operand, so that
    eq and in never match it: None when it can. Only the forms each VR fixes are checked
    (code strings, dates and times, numbers, ages, UIDs); free text of any length can match a
    value a modality wrote, valid or not. A multi-valued operand (with backslashes) is checked
    value by value."""
    stripped = text.rstrip() if vr in _FREE_TEXT_VRS else text.strip()
    if not stripped:
        return (f"an empty value matches nothing (an empty element counts as absent): to test that {name} is "
                "empty or absent write {present: false}")
    if vr is None or vr in _FREE_TEXT_VRS:
        return None
    for part in (p.strip() for p in stripped.split("\\")):
        expected = _operand_form(vr, part)
        if expected:
            return f'{name} (VR {vr}) cannot hold "{part}": {expected}'
    return None


def _operand_form(vr: str, text: str) -> str | None:
    """What a value of VR ``vr`` ("US or SS" for ambiguous ones) looks like when ``text`` is
    none, in words; None when it is one (or the VR fixes no form)."""
    vrs = vr.split(" or ")
    if all(v in _NUMERIC_VRS for v in vrs):
        number = _comparable(text, None)
        if number is None or not number.is_finite():
            return "expected a number"
        if all(v in _INTEGER_VRS for v in vrs):
            if number != number.to_integral_value():
                return "expected an integer"
            # IS is text: what a modality wrote in it may lie outside the standard's range.
            bounds = [_INTEGER_RANGES[v] for v in vrs if v != "IS"]
            if bounds:
                low, high = min(b[0] for b in bounds), max(b[1] for b in bounds)
                if not low <= number <= high:
                    return f"expected an integer from {low} to {high}"
        return None
    if vr in _TIME_VRS:
        if _comparable(text, vr) is not None:
            return None
        us_date = _US_DATE.fullmatch(text)
        hint = f" (write {''.join(us_date.groups())})" if vr == "DA" and us_date else ""
        return f"expected {_VR_FORMS[vr]}{hint}"
    if vr == "UI":
        # Leading zeros in a component are not allowed, yet some UIDs in the wild have them.
        if re.fullmatch(r"[0-9]+(?:\.[0-9]+)*", text) and len(text) <= 64:
            return None
        return "expected a UID: numbers separated by dots, up to 64 characters"
    if vr in ("CS", "AS"):
        problem = value_problem(vr, text)
        if problem and vr == "CS" and value_problem(vr, text.upper()) is None:
            problem += f' (write "{text.upper()}"; for a match that ignores case write {{regex: "(?i)^{text}$"}})'
        return problem
    return None


def _read_texts(at: Node, node: Node, path: str, ctx: Context) -> tuple[str, ...]:
    """A non-empty list of scalar values, as written."""
    if not isinstance(node, SequenceNode) or not node.value:
        ctx.error(at, path, f"expected a non-empty list of values, got {describe(node)}")
        return INVALID
    values = []
    for i, item in enumerate(node.value):
        if not isinstance(item, ScalarNode) or item.tag.endswith(":null"):
            ctx.error(item, f"{path}[{i}]", f"expected a value, got {describe(item)}")
            return INVALID
        values.append(item.value)
    return tuple(values)


def _read_networks(key_node: Node, node: Node, path: str, ctx: Context) -> SourceIPCondition:
    # `{in: [...]}` reads the same as the bare list, for those who write operators everywhere.
    if isinstance(node, MappingNode) and len(node.value) == 1 and getattr(node.value[0][0], "value", None) == "in":
        key_node, node = node.value[0]
        path = join(path, "in")
    if isinstance(node, ScalarNode) and not node.tag.endswith(":null"):
        items: list[tuple[Node, str]] = [(key_node, path)]
        texts = [node.value]
    elif isinstance(node, SequenceNode) and node.value:
        items = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        texts = [getattr(item, "value", None) for item in node.value]
    else:
        ctx.error(key_node, path, f"expected a network such as 10.1.0.0/16 or a list of them, got {describe(node)}")
        return INVALID
    networks = []
    for (at, where), text in zip(items, texts, strict=True):
        try:
            if not isinstance(text, str):
                raise ValueError(text)
            networks.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            shown = f'"{text}"' if isinstance(text, str) else describe(at)
            ctx.error(at, where, f"expected an address or network such as 10.1.0.0/16 or fd00::/8, got {shown}")
            return INVALID
    return SourceIPCondition(tuple(networks))


def read_tag_edits(node: Node, path: str, ctx: Context) -> tuple[TagEdit, ...]:
    """Read a rule's ``set``: a mapping of keyword or tag to a value (or list of values)."""
    if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
        return ()
    if not isinstance(node, MappingNode):
        ctx.error(node, path, f"expected a mapping of keyword or tag to value, got {describe(node)}")
        return INVALID
    edits: list[TagEdit] = []
    ok = True
    for key, key_node, value_node in mapping_items(node, path, ctx):
        edit = _read_set(key, key_node, value_node, join(path, key), ctx)
        if _failed(edit):
            ok = False
        else:
            edits.append(edit)
    if not ok or len(edits) < len(node.value):
        return INVALID
    return tuple(edits)


def _editable(key: str, at: Node, path: str, ctx: Context) -> TagRef:
    try:
        element = parse_tag(key)
    except ValueError as exc:
        ctx.error(at, path, str(exc))
        return INVALID
    if element.tag >> 16 == 0x0002:
        ctx.error(at, path, "file meta information (group 0002) cannot be edited")
        return INVALID
    if element.tag >> 16 == 0x0000:
        # The C-STORE request is built by the forwarder; one in the data set makes it invalid.
        ctx.error(at, path, "command elements (group 0000) belong to the DIMSE message, not to the data set, "
                            "and cannot be edited")
        return INVALID
    if element.tag in _PROTECTED:
        ctx.error(at, path, _PROTECTED[element.tag])
        return INVALID
    if element.tag in _PIXEL_DATA:
        ctx.error(at, path, f"{element} is sent as it is; pixel data cannot be edited")
        return INVALID
    if element.tag in _DESCRIBES_PIXELS:
        ctx.error(at, path, f"{element} describes the pixel data, which is sent as it is: a copy with it edited "
                            "would describe its pixels wrongly")
        return INVALID
    return element


def _read_set(key: str, key_node: Node, node: Node, path: str, ctx: Context) -> TagEdit:
    element = _editable(key, key_node, path, ctx)
    if _failed(element):
        return INVALID
    vr = element.vr
    if vr is None:
        ctx.error(key_node, path, f"{element} is not in the DICOM dictionary, so its VR is unknown: "
                                  "private elements can be removed but not set")
        return INVALID
    if vr not in _SETTABLE_VRS:
        what = "a sequence" if vr == "SQ" else f"of VR {vr}"
        ctx.error(key_node, path, f"{element} is {what}; only text and number elements can be set")
        return INVALID
    if isinstance(node, ScalarNode):
        values: tuple[str, ...] = () if node.tag.endswith(":null") or node.value == "" else (node.value,)
    elif isinstance(node, SequenceNode):
        texts = _read_texts(key_node, node, path, ctx)
        if _failed(texts):
            return INVALID
        values = texts
    else:
        ctx.error(key_node, path, f"expected a value or a list of values, got {describe(node)}")
        return INVALID
    takes = _values_taken(element, len(values)) if values else None  # "" sets an empty value
    if takes:
        got = f"a list of {len(values)}" if isinstance(node, SequenceNode) else "one (write the values as a list)"
        ctx.error(key_node, path, f"{element} takes {takes}, got {got}")
        return INVALID
    for i, text in enumerate(values):
        problem = value_problem(vr, text)
        if problem:
            where = f"{path}[{i}]" if isinstance(node, SequenceNode) else path
            ctx.error(node.value[i] if isinstance(node, SequenceNode) else key_node, where,
                      f'"{text}" does not fit {element} (VR {vr}): {problem}')
            return INVALID
    return TagEdit("set", element, vr, values)


def _values_taken(element: TagRef, count: int) -> str | None:
    """How many values ``element`` takes, in words, when ``count`` is not one of them (its VM in
    the DICOM dictionary: "2", "1-3", "2-n", "2-2n" ...); None when it is."""
    try:
        vm = str(datadict.dictionary_VM(element.tag))
    except KeyError:
        return None
    if match := re.fullmatch(r"(\d+)", vm):
        exact = int(match.group(1))
        if count == exact:
            return None
        return "one value" if exact == 1 else f"{exact} values"
    if match := re.fullmatch(r"(\d+)-(\d+)", vm):
        low, high = int(match.group(1)), int(match.group(2))
        return None if low <= count <= high else f"{low} to {high} values"
    if match := re.fullmatch(r"(\d+)-n", vm):
        low = int(match.group(1))
        return None if count >= low else f"{low} or more values"
    if match := re.fullmatch(r"(\d+)-(\d+)n", vm):
        step = int(match.group(2))
        if count >= int(match.group(1)) and count % step == 0:
            return None
        group = {2: "pairs", 3: "triplets"}.get(step, f"groups of {step}")
        return f"{group} of values ({step}, {2 * step}, {3 * step} ...)"
    return None


def value_problem(vr: str, text: str) -> str | None:
    """What is wrong with ``text`` as one value of an element of VR ``vr``, or None."""
    if vr in _INTEGER_RANGES:
        try:
            number = int(text.strip())
        except ValueError:
            return "expected an integer"
        low, high = _INTEGER_RANGES[vr]
        if not low <= number <= high:
            return f"expected an integer from {low} to {high}"
        if vr != "IS":
            return None
    if vr in ("FL", "FD"):
        number_f = _number(text)
        return None if number_f is not None and math.isfinite(number_f) else "expected a number"
    if "\\" in text and vr not in _FREE_TEXT_VRS:
        return "a backslash separates values; write several values as a list"
    allowed = "\t\n\f\r\x1b" if vr in _FREE_TEXT_VRS else "\x1b"
    if any((ord(ch) < 0x20 or ord(ch) == 0x7F) and ch not in allowed for ch in text):
        return "control characters are not allowed"
    if vr == "PN" and any(group.count("^") > 4 for group in text.split("=")):
        # pydicom counts the groups (alphabetic=ideographic=phonetic), not their components.
        return "a person name has at most 5 components (family^given^middle^prefix^suffix)"
    try:
        valuerep.validate_value(vr, text, pydicom_config.RAISE)
    except ValueError as exc:
        if vr in _VR_FORMS and str(exc).startswith("Invalid value"):
            return f"expected {_VR_FORMS[vr]}"
        # pydicom's words (a length limit), without its link to the standard.
        return str(exc).split(" Please see")[0].rstrip(".")
    return None


# What a value of each VR looks like, for errors (PS3.5 table 6.2-1).
_VR_FORMS = {
    "AE": "an AE title (up to 16 characters, no backslash)",
    "AS": "an age such as 045Y (3 digits and D, W, M or Y)",
    "CS": "a code string: upper-case letters, digits, space and underscore, up to 16 characters",
    "DA": "a date YYYYMMDD",
    "DS": "a decimal number such as 2.5 (up to 16 characters)",
    "DT": "a date and time YYYYMMDDHHMMSS.FFFFFF&ZZXX (trailing parts optional)",
    "IS": "an integer",
    "TM": "a time HHMMSS.FFFFFF (trailing parts optional)",
    "UI": "a UID: numbers separated by dots, no leading zeros, up to 64 characters",
    "UR": "a URI without spaces",
}


def read_tag_list(node: Node, path: str, ctx: Context) -> tuple[TagRef, ...]:
    """Read a rule's ``remove``: a list of keywords or tags (private tags allowed)."""
    if isinstance(node, ScalarNode) and node.tag.endswith(":null"):
        return ()
    if not isinstance(node, SequenceNode):
        ctx.error(node, path, f"expected a list of keywords or tags, got {describe(node)}")
        return INVALID
    elements: list[TagRef] = []
    seen: dict[int, int] = {}
    ok = True
    for i, item in enumerate(node.value):
        where = f"{path}[{i}]"
        if not isinstance(item, ScalarNode) or item.tag.endswith(":null"):
            ctx.error(item, where, f"expected a keyword or tag, got {describe(item)}")
            ok = False
            continue
        element = _editable(item.value, item, where, ctx)
        if _failed(element):
            ok = False
            continue
        if element.tag in seen:
            ctx.error(item, where, f"{element} is already listed at {path}[{seen[element.tag]}]")
            ok = False
            continue
        seen[element.tag] = i
        elements.append(element)
    return tuple(elements) if ok else INVALID


def route_problems(route: Route) -> list[tuple[str, str]]:
    """Contradictions within one read rule, as (key, message): checks that span its keys, for
    the configuration's cross-checks to report at that key."""
    problems = []
    removed = {e.tag for e in _removals(route)}
    for edit in _sets(route):
        if edit.element.tag in removed:
            problems.append(("set", f"{edit.element} is both set and removed"))
    if (_sets(route) or _removals(route)) and not route.send_to:
        key = "set" if _sets(route) else "remove"
        problems.append((key, "tag edits apply to this rule's send_to destinations, and it has none"))
    if route.discard and route.continue_:
        problems.append(("continue", "a rule that discards stops evaluation; it cannot continue"))
    if route.stable_after is not None and not route.send_to:
        problems.append(("stable_after", "stable_after needs send_to: it holds the study for this rule's "
                                         "destinations, and it has none"))
    return problems


# ---- evaluating --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Trace:
    """How one condition came out: what was tested, the value seen, and the parts' traces."""

    matched: bool
    test: str
    seen: str = ""
    parts: tuple[Trace, ...] = ()

    def lines(self, indent: str = "") -> list[str]:
        mark = "yes" if self.matched else "no "
        seen = f"  ({self.seen})" if self.seen else ""
        out = [f"{indent}{mark} {self.test}{seen}"]
        for part in self.parts:
            out.extend(part.lines(indent + "    "))
        return out


@dataclass(frozen=True)
class _Observed:
    """An element's (or AE title's) values as the operators see them."""

    name: str
    present: bool
    texts: tuple[str, ...]
    vr: str  # "" for an AE title of the association
    shown: str


def check(condition: Condition, dataset: Dataset, origin: OriginLike) -> Trace:
    """Evaluate a condition completely (no short cut, so the trace shows every part)."""
    if isinstance(condition, AllOf | AnyOf):
        parts = tuple(check(c, dataset, origin) for c in condition.conditions)
        results = [p.matched for p in parts]
        if isinstance(condition, AllOf):
            return Trace(all(results), "all of:", parts=parts)
        return Trace(any(results), "any of:", parts=parts)
    if isinstance(condition, NotOf):
        inner = check(condition.condition, dataset, origin)
        return Trace(not inner.matched, "not:", parts=(inner,))
    if isinstance(condition, SourceIPCondition):
        return _check_source_ip(condition, origin.source_ip)
    if isinstance(condition, OriginCondition):
        value = str(getattr(origin, condition.field) or "").strip()
        observed = _Observed(condition.field, bool(value), (value,) if value else (), "",
                             f"{condition.field} = {_quote(value)}" if value else f"{condition.field} not given")
        return _check_tests(condition.tests, observed)
    return _check_tests(condition.tests, _observe(dataset, condition.element))


def _check_tests(tests: tuple[ValueTest, ...], observed: _Observed) -> Trace:
    parts = tuple(Trace(_test(t, observed), f"{observed.name} {t}", observed.shown) for t in tests)
    if len(parts) == 1:
        return parts[0]
    return Trace(all(p.matched for p in parts), "all of:", parts=parts)


def _test(test: ValueTest, observed: _Observed) -> bool:
    op, operand = test.operator, test.operand
    if op == "present":
        return observed.present is operand
    if op == "ne":
        return not _test(ValueTest("eq", operand), observed)
    values = observed.texts
    if op in _NUMERIC_OPERATORS:
        compare: Callable[[Decimal, Decimal], bool] = {
            "lt": lambda a, b: a < b, "le": lambda a, b: a <= b,
            "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b,
        }[op]
        bound = _comparable(operand, observed.vr)
        numbers = (_comparable(v, observed.vr) for v in values)
        return bound is not None and any(n is not None and compare(n, bound) for n in numbers)
    # Text operators also see the whole multi-valued value, so a backslash pattern can match it.
    candidates = values + ("\\".join(values),) if len(values) > 1 else values
    numeric = observed.vr in _NUMERIC_VRS
    if op == "eq":
        return any(_equal(v, operand, numeric) for v in candidates)
    if op == "in":
        return any(_equal(v, o, numeric) for v in candidates for o in operand)
    if op == "glob":
        return any(fnmatch.fnmatchcase(v, operand) for v in candidates)
    if op == "regex":
        return any(operand.search(v) for v in candidates)
    raise AssertionError(f"operator not handled: {op}")


def _equal(value: str, expected: str, numeric: bool) -> bool:
    if value == expected:
        return True
    if numeric:
        a, b = _comparable(value, None), _comparable(expected, None)
        return a is not None and b is not None and a == b
    return False


_TIME_VRS = {"DA", "TM", "DT"}
_DIGITS = re.compile(r"[0-9]+")
_FRACTION = re.compile(r"(?:\.[0-9]*)?")
_UTC_OFFSET = re.compile(r"[+-][0-9]{4}$")


def _comparable(text: str, vr: str | None) -> Decimal | None:
    """``text`` as the number lt/le/gt/ge compare, or None if it is none. Decimal, so that a
    date and time with its fraction of a second keeps every digit. A date, time or date-time
    is first written out in full (see :func:`_time_in_full`)."""
    if vr in _TIME_VRS:
        full = _time_in_full(text, vr)
        if full is None:
            return None
        text = full
    try:
        number = Decimal(text.strip())
    except InvalidOperation:
        return None
    return None if number.is_nan() else number


def _time_in_full(text: str, vr: str) -> str | None:
    """A DA, TM or DT value in its one full form, so that its digits compare as a number: DA
    YYYYMMDD; TM HHMMSS.FFFFFF, from HH, HHMM or HHMMSS with or without a fraction (PS3.5 6.2;
    10:15 may be written 1015), and the colons of the retired HH:MM:SS taken out; DT
    YYYYMMDDHHMMSS.FFFFFF, its missing month and day taken as 01 and its missing time as 00,
    its UTC offset (&ZZXX) left aside. None when ``text`` is none of these."""
    text = text.strip()
    if vr == "DT":
        text = _UTC_OFFSET.sub("", text)
    elif vr == "TM":
        text = text.replace(":", "")
    whole, dot, fraction = text.partition(".")
    if not _DIGITS.fullmatch(whole) or not _FRACTION.fullmatch(dot + fraction):
        return None
    if vr == "DA":
        return whole if len(whole) == 8 and not dot else None
    if vr == "TM":
        if len(whole) not in (2, 4, 6):
            return None
        whole = whole.ljust(6, "0")
    else:
        if len(whole) not in (4, 6, 8, 10, 12, 14):
            return None
        whole += "0101000000"[len(whole) - 4:]
    return whole + dot + fraction


def _number(text: str) -> float | None:
    try:
        number = float(text)
    except (ValueError, TypeError):
        return None
    return None if math.isnan(number) else number


# What pydicom raises when it converts a malformed raw element (wrong length for its VR, a
# sequence that does not parse, an undecodable value).
_UNREADABLE = (
    ValueError, TypeError, LookupError, UnicodeError, OverflowError, OSError, EOFError, struct.error,
    NotImplementedError, BytesLengthException, InvalidDicomError,
)


def _observe(dataset: Dataset, element: TagRef) -> _Observed:
    name = str(element)
    # The receiver reads the file with its meta information; group 0002 lives there.
    source = getattr(dataset, "file_meta", None) if element.tag >> 16 == 0x0002 else dataset
    if source is None or element.tag not in source:
        return _Observed(name, False, (), "", f"{name} absent")
    try:
        elem = source[element.tag]
        value = elem.value
    except _UNREADABLE as exc:
        # A value pydicom cannot decode is "not matching", never a refused C-STORE.
        return _Observed(name, False, (), "", f"{name} unreadable: {exc}")
    vr = str(elem.VR)
    if vr == "SQ" or isinstance(value, DicomSequence):
        count = len(value or ())
        return _Observed(name, count > 0, (), vr, f"{name} is a sequence of {count} item(s)")
    if isinstance(value, bytes | bytearray):
        if vr != "UN":
            return _Observed(name, len(value) > 0, (), vr, f"{name} = {len(value)} bytes")
        # An element pydicom does not know (private, implicit VR): read it as text.
        value = [v for v in value.decode("latin-1").rstrip("\x00 ").split("\\")] if value else []
    if value is None or value == "":
        values: list[Any] = []
    elif isinstance(value, MultiValue | list | tuple):
        values = list(value)
    else:
        values = [value]
    strip = str.rstrip if vr in _FREE_TEXT_VRS else str.strip
    # A float (FD, FL) is shown and compared as the shortest text that reads back as the same
    # value at its precision, so that an FL of 29.97 reads 29.97 and not 29.969999313354492;
    # DS and IS keep their text.
    texts = tuple(_float_text(v, vr) if type(v) is float else strip(str(v)).strip("\x00") for v in values)
    present = any(texts)
    if not present:
        shown = f"{name} empty"
    elif len(texts) == 1:
        shown = f"{name} = {_quote(texts[0])}"
    else:
        shown = f"{name} = [" + ", ".join(_quote(t) for t in texts) + "]"
    return _Observed(name, present, texts, vr, shown)


def _float_text(value: float, vr: str) -> str:
    """The shortest decimal text of ``value`` that an FL (32 bits) or an FD holds as ``value``."""
    if vr != "FL" or not math.isfinite(value):
        return repr(value)
    try:
        for digits in range(1, 10):  # 9 significant digits tell any two float32 apart
            candidate = float(f"{value:.{digits}g}")
            if struct.unpack("<f", struct.pack("<f", candidate))[0] == value:
                return repr(candidate)
    except OverflowError:  # not a 32-bit float after all (a value set in memory)
        pass
    return repr(value)


def _check_source_ip(condition: SourceIPCondition, source_ip: str) -> Trace:
    shown_networks = ", ".join(str(n) for n in condition.networks)
    test = f"source_ip in {shown_networks}" if len(condition.networks) == 1 else f"source_ip in [{shown_networks}]"
    text = str(source_ip or "").strip()
    if not text:
        return Trace(False, test, "source_ip not given")
    try:
        address = ipaddress.ip_address(text.split("%")[0])  # an IPv6 zone (%eth0) is not part of the address
    except ValueError:
        return Trace(False, test, f"source_ip = {text} (not an address)")
    addresses: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [address]
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        addresses.append(address.ipv4_mapped)
    matched = any(a in n for a in addresses for n in condition.networks)
    return Trace(matched, test, f"source_ip = {text}")


# ---- decisions ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MatchedRule:
    """A rule that matched: its position in ``routes`` and its name, if it has one."""

    index: int
    name: str | None = None

    def __str__(self) -> str:
        return f"routes[{self.index}]" + (f" {self.name}" if self.name else "")


@dataclass(frozen=True)
class Delivery:
    """One destination of an instance, with the edits for the copy sent there."""

    destination: str
    edits: tuple[TagEdit, ...] = ()
    stable_after: float | None = None


Status = Literal["routed", "discarded", "unrouted"]


def edits_to_json(edits: Sequence[TagEdit]) -> str:
    """Tag edits as recorded with a delivery (see :func:`edits_from_json`)."""
    return json.dumps([e.to_dict() for e in edits], separators=(",", ":"), ensure_ascii=False)


def edits_from_json(text: str) -> tuple[TagEdit, ...]:
    return tuple(TagEdit.from_dict(e) for e in json.loads(text))


@dataclass(frozen=True)
class Decision:
    """What the rules decided for one instance; recorded (as JSON) when it is received."""

    rules: tuple[MatchedRule, ...] = ()
    deliveries: tuple[Delivery, ...] = ()
    discarded: bool = False

    @property
    def destinations(self) -> tuple[str, ...]:
        return tuple(d.destination for d in self.deliveries)

    @property
    def status(self) -> Status:
        """routed (sent somewhere), discarded (by a rule), or unrouted (kept, sent nowhere)."""
        if self.discarded:
            return "discarded"
        return "routed" if self.deliveries else "unrouted"

    def edits_for(self, destination: str) -> tuple[TagEdit, ...]:
        for delivery in self.deliveries:
            if delivery.destination == destination:
                return delivery.edits
        raise KeyError(destination)

    def describe(self) -> str:
        """One line for logs and pages."""
        by = ", ".join(str(r) for r in self.rules)
        if self.status == "discarded":
            return f"discarded by {by}"
        if self.status == "unrouted":
            return f"unrouted (matched {by}, which send nowhere)" if self.rules else "unrouted (no rule matched)"
        return f"send to {', '.join(self.destinations)} (by {by})"

    def to_json(self) -> str:
        data = {
            "version": 1,
            "status": self.status,
            "rules": [{"index": r.index, "name": r.name} for r in self.rules],
            "discarded": self.discarded,
            "deliveries": [
                {"destination": d.destination, "stable_after": d.stable_after, "edits": [e.to_dict() for e in d.edits]}
                for d in self.deliveries
            ],
        }
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Decision:
        """The decision recorded by :meth:`to_json`; ValueError if the text is not one."""
        try:
            data = json.loads(text)
            if data.get("version") != 1:
                raise ValueError(f"unknown decision version {data.get('version')!r}")
            return cls(
                rules=tuple(MatchedRule(int(r["index"]), r.get("name")) for r in data["rules"]),
                deliveries=tuple(
                    Delivery(str(d["destination"]), tuple(TagEdit.from_dict(e) for e in d["edits"]),
                             None if d.get("stable_after") is None else float(d["stable_after"]))
                    for d in data["deliveries"]
                ),
                discarded=bool(data["discarded"]),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a recorded routing decision: {exc}") from exc


@dataclass(frozen=True)
class RuleOutcome:
    """How one rule fared for one instance; ``trace`` is None when it has no ``when`` or was
    not evaluated."""

    rule: MatchedRule
    state: Literal["matched", "not matched", "not evaluated"]
    trace: Trace | None = None


@dataclass(frozen=True)
class Evaluation:
    """The decision, with every rule's outcome: what route-test prints."""

    decision: Decision
    outcomes: tuple[RuleOutcome, ...]


def evaluate(routes: Sequence[Route], dataset: Dataset, origin: OriginLike) -> Evaluation:
    """Try the rules in order (first match wins unless ``continue``) and explain the result."""
    matched: list[MatchedRule] = []
    outcomes: list[RuleOutcome] = []
    plan: dict[str, tuple[list[TagEdit], float | None]] = {}
    discarded = False
    stopped_by: MatchedRule | None = None
    for index, route in enumerate(routes):
        rule = MatchedRule(index, route.name)
        if stopped_by is not None:
            outcomes.append(RuleOutcome(rule, "not evaluated"))
            continue
        trace = check(route.when, dataset, origin) if route.when is not None else None  # type: ignore[arg-type]
        if trace is not None and not trace.matched:
            outcomes.append(RuleOutcome(rule, "not matched", trace))
            continue
        outcomes.append(RuleOutcome(rule, "matched", trace))
        matched.append(rule)
        if route.discard:
            discarded, stopped_by = True, rule
            continue
        edits = [*_removals_as_edits(route), *_sets(route)]
        for destination in route.send_to:
            earlier, wait = plan.get(destination, ([], None))
            if route.stable_after is not None:
                wait = max(wait or 0.0, route.stable_after)
            plan[destination] = (earlier + edits, wait)
        if not route.continue_:
            stopped_by = rule
    deliveries = () if discarded else tuple(
        Delivery(name, _last_edit_per_tag(edits), wait) for name, (edits, wait) in plan.items()
    )
    return Evaluation(Decision(tuple(matched), deliveries, discarded), tuple(outcomes))


def tested_tags(routes: Sequence[Route]) -> frozenset[int]:
    """Every data element the rules' conditions look at: all that routing needs of a header."""
    found: set[int] = set()

    def walk(condition: object) -> None:
        if isinstance(condition, ElementCondition):
            found.add(condition.element.tag)
        elif isinstance(condition, AllOf | AnyOf):
            for part in condition.conditions:
                walk(part)
        elif isinstance(condition, NotOf):
            walk(condition.condition)

    for route in routes:
        walk(route.when)
    return frozenset(found)


def decide(routes: Sequence[Route], dataset: Dataset, origin: OriginLike) -> Decision:
    """The routing decision for one instance."""
    return evaluate(routes, dataset, origin).decision


def _sets(route: Route) -> tuple[TagEdit, ...]:
    edits = route.set
    return tuple(edits) if isinstance(edits, tuple) else ()  # the unset default is an empty mapping


def _removals(route: Route) -> tuple[TagRef, ...]:
    return tuple(route.remove) if isinstance(route.remove, tuple) else ()


def _removals_as_edits(route: Route) -> list[TagEdit]:
    return [TagEdit("remove", element) for element in _removals(route)]


def _last_edit_per_tag(edits: Iterable[TagEdit]) -> tuple[TagEdit, ...]:
    """Edits applied in order equal the last edit of each tag, in order of first mention."""
    final: dict[int, TagEdit] = {}
    for edit in edits:
        final[edit.element.tag] = edit
    return tuple(final.values())


# ---- applying edits ----------------------------------------------------------------------------

_TEXT_VRS_WITH_CHARSET = {"SH", "LO", "ST", "LT", "UT", "UC", "PN"}


def apply_edits(dataset: Dataset, edits: Iterable[TagEdit]) -> None:
    """Apply recorded edits to ``dataset`` in place: give it the copy being sent, never the
    cached original."""
    edits = tuple(edits)
    texts = [v for e in edits if e.action == "set" and e.vr in _TEXT_VRS_WITH_CHARSET for v in e.value]
    _make_room_for(dataset, texts)
    for edit in edits:
        tag = edit.element.tag
        if edit.action == "remove":
            if tag in dataset:
                del dataset[tag]
            continue
        values = [_python_value(edit.vr, v) for v in edit.value]
        value: Any = None if not values else values[0] if len(values) == 1 else values
        dataset[tag] = DataElement(tag, edit.vr, value)


def _python_value(vr: str, text: str) -> Any:
    if vr in _INTEGER_RANGES and vr != "IS":
        return int(text)
    if vr in ("FL", "FD"):
        return float(text)
    return text


def _make_room_for(dataset: Dataset, texts: list[str]) -> None:
    """Switch the data set to UTF-8 when its character set cannot hold the new text."""
    if all(t.isascii() for t in texts):
        return
    current = dataset.get("SpecificCharacterSet")
    terms = [current] if isinstance(current, str) else list(current or [])
    terms = [str(t).strip() for t in terms]
    # The default repertoire (no term, ISO_IR 6) is ASCII only; code extensions are not worth it.
    if len(terms) == 1 and terms[0] not in ("", "ISO_IR 6") and terms[0] in python_encoding:
        try:
            for text in texts:
                text.encode(python_encoding[terms[0]])
            return
        except UnicodeEncodeError:
            pass
    dataset.decode()  # every text value decoded under the old character set before it changes
    dataset.SpecificCharacterSet = "ISO_IR 192"


# ---- explaining --------------------------------------------------------------------------------

def explain(evaluation: Evaluation, routes: Sequence[Route]) -> list[str]:
    """The lines route-test prints for one instance: every rule, its conditions with the values
    seen, its actions, and the decision."""
    lines: list[str] = []
    stopped_by: MatchedRule | None = None
    for outcome, route in zip(evaluation.outcomes, routes, strict=True):
        rule = outcome.rule
        if outcome.state == "not evaluated":
            lines.append(f"{rule}: not evaluated ({stopped_by} matched and does not continue)")
            continue
        if outcome.trace is None:
            lines.append(f"{rule}: matched (no conditions)")
        else:
            lines.append(f"{rule}: {outcome.state}")
            trace = outcome.trace
            parts = trace.parts if trace.test == "all of:" and trace is not None else (trace,)
            for part in parts:
                lines.extend(part.lines("    "))
        if outcome.state == "matched":
            lines.append(f"    -> {_actions(route)}")
            if route.discard or not route.continue_:
                stopped_by = rule
    decision = evaluation.decision
    lines.append(f"decision: {decision.describe()}")
    for delivery in decision.deliveries:
        edits = "; ".join(str(e) for e in delivery.edits) or "no edits"
        wait = (f" (held until its study has had no new instance for {delivery.stable_after:g} s)"
                if delivery.stable_after else "")
        lines.append(f"    {delivery.destination}: {edits}{wait}")
    if decision.status == "unrouted":
        lines.append("    the instance is kept in the cache and shown as unrouted")
    return lines


def _actions(route: Route) -> str:
    if route.discard:
        return "discard"
    if route.send_to:
        words = [f"send_to {', '.join(route.send_to)}"]
    else:
        words = ["no destinations" if route.continue_ else "send nowhere (kept as unrouted)"]
    words += [str(e) for e in _removals_as_edits(route)]
    words += [str(e) for e in _sets(route)]
    if route.continue_:
        words.append("continue")
    return "; ".join(words)


def _quote(text: str) -> str:
    shown = text if len(text) <= 64 else text[:61] + "..."
    return json.dumps(shown, ensure_ascii=False)
