"""The service's durable state and forced audit: one SQLite ledger file in the state dir.

The file is a Janus ledger (policies.ledger.sqlite), so its hash chain is the one
``janus audit verify`` already checks; the service adds its own tables to it (use
counts and rate windows per key, approvals already used, policy changes) so that a
decision, the counters it moves, the approvals it consumes and its audit entry are
one transaction.  Either all of it is durable before the token is touched, or none of
it is and the operation does not run (:class:`AuditUnavailable`).  Refusals are
entries too, written the same way.

Entries (``kind``/``data.event``):

- ``policy``/``start``: the service started; the approver registry and the key
  policies in force (so the log alone re-verifies its approvals later).
- ``decision``/``decision``: a request and what was decided (``outcome`` allowed or
  refused, ``reason``), with the approvals and the claims they were made over.
- ``decision``/``result``: what the token did with an allowed request (done/failed).
- ``policy``/``change``: a policy change, its approvals and the key's new policy;
  ``policy``/``state``: a key's dated state transition (or its destruction);
  ``policy``/``override``: a stored change dropped because the file's policy for
  that key was edited after it.
- ``head``/``head``: a signed head, a JWS by the audit-head key over the previous
  entry's ``seq`` and ``hash`` (see :mod:`agent.hsm_service.verify`).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

from agent.hsm_service.errors import AuditUnavailable, Refused
from policies.errors import (
    FormatError,
    LedgerError,
    LimitExceededError,
    PolicyError,
    RateLimitedError,
)
from policies.ledger._common import LinkRow, check_key, decide_spend, normalise_data
from policies.ledger.base import LinkLimit, Rate
from policies.ledger.sqlite import SqliteLedger

T = TypeVar("T")

LOG_FILE: Final = "audit.db"

_SCHEMA: Final = (
    """CREATE TABLE IF NOT EXISTS hsm_usage (
        label TEXT PRIMARY KEY,
        uses INTEGER NOT NULL DEFAULT 0,
        rate_window INTEGER,
        rate_count INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS hsm_used_approvals (
        challenge TEXT PRIMARY KEY,
        used_at REAL NOT NULL
    ) WITHOUT ROWID""",
    # A key's policy as changed by approved policy changes, and the digest of the
    # configuration file's policy it was changed from ("" for a key added by a change):
    # if the file's policy is edited since, the edit is newer and wins.
    """CREATE TABLE IF NOT EXISTS hsm_policy (
        label TEXT PRIMARY KEY,
        policy TEXT NOT NULL,
        base TEXT NOT NULL,
        changed_at REAL NOT NULL
    ) WITHOUT ROWID""",
    # Key states only move forwards; the latest reached is kept here, whatever the file
    # says later (a compromised key never becomes active again by an edit).
    """CREATE TABLE IF NOT EXISTS hsm_key_state (
        label TEXT PRIMARY KEY,
        state TEXT NOT NULL,
        since REAL NOT NULL
    ) WITHOUT ROWID""",
)


# What a group of decisions reads (bound as JSON arrays: no SQL is built from data)
# and writes.
_READ_USAGE: Final = (
    "SELECT label, uses, rate_window, rate_count FROM hsm_usage"
    " WHERE label IN (SELECT value FROM json_each(?))"
)
_READ_APPROVALS: Final = (
    "SELECT challenge FROM hsm_used_approvals WHERE challenge IN (SELECT value FROM json_each(?))"
)
_UPSERT_USAGE: Final = (
    "INSERT INTO hsm_usage (label, uses, rate_window, rate_count) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (label) DO UPDATE SET uses = excluded.uses,"
    " rate_window = excluded.rate_window, rate_count = excluded.rate_count"
)
_INSERT_APPROVAL: Final = "INSERT INTO hsm_used_approvals (challenge, used_at) VALUES (?, ?)"


@dataclass(frozen=True)
class Spend:
    """The counters an allowed operation moves: its key's use count and rate window."""

    label: str
    max_uses: int | None
    rate: tuple[int, int] | None  # (count, per_seconds)


class ServiceLog:
    """The state directory's ledger file, open for one service process."""

    def __init__(self, state_dir: Path, *, timeout: float, sync: str = "full") -> None:
        self.path = Path(state_dir) / LOG_FILE
        try:
            Path(state_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
            self.ledger = SqliteLedger(
                self.path, busy_timeout=timeout, sync="os" if sync == "os" else "full"
            )
            self.ledger.transaction(self._create)
        except (LedgerError, OSError) as exc:
            raise AuditUnavailable(f"cannot open the audit log {self.path}: {exc}") from None
        self._queue_lock = threading.Lock()
        self._queue: list[_Decision] = []
        self._leading = False  # a caller is committing a group of decisions

    @staticmethod
    def _create(c: sqlite3.Connection) -> None:
        for statement in _SCHEMA:
            c.execute(statement)

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return self.ledger.transaction(fn)
        except (LedgerError, sqlite3.Error, FormatError) as exc:
            raise AuditUnavailable(
                f"the audit log cannot be written ({exc.__class__.__name__}): nothing was done"
            ) from None

    # -- writes

    def append(self, kind: str, label: str, data: Mapping[str, Any], *, at: float) -> int:
        """One entry, durable when this returns (AuditUnavailable otherwise)."""
        return self._run(
            lambda c: SqliteLedger.append_audit_entry(c, at=at, kind=kind, cap_id=label, data=data)
        )

    def append_head(self, data: Mapping[str, Any], *, seq: int, digest: str) -> int | None:
        """Append a signed head right after entry ``seq`` (whose hash is ``digest``);
        None, writing nothing, if another entry came in between."""

        def run(c: sqlite3.Connection) -> int | None:
            row = c.execute(
                "SELECT seq, hash FROM janus_audit ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            current = (0, "0" * 64) if row is None else (int(row[0]), str(row[1]))
            if current != (seq, digest):
                return None
            return SqliteLedger.append_audit_entry(
                c, at=time.time(), kind="head", cap_id="-", data=data
            )

        return self._run(run)

    def decide(
        self,
        data: Mapping[str, Any],
        *,
        label: str,
        at: float,
        refusal: Refused | None = None,
        spend: Spend | None = None,
        challenge: bytes | None = None,
    ) -> int:
        """Decide and audit in one transaction; returns the entry's seq.

        ``refusal`` is a refusal decided before (it is only recorded).  Otherwise the
        approvals' ``challenge`` must be unused and ``spend`` within its limits; if so
        both are consumed, else the refusal is recorded.  Either way the entry is
        durable before this returns, and a refusal is then raised.

        Group commit: decisions that arrive while one transaction is being committed
        wait, and the next caller decides all of them, in arrival order, in one
        transaction (one read of the counters and the head, one insert per table, one
        fsync); each caller returns only once that transaction is durable, and if it
        fails, every decision of it fails (nothing of it is kept, no operation runs).
        """
        try:
            check_key(label, "an audit entry's cap_id")
            entry = {**data, "outcome": "allowed"}
            if refusal is not None:
                entry.update(outcome="refused", reason=refusal.reason, message=str(refusal))
            text = normalise_data(entry)  # checked here: bad data fails this caller alone
        except (FormatError, PolicyError) as exc:
            raise AuditUnavailable(
                f"the audit entry cannot be written ({exc.__class__.__name__}): nothing was done"
            ) from None
        pending = _Decision(dict(data), label, float(at), text, refusal, spend, challenge)
        with self._queue_lock:
            self._queue.append(pending)
            lead = not self._leading
            self._leading = True
        if not lead:
            # Woken once: with the result, or to commit the next group as its leader.
            pending.wake.wait()
        if not pending.done:
            self._lead(pending)
        if pending.error is not None:
            raise pending.error
        if pending.refused is not None:
            raise pending.refused
        return pending.seq

    def _lead(self, own: _Decision) -> None:
        """Commit groups until ``own`` is done, then hand the lead to the first decision
        still queued (or give it up): each waiting caller is woken exactly once."""
        while True:
            with self._queue_lock:
                batch = self._queue[:_MAX_GROUP]
                del self._queue[: len(batch)]
            try:
                self._commit_group(batch)
            finally:
                for item in batch:
                    if item is not own:
                        item.wake.set()
                if own.done or not batch:
                    with self._queue_lock:
                        if self._queue:
                            self._queue[0].wake.set()  # the next leader (not done)
                        else:
                            self._leading = False
            if own.done or not batch:
                return

    def _commit_group(self, batch: list[_Decision]) -> None:
        """Decide ``batch`` in one transaction; every item is done when this returns."""
        try:
            self._run(lambda c: _decide_group(c, batch))
        except BaseException as exc:
            failure = (
                exc
                if isinstance(exc, AuditUnavailable)
                else AuditUnavailable(
                    f"the audit log cannot be written ({exc.__class__.__name__}): nothing was done"
                )
            )
            for item in batch:
                item.seq, item.refused, item.error = 0, None, failure
            if not isinstance(exc, Exception):
                raise
        finally:
            for item in batch:
                item.done = True

    def save_policy(
        self,
        label: str,
        data: Mapping[str, Any],
        *,
        at: float,
        policy: Mapping[str, Any] | None = None,
        base: str = "",
        state: str | None = None,
        challenge: bytes | None = None,
        kind: str = "policy",
    ) -> int:
        """Store what changed for ``label`` (its policy, with the file policy's digest
        ``base``; and/or its state) and the audit entry, in one transaction.  With
        ``challenge``, approvals already used are refused (and that refusal audited).
        ``policy={}`` removes a stored policy."""

        def run(c: sqlite3.Connection) -> tuple[int, Refused | None]:
            if challenge is not None:
                row = c.execute(
                    "SELECT 1 FROM hsm_used_approvals WHERE challenge = ?", (challenge.hex(),)
                ).fetchone()
                if row is not None:
                    refused = Refused(
                        "approval_reused", "these approvals were already used for a change"
                    )
                    entry = {**data, "outcome": "refused", "reason": refused.reason}
                    seq = SqliteLedger.append_audit_entry(
                        c, at=at, kind=kind, cap_id=label, data=entry
                    )
                    return seq, refused
                c.execute(
                    "INSERT INTO hsm_used_approvals (challenge, used_at) VALUES (?, ?)",
                    (challenge.hex(), at),
                )
            if policy is not None and not policy:
                c.execute("DELETE FROM hsm_policy WHERE label = ?", (label,))
            elif policy is not None:
                c.execute(
                    "INSERT INTO hsm_policy (label, policy, base, changed_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (label) DO UPDATE SET policy = excluded.policy,"
                    " base = excluded.base, changed_at = excluded.changed_at",
                    (label, json.dumps(dict(policy), sort_keys=True), base, at),
                )
            if state is not None:
                c.execute(
                    "INSERT INTO hsm_key_state (label, state, since) VALUES (?, ?, ?)"
                    " ON CONFLICT (label) DO UPDATE SET state = excluded.state,"
                    " since = excluded.since",
                    (label, state, at),
                )
            entry = {**data, "outcome": "allowed"} if challenge is not None else dict(data)
            seq = SqliteLedger.append_audit_entry(c, at=at, kind=kind, cap_id=label, data=entry)
            return seq, None

        seq, refused = self._run(run)
        if refused is not None:
            raise refused
        return seq

    # -- reads (inside a transaction too: the writer's view, one lock)

    def policies(self) -> dict[str, tuple[dict[str, Any], str]]:
        """label -> (the stored policy, the digest of the file policy it came from)."""

        def run(c: sqlite3.Connection) -> dict[str, tuple[dict[str, Any], str]]:
            return {
                str(label): (json.loads(text), str(base))
                for label, text, base in c.execute("SELECT label, policy, base FROM hsm_policy")
            }

        return self._run(run)

    def states(self) -> dict[str, str]:
        """label -> the latest state each key reached."""

        def run(c: sqlite3.Connection) -> dict[str, str]:
            return {
                str(label): str(state)
                for label, state in c.execute("SELECT label, state FROM hsm_key_state")
            }

        return self._run(run)

    def uses(self, label: str) -> int:
        def run(c: sqlite3.Connection) -> int:
            row = c.execute("SELECT uses FROM hsm_usage WHERE label = ?", (label,)).fetchone()
            return 0 if row is None else int(row[0])

        return self._run(run)

    def head(self) -> tuple[int, str] | None:
        try:
            return self.ledger.audit_head()
        except (LedgerError, PolicyError) as exc:
            raise AuditUnavailable(f"cannot read the audit log's head: {exc}") from None

    def close(self) -> None:
        self.ledger.close()


def _decide_spend(rows: Mapping[str, LinkRow], spend: Spend, at: float) -> tuple[Any, ...]:
    """The key's new counter row (the ledger's own decision rule), or the ledger's
    LimitExceededError / RateLimitedError."""
    rate = None if spend.rate is None else Rate(spend.rate[0], spend.rate[1])
    limit = LinkLimit(spend.label, uses=spend.max_uses, rate=rate)
    (update,) = decide_spend([limit], rows, at)
    return (update.cap_id, update.uses, update.rate_window, update.rate_count)


_MAX_GROUP: Final = 256  # decisions per transaction, at most


@dataclass(eq=False)
class _Decision:
    """One caller's decision, waiting for (or done in) a group's transaction."""

    data: dict[str, Any]
    label: str
    at: float
    text: str  # the entry's canonical text if allowed (or for a refusal decided before)
    refusal: Refused | None
    spend: Spend | None
    challenge: bytes | None
    wake: threading.Event = field(default_factory=threading.Event)
    done: bool = False
    seq: int = 0
    refused: Refused | None = None
    error: BaseException | None = None


def _decide_group(c: sqlite3.Connection, batch: list[_Decision]) -> None:
    """Decide ``batch`` in order, each as if alone after the ones before it: one read
    of the keys' counters, then in memory, then one write per table."""
    labels = sorted({d.spend.label for d in batch if d.spend is not None})
    rows: dict[str, LinkRow] = {}
    if labels:
        for label, uses, window, count in c.execute(_READ_USAGE, (json.dumps(labels),)):
            rows[str(label)] = LinkRow(
                int(uses), None if window is None else int(window), int(count)
            )
    challenges = [d.challenge.hex() for d in batch if d.challenge is not None and d.refusal is None]
    used: set[str] = set()
    if challenges:
        used = {str(r[0]) for r in c.execute(_READ_APPROVALS, (json.dumps(challenges),))}
    changed: dict[str, tuple[Any, ...]] = {}
    new_approvals: list[tuple[str, float]] = []
    entries: list[tuple[float, str, str, str]] = []
    for d in batch:
        refused = d.refusal
        challenge = None if d.challenge is None else d.challenge.hex()
        if refused is None and challenge is not None and challenge in used:
            refused = Refused(
                "approval_reused",
                "these approvals were already used: each approval is good for one "
                "request (ask the approvers again)",
            )
        update = None
        if refused is None and d.spend is not None:
            try:
                update = _decide_spend(rows, d.spend, d.at)
            except RateLimitedError:  # (a LimitExceededError too: caught first)
                refused = Refused(
                    "rate_limited", f"key {d.label!r} is at its rate limit: retry later"
                )
            except LimitExceededError:
                refused = Refused("max_uses", f"key {d.label!r} has used all of its uses")
        text = d.text
        if refused is None:
            if update is not None:
                rows[update[0]] = LinkRow(update[1], update[2], update[3])
                changed[update[0]] = update
            if challenge is not None:
                used.add(challenge)
                new_approvals.append((challenge, d.at))
        elif refused is not d.refusal:
            text = normalise_data(
                {**d.data, "outcome": "refused", "reason": refused.reason, "message": str(refused)}
            )
        d.refused = refused
        entries.append((d.at, "decision", d.label, text))
    if changed:
        c.executemany(_UPSERT_USAGE, list(changed.values()))
    if new_approvals:
        c.executemany(_INSERT_APPROVAL, new_approvals)
    seqs = SqliteLedger.append_audit_rows(c, entries)
    for d, seq in zip(batch, seqs, strict=True):
        d.seq = seq
