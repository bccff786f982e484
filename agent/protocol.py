"""What an edge agent and its cloud agent say to each other, shared by both sides.

The owner proves itself to its cloud agent with short-lived requests signed by the
hardware root (asking for a grant key, collecting held messages); the cloud agent
answers actions on a grant at one route per action.  Both sides import this module
and nothing of each other, so the edge agent runs without the server's dependencies
and the format cannot drift between the side that writes it and the side that reads it.
"""

from __future__ import annotations

import os
from typing import Any, Final
from urllib.parse import quote

from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_encode
from policies.errors import FormatError, VerificationError
from policies.jws import parse_compact, public_key_for, sign_compact, verify_signature

#: ``typ`` of the owner's request for a fresh grant key (``POST /v1/grants``).
KEYREQ_TYP: Final = "janus-keyreq+jws"
#: ``typ`` of the owner's request for held messages (``POST /v1/pickup``).
PICKUP_TYP: Final = "janus-pickup+jws"
#: How long a signed request is good for, and the most a verifier accepts.
REQUEST_LIFETIME: Final = 120
MAX_REQUEST_LIFETIME: Final = 300
#: Clock difference tolerated between owner and cloud agent.
REQUEST_SKEW: Final = 60


def sign_request(key: KeyHandle, *, typ: str, audience: str, now: int, **claims: Any) -> str:
    """A request signed by the owner's ``key`` for the agent ``audience``."""
    payload = {
        "iss": key.did,
        "aud": audience,
        "nonce": b64url_encode(os.urandom(16)),
        "iat": now,
        "exp": now + REQUEST_LIFETIME,
        **claims,
    }
    return sign_compact(key, {"typ": typ}, payload)


def check_signed_request(
    compact: str | None, typ: str, *, owner: str | None, audience: str, now: float
) -> dict[str, Any]:
    """The claims of a signed request, once its signature, addressee and times check out.

    Replays are not refused here: the nonce must be remembered by whoever receives the
    request (the claims carry it for that).
    """
    if not compact:
        raise VerificationError("this request must be signed by the owner's key")
    parsed = parse_compact(compact, typ=typ, what="signed request")
    claims = parsed.payload
    issuer = claims.get("iss")
    if owner is not None and issuer != owner:
        raise VerificationError("the request is not signed by this agent's owner")
    verify_signature(parsed, public_key_for(issuer, "request iss"), what="signed request")
    if claims.get("aud") != audience:
        raise VerificationError("the request is addressed to another agent")
    iat, exp, nonce = claims.get("iat"), claims.get("exp"), claims.get("nonce")
    if not isinstance(iat, int) or not isinstance(exp, int) or not isinstance(nonce, str):
        raise FormatError("signed request needs integer iat, exp and a string nonce")
    if not (
        iat - REQUEST_SKEW <= now < exp + REQUEST_SKEW and 0 < exp - iat <= MAX_REQUEST_LIFETIME
    ):
        raise VerificationError("the signed request is expired or not yet valid")
    return claims


def action_path(grant_id: str, action: str) -> str:
    """The route of an action on a grant (``POST``, body :func:`action_body`)."""
    return f"/v1/grants/{quote(grant_id, safe='')}/actions/{quote(action, safe='/')}"


def action_body(resource: str, request: dict[str, Any]) -> dict[str, Any]:
    """What the cloud agent reads from an action's body: the resource and the request."""
    return {"resource": resource, "request": request}


#: ``typ`` of the cloud agent's statement naming its routing key (``GET /v1/did``).
ROUTING_TYP: Final = "janus-routing+jws"


def sign_routing_key(identity: KeyHandle, routing_key: str, *, now: int) -> str:
    """The agent's own key vouching for its routing key: a sender can check the key it
    encrypts forwards to belongs to the agent it means, not to whoever answered."""
    return sign_compact(
        identity,
        {"typ": ROUTING_TYP},
        {"iss": identity.did, "routing_key": routing_key, "iat": now},
    )


def check_routing_key(answer: Any, *, agent: str | None = None) -> tuple[str, str]:
    """(agent DID, routing key) from a ``GET /v1/did`` answer, once the agent's signature
    over the routing key verifies; ``agent`` pins the DID the answer must name."""
    from janus_hsm.algorithms import Algorithm
    from janus_hsm.public_keys import PublicKeyFormatError, algorithm_of, from_did_key

    if not isinstance(answer, dict):
        raise FormatError("the agent's /v1/did answer is not a JSON object")
    did, key, proof = answer.get("did"), answer.get("routing_key"), answer.get("routing_proof")
    if not isinstance(did, str) or not isinstance(key, str) or not isinstance(proof, str):
        raise FormatError("the agent's /v1/did answer lacks did, routing_key or routing_proof")
    if agent is not None and did != agent:
        raise VerificationError(f"the agent answering is {did:.120}, not {agent:.120}")
    parsed = parse_compact(proof, typ=ROUTING_TYP, what="routing key statement")
    if parsed.payload.get("iss") != did or parsed.payload.get("routing_key") != key:
        raise VerificationError("the routing key statement is not about this agent and key")
    verify_signature(parsed, public_key_for(did, "agent did"), what="routing key statement")
    try:
        usable = algorithm_of(from_did_key(key)) is Algorithm.X25519
    except PublicKeyFormatError:
        usable = False
    if not usable:
        raise FormatError(f"the routing key {key:.120} is not the did:key of an X25519 key")
    return did, key
