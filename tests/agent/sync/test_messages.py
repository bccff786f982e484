"""Sync messages: one encoding, id = its hash, signed by the device key, strict parser."""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sync.errors import (
    BadSignatureError,
    IdMismatchError,
    MalformedMessageError,
    MessageTooLargeError,
    SyncError,
    UnsupportedVersionError,
)
from agent.sync.ids import new_conversation_id
from agent.sync.messages import MAX_BODY, MAX_PARENTS, Message, parse_message
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider

from .keys import DeviceKey

CONV = new_conversation_id()
KEY = DeviceKey.ed25519()


def make(body: bytes = b"hello", parents: tuple[str, ...] = (), key: Any = KEY) -> Message:
    return Message.create(
        key,
        conversation=CONV,
        parents=parents,
        content_type="text/plain",
        body=body,
        timestamp=1_700_000_000_000,
    )


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def test_id_is_the_sha256_of_the_one_encoding() -> None:
    first = make()
    second = make(parents=(first.id,))
    again = parse_message(second.encoded)
    assert again == second
    assert second.id == b64(hashlib.sha256(second.encoded).digest())
    assert second.parents == (first.id,)
    assert second.author == KEY.did
    assert parse_message(second.encoded, expected_id=second.id) == second


def test_parents_are_sorted_and_deduplicated_so_the_encoding_is_unique() -> None:
    a, b, c = make(b"a"), make(b"b"), make(b"c")
    ids = (a.id, b.id, c.id)
    one = make(b"x", parents=ids)
    other = make(b"x", parents=(c.id, a.id, b.id, a.id))
    assert one.encoded == other.encoded  # Ed25519 is deterministic
    assert list(one.parents) == sorted(ids, key=lambda i: base64.urlsafe_b64decode(i + "="))


@pytest.fixture
def token_key(pkcs11_provider: Pkcs11Provider, key_name: str) -> Iterator[Any]:
    handle = pkcs11_provider.generate(f"pkcs11:object={key_name}", Algorithm.ES256)
    yield handle
    pkcs11_provider.delete(handle.uri)


def test_a_message_signed_inside_a_token_verifies_by_its_did_key(token_key: Any) -> None:
    message = make(b"from the token", key=token_key)
    assert message.author == token_key.did
    assert parse_message(message.encoded).body == b"from the token"


def test_high_s_ecdsa_signature_is_refused() -> None:
    """(r, n - s) verifies too; accepting it would give one message two ids."""
    key = DeviceKey(ec.generate_private_key(ec.SECP256R1()))
    message = make(key=key)
    sig = message.signature
    r, s = sig[:32], int.from_bytes(sig[32:], "big")
    order = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
    high = message.encoded[: -len(sig)] + r + (order - s).to_bytes(32, "big")
    with pytest.raises(BadSignatureError):
        parse_message(high)


def test_tampered_body_fails_the_signature() -> None:
    message = make(b"hello")
    tampered = message.encoded.replace(b"hello", b"jello")
    with pytest.raises(BadSignatureError) as caught:
        parse_message(tampered)
    assert caught.value.code == "sync_bad_signature"
    assert "jello" not in str(caught.value)


def test_a_message_under_another_id_is_refused() -> None:
    with pytest.raises(IdMismatchError):
        parse_message(make().encoded, expected_id=make(b"other").id)


def _offsets(message: Message) -> dict[str, int]:
    author = len(message.author)
    return {"author_len": 41, "ctype_len": 42 + author, "count": 43 + author + 10}


def test_every_truncation_is_a_typed_error() -> None:
    encoded = make(parents=(make(b"p").id,)).encoded
    for cut in range(len(encoded)):
        with pytest.raises(MalformedMessageError):
            parse_message(encoded[:cut])


def _put(encoded: bytes, at: int, byte: int) -> bytes:
    return encoded[:at] + bytes([byte]) + encoded[at + 1 :]


MUTATIONS: dict[str, tuple[Any, type[SyncError]]] = {
    "trailing": (lambda e, o: e + b"\x00", MalformedMessageError),
    "version": (lambda e, o: _put(e, 0, 2), UnsupportedVersionError),
    "timestamp": (lambda e, o: e[:33] + struct.pack(">Q", 2**60) + e[41:], MalformedMessageError),
    "no-author": (lambda e, o: _put(e, o["author_len"], 0), MalformedMessageError),
    "no-ctype": (lambda e, o: _put(e, o["ctype_len"], 0), MalformedMessageError),
    "uppercase": (lambda e, o: e.replace(b"text/plain", b"Text/plain"), MalformedMessageError),
    "not-ascii": (lambda e, o: e.replace(b"text/plain", b"text/pl\xffin"), MalformedMessageError),
    "not-did-key": (lambda e, o: e.replace(b"did:key:z", b"did:web:z"), MalformedMessageError),
    "parents": (lambda e, o: _put(e, o["count"], MAX_PARENTS + 1), MessageTooLargeError),
}


@pytest.mark.parametrize(("mutate", "error"), MUTATIONS.values(), ids=MUTATIONS.keys())
def test_bad_fields_are_typed_errors(mutate: Any, error: type[SyncError]) -> None:
    message = make()
    with pytest.raises(error):
        parse_message(mutate(message.encoded, _offsets(message)))


def test_parents_out_of_order_or_repeated_are_refused() -> None:
    p, q = sorted(
        [make(b"p"), make(b"q")], key=lambda m: m.encoded and hashlib.sha256(m.encoded).digest()
    )
    message = make(parents=(p.id, q.id))
    start = _offsets(message)["count"] + 1
    first, second = message.encoded[start : start + 32], message.encoded[start + 32 : start + 64]
    swapped = message.encoded[:start] + second + first + message.encoded[start + 64 :]
    repeated = message.encoded[:start] + first + first + message.encoded[start + 64 :]
    for bad in (swapped, repeated):
        with pytest.raises(MalformedMessageError, match="ascending"):
            parse_message(bad)


def test_x25519_did_key_cannot_author() -> None:
    from cryptography.hazmat.primitives.asymmetric import x25519

    from janus_hsm.public_keys import to_did_key

    message = make()
    x_did = to_did_key(x25519.X25519PrivateKey.generate().public_key())
    assert len(x_did) == len(KEY.did)
    with pytest.raises(MalformedMessageError, match="not a signing key"):
        parse_message(message.encoded.replace(KEY.did.encode(), x_did.encode()))


def test_bounds_on_creation_are_typed_errors() -> None:
    with pytest.raises(MessageTooLargeError):
        make(b"x" * (MAX_BODY + 1))
    assert len(make(b"x" * MAX_BODY).body) == MAX_BODY
    many = tuple(make(bytes([i])).id for i in range(MAX_PARENTS + 1))
    with pytest.raises(MessageTooLargeError):
        make(parents=many)
    with pytest.raises(MalformedMessageError):
        make(parents=("not an id",))
    with pytest.raises(MalformedMessageError):
        Message.create(KEY, conversation=CONV, parents=(), content_type="Text", body=b"",
                       timestamp=0)  # fmt: skip
    with pytest.raises(MalformedMessageError):
        Message.create(KEY, conversation=CONV, parents=(), content_type="t", body=b"",
                       timestamp=-1)  # fmt: skip
    with pytest.raises(MessageTooLargeError):
        parse_message(b"\x01" * 40_000)
    with pytest.raises(MalformedMessageError):
        parse_message("text")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.integers(0, 300), st.binary(max_size=8))
def test_any_corruption_is_a_sync_error_or_a_valid_message(
    noise: bytes, where: int, insert: bytes
) -> None:
    encoded = make().encoded
    where = min(where, len(encoded))
    for candidate in (noise, encoded[:where] + insert + encoded[where + len(insert) :]):
        try:
            parsed = parse_message(candidate)
        except SyncError as exc:
            assert exc.code
        else:
            assert parsed.encoded == candidate == encoded
