"""The one exception type of the print SCP: a request that ends with a non-success status."""

from __future__ import annotations


class PrintError(Exception):
    """Raised by the session model; the SCP turns it into the DIMSE status it carries."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return f"0x{self.status:04X}: {self.message}"
