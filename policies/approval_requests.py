"""Approval requests and approval files: how M approvers approve on their own machines.

The flow (docs/fido2.md): the issuer prepares the grant and writes an **approval
request** (the exact claims the key will sign, the RP ID and origin, how many approvals
are needed and which credentials may give them); each approver runs ``janus fido2
approve --request FILE`` on their machine, which shows what is being approved and
writes an **approval file**; the issuer runs the grant again with the request and the
collected approval files.  Nothing in either file is trusted: the challenge is always
recomputed from the claims, and every approval is verified against the issuer's own
approver registry before the key signs.  Both parsers refuse anything unexpected with a
:class:`~policies.errors.FormatError`.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from janus_hsm.public_keys import b64url_encode
from policies.approvals import MAX_CREDENTIAL_ID, Approval, ApproverSet, _b64, approval_challenge
from policies.errors import FormatError
from policies.jws import canonical_json, strict_json

REQUEST_TYP: Final = "janus-approval-request/1"
APPROVAL_TYP: Final = "janus-approval/1"
MAX_FILE: Final = 64 * 1024
_REQUEST_KEYS = frozenset({"typ", "claims", "rp_id", "origin", "required", "rule", "approvers"})
_APPROVAL_FILE_KEYS = frozenset({"typ", "challenge", "approval"})


@dataclass(frozen=True)
class ApprovalRequest:
    """A prepared grant waiting for approvals.  ``approvers`` maps approver ids to their
    credential ids (public values: they only tell an authenticator which key to use)."""

    claims: dict[str, Any]
    rp_id: str
    origin: str
    required: int
    rule: str
    approvers: tuple[tuple[str, bytes], ...]

    @property
    def challenge(self) -> bytes:
        return approval_challenge(self.claims)

    @classmethod
    def create(
        cls,
        claims: Mapping[str, Any],
        *,
        rp_id: str,
        origin: str,
        required: int,
        rule: str,
        approvers: ApproverSet,
    ) -> ApprovalRequest:
        return cls(
            dict(claims),
            rp_id,
            origin,
            required,
            rule,
            tuple((a.id, a.credential_id) for a in approvers if a.rp_id == rp_id),
        )

    def to_bytes(self) -> bytes:
        doc = {
            "typ": REQUEST_TYP,
            "claims": self.claims,
            "rp_id": self.rp_id,
            "origin": self.origin,
            "required": self.required,
            "rule": self.rule,
            "approvers": [{"id": i, "credential_id": b64url_encode(c)} for i, c in self.approvers],
        }
        return canonical_json(doc) + b"\n"

    @classmethod
    def loads(cls, data: bytes, source: str = "approval request") -> ApprovalRequest:
        if len(data) > MAX_FILE:
            raise FormatError(f"{source} is too large to be an approval request")
        obj = strict_json(data, source)
        if set(obj) != _REQUEST_KEYS or obj["typ"] != REQUEST_TYP:
            raise FormatError(
                f"{source}: not an approval request ({REQUEST_TYP} with exactly "
                f"{', '.join(sorted(_REQUEST_KEYS))})"
            )
        claims = obj["claims"]
        if not isinstance(claims, dict) or "evd" in claims:
            raise FormatError(f"{source}: claims must be an object without evd")
        for key in ("iss", "aud", "jti"):
            if not isinstance(claims.get(key), str):
                raise FormatError(f"{source}: claims.{key} must be a string")
        for key in ("rp_id", "origin", "rule"):
            if not isinstance(obj[key], str) or not obj[key] or len(obj[key]) > 253:
                raise FormatError(f"{source}: {key} must be a non-empty string")
        required = obj["required"]
        if type(required) is not int or not 1 <= required <= 100:
            raise FormatError(f"{source}: required must be an integer from 1 to 100")
        entries = obj["approvers"]
        if not isinstance(entries, list) or len(entries) > 100:
            raise FormatError(f"{source}: approvers must be an array of at most 100")
        approvers = []
        for n, entry in enumerate(entries):
            if not isinstance(entry, dict) or set(entry) != {"id", "credential_id"}:
                raise FormatError(f"{source}: approver #{n} must have exactly id, credential_id")
            if not isinstance(entry["id"], str) or not entry["id"]:
                raise FormatError(f"{source}: approver #{n}: id must be a non-empty string")
            cred = _b64(entry["credential_id"], f"{source}: approver #{n}: credential_id")
            if not 1 <= len(cred) <= MAX_CREDENTIAL_ID:
                raise FormatError(f"{source}: approver #{n}: credential_id has a bad length")
            approvers.append((entry["id"], cred))
        return cls(claims, obj["rp_id"], obj["origin"], required, obj["rule"], tuple(approvers))

    def same_claims(self, claims: Mapping[str, Any]) -> bool:
        """Do ``claims`` (rebuilt from the grant's arguments) equal the prepared ones?"""
        return hmac.compare_digest(approval_challenge(claims), self.challenge)


def approval_file(approval: Approval, challenge: bytes) -> bytes:
    """The file ``janus fido2 approve`` writes: one approval and the challenge it is for."""
    doc = {
        "typ": APPROVAL_TYP,
        "challenge": b64url_encode(challenge),
        "approval": approval.to_json(),
    }
    return canonical_json(doc) + b"\n"


def load_approval_file(data: bytes, source: str, *, challenge: bytes) -> Approval:
    """The approval in an approval file, refused unless it is for ``challenge``.

    The challenge check is only for a clear message ("this approval is for another
    grant"); the approval's signature is verified later against the claims either way.
    """
    if len(data) > MAX_FILE:
        raise FormatError(f"{source} is too large to be an approval file")
    obj = strict_json(data, source)
    if set(obj) != _APPROVAL_FILE_KEYS or obj["typ"] != APPROVAL_TYP:
        raise FormatError(f"{source}: not an approval file ({APPROVAL_TYP})")
    stated = _b64(obj["challenge"], f"{source}: challenge")
    if not hmac.compare_digest(stated, challenge):
        raise FormatError(f"{source}: this approval is for another grant request")
    return Approval.from_json(obj["approval"], what=f"{source}: approval")


def approvals_from_files(files: Sequence[tuple[str, bytes]], *, challenge: bytes) -> list[Approval]:
    return [load_approval_file(data, name, challenge=challenge) for name, data in files]


__all__ = [
    "APPROVAL_TYP",
    "REQUEST_TYP",
    "ApprovalRequest",
    "approval_file",
    "approvals_from_files",
    "load_approval_file",
]
