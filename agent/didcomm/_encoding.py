"""Strict base64url and JSON for envelopes that come from outside.

Everything here refuses rather than repairs: padding, non-alphabet characters,
non-canonical last characters, duplicate JSON members, NaN/Infinity and deep nesting.
Two spellings of the same bytes, or two readings of the same JSON, are how signed and
encrypted containers get altered without breaking them, so there is exactly one.
"""

from __future__ import annotations

import binascii
import json
from typing import Any

from agent.didcomm.errors import MalformedEnvelopeError
from janus_hsm import strictjson

_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_VALUE = {c: i for i, c in enumerate(_ALPHABET)}
# base64url → standard base64 for binascii; '+', '/' and '=' (not base64url) become '!',
# which binascii's strict mode refuses, so one C pass both converts and validates.
_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
_PADDING = (b"", None, b"==", b"=")
# Bits of the last character that carry no data, by len % 4 (2: 4 bits, 3: 2 bits).
_UNUSED_BITS = (0, 0, 0x0F, 0x03)
_TO_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64e(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).translate(_TO_URLSAFE).rstrip(b"=").decode()


def b64d(text: object, what: str) -> bytes:
    """Decode unpadded, canonical base64url or raise MalformedEnvelopeError naming ``what``."""
    if type(text) is not str:
        raise MalformedEnvelopeError(f"{what} must be a base64url string")
    rest = len(text) % 4
    padding = _PADDING[rest]
    if padding is None:
        raise MalformedEnvelopeError(f"{what} is not unpadded base64url")
    try:
        # A last character with stray low bits decodes to the same bytes as the canonical
        # one; accepting both would give one envelope several spellings.
        if rest and _VALUE[text[-1]] & _UNUSED_BITS[rest]:
            raise MalformedEnvelopeError(f"{what} is not canonical base64url")
        standard = text.encode("ascii").translate(_TO_STANDARD) + padding
        return binascii.a2b_base64(standard, strict_mode=True)
    except (KeyError, UnicodeEncodeError, binascii.Error):
        raise MalformedEnvelopeError(f"{what} is not unpadded base64url") from None


# Made once: json.dumps with non-default options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def load_object(data: bytes | str, what: str) -> dict[str, Any]:
    """Parse a JSON object strictly (see :mod:`janus_hsm.strictjson`); floats are allowed."""
    return strictjson.loads_object(data, what, allow_floats=True, error=MalformedEnvelopeError)


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII kept as UTF-8: what goes inside envelopes."""
    return _ENCODER.encode(obj)
