"""A principal's identity: the did:key of its hardware root key, and its DID document.

The root key signs (capabilities, revocations, pickups); key agreement uses the root
key itself when it is P-256 (ECDH inside the token) or a separate X25519 key on the
same device.  The DID document is derived, never stored: did:key needs no registry.
"""

from __future__ import annotations

from typing import Any

from janus_hsm.provider import KeyHandle


def did_url(key: KeyHandle) -> str:
    did = key.did
    return f"{did}#{did.removeprefix('did:key:')}"


def did_document(root: KeyHandle, agreement: KeyHandle | None = None) -> dict[str, Any]:
    did = root.did
    methods = [
        {
            "id": did_url(root),
            "type": "JsonWebKey2020",
            "controller": did,
            "publicKeyJwk": root.jwk(),
        },
    ]
    agreement_ids = []
    if agreement is not None and agreement.did != did:
        methods.append(
            {
                "id": did_url(agreement),
                "type": "JsonWebKey2020",
                "controller": did,
                "publicKeyJwk": agreement.jwk(),
            }
        )
        agreement_ids.append(did_url(agreement))
    elif root.algorithm.can_exchange:
        agreement_ids.append(did_url(root))
    return {
        "@context": [
            "https://www.w3.org/ns/did/v1",
            "https://w3id.org/security/suites/jws-2020/v1",
        ],
        "id": did,
        "verificationMethod": methods,
        "authentication": [did_url(root)],
        "assertionMethod": [did_url(root)],
        "keyAgreement": agreement_ids,
    }
