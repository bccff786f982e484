"""A private key on a PKCS#11 token."""

from __future__ import annotations

import hmac
from typing import Any

from pkcs11 import KDF, Attribute, KeyType, Mechanism, ObjectClass
from pkcs11._pkcs11 import DeriveMixin  # type: ignore[attr-defined]

from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle, KeyProperties
from janus_hsm.public_keys import PublicKey, PublicKeyFormatError, raw_public_bytes

from .session import TokenSession

_ECDH_TEMPLATE = {
    # The derived Z is a session object that exists only to be read back and destroyed:
    # KeyHandle.exchange returns raw Z by contract (callers run their own KDF).
    Attribute.TOKEN: False,
    Attribute.SENSITIVE: False,
    Attribute.EXTRACTABLE: True,
}


class Pkcs11KeyHandle(KeyHandle):
    """A key pair on a token, named by id (and label). Never holds private material."""

    def __init__(
        self,
        token_session: TokenSession,
        *,
        uri: str,
        key_id: bytes,
        label: str,
        properties: KeyProperties,
        public_key: PublicKey,
        allow_extractable: bool,
    ) -> None:
        self._ts = token_session
        self._uri = uri
        self.key_id = key_id
        self.label = label
        self._properties = properties
        self._public_key = public_key
        self.allow_extractable = allow_extractable

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def properties(self) -> KeyProperties:
        return self._properties

    def public_key(self) -> PublicKey:
        return self._public_key

    def _private(self, session: Any) -> Any:
        return self._ts.object(
            session, ObjectClass.PRIVATE_KEY, self.key_id, self.label, self._same_custody
        )

    def _same_custody(self, found: Any) -> None:
        """Refuse a key found anew whose custody is not what this handle was made with.

        Whoever has the PIN can delete the key and create another under the same id and
        label, e.g. an extractable one; the handle's checks ran on the first key's flags.
        """
        props = self._properties
        expected = {
            Attribute.SENSITIVE: props.sensitive,
            Attribute.EXTRACTABLE: props.extractable,
            Attribute.ALWAYS_SENSITIVE: props.always_sensitive,
            Attribute.NEVER_EXTRACTABLE: props.never_extractable,
            Attribute.LOCAL: props.local,
        }
        if any(bool(found[attribute]) != value for attribute, value in expected.items()):
            raise KeyNotFoundError(
                f"the key behind {self._uri} was replaced by one with other custody "
                "attributes since it was opened; open it again"
            )

    def _sign_ecdsa_digest(self, digest: bytes) -> bytes:
        return bytes(
            self._ts.run(
                lambda s: self._private(s).sign(digest, mechanism=Mechanism.ECDSA),
                what="ECDSA signing",
            )
        )

    def _sign_eddsa(self, data: bytes) -> bytes:
        return bytes(
            self._ts.run(
                lambda s: self._private(s).sign(data, mechanism=Mechanism.EDDSA),
                what="EdDSA signing",
            )
        )

    def _exchange(self, peer_public_key: PublicKey) -> bytes:
        point = raw_public_bytes(peer_public_key)
        size = self.algorithm.coordinate_size

        def derive(session: Any) -> bytes:
            # python-pkcs11 only mixes derive_key into EC keys; EC_EDWARDS keys that hold
            # X25519 (SoftHSM's representation) need the mixin called explicitly.
            secret = DeriveMixin.derive_key(
                self._private(session),
                KeyType.GENERIC_SECRET,
                size * 8,
                mechanism=Mechanism.ECDH1_DERIVE,
                mechanism_param=(KDF.NULL, None, point),
                template=_ECDH_TEMPLATE,
            )
            try:
                return bytes(secret[Attribute.VALUE])
            finally:
                secret.destroy()

        shared = self._ts.run(derive, what="ECDH key agreement")
        if self.algorithm is Algorithm.X25519 and hmac.compare_digest(shared, bytes(32)):
            # RFC 7748 section 6.1: an all-zero output means a small-order peer point.
            raise PublicKeyFormatError("refusing X25519 with a small-order peer public key")
        return shared
