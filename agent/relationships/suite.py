"""The cipher suites of relationships, and the few key operations each needs.

A suite fixes the curve of every Diffie-Hellman in a relationship: the owner's agreement
key on the token decides it (X25519, or P-256 on a card without X25519), and every
prekey, ephemeral and ratchet key of that relationship uses the same curve.  ML-KEM-768,
AES-256-GCM and SHA-256 are common to both.  The suite's one-byte id is the same for
every Janus user, so naming it in every message links nothing.

Software keys are ``cryptography`` objects; public keys travel in a fixed-length encoding
per suite (32 bytes raw for X25519, 33 bytes SEC1-compressed for P-256) so that every
header of a suite has one size.
"""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519

from agent.relationships.errors import (
    BadPublicKeyError,
    MalformedMessageError,
    UnsupportedSuiteError,
)
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import PublicKey, PublicKeyFormatError, algorithm_of, from_jwk


class Suite(enum.StrEnum):
    X25519 = "JANUS-PQXDH-X25519-MLKEM768-AES256GCM-SHA256"
    P256 = "JANUS-PQXDH-P256-MLKEM768-AES256GCM-SHA256"


SUITE_IDS: dict[Suite, int] = {Suite.X25519: 1, Suite.P256: 2}
SUITES_BY_ID: dict[int, Suite] = {v: k for k, v in SUITE_IDS.items()}

SUITE_ALGORITHMS: dict[Suite, Algorithm] = {
    Suite.X25519: Algorithm.X25519,
    Suite.P256: Algorithm.ES256,
}

PrivateKey = x25519.X25519PrivateKey | ec.EllipticCurvePrivateKey
DHPublicKey = x25519.X25519PublicKey | ec.EllipticCurvePublicKey

PRIVATE_LEN = 32


def suite_for_key(key: KeyHandle | PublicKey) -> Suite:
    """The suite whose DH runs on ``key``'s curve (an agreement key on the token)."""
    alg = key.algorithm if isinstance(key, KeyHandle) else algorithm_of(key)
    for suite, suite_alg in SUITE_ALGORITHMS.items():
        if alg is suite_alg:
            return suite
    raise UnsupportedSuiteError(f"no relationship suite does key agreement with {alg.value} keys")


def suite_from_id(suite_id: int) -> Suite:
    try:
        return SUITES_BY_ID[suite_id]
    except KeyError:
        raise UnsupportedSuiteError(f"unknown relationship suite id {suite_id}") from None


def parse_suite(name: object) -> Suite:
    try:
        return Suite(str(name)) if isinstance(name, str) else Suite("")
    except ValueError:
        raise UnsupportedSuiteError("unknown relationship suite") from None


def public_len(suite: Suite) -> int:
    return 32 if suite is Suite.X25519 else 33


def generate(suite: Suite) -> PrivateKey:
    if suite is Suite.X25519:
        return x25519.X25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def dh(private: PrivateKey, public: DHPublicKey) -> bytes:
    """Raw DH output (the x-coordinate for P-256), as ``KeyHandle.exchange`` returns it.

    ``public`` usually comes from outside (a peer's header, bundle or binding), so every
    way the DH can refuse it is one typed error: a key of the other curve, a small-order
    X25519 point (all-zero output, which ``cryptography`` refuses with a bare
    ValueError, and which would make the secret predictable), a P-256 point the library
    will not use.  Decoders refuse points off the curve before this.
    """
    try:
        if isinstance(private, x25519.X25519PrivateKey):
            if not isinstance(public, x25519.X25519PublicKey):
                raise BadPublicKeyError("a public key is not on the curve of the suite")
            out = private.exchange(public)
        else:
            if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
                public.curve, type(private.curve)
            ):
                raise BadPublicKeyError("a public key is not on the curve of the suite")
            out = private.exchange(ec.ECDH(), public)
    except ValueError:
        raise BadPublicKeyError(
            "a public key is a small-order or invalid point: no shared secret with it"
        ) from None
    if not any(out):
        raise BadPublicKeyError("a public key gives an all-zero shared secret")
    return out


def encode_public(public: DHPublicKey) -> bytes:
    if isinstance(public, x25519.X25519PublicKey):
        return public.public_bytes_raw()
    return public.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )


def decode_public(suite: Suite, data: bytes) -> DHPublicKey:
    """A peer's public key from its fixed-length encoding; bad points are refused."""
    if len(data) != public_len(suite):
        raise MalformedMessageError("a public key has the wrong length for its suite")
    try:
        if suite is Suite.X25519:
            return x25519.X25519PublicKey.from_public_bytes(data)
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data)
    except ValueError:
        raise BadPublicKeyError("a public key is not a valid point of its curve") from None


def private_bytes(private: PrivateKey) -> bytes:
    if isinstance(private, x25519.X25519PrivateKey):
        return private.private_bytes_raw()
    return private.private_numbers().private_value.to_bytes(PRIVATE_LEN, "big")


def private_from_bytes(suite: Suite, data: bytes) -> PrivateKey:
    if len(data) != PRIVATE_LEN:
        raise ValueError("a private key has the wrong length")
    if suite is Suite.X25519:
        return x25519.X25519PrivateKey.from_private_bytes(data)
    return ec.derive_private_key(int.from_bytes(data, "big"), ec.SECP256R1())


def public_of(private: PrivateKey) -> DHPublicKey:
    return private.public_key()


def decode_jwk(suite: Suite, jwk: dict[str, str]) -> DHPublicKey:
    """A public key from a (verified) bundle's JWK, on the suite's curve."""
    try:
        return check_public_for(suite, from_jwk(jwk))
    except PublicKeyFormatError:
        raise MalformedMessageError("a prekey is not a valid public key") from None


def decode_pq_public(data: bytes) -> mlkem.MLKEM768PublicKey:
    try:
        return mlkem.MLKEM768PublicKey.from_public_bytes(data)
    except ValueError:
        raise MalformedMessageError("an ML-KEM-768 public key is invalid") from None


def check_public_for(suite: Suite, public: PublicKey) -> DHPublicKey:
    """``public`` (a JWK's key, say) if it is on the suite's curve, else a typed error."""
    if algorithm_of(public) is not SUITE_ALGORITHMS[suite]:
        raise UnsupportedSuiteError("a key is not on the curve of the relationship's suite")
    assert isinstance(public, x25519.X25519PublicKey | ec.EllipticCurvePublicKey)
    return public
