"""The key-provider abstraction: the only way the rest of Janus touches a private key.

A :class:`KeyProvider` is one place keys live (a PKCS#11 token, a PIV card, a software
keystore).  A :class:`KeyHandle` is one private key *that stays where it is*: it can
sign and do ECDH, tell you its public key and properties, and nothing else.  There is
deliberately no method that returns private key material.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from janus_hsm.algorithms import Algorithm, low_s
from janus_hsm.errors import ExtractableKeyError, MechanismUnsupportedError
from janus_hsm.public_keys import (
    PublicKey,
    algorithm_of,
    jwk_thumbprint,
    to_did_key,
    to_jwk,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ed25519


class SignatureFormat(enum.StrEnum):
    """RAW is JOSE's r||s for ECDSA (and the only form of Ed25519); DER is X.509's."""

    RAW = "raw"
    DER = "der"


@dataclass(frozen=True)
class KeyProperties:
    """What the backend says about a private key, in PKCS#11's vocabulary.

    For PKCS#11 these are the token's CKA_* attributes; other backends map their own
    facts onto the same names so that policy can be written once.
    """

    algorithm: Algorithm
    sensitive: bool
    extractable: bool
    always_sensitive: bool
    never_extractable: bool
    local: bool
    backend: str
    pin_policy: str | None = None
    touch_policy: str | None = None

    @property
    def custody_grade(self) -> bool:
        """True when the key was born in its device and could never be read out of it."""
        return (
            self.sensitive
            and not self.extractable
            and self.always_sensitive
            and self.never_extractable
            and self.local
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["algorithm"] = self.algorithm.value
        return data


@dataclass(frozen=True)
class Attestation:
    """Evidence, checkable by a third party, that a key was generated on a device."""

    format: str
    certificates: list[x509.Certificate]
    generated_on_device: bool
    details: dict[str, Any] = field(default_factory=dict)


class KeyHandle(abc.ABC):
    """One private key inside a backend. Thread-safe; cheap to keep around."""

    #: Whether the caller said an extractable key is acceptable (see check_custody).
    allow_extractable: bool = False

    @property
    @abc.abstractmethod
    def uri(self) -> str:
        """The URI that names this key (without secrets: never a PIN)."""

    @property
    @abc.abstractmethod
    def properties(self) -> KeyProperties: ...

    @property
    def algorithm(self) -> Algorithm:
        return self.properties.algorithm

    @abc.abstractmethod
    def public_key(self) -> PublicKey: ...

    def jwk(self) -> dict[str, str]:
        """The public key as a JWK, with its RFC 7638 thumbprint as ``kid``."""
        public = self.public_key()
        jwk = to_jwk(public)
        jwk["kid"] = jwk_thumbprint(public)
        return jwk

    @property
    def did(self) -> str:
        # A handle's public key never changes, and encoding it (base58) costs more than
        # an Ed25519 signature: services that name their key on every request cache it.
        cached: str | None = self.__dict__.get("_did")
        if cached is None:
            cached = self.__dict__["_did"] = to_did_key(self.public_key())
        return cached

    def sign(self, data: bytes, *, format: SignatureFormat = SignatureFormat.RAW) -> bytes:
        """Sign ``data`` as JOSE does: ECDSA over SHA-256/384 of it, Ed25519 over the bytes."""
        alg = self.algorithm
        if not alg.can_sign:
            raise MechanismUnsupportedError(
                f"{alg.value} keys are for key agreement only and cannot sign; "
                "use an ES256, ES384 or EdDSA key"
            )
        self.check_custody()
        if alg is Algorithm.EdDSA:
            if format is SignatureFormat.DER:
                raise MechanismUnsupportedError("Ed25519 signatures have no DER form; use raw")
            return self._sign_eddsa(data)
        hash_alg = alg.hash_algorithm
        assert hash_alg is not None
        from cryptography.hazmat.primitives import hashes

        digest = hashes.Hash(hash_alg)
        digest.update(data)
        return self.sign_digest(digest.finalize(), format=format)

    def sign_digest(self, digest: bytes, *, format: SignatureFormat = SignatureFormat.RAW) -> bytes:
        """ECDSA over a digest the caller computed (for pre-hashed data and X.509 builders)."""
        if self.algorithm.curve is None:
            raise MechanismUnsupportedError(
                f"{self.algorithm.value} keys sign messages, not digests"
            )
        self.check_custody()
        raw = low_s(self._sign_ecdsa_digest(digest), self.algorithm)
        if format is SignatureFormat.DER:
            return raw_to_der(raw, self.algorithm.coordinate_size)
        return raw

    def exchange(self, peer_public_key: PublicKey) -> bytes:
        """Raw ECDH shared secret Z with a peer's public key (no KDF applied)."""
        alg = self.algorithm
        if not alg.can_exchange:
            raise MechanismUnsupportedError(
                "Ed25519 keys cannot do key agreement; generate an X25519 key for that"
            )
        peer_alg = algorithm_of(peer_public_key)
        if peer_alg is not alg:
            raise MechanismUnsupportedError(
                f"peer key is {peer_alg.jwk_crv} but this key is {alg.jwk_crv}"
            )
        self.check_custody()
        return self._exchange(peer_public_key)

    def attest(self) -> Attestation:
        from janus_hsm.errors import AttestationUnavailableError

        raise AttestationUnavailableError(
            f"the {self.properties.backend} backend offers no attestation for {self.uri}"
        )

    def check_custody(self) -> None:
        """Refuse to use a key that is or was extractable, unless the caller allowed it."""
        props = self.properties
        if props.custody_grade or self.allow_extractable:
            return
        reasons = []
        if props.extractable:
            reasons.append("EXTRACTABLE is true")
        if not props.sensitive:
            reasons.append("SENSITIVE is false")
        if not props.never_extractable:
            reasons.append("it was extractable at some point (NEVER_EXTRACTABLE is false)")
        if not props.always_sensitive:
            reasons.append("it was not always sensitive (ALWAYS_SENSITIVE is false)")
        if not props.local:
            reasons.append("it was not generated on the device (LOCAL is false)")
        raise ExtractableKeyError(
            f"refusing to use {self.uri}: its private key could have been copied out "
            f"({'; '.join(reasons)}). Generate a new key inside the device, or pass "
            "--allow-extractable (allow_extractable=True) if you accept that risk"
        )

    def as_cryptography_key(self) -> ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey:
        """This key as a ``cryptography`` private key object, e.g. for X.509 builders."""
        from janus_hsm.cryptography_keys import as_private_key

        return as_private_key(self)

    # Backend hooks. Only those the algorithm needs are called.
    def _sign_ecdsa_digest(self, digest: bytes) -> bytes:
        raise MechanismUnsupportedError(f"{type(self).__name__} cannot do ECDSA")

    def _sign_eddsa(self, data: bytes) -> bytes:
        raise MechanismUnsupportedError(f"{type(self).__name__} cannot do EdDSA")

    def _exchange(self, peer_public_key: PublicKey) -> bytes:
        raise MechanismUnsupportedError(f"{type(self).__name__} cannot do ECDH")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"


class KeyProvider(abc.ABC):
    """One key store: a PKCS#11 token, a PIV card, a software keystore directory."""

    @abc.abstractmethod
    def generate(self, uri: str, algorithm: Algorithm) -> KeyHandle:
        """Create a new key named by ``uri`` inside the store; refuse duplicate names."""

    def find(self, uri: str) -> KeyHandle:
        """The one key ``uri`` names, refused if it is not fit for custody (see check_custody).

        Raises KeyNotFoundError / AmbiguousKeyError when the URI names no key or several.
        """
        handle = self.lookup(uri)
        handle.check_custody()
        return handle

    @abc.abstractmethod
    def lookup(self, uri: str) -> KeyHandle:
        """Like find, without the custody check: for showing, listing and deleting keys.

        The handle still refuses to sign or exchange with an unfit key.
        """

    @abc.abstractmethod
    def list_keys(self) -> Sequence[KeyHandle]:
        """Every private key in the store, extractable ones included (flagged in properties)."""

    @abc.abstractmethod
    def delete(self, uri: str) -> None:
        """Destroy the key ``uri`` names (private and public halves)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release sessions and handles; the provider must not be used afterwards."""

    def __enter__(self) -> KeyProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def raw_to_der(raw: bytes, size: int) -> bytes:
    if len(raw) != 2 * size:
        raise ValueError(f"raw ECDSA signature must be {2 * size} bytes, got {len(raw)}")
    return encode_dss_signature(
        int.from_bytes(raw[:size], "big"), int.from_bytes(raw[size:], "big")
    )


def der_to_raw(der: bytes, size: int) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")
