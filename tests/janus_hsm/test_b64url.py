"""One strict base64url for every layer, and every former copy now refusing alike."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

import pytest

from agent.didcomm import FORWARD_TYPE, Attachment, Message, MessageFormatError, parse_forward
from agent.didcomm._encoding import b64d as envelope_b64d
from agent.didcomm.errors import MalformedEnvelopeError
from janus_hsm import b64url
from janus_hsm.backends.software.keyfile import b64d as keyfile_b64d
from janus_hsm.errors import KeystoreError
from janus_hsm.public_keys import PublicKeyFormatError, b64url_decode

REFUSED = [
    "QQ==",  # padded
    "QQ=",
    "a+b/",  # the standard alphabet
    "QUJD\n",
    "QU JD",
    "QR",  # stray bits in the last character ("QQ" is the canonical spelling)
    "QUJDR",  # a length no bytes encode to
    "QUJ\u00e9",
    "\ud800",
]


@pytest.mark.parametrize("length", range(0, 34))
def test_round_trip_matches_the_standard_encoding(length: int) -> None:
    data = os.urandom(length)
    text = b64url.encode(data)
    assert text == base64.urlsafe_b64encode(data).rstrip(b"=").decode()
    assert b64url.decode(text) == data


@pytest.mark.parametrize("text", REFUSED)
def test_non_canonical_spellings_are_refused(text: str) -> None:
    with pytest.raises(b64url.Base64urlError):
        b64url.decode(text, "field")


@pytest.mark.parametrize("value", [None, b"QUJD", 7, ["QUJD"]])
def test_non_strings_are_refused(value: Any) -> None:
    with pytest.raises(b64url.Base64urlError, match="field must be a base64url string"):
        b64url.decode(value, "field")


def test_padding_only_where_a_format_allows_it() -> None:
    assert b64url.decode("QQ==", allow_padding=True) == b"A"
    assert b64url.decode("QUI=", allow_padding=True) == b"AB"
    assert b64url.decode("QQ", allow_padding=True) == b"A"
    for text in ("QQ=", "QQ===", "Q===", "QUJD=", "===="):
        with pytest.raises(b64url.Base64urlError):
            b64url.decode(text, allow_padding=True)


@pytest.mark.parametrize(
    ("decode", "error"),
    [
        (lambda text: b64url_decode(text), PublicKeyFormatError),
        (lambda text: keyfile_b64d(text, "a key file field"), KeystoreError),
        (lambda text: envelope_b64d(text, "an envelope member"), MalformedEnvelopeError),
    ],
    ids=["jose", "keyfile", "didcomm"],
)
@pytest.mark.parametrize("text", REFUSED)
def test_every_caller_refuses_with_its_own_error(decode: Any, error: type, text: str) -> None:
    with pytest.raises(error):
        decode(text)


def test_forward_attachments_refuse_what_is_not_base64url() -> None:
    """The forward's attachment decoder used to skip or accept other alphabets."""
    standard = base64.b64encode(json.dumps({"a": "???"}).encode()).decode()
    assert "/" in standard  # a JSON object, spelled in the standard alphabet
    forward = Message.new(
        FORWARD_TYPE,
        {"next": "did:example:b"},
        attachments=(Attachment(data={"base64": standard}),),
    )
    with pytest.raises(MessageFormatError):
        parse_forward(forward)


def test_random_ids_can_follow_a_flag_on_a_command_line() -> None:
    """One plain base64url id in 64 starts with '-', which argparse takes for an option
    (``janus edge revoke --grant -Dhv…`` failed): ids are drawn so none does."""
    from janus_hsm.b64url import decode, random_id

    ids = [random_id(12) for _ in range(5000)]
    assert not [i for i in ids if i.startswith("-")]
    assert len(set(ids)) == len(ids)
    assert all(len(decode(i, "id")) == 12 for i in ids)
