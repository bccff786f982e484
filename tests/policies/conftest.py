"""Fixtures for the ledger tests: a real PostgreSQL server, and a fresh ledger per test.

One suite runs against both backends: ``ledger_url`` (and so ``ledger`` and
``ledger_db``) is parametrized over SQLite and PostgreSQL.  The PostgreSQL cluster is
started once per session from Debian's binaries (hardware/postgres.py); each test gets
a schema of its own in it, dropped afterwards.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from policies.ledger import Ledger, open_ledger

BACKENDS = ("sqlite", "postgres")


def with_schema(dsn: str, schema: str) -> str:
    """The DSN with its search_path set to ``schema`` (libpq's ``options`` parameter)."""
    separator = "&" if "?" in dsn else "?"
    return f"{dsn}{separator}options=-csearch_path%3D{schema}"


@pytest.fixture(params=BACKENDS)
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty ledger store: a new SQLite file, or a new PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite://{tmp_path / 'ledger.db'}"
        return
    dsn: str = request.getfixturevalue("postgres_dsn")
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    try:
        yield with_schema(dsn, schema)
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def ledger(ledger_url: str) -> Iterator[Ledger]:
    with open_ledger(ledger_url) as opened:
        yield opened


class LedgerDb:
    """Direct SQL on a ledger's store, behind the ledger's back (to tamper, to inspect).

    Write parameters as ``%s``; they are turned into ``?`` for SQLite.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite:")

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.is_sqlite:
            conn = sqlite3.connect(self.url.removeprefix("sqlite://"), isolation_level=None)
            try:
                return conn.execute(sql.replace("%s", "?"), params).fetchall()
            finally:
                conn.close()
        with psycopg.connect(self.url, autocommit=True) as pg:
            cur = pg.execute(sql.encode(), params)  # bytes: a literal query, not a template
            return cur.fetchall() if cur.description is not None else []

    def scalar(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        return self.execute(sql, params)[0][0]


@pytest.fixture
def ledger_db(ledger_url: str) -> LedgerDb:
    return LedgerDb(ledger_url)
