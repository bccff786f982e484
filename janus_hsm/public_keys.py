"""Public keys in the formats other software expects: JWK (RFC 7517/7518/8037) and did:key.

These are written here rather than taken from a JOSE library because they are a few
lines each, have test vectors, and Janus needs them in the custody layer, which should
not depend on a JOSE stack.  Both directions validate strictly: a JWK or did:key comes
from outside and is refused with a :class:`PublicKeyFormatError` when anything is off.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import base58
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from janus_hsm import b64url
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import JanusHSMError
from janus_hsm.strictjson import canonical_json

PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | x25519.X25519PublicKey

# Multicodec prefixes (unsigned varints) of the did:key method, per the multicodec table.
_MULTICODEC: dict[Algorithm, bytes] = {
    Algorithm.EdDSA: b"\xed\x01",
    Algorithm.X25519: b"\xec\x01",
    Algorithm.ES256: b"\x80\x24",
    Algorithm.ES384: b"\x81\x24",
}


class PublicKeyFormatError(JanusHSMError, ValueError):
    """A JWK or did:key is malformed or names a key type Janus does not support."""

    code = "bad_public_key"


b64url_encode = b64url.encode


def b64url_decode(text: str) -> bytes:
    """Strict, canonical base64url without padding, as JOSE uses it (janus_hsm.b64url)."""
    return b64url.decode(text, "the value", error=PublicKeyFormatError)


def algorithm_of(public_key: PublicKey) -> Algorithm:
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return Algorithm.EdDSA
    if isinstance(public_key, x25519.X25519PublicKey):
        return Algorithm.X25519
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if isinstance(public_key.curve, ec.SECP256R1):
            return Algorithm.ES256
        if isinstance(public_key.curve, ec.SECP384R1):
            return Algorithm.ES384
        raise PublicKeyFormatError(f"unsupported curve {public_key.curve.name}")
    raise PublicKeyFormatError(f"unsupported public key type {type(public_key).__name__}")


def raw_public_bytes(public_key: PublicKey) -> bytes:
    """The key as PKCS#11 and ECDH want it: SEC1 uncompressed point, or the raw 32 bytes."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_from_raw(alg: Algorithm, data: bytes) -> PublicKey:
    try:
        if alg is Algorithm.EdDSA:
            return ed25519.Ed25519PublicKey.from_public_bytes(data)
        if alg is Algorithm.X25519:
            return x25519.X25519PublicKey.from_public_bytes(data)
        curve = alg.curve
        assert curve is not None
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, data)
    except ValueError as exc:
        raise PublicKeyFormatError(f"invalid {alg.jwk_crv} public key: {exc}") from None


def to_jwk(public_key: PublicKey) -> dict[str, str]:
    alg = algorithm_of(public_key)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        numbers = public_key.public_numbers()
        size = alg.coordinate_size
        return {
            "kty": "EC",
            "crv": alg.jwk_crv,
            "x": b64url_encode(numbers.x.to_bytes(size, "big")),
            "y": b64url_encode(numbers.y.to_bytes(size, "big")),
        }
    return {"kty": "OKP", "crv": alg.jwk_crv, "x": b64url_encode(raw_public_bytes(public_key))}


def from_jwk(jwk: dict[str, Any] | str) -> PublicKey:
    """Parse a public JWK; refuse private members, so secrets are never accepted by mistake."""
    if isinstance(jwk, str):
        try:
            jwk = json.loads(jwk)
        except json.JSONDecodeError as exc:
            raise PublicKeyFormatError(f"JWK is not JSON: {exc.msg}") from None
    if not isinstance(jwk, dict):
        raise PublicKeyFormatError("JWK must be a JSON object")
    if "d" in jwk:
        raise PublicKeyFormatError("JWK contains a private key ('d'); give the public key only")
    kty, crv = jwk.get("kty"), jwk.get("crv")
    by_crv = {a.jwk_crv: a for a in Algorithm}
    if not isinstance(crv, str) or crv not in by_crv:
        raise PublicKeyFormatError(f"unsupported JWK crv {crv!r}")
    alg = by_crv[crv]
    expected_kty = "EC" if alg.curve is not None else "OKP"
    if kty != expected_kty:
        raise PublicKeyFormatError(f"JWK kty {kty!r} does not match crv {crv!r}")
    x = b64url_decode(_member(jwk, "x"))
    if alg.curve is None:
        if len(x) != 32:
            raise PublicKeyFormatError(f"{crv} 'x' must be 32 bytes, got {len(x)}")
        return public_key_from_raw(alg, x)
    y = b64url_decode(_member(jwk, "y"))
    size = alg.coordinate_size
    if len(x) != size or len(y) != size:
        raise PublicKeyFormatError(f"{crv} coordinates must be {size} bytes each")
    return public_key_from_raw(alg, b"\x04" + x + y)


def _member(jwk: dict[str, Any], name: str) -> str:
    value = jwk.get(name)
    if not isinstance(value, str):
        raise PublicKeyFormatError(f"JWK member {name!r} is missing or not a string")
    return value


def jwk_thumbprint(public_key: PublicKey) -> str:
    """RFC 7638 thumbprint (SHA-256, base64url): a stable key id that needs no registry."""
    jwk = to_jwk(public_key)
    required = ("crv", "kty", "x", "y") if jwk["kty"] == "EC" else ("crv", "kty", "x")
    canonical = canonical_json({k: jwk[k] for k in required}, ascii_only=True)
    return b64url_encode(hashlib.sha256(canonical).digest())


def to_did_key(public_key: PublicKey) -> str:
    """did:key (W3C CCG did:key v0.7): multicodec prefix + key, base58btc, 'z' multibase."""
    alg = algorithm_of(public_key)
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        body = public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
        )
    else:
        body = raw_public_bytes(public_key)
    return "did:key:z" + base58.b58encode(_MULTICODEC[alg] + body).decode("ascii")


def from_did_key(did: str) -> PublicKey:
    """Parse a did:key (a DID URL fragment, if present, must repeat the key).

    Cached: verifiers decode the same few issuer keys on every request, and base58 plus
    point decompression cost more than a signature check.  Public keys are immutable.
    """
    if not isinstance(did, str):
        raise PublicKeyFormatError("a did:key must be a string")
    return _from_did_key(did)


@functools.lru_cache(maxsize=4096)
def _from_did_key(did: str) -> PublicKey:
    if not did.startswith("did:key:z"):
        raise PublicKeyFormatError(f"not a base58btc did:key: {did[:40]!r}")
    ident, _, fragment = did[len("did:key:") :].partition("#")
    if fragment and fragment != ident:
        raise PublicKeyFormatError("did:key fragment does not match the key")
    if len(ident) > 200:
        raise PublicKeyFormatError("did:key too long")
    try:
        decoded = base58.b58decode(ident[1:])
    except ValueError as exc:
        raise PublicKeyFormatError(f"did:key is not base58btc: {exc}") from None
    for alg, prefix in _MULTICODEC.items():
        if decoded.startswith(prefix):
            body = decoded[len(prefix) :]
            if alg.curve is None:
                if len(body) != 32:
                    raise PublicKeyFormatError("did:key: wrong key length")
                return public_key_from_raw(alg, body)
            if len(body) != alg.coordinate_size + 1 or body[0] not in (2, 3):
                raise PublicKeyFormatError("did:key: expected a compressed EC point")
            return public_key_from_raw(alg, body)
    raise PublicKeyFormatError("did:key names an unsupported key type")


def to_pem(public_key: PublicKey) -> str:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
