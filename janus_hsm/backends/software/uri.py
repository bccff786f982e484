"""``soft:`` URIs, which name a software keystore directory and a key in it.

The form follows RFC 7512 so that people who know PKCS#11 URIs can read it at once::

    soft:dir=/abs/path/to/keystore;object=NAME?pin-source=file:/path/to/passphrase

Parsing is as strict as :mod:`janus_hsm.uri` and for the same reason: the URI picks a
private key, so anything Janus does not understand is refused rather than ignored.
Object names are restricted to a small charset because they become file names; no
name can climb out of the directory, hide as a dot file, or collide with the
keystore's own temporary and lock files (which all start with a dot).

Printing is canonical (``dir`` then ``object``, every character outside the allowed
set percent-encoded) so that ``SoftwareUri.parse(str(u)) == u`` for every URI.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, replace
from pathlib import Path

from janus_hsm.errors import UriError
from janus_hsm.pin import pin_source_path
from janus_hsm.uri import (
    PATH_SAFE,
    QUERY_SAFE,
    percent_decode,
    percent_encode,
    shortened,
    utf8_text,
)

SCHEME = "soft"
PATH_ATTRIBUTES = ("dir", "object")
QUERY_ATTRIBUTES = ("pin-source",)
MAX_URI = 4096

#: Object names: they become ``<name>.jkey`` inside the keystore directory.
OBJECT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")

# Unlike RFC 7512's path, '/' is allowed literally so a directory reads as a directory.
_PATH_SAFE = PATH_SAFE | {"/"}


def default_directory() -> Path:
    """Where keys live when the URI has no ``dir``: the user's data directory."""
    import platformdirs

    return Path(platformdirs.user_data_dir("janus")) / "keys"


@dataclass(frozen=True)
class SoftwareUri:
    """A parsed ``soft:`` URI. Every attribute is optional; ``None`` means absent."""

    dir: str | None = None
    object: str | None = None
    pin_source: str | None = None

    def __post_init__(self) -> None:
        if self.dir is not None:
            _validate_dir(self.dir)
        if self.object is not None:
            _validate_object(self.object)
        if self.pin_source is not None:
            _validate_text("pin-source", self.pin_source)
            try:
                pin_source_path(self.pin_source)  # UriError for unsupported forms
            except UriError:
                raise
            except ValueError as exc:  # urlsplit's own complaints, e.g. a bad IPv6 host
                raise UriError(
                    f"pin-source {self.pin_source!r} is not a valid URI: {exc}"
                ) from None

    @classmethod
    def parse(cls, text: str) -> SoftwareUri:
        if not isinstance(text, str):
            raise UriError("a soft: URI must be a string")
        if len(text) > MAX_URI:
            raise UriError(f"soft: URI is longer than {MAX_URI} characters")
        scheme, colon, rest = text.partition(":")
        if not colon or scheme.lower() != SCHEME:
            raise UriError(f"not a software keystore URI (must start with 'soft:'): {text[:40]!r}")
        path_text, _, query_text = rest.partition("?")
        values: dict[str, str] = {}
        _read_attributes(path_text, values, query=False)
        _read_attributes(query_text, values, query=True)
        try:
            return cls(values.get("dir"), values.get("object"), values.get("pin-source"))
        except UriError as exc:
            raise UriError(f"{exc} in {shortened(text)!r}") from None

    def __str__(self) -> str:
        parts = []
        if self.dir is not None:
            parts.append(f"dir={_encode(self.dir, _PATH_SAFE)}")
        if self.object is not None:
            parts.append(f"object={_encode(self.object, _PATH_SAFE)}")
        text = f"{SCHEME}:" + ";".join(parts)
        if self.pin_source is not None:
            text += f"?pin-source={_encode(self.pin_source, QUERY_SAFE)}"
        return text

    @property
    def directory(self) -> Path:
        """The keystore directory: ``dir`` if given, else the platform default."""
        return Path(self.dir) if self.dir is not None else default_directory()

    def with_object(self, name: str | None) -> SoftwareUri:
        return replace(self, object=name)

    def without_query(self) -> SoftwareUri:
        return replace(self, pin_source=None)


def _read_attributes(text: str, values: dict[str, str], *, query: bool) -> None:
    """Decode the path (``;``-separated) or query (``&``) attributes into ``values``."""
    names: tuple[str, ...]
    others: tuple[str, ...]
    if query:
        separator, kind, safe = "&", "query", QUERY_SAFE
        names, others = QUERY_ATTRIBUTES, PATH_ATTRIBUTES
        misplaced = "a path attribute; put it before '?'"
    else:
        separator, kind, safe = ";", "path", _PATH_SAFE
        names, others = PATH_ATTRIBUTES, QUERY_ATTRIBUTES
        misplaced = "a query attribute; put it after '?'"
    for part in text.split(separator) if text else []:
        name, value = _split_attribute(part)
        if name in values:
            raise UriError(f"attribute {name!r} appears twice (at {part!r})")
        if name in others:
            raise UriError(f"{name!r} is {misplaced} (at {part!r})")
        if name not in names:
            raise UriError(
                f"unknown soft: URI {kind} attribute {name!r} (at {part!r}); "
                f"expected {', '.join(names)}"
            )
        values[name] = utf8_text(percent_decode(value, safe, part), part)


def _split_attribute(part: str) -> tuple[str, str]:
    name, eq, value = part.partition("=")
    if name == "pin-value":
        raise UriError(
            "pin-value is refused: a passphrase inside a URI leaks into shell history and "
            "process lists. Use pin-source=file:/path/to/passphrase-file or JANUS_PIN"
        )
    if not eq:
        raise UriError(f"attribute without '=' at {part!r}")
    if not name:
        raise UriError(f"attribute without a name at {part!r}")
    return name, value


def _encode(value: str, safe: frozenset[str]) -> str:
    return percent_encode(value.encode("utf-8"), safe)


def _validate_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise UriError(f"{name} must be text")
    if "\x00" in value:
        raise UriError(f"{name} must not contain NUL characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UriError(f"{name} must be valid Unicode text (no lone surrogates)") from None


def _validate_dir(value: object) -> None:
    _validate_text("dir", value)
    assert isinstance(value, str)
    if not value.startswith("/"):
        raise UriError(f"dir={value!r} must be an absolute path")
    if posixpath.normpath(value) != value:
        raise UriError(
            f"dir={value!r} must be a normalised path; write it as {posixpath.normpath(value)!r}"
        )


def _validate_object(value: object) -> None:
    if not isinstance(value, str) or not OBJECT_NAME.fullmatch(value):
        raise UriError(
            f"object={value!r} is not a valid key name: use 1 to 64 characters from "
            "A-Z a-z 0-9 . _ - and do not start with '.'"
        )
