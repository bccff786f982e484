"""Granting capabilities: policy first, attenuation checked, then the key signs.

The order matters: nothing reaches the (possibly hardware, possibly touch-gated) key
until the request is known to be inside the issuance policy and, for a redelegation,
no wider than the parent.  A refused grant signs nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_encode
from policies.abilities import Ability
from policies.approval_log import UsedApprovals
from policies.approvals import (
    EVIDENCE_KEY,
    Approval,
    ApproverSet,
    approval_challenge,
    approvals_evidence,
    verify_approvals,
)
from policies.capability import (
    CAPABILITY_TYP,
    Bundle,
    Capability,
    Limits,
    capability_claims,
    check_home,
)
from policies.caveats import parse_caveats
from policies.errors import FormatError, LinkageError, PolicyViolationError
from policies.jws import public_key_for, sign_compact
from policies.ledger.base import Rate
from policies.policy import APPROVAL, GrantRequest, IssuancePolicy, PolicyDecision
from policies.verify import Verifier, _check_attenuation

# Backends whose keys can only be used after a PIN/passphrase unlock.  An HSM service's
# key ("hsm-service") sits on a token the service unlocks with its PIN, and is reached
# only by a client authenticated with its own key.
_PIN_GATED_BACKENDS = frozenset({"pkcs11", "piv", "software", "hsm-service"})


def grant(
    issuer: KeyHandle,
    *,
    audience: str,
    abilities: Sequence[Ability],
    ttl_seconds: int,
    uses: int | None,
    depth: int = 0,
    rate: Rate | None = None,
    proof: Bundle | None = None,
    policy: IssuancePolicy | None = None,
    home: str | None = None,
    fresh: bool = False,
    satisfied: Collection[str] = (),
    holder_attested: bool = False,
    evidence: dict[str, Any] | None = None,
    now: int | None = None,
    jti: str | None = None,
    approvals: Sequence[Approval] = (),
    approvers: ApproverSet | None = None,
    approval_origin: str | None = None,
    approval_rp_id: str | None = None,
    approval_require_uv: bool = False,
    used_approvals: UsedApprovals | None = None,
) -> Bundle:
    """Issue a capability to ``audience``; with ``proof``, redelegate from that bundle.

    ``home`` names the cloud-agent instance whose ledger counts the uses
    (``lim.home``); a redelegation keeps its parent's home whether or not it is given.
    ``fresh`` (``lim.fresh``) asks instances to refuse uses while their revocation state
    may be stale; a redelegation of a fresh capability is fresh too.

    ``satisfied`` names the policy requirements the caller has already fulfilled
    (e.g. "touch", "approval"); "pin" is fulfilled by the issuer key's own unlock.
    Naming "approval" there is the caller's own assertion that it collected and
    verified the approvals; nothing is checked or recorded.

    ``approvals`` are FIDO2 assertions over the claims this call signs (get those
    claims first with :func:`prepare_grant`, and pass its ``jti`` and ``now`` here).
    They are verified against ``approvers`` for ``approval_origin`` / ``approval_rp_id``
    (UV too with ``approval_require_uv``) before the key signs, at least
    ``decision.approvals`` distinct approvers must be valid, and they are put in the
    capability's evidence as ``evd.approvals`` for later verifiers
    (:func:`policies.approvals.verify_capability_approvals`).  With ``used_approvals``
    the approvals' challenge is recorded there before the key signs, and approvals
    already recorded are refused (:mod:`policies.approval_log`).
    """
    draft = _prepare(
        issuer,
        audience=audience,
        abilities=abilities,
        ttl_seconds=ttl_seconds,
        uses=uses,
        depth=depth,
        rate=rate,
        proof=proof,
        policy=policy,
        home=home,
        fresh=fresh,
        holder_attested=holder_attested,
        now=now,
        jti=jti,
        satisfied=set(satisfied) | ({APPROVAL} if approvals else set()),
    )
    claims = draft.claims
    if approvals:
        if approvers is None or approval_origin is None or approval_rp_id is None:
            raise FormatError(
                "verifying approvals needs approvers, approval_origin and approval_rp_id"
            )
        if evidence and EVIDENCE_KEY in evidence:
            raise FormatError(f"evidence already has an {EVIDENCE_KEY!r} member")
        # Verified against the unsigned claims: a refusal here signs nothing.
        verify_approvals(
            approvals,
            approvers,
            claims,
            required=max(draft.decision.approvals, 1),
            require_uv=approval_require_uv,
            origin=approval_origin,
            rp_id=approval_rp_id,
        )
        if used_approvals is not None:  # durably, before the key signs (approval_log.py)
            used_approvals.claim(approval_challenge(claims))
        evidence = {**(evidence or {}), EVIDENCE_KEY: approvals_evidence(approvals)}
    if evidence:
        claims = {**claims, "evd": evidence}
    compact = sign_compact(issuer, {"typ": CAPABILITY_TYP}, claims)
    chain = (proof.chain if proof is not None else ()) + (
        Capability.parse(compact, index=len(proof.chain) if proof else 0),
    )
    bundle = Bundle(chain)
    Verifier().verify_chain(bundle, now=draft.now)  # a grant that would not verify is a bug
    return bundle


@dataclass(frozen=True)
class GrantDraft:
    """The claims :func:`grant` would sign (without evidence), and the policy decision.

    ``challenge`` is what approvers sign (:func:`policies.approvals.approval_challenge`).
    """

    claims: dict[str, Any]
    decision: PolicyDecision
    now: int

    @property
    def jti(self) -> str:
        jti: str = self.claims["jti"]
        return jti

    @property
    def challenge(self) -> bytes:
        return approval_challenge(self.claims)


def prepare_grant(
    issuer: KeyHandle,
    *,
    audience: str,
    abilities: Sequence[Ability],
    ttl_seconds: int,
    uses: int | None,
    depth: int = 0,
    rate: Rate | None = None,
    proof: Bundle | None = None,
    policy: IssuancePolicy | None = None,
    home: str | None = None,
    fresh: bool = False,
    holder_attested: bool = False,
    now: int | None = None,
    jti: str | None = None,
) -> GrantDraft:
    """Check a grant request against the policy (and its parent) and build its claims,
    without signing: the approvers sign :attr:`GrantDraft.challenge`, then :func:`grant`
    with the same arguments, ``now=draft.now`` and ``jti=draft.jti`` signs the same
    claims.  Requirements are not checked here (they are collected after this)."""
    return _prepare(
        issuer,
        audience=audience,
        abilities=abilities,
        ttl_seconds=ttl_seconds,
        uses=uses,
        depth=depth,
        rate=rate,
        proof=proof,
        policy=policy,
        home=home,
        fresh=fresh,
        holder_attested=holder_attested,
        now=now,
        jti=jti,
        satisfied=None,
    )


def _prepare(
    issuer: KeyHandle,
    *,
    audience: str,
    abilities: Sequence[Ability],
    ttl_seconds: int,
    uses: int | None,
    depth: int,
    rate: Rate | None,
    proof: Bundle | None,
    policy: IssuancePolicy | None,
    home: str | None,
    fresh: bool,
    holder_attested: bool,
    now: int | None,
    jti: str | None,
    satisfied: Collection[str] | None,
) -> GrantDraft:
    """prepare_grant, and with ``satisfied`` the requirements check of grant."""
    now = int(time.time()) if now is None else now
    public_key_for(audience, "audience")
    if not abilities:
        raise FormatError("a grant needs at least one ability")
    for ability in abilities:
        parse_caveats(ability.caveats)  # invalid caveats are refused at issuance
    if ttl_seconds <= 0:
        raise FormatError("ttl must be positive")
    if uses is not None and uses <= 0:
        raise FormatError("uses must be positive")
    if not 0 <= depth <= 9:
        raise FormatError("depth must be between 0 and 9")
    if home is not None:
        check_home(home)

    decision = (policy or IssuancePolicy.permissive()).check(
        GrantRequest(
            audience=audience,
            abilities=tuple(abilities),
            ttl_seconds=ttl_seconds,
            uses=uses,
            depth=depth,
            holder_attested=holder_attested,
        )
    )
    if satisfied is not None:
        _check_requirements(decision, issuer, satisfied)

    if proof is not None:
        parent_chain = Verifier().verify_chain(proof, now=now)
        parent = parent_chain.leaf
        if parent.audience != issuer.did:
            raise LinkageError(
                f"the issuer key {issuer.did} is not the audience of the proof "
                f"({parent.audience}); only the holder of a capability can redelegate it"
            )
        principal, proofs = parent.principal, [parent.id]
        if home is None:  # one ledger counts the whole subtree (see Limits)
            home = parent.limits.home
        fresh = fresh or parent.limits.fresh
    else:
        principal, proofs = issuer.did, []

    claims = capability_claims(
        issuer=issuer.did,
        audience=audience,
        principal=principal,
        jti=b64url_encode(os.urandom(16)) if jti is None else jti,
        issued_at=now,
        not_before=now,
        expires=now + ttl_seconds,
        abilities=abilities,
        limits=Limits(uses=uses, rate=rate, depth=depth, home=home, fresh=fresh),
        proofs=proofs,
    )
    if proof is not None:
        # Check the unsigned child against its parent before the key signs anything.
        draft = _draft(claims, issuer)
        _check_attenuation(proof.leaf, draft, len(proof.chain))
    return GrantDraft(claims, decision, now)


def _check_requirements(
    decision: PolicyDecision, issuer: KeyHandle, satisfied: Collection[str]
) -> None:
    done = set(satisfied)
    if issuer.properties.backend in _PIN_GATED_BACKENDS:
        done.add("pin")
    if issuer.properties.touch_policy == "always":
        # The device itself refuses to sign this grant without a touch (a PIV slot with
        # touch policy "always"), so the requirement is enforced, not merely declared.
        # "cached" is not enough: its touch may have been given for an earlier signature.
        done.add("touch")
    missing = sorted(decision.requirements - done - {"attested-holder"})
    if missing:
        raise PolicyViolationError(
            f"rule {decision.rule!r} requires {', '.join(missing)} before the key signs",
            rule=decision.rule,
        )


def _draft(claims: dict[str, Any], issuer: KeyHandle) -> Capability:
    """The capability as it would be, for attenuation checks before signing."""
    from policies.jws import ParsedJws

    return Capability.from_claims(
        claims, jws=ParsedJws("", {}, claims, b"", b""), cap_id="", what="new capability"
    )
