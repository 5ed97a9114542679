"""Every DIMSE status this appliance sends or acts on, in one table (PS3.4 Annex B, PS3.7 C)."""

from __future__ import annotations

from typing import Any

SUCCESS = 0x0000

# C-STORE (PS3.4 B.2.3)
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (disk below the low watermark, I/O error)
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # Error: data set does not match SOP class — nor the
# instance the request names (its SOP Instance UID differs), as DCMTK's storescp and Orthanc answer
CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand (unreadable data set)
DUPLICATE_SOP_INSTANCE = 0x0111  # Failure (PS3.7 C.4.5): a cached UID with on_duplicate: reject
RESOURCE_LIMITATION = 0x0213  # Failure (PS3.7 C): not performed for lack of resources — as 0xA7xx

WARNING_COERCION = 0xB000
WARNING_ELEMENTS_DISCARDED = 0xB006
WARNING_DATASET_MISMATCH = 0xB007
# General warnings (PS3.7 C.4): the operation was performed, with a remark.
WARNING_OPTIONAL_ATTRIBUTES_NOT_SUPPORTED = 0x0001
WARNING_ATTRIBUTE_LIST_ERROR = 0x0107  # PS3.7 C.4.2: attributes not recognised
WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116  # PS3.7 C.4.3
GENERAL_WARNINGS = frozenset({WARNING_OPTIONAL_ATTRIBUTES_NOT_SUPPORTED, WARNING_ATTRIBUTE_LIST_ERROR,
                              WARNING_ATTRIBUTE_VALUE_OUT_OF_RANGE})

# A-ASSOCIATE-RJ (PS3.8 9.3.4): (result, source, reason)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)  # rejected-permanent, service-user, calling AE not recognised
REJECT_CALLED_AE = (0x01, 0x01, 0x07)  # rejected-permanent, service-user, called AE not recognised
REJECT_NO_REASON = (0x01, 0x01, 0x01)  # rejected-permanent, service-user, no reason given (source IP)


# A-ASSOCIATE-RJ result: transient rejections are retried, permanent ones are dead letters.
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02
# A-ASSOCIATE-RJ source 3: the service provider's presentation layer, whose reasons are
# temporary congestion (1) and local limit exceeded (2).
SOURCE_PRESENTATION = 0x03


def describe_rejection(rj: Any) -> str:
    """An A-ASSOCIATE-RJ (pynetdicom's primitive) for a technician, with its codes for whoever
    reads PS3.8 9.3.4: "rejected permanently by the service user: called AE title not
    recognised (result 1, source 1, reason 7)"."""
    if rj is None:
        return "association rejected"
    result: Any = getattr(rj, "result", None)
    source: Any = getattr(rj, "result_source", None)
    reason: Any = getattr(rj, "diagnostic", None)
    how = {REJECTED_PERMANENT: "rejected permanently", REJECTED_TRANSIENT: "rejected for now"}.get(result, "rejected")
    who = {1: "the service user (the peer's application)", 2: "the service provider (ACSE)",
           3: "the service provider (presentation)"}.get(source, "the peer")
    why = _REJECT_REASONS.get((source, reason), "no reason given")
    return f"association {how} by {who}: {why} (result {result}, source {source}, reason {reason})"


_REJECT_REASONS = {
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised",
    (1, 7): "called AE title not recognised",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


def store_outcome(status: int) -> str:
    """What a C-STORE response status from a destination means for its delivery:

    - ``delivered``: 0x0000 success; warnings, where the PACS stored it (maybe coerced):
      0xBxxx (PS3.4 B.2.3), 0x0001, 0x0107 attribute list error, 0x0116 attribute value out
      of range (PS3.7 C.4);
    - ``retry``: 0xA7xx out of resources, and the general 0x0213 resource limitation some PACS
      answer instead: try later;
    - ``dead``: 0xA9xx, 0xCxxx and every other failure: sending the same data again will fail
      the same way, a person must look."""
    if status == SUCCESS or 0xB000 <= status <= 0xBFFF or status in GENERAL_WARNINGS:
        return "delivered"
    if 0xA700 <= status <= 0xA7FF or status == RESOURCE_LIMITATION:
        return "retry"
    return "dead"
