"""DIDComm signed messages: JWS JSON serialization (RFC 7515 7.2), general or flattened.

Signing goes through the key's own ``sign`` (a KeyHandle signs inside its token), so a
JOSE library that wants the private key cannot be used; verification is narrow on
purpose: the algorithms DIDComm names (EdDSA, ES256, ES256K) plus ES384 for P-384
identity keys, each bound to its key type, no ``crit`` extensions, no unencoded
payloads, one signature, strict base64url and JSON.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from agent.didcomm._encoding import b64d, b64e, dumps, load_object
from agent.didcomm.errors import (
    ConsistencyError,
    MalformedEnvelopeError,
    PackError,
    SignatureError,
    UnsupportedAlgorithmError,
)
from agent.didcomm.keys import (
    PublicKey,
    SenderResolver,
    authentication_kid,
    crv_of,
    did_key_of,
    did_of,
    is_did_url,
    resolve_sender,
)
from agent.didcomm.message import SIGNED_TYP, Message, media_type_is

#: JWS alg by the signer's curve; the same table binds alg to key type on verify.
ALG_BY_CRV = {"Ed25519": "EdDSA", "P-256": "ES256", "P-384": "ES384", "secp256k1": "ES256K"}
CRV_BY_ALG = {alg: crv for crv, alg in ALG_BY_CRV.items()}
_HASH = {"ES256": hashes.SHA256(), "ES384": hashes.SHA384(), "ES256K": hashes.SHA256()}
_SIZE = {"ES256": 32, "ES384": 48, "ES256K": 32}

_GENERAL_MEMBERS = frozenset({"payload", "signatures"})
_FLATTENED_MEMBERS = frozenset({"payload", "protected", "header", "signature"})
_SIGNATURE_MEMBERS = frozenset({"protected", "header", "signature"})


class Signer(Protocol):
    """What signing needs: a public key and ``sign`` returning JOSE's signature bytes.

    :class:`janus_hsm.provider.KeyHandle` is one (ECDSA comes back as raw r||s).
    """

    def public_key(self) -> PublicKey: ...

    def sign(self, data: bytes) -> bytes: ...


def is_jws(obj: Mapping[str, Any]) -> bool:
    return "payload" in obj and ("signatures" in obj or "signature" in obj)


def sign(
    message: Message, signer: Signer, *, kid: str | None = None, flattened: bool = False
) -> str:
    """A DIDComm signed message (``typ`` application/didcomm-signed+json) over ``message``.

    ``kid`` defaults to the signer's did:key DID URL; the message's ``from`` must be
    that DID, because a recipient refuses a signature by anyone other than the sender.
    """
    public = signer.public_key()
    crv = crv_of(public)
    alg = ALG_BY_CRV.get(crv)
    if alg is None:
        raise PackError(f"{crv} keys cannot sign DIDComm messages; use Ed25519 or P-256")
    if kid is None:
        kid = authentication_kid(did_key_of(public))
    elif not is_did_url(kid):
        raise PackError(f"signer kid {kid[:80]!r} is not a DID URL (did:…#…)")
    if message.from_ != did_of(kid):
        raise PackError(
            f"the message 'from' ({message.from_}) must be the signer's DID ({did_of(kid)})"
        )
    protected = b64e(dumps({"typ": SIGNED_TYP, "alg": alg}).encode())
    payload = b64e(message.to_json().encode())
    signature = b64e(signer.sign(f"{protected}.{payload}".encode("ascii")))
    entry = {"protected": protected, "signature": signature, "header": {"kid": kid}}
    if flattened:
        return dumps({"payload": payload, **entry})
    return dumps({"payload": payload, "signatures": [entry]})


@dataclass(frozen=True)
class Verified:
    payload: bytes
    kid: str
    alg: str
    jws: dict[str, Any]


def verify(obj: Mapping[str, Any], resolver: SenderResolver | None) -> Verified:
    """Check a JWS JSON object; return its payload only when the signature verifies."""
    if "signatures" in obj:
        if set(obj) - _GENERAL_MEMBERS:
            raise MalformedEnvelopeError(
                f"unexpected JWS members {sorted(set(obj) - _GENERAL_MEMBERS)}"
            )
        signatures = obj["signatures"]
        if not isinstance(signatures, list) or len(signatures) != 1:
            raise MalformedEnvelopeError("a DIDComm signed message carries exactly one signature")
        entry = signatures[0]
        if not isinstance(entry, dict):
            raise MalformedEnvelopeError("JWS signature entries must be objects")
        if set(entry) - _SIGNATURE_MEMBERS:
            raise MalformedEnvelopeError("unexpected members in a JWS signature entry")
    else:
        if set(obj) - _FLATTENED_MEMBERS:
            raise MalformedEnvelopeError(
                f"unexpected JWS members {sorted(set(obj) - _FLATTENED_MEMBERS)}"
            )
        entry = obj
    if "protected" not in entry:
        raise MalformedEnvelopeError("the JWS has no protected header")
    protected_b64 = entry["protected"]
    payload_b64 = obj["payload"]
    protected = load_object(b64d(protected_b64, "JWS protected header"), "JWS protected header")
    unprotected = entry.get("header", {})
    if not isinstance(unprotected, dict):
        raise MalformedEnvelopeError("JWS 'header' must be an object")
    if set(protected) & set(unprotected):
        raise MalformedEnvelopeError("JWS protected and unprotected headers must be disjoint")
    header = {**unprotected, **protected}
    if "crit" in header or "b64" in header:
        raise UnsupportedAlgorithmError("JWS 'crit' and 'b64' extensions are not supported")
    if "typ" in protected and not media_type_is(protected["typ"], SIGNED_TYP):
        raise MalformedEnvelopeError(f"JWS 'typ' must be {SIGNED_TYP}")
    alg = protected.get("alg")
    if not isinstance(alg, str) or alg not in CRV_BY_ALG:  # (a dict is unhashable)
        raise UnsupportedAlgorithmError(
            f"JWS alg {alg!r} is not accepted (EdDSA, ES256, ES256K, ES384)"
        )
    kid = header.get("kid")
    if not is_did_url(kid):
        raise MalformedEnvelopeError("the JWS 'kid' must be a DID URL (did:…#…)")
    assert isinstance(kid, str) and isinstance(alg, str)
    signature = b64d(entry.get("signature"), "JWS signature")
    payload = b64d(payload_b64, "JWS payload")

    public = resolve_sender(kid, resolver)
    crv = crv_of(public)
    if CRV_BY_ALG[alg] != crv:
        raise ConsistencyError(f"JWS alg {alg} does not match the {crv} key {kid} names")
    signing_input = f"{protected_b64}.{payload_b64}".encode("ascii")
    try:
        if isinstance(public, ed25519.Ed25519PublicKey):
            public.verify(signature, signing_input)
        else:
            assert isinstance(public, ec.EllipticCurvePublicKey)
            size = _SIZE[alg]
            if len(signature) != 2 * size:
                raise SignatureError(f"{alg} signatures are {2 * size} bytes, got {len(signature)}")
            der = encode_dss_signature(
                int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big")
            )
            public.verify(der, signing_input, ec.ECDSA(_HASH[alg]))
    except InvalidSignature:
        raise SignatureError(f"the signature by {kid} does not verify") from None
    return Verified(payload=payload, kid=kid, alg=alg, jws=dict(obj))
