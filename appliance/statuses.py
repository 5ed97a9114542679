"""Every DIMSE status this appliance sends or acts on, in one table (PS3.4 Annex B, PS3.7 C)."""

from __future__ import annotations

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
