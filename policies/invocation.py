"""Invocations: the holder's signed, short-lived request to use a capability.

A capability says what its audience *may* do; an invocation proves the audience's key
is doing it now, for this request: it binds the capability id, the action, the
resource, a digest of the request, a nonce (for replay refusal) and a lifetime of at
most five minutes.  It is a compact JWS with typ ``janus-inv+jws`` and payload
``{iss, cap, can, with, dig, nonce, iat, exp}``.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_encode
from policies.caveats import check_request
from policies.errors import FormatError, VerificationError
from policies.jws import ParsedJws, canonical_json, parse_compact, sha256_b64, sign_jws

INVOCATION_TYP = "janus-inv+jws"
MAX_LIFETIME = 300
_CLAIMS = {"iss", "cap", "can", "with", "dig", "nonce", "iat", "exp"}
_OPTIONAL = {"aud"}
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


def request_digest(request: Mapping[str, Any]) -> str:
    """SHA-256 (base64url) of the request's canonical JSON."""
    return sha256_b64(canonical_json(dict(request)))


@dataclass(frozen=True)
class SignedRequest:
    """The request an invocation was signed for here: checked once, serialised once.

    ``value`` is ``check_request``'s private copy (nobody else holds it, so it cannot
    change after the check) and ``canonical`` its canonical JSON, whose SHA-256 is the
    invocation's ``dig``: the verifier, the ledger and the evidence signature all use
    these instead of checking and serialising the request again.
    """

    value: Mapping[str, Any]
    canonical: bytes


@dataclass(frozen=True)
class Invocation:
    jws: ParsedJws
    holder: str
    capability_id: str
    action: str
    resource: str
    digest: str
    nonce: str
    issued_at: int
    expires: int
    audience: str | None = None  # the verifier it is meant for, when the invoker named one
    # Set only on an invocation this process has just signed itself (invoke_local): the
    # request as invoke_local checked and digested it.  Invocation.parse, the only way
    # from outside input (text) to an Invocation, always leaves it None; it is not a
    # constructor argument (init=False) and dataclasses.replace resets it, so only
    # invoke_local can set it.
    signed_request: SignedRequest | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @property
    def signed_locally(self) -> bool:
        """Signed by invoke_local in this process: its fields are the claims that were
        signed, so Verifier.verify may skip checking the signature it just made."""
        return self.signed_request is not None

    @property
    def compact(self) -> str:
        return self.jws.compact

    @classmethod
    def parse(cls, compact: str) -> Invocation:
        if not isinstance(compact, str):
            raise FormatError("an invocation must be a compact JWS string")
        jws = parse_compact(compact.strip(), typ=INVOCATION_TYP, what="invocation")
        claims = jws.payload
        _check_claims(claims)
        return cls(
            jws=jws,
            holder=claims["iss"],
            capability_id=claims["cap"],
            action=claims["can"],
            resource=claims["with"],
            digest=claims["dig"],
            nonce=claims["nonce"],
            issued_at=claims["iat"],
            expires=claims["exp"],
            audience=claims.get("aud"),
        )

    def check_request(self, request: Mapping[str, Any]) -> None:
        if not hmac.compare_digest(self.digest, request_digest(request)):
            raise VerificationError("the request does not match the invocation's digest")


def _check_claims(claims: Mapping[str, Any]) -> None:
    """The shape every invocation must have, whether parsed or just signed here."""
    if not _CLAIMS <= set(claims) <= _CLAIMS | _OPTIONAL:
        raise FormatError(
            f"invocation claims must be {', '.join(sorted(_CLAIMS))} (and optionally aud)"
        )
    audience = claims.get("aud")
    if audience is not None and (not isinstance(audience, str) or not 0 < len(audience) <= 512):
        raise FormatError("invocation 'aud' must be a non-empty string")
    for name in ("iss", "cap", "can", "with", "dig", "nonce"):
        if not isinstance(claims[name], str) or not 0 < len(claims[name]) <= 512:
            raise FormatError(f"invocation '{name}' must be a non-empty string")
    for name in ("iat", "exp"):
        value = claims[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise FormatError(f"invocation '{name}' must be integer epoch seconds")
    if not 0 < claims["exp"] - claims["iat"] <= MAX_LIFETIME:
        raise FormatError(f"invocation lifetime must be 1 to {MAX_LIFETIME} seconds")
    if len(claims["nonce"]) < 16:
        raise FormatError("invocation nonce must carry at least 96 bits (16 characters)")
    if not _BASE64URL.fullmatch(claims["nonce"]):
        # As documented (docs/capabilities.md), and so every ledger stores it as given.
        raise FormatError("invocation nonce must be base64url (A-Z a-z 0-9 - _)")


def invoke(
    holder: KeyHandle,
    *,
    capability_id: str,
    action: str,
    resource: str,
    request: Mapping[str, Any],
    now: int,
    lifetime: int = 60,
    audience: str | None = None,
) -> str:
    """Sign an invocation with the capability's audience key.

    ``audience`` names the verifier (e.g. a cloud agent's DID); a verifier that checks
    it refuses invocations meant for someone else, so one cannot be replayed across
    verifiers that share no ledger.
    """
    digest = request_digest(request)
    payload = _claims(holder, capability_id, action, resource, digest, now, lifetime, audience)
    return sign_jws(holder, {"typ": INVOCATION_TYP}, payload).compact


def invoke_local(
    holder: KeyHandle,
    *,
    capability_id: str,
    action: str,
    resource: str,
    request: Mapping[str, Any],
    now: int,
    lifetime: int = 60,
    audience: str | None = None,
) -> Invocation:
    """``invoke``, returning the Invocation itself, for a verifier in this process.

    Built from the claims as signed rather than parsed back from the text, and marked
    ``signed_locally``: a verifier that is handed it directly (the cloud agent acting
    on its own grant) need not re-check the signature it has just made.  The claims
    get the same checks as in ``Invocation.parse``, and everything else (holder,
    capability, audience, time, request digest, caveats) is still checked by the
    verifier.  The compact form, for evidence and other verifiers, is ``.compact``.

    The request is checked here, as the verifier would (the same refusal), and kept
    with its canonical form in ``signed_request``: pass ``signed_request.value`` on
    as the request, and it is not checked or serialised again.
    """
    try:
        checked = check_request(request)
    except FormatError as exc:
        raise VerificationError(f"request refused: {exc}") from None
    signed = SignedRequest(checked, canonical_json(dict(checked)))
    digest = sha256_b64(signed.canonical)
    payload = _claims(holder, capability_id, action, resource, digest, now, lifetime, audience)
    _check_claims(payload)  # as Invocation.parse would: the same refusals either way
    jws = sign_jws(holder, {"typ": INVOCATION_TYP}, payload)
    invocation = Invocation(
        jws=jws,
        holder=payload["iss"],
        capability_id=capability_id,
        action=action,
        resource=resource,
        digest=payload["dig"],
        nonce=payload["nonce"],
        issued_at=now,
        expires=payload["exp"],
        audience=audience,
    )
    object.__setattr__(invocation, "signed_request", signed)  # frozen; see the field
    return invocation


def _claims(
    holder: KeyHandle,
    capability_id: str,
    action: str,
    resource: str,
    digest: str,
    now: int,
    lifetime: int,
    audience: str | None,
) -> dict[str, Any]:
    if not 0 < lifetime <= MAX_LIFETIME:
        raise FormatError(f"invocation lifetime must be 1 to {MAX_LIFETIME} seconds")
    payload: dict[str, Any] = {
        "iss": holder.did,
        "cap": capability_id,
        "can": action,
        "with": resource,
        "dig": digest,
        "nonce": b64url_encode(os.urandom(18)),
        "iat": now,
        "exp": now + lifetime,
    }
    if audience is not None:
        payload["aud"] = audience
    return payload
