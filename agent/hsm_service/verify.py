"""Checking the HSM service's audit log offline: approvals again, and the signed heads.

The hash chain itself is checked by the ledger (policies.ledger.audit.verify_rows);
this goes through the same entries once more and checks what only the service's
entries carry:

- every allowed decision on a key whose policy (as recorded in the log: the start
  entry, then each policy change) asks for a quorum carries approvals, and they are
  re-verified as WebAuthn assertions over the recorded claims, with the approver
  registry the service recorded when it started; the claims must be those of the
  decision (operation, key, payload digest, requester, nonce) and not expired when
  it was made;
- every approved policy change likewise, against the ``[policy-changes]`` quorum;
- every signed head is a JWS by the audit-head key over the entry right before it
  (its ``seq`` and ``hash``), and all heads are by one key (the one given, if any).

Whoever can write the log file can recompute the chain's hashes after an edit, but
cannot sign a head: an edited entry before a signed head is found by the head's
signature, an entry forged with approvals by the approvals themselves.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from janus_hsm.strictjson import canonical_json
from policies.approvals import (
    APPROVERS_TYP,
    Approval,
    ApproverSet,
    verify_approvals,
)
from policies.errors import AuditError, FormatError, PolicyError
from policies.jws import parse_compact, public_key_for, verify_signature
from policies.ledger.base import AuditEntry

#: The JWS ``typ`` of a signed audit head.
HEAD_TYP = "janus-hsm-head+jws"
_SERVICE_EVENTS = frozenset({"start", "decision", "result", "change", "state", "override", "head"})


@dataclass
class ServiceAuditReport:
    """What the service-specific checks found (all of it valid, or AuditError)."""

    service_entries: int = 0
    decisions: int = 0
    refusals: int = 0
    approvals_verified: int = 0  # requests and changes whose quorum was re-verified
    heads: int = 0
    last_signed_seq: int = 0
    head_key: str | None = None
    last_seq: int = 0
    services: list[str] = field(default_factory=list)

    @property
    def unsigned_tail(self) -> int:
        """Entries after the last signed head (not yet covered by a signature)."""
        return max(0, self.last_seq - self.last_signed_seq)

    def to_json(self) -> dict[str, Any]:
        return {
            "service_entries": self.service_entries,
            "decisions": self.decisions,
            "refusals": self.refusals,
            "approvals_verified": self.approvals_verified,
            "signed_heads": self.heads,
            "last_signed_entry": self.last_signed_seq,
            "unsigned_tail": self.unsigned_tail,
            "head_key": self.head_key,
        }


class _Checker:
    def __init__(self, head_key: str | None) -> None:
        self.report = ServiceAuditReport(head_key=head_key)
        self.expected_key = head_key
        self.approvers: ApproverSet | None = None
        self.rp_id = ""
        self.origin = ""
        self.keys: dict[str, Mapping[str, Any]] = {}
        self.policy_quorum: Mapping[str, Any] | None = None
        self.service: str | None = None

    def fail(self, entry: AuditEntry, message: str) -> AuditError:
        return AuditError(f"audit entry {entry.seq}: {message}", entry=entry.seq)

    def check(self, entry: AuditEntry) -> None:
        self.report.last_seq = entry.seq
        event = entry.data.get("event")
        if entry.kind not in ("decision", "policy", "head") or event not in _SERVICE_EVENTS:
            return
        self.report.service_entries += 1
        data = entry.data
        if event == "start":
            self.start(entry, data)
        elif event == "decision":
            self.decision(entry, data)
        elif event == "change":
            self.change(entry, data)
        elif event == "head":
            self.head(entry, data)

    def start(self, entry: AuditEntry, data: Mapping[str, Any]) -> None:
        try:
            registry = json.dumps({"typ": APPROVERS_TYP, "approvers": data.get("approvers")})
            self.approvers = ApproverSet.loads(registry, source="the recorded approvers")
        except FormatError as exc:
            raise self.fail(entry, f"the recorded approver registry is unreadable: {exc}") from None
        self.rp_id = str(data.get("approval_rp_id", ""))
        self.origin = str(data.get("approval_origin", ""))
        keys = data.get("keys")
        if not isinstance(keys, dict):
            raise self.fail(entry, "a start entry without the key policies")
        self.keys = dict(keys)
        quorum = data.get("policy_quorum")
        self.policy_quorum = quorum if isinstance(quorum, dict) else None
        service = data.get("service")
        self.service = service if isinstance(service, str) else None
        if self.service is not None and self.service not in self.report.services:
            self.report.services.append(self.service)

    def decision(self, entry: AuditEntry, data: Mapping[str, Any]) -> None:
        self.report.decisions += 1
        if data.get("outcome") != "allowed":
            self.report.refusals += 1
            return
        policy = self.keys.get(str(data.get("key")))
        quorum = policy.get("quorum") if isinstance(policy, Mapping) else None
        operation = data.get("operation")
        needed = isinstance(quorum, Mapping) and (
            not quorum.get("operations") or operation in quorum.get("operations", ())
        )
        if not needed:
            return
        assert isinstance(quorum, Mapping)
        claims = data.get("claims")
        if not isinstance(claims, dict):
            raise self.fail(entry, f"an allowed {operation} on a quorum key without approvals")
        expected = {
            "operation": operation,
            "key": data.get("key"),
            "payload_sha256": data.get("payload_sha256"),
            "requester": data.get("client"),
            "nonce": data.get("nonce", ""),
        }
        if "mechanism" in data:
            expected["mechanism"] = data["mechanism"]
        self.approvals(entry, data, claims, expected, quorum)

    def change(self, entry: AuditEntry, data: Mapping[str, Any]) -> None:
        if data.get("outcome") != "allowed":
            return
        if self.policy_quorum is None:
            raise self.fail(entry, "a policy change applied with no policy-change quorum")
        claims = data.get("claims")
        change = data.get("change")
        if not isinstance(claims, dict) or not isinstance(change, dict):
            raise self.fail(entry, "a policy change without its claims")
        expected = {
            "operation": "policy-change",
            "payload_sha256": hashlib.sha256(canonical_json(change)).hexdigest(),
            "requester": data.get("requester"),
        }
        self.approvals(entry, data, claims, expected, self.policy_quorum)
        new = data.get("policy")
        if isinstance(new, dict) and isinstance(new.get("label"), str):
            self.keys[new["label"]] = new

    def approvals(
        self,
        entry: AuditEntry,
        data: Mapping[str, Any],
        claims: Mapping[str, Any],
        expected: Mapping[str, Any],
        quorum: Mapping[str, Any],
    ) -> None:
        if claims.get("aud") != self.service:
            raise self.fail(entry, "the approved claims are for another service")
        for name, value in expected.items():
            if claims.get(name) != value:
                raise self.fail(entry, f"the approved claims' {name} is not the request's")
        expires = claims.get("expires")
        if not isinstance(expires, int) or entry.at >= expires:
            raise self.fail(entry, "the approvals had expired when the request was allowed")
        if self.approvers is None:
            raise self.fail(entry, "approvals before any start entry (no approver registry)")
        names = quorum.get("approvers", [])
        m = quorum.get("m")
        if not isinstance(m, int) or m < 1 or not isinstance(names, list):
            raise self.fail(entry, "the recorded quorum is malformed")
        raw = data.get("approvals")
        if not isinstance(raw, list):
            raise self.fail(entry, "an approved request without its approvals")
        try:
            approvals = [Approval.from_json(a, what=f"approval #{i}") for i, a in enumerate(raw)]
            eligible = ApproverSet(tuple(a for a in self.approvers if a.id in names))
            verify_approvals(
                approvals, eligible, claims, required=m, origin=self.origin, rp_id=self.rp_id
            )
        except PolicyError as exc:
            raise self.fail(entry, f"the approvals do not verify: {exc}") from None
        self.report.approvals_verified += 1

    def head(self, entry: AuditEntry, data: Mapping[str, Any]) -> None:
        try:
            jws = data.get("jws")
            if not isinstance(jws, str):
                raise FormatError("no JWS recorded")
            parsed = parse_compact(jws, typ=HEAD_TYP, what="the signed head")
            key = data.get("key")
            verify_signature(parsed, public_key_for(key, "the head key"), what="the signed head")
        except PolicyError as exc:
            raise self.fail(entry, f"the signed head does not verify: {exc}") from None
        kid = str(parsed.header.get("kid", "")).split("#", 1)[0]
        statement = parsed.payload
        if kid != key:
            raise self.fail(entry, "the signed head names another key than the one recorded")
        if statement.get("seq") != entry.seq - 1 or statement.get("hash") != entry.prev:
            raise self.fail(
                entry, f"the signed head is not that of entry {entry.seq - 1} (the log was changed)"
            )
        for name in ("iss", "seq", "hash", "iat"):
            if data.get(name) != statement.get(name):
                raise self.fail(entry, f"the recorded head's {name} is not the signed one")
        if self.expected_key is None:
            self.expected_key = str(key)
        elif key != self.expected_key:
            raise self.fail(entry, f"a head signed by {key}, not by {self.expected_key}")
        self.report.heads += 1
        self.report.last_signed_seq = entry.seq - 1
        self.report.head_key = self.expected_key


def verify_service_entries(
    entries: Iterable[AuditEntry], *, head_key: str | None = None
) -> ServiceAuditReport:
    """Check the service entries among ``entries`` (every entry of a log whose chain
    was verified, in order); AuditError naming the first that fails.  ``head_key`` is
    the did:key the heads must be signed by: given, at least one head must exist."""
    checker = _Checker(head_key)
    for entry in entries:
        checker.check(entry)
    if head_key is not None and checker.report.heads == 0:
        raise AuditError(f"the log has no head signed by {head_key}")
    return checker.report


def has_service_entries(entries: Iterable[AuditEntry]) -> bool:
    return any(e.kind in ("decision", "policy", "head") for e in entries)
