"""Padding of message bodies to a few size buckets.

The length of a ciphertext tells an observer about the plaintext; with five buckets it
tells only which bucket.  The padding is ISO/IEC 7816-4 (a 0x80 byte, then zeros), so
it is unambiguous for any plaintext and is removed in one scan from the end.  The
bucket sizes are those of the *ciphertext body* (the AES-GCM tag included), so the
number of bytes on the wire is exactly a bucket plus the fixed header.
"""

from __future__ import annotations

from agent.relationships.errors import MalformedMessageError, PlaintextTooLargeError

BUCKETS: tuple[int, ...] = (256, 1024, 4096, 16384, 65536)
TAG_LEN = 16
MAX_PLAINTEXT = BUCKETS[-1] - TAG_LEN - 1


def bucket_for(length: int) -> int:
    """The size of the padded body (plaintext, one marker byte, zeros, tag)."""
    for bucket in BUCKETS:
        if length + 1 + TAG_LEN <= bucket:
            return bucket
    raise PlaintextTooLargeError(
        f"a relationship message carries at most {MAX_PLAINTEXT} bytes of plaintext"
    )


def pad(plaintext: bytes) -> bytes:
    """``plaintext`` padded to the bucket size minus the tag."""
    size = bucket_for(len(plaintext)) - TAG_LEN
    return plaintext + b"\x80" + bytes(size - len(plaintext) - 1)


def unpad(padded: bytes) -> bytes:
    """The plaintext; a body that is not padded this way is refused."""
    if len(padded) + TAG_LEN not in BUCKETS:
        raise MalformedMessageError("a message body is not of a padding bucket's size")
    stripped = padded.rstrip(b"\x00")
    if not stripped or stripped[-1] != 0x80:
        raise MalformedMessageError("a message body is not padded")
    return stripped[:-1]
