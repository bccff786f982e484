"""Strict base64url and JSON for envelopes that come from outside.

Everything here refuses rather than repairs: padding, non-alphabet characters,
non-canonical last characters, duplicate JSON members, NaN/Infinity and deep nesting.
Two spellings of the same bytes, or two readings of the same JSON, are how signed and
encrypted containers get altered without breaking them, so there is exactly one.
"""

from __future__ import annotations

import json
from typing import Any

from agent.didcomm.errors import MalformedEnvelopeError
from janus_hsm import b64url, strictjson

b64e = b64url.encode


def b64d(text: object, what: str) -> bytes:
    """Decode unpadded, canonical base64url or raise MalformedEnvelopeError naming ``what``."""
    return b64url.decode(text, what, error=MalformedEnvelopeError)


# Made once: json.dumps with non-default options builds a new encoder on every call.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def load_object(data: bytes | str, what: str) -> dict[str, Any]:
    """Parse a JSON object strictly (see :mod:`janus_hsm.strictjson`); floats are allowed."""
    return strictjson.loads_object(data, what, allow_floats=True, error=MalformedEnvelopeError)


def dumps(obj: Any) -> str:
    """Compact JSON, non-ASCII kept as UTF-8: what goes inside envelopes."""
    return _ENCODER.encode(obj)
