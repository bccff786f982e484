"""A private key kept in a software keystore file, decrypted on first use."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import NoReturn

import nacl.bindings
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeyNotFoundError, KeystoreError, MechanismUnsupportedError
from janus_hsm.provider import KeyHandle, KeyProperties, der_to_raw
from janus_hsm.public_keys import PublicKey

from .keyfile import KeyFile, PrivateKey, exchange

BACKEND = "software"

# CKM_ECDSA signs a digest of any length; cryptography wants to know the hash, so pick
# it by length (the digest's bits are what ECDSA uses either way).
_PREHASH_BY_LENGTH: dict[int, hashes.HashAlgorithm] = {
    28: hashes.SHA224(),
    32: hashes.SHA256(),
    48: hashes.SHA384(),
    64: hashes.SHA512(),
}


def software_properties(algorithm: Algorithm) -> KeyProperties:
    """What a software key honestly is: readable by whoever can read its file and secret.

    These flags make :meth:`KeyHandle.check_custody` refuse software keys unless the
    caller said extractable keys are acceptable, which is the point: they are for cloud
    agents, one key per grant, never for roots of identity.
    """
    return KeyProperties(
        algorithm=algorithm,
        sensitive=False,
        extractable=True,
        always_sensitive=False,
        never_extractable=False,
        local=True,
        backend=BACKEND,
    )


class SoftwareKeyHandle(KeyHandle):
    """One ``.jkey`` file's key. Thread-safe.

    The handle keeps the file's contents as read when it was found, and decrypts those
    (never a later version of the file) on first use, so the public key it reported is
    the one that gets authenticated.  Until then :meth:`public_key` is what the file
    claims; :meth:`unlock` authenticates it early.
    """

    def __init__(
        self,
        key_file: KeyFile,
        *,
        uri: str,
        path: Path,
        opener: Callable[[KeyFile, str], PrivateKey],
        allow_extractable: bool,
    ) -> None:
        self._key_file = key_file
        self._uri = uri
        self._path = path
        self._opener = opener
        self._properties = software_properties(key_file.algorithm)
        self.allow_extractable = allow_extractable
        self._lock = threading.Lock()
        self._private: PrivateKey | None = None
        # An Ed25519 key also as libsodium's secret key (seed + public key), made on
        # first signature: libsodium signs ~1.6x faster than OpenSSL through
        # cryptography (docs/performance.md), and Ed25519 signatures are deterministic,
        # so the bytes are the same.  Held and dropped exactly like _private.
        self._sodium: bytes | None = None
        self._gone: str | None = None

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def properties(self) -> KeyProperties:
        return self._properties

    @property
    def name(self) -> str:
        return self._key_file.name

    @property
    def path(self) -> Path:
        """The key file (useful to operators; the file is encrypted)."""
        return self._path

    @property
    def created(self) -> datetime:
        return self._key_file.created

    @property
    def protection(self) -> str:
        """How the file is protected: ``passphrase`` or ``ecdh-es`` (a wrapping key)."""
        return self._key_file.mode

    @property
    def wrapping_key_uri(self) -> str | None:
        return self._key_file.wrapping_key_uri

    @property
    def unlocked(self) -> bool:
        return self._private is not None

    def public_key(self) -> PublicKey:
        return self._key_file.public_key

    def unlock(self) -> None:
        """Decrypt now rather than on first use: checks the passphrase or wrapping key
        and authenticates the whole file, so a cloud agent can fail at start-up."""
        self._key()

    def _key(self) -> PrivateKey:
        with self._lock:
            if self._gone is not None:
                self._refuse()
            if self._private is None:
                self._private = self._opener(self._key_file, self._uri)
            return self._private

    def _forget(self, reason: str) -> None:
        """Drop the decrypted key (Python cannot wipe it; dropping is what is possible)."""
        with self._lock:
            self._private = None
            self._sodium = None
            self._gone = reason

    def _refuse(self) -> NoReturn:
        if self._gone == "deleted":
            raise KeyNotFoundError(f"{self._uri} was deleted")
        raise KeystoreError(
            f"the keystore provider of {self._uri} was closed; open the keystore again"
        )

    def _sign_ecdsa_digest(self, digest: bytes) -> bytes:
        key = self._key()
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise MechanismUnsupportedError(f"{self._uri} is not an ECDSA key")
        prehash = _PREHASH_BY_LENGTH.get(len(digest))
        if prehash is None:
            raise MechanismUnsupportedError(
                f"cannot sign a {len(digest)}-byte digest; give a SHA-2 digest "
                "(28, 32, 48 or 64 bytes)"
            )
        der = key.sign(digest, ec.ECDSA(Prehashed(prehash)))
        return der_to_raw(der, self.algorithm.coordinate_size)

    def _sign_eddsa(self, data: bytes) -> bytes:
        key = self._key()  # refuses a deleted key, or one whose keystore was closed
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise MechanismUnsupportedError(f"{self._uri} is not an Ed25519 key")
        sodium = self._sodium
        if sodium is None:
            _, sodium = nacl.bindings.crypto_sign_seed_keypair(key.private_bytes_raw())
            with self._lock:
                if self._gone is None:  # not forgotten meanwhile
                    self._sodium = sodium
        signed: bytes = nacl.bindings.crypto_sign(data, sodium)
        return signed[: nacl.bindings.crypto_sign_BYTES]

    def _exchange(self, peer_public_key: PublicKey) -> bytes:
        key = self._key()
        if isinstance(key, ed25519.Ed25519PrivateKey):
            raise MechanismUnsupportedError(f"{self._uri} is an Ed25519 key; it cannot do ECDH")
        return exchange(key, peer_public_key)

    def __reduce__(self) -> NoReturn:
        # Pickling would write the decrypted key wherever the pickle goes.
        raise TypeError("software key handles cannot be pickled or copied")
