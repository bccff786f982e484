"""A device key for sync tests: an Ed25519 key in memory, used through KeyHandle.sign.

Sync tests sign thousands of messages; a software handle keeps them fast, and one test
(test_messages.py) signs with a SoftHSM token key to show the real path.
"""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software.handle import software_properties
from janus_hsm.provider import KeyHandle, KeyProperties
from janus_hsm.public_keys import PublicKey


class DeviceKey(KeyHandle):
    allow_extractable = True

    def __init__(self, private: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> None:
        self._private = private

    @classmethod
    def ed25519(cls) -> DeviceKey:
        return cls(ed25519.Ed25519PrivateKey.generate())

    @property
    def uri(self) -> str:
        return "test:device"

    @property
    def properties(self) -> KeyProperties:
        if isinstance(self._private, ed25519.Ed25519PrivateKey):
            return software_properties(Algorithm.EdDSA)
        return software_properties(
            Algorithm.ES256 if self._private.curve.name == "secp256r1" else Algorithm.ES384
        )

    def public_key(self) -> PublicKey:
        return self._private.public_key()

    def _sign_eddsa(self, data: bytes) -> bytes:
        assert isinstance(self._private, ed25519.Ed25519PrivateKey)
        return self._private.sign(data)

    def _sign_ecdsa_digest(self, digest: bytes) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

        from janus_hsm.provider import der_to_raw

        assert isinstance(self._private, ec.EllipticCurvePrivateKey)
        algorithm = self.algorithm.hash_algorithm
        assert algorithm is not None
        der = self._private.sign(digest, ec.ECDSA(Prehashed(algorithm)))
        return der_to_raw(der, self.algorithm.coordinate_size)
