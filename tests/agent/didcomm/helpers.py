"""Test helpers: the spec vectors' private keys as objects that do ECDH and sign.

The vectors' secrets include P-521 and secp256k1 keys, which no Janus backend holds, so
they are wrapped in a small class that has exactly the two methods DIDComm asks of a
key (``exchange`` and ``sign``), like a KeyHandle.  Janus's own keys (SoftHSM,
software keystore) are tested through real KeyHandles elsewhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.didcomm import NamedKey
from agent.didcomm._encoding import b64d
from agent.didcomm.keys import EC_CURVES, PublicKey

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey


class StaticKey:
    """A software private key with KeyHandle's ``public_key``/``exchange``/``sign``."""

    def __init__(self, private: PrivateKey) -> None:
        self.private = private
        self.exchanges = 0

    def public_key(self) -> PublicKey:
        return self.private.public_key()

    def exchange(self, peer_public_key: PublicKey) -> bytes:
        self.exchanges += 1
        if isinstance(self.private, x25519.X25519PrivateKey):
            assert isinstance(peer_public_key, x25519.X25519PublicKey)
            return self.private.exchange(peer_public_key)
        assert isinstance(self.private, ec.EllipticCurvePrivateKey)
        assert isinstance(peer_public_key, ec.EllipticCurvePublicKey)
        return self.private.exchange(ec.ECDH(), peer_public_key)

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.private, ed25519.Ed25519PrivateKey):
            return self.private.sign(data)
        assert isinstance(self.private, ec.EllipticCurvePrivateKey)
        size = (self.private.curve.key_size + 7) // 8
        algorithm = hashes.SHA384() if size == 48 else hashes.SHA256()
        r, s = decode_dss_signature(self.private.sign(data, ec.ECDSA(algorithm)))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def private_from_jwk(jwk: Mapping[str, Any]) -> PrivateKey:
    d = b64d(jwk["d"], "d")
    crv = jwk["crv"]
    if crv == "X25519":
        return x25519.X25519PrivateKey.from_private_bytes(d)
    if crv == "Ed25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(d)
    curve = EC_CURVES[crv][0]
    return ec.derive_private_key(int.from_bytes(d, "big"), curve)


def kid_of(jwk: Mapping[str, Any]) -> str:
    # The spec's recipient secrets spell the member "kid " (see spec_vectors.py).
    kid = jwk.get("kid", jwk.get("kid "))
    assert isinstance(kid, str)
    return kid


def named_keys(secrets: Iterable[Mapping[str, Any]]) -> list[NamedKey]:
    return [NamedKey(kid_of(jwk), StaticKey(private_from_jwk(jwk))) for jwk in secrets]


def doc_jwks(doc: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every verification method of a DID document as a JWK carrying its id as kid."""
    out = []
    for relation in ("authentication", "keyAgreement", "verificationMethod"):
        for method in doc.get(relation, []):
            out.append({**method["publicKeyJwk"], "kid": method["id"]})
    return out
