"""Strict parsing of JSON from outside, and the canonical JSON that is signed or hashed.

Why one module for every layer: input from outside must parse the same way everywhere.
JSON parsers disagree on what some texts mean - with a member name given twice, one
parser keeps the first value, another the last, a third refuses - and NaN, Infinity
and fractions are read differently (or not at all) by others.  A capability, a
request a caveat judges, a key file or a DIDComm envelope checked under one reading
and used under another is how signed data gets altered without breaking it.  So
Janus parses every such text here, and refuses what could be read two ways rather
than picking one reading: duplicate member names, NaN and Infinity, text that is not
UTF-8, lone surrogates (``"\ud800"``: valid JSON syntax, but not Unicode text, so
it cannot be signed, hashed or stored as UTF-8; I-JSON, RFC 7493, refuses them too),
nesting deep enough to exhaust the parser and, where the caller says so, floats.

Each caller names what it parsed (``what``) and the error class to raise, so the
refusal reaches its user as the caller's own typed error, with the same wording
wherever it happens.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, NoReturn

FLOATS_REFUSED: Final = (
    "floats are not allowed: write money as an integer count of the smallest unit "
    "(e.g. cents) or as a string"
)


class StrictJSONError(ValueError):
    """The default error of :func:`loads`; ``problem`` is the message without ``what``."""

    def __init__(self, message: str, problem: str | None = None) -> None:
        super().__init__(message)
        self.problem = message if problem is None else problem


class _Refused(Exception):
    """Raised inside the decoder's hooks; :func:`loads` turns it into the caller's error."""


def _show_name(name: str) -> str:
    """A member name for a message: cut short (it is untrusted) and quoted as JSON."""
    cut = name[:64]
    try:
        cut.encode("utf-8")
        shown = json.dumps(cut, ensure_ascii=False)
    except UnicodeEncodeError:  # a lone surrogate: escape it rather than fail to print
        shown = json.dumps(cut)
    return shown[:-1] + '…"' if len(name) > len(cut) else shown


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Refused(f"member {_show_name(key)} appears twice")
            seen.add(key)
    return obj


def _refuse_constant(name: str) -> Any:
    raise _Refused(f"{name} is not JSON")


def _refuse_float(text: str) -> Any:
    raise _Refused(f"{text[:32]}: {FLOATS_REFUSED}")


# Made once: json.loads with hooks builds a new decoder on every call.
_DECODERS: Final = {
    True: json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_refuse_constant),
    False: json.JSONDecoder(
        object_pairs_hook=_no_duplicates,
        parse_constant=_refuse_constant,
        parse_float=_refuse_float,
    ),
}


# Where a lone surrogate could come from: a \uD800-\uDFFF escape, or (in text given
# as str) the character itself.  A match is only a hint; encoding decides.
_MAY_HOLD_SURROGATE: Final = {
    False: re.compile(r"\\u[dD][89abcdefABCDEF]"),
    True: re.compile(r"\\u[dD][89abcdefABCDEF]|[\ud800-\udfff]"),
}


def _fail(error: type[Exception], what: str, problem: str) -> NoReturn:
    message = f"{what}: {problem}"
    if issubclass(error, StrictJSONError):
        raise error(message, problem)
    raise error(message)


def loads(
    data: bytes | str,
    what: str,
    *,
    allow_floats: bool = False,
    error: type[Exception] = StrictJSONError,
) -> Any:
    """Parse one JSON value from outside: UTF-8, no duplicate members, no NaN/Infinity.

    Floats are refused too unless ``allow_floats``.  Every refusal raises
    ``error("<what>: <problem>")``.
    """
    try:
        text = data if isinstance(data, str) else data.decode("utf-8")
        value = _DECODERS[allow_floats].decode(text)
        # UTF-8 text holds no surrogates, so only an escape (or text given as str) can
        # make one; a pair is one character once parsed, and only a lone one fails here.
        if _MAY_HOLD_SURROGATE[isinstance(data, str)].search(text):
            _CANONICAL[False].encode(value).encode("utf-8")
        return value
    except UnicodeEncodeError:
        _fail(error, what, "not valid Unicode text (a lone surrogate)")
    except _Refused as exc:
        _fail(error, what, str(exc))
    except UnicodeDecodeError:
        _fail(error, what, "not valid JSON (not UTF-8)")
    except json.JSONDecodeError as exc:
        _fail(error, what, f"not valid JSON ({exc.msg} at offset {exc.pos})")
    except RecursionError:
        _fail(error, what, "not valid JSON (nested too deeply)")
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        _fail(error, what, f"not valid JSON ({exc})")


def loads_object(
    data: bytes | str,
    what: str,
    *,
    allow_floats: bool = False,
    error: type[Exception] = StrictJSONError,
) -> dict[str, Any]:
    """:func:`loads`, refusing any value but an object."""
    value = loads(data, what, allow_floats=allow_floats, error=error)
    if not isinstance(value, dict):
        _fail(error, what, "must be a JSON object")
    return value


# json.dumps with options builds a new encoder per call, a few microseconds each time;
# several canonical texts are made per capability use, so the two encoders are kept
# (they hold only their options: safe to share between threads).
_CANONICAL = {
    ascii_only: json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_only)
    for ascii_only in (False, True)
}


def canonical_text(obj: Any, *, ascii_only: bool = False) -> str:
    """Sorted keys, no whitespace: the one text a JSON value is signed or hashed as.

    Non-ASCII characters stay as they are unless ``ascii_only`` (then they are escaped).
    The same text as ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
    ensure_ascii=ascii_only)``.
    """
    return _CANONICAL[ascii_only].encode(obj)


def canonical_json(obj: Any, *, ascii_only: bool = False) -> bytes:
    """:func:`canonical_text` as UTF-8: the one byte string a JSON value hashes to."""
    return canonical_text(obj, ascii_only=ascii_only).encode()
