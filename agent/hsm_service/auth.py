"""How an HSM service client proves, on every request, that it may make that request.

A client is named by the did:key of its own key.  An administrator of the service (a
did:key in the config's ``administrators``) grants it a capability (a janus-bundle,
``janus grant``) for abilities on the service's resources; each HTTP request then
carries the bundle and a fresh invocation signed by the client's key:

    Authorization: Janus-Invocation <compact JWS, typ janus-inv+jws>
    Janus-Capability: <base64url of the bundle's JSON>

The invocation's request digest covers :func:`bound_request`: the HTTP method, the
path (with its query), the SHA-256 of the body and the service it is meant for.  So an
invocation answers exactly one request at one service: replaying it is refused by the
ledger (its nonce is remembered), moving it to another route or body breaks the
digest.  There are no bearer passwords: a captured request is worth nothing.

Both sides import this module (the client builds, the service checks), so the binding
cannot drift between them.  Resources and actions (see docs/hsm-service.md):

=======================  ==================================================
``hsm:keys/LABEL``       ``hsm/read`` ``hsm/sign`` ``hsm/ecdh`` ``hsm/generate``
                         ``hsm/destroy`` (and ``hsm/approve``: read the claims
                         approvers sign for an operation on this key)
``hsm:service``          ``hsm/list`` ``hsm/audit`` ``hsm/policy``
=======================  ==================================================
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Final

from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from policies.capability import Bundle
from policies.errors import FormatError, RootMismatchError, VerificationError
from policies.invocation import invoke
from policies.jws import sha256_b64

AUTH_SCHEME: Final = "Janus-Invocation"
CAPABILITY_HEADER: Final = "Janus-Capability"
#: A bundle is a few links of ~700 bytes: anything larger is not one (and would be
#: refused by the HTTP server's header limit before long anyway).
MAX_CAPABILITY_HEADER: Final = 12 * 1024
SERVICE_RESOURCE: Final = "hsm:service"
INVOCATION_LIFETIME: Final = 60


class AuthError(VerificationError):
    """A request without a valid invocation of an administrator-granted capability."""

    code = "hsm_unauthenticated"


def key_resource(label: str) -> str:
    return f"hsm:keys/{label}"


def action_for(operation: str) -> str:
    return f"hsm/{operation}"


def bound_request(method: str, target: str, body: bytes, audience: str) -> dict[str, str]:
    """What an invocation's digest covers: this request at this service, nothing else."""
    return {
        "method": method.upper(),
        "target": target,
        "body": sha256_b64(body),
        "service": audience,
    }


def encode_bundle(bundle: Bundle) -> str:
    return b64url.encode(bundle.to_json().encode())


def authorization_headers(
    key: KeyHandle,
    bundle: Bundle,
    *,
    audience: str,
    method: str,
    target: str,
    body: bytes,
    resource: str,
    action: str,
    now: int | None = None,
    encoded_bundle: str | None = None,
) -> dict[str, str]:
    """The two headers that authenticate one request (the client side)."""
    compact = invoke(
        key,
        capability_id=bundle.leaf.id,
        action=action,
        resource=resource,
        request=bound_request(method, target, body, audience),
        now=int(time.time()) if now is None else now,
        lifetime=INVOCATION_LIFETIME,
        audience=audience,
    )
    return {
        "authorization": f"{AUTH_SCHEME} {compact}",
        CAPABILITY_HEADER.lower(): encoded_bundle or encode_bundle(bundle),
    }


@dataclass(frozen=True)
class Presented:
    """The credentials a request carried, parsed but not yet checked."""

    invocation: str
    bundle: Bundle


def presented(headers: Mapping[str, str]) -> Presented:
    """The invocation and bundle of a request's headers; malformed ones are refused."""
    authorization = headers.get("authorization")
    capability = headers.get(CAPABILITY_HEADER.lower())
    if not authorization or not capability:
        raise AuthError(
            f"every request must carry 'Authorization: {AUTH_SCHEME} <invocation>' and "
            f"'{CAPABILITY_HEADER}: <bundle>' (docs/hsm-service.md)"
        )
    scheme, _, compact = authorization.partition(" ")
    if scheme != AUTH_SCHEME or not compact.strip():
        raise AuthError(f"the Authorization header must use the {AUTH_SCHEME} scheme")
    if len(capability) > MAX_CAPABILITY_HEADER:
        raise AuthError(f"the {CAPABILITY_HEADER} header is too large to be a bundle")
    # Strict: the lenient standard decoder skips characters outside the alphabet, so
    # many header spellings would carry the same bundle.
    text = b64url.decode(
        capability.strip(), f"the {CAPABILITY_HEADER} header", error=AuthError, allow_padding=True
    )
    try:
        bundle = Bundle.parse(text)
    except FormatError as exc:
        raise AuthError(f"the {CAPABILITY_HEADER} header holds no bundle: {exc}") from None
    return Presented(compact.strip(), bundle)


def check_root(bundle: Bundle, administrators: Collection[str]) -> None:
    """Only capabilities granted by one of the service's administrators admit a client."""
    if bundle.root.issuer not in administrators:
        raise RootMismatchError(
            "the capability is not granted by an administrator of this service", link=0
        )


__all__ = [
    "AUTH_SCHEME",
    "CAPABILITY_HEADER",
    "SERVICE_RESOURCE",
    "AuthError",
    "Presented",
    "action_for",
    "authorization_headers",
    "bound_request",
    "check_root",
    "encode_bundle",
    "key_resource",
    "presented",
]
