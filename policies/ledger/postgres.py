"""The PostgreSQL ledger: one set of limits shared by several cloud-agent processes or hosts.

A spend is one statement, ``SELECT janus_spend(…)``, run in its own transaction
(autocommit), which calls a PL/pgSQL function installed with the tables.  In that
transaction the function

1. inserts the nonce (``ON CONFLICT DO NOTHING``; nothing inserted means a replay; a
   concurrent spend with the same nonce waits on the primary key until the first one
   commits or rolls back),
2. creates missing link rows, then locks every link row with ``SELECT … FOR UPDATE``
   (reading whether each is revoked on the way), both in sorted ``cap_id`` order (one
   global order, so spends over overlapping chains cannot deadlock),
3. refuses if any link is revoked,
4. checks every link's use limit, then every link's rate window, exactly as
   ``_common.decide_spend`` does for SQLite (the shared test suite holds them
   together), raising a Janus SQLSTATE on refusal, which rolls everything back,
5. updates the link rows and appends the audit entry: it locks the single audit head
   row (always the last lock taken), hashes the entry from the prefix computed here
   and the head's hash, inserts it and moves the head.

Why a server-side function: the head row serialises every spend of the deployment,
and it stays locked until the commit.  Done from the client, it would stay locked
across network round trips and Python work; in the function it is held only for the
function's tail and the commit's WAL flush.  One statement is also one round trip.
The functions run with ``plan_cache_mode = force_generic_plan``: their statements
filter on ``= ANY(array)``, for which PostgreSQL would otherwise keep re-planning.
The statement returns only after the commit (libpq waits for ReadyForQuery), and
``synchronous_commit`` is on, so a returned spend is on the server's disk.

psycopg is imported lazily, so that SQLite users need not install it.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

from policies.errors import (
    LedgerError,
    LedgerNotFoundError,
    LimitExceededError,
    RateLimitedError,
    ReplayError,
    RevokedError,
)
from policies.ledger._common import (
    AUDIT_PAGE,
    audit_prefix,
    check_key,
    check_spend_args,
    normalise_data,
    rate_window,
    redact_dsn,
    schema_version,
)
from policies.ledger.audit import MAX_SEQ, MIN_SEQ, AuditRow, stored_row
from policies.ledger.base import GENESIS, AuditEntry, Ledger, LinkLimit, SpendReceipt

if TYPE_CHECKING:
    import psycopg

    Connection = psycopg.Connection[tuple[Any, ...]]

SCHEMA_VERSION = 1

# pg_advisory_xact_lock key guarding schema creation: CREATE TABLE IF NOT EXISTS is
# not safe against itself when several instances start at once.
SCHEMA_LOCK_KEY = 0x4A414E55534C4752  # "JANUSLGR"

# SQLSTATEs raised by janus_spend (class J0 is not used by PostgreSQL).
_REPLAYED, _REVOKED, _EXHAUSTED, _RATE_LIMITED = "J0001", "J0002", "J0003", "J0004"

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS janus_meta (
        key text PRIMARY KEY,
        value text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS janus_links (
        cap_id text PRIMARY KEY,
        uses bigint NOT NULL DEFAULT 0,
        rate_window bigint,
        rate_count bigint NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS janus_nonces (
        nonce text PRIMARY KEY,
        expires_at double precision NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS janus_revocations (
        cap_id text PRIMARY KEY,
        record text NOT NULL,
        revoked_at double precision NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS janus_audit (
        seq bigint PRIMARY KEY,
        at double precision NOT NULL,
        kind text NOT NULL,
        cap_id text NOT NULL,
        data text NOT NULL,
        prev text NOT NULL,
        hash text NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS janus_audit_head (
        id integer PRIMARY KEY CHECK (id = 1),
        seq bigint NOT NULL,
        hash text NOT NULL)""",
    # Appends one entry after the head, which it locks (the last lock of any
    # transaction).  hash = SHA-256 of the canonical body: the client's prefix (see
    # _common.audit_prefix), then "<prev>","seq":<seq>}.
    """CREATE OR REPLACE FUNCTION janus_append(
        p_kind text, p_cap_id text, p_at double precision, p_prefix text, p_data text)
    RETURNS bigint LANGUAGE plpgsql
    SET search_path FROM CURRENT SET plan_cache_mode = force_generic_plan AS $fn$
    DECLARE
        v_seq bigint;
        v_prev text;
        v_hash text;
    BEGIN
        SELECT h.seq, h.hash INTO v_seq, v_prev FROM janus_audit_head AS h
            WHERE h.id = 1 FOR UPDATE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'the audit head row (janus_audit_head) is missing';
        END IF;
        v_seq := v_seq + 1;
        v_hash := encode(sha256(convert_to(
            p_prefix || '"' || v_prev || '","seq":' || v_seq::text || '}', 'UTF8')), 'hex');
        INSERT INTO janus_audit (seq, at, kind, cap_id, data, prev, hash)
            VALUES (v_seq, p_at, p_kind, p_cap_id, p_data, v_prev, v_hash);
        UPDATE janus_audit_head SET seq = v_seq, hash = v_hash WHERE id = 1;
        RETURN v_seq;
    END
    $fn$""",
    # One use on every link, or an exception (which rolls the statement back).
    # p_limits / p_rate_counts hold NULL where a link has no such limit; p_windows is
    # floor(now / per_seconds) per link, computed by the client like SQLite's.
    # Returns the links' new use counts (p_ids order) followed by the audit seq.
    """CREATE OR REPLACE FUNCTION janus_spend(
        p_nonce text, p_expires double precision, p_ids text[], p_limits bigint[],
        p_rate_counts bigint[], p_windows bigint[], p_at double precision,
        p_prefix text, p_data text)
    RETURNS bigint[] LANGUAGE plpgsql
    SET search_path FROM CURRENT SET plan_cache_mode = force_generic_plan AS $fn$
    DECLARE
        v_n integer := cardinality(p_ids);
        v_uses bigint[] := array_fill(0::bigint, ARRAY[v_n]);
        v_window bigint[] := array_fill(NULL::bigint, ARRAY[v_n]);
        v_count bigint[] := array_fill(0::bigint, ARRAY[v_n]);
        v_i integer;
        v_revoked integer;  -- the first revoked link's position, if any
        v_row record;
    BEGIN
        INSERT INTO janus_nonces (nonce, expires_at) VALUES (p_nonce, p_expires)
            ON CONFLICT (nonce) DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'replayed' USING ERRCODE = 'J0001';
        END IF;
        INSERT INTO janus_links (cap_id)
            SELECT x FROM unnest(p_ids) AS x ORDER BY x
            ON CONFLICT (cap_id) DO NOTHING;
        FOR v_row IN
            SELECT l.cap_id, l.uses, l.rate_window, l.rate_count,
                   EXISTS (SELECT 1 FROM janus_revocations AS r
                           WHERE r.cap_id = l.cap_id) AS revoked
                FROM janus_links AS l
                WHERE l.cap_id = ANY(p_ids) ORDER BY l.cap_id FOR UPDATE OF l
        LOOP
            v_i := array_position(p_ids, v_row.cap_id);
            IF v_row.revoked AND (v_revoked IS NULL OR v_i < v_revoked) THEN
                v_revoked := v_i;
            END IF;
            v_uses[v_i] := v_row.uses;
            v_window[v_i] := v_row.rate_window;
            v_count[v_i] := v_row.rate_count;
        END LOOP;
        IF v_revoked IS NOT NULL THEN
            RAISE EXCEPTION '%', v_revoked - 1 USING ERRCODE = 'J0002';
        END IF;
        FOR v_k IN 1..v_n LOOP
            IF p_limits[v_k] IS NOT NULL AND v_uses[v_k] >= p_limits[v_k] THEN
                RAISE EXCEPTION '%', v_k - 1 USING ERRCODE = 'J0003';
            END IF;
        END LOOP;
        FOR v_k IN 1..v_n LOOP
            IF p_rate_counts[v_k] IS NOT NULL THEN
                -- A later stored window (a faster clock elsewhere) is kept: see
                -- _common.decide_spend.
                IF v_window[v_k] IS NULL OR v_window[v_k] < p_windows[v_k] THEN
                    v_window[v_k] := p_windows[v_k];
                    v_count[v_k] := 0;
                END IF;
                IF v_count[v_k] >= p_rate_counts[v_k] THEN
                    RAISE EXCEPTION '%', v_k - 1 USING ERRCODE = 'J0004';
                END IF;
                v_count[v_k] := v_count[v_k] + 1;
            END IF;
            v_uses[v_k] := v_uses[v_k] + 1;
        END LOOP;
        UPDATE janus_links AS l
            SET uses = v.new_uses, rate_window = v.new_window, rate_count = v.new_count
            FROM unnest(p_ids, v_uses, v_window, v_count)
                AS v(link_id, new_uses, new_window, new_count)
            WHERE l.cap_id = v.link_id;
        RETURN v_uses || janus_append('use', p_ids[v_n], p_at, p_prefix, p_data);
    END
    $fn$""",
    # Revokes once: NULL if the link was already revoked (nothing audited).
    """CREATE OR REPLACE FUNCTION janus_revoke(
        p_cap_id text, p_record text, p_at double precision, p_prefix text, p_data text)
    RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $fn$
    BEGIN
        INSERT INTO janus_revocations (cap_id, record, revoked_at)
            VALUES (p_cap_id, p_record, p_at) ON CONFLICT (cap_id) DO NOTHING;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        RETURN janus_append('revoke', p_cap_id, p_at, p_prefix, p_data);
    END
    $fn$""",
)

_SPEND = (
    "SELECT janus_spend(%s, %s, %s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s, %s, %s)"
)

# Deadlocks and serialization failures roll the whole statement back, so retrying
# is safe; the lock order makes them unexpected, but a DBA's own locks could cause one.
_RETRIES = 3


def import_psycopg() -> ModuleType:
    """psycopg 3, or a LedgerError that says how to install it."""
    try:
        import psycopg
    except ImportError as exc:
        raise LedgerError(
            "the PostgreSQL ledger needs psycopg 3: pip install 'janus-hsm[postgres]'"
        ) from exc
    return psycopg


def _bigints(values: Sequence[int | None]) -> str:
    """A bigint[] literal: psycopg cannot infer a type for a list of only NULLs."""
    return "{" + ",".join("NULL" if v is None else str(int(v)) for v in values) + "}"


class PostgresLedger(Ledger):
    """A ledger in a PostgreSQL database, safe to share between hosts.

    ``dsn`` is anything libpq accepts (``postgresql://user@host:port/db?…`` or
    ``host=… dbname=…``); add ``options=-csearch_path=NAME`` to keep the tables in a
    schema of their own.  Connections are pooled per ledger object (``max_idle`` kept
    open), so several threads can spend at once.  The tables and functions are
    created on first use if missing (the role then needs CREATE on the schema), unless
    ``create=False``: then a database without them raises LedgerNotFoundError.
    ``created`` says whether this object created them.
    """

    def __init__(
        self, dsn: str, *, create: bool = True, connect_timeout: int = 10, max_idle: int = 4
    ) -> None:
        self._pg = import_psycopg()
        self._dsn = dsn
        self.redacted_dsn = redact_dsn(dsn)
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle
        self._idle: list[Connection] = []
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self.created = False
        with self._connection() as conn:
            self._ensure_schema(conn, create=create)

    def __repr__(self) -> str:
        return f"PostgresLedger({self.redacted_dsn!r})"

    @property
    def location(self) -> str:
        return self.redacted_dsn

    # -- plumbing ------------------------------------------------------------------

    def _connect(self) -> Connection:
        try:
            conn: Connection = self._pg.connect(
                self._dsn,
                autocommit=True,  # each call is one statement, its own transaction
                connect_timeout=self._connect_timeout,
                application_name="janus-ledger",
            )
        except self._pg.Error as exc:
            raise LedgerError(
                f"cannot connect to the PostgreSQL ledger {self.redacted_dsn}: {exc}"
            ) from exc
        try:
            # A use reported to the caller must survive a server crash: refuse to run
            # with asynchronous commit even if the database or role defaults to it.
            row = conn.execute("SHOW synchronous_commit").fetchone()
            if row is not None and row[0] == "off":
                conn.execute("SET synchronous_commit = on")
        except self._pg.Error as exc:
            conn.close()
            raise LedgerError(f"PostgreSQL ledger {self.redacted_dsn}: {exc}") from exc
        return conn

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Connection]:
        """A connection from this ledger's pool, put back only if it is clean."""
        if os.getpid() != self._pid:
            raise LedgerError(
                f"{self!r} was opened in another process: open a ledger in each process"
            )
        with self._lock:
            if self._closed:
                raise LedgerError(f"{self!r} is closed")
            conn = self._idle.pop() if self._idle else None
        if conn is None or conn.closed:
            conn = self._connect()
        try:
            yield conn
        finally:
            clean = (
                not conn.closed
                and not conn.broken
                and conn.info.transaction_status == self._pg.pq.TransactionStatus.IDLE
            )
            with self._lock:
                keep = clean and not self._closed and len(self._idle) < self._max_idle
                if keep:
                    self._idle.append(conn)
            if not keep:
                conn.close()

    def _fail(self, exc: Exception, doing: str) -> NoReturn:
        raise LedgerError(f"PostgreSQL ledger {self.redacted_dsn}: {doing}: {exc}") from exc

    def _ensure_schema(self, conn: Connection, *, create: bool) -> None:
        try:
            with conn.transaction():
                if self._schema_version(conn) == SCHEMA_VERSION:
                    return
                if not create:
                    raise LedgerNotFoundError(
                        f"no ledger in {self.redacted_dsn} (no ledger tables): check the URL"
                        " (only commands that record create a ledger)"
                    )
                encoding = conn.execute("SHOW server_encoding").fetchone()
                if encoding is None or encoding[0] != "UTF8":
                    raise LedgerError(
                        f"{self.redacted_dsn}: the ledger needs a UTF8 database (the audit"
                        f" hash is over UTF-8 text), not {encoding and encoding[0]}"
                    )
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
                if self._schema_version(conn) == SCHEMA_VERSION:
                    return  # another instance created it while we waited for the lock
                for statement in SCHEMA:
                    conn.execute(statement.encode())
                conn.execute(
                    "INSERT INTO janus_audit_head (id, seq, hash) VALUES (1, 0, %s)"
                    " ON CONFLICT (id) DO NOTHING",
                    (GENESIS,),
                )
                conn.execute(
                    "INSERT INTO janus_meta (key, value) VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )
                self.created = True
        except self._pg.Error as exc:
            self._fail(exc, "creating the ledger tables")

    def _schema_version(self, conn: Connection) -> int | None:
        """The stored version (checked: LedgerError if damaged or unknown), None if the
        ledger's tables do not exist yet."""
        exists = conn.execute("SELECT to_regclass('janus_meta')").fetchone()
        if exists is None or exists[0] is None:
            return None
        row = conn.execute("SELECT value FROM janus_meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            return None
        return schema_version(row[0], self.redacted_dsn, SCHEMA_VERSION)

    def _refusal(self, exc: Exception, limits: Sequence[LinkLimit], nonce: str) -> Exception:
        """The Janus error for a refusal raised by janus_spend, or None if it is not one."""
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate == _REPLAYED:
            return ReplayError(f"nonce {nonce!r} was used before")
        if sqlstate not in (_REVOKED, _EXHAUSTED, _RATE_LIMITED):
            return exc
        diag = getattr(exc, "diag", None)
        link = int(getattr(diag, "message_primary", None) or 0)
        limit = limits[link]
        if sqlstate == _REVOKED:
            return RevokedError(f"capability {limit.cap_id} is revoked", link=link)
        if sqlstate == _EXHAUSTED:
            return LimitExceededError(
                f"link {link} ({limit.cap_id}) has used all of its {limit.uses} uses", link=link
            )
        rate = limit.rate
        assert rate is not None
        return RateLimitedError(
            f"link {link} ({limit.cap_id}) allows {rate.count} uses per {rate.per_seconds} s"
            " and this window is full",
            link=link,
        )

    # -- the Ledger interface ------------------------------------------------------

    def spend(
        self,
        limits: Sequence[LinkLimit],
        *,
        nonce: str,
        nonce_expires_at: float,
        now: float,
        audit: Mapping[str, Any] | None = None,
    ) -> SpendReceipt:
        check_spend_args(limits, nonce, now)
        text = normalise_data(audit)
        ids = [link.cap_id for link in limits]
        params = (
            nonce,
            float(nonce_expires_at),
            ids,
            _bigints([link.uses for link in limits]),
            _bigints([link.rate.count if link.rate else None for link in limits]),
            _bigints(
                [rate_window(now, link.rate.per_seconds) if link.rate else None for link in limits]
            ),
            float(now),
            audit_prefix(now, "use", ids[-1], text),
            text,
        )
        retryable = (self._pg.errors.DeadlockDetected, self._pg.errors.SerializationFailure)
        with self._connection() as conn:
            for attempt in range(_RETRIES):
                try:
                    row = conn.execute(_SPEND, params).fetchone()
                    break
                except retryable as exc:
                    if attempt == _RETRIES - 1:
                        self._fail(exc, "spend")
                except self._pg.Error as exc:
                    refusal = self._refusal(exc, limits, nonce)
                    if refusal is not exc:
                        raise refusal from None
                    self._fail(
                        exc,
                        "spend (if the connection broke while committing, the use may or"
                        " may not have been recorded)",
                    )
        if row is None or row[0] is None:
            raise LedgerError(f"{self!r}: janus_spend returned nothing")
        counts: list[int] = row[0]
        return SpendReceipt(uses=dict(zip(ids, counts[:-1], strict=True)), audit_seq=counts[-1])

    def uses(self, cap_id: str) -> int:
        with self._connection() as conn:
            try:
                row = conn.execute(
                    "SELECT uses FROM janus_links WHERE cap_id = %s", (cap_id,)
                ).fetchone()
            except self._pg.Error as exc:
                self._fail(exc, "reading a use count")
        return 0 if row is None else int(row[0])

    def record_grant(self, cap_id: str, data: Mapping[str, Any]) -> int:
        check_key(cap_id, "cap_id")
        text = normalise_data(data)
        at = time.time()
        with self._connection() as conn:
            try:
                row = conn.execute(
                    "SELECT janus_append('grant', %s, %s, %s, %s)",
                    (cap_id, at, audit_prefix(at, "grant", cap_id, text), text),
                ).fetchone()
            except self._pg.Error as exc:
                self._fail(exc, "recording a grant")
        assert row is not None
        return int(row[0])

    def revoke(self, cap_id: str, *, record: str, data: Mapping[str, Any]) -> bool:
        check_key(cap_id, "cap_id")
        text = normalise_data(data)
        at = time.time()
        with self._connection() as conn:
            try:
                row = conn.execute(
                    "SELECT janus_revoke(%s, %s, %s, %s, %s)",
                    (cap_id, record, at, audit_prefix(at, "revoke", cap_id, text), text),
                ).fetchone()
            except self._pg.Error as exc:
                self._fail(exc, "recording a revocation")
        return row is not None and row[0] is not None

    def revoked(self, cap_ids: Sequence[str]) -> str | None:
        if not cap_ids:
            return None
        with self._connection() as conn:
            try:
                found = {
                    str(r[0])
                    for r in conn.execute(
                        "SELECT cap_id FROM janus_revocations WHERE cap_id = ANY(%s::text[])",
                        (list(cap_ids),),
                    )
                }
            except self._pg.Error as exc:
                self._fail(exc, "reading revocations")
        return next((cap_id for cap_id in cap_ids if cap_id in found), None)

    def audit_entries(self) -> Iterator[AuditEntry]:
        last = MIN_SEQ
        while True:
            with self._connection() as conn:
                rows = self._audit_page(conn, last)
            for row in rows:
                yield row.entry()
            if len(rows) < AUDIT_PAGE or rows[-1].seq >= MAX_SEQ:
                return
            last = rows[-1].seq + 1

    @contextlib.contextmanager
    def audit_snapshot(self) -> Iterator[tuple[Iterator[AuditRow], tuple[int, str] | None]]:
        """Rows and head from one REPEATABLE READ transaction (one snapshot)."""
        with self._connection() as conn:
            try:
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                    row = conn.execute(
                        "SELECT seq, hash FROM janus_audit_head WHERE id = 1"
                    ).fetchone()
                    if row is None:
                        raise LedgerError(
                            f"{self!r}: the audit head row (janus_audit_head) is missing"
                        )
                    yield self._snapshot_rows(conn), (int(row[0]), str(row[1]))
            except self._pg.Error as exc:
                self._fail(exc, "reading the audit log")

    def _snapshot_rows(self, conn: Connection) -> Iterator[AuditRow]:
        last = MIN_SEQ
        while True:
            rows = self._audit_page(conn, last)
            yield from rows
            if len(rows) < AUDIT_PAGE or rows[-1].seq >= MAX_SEQ:
                return
            last = rows[-1].seq + 1

    def _audit_page(self, conn: Connection, first: int) -> list[AuditRow]:
        """Up to AUDIT_PAGE rows from seq ``first`` on (the columns' types are enforced
        by PostgreSQL; stored_row checks them all the same)."""
        try:
            rows = conn.execute(
                "SELECT seq, at, kind, cap_id, data, prev, hash FROM janus_audit"
                " WHERE seq >= %s ORDER BY seq LIMIT %s",
                (first, AUDIT_PAGE),
            ).fetchall()
        except self._pg.Error as exc:
            self._fail(exc, "reading the audit log")
        return [stored_row(row[0], tuple(row[1:])) for row in rows]

    def audit_head(self) -> tuple[int, str] | None:
        """(seq, hash) of the last audit entry, to anchor elsewhere; None if empty."""
        with self._connection() as conn:
            try:
                row = conn.execute("SELECT seq, hash FROM janus_audit_head WHERE id = 1").fetchone()
            except self._pg.Error as exc:
                self._fail(exc, "reading the audit head")
        if row is None:
            raise LedgerError(f"{self!r}: the audit head row (janus_audit_head) is missing")
        return None if int(row[0]) == 0 else (int(row[0]), str(row[1]))

    def prune_nonces(self, now: float) -> int:
        with self._connection() as conn:
            try:
                cur = conn.execute("DELETE FROM janus_nonces WHERE expires_at < %s", (float(now),))
            except self._pg.Error as exc:
                self._fail(exc, "pruning nonces")
        return cur.rowcount

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        if os.getpid() == self._pid:
            for conn in idle:
                conn.close()
