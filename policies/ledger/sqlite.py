"""The SQLite ledger: the default, for one host.

Durability first: a use that ``spend`` reported must still be counted after a crash or
a power cut, otherwise a restart would hand out uses again and the limit would be a
suggestion.  Hence WAL with ``synchronous=FULL`` (every commit waits for an fsync of
the WAL; ``NORMAL`` is ~15x faster here but can lose the last commits on power loss,
see docs/ledger.md), and ``BEGIN IMMEDIATE`` transactions, which take SQLite's single
write lock before reading, so two processes can never both see "one use left".  The
fsync is the cost of a spend, so concurrent spends of one process share commits
(group commit: the spends of a commit are decided together, in order).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from janus_hsm.atomic_file import fsync_directory
from policies.errors import (
    AuditError,
    FormatError,
    LedgerError,
    LedgerNotFoundError,
    PolicyError,
    ReplayError,
    RevokedError,
)
from policies.ledger._common import (
    AUDIT_PAGE,
    LinkRow,
    LinkUpdate,
    audit_prefix,
    check_key,
    check_spend_args,
    decide_spend,
    entry_hash,
    normalise_data,
    schema_version,
)
from policies.ledger.audit import MAX_SEQ, MIN_SEQ, AuditRow, parse_head, stored_row
from policies.ledger.base import (
    GENESIS,
    AuditEntry,
    Ledger,
    LinkLimit,
    SpendReceipt,
    SpendRequest,
)

SCHEMA_VERSION = 1

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS janus_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS janus_links (
    cap_id TEXT PRIMARY KEY,
    uses INTEGER NOT NULL DEFAULT 0,
    rate_window INTEGER,
    rate_count INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS janus_nonces (
    nonce TEXT PRIMARY KEY,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS janus_revocations (
    cap_id TEXT PRIMARY KEY,
    record TEXT NOT NULL,
    revoked_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS janus_audit (
    seq INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    cap_id TEXT NOT NULL,
    data TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
"""

_READ_HEAD = "SELECT seq, hash FROM janus_audit ORDER BY seq DESC LIMIT 1"

# The head ("<seq>:<hash>") is recorded with every append, in the same transaction, so
# that verification sees entries removed from or added at the end of the log.
_HEAD_KEY = "audit_head"
_SET_HEAD = (
    "INSERT INTO janus_meta (key, value) VALUES ('audit_head', ?)"
    " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

# Audit rows as stored: each column's storage class next to its value, and text read as
# bytes, so a value of the wrong type or text that is not UTF-8 is named, not a crash.
_TEXT_COLUMNS = ("kind", "cap_id", "data", "prev", "hash")
_READ_AUDIT = (
    "SELECT seq, typeof(seq), typeof(at), at,"
    " typeof(kind), CAST(kind AS BLOB), typeof(cap_id), CAST(cap_id AS BLOB),"
    " typeof(data), CAST(data AS BLOB), typeof(prev), CAST(prev AS BLOB),"
    " typeof(hash), CAST(hash AS BLOB)"
    " FROM janus_audit WHERE seq >= ? ORDER BY seq LIMIT ?"
)
# Stand-ins of each other storage class, for stored_row's messages.
_STAND_IN: dict[str, object] = {"null": None, "integer": 0, "real": 0.0, "blob": b""}

# Everything a group of spends needs to decide, in one statement: the row of every link
# named (kind 0), which of them are revoked (1), which nonces are taken (2), and the
# audit head (3).  Bound as two JSON arrays (cap_ids, nonces): no SQL is built from data.
_READ_GROUP = """
SELECT 0, cap_id, uses, rate_window, rate_count FROM janus_links
 WHERE cap_id IN (SELECT value FROM json_each(?1))
UNION ALL
SELECT 1, cap_id, NULL, NULL, NULL FROM janus_revocations
 WHERE cap_id IN (SELECT value FROM json_each(?1))
UNION ALL
SELECT 2, nonce, NULL, NULL, NULL FROM janus_nonces
 WHERE nonce IN (SELECT value FROM json_each(?2))
UNION ALL
SELECT 3, hash, seq, NULL, NULL
 FROM (SELECT seq, hash FROM janus_audit ORDER BY seq DESC LIMIT 1)
"""
_LINK, _REVOKED, _TAKEN, _HEAD = range(4)

# A group's writes are one multi-row INSERT per table (one statement, where executemany
# would be one step, and one interpreter-lock round trip, per row).  The statements
# differ only in their number of rows, so they are built from counts, never from data.
_ROWS_PER_INSERT = 64
_INSERT_NONCES = "INSERT INTO janus_nonces (nonce, expires_at) VALUES "
_UPSERT_LINKS = (
    "INSERT INTO janus_links (cap_id, uses, rate_window, rate_count) VALUES ",
    " ON CONFLICT (cap_id) DO UPDATE SET uses = excluded.uses,"
    " rate_window = excluded.rate_window, rate_count = excluded.rate_count",
)
_INSERT_AUDIT = "INSERT INTO janus_audit (seq, at, kind, cap_id, data, prev, hash) VALUES "

_SELECT_REVOKED = (
    "SELECT cap_id FROM janus_revocations WHERE cap_id IN (SELECT value FROM json_each(?))"
)


def _create_private(path: Path) -> bool:
    """Create the database file 0600 (and make its name durable) if it does not exist;
    True if it was created here.

    SQLite gives its -wal and -shm files the database file's mode, so this one call
    keeps all three private.  The directory is fsynced so that a crash right after the
    first use cannot lose the file itself.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return False
    except OSError as exc:
        raise LedgerError(f"cannot create the SQLite ledger {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, 0o600)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_directory(path.parent)
    return True


@dataclass(eq=False)
class _Spend:
    """One spend's arguments, checked and serialised before its transaction."""

    limits: Sequence[LinkLimit]
    ids: list[str]
    nonce: str
    nonce_expires_at: float
    at: float
    data: str  # the audit data's canonical text
    prefix: str  # audit_prefix of its audit entry (the hash needs only prev and seq)


@dataclass(eq=False)
class _Work:
    """One caller's write, waiting for (or done in) a group-commit batch.

    Either a spend (decided together with the spends queued next to it) or any other
    transaction body ``fn``.
    """

    fn: Callable[[sqlite3.Connection], Any] | None = None
    spend: _Spend | None = None
    done: bool = False
    value: Any = None
    error: BaseException | None = None


def _insert_rows(
    c: sqlite3.Connection, head: str, rows: Sequence[tuple[Any, ...]], tail: str = ""
) -> None:
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        values = "(" + ",".join("?" * len(chunk[0])) + ")"
        c.execute(head + ",".join([values] * len(chunk)) + tail, [v for r in chunk for v in r])


class SqliteLedger(Ledger):
    """A ledger in one SQLite file, shared by the threads and processes of one host.

    Writes use group commit.  SQLite has one writer at a time and a durable commit
    costs an fsync, so writes that arrive while a commit is under way are queued, and
    the next thread runs all of them (up to ``max_batch``) in one ``BEGIN IMMEDIATE``
    transaction, where a refused spend writes nothing and the others still count,
    then one COMMIT.  Every caller is answered only after that COMMIT is on disk.  A
    single-threaded caller gets one transaction per spend, as without batching;
    several threads get many spends per fsync (see docs/ledger.md).

    Reads use a second connection, so they never see a batch's uncommitted writes.
    Processes each open their own ledger and queue on SQLite's write lock for up to
    ``busy_timeout`` seconds.  Do not carry an open ledger across ``fork()``: open
    one in each process.

    ``sync="os"`` gives up the power-cut guarantee for speed (commits are not fsynced;
    see ``__init__``); the default ``"full"`` keeps it.

    With ``create=False`` the file must already hold a ledger (LedgerNotFoundError
    otherwise), and opening it writes nothing; ``created`` says whether this object
    created the file.
    """

    batches_spends = True  # spend_many shares one COMMIT (one fsync) between spends

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        create: bool = True,
        busy_timeout: float = 30.0,
        max_batch: int = 64,
        sync: Literal["full", "os"] = "full",
    ) -> None:
        self.path = Path(path)
        if sync not in ("full", "os"):
            raise FormatError(f"sync must be 'full' or 'os', not {sync!r}")
        # "os" (synchronous=NORMAL): a commit is written to the OS but not fsynced, so it
        # survives the process crashing, not a power cut.  Only for a caller that says
        # so explicitly (the HSM service's opt-in ``audit-sync = "os"``).
        self._synchronous = "FULL" if sync == "full" else "NORMAL"
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise FormatError(f"a ledger needs a file path, not {str(path)!r}")
        self._pid = os.getpid()
        self._max_batch = max(1, max_batch)
        self._cond = threading.Condition()
        self._queue: list[_Work] = []
        self._leading = False  # a thread is running a batch on the writer connection
        self._closed = False
        self._read_lock = threading.Lock()
        self.commits = 0  # write transactions committed (tests check batching with it)
        if create:
            self.created = _create_private(self.path)
        elif not self.path.is_file():
            raise LedgerNotFoundError(
                f"no ledger at {self.path}: check the path (only commands that record"
                " create a ledger)"
            )
        else:
            self.created = False
        self._writer = self._open(busy_timeout)
        try:
            if not create:
                self._check_schema(self._writer)  # before anything could write to it
            mode = self._writer.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"{self.path}: SQLite refused WAL mode (got {mode!r})")
            if create:
                self._write(self._create_schema)
            self._reader = self._open(busy_timeout)
        except sqlite3.Error as exc:
            self._writer.close()
            raise LedgerError(f"cannot open the SQLite ledger {self.path}: {exc}") from exc
        except BaseException:
            self._writer.close()
            raise

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r})"

    @property
    def location(self) -> str:
        return str(self.path)

    # -- plumbing ------------------------------------------------------------------

    def _open(self, busy_timeout: float) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path,
                timeout=busy_timeout,
                isolation_level=None,  # BEGIN / COMMIT are issued here, explicitly
                check_same_thread=False,  # each connection is used under a lock
                # A group's inserts have 1.._ROWS_PER_INSERT rows: keep them all prepared.
                cached_statements=4 * _ROWS_PER_INSERT + 64,
            )
            conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            # FULL (the default): the WAL is fsynced at every commit, so a reported use
            # survives a power cut.  NORMAL (sync="os") syncs only at checkpoints
            # (docs/ledger.md).
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open the SQLite ledger {self.path}: {exc}") from exc
        return conn

    def _create_schema(self, c: sqlite3.Connection) -> None:
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                c.execute(statement)
        row = c.execute("SELECT value FROM janus_meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            c.execute(
                "INSERT INTO janus_meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
        else:
            schema_version(row[0], str(self.path), SCHEMA_VERSION)
        if c.execute("SELECT 1 FROM janus_meta WHERE key = ?", (_HEAD_KEY,)).fetchone() is None:
            # A new ledger, or one written before heads were recorded: its head is its
            # last entry as it stands.
            last = c.execute(_READ_HEAD).fetchone()
            c.execute(_SET_HEAD, ("0:" + GENESIS if last is None else f"{last[0]}:{last[1]}",))

    def _check_schema(self, c: sqlite3.Connection) -> None:
        """Refuse a file that holds no ledger (or one of another version), writing nothing."""
        tables = {
            str(r[0]) for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        if not {"janus_meta", "janus_audit", "janus_revocations"} <= tables:
            raise LedgerNotFoundError(f"{self.path} is not a Janus ledger (no ledger tables)")
        row = c.execute("SELECT value FROM janus_meta WHERE key = 'schema_version'").fetchone()
        schema_version(None if row is None else row[0], str(self.path), SCHEMA_VERSION)

    def _check_usable(self) -> None:
        if self._closed:
            raise LedgerError(f"{self!r} is closed")
        if os.getpid() != self._pid:
            raise LedgerError(
                f"{self!r} was opened in another process: open a ledger in each process"
            )

    def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in a write transaction, batched with concurrent writers.

        ``fn`` may raise a PolicyError (a refusal): only its own savepoint is rolled
        back.  Returns once the batch's COMMIT is durable.
        """
        work = _Work(fn=fn)
        self._submit([work])
        if work.error is not None:
            raise work.error
        return cast(T, work.value)

    def _submit(self, works: list[_Work]) -> None:
        """Queue ``works`` and return once every one of them is done (committed or not).

        The calling thread either waits for the thread running a batch, or runs the
        next batch itself; the queue is first in, first out, so the last of ``works``
        being done means all of them are.
        """
        last = works[-1]
        with self._cond:
            self._check_usable()
            self._queue.extend(works)
            while not last.done:
                if self._leading:
                    self._cond.wait()
                    continue
                if self._closed:  # closed while these writes were queued
                    self._queue[:] = [w for w in self._queue if w not in works]
                    raise LedgerError(f"{self!r} is closed")
                self._leading = True
                batch = self._queue[: self._max_batch]
                del self._queue[: len(batch)]
                self._cond.release()
                try:
                    self._run_batch(batch)
                finally:
                    self._cond.acquire()
                    self._leading = False
                    self._cond.notify_all()

    def _run_batch(self, batch: list[_Work]) -> None:
        """BEGIN IMMEDIATE; the batch's writes in order; COMMIT.  Marks every item done.

        IMMEDIATE takes SQLite's write lock before the first read, so checks and
        writes see the same state: no other process can spend in between.  Spends
        queued next to each other are decided together (_spend_group): one read, the
        decisions in order, one insert per table; a refused spend writes nothing.
        Other writes run each in a SAVEPOINT, so a refused one is rolled back alone.
        If the transaction itself fails, every item of the batch gets the
        LedgerError, refused ones too (their refusal may have counted an earlier
        item's use).
        """
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            start = 0
            while start < len(batch):
                end = start
                while end < len(batch) and batch[end].spend is not None:
                    end += 1
                if end > start:
                    self._spend_group_apart(conn, batch[start:end])
                    start = end
                    continue
                work = batch[start]
                start += 1
                assert work.fn is not None
                conn.execute("SAVEPOINT janus_write")
                try:
                    work.value = work.fn(conn)
                except PolicyError as refusal:
                    conn.execute("ROLLBACK TO janus_write")
                    work.error = refusal
                conn.execute("RELEASE janus_write")
            conn.execute("COMMIT")
            self.commits += 1
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            failure: BaseException = exc
            if isinstance(exc, Exception):
                failure = self._write_failure(exc)
            else:
                # The leading thread was interrupted: the other callers of the batch get
                # a LedgerError (nothing was committed).
                failure = LedgerError(f"{self.path}: the write failed: {exc!r}")
                failure.__cause__ = exc
            for work in batch:
                work.value, work.error = None, failure
            if not isinstance(exc, Exception):
                raise
        finally:
            for work in batch:
                work.done = True

    def _spend_group_apart(self, c: sqlite3.Connection, works: Sequence[_Work]) -> None:
        """``_spend_group``, and if its write fails, each spend again on its own.

        The group's writes are shared, so a value one caller brought that the database
        will not take (or any other fault of one spend) would otherwise fail every
        caller in the batch; spends in separate transactions would fail only that one.
        If the failure is not one spend's (the disk, the database), the spends fail one
        after another, or the transaction is gone and the whole batch fails, as before.
        """
        c.execute("SAVEPOINT janus_group")
        try:
            self._spend_group(c, works)
        except Exception as exc:
            c.execute("ROLLBACK TO janus_group")  # fails if the transaction is gone
            if len(works) == 1:
                works[0].value, works[0].error = None, self._write_failure(exc)
            else:
                for work in works:
                    work.value, work.error = None, None
                    self._spend_group_apart(c, [work])
        c.execute("RELEASE janus_group")

    def _write_failure(self, exc: Exception) -> Exception:
        """What the caller of a failed write gets: a database error as a LedgerError."""
        if not isinstance(exc, sqlite3.Error):
            return exc
        failure = LedgerError(f"{self.path}: the write failed: {exc!r}")
        failure.__cause__ = exc
        return failure

    @staticmethod
    def _spend_group(c: sqlite3.Connection, works: Sequence[_Work]) -> None:
        """Decide consecutive spends in order, as one each would, with one read.

        Each spend sees the ones before it (their nonces, counts and audit entries),
        exactly as separate transactions in this order would; a refused spend changes
        nothing.  The write lock is held (BEGIN IMMEDIATE), so what was read stays
        true until COMMIT.
        """
        spends = [w.spend for w in works if w.spend is not None]
        ids = list(dict.fromkeys(cap_id for s in spends for cap_id in s.ids))
        nonces = [s.nonce for s in spends]
        rows: dict[str, LinkRow] = {}
        revoked: set[str] = set()
        taken: set[str] = set()
        head: tuple[int, str] | None = None
        for kind, key, a, b, d in c.execute(_READ_GROUP, (json.dumps(ids), json.dumps(nonces))):
            if kind == _LINK:
                rows[key] = LinkRow(int(a), None if b is None else int(b), int(d))
            elif kind == _REVOKED:
                revoked.add(key)
            elif kind == _TAKEN:
                taken.add(key)
            else:
                head = (int(a), str(key))
        changed: dict[str, LinkUpdate] = {}
        new_nonces: list[tuple[str, float]] = []
        entries: list[tuple[int, float, str, str, str, str, str]] = []
        for work, spend in zip(works, spends, strict=True):
            try:
                # In the order of a single spend: replay, then revocation, then limits.
                if spend.nonce in taken:
                    raise ReplayError(f"nonce {spend.nonce!r} was used before")
                for i, cap_id in enumerate(spend.ids):
                    if cap_id in revoked:
                        raise RevokedError(f"capability {cap_id} is revoked", link=i)
                updates = decide_spend(spend.limits, rows, spend.at)
            except PolicyError as refusal:
                work.error = refusal
                continue
            taken.add(spend.nonce)
            new_nonces.append((spend.nonce, spend.nonce_expires_at))
            for update in updates:
                rows[update.cap_id] = LinkRow(update.uses, update.rate_window, update.rate_count)
                changed[update.cap_id] = update
            seq, prev = (1, GENESIS) if head is None else (head[0] + 1, head[1])
            digest = entry_hash(spend.prefix, prev, seq)
            entries.append((seq, spend.at, "use", spend.ids[-1], spend.data, prev, digest))
            head = (seq, digest)
            work.value = SpendReceipt(uses={u.cap_id: u.uses for u in updates}, audit_seq=seq)
        if not entries:
            return
        _insert_rows(c, _INSERT_NONCES, new_nonces)
        _insert_rows(
            c,
            _UPSERT_LINKS[0],
            [(u.cap_id, u.uses, u.rate_window, u.rate_count) for u in changed.values()],
            _UPSERT_LINKS[1],
        )
        _insert_rows(c, _INSERT_AUDIT, entries)
        assert head is not None
        c.execute(_SET_HEAD, (f"{head[0]}:{head[1]}",))

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._read_lock:
            self._check_usable()
            try:
                yield self._reader
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: {exc}") from exc

    @staticmethod
    def _append(
        c: sqlite3.Connection,
        at: float,
        kind: str,
        cap_id: str,
        data: str,
        *,
        head: tuple[int, str] | Literal[False] | None = False,
    ) -> int:
        """Append an audit entry after the last one (``head``, read here if not given).

        The write lock is held, so the last entry cannot change under us.  Returns
        the new entry's seq.
        """
        if head is False:
            row = c.execute(_READ_HEAD).fetchone()
            head = None if row is None else (int(row[0]), str(row[1]))
        seq, prev = (1, GENESIS) if head is None else (head[0] + 1, head[1])
        at = float(at)
        digest = entry_hash(audit_prefix(at, kind, cap_id, data), prev, seq)
        c.execute(
            "INSERT INTO janus_audit (seq, at, kind, cap_id, data, prev, hash)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, at, kind, cap_id, data, prev, digest),
        )
        c.execute(_SET_HEAD, (f"{seq}:{digest}",))
        return seq

    def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(connection)`` in one write transaction, committed (durably, shared
        with concurrent writers) before this returns.

        For a program that keeps its own tables in the ledger file and must decide and
        audit in one step; ``fn`` adds entries with :meth:`append_audit_entry`.  If the
        commit fails, nothing ``fn`` wrote (its entries included) is kept.
        """
        self._check_usable()
        return self._write(fn)

    @classmethod
    def append_audit_entry(
        cls, c: sqlite3.Connection, *, at: float, kind: str, cap_id: str, data: Mapping[str, Any]
    ) -> int:
        """Append an entry inside a :meth:`transaction`; returns its seq."""
        check_key(cap_id, "an audit entry's cap_id")
        return cls._append(c, float(at), kind, cap_id, normalise_data(data))

    @staticmethod
    def append_audit_rows(
        c: sqlite3.Connection, rows: Sequence[tuple[float, str, str, str]]
    ) -> list[int]:
        """Append entries inside a :meth:`transaction`, in order; returns their seqs.

        Each row is ``(at, kind, cap_id, data_text)``, ``data_text`` being the entry's
        :func:`normalise_data` text (made, and so checked, before the transaction: a
        caller's bad data then fails that caller alone).  A group of entries costs one
        head read, one insert and one head write, which is what group commit of many
        callers' entries needs.
        """
        if not rows:
            return []
        row = c.execute(_READ_HEAD).fetchone()
        seq, prev = (0, GENESIS) if row is None else (int(row[0]), str(row[1]))
        entries: list[tuple[int, float, str, str, str, str, str]] = []
        for at, kind, cap_id, data in rows:
            seq += 1
            digest = entry_hash(audit_prefix(at, kind, cap_id, data), prev, seq)
            entries.append((seq, float(at), kind, cap_id, data, prev, digest))
            prev = digest
        _insert_rows(c, _INSERT_AUDIT, entries)
        c.execute(_SET_HEAD, (f"{seq}:{prev}",))
        return [e[0] for e in entries]

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
        work = _Work(spend=self._prepare(SpendRequest(limits, nonce, nonce_expires_at, now, audit)))
        self._submit([work])
        if work.error is not None:
            raise work.error
        return cast(SpendReceipt, work.value)

    def spend_many(self, requests: Sequence[SpendRequest]) -> list[SpendReceipt | Exception]:
        """Queue every spend at once: they share commits (one, up to ``max_batch``)."""
        results: list[SpendReceipt | Exception | None] = [None] * len(requests)
        works: list[tuple[int, _Work]] = []
        for i, request in enumerate(requests):
            try:
                works.append((i, _Work(spend=self._prepare(request))))
            except Exception as exc:  # malformed arguments: refused before any I/O
                results[i] = exc
        if works:
            self._submit([work for _, work in works])
        for i, work in works:
            error = work.error
            if error is not None and not isinstance(error, Exception):
                raise error  # the running thread was interrupted (KeyboardInterrupt…)
            results[i] = error if error is not None else work.value
        return [r for r in results if r is not None]

    @staticmethod
    def _prepare(request: SpendRequest) -> _Spend:
        """Check a spend's arguments and serialise its audit entry, before any I/O."""
        check_spend_args(request.limits, request.nonce, request.now)
        data = normalise_data(request.audit)
        ids = [link.cap_id for link in request.limits]
        at = float(request.now)
        return _Spend(
            limits=request.limits,
            ids=ids,
            nonce=request.nonce,
            nonce_expires_at=float(request.nonce_expires_at),
            at=at,
            data=data,
            prefix=audit_prefix(at, "use", ids[-1], data),
        )

    def uses(self, cap_id: str) -> int:
        with self._reading() as c:
            row = c.execute("SELECT uses FROM janus_links WHERE cap_id = ?", (cap_id,)).fetchone()
        return 0 if row is None else int(row[0])

    def record_grant(self, cap_id: str, data: Mapping[str, Any]) -> int:
        check_key(cap_id, "cap_id")
        normalised = normalise_data(data)
        at = time.time()
        return self._write(lambda c: self._append(c, at, "grant", cap_id, normalised))

    def revoke(self, cap_id: str, *, record: str, data: Mapping[str, Any]) -> bool:
        check_key(cap_id, "cap_id")
        normalised = normalise_data(data)
        now = time.time()

        def run(c: sqlite3.Connection) -> bool:
            cursor = c.execute(
                "INSERT INTO janus_revocations (cap_id, record, revoked_at) VALUES (?, ?, ?)"
                " ON CONFLICT (cap_id) DO NOTHING",
                (cap_id, record, now),
            )
            if cursor.rowcount == 0:
                return False  # already revoked: nothing written, nothing audited
            self._append(c, now, "revoke", cap_id, normalised)
            return True

        return self._write(run)

    def revoked(self, cap_ids: Sequence[str]) -> str | None:
        if not cap_ids:
            return None
        with self._reading() as c:
            found = {
                str(r[0])
                for r in c.execute(
                    _SELECT_REVOKED,
                    (json.dumps(list(cap_ids)),),
                )
            }
        return next((cap_id for cap_id in cap_ids if cap_id in found), None)

    def audit_entries(self) -> Iterator[AuditEntry]:
        last = MIN_SEQ
        while True:
            with self._reading() as c:
                rows = self._audit_page(c, last)
            for row in rows:
                yield row.entry()
            if len(rows) < AUDIT_PAGE or rows[-1].seq >= MAX_SEQ:
                return
            last = rows[-1].seq + 1

    @contextlib.contextmanager
    def audit_snapshot(self) -> Iterator[tuple[Iterator[AuditRow], tuple[int, str] | None]]:
        """Rows and head from one read transaction (a WAL snapshot): appends made while
        the log is checked are not seen, neither in the rows nor in the head."""
        with self._reading() as c:
            c.execute("BEGIN")
            try:
                row = c.execute(
                    "SELECT value FROM janus_meta WHERE key = ?", (_HEAD_KEY,)
                ).fetchone()
                head = None if row is None else parse_head(row[0])
                yield self._snapshot_rows(c), head
            finally:
                c.execute("COMMIT")

    def _snapshot_rows(self, c: sqlite3.Connection) -> Iterator[AuditRow]:
        last = MIN_SEQ
        while True:
            try:
                rows = self._audit_page(c, last)
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: {exc}") from exc
            yield from rows
            if len(rows) < AUDIT_PAGE or rows[-1].seq >= MAX_SEQ:
                return
            last = rows[-1].seq + 1

    @staticmethod
    def _audit_page(c: sqlite3.Connection, first: int) -> list[AuditRow]:
        """Up to AUDIT_PAGE rows from seq ``first`` on, each stored type checked."""
        rows: list[AuditRow] = []
        for seq, seq_type, at_type, at, *texts in c.execute(_READ_AUDIT, (first, AUDIT_PAGE)):
            if seq_type != "integer":
                raise AuditError(f"an audit entry's seq is stored as {seq_type}, not an integer")
            values: list[object] = [at if at_type == "real" else _STAND_IN.get(at_type)]
            for column, kind, raw in zip(_TEXT_COLUMNS, texts[::2], texts[1::2], strict=True):
                if kind != "text":
                    values.append(_STAND_IN.get(kind))
                    continue
                try:
                    values.append(bytes(raw).decode("utf-8"))
                except UnicodeDecodeError:
                    raise AuditError(
                        f"audit entry {seq}: {column} is not UTF-8 text", entry=seq
                    ) from None
            rows.append(stored_row(seq, tuple(values)))
        return rows

    def audit_head(self) -> tuple[int, str] | None:
        """(seq, hash) of the last audit entry, to anchor elsewhere; None if empty."""
        with self._reading() as c:
            row = c.execute(_READ_HEAD).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def prune_nonces(self, now: float) -> int:
        return self._write(
            lambda c: (
                c.execute("DELETE FROM janus_nonces WHERE expires_at < ?", (float(now),)).rowcount
            )
        )

    def close(self) -> None:
        with self._cond:
            while self._leading:
                self._cond.wait()
            if self._closed:
                return
            self._closed = True
        if os.getpid() == self._pid:
            with self._read_lock:
                self._reader.close()
            self._writer.close()
