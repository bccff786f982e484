"""The algorithms Janus keys can have, named as JOSE names them.

Keeping one small enum here (rather than passing curve objects around) means the URI,
the CLI, JWKs and the backends all agree on the same four spellings.
"""

from __future__ import annotations

import enum

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec


class Algorithm(enum.StrEnum):
    """A key's algorithm. The value is the JOSE ``alg`` (or, for X25519, the curve)."""

    ES256 = "ES256"
    ES384 = "ES384"
    EdDSA = "EdDSA"
    X25519 = "X25519"

    @classmethod
    def parse(cls, name: str) -> Algorithm:
        """Accept the JOSE spelling, case-insensitively, plus the obvious curve names."""
        aliases = {
            "es256": cls.ES256,
            "p-256": cls.ES256,
            "p256": cls.ES256,
            "secp256r1": cls.ES256,
            "es384": cls.ES384,
            "p-384": cls.ES384,
            "p384": cls.ES384,
            "secp384r1": cls.ES384,
            "eddsa": cls.EdDSA,
            "ed25519": cls.EdDSA,
            "x25519": cls.X25519,
        }
        try:
            return aliases[name.strip().lower()]
        except KeyError:
            choices = ", ".join(a.value for a in cls)
            raise ValueError(f"unknown algorithm {name!r}; choose one of {choices}") from None

    @property
    def can_sign(self) -> bool:
        return self is not Algorithm.X25519

    @property
    def can_exchange(self) -> bool:
        """Whether the key can do raw ECDH (Ed25519 keys cannot; use an X25519 key)."""
        return self is not Algorithm.EdDSA

    @property
    def curve(self) -> ec.EllipticCurve | None:
        """The Weierstrass curve for ECDSA keys, None for the Edwards/Montgomery ones."""
        return _CURVES.get(self)

    @property
    def jwk_crv(self) -> str:
        return {
            Algorithm.ES256: "P-256",
            Algorithm.ES384: "P-384",
            Algorithm.EdDSA: "Ed25519",
            Algorithm.X25519: "X25519",
        }[self]

    @property
    def hash_algorithm(self) -> hashes.HashAlgorithm | None:
        """The hash ECDSA signs over (per RFC 7518); None when the scheme hashes itself."""
        if self is Algorithm.ES256:
            return hashes.SHA256()
        if self is Algorithm.ES384:
            return hashes.SHA384()
        return None

    @property
    def coordinate_size(self) -> int:
        """Bytes per coordinate / per signature half (r, s) / raw ECDH output."""
        return {
            Algorithm.ES256: 32,
            Algorithm.ES384: 48,
            Algorithm.EdDSA: 32,
            Algorithm.X25519: 32,
        }[self]


# The order n of each ECDSA curve's base point (SEC 2 / FIPS 186-4 D.1.2).
_ORDERS: dict[Algorithm, int] = {
    Algorithm.ES256: 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
    Algorithm.ES384: int(
        "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77A"
        "ECEC196ACCC52973",
        16,
    ),
}


def low_s(raw: bytes, algorithm: Algorithm) -> bytes:
    """An ECDSA signature (raw r||s) in its low-S form: s <= n/2.

    (r, s) and (r, n - s) both verify, so anyone can turn one valid signature into
    another.  Janus names signed objects by a hash of their text (a capability's id
    is what the ledger counts and revokes), so every signature it makes is put in the
    one form, and its verifiers accept only that form (``is_low_s``), as Bitcoin does
    for the same reason (BIP 62/146).  Signatures from devices, which give either form,
    pass through here.
    """
    order = _ORDERS[algorithm]
    size = algorithm.coordinate_size
    s = int.from_bytes(raw[size:], "big")
    if s <= order // 2:
        return raw
    return raw[:size] + (order - s).to_bytes(size, "big")


def is_low_s(raw: bytes, algorithm: Algorithm) -> bool:
    """Whether a raw ECDSA signature is in the form ``low_s`` gives."""
    size = algorithm.coordinate_size
    return int.from_bytes(raw[size:], "big") <= _ORDERS[algorithm] // 2


# Curve objects are immutable; building them once keeps them off the signing path.
_CURVES: dict[Algorithm, ec.EllipticCurve] = {
    Algorithm.ES256: ec.SECP256R1(),
    Algorithm.ES384: ec.SECP384R1(),
}
