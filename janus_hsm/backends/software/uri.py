"""``soft:`` URIs, which name a software keystore directory and a key in it.

The form follows RFC 7512 so that people who know PKCS#11 URIs can read it at once::

    soft:dir=/abs/path/to/keystore;object=NAME?pin-source=file:/path/to/passphrase

The attributes are split, decoded and refused by the grammar all key URIs share
(:mod:`janus_hsm.uri_grammar`): the URI picks a private key, so anything Janus does not
understand is refused rather than ignored, and no error repeats a value.
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
from janus_hsm.uri_grammar import PATH_SAFE, QUERY_SAFE, Grammar, percent_encode

SCHEME = "soft"
PATH_ATTRIBUTES = ("dir", "object")
QUERY_ATTRIBUTES = ("pin-source",)

#: Object names: they become ``<name>.jkey`` inside the keystore directory.
OBJECT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")

# Unlike RFC 7512's path, '/' is allowed literally so a directory reads as a directory.
_PATH_SAFE = PATH_SAFE | {"/"}

GRAMMAR = Grammar(
    SCHEME,
    PATH_ATTRIBUTES,
    QUERY_ATTRIBUTES,
    advice="Use pin-source=file:/path/to/passphrase-file or JANUS_PIN",
    path_safe=_PATH_SAFE,
)


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
            except ValueError:  # urlsplit's own complaints, e.g. a bad IPv6 host
                raise UriError("pin-source= is not a valid file: URI or absolute path") from None

    @classmethod
    def parse(cls, text: str) -> SoftwareUri:
        attributes = GRAMMAR.parse(text)
        return cls(attributes.text("dir"), attributes.text("object"), attributes.text("pin-source"))

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


def _encode(value: str, safe: frozenset[str]) -> str:
    return percent_encode(value.encode("utf-8"), safe)


def _validate_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise UriError(f"{name} must be text")
    if "\x00" in value:
        raise UriError(f"the value of {name!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise UriError(f"{name} must be valid Unicode text (no lone surrogates)") from None


def _validate_dir(value: object) -> None:
    _validate_text("dir", value)
    assert isinstance(value, str)
    # The value is not repeated: see janus_hsm.uri_grammar.
    if not value.startswith("/"):
        raise UriError("dir= must be an absolute path")
    if posixpath.normpath(value) != value:
        raise UriError(
            "dir= must be a normalised absolute path: no '.' or '..' segments, no '//' "
            "and no '/' at the end"
        )


def _validate_object(value: object) -> None:
    if not isinstance(value, str) or not OBJECT_NAME.fullmatch(value):
        raise UriError(
            "object= is not a valid key name: use 1 to 64 characters from "
            "A-Z a-z 0-9 . _ - and do not start with '.'"
        )
