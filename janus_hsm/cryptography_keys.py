"""Hardware keys dressed as ``cryptography`` private keys.

pyca/cryptography's X.509 builders (CSR, certificate, CRL) accept any object that is
an instance of its private-key interfaces and call ``sign`` on it.  These adapters
route that call into the :class:`KeyHandle`, so a certificate can be signed by a key
that never leaves its token.  Every method that would reveal private material raises
:class:`ExportRefusedError` instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NoReturn, Self

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import ExportRefusedError, MechanismUnsupportedError

if TYPE_CHECKING:
    from janus_hsm.provider import KeyHandle


def _refuse_export(handle: KeyHandle) -> NoReturn:
    raise ExportRefusedError(
        f"{handle.uri} lives in {handle.properties.backend} and cannot be exported"
    )


class _HandleKey:
    """What both adapters share: the handle, and no way to the private bytes."""

    _handle: KeyHandle

    @property
    def handle(self) -> KeyHandle:
        return self._handle

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _refuse_export(self._handle)

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self


class HandleECPrivateKey(_HandleKey, ec.EllipticCurvePrivateKey):
    """An ECDSA/ECDH key in a backend, usable with cryptography's builders."""

    def __init__(self, handle: KeyHandle) -> None:
        if handle.algorithm.curve is None:
            raise MechanismUnsupportedError(f"{handle.uri} is not an ECDSA key")
        self._handle = handle

    @property
    def curve(self) -> ec.EllipticCurve:
        curve = self._handle.algorithm.curve
        assert curve is not None
        return curve

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        public = self._handle.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        return public

    def sign(
        self,
        data: bytes,  # type: ignore[override]
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        from janus_hsm.provider import SignatureFormat

        if not isinstance(signature_algorithm, ec.ECDSA):
            raise MechanismUnsupportedError("only ECDSA signatures are supported")
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed):
            digest = bytes(data)
        else:
            hasher = hashes.Hash(algorithm)
            hasher.update(bytes(data))
            digest = hasher.finalize()
        return self._handle.sign_digest(digest, format=SignatureFormat.DER)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        if not isinstance(algorithm, ec.ECDH):
            raise MechanismUnsupportedError("only ECDH key agreement is supported")
        return self._handle.exchange(peer_public_key)

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _refuse_export(self._handle)


class HandleEd25519PrivateKey(_HandleKey, ed25519.Ed25519PrivateKey):
    """An Ed25519 key in a backend, usable with cryptography's builders."""

    def __init__(self, handle: KeyHandle) -> None:
        if handle.algorithm is not Algorithm.EdDSA:
            raise MechanismUnsupportedError(f"{handle.uri} is not an Ed25519 key")
        self._handle = handle

    def public_key(self) -> ed25519.Ed25519PublicKey:
        public = self._handle.public_key()
        assert isinstance(public, ed25519.Ed25519PublicKey)
        return public

    def sign(self, data: bytes) -> bytes:  # type: ignore[override]
        return self._handle.sign(bytes(data))

    def private_bytes_raw(self) -> bytes:
        _refuse_export(self._handle)


def as_private_key(handle: KeyHandle) -> HandleECPrivateKey | HandleEd25519PrivateKey:
    if handle.algorithm is Algorithm.EdDSA:
        return HandleEd25519PrivateKey(handle)
    if handle.algorithm.curve is not None:
        return HandleECPrivateKey(handle)
    raise MechanismUnsupportedError(
        f"{handle.algorithm.value} keys cannot sign, so they have no cryptography signing key"
    )
