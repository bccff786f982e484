"""Checking the audit log as stored: every row, every stored type, the chain and its head.

The log is read from a database file or server that anyone with access can edit, so
each row is outside input: a value may be stored with another type than the schema
says (SQLite keeps what it is given), numbered out of sequence, nested without limit
or not UTF-8.  Verification therefore works on the stored text itself: each entry's
hash is recomputed over the exact text stored (the writer stored the canonical text
the hash was made over), so no row is ever parsed or re-serialised to be checked,
and any stored value that is not what was written fails its entry's hash.  The rows
are read in ``seq`` order from the lowest stored number, so a row numbered 0 or below
is seen (and refused) rather than skipped, and the log's last entry is compared with
the head each append records, so entries removed from (or added at) the end are seen.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from janus_hsm import strictjson
from policies.errors import AuditError
from policies.ledger._common import AUDIT_KINDS, audit_prefix, entry_hash
from policies.ledger.base import GENESIS, AuditEntry

# Audit data is a flat object of strings and numbers when Janus writes it; a stored
# text nested deeper than this is not one, and is not parsed (a recursive parser
# would exhaust the stack on it).
MAX_DATA_DEPTH = 32

# The lowest value a 64-bit seq column can hold: the first page starts here, so that a
# row numbered 0 or below is read like any other.
MIN_SEQ = -(2**63)
MAX_SEQ = 2**63 - 1

_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
_HEAD = re.compile(r"(0|[1-9][0-9]{0,18}):([0-9a-f]{64})")


@dataclass(frozen=True)
class AuditRow:
    """One stored audit entry, each value of the type its column declares."""

    seq: int
    at: float
    kind: str
    cap_id: str
    data: str  # the stored canonical JSON text, unparsed
    prev: str
    hash: str

    def entry(self) -> AuditEntry:
        """The entry with its data parsed (a text that is no JSON object reads as
        ``{"_unreadable": text}``, and still fails verification if it was altered)."""
        return AuditEntry(
            seq=self.seq,
            at=self.at,
            kind=self.kind,
            cap_id=self.cap_id,
            data=parse_data(self.data),
            prev=self.prev,
            hash=self.hash,
        )


def nesting_depth(text: str) -> int:
    """How deeply JSON ``text`` nests arrays and objects, counted without parsing it."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_data(text: str) -> dict[str, Any]:
    """Stored audit data as an object, or ``{"_unreadable": text}`` if it is not one."""
    if nesting_depth(text) <= MAX_DATA_DEPTH:
        try:
            value = strictjson.loads(text, "audit data", allow_floats=True)
        except ValueError:
            pass
        else:
            if isinstance(value, dict):
                return value
    return {"_unreadable": text}


def stored_row(seq: object, values: tuple[object, ...]) -> AuditRow:
    """An AuditRow from the values a database returned, or AuditError naming the entry
    and the column whose stored value has the wrong type."""
    entry = seq if type(seq) is int else None
    if entry is None:
        raise AuditError(f"an audit entry's seq is stored as {_kind(seq)}, not an integer")
    if len(values) != 6:
        raise AuditError(f"audit entry {entry} has {len(values)} columns, not 7", entry=entry)
    at, kind, cap_id, data, prev, digest = values
    if type(at) is not float:
        raise AuditError(
            f"audit entry {entry}: at is stored as {_kind(at)}, not a real number", entry=entry
        )
    texts = {"kind": kind, "cap_id": cap_id, "data": data, "prev": prev, "hash": digest}
    for column, value in texts.items():
        if type(value) is not str:
            raise AuditError(
                f"audit entry {entry}: {column} is stored as {_kind(value)}, not text",
                entry=entry,
            )
    return AuditRow(entry, at, str(kind), str(cap_id), str(data), str(prev), str(digest))


def _kind(value: object) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes | bytearray | memoryview):
        return "a blob"
    return {int: "an integer", float: "a real number", str: "text"}.get(type(value), "a value")


def parse_head(value: object) -> tuple[int, str]:
    """The recorded head ``"<seq>:<hash>"`` (SQLite keeps it as text), or AuditError."""
    match = _HEAD.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise AuditError("the audit log's recorded head is malformed")
    return int(match.group(1)), match.group(2)


def verify_rows(rows: Iterable[AuditRow], head: tuple[int, str] | None) -> int:
    """Check ``rows`` (every stored row, in seq order) and the recorded ``head``.

    Returns the number of entries.  Raises AuditError naming the first entry whose
    number, link, kind, time or hash is wrong, or the end the head disagrees with.
    ``head`` is None only for a ledger written before heads were recorded: its chain
    is checked, its end cannot be.
    """
    prev, count = GENESIS, 0
    for expected, row in enumerate(rows, start=1):
        if row.seq != expected:
            if row.seq < expected:
                raise AuditError(
                    f"audit entry {row.seq} is out of sequence (entries are numbered from 1,"
                    f" this one stands where entry {expected} should)",
                    entry=row.seq,
                )
            raise AuditError(
                f"audit entry {expected} is missing (found {row.seq} instead)", entry=expected
            )
        if row.prev != prev:
            raise AuditError(
                f"audit entry {row.seq} does not link to entry {row.seq - 1}", entry=row.seq
            )
        if row.kind not in AUDIT_KINDS or not math.isfinite(row.at):
            raise AuditError(f"audit entry {row.seq} was altered (bad kind or time)", entry=row.seq)
        if not _HEX_DIGEST.fullmatch(row.hash) or row.hash != entry_hash(
            audit_prefix(row.at, row.kind, row.cap_id, row.data), row.prev, row.seq
        ):
            raise AuditError(f"audit entry {row.seq} was altered (hash mismatch)", entry=row.seq)
        prev, count = row.hash, row.seq
    if head is not None and head != (count, prev):
        if head[0] > count:
            raise AuditError(
                f"the audit log ends at entry {count} but its head records entry {head[0]}:"
                f" entry {count + 1} onwards was removed",
                entry=count + 1,
            )
        if head[0] < count:
            raise AuditError(
                f"audit entry {head[0] + 1} is after the recorded head (entry {head[0]}):"
                " it was added outside the ledger",
                entry=head[0] + 1,
            )
        raise AuditError(
            f"audit entry {count} is not the one the head records (replaced)",
            entry=count or None,
        )
    return count
