"""Strict, canonical base64url (RFC 4648 §5, unpadded), the one decoder of every layer.

JOSE tokens, key files, registries and DIDComm envelopes all carry bytes as base64url,
and all of them are signed, hashed or encrypted.  ``base64.urlsafe_b64decode`` is
lenient: it skips characters outside the alphabet, accepts padding anywhere near the
end, and ignores stray bits in the last character, so many strings decode to the same
bytes, and a signed container could be respelled without breaking it.  Here exactly
one string decodes to given bytes: the alphabet only, no padding (unless a caller
asks for it, for formats that allow it), and no stray bits.

Hand-written around ``binascii`` rather than ``base64``: the translation to standard
base64 and ``strict_mode`` validate in one C pass, which matters on the per-request
path where every JWS is decoded.
"""

from __future__ import annotations

import binascii
import os
from collections.abc import Callable

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_VALUE = {c: i for i, c in enumerate(_ALPHABET)}
# base64url → standard base64 for binascii; '+', '/' and '=' (not base64url) become '!',
# which binascii's strict mode refuses, so one C pass both converts and validates.
_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
_PADDING = (b"", None, b"==", b"=")
# Bits of the last character that carry no data, by len % 4 (2: 4 bits, 3: 2 bits).
_UNUSED_BITS = (0, 0, 0x0F, 0x03)
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


class Base64urlError(ValueError):
    """Not strict base64url; the default error of :func:`decode`."""


def encode(data: bytes) -> str:
    """``data`` as unpadded base64url."""
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def random_id(size: int) -> str:
    """``size`` random bytes as base64url text that does not start with '-'.

    Ids are typed after flags (``--grant ID``): one starting with '-' would be read as
    an option.  Redrawing (one draw in 64) keeps every id equally likely.
    """
    while True:
        text = encode(os.urandom(size))
        if not text.startswith("-"):
            return text


def decode(
    text: object,
    what: str = "value",
    *,
    error: Callable[[str], Exception] = Base64urlError,
    allow_padding: bool = False,
) -> bytes:
    """Decode canonical unpadded base64url, or raise ``error("<what> is not …")``.

    ``error`` is the caller's own typed error class (anything taking a message), so
    the refusal reaches its user as that package's error.  ``allow_padding`` also
    accepts the padded spelling (exactly the ``=`` needed), for formats that allow it.
    """
    if type(text) is not str:
        raise error(f"{what} must be a base64url string")
    if allow_padding and text.endswith("="):
        stripped = text.rstrip("=")
        if len(text) % 4 or len(text) - len(stripped) > 2:
            raise error(f"{what} is not base64url (wrong padding)")
        text = stripped
    rest = len(text) % 4
    padding = _PADDING[rest]
    if padding is None:
        raise error(f"{what} is not unpadded base64url")
    try:
        # A last character with stray low bits decodes to the same bytes as the canonical
        # one; accepting both would give one string several spellings.
        if rest and _VALUE[text[-1]] & _UNUSED_BITS[rest]:
            raise error(f"{what} is not canonical base64url")
        standard = text.encode("ascii").translate(_TO_STANDARD) + padding
        return binascii.a2b_base64(standard, strict_mode=True)
    except (KeyError, UnicodeEncodeError, binascii.Error):
        raise error(f"{what} is not unpadded base64url") from None
