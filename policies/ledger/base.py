"""The ledger: where "limited use" becomes true.

A capability's signature proves what it allows; only shared state can prove how
often it was used.  The ledger is that state: use counts per link, rate windows,
invocation nonces, revocations, and the hash-chained audit log, all changed in one
transaction per use so no crash or race can leave a use counted but not audited, or
spent twice.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from janus_hsm.strictjson import canonical_json, canonical_text

if TYPE_CHECKING:
    from policies.ledger.audit import AuditRow

GENESIS = "0" * 64


@dataclass(frozen=True)
class Rate:
    """At most ``count`` uses in each fixed window of ``per_seconds``."""

    count: int
    per_seconds: int


@dataclass(frozen=True)
class LinkLimit:
    """The limits of one link of a chain, as the ledger needs them."""

    cap_id: str  # SHA-256 (base64url) of the link's compact JWS
    uses: int | None = None  # None: no use limit on this link
    rate: Rate | None = None


@dataclass(frozen=True)
class SpendReceipt:
    """What a successful spend recorded: the use count of each limited link after it."""

    uses: dict[str, int]
    audit_seq: int


@dataclass(frozen=True)
class SpendRequest:
    """The arguments of one ``Ledger.spend``, so that several can be handed over at once."""

    limits: Sequence[LinkLimit]
    nonce: str
    nonce_expires_at: float
    now: float
    audit: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    at: float
    kind: str  # "grant" | "use" | "revoke"
    cap_id: str
    data: Mapping[str, Any] = field(default_factory=dict)
    prev: str = GENESIS
    hash: str = ""

    def body(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "cap_id": self.cap_id,
            "data": dict(self.data),
            "prev": self.prev,
        }

    def compute_hash(self) -> str:
        return audit_hash(self.body())


def audit_hash(body: Mapping[str, Any]) -> str:
    """SHA-256 over canonical JSON (sorted keys, no spaces, UTF-8) of the entry body."""
    return hashlib.sha256(canonical_json(body)).hexdigest()


class Ledger(abc.ABC):
    """Use accounting shared by every verifier of a deployment.

    Every method is safe to call from several threads and several processes (and,
    for PostgreSQL, several hosts) at once.
    """

    # True when opening this ledger created it (its file, or its tables): a command
    # that records says so, since a mistyped location would otherwise pass unnoticed.
    created = False

    @property
    def location(self) -> str:
        """Where the ledger lives, fit for messages (never a password)."""
        return repr(self)

    @abc.abstractmethod
    def spend(
        self,
        limits: Sequence[LinkLimit],
        *,
        nonce: str,
        nonce_expires_at: float,
        now: float,
        audit: Mapping[str, Any] | None = None,
    ) -> SpendReceipt:
        """Count one use on every link, atomically and durably, or refuse.

        Refuses (and changes nothing) with ReplayError if ``nonce`` was recorded
        before, RevokedError if any link is revoked, LimitExceededError(link=i) if a
        link with a use limit has none left, RateLimitedError(link=i) if a link's
        current rate window is full.  Otherwise records the nonce, one use on each
        link, and a "use" audit entry (cap_id = the leaf's, data = ``audit``), and
        returns only after the transaction is committed to stable storage.
        """

    # True when spend_many commits a whole batch with one durable write: then a caller
    # that gathers concurrent spends (policies.ledger.aio) should hand them over
    # together rather than spend each from its own thread.
    batches_spends = False

    def spend_many(self, requests: Sequence[SpendRequest]) -> list[SpendReceipt | Exception]:
        """Several independent spends; each is all or nothing on its own.

        Returns, in order, each spend's receipt or the exception it raised (a refusal
        of one does not affect the others).  Every receipt is durable on return.  This
        default spends one after another; a ledger that can share one commit between
        them overrides it and sets ``batches_spends``.
        """
        results: list[SpendReceipt | Exception] = []
        for r in requests:
            try:
                results.append(self.spend_one(r))
            except Exception as exc:
                results.append(exc)
        return results

    def spend_one(self, request: SpendRequest) -> SpendReceipt:
        """``spend`` with its arguments in one object."""
        return self.spend(
            request.limits,
            nonce=request.nonce,
            nonce_expires_at=request.nonce_expires_at,
            now=request.now,
            audit=request.audit,
        )

    @abc.abstractmethod
    def uses(self, cap_id: str) -> int:
        """Uses recorded so far for one link (0 if never used)."""

    @abc.abstractmethod
    def record_grant(self, cap_id: str, data: Mapping[str, Any]) -> int:
        """Append a "grant" audit entry; returns its sequence number."""

    @abc.abstractmethod
    def revoke(self, cap_id: str, *, record: str, data: Mapping[str, Any]) -> bool:
        """Mark ``cap_id`` revoked (keeping the signed ``record``) and audit it.

        Idempotent: returns False (and audits nothing) if it was already revoked.
        """

    @abc.abstractmethod
    def revoked(self, cap_ids: Sequence[str]) -> str | None:
        """The first of ``cap_ids`` that is revoked, or None."""

    @abc.abstractmethod
    def audit_entries(self) -> Iterator[AuditEntry]:
        """Every audit entry, in sequence order, from the first."""

    @abc.abstractmethod
    def prune_nonces(self, now: float) -> int:
        """Forget nonces whose invocations have expired; returns how many."""

    def verify_audit(self) -> int:
        """Check every stored audit row, the hash chain from its start, and its end.

        Returns the number of entries.  Raises AuditError naming the first entry whose
        stored types, sequence, link or hash is wrong (see policies.ledger.audit).
        """
        from policies.ledger.audit import verify_rows

        with self.audit_snapshot() as (rows, head):
            return verify_rows(rows, head)

    @contextlib.contextmanager
    def audit_snapshot(self) -> Iterator[tuple[Iterator[AuditRow], tuple[int, str] | None]]:
        """Every stored audit row in seq order, and the head recorded with the last
        append (None if the store records none), read from one consistent state.

        This default rebuilds rows from ``audit_entries`` and records no head; the
        backends read their rows as stored.
        """
        from policies.ledger.audit import AuditRow

        yield (
            (
                AuditRow(
                    e.seq, e.at, e.kind, e.cap_id, canonical_text(dict(e.data)), e.prev, e.hash
                )
                for e in self.audit_entries()
            ),
            None,
        )

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
