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


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [key for key, _ in pairs]
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise MalformedEnvelopeError(f"duplicate JSON member {duplicate!r}")
    return obj


def _refuse_constant(name: str) -> Any:
    raise MalformedEnvelopeError(f"JSON constant {name} is not allowed")


# Made once: json.loads/dumps with non-default options build a new codec on every call.
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant)
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def loads(data: bytes | str, what: str) -> Any:
    """Parse JSON strictly (UTF-8, no duplicate members, no NaN/Infinity)."""
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        return _DECODER.decode(text)
    except MalformedEnvelopeError as exc:
        raise MalformedEnvelopeError(f"{what}: {exc}") from None
    except UnicodeDecodeError:
        raise MalformedEnvelopeError(f"{what} is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise MalformedEnvelopeError(f"{what} is not JSON: {exc.msg} at offset {exc.pos}") from None
    except RecursionError:
        raise MalformedEnvelopeError(f"{what} is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python allows
        raise MalformedEnvelopeError(f"{what} is not acceptable JSON: {exc}") from None


def load_object(data: bytes | str, what: str) -> dict[str, Any]:
    value = loads(data, what)
    if not isinstance(value, dict):
        raise MalformedEnvelopeError(f"{what} must be a JSON object")
    return value


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII kept as UTF-8: what goes inside envelopes."""
    return _ENCODER.encode(obj)
