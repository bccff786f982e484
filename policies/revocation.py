"""Revocation records: signed by any issuer at or above the revoked link.

A record is a compact JWS (typ ``janus-rev+jws``) with payload
``{iss, rev, iat, reason}``: ``rev`` is the revoked capability's id.  Revoking a link
revokes everything derived from it, because every verification checks every link's id.
Whoever issued the revoked capability, or any capability above it in the chain, may
revoke it: authority over a subtree belongs to everyone who granted it.
"""

from __future__ import annotations

from dataclasses import dataclass

from janus_hsm.provider import KeyHandle
from policies.capability import Bundle
from policies.errors import FormatError, VerificationError
from policies.jws import ParsedJws, parse_compact, public_key_for, sign_compact, verify_signature

REVOCATION_TYP = "janus-rev+jws"


@dataclass(frozen=True)
class Revocation:
    jws: ParsedJws
    issuer: str
    revoked_id: str
    issued_at: int
    reason: str

    @property
    def compact(self) -> str:
        return self.jws.compact

    @classmethod
    def parse(cls, compact: str) -> Revocation:
        jws = parse_compact(compact.strip(), typ=REVOCATION_TYP, what="revocation")
        claims = jws.payload
        if set(claims) != {"iss", "rev", "iat", "reason"}:
            raise FormatError("revocation claims must be exactly iss, rev, iat, reason")
        if not all(isinstance(claims[k], str) for k in ("iss", "rev", "reason")):
            raise FormatError("revocation iss, rev and reason must be strings")
        if len(claims["reason"]) > 256:
            raise FormatError("revocation reason is longer than 256 characters")
        iat = claims["iat"]
        if not isinstance(iat, int) or isinstance(iat, bool) or iat < 0:
            raise FormatError("revocation iat must be integer epoch seconds")
        return cls(jws, claims["iss"], claims["rev"], iat, claims["reason"])

    def verify(self, bundle: Bundle) -> int:
        """Check the signature and the signer's authority; return the revoked link index."""
        ids = [c.id for c in bundle.chain]
        if self.revoked_id not in ids:
            raise VerificationError("the revoked capability is not in this bundle")
        index = ids.index(self.revoked_id)
        allowed = {c.issuer for c in bundle.chain[: index + 1]}
        if self.issuer not in allowed:
            raise VerificationError(
                f"{self.issuer} did not issue link {index} or any capability above it, "
                "so it cannot revoke it",
                link=index,
            )
        verify_signature(self.jws, public_key_for(self.issuer, "revocation iss"), what="revocation")
        return index


def sign_revocation(issuer: KeyHandle, *, revoked_id: str, now: int, reason: str = "") -> str:
    payload = {"iss": issuer.did, "rev": revoked_id, "iat": now, "reason": reason[:256]}
    return sign_compact(issuer, {"typ": REVOCATION_TYP}, payload)
