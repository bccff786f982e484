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


# Curve objects are immutable; building them once keeps them off the signing path.
_CURVES: dict[Algorithm, ec.EllipticCurve] = {
    Algorithm.ES256: ec.SECP256R1(),
    Algorithm.ES384: ec.SECP384R1(),
}
