"""Every DIMSE status the print SCP sends, by name (PS3.4 Annex H, PS3.7 Annex C).

Handlers and the session model use these names only; the numbers live here.
"""

from __future__ import annotations

SUCCESS = 0x0000

# ---- general failures / warnings (PS3.7 C) ----
NO_SUCH_ATTRIBUTE = 0x0105
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112
NO_SUCH_ACTION_TYPE = 0x0123
ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116  # warning: value replaced by the documented default
NO_SUCH_SOP_CLASS = 0x0118
CLASS_INSTANCE_CONFLICT = 0x0119
MISSING_ATTRIBUTE = 0x0120
MISSING_ATTRIBUTE_VALUE = 0x0121
# A request whose SOP class was not negotiated on the association (a film session on an
# association that negotiated only the Printer SOP class).
UNRECOGNIZED_OPERATION = 0x0211
RESOURCE_LIMITATION = 0x0213

# ---- print management warnings (PS3.4 H) ----
MEMORY_ALLOCATION_NOT_SUPPORTED = 0xB600
SESSION_PRINTING_NOT_SUPPORTED = 0xB601
SESSION_HAS_NO_IMAGES = 0xB602  # film session: no image box has an image -> nothing printed
FILM_BOX_HAS_NO_IMAGES = 0xB603  # film box: no image box has an image -> nothing printed
IMAGE_DEMAGNIFIED = 0xB604
DENSITY_OUT_OF_RANGE = 0xB605  # printer clamps Min/Max Density to its range
IMAGE_CROPPED = 0xB609
IMAGE_DECIMATED = 0xB60A

# ---- print management failures (PS3.4 H) ----
NO_FILM_BOXES = 0xC600
QUEUE_FULL_SESSION = 0xC601
QUEUE_FULL_FILM_BOX = 0xC602
IMAGE_LARGER_THAN_BOX = 0xC603
INSUFFICIENT_MEMORY = 0xC605
COMBINED_IMAGE_TOO_LARGE = 0xC613
UNPRINTED_FILM_BOX_EXISTS = 0xC616


def is_warning(status: int) -> bool:
    return status in (ATTRIBUTE_VALUE_OUT_OF_RANGE, 0x0107) or 0xB000 <= status <= 0xBFFF


def is_failure(status: int) -> bool:
    return status != SUCCESS and not is_warning(status)
