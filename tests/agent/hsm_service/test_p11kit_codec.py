"""The p11-kit RPC codec on its own: what it reads, what it writes, what it refuses."""

from __future__ import annotations

import struct

import pytest

from agent.hsm_service.p11kit import constants as ck
from agent.hsm_service.p11kit.calls import CALL_IDS, CALLS
from agent.hsm_service.p11kit.codec import (
    MAX_MESSAGE,
    Attribute,
    Reader,
    Writer,
    encode_frame,
    frame_lengths,
)
from agent.hsm_service.p11kit.errors import MalformedMessage


def request(name: str, body: bytes = b"", *, signature: str | None = None) -> bytes:
    call_id = CALL_IDS[name]
    sig = (CALLS[call_id].request if signature is None else signature) or ""
    return struct.pack(">II", call_id, len(sig)) + sig.encode() + body


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def test_the_call_table_matches_p11_kit_numbering() -> None:
    # Ids are the wire contract with p11-kit-client: a shifted table breaks every call.
    assert CALL_IDS["C_Initialize"] == 1
    assert CALL_IDS["C_GetAttributeValue"] == 24
    assert CALL_IDS["C_SignInit"] == 42
    assert CALL_IDS["C_Sign"] == 43
    assert CALL_IDS["C_WaitForSlotEvent"] == 65
    assert CALL_IDS["C_InitToken2"] == 88 and len(CALLS) == 89


def test_reader_reads_typed_attributes() -> None:
    body = (
        u64(7)  # session
        + u32(3)  # three attributes
        + u32(ck.CKA_CLASS)
        + b"\x01"
        + u32(8)
        + u64(ck.CKO_PRIVATE_KEY)
        + u32(ck.CKA_SIGN)
        + b"\x01"
        + u32(1)
        + b"\x01"
        + u32(ck.CKA_LABEL)
        + b"\x01"
        + u32(3)
        + u32(3)
        + b"abc"
    )
    reader = Reader(request("C_FindObjectsInit", body))
    assert reader.name == "C_FindObjectsInit"
    assert reader.ulong() == 7
    assert reader.attributes() == [
        Attribute(ck.CKA_CLASS, ck.CKO_PRIVATE_KEY),
        Attribute(ck.CKA_SIGN, True),
        Attribute(ck.CKA_LABEL, b"abc"),
    ]
    reader.end()


def test_writer_encodes_attributes_as_p11_kit_does() -> None:
    writer = Writer(CALL_IDS["C_GetAttributeValue"])
    writer.attributes(
        [
            Attribute(ck.CKA_SIGN, True),
            Attribute(ck.CKA_KEY_TYPE, ck.CKK_EC),
            Attribute(ck.CKA_VALUE, None),
            Attribute(ck.CKA_ALLOWED_MECHANISMS, (ck.CKM_ECDSA,)),
        ]
    )
    writer.ulong(ck.CKR_ATTRIBUTE_SENSITIVE)
    out = writer.getvalue()
    head = u32(CALL_IDS["C_GetAttributeValue"]) + u32(3) + b"aAu"
    assert out == (
        head
        + u32(4)
        + u32(ck.CKA_SIGN)
        + b"\x01"
        + u32(1)
        + b"\x01"
        + u32(ck.CKA_KEY_TYPE)
        + b"\x01"
        + u32(8)
        + u64(ck.CKK_EC)
        + u32(ck.CKA_VALUE)
        + b"\x00"
        + u32(ck.CKA_ALLOWED_MECHANISMS)
        + b"\x01"
        + u32(8)
        + u32(1)
        + u64(ck.CKM_ECDSA)
        + u64(ck.CKR_ATTRIBUTE_SENSITIVE)
    )


def test_error_response_is_call_zero_with_the_code() -> None:
    assert Writer.error(ck.CKR_FUNCTION_REJECTED) == u32(0) + u32(1) + b"u" + u64(0x200)


def test_output_size_distinguishes_query_and_empty_buffer() -> None:
    reader = Reader(request("C_Sign", u64(1) + b"\x01" + u32(2) + b"hi" + u32(0)))
    reader.ulong()
    assert reader.bytes_argument() == b"hi"
    assert reader.output_size() is None  # "how long is it?"
    reader = Reader(request("C_SignFinal", u64(1) + u32(0xFFFFFFFF)))
    reader.ulong()
    assert reader.output_size() == 0  # a buffer of length 0: too small


@pytest.mark.parametrize(
    ("message", "what"),
    [
        (b"\x00\x00", "message too short"),
        (u32(0) + u32(1) + b"u", "unknown call id"),  # ERROR is a response, not a request
        (u32(999) + u32(0), "unknown call id"),
        (request("C_GetInfo", signature="u"), "call signature does not match"),
        (u32(CALL_IDS["C_GetInfo"]) + u32(0xFFFFFFFF), "call signature does not match"),
        (u32(CALL_IDS["C_GetInfo"]) + u32(0x7FFFFFFF), "byte array length out of range"),
        (u32(CALL_IDS["C_GetInfo"]) + u32(50) + b"ab", "message too short"),
    ],
)
def test_bad_headers_are_typed_errors(message: bytes, what: str) -> None:
    with pytest.raises(MalformedMessage, match=what) as caught:
        Reader(message)
    assert caught.value.code == "bad_p11kit_message"


def test_truncated_and_trailing_arguments_are_refused() -> None:
    reader = Reader(request("C_OpenSession", u64(1) + b"\x00\x00"))
    reader.ulong()
    with pytest.raises(MalformedMessage, match="too short"):
        reader.ulong()
    reader = Reader(request("C_CloseSession", u64(1) + b"x"))
    reader.ulong()
    with pytest.raises(MalformedMessage, match="trailing"):
        reader.end()


def test_attribute_arrays_are_bounded() -> None:
    reader = Reader(request("C_FindObjectsInit", u64(1) + u32(1_000_000)))
    reader.ulong()
    with pytest.raises(MalformedMessage, match="too many attributes"):
        reader.attributes()
    # A value longer than its announced length is not what p11-kit sends.
    body = u64(1) + u32(1) + u32(ck.CKA_LABEL) + b"\x01" + u32(1) + u32(5) + b"abcde"
    reader = Reader(request("C_FindObjectsInit", body))
    reader.ulong()
    with pytest.raises(MalformedMessage, match="longer than announced"):
        reader.attributes()


def test_nested_templates_are_bounded() -> None:
    nested = u32(1) + u32(ck.CKA_WRAP_TEMPLATE) + b"\x01" + u32(24)
    body = u64(1) + nested * 4 + u32(0)
    reader = Reader(request("C_FindObjectsInit", body))
    reader.ulong()
    with pytest.raises(MalformedMessage, match="nested too deep"):
        reader.attributes()


def test_frame_lengths_are_bounded() -> None:
    assert frame_lengths(struct.pack(">III", 9, 4, 20)) == (9, 4, 20)
    with pytest.raises(MalformedMessage):
        frame_lengths(struct.pack(">III", 1, 0, MAX_MESSAGE + 1))
    with pytest.raises(MalformedMessage):
        frame_lengths(struct.pack(">III", 1, 1 << 30, 8))
    assert encode_frame(5, b"abcd") == struct.pack(">III", 5, 0, 4) + b"abcd"
