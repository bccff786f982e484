"""RFC 7512 PKCS#11 URIs: parsing and printing.

Hand-written because no maintained Python library parses RFC 7512 (p11-kit's parser is
C and not bound for Python), and because strictness matters here: the URI names the
key that signs for an institution, so Janus refuses anything it does not understand
instead of ignoring it.  Deliberately refused although RFC 7512 allows them:

* ``pin-value``: a PIN in a URI ends up in shell history, process lists and logs.
* vendor attributes (``x-…``) and attributes from later drafts: unknown means unsafe.

Printing is canonical: attributes in the RFC's order, everything outside the allowed
characters percent-encoded, ``id`` always fully percent-encoded, so that
``Pkcs11Uri.parse(str(u)) == u`` for every URI.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote

from janus_hsm.errors import UriError

SCHEME = "pkcs11"

# Path attributes in the order RFC 7512 section 2.3 lists them; printing follows it.
PATH_ATTRIBUTES = (
    "token",
    "manufacturer",
    "serial",
    "model",
    "library-manufacturer",
    "library-description",
    "library-version",
    "slot-description",
    "slot-manufacturer",
    "slot-id",
    "object",
    "type",
    "id",
)
QUERY_ATTRIBUTES = ("pin-source", "module-name", "module-path")
OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")
# Attributes that pick the token (as opposed to the object in it).
TOKEN_ATTRIBUTES = PATH_ATTRIBUTES[:10]

# RFC 7512's character classes, shared with ``soft:`` URIs (janus_hsm.backends.software.uri).
UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
RES_AVAIL = ":[]@!$'()*+,="
PATH_SAFE = frozenset(UNRESERVED + RES_AVAIL + "&")
QUERY_SAFE = frozenset(UNRESERVED + RES_AVAIL + "/?|")
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")
_VERSION = re.compile(r"[0-9]+(\.[0-9]+)?")


def percent_decode(raw: str, safe: frozenset[str], where: str) -> bytes:
    """Percent-decode, refusing characters the RFC says must be encoded."""
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "%":
            if not _PCT.fullmatch(raw[i : i + 3]):
                raise UriError(f"bad percent-encoding at {raw[i : i + 3]!r} in {where!r}")
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        if ch not in safe:
            raise UriError(f"character {ch!r} must be percent-encoded in {where!r}")
        out.append(ord(ch))
        i += 1
    return bytes(out)


def percent_encode(value: bytes, safe: frozenset[str], *, encode_all: bool = False) -> str:
    """Percent-encode every byte outside ``safe`` (every byte at all with ``encode_all``)."""
    return "".join(chr(b) if not encode_all and chr(b) in safe else f"%{b:02X}" for b in value)


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed PKCS#11 URI. ``id`` is bytes; every other value is text."""

    path: Mapping[str, Any] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.path.items():
            if name not in PATH_ATTRIBUTES:
                raise UriError(f"unknown PKCS#11 URI path attribute {name!r}")
            _validate_path_value(name, value)
        for name, value in self.query.items():
            _validate_query(name, value)
        object.__setattr__(self, "path", MappingProxyType(dict(self.path)))
        object.__setattr__(self, "query", MappingProxyType(dict(self.query)))

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not isinstance(text, str):
            raise UriError("a PKCS#11 URI must be a string")
        if len(text) > 4096:
            raise UriError("PKCS#11 URI is longer than 4096 characters")
        scheme, colon, rest = text.partition(":")
        if not colon or scheme.lower() != SCHEME:
            raise UriError(f"not a PKCS#11 URI (must start with 'pkcs11:'): {text[:40]!r}")
        path_text, _, query_text = rest.partition("?")
        path: dict[str, Any] = {}
        query: dict[str, str] = {}
        for part in path_text.split(";") if path_text else []:
            name, value = _split_attribute(part)
            if name in path:
                raise UriError(f"attribute {name!r} appears twice (at {part!r})")
            if name in QUERY_ATTRIBUTES or name == "pin-value":
                raise UriError(f"{name!r} is a query attribute; put it after '?' (at {part!r})")
            if name not in PATH_ATTRIBUTES:  # (its value is not repeated: it may be secret)
                raise UriError(f"unknown PKCS#11 URI path attribute {name[:40]!r}")
            raw = percent_decode(value, PATH_SAFE, part)
            path[name] = raw if name == "id" else utf8_text(raw, part)
        for part in query_text.split("&") if query_text else []:
            name, value = _split_attribute(part)
            if name in query:
                raise UriError(f"attribute {name!r} appears twice (at {part!r})")
            if name in PATH_ATTRIBUTES:
                raise UriError(f"{name!r} is a path attribute; put it before '?' (at {part!r})")
            query[name] = utf8_text(percent_decode(value, QUERY_SAFE, part), part)
        try:
            return cls(path, query)
        except UriError as exc:
            # The path names the key; the query is not repeated (a misspelt attribute
            # there may hold a secret).
            raise UriError(f"{exc} in {shortened(scheme + ':' + path_text)!r}") from None

    def __str__(self) -> str:
        parts = []
        for name in PATH_ATTRIBUTES:
            if name in self.path:
                value = self.path[name]
                if name == "id":
                    parts.append(f"id={percent_encode(value, PATH_SAFE, encode_all=True)}")
                else:
                    parts.append(f"{name}={percent_encode(value.encode(), PATH_SAFE)}")
        text = f"{SCHEME}:" + ";".join(parts)
        query = [
            f"{name}={percent_encode(self.query[name].encode(), QUERY_SAFE)}"
            for name in QUERY_ATTRIBUTES
            if name in self.query
        ]
        if query:
            text += "?" + "&".join(query)
        return text

    # Convenience accessors for the attributes Janus uses most.
    @property
    def token(self) -> str | None:
        return self.path.get("token")

    @property
    def object(self) -> str | None:
        return self.path.get("object")

    @property
    def type(self) -> str | None:
        return self.path.get("type")

    @property
    def id(self) -> bytes | None:
        return self.path.get("id")

    @property
    def module_path(self) -> str | None:
        return self.query.get("module-path")

    @property
    def module_name(self) -> str | None:
        return self.query.get("module-name")

    @property
    def pin_source(self) -> str | None:
        return self.query.get("pin-source")

    def names_object(self) -> bool:
        return "object" in self.path or "id" in self.path

    def token_uri(self) -> Pkcs11Uri:
        """The same URI with only the token-selecting attributes (and the query)."""
        return Pkcs11Uri({k: v for k, v in self.path.items() if k in TOKEN_ATTRIBUTES}, self.query)

    def with_path(self, **changes: Any) -> Pkcs11Uri:
        """A copy with path attributes changed (``None`` removes); ``slot_id`` → slot-id."""
        path = dict(self.path)
        for key, value in changes.items():
            name = key.replace("_", "-")
            if value is None:
                path.pop(name, None)
            else:
                path[name] = value
        return Pkcs11Uri(path, self.query)

    def without_query(self) -> Pkcs11Uri:
        return Pkcs11Uri(self.path, {})


def _split_attribute(part: str) -> tuple[str, str]:
    name, eq, value = part.partition("=")
    if not eq:
        raise UriError(f"attribute without '=' at {part!r}")
    if not name:
        raise UriError(f"attribute without a name at {part!r}")
    # Any spelling (PIN-VALUE, pin%2Dvalue): refused, and never quoted with its value.
    if unquote(name).lower() == "pin-value":
        raise UriError(
            "pin-value is refused: a PIN inside a URI leaks into shell history and process "
            "lists. Use pin-source=file:/path/to/pin-file or the JANUS_PIN variable"
        )
    return name, value


def utf8_text(raw: bytes, where: str) -> str:
    """A decoded value as text, or UriError if its bytes are not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UriError(f"value is not UTF-8 text at {where!r}") from None


def _validate_path_value(name: str, value: Any) -> None:
    if name == "id":
        if not isinstance(value, bytes):
            raise UriError("id must be bytes")
        return
    if not isinstance(value, str):
        raise UriError(f"{name} must be text")
    if name == "type" and value not in OBJECT_TYPES:
        raise UriError(f"type={value!r} is not one of {', '.join(OBJECT_TYPES)}")
    if name == "library-version" and not _VERSION.fullmatch(value):
        raise UriError(f"library-version={value!r} must look like 2 or 2.6")
    if name == "slot-id" and not value.isdigit():
        raise UriError(f"slot-id={value!r} must be a decimal number")


def _validate_query(name: str, value: str) -> None:
    if name not in QUERY_ATTRIBUTES:
        raise UriError(f"unknown PKCS#11 URI query attribute {name[:40]!r}")
    if not isinstance(value, str):
        raise UriError(f"{name} must be text")
    if "\x00" in value:  # a path or name with a NUL cannot be opened
        raise UriError(f"{name} contains a NUL character")
    if name == "module-path" and not value.startswith("/"):
        raise UriError(f"module-path={value!r} must be an absolute path")
    if name == "module-name" and ("/" in value or not value):
        raise UriError(f"module-name={value!r} must be a bare module name; use module-path")


def shortened(text: str) -> str:
    """A URI cut to 200 characters for an error message."""
    return text if len(text) <= 200 else text[:200] + "…"
