"""Immutable sync messages: signed by their authoring device, named by their hash.

A message belongs to one conversation, names its causal parents by id, and is encoded
in exactly one way (:func:`encode` is a bijection onto what :func:`parse_message`
accepts), so its id, SHA-256 of that encoding, names one message and one byte string.

The signature is *inside* the hashed encoding: the id commits to the signed bytes as
they are stored and forwarded, so a peer that holds an id holds a message that
verifies, and two peers that agree on an id agree on every byte.  This is safe because
a signature has one accepted form (Ed25519 is strict in libsodium; ECDSA must be
low-S, as everywhere in Janus), so nobody but the author can make a second encoding of
the same content; an author that signs the same content twice (ECDSA is randomised)
makes two messages, as it would by posting twice.  The signature covers a domain
label and every byte before it, so it cannot be moved to another conversation or
another kind of Janus object.

The layout is written by hand (length-prefixed fields, big-endian) rather than as
JSON or CBOR because it is tiny, has no optional parts, and must have exactly one
encoding per message: a generic serialiser would bring alternatives to refuse.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from agent.sync.errors import (
    BadSignatureError,
    IdMismatchError,
    MalformedMessageError,
    MessageTooLargeError,
    UnsupportedVersionError,
)
from agent.sync.ids import ID_BYTES, id_bytes, id_text
from janus_hsm.algorithms import Algorithm, is_low_s
from janus_hsm.errors import JanusHSMError
from janus_hsm.provider import KeyHandle, raw_to_der
from janus_hsm.public_keys import PublicKey, algorithm_of, from_did_key, raw_public_bytes

VERSION: Final = 1
MAX_BODY: Final = 32 * 1024  # BSP's body limit
MAX_PARENTS: Final = 32
MAX_AUTHOR: Final = 128  # a did:key of P-384 is 62 characters; room to spare
MAX_CONTENT_TYPE: Final = 64
MAX_TIMESTAMP: Final = 2**53 - 1  # milliseconds; an integer every JSON reader keeps exact
SIGNATURE_LABEL: Final = b"janus-sync-message-v1\x00"
_SIGNATURE_SIZE: Final = {Algorithm.EdDSA: 64, Algorithm.ES256: 64, Algorithm.ES384: 96}
MAX_SIGNATURE: Final = max(_SIGNATURE_SIZE.values())
MAX_MESSAGE_BYTES: Final = (
    1 + ID_BYTES + 8 + 1 + MAX_AUTHOR + 1 + MAX_CONTENT_TYPE + 1
    + MAX_PARENTS * ID_BYTES + 4 + MAX_BODY + 1 + MAX_SIGNATURE
)  # fmt: skip
_CONTENT_TYPE = re.compile(r"[a-z0-9][a-z0-9._+/-]*")
_HEAD = struct.Struct(">B32sQ")


@dataclass(frozen=True, slots=True)
class Message:
    """One message, made only by :meth:`create` or :func:`parse_message` (so its fields
    are those of ``encoded``, the only form that travels, and ``id`` is its hash)."""

    id: str
    conversation: str
    author: str
    timestamp: int
    content_type: str
    parents: tuple[str, ...]
    body: bytes
    signature: bytes
    encoded: bytes

    @classmethod
    def create(
        cls,
        key: KeyHandle,
        *,
        conversation: str,
        parents: Iterable[str],
        content_type: str,
        body: bytes,
        timestamp: int,
    ) -> Message:
        """Sign a new message with the authoring device's key (one ``key.sign``)."""
        raw_parents = sorted({id_bytes(p, "a parent", MalformedMessageError) for p in parents})
        unsigned = _encode_unsigned(
            id_bytes(conversation, "the conversation", MalformedMessageError),
            timestamp,
            key.did,
            content_type,
            raw_parents,
            body,
        )
        # A key that cannot sign raises the custody layer's own typed error (wrong PIN,
        # token removed, an X25519 key): those codes say what to do, keep them.
        signature = key.sign(SIGNATURE_LABEL + unsigned)
        encoded = unsigned + bytes([len(signature)]) + signature
        # Parsed back, signature included: a backend that signed wrongly (or high-S)
        # fails here, at its author, rather than at every peer.
        return parse_message(encoded)


def _encode_unsigned(
    conversation: bytes,
    timestamp: int,
    author: str,
    content_type: str,
    parents: list[bytes],
    body: bytes,
) -> bytes:
    if type(timestamp) is not int or not 0 <= timestamp <= MAX_TIMESTAMP:
        raise MalformedMessageError(f"a timestamp is an integer in [0, {MAX_TIMESTAMP}]")
    if not isinstance(content_type, str) or not _CONTENT_TYPE.fullmatch(content_type):
        raise MalformedMessageError("a content type is lowercase [a-z0-9._+/-]")
    if len(content_type) > MAX_CONTENT_TYPE:
        raise MessageTooLargeError(f"a content type is at most {MAX_CONTENT_TYPE} characters")
    if len(parents) > MAX_PARENTS:
        raise MessageTooLargeError(f"a message has at most {MAX_PARENTS} parents")
    if not isinstance(body, bytes):
        raise MalformedMessageError("a body is bytes")
    if len(body) > MAX_BODY:
        raise MessageTooLargeError(f"a body is at most {MAX_BODY} bytes")
    author_bytes = author.encode("ascii")
    if len(author_bytes) > MAX_AUTHOR:
        raise MessageTooLargeError(f"an author did:key is at most {MAX_AUTHOR} characters")
    ctype = content_type.encode("ascii")
    return b"".join(
        (
            _HEAD.pack(VERSION, conversation, timestamp),
            bytes([len(author_bytes)]),
            author_bytes,
            bytes([len(ctype)]),
            ctype,
            bytes([len(parents)]),
            *parents,
            struct.pack(">I", len(body)),
            body,
        )
    )


class _Reader:
    """A cursor over untrusted bytes that refuses to read past the end."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise MalformedMessageError(f"a message ends inside its {what}")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def byte(self, what: str) -> int:
        return self.take(1, what)[0]


def parse_message(data: object, *, expected_id: str | None = None, verify: bool = True) -> Message:
    """Parse one encoded message from outside, check its id and (by default) signature.

    ``verify=False`` is for bytes this agent stored itself after verifying them.
    """
    if not isinstance(data, bytes):
        raise MalformedMessageError("a message is bytes")
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageTooLargeError(f"a message is at most {MAX_MESSAGE_BYTES} bytes")
    r = _Reader(data)
    version = r.byte("version")
    if version != VERSION:
        raise UnsupportedVersionError(f"sync message version {version} is not supported")
    conversation = r.take(ID_BYTES, "conversation")
    (timestamp,) = struct.unpack(">Q", r.take(8, "timestamp"))
    if timestamp > MAX_TIMESTAMP:
        raise MalformedMessageError(f"a timestamp is at most {MAX_TIMESTAMP}")
    author_len = r.byte("author length")
    if not 1 <= author_len <= MAX_AUTHOR:
        raise MalformedMessageError(f"an author is 1 to {MAX_AUTHOR} characters")
    author_raw = r.take(author_len, "author")
    ctype_len = r.byte("content type length")
    if not 1 <= ctype_len <= MAX_CONTENT_TYPE:
        raise MalformedMessageError(f"a content type is 1 to {MAX_CONTENT_TYPE} characters")
    ctype_raw = r.take(ctype_len, "content type")
    count = r.byte("parent count")
    if count > MAX_PARENTS:
        raise MessageTooLargeError(f"a message has at most {MAX_PARENTS} parents")
    parents = [r.take(ID_BYTES, "parents") for _ in range(count)]
    if any(a >= b for a, b in itertools.pairwise(parents)):
        raise MalformedMessageError("parents are listed once each, in ascending byte order")
    (body_len,) = struct.unpack(">I", r.take(4, "body length"))
    if body_len > MAX_BODY:
        raise MessageTooLargeError(f"a body is at most {MAX_BODY} bytes")
    body = r.take(body_len, "body")
    signed_end = r.pos
    sig_len = r.byte("signature length")
    signature = r.take(sig_len, "signature")
    if r.pos != len(data):
        raise MalformedMessageError("a message has bytes after its signature")
    try:
        author = author_raw.decode("ascii")
        content_type = ctype_raw.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedMessageError("an author and a content type are ASCII") from None
    if not _CONTENT_TYPE.fullmatch(content_type):
        raise MalformedMessageError("a content type is lowercase [a-z0-9._+/-]")
    public = _author_key(author)
    if len(signature) != _SIGNATURE_SIZE[algorithm_of(public)]:
        raise MalformedMessageError("the signature's length does not fit the author's key")
    message_id = id_text(hashlib.sha256(data).digest())
    if expected_id is not None and message_id != expected_id:
        raise IdMismatchError("the message's hash is not the id it was expected under")
    if verify:
        _verify(public, SIGNATURE_LABEL + data[:signed_end], signature)
    return Message(
        id=message_id,
        conversation=id_text(conversation),
        author=author,
        timestamp=timestamp,
        content_type=content_type,
        parents=tuple(id_text(p) for p in parents),
        body=body,
        signature=signature,
        encoded=data,
    )


def _author_key(author: str) -> PublicKey:
    """The author's signing key, from its did:key (which must name a signing algorithm)."""
    try:
        public = from_did_key(author)
        algorithm = algorithm_of(public)
    except JanusHSMError:
        raise MalformedMessageError("the author is not a did:key Janus supports") from None
    if algorithm not in _SIGNATURE_SIZE:
        raise MalformedMessageError("the author's did:key is not a signing key")
    return public


def _verify(public: PublicKey, signed: bytes, signature: bytes) -> None:
    algorithm = algorithm_of(public)
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            # libsodium refuses non-canonical signatures (S >= L) and verifies ~2x faster
            # than OpenSSL through cryptography (docs/performance.md).
            try:
                nacl.bindings.crypto_sign_open(signature + signed, raw_public_bytes(public))
            except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError):
                raise InvalidSignature from None
            return
        assert isinstance(public, ec.EllipticCurvePublicKey)
        if not is_low_s(signature, algorithm):
            # (r, n - s) verifies too: a second encoding, so a second id, of one message.
            raise InvalidSignature
        hash_alg = algorithm.hash_algorithm
        assert hash_alg is not None
        public.verify(raw_to_der(signature, algorithm.coordinate_size), signed, ec.ECDSA(hash_alg))
    except InvalidSignature:
        raise BadSignatureError("the message's signature does not verify") from None
