"""What both ledger backends share: argument checks, the spend decision, audit entries.

The decision (may this use happen, and what does each link's row become?) is a pure
function of the rows the backend read inside its transaction, so that SQLite and
PostgreSQL cannot drift apart in what they allow: only the locking differs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Re-exported: DSN redaction lives with the parsing of database URLs.
from janus_hsm.database_url import redact_dsn as redact_dsn
from janus_hsm.strictjson import canonical_text
from policies.errors import FormatError, LedgerError, LimitExceededError, RateLimitedError
from policies.ledger.base import LinkLimit

# Audit entries are read back in pages, so a long log is never held in memory and
# no lock is held while the caller looks at an entry.
AUDIT_PAGE = 500

# Counts are stored as 64-bit integers in both databases.
MAX_COUNT = 2**62

# "decision", "policy" and "head" are written by services that keep their own records
# in a ledger file (the HSM service: every decision, policy change and signed head).
AUDIT_KINDS = frozenset({"grant", "use", "revoke", "decision", "policy", "head"})


@dataclass(frozen=True)
class LinkRow:
    """One link's stored counters, as read inside the spend's transaction."""

    uses: int = 0
    rate_window: int | None = None  # the fixed window the rate count belongs to
    rate_count: int = 0


@dataclass(frozen=True)
class LinkUpdate:
    """What one link's row becomes if the spend goes ahead."""

    cap_id: str
    uses: int
    rate_window: int | None
    rate_count: int


# Capability ids are base64url SHA-256 digests and nonces base64url random bits; a
# ledger key need not be either, but it must be text both databases store and compare
# exactly as given.  A NUL ends a string in parts of SQLite (its JSON functions, which
# read a group of spends), and a lone surrogate cannot be encoded at all: either would
# fail (or, for NUL, miss) a lookup inside a batch of other callers' spends.
MAX_KEY_CHARS = 1024

# Timestamps up to 2**53 (float-exact integers) keep every rate window in int64.
MAX_TIMESTAMP = 2.0**53


def check_key(value: object, what: str) -> str:
    """A nonce or capability id: non-empty printable text (no control characters or
    lone surrogates), at most MAX_KEY_CHARS long."""
    if not isinstance(value, str) or not value:
        raise FormatError(f"{what} must be a non-empty string")
    if len(value) > MAX_KEY_CHARS:
        raise FormatError(f"{what} is longer than {MAX_KEY_CHARS} characters")
    if not value.isprintable():
        raise FormatError(f"{what} has control characters or lone surrogates: {value[:64]!a}")
    return value


def check_spend_args(limits: Sequence[LinkLimit], nonce: str, now: float) -> None:
    """Refuse arguments that would make the accounting meaningless, before any I/O."""
    if not limits:
        raise FormatError("a spend needs at least one link (the root)")
    check_key(nonce, "a spend's nonce")
    if not (math.isfinite(now) and 0 <= now <= MAX_TIMESTAMP):
        raise FormatError(f"now must be a timestamp in 0..2**53, not {now!r}")
    seen: set[str] = set()
    for i, link in enumerate(limits):
        check_key(link.cap_id, f"link {i}'s cap_id")
        if link.cap_id in seen:
            # A valid chain cannot contain a link twice (proofs are hashes); counting
            # a duplicate once or twice would both be wrong, so refuse.
            raise FormatError(f"link {i}: cap_id {link.cap_id} appears twice in the chain")
        seen.add(link.cap_id)
        if link.uses is not None and not 0 <= link.uses <= MAX_COUNT:
            raise FormatError(f"link {i}: a use limit must be in 0..2**62, not {link.uses}")
        if link.rate is not None and not (
            0 <= link.rate.count <= MAX_COUNT and 0 < link.rate.per_seconds <= MAX_COUNT
        ):
            raise FormatError(
                f"link {i}: a rate needs 0 <= count and 0 < per_seconds (both <= 2**62),"
                f" got {link.rate}"
            )


def rate_window(now: float, per_seconds: int) -> int:
    """The fixed window ``now`` falls in: floor(now / per_seconds)."""
    return math.floor(now / per_seconds)


def decide_spend(
    limits: Sequence[LinkLimit], rows: Mapping[str, LinkRow], now: float
) -> list[LinkUpdate]:
    """Check every link's use limit, then every link's rate; return the new rows.

    Raises LimitExceededError / RateLimitedError naming the first offending link
    (index in ``limits``, root first).  Every link is counted, limited or not, so that
    ``uses()`` answers for any link and a limit added by a later redelegation binds.

    Rate windows are fixed: ``floor(now / per_seconds)``.  If the stored window is
    *later* than ``now``'s (another host's clock is ahead), the use counts in the
    stored window: with several hosts, resetting to the earlier window would let two
    skewed clocks take turns emptying the window and exceed the rate.
    """
    current = [rows.get(link.cap_id, LinkRow()) for link in limits]
    for i, (link, row) in enumerate(zip(limits, current, strict=True)):
        if link.uses is not None and row.uses >= link.uses:
            raise LimitExceededError(
                f"link {i} ({link.cap_id}) has used all of its {link.uses} uses", link=i
            )
    updates: list[LinkUpdate] = []
    for i, (link, row) in enumerate(zip(limits, current, strict=True)):
        window, count = row.rate_window, row.rate_count
        if link.rate is not None:
            now_window = rate_window(now, link.rate.per_seconds)
            if window is None or window < now_window:
                window, count = now_window, 0
            if count >= link.rate.count:
                raise RateLimitedError(
                    f"link {i} ({link.cap_id}) allows {link.rate.count} uses per "
                    f"{link.rate.per_seconds} s and this window is full",
                    link=i,
                )
            count += 1
        updates.append(LinkUpdate(link.cap_id, row.uses + 1, window, count))
    return updates


def normalise_data(data: Mapping[str, Any] | None) -> str:
    """Audit data as canonical JSON text: what is stored, and what the hash covers.

    Canonical means the text ``json.dumps(sort_keys=True, separators=(",", ":"),
    ensure_ascii=False)`` gives for the data *as it reads back*, so it is serialised
    twice: tuples become lists and non-string keys become strings on the first pass,
    and the second sorts those keys as strings.  NaN and infinities are refused: they
    are not JSON, and another verifier could not reproduce the hash.
    """
    if data is not None and all(
        type(k) is str and type(v) is str  # exactly str: a subclass may dump differently
        for k, v in data.items()
    ):
        # Flat string data (every spend's audit) reads back as it is: one pass will do.
        return canonical_text(dict(data))
    try:
        first = json.dumps(dict(data or {}), separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise FormatError(f"audit data must be plain JSON: {exc}") from exc
    return canonical_text(json.loads(first))


def entry_hash(prefix: str, prev: str, seq: int) -> str:
    """SHA-256 (hex) of the canonical body whose text starts with ``prefix``.

    Equal to ``audit_hash`` of the same body (tested); this form needs no re-parsing
    of the data, and is what PostgreSQL computes in ``janus_append``.
    """
    body = f'{prefix}"{prev}","seq":{int(seq)}}}'
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def audit_prefix(at: float, kind: str, cap_id: str, data_text: str) -> str:
    """The canonical JSON of an entry's body up to the value of ``prev``.

    The body's keys sort as at, cap_id, data, kind, prev, seq, so its canonical form
    is this prefix, then ``"<prev>","seq":<seq>}``.  PostgreSQL appends the part it
    alone knows (the head it locked) and hashes, which lets the whole spend run as one
    statement; ``audit_hash`` of the same body gives the same digest (tested).
    """
    if kind not in AUDIT_KINDS:
        raise FormatError(f"unknown audit entry kind {kind!r}")
    if not math.isfinite(at):
        raise FormatError(f"an audit timestamp must be finite, not {at!r}")
    return (
        # repr: what json.dumps writes for a finite float, without building an encoder.
        f'{{"at":{float(at)!r},"cap_id":{canonical_text(cap_id)},'
        f'"data":{data_text},"kind":{canonical_text(kind)},"prev":'
    )


_VERSION = re.compile(r"[1-9][0-9]{0,8}")


def schema_version(value: object, where: str, known: int) -> int:
    """The stored ``schema_version``, checked: LedgerError for anything but a version
    this Janus knows (a newer one asks for an upgrade; anything else is damage)."""
    text = value if isinstance(value, str) else None
    if text is None or not _VERSION.fullmatch(text):
        raise LedgerError(f"{where}: the ledger's schema_version is damaged (not a version)")
    version = int(text)
    if version > known:
        raise LedgerError(
            f"{where} has ledger schema {version}; this Janus knows only {known}: upgrade Janus"
        )
    if version != known:
        raise LedgerError(f"{where}: unknown ledger schema {version} (expected {known})")
    return version
