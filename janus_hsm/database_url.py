"""Where a database lives, from the URL an operator wrote: one reading for every store.

The use ledger and the cloud agent's own tables share one database, named by one URL.
If each parsed it on its own, the same text could name two files (one decoding
``%20``, the other not), and a store's state would silently split in two.  So every
store reads its URL here.  Accepted forms:

- ``sqlite:///absolute/path.db`` (three slashes then an absolute path; four, as in
  SQLAlchemy, also work; ``%xx`` escapes are decoded),
- a bare file path (``/var/lib/janus/ledger.db``, ``ledger.db``): SQLite,
- ``postgresql://…`` or ``postgres://…``: any libpq URI, handed to the driver as is.

Written by hand rather than with SQLAlchemy's ``make_url``: that would pull a large
dependency into the key-custody layer for a dozen lines, and its rules for relative
``sqlite://`` paths differ from what is documented here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import quote, unquote, urlsplit

FORMS = "use sqlite:///absolute/path.db, a file path, or postgresql://user@host:port/dbname"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

_URI_PASSWORD = re.compile(r"(://[^:/@?#]*:)([^@/?#]*)(@)")
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)([^&#]*)")
_KV_PASSWORD = re.compile(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")


class DatabaseURLError(ValueError):
    """The URL names no database Janus can use; the message never shows a password.

    Each store raises its own typed error from it, with this message.
    """


@dataclass(frozen=True)
class DatabaseURL:
    """A parsed database URL: ``target`` is a file path (SQLite) or a libpq URI."""

    kind: Literal["sqlite", "postgresql"]
    target: str

    @property
    def is_sqlite(self) -> bool:
        return self.kind == "sqlite"


def redact_dsn(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, fit for error messages and logs."""
    if "://" in dsn:
        dsn = _URI_PASSWORD.sub(r"\1***\3", dsn)
        return _QUERY_PASSWORD.sub(r"\1***", dsn)
    return _KV_PASSWORD.sub(r"\1***", dsn)


def sqlite_url(path: str | os.PathLike[str]) -> str:
    """The ``sqlite:///`` URL of an absolute file path, escaped so that it reads back as
    exactly that path (a ``%``, ``#``, ``?`` or space in a directory name included)."""
    text = os.fspath(path)
    if not text.startswith("/"):
        raise DatabaseURLError(f"a sqlite:/// URL needs an absolute path, not {text!r}")
    return "sqlite://" + quote(text, safe="/")


def parse_database_url(url: object) -> DatabaseURL:
    """Read ``url`` (see the module's docstring); DatabaseURLError for anything else."""
    if not isinstance(url, str) or not url.strip():
        raise DatabaseURLError(f"empty database URL: {FORMS}")
    shown = repr(redact_dsn(url))
    scheme = _SCHEME.match(url)
    if scheme is None:
        return _sqlite(url, shown)
    name = scheme.group(1).lower()
    if name in ("postgresql", "postgres"):
        if not url[len(name) + 1 :].startswith("//"):
            # Not echoed: a malformed URL may hold a password the redaction cannot find.
            raise DatabaseURLError(f"a {name}: database URL must be {name}://…: {FORMS}")
        return DatabaseURL("postgresql", url)
    if name == "sqlite":
        try:
            parts = urlsplit(url)
        except ValueError as exc:  # urlsplit's own complaints (a bad IPv6 host…)
            raise DatabaseURLError(f"database URL {shown}: {exc}") from None
        if not url.startswith("sqlite://") or parts.netloc:
            raise DatabaseURLError(
                f"database URL {shown}: write sqlite:///absolute/path.db (three slashes, no host)"
            )
        if parts.query or parts.fragment:
            raise DatabaseURLError(f"database URL {shown}: sqlite URLs take no ?query or #fragment")
        # sqlite:////abs/path (SQLAlchemy's spelling, or f"sqlite:///{absolute}") is the
        # same absolute path.
        path = "/" + unquote(parts.path).lstrip("/") if parts.path.startswith("/") else ""
        if path in ("", "/"):
            raise DatabaseURLError(f"database URL {shown}: sqlite:/// needs an absolute file path")
        return _sqlite(path, shown)
    raise DatabaseURLError(f"unknown database URL scheme {name!r}: {FORMS}")


def _sqlite(path: str, shown: str) -> DatabaseURL:
    if path == ":memory:" or path.endswith("/") or path.startswith("file:") or "\0" in path:
        raise DatabaseURLError(f"database URL {shown}: the database needs a file (durable)")
    return DatabaseURL("sqlite", path)
