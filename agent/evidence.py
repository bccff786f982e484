"""Evidence of a delegated action, and its offline verification.

What the cloud agent returns for a signature is everything a third party needs to
trace it back to the owner's hardware key with no network access: the payload, the
signing key's signature over it, the invocation that authorised this use, and the
capability chain from the hardware root to that key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from policies.capability import Bundle
from policies.errors import FormatError, VerificationError
from policies.invocation import Invocation
from policies.jws import ParsedJws, canonical_json, public_key_for, verify_signature
from policies.verify import Verifier

EVIDENCE_TYP = "janus-evidence/1"


@dataclass(frozen=True)
class VerifiedEvidence:
    principal: str
    signer: str
    holder: str
    action: str
    resource: str
    used_at: int
    payload: Mapping[str, Any]


def verify_evidence(
    evidence: Mapping[str, Any], *, root: str | None = None, verifier: Verifier | None = None
) -> VerifiedEvidence:
    """Check evidence as of the moment of use (the invocation's iat), offline."""
    if not isinstance(evidence, Mapping) or evidence.get("typ") != EVIDENCE_TYP:
        raise FormatError(f"not Janus evidence (typ must be {EVIDENCE_TYP!r})")
    try:
        payload = evidence["payload"]
        signer = evidence["signer"]
        alg = evidence["alg"]
        signature = evidence["signature"]
        invocation = Invocation.parse(evidence["invocation"])
        bundle = Bundle.parse(_bundle_text(evidence["bundle"]))
    except KeyError as exc:
        raise FormatError(f"evidence lacks {exc.args[0]!r}") from None
    if not isinstance(payload, dict) or not isinstance(signer, str):
        raise FormatError("evidence payload must be an object and signer a did:key")
    verifier = verifier or Verifier()
    authorization = verifier.verify(
        bundle, invocation, payload, now=invocation.issued_at, root=root
    )
    if signer not in {c.audience for c in authorization.chain.bundle.chain}:
        raise VerificationError("the signer holds no capability in this chain")
    from janus_hsm.public_keys import PublicKeyFormatError, b64url_decode

    try:
        raw_signature = b64url_decode(signature) if isinstance(signature, str) else b""
    except PublicKeyFormatError as exc:
        raise FormatError(f"evidence signature: {exc}") from None
    jws = ParsedJws(
        compact="",
        header={"alg": alg},
        payload={},
        signing_input=canonical_json(dict(payload)),
        signature=raw_signature,
    )
    verify_signature(jws, public_key_for(signer, "evidence signer"), what="evidence signature")
    return VerifiedEvidence(
        principal=authorization.chain.principal,
        signer=signer,
        holder=invocation.holder,
        action=invocation.action,
        resource=invocation.resource,
        used_at=invocation.issued_at,
        payload=payload,
    )


def _bundle_text(bundle: Any) -> str:
    """The bundle as the text Bundle.parse reads (evidence given as Python objects may
    hold what JSON cannot: refused as malformed, not raised as a crash)."""
    try:
        return json.dumps(bundle)
    except (TypeError, ValueError, RecursionError) as exc:
        raise FormatError(f"evidence bundle is not JSON data ({type(exc).__name__})") from None
