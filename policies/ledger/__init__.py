"""The use ledger: use counts, rate windows, nonces, revocations and the audit log.

``open_ledger(url)`` picks the backend from a URL, so the store is configuration: a
single host uses SQLite (the default, nothing to run), several cloud-agent instances
sharing the same limits point at one PostgreSQL database.  See docs/ledger.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from policies.errors import FormatError
from policies.ledger.base import GENESIS, AuditEntry, Ledger, LinkLimit, Rate, SpendReceipt

__all__ = [
    "GENESIS",
    "AuditEntry",
    "Ledger",
    "LinkLimit",
    "Rate",
    "SpendReceipt",
    "open_ledger",
]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

_FORMS = "use sqlite:///absolute/path.db, a file path, or postgresql://user@host:port/dbname"


def open_ledger(url: str) -> Ledger:
    """Open the ledger at ``url``.

    Accepted forms:

    - ``sqlite:///absolute/path.db`` (three slashes then an absolute path; four, as
      in SQLAlchemy, also work; ``%xx`` escapes are decoded),
    - a bare file path (``/var/lib/janus/ledger.db``, ``ledger.db``): SQLite,
    - ``postgresql://…`` or ``postgres://…``: any libpq URI, passed to psycopg as is.

    Anything else raises FormatError.  PostgreSQL needs psycopg
    (``pip install 'janus-hsm[postgres]'``); it is imported only when asked for.
    """
    if not isinstance(url, str) or not url.strip():
        raise FormatError(f"empty ledger URL: {_FORMS}")
    scheme = _SCHEME.match(url)
    if scheme is None:
        return _sqlite(url, url)
    name = scheme.group(1).lower()
    if name in ("postgresql", "postgres"):
        if not url[len(name) + 1 :].startswith("//"):
            raise FormatError(f"ledger URL {url!r} is not postgresql://…: {_FORMS}")
        from policies.ledger.postgres import PostgresLedger

        return PostgresLedger(url)
    if name == "sqlite":
        parts = urlsplit(url)
        if not url.startswith("sqlite://") or parts.netloc:
            raise FormatError(
                f"ledger URL {url!r}: write sqlite:///absolute/path.db (three slashes, no host)"
            )
        if parts.query or parts.fragment:
            raise FormatError(f"ledger URL {url!r}: sqlite URLs take no ?query or #fragment")
        # sqlite:////abs/path (SQLAlchemy's spelling, or f"sqlite:///{absolute}") is
        # the same absolute path.
        path = "/" + unquote(parts.path).lstrip("/") if parts.path.startswith("/") else ""
        if path in ("", "/"):
            raise FormatError(f"ledger URL {url!r}: sqlite:/// needs an absolute file path")
        return _sqlite(path, url)
    raise FormatError(f"unknown ledger URL scheme {name!r} in {url!r}: {_FORMS}")


def _sqlite(path: str, url: str) -> Ledger:
    if path == ":memory:" or path.endswith("/"):
        raise FormatError(f"ledger URL {url!r}: the ledger needs a file (it must be durable)")
    if Path(path).is_dir():
        raise FormatError(f"ledger URL {url!r} names a directory, not a database file")
    from policies.ledger.sqlite import SqliteLedger

    return SqliteLedger(path)
