"""``appliance echo``: C-ECHO a peer, as a technician's first check of a destination."""

from __future__ import annotations

from pynetdicom import evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from .dicomnet import application_entity, rejection, tune_socket, why_not_associated
from .statuses import describe_rejection


def echo(host: str, port: int, ae_title: str, calling_ae: str = "EDGE", timeout: float = 10.0) -> tuple[bool, str]:
    """Returns (success, a one-line account for the user)."""
    ae = application_entity(calling_ae)
    ae.add_requested_context(Verification)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, tune_socket)])
    where = f"{ae_title}@{host}:{port}"
    if (rj := rejection(assoc)) is not None:
        return False, f"{where}: {describe_rejection(rj)}"
    if not assoc.is_established:
        return False, why_not_associated(assoc, where, timeout)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        return False, f"{where}: no C-ECHO response (timeout or abort)"
    if status.Status != 0:
        return False, f"{where}: C-ECHO status 0x{status.Status:04X}"
    return True, f"{where}: C-ECHO OK"
