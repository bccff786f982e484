"""A private key in a PIV slot: sign, ECDH and attest, never export."""

from __future__ import annotations

import hmac
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from yubikit.piv import SLOT, TOUCH_POLICY, PivSession

from janus_hsm.algorithms import Algorithm
from janus_hsm.pin import PinSource
from janus_hsm.provider import Attestation, KeyHandle, KeyProperties, der_to_raw
from janus_hsm.public_keys import PublicKey, PublicKeyFormatError

from .card import PivCard, TouchCallback
from .slots import SlotInfo, pin_policy_name, touch_policy_name

BACKEND = "piv"
_PREHASH = {32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}


def properties_of(info: SlotInfo) -> KeyProperties:
    """PIV facts in PKCS#11's vocabulary: only a key generated on the card is custody-grade.

    A PIV private key can never be read out of the card, but an *imported* key existed
    outside it first (and may still), so it is reported as once-extractable, not local.
    """
    born_here = info.generated is True
    return KeyProperties(
        algorithm=info.algorithm,
        sensitive=True,
        extractable=False,
        always_sensitive=born_here,
        never_extractable=born_here,
        local=born_here,
        backend=BACKEND,
        pin_policy=pin_policy_name(info.pin_policy),
        touch_policy=touch_policy_name(info.touch_policy),
    )


class PivKeyHandle(KeyHandle):
    """The key in one slot of one card. Holds the public key and policies, no secrets."""

    def __init__(
        self,
        card: PivCard,
        info: SlotInfo,
        *,
        uri: str,
        allow_extractable: bool,
        pin_source: PinSource,
        on_touch: TouchCallback,
    ) -> None:
        self._card = card
        #: The PIN source and touch prompt of the provider that made this handle: another
        #: provider opening the same card later does not change them.
        self._pin_source = pin_source
        self._on_touch = on_touch
        self._info = info
        self._uri = uri
        self._properties = properties_of(info)
        self.allow_extractable = allow_extractable

    @property
    def uri(self) -> str:
        return self._uri

    @property
    def slot(self) -> SLOT:
        return self._info.slot

    @property
    def slot_info(self) -> SlotInfo:
        return self._info

    @property
    def properties(self) -> KeyProperties:
        return self._properties

    @property
    def needs_touch(self) -> bool:
        return self._info.touch_policy in (TOUCH_POLICY.ALWAYS, TOUCH_POLICY.CACHED)

    def public_key(self) -> PublicKey:
        return self._info.public_key

    def _use(self, what: str, operation: Callable[[PivSession], bytes]) -> bytes:
        info = self._info

        def run(session: PivSession) -> bytes:
            return self._card.use_key(
                session,
                what,
                info.pin_policy,
                info.touch_policy,
                lambda: operation(session),
                pin_source=self._pin_source,
                on_touch=self._on_touch,
            )

        # Not retried on a new connection: a signature may already have cost a touch.
        return self._card.run(f"{what} with slot {info.slot:02x}", run, retry=False)

    def _sign_ecdsa_digest(self, digest: bytes) -> bytes:
        prehash = _PREHASH.get(len(digest))
        if prehash is None:
            raise ValueError(f"a {len(digest)}-byte digest is not SHA-256/384/512")
        der = self._use(
            "ECDSA signing",
            lambda s: s.sign(self.slot, self._info.key_type, digest, Prehashed(prehash)),  # type: ignore[arg-type]
        )
        return der_to_raw(der, self.algorithm.coordinate_size)

    def _sign_eddsa(self, data: bytes) -> bytes:
        return self._use(
            "Ed25519 signing", lambda s: s.sign(self.slot, self._info.key_type, data, None)
        )

    def _exchange(self, peer_public_key: PublicKey) -> bytes:
        shared = self._use(
            "ECDH key agreement",
            lambda s: s.calculate_secret(self.slot, peer_public_key),  # type: ignore[arg-type]
        )
        if self.algorithm is Algorithm.X25519 and hmac.compare_digest(shared, bytes(32)):
            # RFC 7748 section 6.1: an all-zero output means a small-order peer point.
            raise PublicKeyFormatError("refusing X25519 with a small-order peer public key")
        return shared

    def attest(self) -> Attestation:
        """The card's attestation chain for this slot: slot certificate, then f9's.

        Not verified here (see :func:`janus_hsm.attestation.verify_piv_attestation`):
        ``details`` are what the certificate claims, for display.
        """
        from yubikit.piv import SLOT as SLOTS

        from janus_hsm.attestation import FORMAT, slot_facts
        from janus_hsm.errors import AttestationUnavailableError

        if self._info.generated is False:
            raise AttestationUnavailableError(
                f"{self.uri} was imported into the card, and a YubiKey only attests keys it "
                "generated itself"
            )

        def read(session: PivSession) -> tuple[object, object]:
            return session.attest_key(self.slot), session.get_certificate(SLOTS.ATTESTATION)

        slot_cert, device_cert = self._card.run(f"attesting slot {self.slot:02x}", read)
        facts = slot_facts(slot_cert)  # type: ignore[arg-type]
        return Attestation(
            format=FORMAT,
            certificates=[slot_cert, device_cert],  # type: ignore[list-item]
            generated_on_device=True,
            details={
                "slot": f"{self.slot:02x}",
                "serial": facts.serial,
                "firmware": facts.firmware,
                "pin_policy": facts.pin_policy,
                "touch_policy": facts.touch_policy,
                "form_factor": facts.form_factor,
            },
        )
