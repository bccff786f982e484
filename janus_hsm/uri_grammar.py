"""The attribute grammar every key URI scheme shares: ``pkcs11:``, ``soft:`` and ``piv:``.

Every scheme is written like RFC 7512::

    scheme ":" [ name "=" value *( ";" name "=" value ) ] [ "?" name "=" value *( "&" … ) ]

One parser for that shape, so a refusal (a secret in the URI, an unknown, misplaced or
repeated attribute, a bad percent-encoding, a NUL) behaves the same in every scheme and a
fix lands in all of them at once.  Hand-written because no maintained Python library
parses RFC 7512 (p11-kit's parser is C and not bound for Python), and because the URI
names a private key: anything not understood is refused, not ignored.

No error message repeats an attribute's value: a value may be a PIN typed into the
wrong place, and messages end up in logs, terminals and JSON answers.  Messages name the
attribute instead; an attribute Janus does not know is named by its percent-decoded
name, cut short and reduced to a plain alphabet.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import unquote

from janus_hsm.errors import UriError

# RFC 7512's character classes.
UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
RES_AVAIL = ":[]@!$'()*+,="
PATH_SAFE = frozenset(UNRESERVED + RES_AVAIL + "&")
QUERY_SAFE = frozenset(UNRESERVED + RES_AVAIL + "/?|")

MAX_URI_LENGTH = 4096
MAX_ATTRIBUTES = 64
#: How much of an unknown attribute's name an error message shows.
MAX_SHOWN_NAME = 40

# Names under which people put secrets into URIs, compared after percent-decoding,
# lower-casing and dropping '-', '_', '.' and spaces: PIN-VALUE, pin%2Dvalue, pin_value
# and pinvalue are all one name here.  Refused in every scheme.
_SECRET_NAMES = frozenset(
    {"pinvalue", "pin", "sopin", "puk", "managementkey", "passphrase", "password", "secret"}
)
_FOLDED = re.compile(r"[-_. ]")
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
_SHOWN = re.compile(r"[^A-Za-z0-9._~-]")
# Schemes a message may name; any other "scheme" could be a secret pasted in its place.
_NAMED_SCHEMES = frozenset({"pkcs11", "piv", "soft", "fido2", "file", "http", "https", "did"})


def percent_decode(raw: str, safe: frozenset[str], name: str) -> bytes:
    """Percent-decode the value of attribute ``name``, refusing characters RFC 7512 says
    must be encoded.  Errors name the attribute and a position, never the value."""
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "%":
            if not _PCT.fullmatch(raw[i : i + 3]):
                raise UriError(
                    f"bad percent-encoding in the value of {name!r} (character {i + 1}): "
                    "'%' must be followed by two hex digits; write a literal '%' as %25"
                )
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        if ch not in safe:
            # The character is never a letter or digit (those are all safe): naming its
            # encoding helps and gives nothing of a secret away.
            encoded = percent_encode(ch.encode("utf-8", "replace"), frozenset())
            raise UriError(
                f"character {i + 1} of the value of {name!r} must be percent-encoded "
                f"(write it as {encoded})"
            )
        out.append(ord(ch))
        i += 1
    return bytes(out)


def percent_encode(value: bytes, safe: frozenset[str], *, encode_all: bool = False) -> str:
    """Percent-encode every byte outside ``safe`` (every byte at all with ``encode_all``)."""
    return "".join(chr(b) if not encode_all and chr(b) in safe else f"%{b:02X}" for b in value)


def shown_name(raw: str) -> str:
    """An attribute name fit for an error message: percent-decoded, characters outside a
    plain alphabet replaced by '?', and cut to :data:`MAX_SHOWN_NAME` characters."""
    decoded = unquote(raw, errors="replace")
    short = decoded[:MAX_SHOWN_NAME]
    return _SHOWN.sub("?", short) + ("…" if len(decoded) > MAX_SHOWN_NAME else "")


def shown_scheme(text: str) -> str:
    """The scheme a URI starts with, for a message, or a description when there is none."""
    scheme, colon, _ = text.partition(":")
    if not colon:
        return "no scheme"
    if scheme.lower() in _NAMED_SCHEMES:
        return f"'{scheme.lower()}:'"
    return "another scheme"


def is_secret_name(raw: str) -> bool:
    """Whether an attribute name is, in any spelling, one that would carry a secret."""
    return _FOLDED.sub("", unquote(raw, errors="replace")).lower() in _SECRET_NAMES


def text_value(raw: bytes, name: str) -> str:
    """A decoded value as text: UTF-8 without NUL characters (no path or label has one)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UriError(f"the value of {name!r} is not UTF-8 text") from None
    if "\x00" in text:
        raise UriError(f"the value of {name!r} contains a NUL character (%00)")
    return text


@dataclass(frozen=True)
class Attributes:
    """A URI's attributes, split and decoded; values are text except the binary ones.

    ``encoded`` keeps each value as written, for checks of its spelling (``id=0x…``).
    """

    path: Mapping[str, str | bytes]
    query: Mapping[str, str]
    encoded: Mapping[str, str]

    def text(self, name: str) -> str | None:
        value = self.path.get(name, self.query.get(name))
        if isinstance(value, bytes):
            raise TypeError(f"{name} is a binary attribute")
        return value


@dataclass(frozen=True)
class Grammar:
    """One scheme's attributes; :meth:`parse` applies the shared rules to them.

    ``binary`` names attributes whose values are bytes (``id``); every other value must
    be UTF-8 text without NUL.  ``advice`` says where secrets go instead of the URI.
    """

    scheme: str
    path_attributes: tuple[str, ...]
    query_attributes: tuple[str, ...]
    advice: str
    path_safe: frozenset[str] = PATH_SAFE
    query_safe: frozenset[str] = QUERY_SAFE
    binary: frozenset[str] = field(default_factory=frozenset)

    def parse(self, text: object) -> Attributes:
        """Split and decode ``text``, or raise :class:`UriError` naming what is wrong."""
        if not isinstance(text, str):
            raise UriError(f"a {self.scheme}: URI must be a string")
        if len(text) > MAX_URI_LENGTH:
            raise UriError(f"{self.scheme}: URI is longer than {MAX_URI_LENGTH} characters")
        scheme, colon, rest = text.partition(":")
        if not colon or scheme.lower() != self.scheme:
            raise UriError(
                f"not a {self.scheme}: URI: it must start with '{self.scheme}:' "
                f"(this one has {shown_scheme(text)})"
            )
        path_text, _, query_text = rest.partition("?")
        path_parts = path_text.split(";") if path_text else []
        query_parts = query_text.split("&") if query_text else []
        if len(path_parts) + len(query_parts) > MAX_ATTRIBUTES:
            raise UriError(f"{self.scheme}: URI has more than {MAX_ATTRIBUTES} attributes")
        path: dict[str, str | bytes] = {}
        query: dict[str, str] = {}
        encoded: dict[str, str] = {}
        for number, part in enumerate(path_parts, 1):
            name, value = self._attribute(part, number, query=False, seen=path)
            raw = percent_decode(value, self.path_safe, name)
            path[name] = raw if name in self.binary else text_value(raw, name)
            encoded[name] = value
        for number, part in enumerate(query_parts, 1):
            name, value = self._attribute(part, number, query=True, seen=query)
            query[name] = text_value(percent_decode(value, self.query_safe, name), name)
            encoded[name] = value
        return Attributes(
            MappingProxyType(path), MappingProxyType(query), MappingProxyType(encoded)
        )

    def _attribute(
        self, part: str, number: int, *, query: bool, seen: Mapping[str, object]
    ) -> tuple[str, str]:
        """The checked name of one ``name=value`` part and its still-encoded value."""
        kind, separator = ("query", "&") if query else ("path", ";")
        name, eq, value = part.partition("=")
        where = f"{kind} attribute {number}"
        if not part:
            raise UriError(f"{where} of the {self.scheme}: URI is empty (a stray {separator!r})")
        if not name:
            raise UriError(
                f"{where} of the {self.scheme}: URI is without a name (it starts with '=')"
            )
        if is_secret_name(name):
            raise UriError(
                f"{shown_name(name)} is refused: secrets in a URI leak into shell history "
                f"and process lists. {self.advice}"
            )
        known, others = self.path_attributes, self.query_attributes
        if query:
            known, others = others, known
        if not eq:
            if name in known or name in others:
                raise UriError(f"attribute {name!r} without '=': write {name}=VALUE")
            raise UriError(f"{where} of the {self.scheme}: URI is without '=': write name=VALUE")
        if name in others:
            place = "before '?'" if query else "after '?'"
            other_kind = "path" if query else "query"
            raise UriError(f"{name!r} is a {other_kind} attribute; put it {place}")
        if name not in known:
            hint = ""
            if name.lower() in known:
                hint = f" (attribute names are lower case: {name.lower()})"
            raise UriError(
                f"unknown {self.scheme}: URI {kind} attribute '{shown_name(name)}'{hint}; "
                f"expected {', '.join(known) or 'none'}"
            )
        if name in seen:
            raise UriError(f"attribute {name!r} appears twice")
        return name, value
