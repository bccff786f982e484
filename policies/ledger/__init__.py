"""The use ledger: use counts, rate windows, nonces, revocations and the audit log.

``open_ledger(url)`` picks the backend from a URL, so the store is configuration: a
single host uses SQLite (the default, nothing to run), several cloud-agent instances
sharing the same limits point at one PostgreSQL database.  See docs/ledger.md.
"""

from __future__ import annotations

from pathlib import Path

from janus_hsm.database_url import DatabaseURLError, parse_database_url
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


def open_ledger(url: str, *, create: bool = True) -> Ledger:
    """Open the ledger at ``url``.

    Accepted forms (read by :mod:`janus_hsm.database_url`, as the cloud agent's store
    reads them, so both always name the same database):

    - ``sqlite:///absolute/path.db`` (three slashes then an absolute path; four, as
      in SQLAlchemy, also work; ``%xx`` escapes are decoded),
    - a bare file path (``/var/lib/janus/ledger.db``, ``ledger.db``): SQLite,
    - ``postgresql://…`` or ``postgres://…``: any libpq URI, passed to psycopg as is.

    Anything else raises FormatError.  With ``create=False`` (commands that only read)
    a ledger that does not exist yet (no SQLite file, or no ledger tables in the
    PostgreSQL database) raises LedgerNotFoundError instead of being created empty;
    otherwise the new ledger's ``created`` is true.  PostgreSQL needs psycopg
    (``pip install 'janus-hsm[postgres]'``); it is imported only when asked for.
    """
    try:
        parsed = parse_database_url(url)
    except DatabaseURLError as exc:
        raise FormatError(f"ledger: {exc}") from None
    if not parsed.is_sqlite:
        from policies.ledger.postgres import PostgresLedger

        return PostgresLedger(parsed.target, create=create)
    if Path(parsed.target).is_dir():
        raise FormatError(f"ledger {parsed.target!r} names a directory, not a database file")
    from policies.ledger.sqlite import SqliteLedger

    return SqliteLedger(parsed.target, create=create)
