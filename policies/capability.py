"""Capabilities and bundles: the signed objects, their claims, and how they travel.

A capability is a compact JWS (typ ``janus-cap+jws``) whose payload holds:

========  ==========================================================================
``iss``   issuer, did:key of the signing key
``aud``   audience: did:key of the key that may use (or redelegate) the capability
``sub``   root principal: did:key of the hardware root key the chain starts from
``jti``   unique id (random, base64url)
``iat``   issued at; ``nbf`` not before; ``exp`` expiry (integer epoch seconds)
``att``   abilities: ``[{"with": resource, "can": action, "nb": [caveats]}]``
``lim``   limits: ``{"uses": n | null, "rate": {"n": n, "per": s} | null, "depth": d}``,
          optionally ``"home": did`` (the instance whose ledger counts the uses) and
          ``"fresh": true`` (usable only where revocation state is known fresh)
``prf``   proofs: SHA-256 (base64url) of the parent's compact form; [] for a root
``evd``   optional evidence (issuer attestation, approvals), carried, not interpreted
========  ==========================================================================

A bundle is the chain, root first: ``{"typ": "janus-bundle/1", "chain": [jws, …]}``.
A capability's *id* is the SHA-256 of its compact form, so proofs, the ledger and
revocations all name it the same way and it cannot be forged without breaking a hash.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from janus_hsm.public_keys import PublicKeyFormatError, from_did_key
from policies.abilities import Ability
from policies.errors import ChainLimitError, FormatError
from policies.jws import ParsedJws, parse_compact, sha256_b64, strict_json
from policies.ledger.base import Rate

CAPABILITY_TYP = "janus-cap+jws"
BUNDLE_TYP = "janus-bundle/1"
MAX_LINKS = 10
MAX_BUNDLE_BYTES = 16 * 1024
MAX_ABILITIES = 32
_CLAIMS = {"iss", "aud", "sub", "jti", "iat", "nbf", "exp", "att", "lim", "prf", "evd"}
_REQUIRED = _CLAIMS - {"evd"}
_LIMITS = {"uses", "rate", "depth", "home", "fresh"}


@dataclass(frozen=True)
class Limits:
    """``home``, when set, is the did:key of the cloud-agent instance whose ledger counts
    every use of the capability (and of everything derived from it): other instances
    forward the spend there, so a use limit stays exact without a shared database.
    ``fresh`` asks every instance to refuse a use while its view of revocations may be
    stale (out of contact with its event bus for longer than its bound), as it does for
    use-limited capabilities: for a capability whose revocation must take effect at once
    even though nothing about it is counted.  Both are absent from the JSON when unset,
    so capabilities without them read as before."""

    uses: int | None
    rate: Rate | None
    depth: int
    home: str | None = None
    fresh: bool = False

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "uses": self.uses,
            "rate": None
            if self.rate is None
            else {"n": self.rate.count, "per": self.rate.per_seconds},
            "depth": self.depth,
        }
        if self.home is not None:
            obj["home"] = self.home
        if self.fresh:
            obj["fresh"] = True
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> Limits:
        if not isinstance(obj, dict) or not {"uses", "rate", "depth"} <= set(obj) <= _LIMITS:
            raise FormatError(
                "'lim' must be an object with exactly uses, rate and depth "
                "(and optionally home and fresh)"
            )
        uses, rate, depth = obj["uses"], obj["rate"], obj["depth"]
        if uses is not None and not _is_count(uses):
            raise FormatError("'lim.uses' must be a positive integer or null")
        if not _is_int(depth) or not 0 <= depth <= MAX_LINKS:
            raise FormatError(f"'lim.depth' must be an integer from 0 to {MAX_LINKS}")
        parsed_rate = None
        if rate is not None:
            if not isinstance(rate, dict) or set(rate) != {"n", "per"}:
                raise FormatError('\'lim.rate\' must be null or {"n": count, "per": seconds}')
            if not _is_count(rate["n"]) or not _is_count(rate["per"]):
                raise FormatError("'lim.rate' n and per must be positive integers")
            parsed_rate = Rate(rate["n"], rate["per"])
        home = obj.get("home")
        if home is not None:
            check_home(home)
        # Only ``true`` is written: one encoding per meaning (absent means not fresh).
        if "fresh" in obj and obj["fresh"] is not True:
            raise FormatError("'lim.fresh' must be true when present")
        return cls(uses, parsed_rate, depth, home, "fresh" in obj)


def check_home(home: object) -> str:
    """A home names a cloud-agent instance by the did:key of its identity key."""
    if not isinstance(home, str) or not home.startswith("did:key:") or len(home) > 256:
        raise FormatError("'lim.home' must be the did:key of a cloud-agent instance")
    try:
        from_did_key(home)
    except PublicKeyFormatError:
        raise FormatError("'lim.home' is not a valid did:key") from None
    return home


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_count(value: Any) -> bool:
    return _is_int(value) and 0 < value < 2**53


@dataclass(frozen=True)
class Capability:
    """One verified-to-be-well-formed link (its signature is checked by the verifier)."""

    jws: ParsedJws = field(repr=False)
    id: str
    issuer: str
    audience: str
    principal: str
    jti: str
    issued_at: int
    not_before: int
    expires: int
    abilities: tuple[Ability, ...]
    limits: Limits
    proofs: tuple[str, ...]
    evidence: dict[str, Any] | None

    @property
    def compact(self) -> str:
        return self.jws.compact

    @classmethod
    def parse(cls, compact: str, *, index: int | None = None) -> Capability:
        what = "capability" if index is None else f"link {index}"
        jws = parse_compact(compact, typ=CAPABILITY_TYP, what=what)
        return cls.from_claims(jws.payload, jws=jws, cap_id=sha256_b64(compact), what=what)

    @classmethod
    def from_claims(
        cls, claims: dict[str, Any], *, jws: ParsedJws, cap_id: str, what: str = "capability"
    ) -> Capability:
        """Validate the claims and build the link (also used on drafts before signing)."""
        missing = _REQUIRED - set(claims)
        unknown = set(claims) - _CLAIMS
        if missing or unknown:
            detail = "; ".join(
                part
                for part in (
                    f"missing {', '.join(sorted(missing))}" if missing else "",
                    f"unknown {', '.join(sorted(unknown))}" if unknown else "",
                )
                if part
            )
            raise FormatError(f"{what} claims: {detail}")
        for name in ("iss", "aud", "sub", "jti"):
            if not isinstance(claims[name], str) or not claims[name] or len(claims[name]) > 256:
                raise FormatError(f"{what}: '{name}' must be a non-empty string")
        for name in ("iat", "nbf", "exp"):
            if not _is_int(claims[name]) or not 0 <= claims[name] < 2**40:
                raise FormatError(f"{what}: '{name}' must be integer epoch seconds")
        if not claims["nbf"] < claims["exp"]:
            raise FormatError(f"{what}: 'exp' must be after 'nbf'")
        att = claims["att"]
        if not isinstance(att, list) or not 1 <= len(att) <= MAX_ABILITIES:
            raise FormatError(f"{what}: 'att' must list 1 to {MAX_ABILITIES} abilities")
        abilities = tuple(Ability.from_json(a) for a in att)
        prf = claims["prf"]
        if not isinstance(prf, list) or len(prf) > 1 or not all(isinstance(p, str) for p in prf):
            raise FormatError(f"{what}: 'prf' must list at most one parent id")
        evidence = claims.get("evd")
        if evidence is not None and not isinstance(evidence, dict):
            raise FormatError(f"{what}: 'evd' must be an object")
        return cls(
            jws=jws,
            id=cap_id,
            issuer=claims["iss"],
            audience=claims["aud"],
            principal=claims["sub"],
            jti=claims["jti"],
            issued_at=claims["iat"],
            not_before=claims["nbf"],
            expires=claims["exp"],
            abilities=abilities,
            limits=Limits.from_json(claims["lim"]),
            proofs=tuple(prf),
            evidence=evidence,
        )


def capability_claims(
    *,
    issuer: str,
    audience: str,
    principal: str,
    jti: str,
    issued_at: int,
    not_before: int,
    expires: int,
    abilities: Sequence[Ability],
    limits: Limits,
    proofs: Sequence[str],
    evidence: dict[str, Any] | None = None,
) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": principal,
        "jti": jti,
        "iat": issued_at,
        "nbf": not_before,
        "exp": expires,
        "att": [a.to_json() for a in abilities],
        "lim": limits.to_json(),
        "prf": list(proofs),
    }
    if evidence:
        claims["evd"] = evidence
    return claims


@dataclass(frozen=True)
class Bundle:
    """A chain of capabilities, root first, as it travels between agents."""

    chain: tuple[Capability, ...]

    @property
    def leaf(self) -> Capability:
        return self.chain[-1]

    @property
    def root(self) -> Capability:
        return self.chain[0]

    def to_dict(self) -> dict[str, Any]:
        """The bundle as a JSON object (``to_json`` is this, rendered).

        For callers that embed a bundle in a larger JSON document (evidence, HTTP
        bodies): they need not render it to text and parse that text back.
        """
        return {"typ": BUNDLE_TYP, "chain": [c.compact for c in self.chain]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def extend(self, capability: Capability) -> Bundle:
        return Bundle((*self.chain, capability))

    @classmethod
    def from_compacts(cls, compacts: Sequence[str]) -> Bundle:
        if not compacts:
            raise FormatError("a bundle needs at least one capability")
        if len(compacts) > MAX_LINKS:
            raise ChainLimitError(f"chain has {len(compacts)} links; at most {MAX_LINKS}")
        return cls(tuple(Capability.parse(c, index=i) for i, c in enumerate(compacts)))

    @classmethod
    def parse(cls, text: str | bytes) -> Bundle:
        data = text.encode() if isinstance(text, str) else bytes(text)
        if len(data) > MAX_BUNDLE_BYTES:
            raise ChainLimitError(f"bundle is {len(data)} bytes; at most {MAX_BUNDLE_BYTES}")
        return cls.from_compacts(_chain_of(strict_json(data, "bundle")))

    @classmethod
    def from_dict(cls, obj: object) -> Bundle:
        """The bundle from its JSON object (``to_dict``), e.g. a member of a larger JSON
        body already parsed from outside input: the checks and refusals of ``parse``.

        With no text to measure, the size limit applies to the bundle as ``to_json``
        renders it.
        """
        chain = _chain_of(obj)
        size = len(json.dumps({"typ": BUNDLE_TYP, "chain": chain}, indent=1).encode())
        if size > MAX_BUNDLE_BYTES:
            raise ChainLimitError(f"bundle is {size} bytes; at most {MAX_BUNDLE_BYTES}")
        return cls.from_compacts(chain)


def _chain_of(obj: object) -> list[str]:
    """The compact links of a bundle's JSON object, refusing anything else in it."""
    if not isinstance(obj, dict) or obj.get("typ") != BUNDLE_TYP or set(obj) != {"typ", "chain"}:
        raise FormatError(f"not a Janus bundle (expected typ {BUNDLE_TYP!r}, chain)")
    chain = obj["chain"]
    if not isinstance(chain, list) or not all(isinstance(c, str) for c in chain):
        raise FormatError("bundle 'chain' must be a list of compact JWS strings")
    return chain
