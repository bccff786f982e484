"""Verification of capability chains and invocations, offline.

Everything that does not depend on the clock or on shared state (signatures, linkage,
attenuation, caveat syntax) is checked once per chain and cached by the chain's link
ids; time, revocation, the invocation and the caveats' evaluation are checked on every
call.  Failures are typed and name the link: see policies.errors.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from policies.abilities import Ability
from policies.capability import Bundle, Capability
from policies.caveats import Caveat, check_request, evaluate, parse_caveats
from policies.errors import (
    AttenuationError,
    CaveatFailedError,
    ExpiredError,
    FormatError,
    LinkageError,
    NotAuthorizedError,
    NotYetValidError,
    RevokedError,
    RootMismatchError,
    VerificationError,
    WrongHolderError,
)
from policies.invocation import Invocation
from policies.jws import public_key_for, verify_signature
from policies.ledger.base import LinkLimit

if TYPE_CHECKING:
    from cryptography import x509

DEFAULT_SKEW = 60


class RevocationSource(Protocol):
    def revoked(self, cap_ids: Sequence[str]) -> str | None: ...


@dataclass(frozen=True)
class VerifiedChain:
    """A chain whose signatures, linkage and attenuation hold (time is checked per use)."""

    bundle: Bundle
    caveats: tuple[tuple[tuple[Caveat, ...], ...], ...]  # [link][ability] -> caveats

    @property
    def principal(self) -> str:
        return self.bundle.root.principal

    @property
    def leaf(self) -> Capability:
        return self.bundle.leaf

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(c.id for c in self.bundle.chain)

    def link_limits(self) -> list[LinkLimit]:
        return [LinkLimit(c.id, c.limits.uses, c.limits.rate) for c in self.bundle.chain]


@dataclass(frozen=True)
class Authorization:
    """A verified invocation under a verified chain: what the ledger is asked to spend."""

    chain: VerifiedChain
    invocation: Invocation
    request: Mapping[str, Any]


class Verifier:
    """Checks bundles and invocations. Thread-safe; keep one per process for its cache."""

    def __init__(
        self,
        *,
        revocations: RevocationSource | None = None,
        cache_size: int = 4096,
        require_attestation: bool = False,
        attestation_roots: Sequence[x509.Certificate] | None = None,
    ) -> None:
        """``require_attestation``: accept only chains whose root capability carries a
        hardware attestation of its issuer key that verifies to ``attestation_roots``
        (default: Yubico's PIV roots); see :mod:`policies.attestation`."""
        self.revocations = revocations
        self.require_attestation = require_attestation
        self.attestation_roots = attestation_roots
        self._attested: set[tuple[str, str]] = set()
        self._cache: OrderedDict[tuple[str, ...], VerifiedChain] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def verify_chain(
        self,
        bundle: Bundle | str | bytes,
        *,
        now: float,
        skew: int = DEFAULT_SKEW,
        root: str | None = None,
    ) -> VerifiedChain:
        verified = self._structure(bundle)
        if root is not None and verified.bundle.root.issuer != root:
            raise RootMismatchError(
                f"chain is rooted at {verified.bundle.root.issuer}, not {root}", link=0
            )
        if self.require_attestation:
            self._check_attestation(verified.bundle.root)
        for index, cap in enumerate(verified.bundle.chain):
            if now + skew < cap.not_before:
                raise NotYetValidError(f"not valid before {cap.not_before}", link=index)
            if now - skew >= cap.expires:
                raise ExpiredError(f"expired at {cap.expires}", link=index)
        if self.revocations is not None:
            revoked = self.revocations.revoked(verified.ids)
            if revoked is not None:
                index = verified.ids.index(revoked)
                raise RevokedError(f"capability {revoked} is revoked", link=index)
        return verified

    def _check_attestation(self, root: Capability) -> None:
        """The root key was born in hardware (checked once per root capability id)."""
        with self._lock:
            if (root.issuer, root.id) in self._attested:
                return
        from policies.attestation import check_root_attestation

        check_root_attestation(root, self.attestation_roots)
        with self._lock:
            self._attested.add((root.issuer, root.id))

    def _structure(self, bundle: Bundle | str | bytes) -> VerifiedChain:
        """The time-independent checks, cached by the bundle's bytes or its link ids.

        Keying on a hash of the raw text lets a repeat verification skip parsing too;
        the link ids catch the same chain arriving with different formatting.
        """
        text_key: tuple[str, ...] | None = None
        if not isinstance(bundle, Bundle):
            raw = bundle.encode() if isinstance(bundle, str) else bytes(bundle)
            text_key = ("text", hashlib.sha256(raw).hexdigest())
            cached = self._cached(text_key)
            if cached is not None:
                return cached
            bundle = Bundle.parse(raw)
        id_key = tuple(c.id for c in bundle.chain)
        verified = self._cached(id_key)
        if verified is None:
            verified = _verify_structure(bundle)
        with self._lock:
            for key in (id_key, text_key):
                if key is not None:
                    self._cache[key] = verified
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return verified

    def _cached(self, key: tuple[str, ...]) -> VerifiedChain | None:
        with self._lock:
            verified = self._cache.get(key)
            if verified is not None:
                self._cache.move_to_end(key)
            return verified

    def verify(
        self,
        bundle: Bundle | str | bytes,
        invocation: Invocation | str,
        request: Mapping[str, Any],
        *,
        now: float,
        skew: int = DEFAULT_SKEW,
        root: str | None = None,
        audience: str | None = None,
    ) -> Authorization:
        """Verify the chain and one invocation of it for ``request``.

        With ``audience`` (this verifier's identifier), the invocation must name it in
        ``aud``: one meant for another verifier is refused.
        """
        chain = self.verify_chain(bundle, now=now, skew=skew, root=root)
        if not isinstance(invocation, Invocation):
            invocation = Invocation.parse(invocation)
        if audience is not None and invocation.audience != audience:
            raise WrongHolderError(
                f"the invocation is addressed to {invocation.audience or 'no verifier'}, "
                f"not to {audience}"
            )
        leaf = chain.leaf
        if invocation.holder != leaf.audience:
            raise WrongHolderError(
                f"invocation is signed for {invocation.holder}, but the capability's "
                f"audience is {leaf.audience}"
            )
        if not invocation.signed_locally:  # see Invocation.signed_request
            verify_signature(
                invocation.jws,
                public_key_for(invocation.holder, "invocation iss"),
                what="invocation",
            )
        if invocation.capability_id != leaf.id:
            raise VerificationError("invocation names a different capability than the bundle")
        if now + skew < invocation.issued_at:
            raise NotYetValidError("invocation is issued in the future")
        if now - skew >= invocation.expires:
            raise ExpiredError("invocation has expired")
        signed = invocation.signed_request
        if signed is None or request is not signed.value:
            try:
                request = check_request(request)
            except FormatError as exc:
                raise VerificationError(f"request refused: {exc}") from None
            invocation.check_request(request)
        # else: invoke_local checked this private copy and signed its digest (see
        # Invocation.signed_request): checking it again would find the same.
        for index, cap in enumerate(chain.bundle.chain):
            reason = _link_allows(cap.abilities, chain.caveats[index], invocation, request, now=now)
            if reason is not None:
                error = NotAuthorizedError if reason.startswith("no ability") else CaveatFailedError
                raise error(reason, link=index)
        return Authorization(chain, invocation, request)

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()


def _link_allows(
    abilities: Sequence[Ability],
    caveats: Sequence[tuple[Caveat, ...]],
    invocation: Invocation,
    request: Mapping[str, Any],
    *,
    now: float,
) -> str | None:
    """None if some ability of the link matches and its caveats hold; else the reason."""
    reasons = []
    for ability, ability_caveats in zip(abilities, caveats, strict=True):
        if not ability.matches(invocation.resource, invocation.action):
            continue
        reason = evaluate(ability_caveats, request, now=now)
        if reason is None:
            return None
        reasons.append(reason)
    if not reasons:
        return f"no ability allows {invocation.action!r} on {invocation.resource!r}"
    return "; ".join(reasons)


def _verify_structure(bundle: Bundle) -> VerifiedChain:
    chain = bundle.chain
    caveats: list[tuple[tuple[Caveat, ...], ...]] = []
    principal = chain[0].principal
    for index, cap in enumerate(chain):
        verify_signature(
            cap.jws, public_key_for(cap.issuer, f"link {index} iss"), what=f"link {index}"
        )
        public_key_for(cap.audience, f"link {index} aud")
        if cap.principal != principal:
            raise LinkageError("names a different root principal than the chain", link=index)
        try:
            caveats.append(tuple(parse_caveats(a.caveats) for a in cap.abilities))
        except FormatError as exc:
            raise VerificationError(f"invalid caveat: {exc}", link=index) from None
        if index == 0:
            if cap.issuer != cap.principal:
                raise RootMismatchError(
                    "the root capability must be issued by the principal (iss == sub)", link=0
                )
            if cap.proofs:
                raise LinkageError("the root capability must have no proofs", link=0)
            continue
        parent = chain[index - 1]
        if cap.proofs != (parent.id,):
            raise LinkageError("does not name its parent as proof", link=index)
        if cap.issuer != parent.audience:
            raise LinkageError(
                f"is issued by {cap.issuer}, but the parent was granted to {parent.audience}",
                link=index,
            )
        _check_attenuation(parent, cap, index)
    return VerifiedChain(bundle, tuple(caveats))


def _check_attenuation(parent: Capability, child: Capability, index: int) -> None:
    for ability in child.abilities:
        if not any(p.covers(ability) for p in parent.abilities):
            raise AttenuationError(
                f"ability {ability.action!r} on {ability.resource!r} is not covered by the parent",
                link=index,
            )
    if child.expires > parent.expires:
        raise AttenuationError("expires later than its parent", link=index)
    if parent.limits.depth < 1:
        raise AttenuationError("the parent allows no redelegation (depth 0)", link=index)
    if child.limits.depth > parent.limits.depth - 1:
        raise AttenuationError(
            f"depth {child.limits.depth} exceeds the parent's {parent.limits.depth} - 1",
            link=index,
        )
    if parent.limits.uses is not None and (
        child.limits.uses is None or child.limits.uses > parent.limits.uses
    ):
        raise AttenuationError(
            f"uses {child.limits.uses} exceed the parent's {parent.limits.uses}", link=index
        )
    if parent.limits.home is not None and child.limits.home != parent.limits.home:
        # One ledger counts a subtree: a child counted elsewhere would split the count.
        raise AttenuationError("names another home ledger than its parent's", link=index)
    if parent.limits.fresh and not child.limits.fresh:
        raise AttenuationError(
            "drops its parent's need for fresh revocation state (lim.fresh)", link=index
        )
    p_rate, c_rate = parent.limits.rate, child.limits.rate
    if p_rate is not None and (
        c_rate is None or c_rate.count > p_rate.count or c_rate.per_seconds < p_rate.per_seconds
    ):
        raise AttenuationError("rate limit is looser than the parent's", link=index)
