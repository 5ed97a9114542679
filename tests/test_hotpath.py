"""The hand-written encoders of appliance/hotpath.py write exactly what pynetdicom would."""

from __future__ import annotations

import io

import pytest
from pydicom.filewriter import write_file_meta_info
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode

from appliance import hotpath

CT = "1.2.840.10008.5.1.4.1.1.2"
_ROOT = "1.2.826.0.1.3680043.8.498."
UIDS = ["1.2.3", "1.2.34", _ROOT + "1" * 37, _ROOT + "1" * 38]  # odd and even lengths, 63 and 64


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"])
def test_file_meta_is_what_pydicom_writes(sop_uid: str, syntax: str) -> None:
    expected = io.BytesIO()
    write_file_meta_info(expected, create_file_meta(sop_class_uid=CT, sop_instance_uid=sop_uid,
                                                    transfer_syntax=syntax))
    assert hotpath.encode_file_meta(hotpath.FileMeta(CT, sop_uid, syntax)) == expected.getvalue()


def _pynetdicom_command(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return bytes(encode(message.command_set, True, True))


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xB007, 0x0111, 0xC000])
@pytest.mark.parametrize("message_id", [1, 2, 65535])
def test_c_store_rsp_is_what_pynetdicom_encodes(sop_uid: str, status: int, message_id: int) -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.AffectedSOPClassUID = CT
    primitive.AffectedSOPInstanceUID = sop_uid
    primitive.Status = status
    assert hotpath.encode_c_store_rsp(primitive) == _pynetdicom_command(primitive)


def test_c_store_rsp_without_uids() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 7
    primitive.Status = 0xA700
    assert hotpath.encode_c_store_rsp(primitive) == _pynetdicom_command(primitive)


def test_what_it_does_not_cover_is_left_to_pynetdicom() -> None:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = 1
    primitive.Status = 0xC000
    primitive.ErrorComment = "cannot read it"
    assert hotpath.encode_c_store_rsp(primitive) is None
