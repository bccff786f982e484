"""The directory's database: SQLite by default, PostgreSQL shared by several instances.

One connection per thread (the HTTP layer runs store work in a thread pool), and every
unit of work in one transaction: SQLite's ``BEGIN IMMEDIATE`` (one writer at a time,
the rest wait on the busy timeout), PostgreSQL's default READ COMMITTED with row locks
where a row is consumed (``FOR UPDATE SKIP LOCKED``) and the log's advisory lock where
the log grows.  The same SQL serves both, with ``?`` placeholders rewritten for psycopg.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.directory import merkle
from agent.directory.errors import DirectoryError, StoreError
from agent.errors import AgentError
from janus_hsm.database_url import DatabaseURLError, parse_database_url, redact_dsn

log = logging.getLogger(__name__)

_TABLES = (
    "CREATE TABLE IF NOT EXISTS dir_names ("
    " name TEXT PRIMARY KEY, root TEXT NOT NULL, suite TEXT, idk TEXT,"
    " statement TEXT, leaf_index BIGINT NOT NULL, withdrawn INTEGER NOT NULL,"
    " updated BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS dir_batches ("
    " batch TEXT PRIMARY KEY, name TEXT NOT NULL, statement TEXT NOT NULL,"
    " created BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS dir_prekeys ("
    " id {serial}, name TEXT NOT NULL, batch TEXT NOT NULL, idx INTEGER NOT NULL,"
    " prekey TEXT NOT NULL, path TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS dir_prekeys_by_name ON dir_prekeys (name, id)",
    # A claim's row is also its request's nonce: one insert records both.
    "CREATE TABLE IF NOT EXISTS dir_claims (nonce TEXT PRIMARY KEY, name TEXT NOT NULL,"
    " claimer TEXT NOT NULL, at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS dir_claims_by_name ON dir_claims (name, at)",
    "CREATE INDEX IF NOT EXISTS dir_claims_by_claimer ON dir_claims (claimer, at)",
    "CREATE TABLE IF NOT EXISTS dir_nonces (nonce TEXT PRIMARY KEY, expires BIGINT NOT NULL)",
)


class Tx:
    """One open transaction: ``execute`` with ``?`` placeholders on either database."""

    def __init__(self, conn: Any, postgres: bool) -> None:
        self.conn = conn
        self.postgres = postgres

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        if self.postgres:
            sql = sql.replace("?", "%s")
        return self.conn.execute(sql, params)

    def log(self) -> merkle.MerkleLog:
        store: merkle.NodeStore = (
            merkle.PostgresNodeStore(self.conn)
            if self.postgres
            else merkle.SqliteNodeStore(self.conn)
        )
        return merkle.MerkleLog(store)


class DirectoryStore:
    """Thread-safe: a connection per thread, opened on first use."""

    def __init__(self, url: str) -> None:
        try:
            where = parse_database_url(url)
        except DatabaseURLError as exc:
            raise StoreError(f"--store: {exc}") from None
        self.postgres = not where.is_sqlite
        self.target = where.target
        self.shown = redact_dsn(url)
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()
        if not self.postgres:
            Path(self.target).parent.mkdir(parents=True, exist_ok=True)
        with self.transaction() as tx:
            serial = (
                "BIGSERIAL PRIMARY KEY" if self.postgres else "INTEGER PRIMARY KEY AUTOINCREMENT"
            )
            if self.postgres:  # two instances starting at once must not race on DDL
                tx.execute("SELECT pg_advisory_xact_lock(4849678935)")
            for statement in _TABLES:
                tx.execute(statement.format(serial=serial))
            merkle.ensure_schema(tx.conn)

    def _connect(self) -> Any:
        try:
            if self.postgres:
                import psycopg

                conn: Any = psycopg.connect(self.target, autocommit=True)
            else:
                conn = sqlite3.connect(self.target, check_same_thread=False, isolation_level=None)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA busy_timeout=30000")
        except Exception as exc:
            log.error("directory store %s: %s: %s", self.shown, type(exc).__name__, exc)
            raise StoreError(
                f"cannot open the directory's database ({type(exc).__name__}); see the log"
            ) from None
        with self._lock:
            self._all.append(conn)
        return conn

    def _conn(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is None or (self.postgres and conn.closed):
            conn = self._local.conn = self._connect()
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One transaction: committed on success, rolled back on any error."""
        conn = self._conn()
        try:
            if self.postgres:
                with conn.transaction():
                    yield Tx(conn, True)
            else:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield Tx(conn, False)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except (AgentError, DirectoryError):
            raise
        except Exception as exc:
            # The database's text may name hosts or values: the log has it, not the client.
            log.error("directory store failed: %s: %s", type(exc).__name__, exc)
            if self.postgres and getattr(conn, "closed", False):
                self._local.conn = None
            raise StoreError(f"the directory's database failed ({type(exc).__name__})") from None

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                try:
                    conn.close()
                except Exception:
                    log.debug("closing a store connection failed", exc_info=True)
            self._all.clear()
