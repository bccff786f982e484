"""RFC 7512 PKCS#11 URIs: parsing and printing.

The attribute grammar (splitting, percent-decoding, refusals) is the one every key URI
scheme shares, :mod:`janus_hsm.uri_grammar`; this module adds what is PKCS#11's own.
Deliberately refused although RFC 7512 allows them:

* ``pin-value``: a PIN in a URI ends up in shell history, process lists and logs.
* vendor attributes (``x-…``) and attributes from later drafts: unknown means unsafe.
* an ``id`` written as bare hex digits (``id=0a1b2c``, ``id=0x0a1b``): RFC 7512 reads
  that as the ASCII bytes of the digits, but whoever writes it almost always means the
  bytes the digits spell (as ``pkcs11-tool --id`` takes them).  The error shows the
  percent-encoded spelling of both readings.

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

from janus_hsm.errors import UriError
from janus_hsm.uri_grammar import (
    PATH_SAFE,
    QUERY_SAFE,
    RES_AVAIL,
    UNRESERVED,
    Grammar,
    percent_decode,
    percent_encode,
)

__all__ = [
    "OBJECT_TYPES",
    "PATH_ATTRIBUTES",
    "PATH_SAFE",
    "QUERY_ATTRIBUTES",
    "QUERY_SAFE",
    "RES_AVAIL",
    "SCHEME",
    "TOKEN_ATTRIBUTES",
    "UNRESERVED",
    "Pkcs11Uri",
    "format_id",
    "percent_decode",
    "percent_encode",
]

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

GRAMMAR = Grammar(
    SCHEME,
    PATH_ATTRIBUTES,
    QUERY_ATTRIBUTES,
    advice="Use pin-source=file:/path/to/pin-file or the JANUS_PIN variable",
    binary=frozenset({"id"}),
)
_VERSION = re.compile(r"[0-9]+(\.[0-9]+)?")
# An id written as hex digits instead of percent-encoded bytes (see the module docstring).
_HEX_ID = re.compile(r"(0[xX])?[0-9A-Fa-f]+")


def format_id(key_id: bytes) -> str:
    """A key id as Janus prints it everywhere: every byte percent-encoded (``%0A%1B``)."""
    return percent_encode(key_id, PATH_SAFE, encode_all=True)


def _check_hex_id(raw: str) -> None:
    if "%" in raw or not _HEX_ID.fullmatch(raw):
        return
    digits = raw[2:] if raw[:2] in ("0x", "0X") else raw
    if not digits:
        return
    meant = bytes.fromhex(digits.rjust(len(digits) + len(digits) % 2, "0"))
    raise UriError(
        "id= is bytes, percent-encoded; a value of bare hex digits is ambiguous and "
        f"refused. For the bytes those digits spell, write id={format_id(meant)}; for the "
        f"characters themselves, write id={format_id(raw.encode('ascii'))}"
    )


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed PKCS#11 URI. ``id`` is bytes; every other value is text."""

    path: Mapping[str, Any] = field(default_factory=dict)
    query: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, value in self.path.items():
            if name not in PATH_ATTRIBUTES:
                raise UriError(f"unknown PKCS#11 URI path attribute {name[:40]!r}")
            _validate_path_value(name, value)
        for name, value in self.query.items():
            _validate_query(name, value)
        object.__setattr__(self, "path", MappingProxyType(dict(self.path)))
        object.__setattr__(self, "query", MappingProxyType(dict(self.query)))

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        attributes = GRAMMAR.parse(text)
        if "id" in attributes.encoded:
            _check_hex_id(attributes.encoded["id"])
        return cls(attributes.path, attributes.query)

    def __str__(self) -> str:
        parts = []
        for name in PATH_ATTRIBUTES:
            if name in self.path:
                value = self.path[name]
                if name == "id":
                    parts.append(f"id={format_id(value)}")
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


def _validate_path_value(name: str, value: Any) -> None:
    # Values are not repeated in messages: see janus_hsm.uri_grammar.
    if name == "id":
        if not isinstance(value, bytes):
            raise UriError("id must be bytes")
        return
    if not isinstance(value, str):
        raise UriError(f"{name} must be text")
    if "\x00" in value:
        raise UriError(f"the value of {name!r} contains a NUL character")
    if name == "type" and value not in OBJECT_TYPES:
        raise UriError(f"type= must be one of {', '.join(OBJECT_TYPES)}")
    if name == "library-version" and not _VERSION.fullmatch(value):
        raise UriError("library-version= must be a version like 2 or 2.6")
    if name == "slot-id" and not (value.isascii() and value.isdigit()):
        raise UriError("slot-id= must be a decimal number")


def _validate_query(name: str, value: str) -> None:
    if name not in QUERY_ATTRIBUTES:
        raise UriError(f"unknown PKCS#11 URI query attribute {name[:40]!r}")
    if not isinstance(value, str):
        raise UriError(f"{name} must be text")
    if "\x00" in value:  # a path or name with a NUL cannot be opened
        raise UriError(f"the value of {name!r} contains a NUL character")
    if name == "module-path" and not value.startswith("/"):
        raise UriError("module-path= must be an absolute path (or use module-name=)")
    if name == "module-name" and ("/" in value or not value):
        raise UriError("module-name= must be a bare module name; for a path use module-path=")
