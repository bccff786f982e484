"""Contact capabilities: a directory's permission to send a first message to an owner.

A brokered directory grants contact under its namespace's rules.  What it hands a
claimer is a Janus capability chain rooted at the directory's key, for the ability
``msg/first-contact`` on ``janus:contact/<intro address id>``, limited in uses and
time.  An owner's receiving service, told that an intro address requires contact
from directory X, accepts a delivery there only with a valid chain rooted at X and an
invocation by the capability's holder bound to the very ciphertext delivered; each
invocation counts once, so a replayed first message is refused.
"""

from __future__ import annotations

import os
import time
from typing import Any

from agent.directory.errors import ContactError
from agent.protocol import sign_request
from agent.relationships.delivery import (
    RECEIVING_TYP,
    Address,
    HeldAddress,
    HolderKey,
    ReceivingClient,
    ServiceError,
    ServiceUnreachableError,
    delivery_body,
    seal_address,
)
from agent.relationships.errors import RelationshipError
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_encode
from policies.abilities import Ability
from policies.capability import (
    BUNDLE_TYP,
    CAPABILITY_TYP,
    Bundle,
    Capability,
    Limits,
    capability_claims,
)
from policies.errors import PolicyError
from policies.invocation import Invocation, invoke
from policies.jws import sha256_b64, sign_compact
from policies.verify import Verifier

CONTACT_ACTION = "msg/first-contact"
#: How long a first-contact invocation is good for (it is made just before delivery).
INVOCATION_LIFETIME = 300

_verifier = Verifier()


def contact_resource(address_id: str) -> str:
    return f"janus:contact/{address_id}"


def contact_request(ciphertext: bytes) -> dict[str, str]:
    """What the invocation signs: the delivered ciphertext's digest."""
    return {"ciphertext": sha256_b64(ciphertext)}


def issue_contact(
    directory: KeyHandle,
    *,
    audience: str,
    address_id: str,
    uses: int,
    ttl: int,
    now: int | None = None,
) -> Bundle:
    """A one-link chain from the directory's key to ``audience`` for this intro address."""
    compact = sign_contact(
        directory, audience=audience, address_id=address_id, uses=uses, ttl=ttl, now=now
    )
    return Bundle((Capability.parse(compact, index=0),))


def sign_contact(
    directory: KeyHandle,
    *,
    audience: str,
    address_id: str,
    uses: int,
    ttl: int,
    now: int | None = None,
) -> str:
    """The compact JWS of :func:`issue_contact`'s one link, as a claim answer carries it.

    Built from :func:`policies.capability.capability_claims` and signed here rather than
    by :func:`policies.issue.grant`: grant checks an issuance policy meant for people's
    grants and then verifies the chain it has just signed, which doubles the signature
    work of every claim.  Nor is the link parsed back here: the claimer and every
    receiving service verify the chain in full.  The namespace's rules bound uses and
    time (rules.py).
    """
    issued = int(time.time()) if now is None else now
    claims = capability_claims(
        issuer=directory.did,
        audience=audience,
        principal=directory.did,
        jti=b64url_encode(os.urandom(16)),
        issued_at=issued,
        not_before=issued,
        expires=issued + ttl,
        abilities=[Ability(contact_resource(address_id), CONTACT_ACTION)],
        limits=Limits(uses=uses, rate=None, depth=0),
        proofs=[],
    )
    return sign_compact(directory, {"typ": CAPABILITY_TYP}, claims)


def contact_bundle(compact: str) -> dict[str, Any]:
    """A one-link chain's bundle as JSON (``Bundle.to_dict``) without parsing it again."""
    return {"typ": BUNDLE_TYP, "chain": [compact]}


def present_contact(
    holder: KeyHandle, bundle: Bundle, *, address_id: str, ciphertext: bytes, service_did: str
) -> dict[str, Any]:
    """The ``contact`` member of a delivery: the chain and the holder's invocation."""
    invocation = invoke(
        holder,
        capability_id=bundle.leaf.id,
        action=CONTACT_ACTION,
        resource=contact_resource(address_id),
        request=contact_request(ciphertext),
        now=int(time.time()),
        lifetime=INVOCATION_LIFETIME,
        audience=service_did,
    )
    return {"bundle": bundle.to_dict(), "invocation": invocation}


def check_contact(
    contact: object,
    *,
    root: str,
    address_id: str,
    ciphertext: bytes,
    service_did: str,
    now: float | None = None,
) -> tuple[str, int | None, str, int]:
    """(capability id, its use limit, invocation nonce, invocation expiry) of a valid
    contact for this delivery; ContactError for anything else (another directory's
    chain, another address, another ciphertext, expired)."""
    if contact is None:
        raise ContactError(
            "this address accepts first contact only with a contact capability from its directory"
        )
    if not isinstance(contact, dict) or set(contact) != {"bundle", "invocation"}:
        raise ContactError("'contact' must be {'bundle': object, 'invocation': compact JWS}")
    if not isinstance(contact["invocation"], str):
        raise ContactError("the contact invocation must be a compact JWS")
    moment = time.time() if now is None else now
    try:
        bundle = Bundle.from_dict(contact["bundle"])
        invocation = Invocation.parse(contact["invocation"])
        if invocation.action != CONTACT_ACTION or invocation.resource != contact_resource(
            address_id
        ):
            raise ContactError("the contact invocation is for another address or action")
        _verifier.verify(
            bundle,
            invocation,
            contact_request(ciphertext),
            now=moment,
            root=root,
            audience=service_did,
        )
    except PolicyError as exc:
        raise ContactError(f"the contact capability does not hold: {exc}") from None
    leaf = bundle.leaf
    return leaf.id, leaf.limits.uses, invocation.nonce, invocation.expires


# --- the owner's and the claimer's side of a receiving service ---------------------------


def create_contact_address(
    url: str, owner: KeyHandle, directory_did: str, *, timeout: float = 10
) -> HeldAddress:
    """A new intro address at the owner's receiving service ``url`` that accepts first
    contact only with a capability rooted at ``directory_did``."""
    client = ReceivingClient(url, timeout=timeout)
    try:
        # The key document is signed by the service's did: the request is addressed to it.
        service_did = client.service_keys()[0].service_did
        # Pickups and acks at this address are signed by its own software holder key,
        # so the token signs once here and never per pickup.
        holder = HolderKey.generate()
        request = sign_request(
            owner,
            typ=RECEIVING_TYP,
            audience=service_did,
            now=int(time.time()),
            op="create",
            contact_root=directory_did,
            holder=holder.did,
        )
        answer = _post(url, "/v1/receiving/addresses", {"request": request}, timeout)
    finally:
        client.close()
    if answer.get("contact_root") != directory_did:
        raise ContactError(
            "the receiving service did not make the address require contact capabilities"
        )
    if answer.get("holder") != holder.did:
        raise ContactError("the receiving service did not register the address's holder key")
    try:
        address = Address(url, answer["address_id"], answer["credential"])
        return HeldAddress(address, str(answer["pickup_id"]), b64url_encode(holder.private_bytes()))
    except (KeyError, TypeError, RelationshipError):
        raise ContactError("the receiving service answered no address") from None


def deliver_first_contact(
    holder: KeyHandle, contact: Bundle, address: Address, ciphertext: bytes, *, timeout: float = 10
) -> None:
    """Deliver a first message straight to an intro address, with its contact capability."""
    client = ReceivingClient(address.service, timeout=timeout)
    try:
        key = client.service_key()
        service_did = key.service_did
    finally:
        client.close()
    body: dict[str, Any] = dict(delivery_body(seal_address(key, address, ciphertext), ciphertext))
    body["contact"] = present_contact(
        holder,
        contact,
        address_id=address.address_id,
        ciphertext=ciphertext,
        service_did=service_did,
    )
    _post(address.service, "/v1/receiving/deliveries", body, timeout)


def _post(url: str, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    import httpx

    from agent.directory import errors as dir_errors

    try:
        response = httpx.post(url.rstrip("/") + path, json=body, timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServiceUnreachableError(
            f"{url:.200} could not be reached: {type(exc).__name__}"
        ) from None
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise ServiceUnreachableError(f"the service answered {response.status_code} without JSON")
    if response.status_code >= 300:
        error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        assert isinstance(error, dict)
        code, message = str(error.get("code", "error")), str(error.get("message", ""))[:300]
        known = {
            c.code: c
            for c in vars(dir_errors).values()
            if isinstance(c, type) and issubclass(c, dir_errors.DirectoryError)
        }
        cls = known.get(code)
        if cls is not None:
            raise cls(message)
        err = ServiceError(f"the service refused: {code}: {message}")
        err.code, err.status = code, response.status_code
        raise err
    return answer
