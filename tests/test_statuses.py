"""What a destination's C-STORE status means for the delivery (PS3.4 B.2.3, PS3.7 C)."""

from __future__ import annotations

import pytest

from appliance.statuses import store_outcome


@pytest.mark.parametrize(("status", "outcome"), [
    (0x0000, "delivered"),
    (0xB000, "delivered"), (0xB006, "delivered"), (0xB007, "delivered"),  # warnings: the PACS has it
    (0xBFFF, "delivered"),
    (0x0001, "delivered"),  # warning: requested optional attributes not supported (PS3.7 C.4)
    (0x0107, "delivered"),  # warning: attribute list error (PS3.7 C.4.2)
    (0x0116, "delivered"),  # warning: attribute value out of range (PS3.7 C.4.3)
    (0xA700, "retry"), (0xA7FF, "retry"),  # refused: out of resources
    (0x0213, "retry"),  # resource limitation (a general status some PACS answer instead)
    (0xA900, "dead"), (0xA9FF, "dead"),  # the data set does not match its SOP class
    (0xC000, "dead"), (0xCFFF, "dead"),  # cannot understand
    (0x0110, "dead"), (0x0122, "dead"), (0x0124, "dead"), (0x0211, "dead"), (0x0212, "dead"),
    (0x0105, "dead"), (0x0106, "dead"), (0x0117, "dead"),  # failures beside the general warnings
    (0x0002, "dead"),  # no warning either
])
def test_store_outcome(status: int, outcome: str) -> None:
    assert store_outcome(status) == outcome
