"""The cloud agent's own state: grants (one fresh key each), held messages, and
events waiting for the event bus.

It lives in the same database as the ledger (SQLite by default, PostgreSQL when
several instances share work), so one backup and one failover cover everything.
Messages are held until the owner acknowledges them (pickup 3.0: never deleted before
"messages-received").
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import AgentError, ConfigurationError, NotFoundError
from janus_hsm.database_url import DatabaseURLError, parse_database_url

log = logging.getLogger(__name__)

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS cloud_grants (
        grant_id TEXT PRIMARY KEY,
        key_uri TEXT NOT NULL,
        did TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        bundle TEXT,
        leaf_id TEXT,
        expires_at DOUBLE PRECISION,
        reason TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS cloud_messages (
        msg_id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        received_at DOUBLE PRECISION NOT NULL,
        envelope TEXT NOT NULL
    )""",
    # Signed events accepted here that the event bus has not acknowledged yet: written
    # before the local change they announce, so an instance stopped before the bus took
    # them publishes them at its next start (same event, same id: stored once).
    """CREATE TABLE IF NOT EXISTS cloud_bus_outbox (
        event_id TEXT PRIMARY KEY,
        compact TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        published_at DOUBLE PRECISION
    )""",
)

PENDING, ACTIVE, DESTROYED = "pending", "active", "destroyed"


@dataclass(frozen=True)
class GrantRecord:
    grant_id: str
    key_uri: str
    did: str
    status: str
    created_at: float
    bundle: str | None
    leaf_id: str | None
    expires_at: float | None
    reason: str | None


@dataclass(frozen=True)
class HeldMessage:
    msg_id: str
    owner: str
    received_at: float
    envelope: str


class CloudStore:
    """Grant and mailbox tables over SQLite or PostgreSQL (same SQL, two placeholders)."""

    def __init__(self, url: str) -> None:
        self._lock = threading.Lock()
        try:  # the ledger reads the same URL the same way: both open one database
            where = parse_database_url(url)
        except DatabaseURLError as exc:
            raise ConfigurationError(f"state store: {exc}") from None
        if not where.is_sqlite:
            import psycopg

            self._url = url
            self._pg: Any = psycopg.connect(url, autocommit=True)
            self._sqlite: sqlite3.Connection | None = None
            self._mark = "%s"
        else:
            path = where.target
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._sqlite = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._sqlite.execute("PRAGMA journal_mode=WAL")
            self._sqlite.execute("PRAGMA synchronous=FULL")
            self._sqlite.execute("PRAGMA busy_timeout=10000")
            self._pg = None
            self._mark = "?"
        with self._cursor() as cur:
            for statement in _SCHEMA:
                cur.execute(statement)

    @contextmanager
    def _cursor(self) -> Iterator[Any]:
        with self._lock:
            try:
                if self._sqlite is not None:
                    yield self._sqlite.cursor()
                else:
                    if self._pg.closed:  # the server restarted or dropped us: reconnect
                        import psycopg

                        self._pg = psycopg.connect(self._url, autocommit=True)
                    with self._pg.cursor() as cur:
                        yield cur
            except AgentError:
                raise
            except Exception as exc:
                # The database's text may name hosts, tables or values: the log has it.
                log.error("state store failed: %s: %s", type(exc).__name__, exc)
                raise AgentError(f"state store failed ({type(exc).__name__})") from None

    def _sql(self, text: str) -> str:
        return text.replace("?", self._mark)

    def add_grant(self, grant_id: str, key_uri: str, did: str) -> GrantRecord:
        now = time.time()
        with self._cursor() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO cloud_grants (grant_id, key_uri, did, status, created_at)"
                    " VALUES (?, ?, ?, ?, ?)"
                ),
                (grant_id, key_uri, did, PENDING, now),
            )
        return self.grant(grant_id)

    def grant(self, grant_id: str) -> GrantRecord:
        with self._cursor() as cur:
            cur.execute(
                self._sql(
                    "SELECT grant_id, key_uri, did, status, created_at, bundle, leaf_id,"
                    " expires_at, reason FROM cloud_grants WHERE grant_id = ?"
                ),
                (grant_id,),
            )
            row = cur.fetchone()
        if row is None:
            raise NotFoundError(f"no grant {grant_id!r}")
        return GrantRecord(*row)

    def grants(self, status: str | None = None) -> list[GrantRecord]:
        query = (
            "SELECT grant_id, key_uri, did, status, created_at, bundle, leaf_id, expires_at,"
            " reason FROM cloud_grants"
        )
        args: tuple[Any, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            args = (status,)
        with self._cursor() as cur:
            cur.execute(self._sql(query + " ORDER BY created_at"), args)
            return [GrantRecord(*row) for row in cur.fetchall()]

    def activate(self, grant_id: str, bundle: str, leaf_id: str, expires_at: float) -> bool:
        """Install a pending grant's capability; False if it is not pending (any more)."""
        with self._cursor() as cur:
            cur.execute(
                self._sql(
                    "UPDATE cloud_grants SET status = ?, bundle = ?, leaf_id = ?, expires_at = ?"
                    " WHERE grant_id = ? AND status = ?"
                ),
                (ACTIVE, bundle, leaf_id, expires_at, grant_id, PENDING),
            )
            return bool(cur.rowcount == 1)

    def destroy(self, grant_id: str, reason: str) -> None:
        with self._cursor() as cur:
            cur.execute(
                self._sql("UPDATE cloud_grants SET status = ?, reason = ? WHERE grant_id = ?"),
                (DESTROYED, reason, grant_id),
            )

    def hold(self, msg_id: str, owner: str, envelope: str) -> None:
        with self._cursor() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO cloud_messages (msg_id, owner, received_at, envelope)"
                    " VALUES (?, ?, ?, ?)"
                ),
                (msg_id, owner, time.time(), envelope),
            )

    def held(self, owner: str, limit: int) -> list[HeldMessage]:
        with self._cursor() as cur:
            cur.execute(
                self._sql(
                    "SELECT msg_id, owner, received_at, envelope FROM cloud_messages"
                    " WHERE owner = ? ORDER BY received_at, msg_id LIMIT ?"
                ),
                (owner, limit),
            )
            return [HeldMessage(*row) for row in cur.fetchall()]

    def count_held(self, owner: str) -> int:
        with self._cursor() as cur:
            cur.execute(self._sql("SELECT COUNT(*) FROM cloud_messages WHERE owner = ?"), (owner,))
            return int(cur.fetchone()[0])

    def acknowledge(self, owner: str, msg_ids: Sequence[str]) -> int:
        removed = 0
        with self._cursor() as cur:
            for msg_id in msg_ids:
                cur.execute(
                    self._sql("DELETE FROM cloud_messages WHERE owner = ? AND msg_id = ?"),
                    (owner, msg_id),
                )
                removed += max(cur.rowcount, 0)
        return removed

    def add_unpublished(self, event_id: str, compact: str) -> None:
        """Keep a signed event until the bus acknowledges it (``mark_published``)."""
        with self._cursor() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO cloud_bus_outbox (event_id, compact, created_at)"
                    " VALUES (?, ?, ?) ON CONFLICT (event_id) DO NOTHING"
                ),
                (event_id, compact, time.time()),
            )

    def unpublished(self) -> list[str]:
        """The events not yet acknowledged by the bus, oldest first (compact JWS)."""
        with self._cursor() as cur:
            cur.execute(
                "SELECT compact FROM cloud_bus_outbox WHERE published_at IS NULL"
                " ORDER BY created_at, event_id"
            )
            return [str(row[0]) for row in cur.fetchall()]

    def mark_published(self, event_id: str) -> None:
        with self._cursor() as cur:
            cur.execute(
                self._sql("UPDATE cloud_bus_outbox SET published_at = ? WHERE event_id = ?"),
                (time.time(), event_id),
            )

    def close(self) -> None:
        with self._lock:
            if self._sqlite is not None:
                self._sqlite.close()
            if self._pg is not None:
                self._pg.close()
