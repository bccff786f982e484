"""Hardware attestation of a chain's root key, carried in the root capability's evidence.

The root capability may carry ``evd.attestation = {"format": "yubikey-piv", "x5c": [...]}``:
the YubiKey's attestation chain for the root key (slot certificate, then the device's f9
certificate; standard base64 DER as in JOSE's x5c).  A verifier that requires it
(``Verifier(require_attestation=True, attestation_roots=...)``) checks that the chain
verifies to a trusted root and that the attested key *is* the root issuer's did:key, so
it knows the principal's root key was generated inside a YubiKey.  The evidence sits
inside the signed claims, so it cannot be swapped without breaking the root signature;
and it proves nothing on its own anyway unless the attested key equals the issuer's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

from cryptography import x509

from janus_hsm import attestation as hsm_attestation
from janus_hsm.errors import AttestationError
from janus_hsm.provider import Attestation
from janus_hsm.public_keys import PublicKeyFormatError, from_did_key
from policies.capability import Capability
from policies.errors import AttestationRequiredError

#: The evidence member the attestation travels in.
EVIDENCE_KEY: Final = "attestation"


def attestation_evidence(evidence: Attestation) -> dict[str, Any]:
    """The ``evd`` member for a root capability, from ``KeyHandle.attest()``."""
    if evidence.format != hsm_attestation.FORMAT:
        raise AttestationError(f"cannot carry {evidence.format!r} attestations yet")
    return {
        EVIDENCE_KEY: {
            "format": evidence.format,
            "x5c": hsm_attestation.to_x5c(evidence.certificates),
        }
    }


def check_root_attestation(
    root: Capability, roots: Sequence[x509.Certificate] | None = None
) -> hsm_attestation.PivAttestation:
    """Verify the root capability's attestation against ``roots`` (default: Yubico's)."""
    member = (root.evidence or {}).get(EVIDENCE_KEY)
    if not isinstance(member, dict):
        raise AttestationRequiredError(
            "the root capability carries no hardware attestation of its issuer key", link=0
        )
    if member.get("format") != hsm_attestation.FORMAT:
        raise AttestationRequiredError(
            f"unsupported attestation format {member.get('format')!r}", link=0
        )
    try:
        issuer_key = from_did_key(root.issuer)
        chain = hsm_attestation.from_x5c(member.get("x5c"))
        return hsm_attestation.verify_piv_attestation(
            chain, roots=roots, expected_public_key=issuer_key
        )
    except (AttestationError, PublicKeyFormatError) as exc:
        raise AttestationRequiredError(
            f"the root key's attestation does not hold: {exc}", link=0
        ) from None
