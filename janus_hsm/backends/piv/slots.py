"""What is in a PIV slot: algorithm, policies, origin and public key.

Firmware 5.3+ answers GET METADATA for a slot with all of it.  Older cards do not, so
public key, origin and policies come from an attestation of the slot (firmware 4.3+;
only generated keys can be attested), and a slot certificate naming another key is
refused: the certificate is a writable data object, not evidence.  When the card cannot
attest the key, its public key comes from the certificate Janus stores in the slot at
generation, and Janus says "unknown" origin and treats the key as not fit for custody.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from yubikit.core.smartcard import SW, ApduError
from yubikit.piv import KEY_TYPE, PIN_POLICY, SLOT, TOUCH_POLICY, PivSession

from janus_hsm.algorithms import Algorithm
from janus_hsm.attestation import slot_facts
from janus_hsm.errors import AttestationKeyMismatchError, MechanismUnsupportedError
from janus_hsm.public_keys import PublicKey, algorithm_of

KEY_TYPES: dict[Algorithm, KEY_TYPE] = {
    Algorithm.ES256: KEY_TYPE.ECCP256,
    Algorithm.ES384: KEY_TYPE.ECCP384,
    Algorithm.EdDSA: KEY_TYPE.ED25519,
    Algorithm.X25519: KEY_TYPE.X25519,
}
ALGORITHMS = {v: k for k, v in KEY_TYPES.items()}
log = logging.getLogger(__name__)

#: What PIN_POLICY.DEFAULT / TOUCH_POLICY.DEFAULT mean in each slot on a YubiKey.
DEFAULT_PIN_POLICY = {
    SLOT.AUTHENTICATION: PIN_POLICY.ONCE,
    SLOT.SIGNATURE: PIN_POLICY.ALWAYS,
    SLOT.KEY_MANAGEMENT: PIN_POLICY.ONCE,
    SLOT.CARD_AUTH: PIN_POLICY.NEVER,
}
_PIN_NAMES = {p: p.name.lower().replace("_", "-") for p in PIN_POLICY}
_TOUCH_NAMES = {t: t.name.lower() for t in TOUCH_POLICY}


def resolve_pin_policy(slot: SLOT, policy: PIN_POLICY) -> PIN_POLICY:
    if policy is PIN_POLICY.DEFAULT:
        return DEFAULT_PIN_POLICY.get(slot, PIN_POLICY.ONCE)
    return policy


def resolve_touch_policy(policy: TOUCH_POLICY) -> TOUCH_POLICY:
    return TOUCH_POLICY.NEVER if policy is TOUCH_POLICY.DEFAULT else policy


def pin_policy_name(policy: PIN_POLICY | None) -> str | None:
    return None if policy is None else _PIN_NAMES[policy]


def touch_policy_name(policy: TOUCH_POLICY | None) -> str | None:
    return None if policy is None else _TOUCH_NAMES[policy]


def parse_pin_policy(name: str) -> PIN_POLICY:
    for policy, text in _PIN_NAMES.items():
        if text == name.strip().lower().replace("_", "-"):
            return policy
    raise ValueError(f"unknown PIN policy {name!r}; choose one of {', '.join(_PIN_NAMES.values())}")


def parse_touch_policy(name: str) -> TOUCH_POLICY:
    for policy, text in _TOUCH_NAMES.items():
        if text == name.strip().lower():
            return policy
    raise ValueError(
        f"unknown touch policy {name!r}; choose one of {', '.join(_TOUCH_NAMES.values())}"
    )


def algorithm_for(key_type: KEY_TYPE, slot: SLOT) -> Algorithm:
    try:
        return ALGORITHMS[key_type]
    except KeyError:
        raise MechanismUnsupportedError(
            f"slot {slot:02x} holds a {key_type.name} key; Janus uses P-256, P-384, "
            "Ed25519 and X25519 keys only"
        ) from None


@dataclass(frozen=True)
class SlotInfo:
    slot: SLOT
    algorithm: Algorithm
    public_key: PublicKey
    pin_policy: PIN_POLICY | None
    touch_policy: TOUCH_POLICY | None
    #: True generated on the card, False imported, None unknown (old firmware).
    generated: bool | None

    @property
    def key_type(self) -> KEY_TYPE:
        return KEY_TYPES[self.algorithm]


def _empty(exc: ApduError) -> bool:
    return exc.sw in (SW.REFERENCE_DATA_NOT_FOUND, SW.FILE_NOT_FOUND)


def read_slot(session: PivSession, slot: SLOT) -> SlotInfo | None:
    """The key in ``slot``, or None when the slot is empty."""
    if session.version >= (5, 3, 0):
        try:
            meta = session.get_slot_metadata(slot)
        except ApduError as exc:
            if _empty(exc):
                return None
            raise
        return SlotInfo(
            slot=slot,
            algorithm=algorithm_for(meta.key_type, slot),
            public_key=meta.public_key,
            pin_policy=resolve_pin_policy(slot, meta.pin_policy),
            touch_policy=resolve_touch_policy(meta.touch_policy),
            generated=meta.generated,
        )
    return _read_without_metadata(session, slot)


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _read_without_metadata(session: PivSession, slot: SLOT) -> SlotInfo | None:
    """A slot on firmware without GET METADATA (before 5.3).

    The slot certificate is an ordinary data object that anyone holding the management
    key (the factory default is public) can replace, so it is never trusted for the key:
    where the card can attest the slot (4.3+, keys generated on the card), the public key
    is the attested one, and a slot certificate for any other key is refused.  Only when
    no attestation is possible does the key come from the certificate, and then it is
    reported as of unknown origin (not fit for custody).
    """
    from yubikit.core import BadResponseError

    cert: x509.Certificate | None
    try:
        cert = session.get_certificate(slot)
    except ApduError as exc:
        if not _empty(exc):
            raise
        cert = None
    except BadResponseError:
        cert = None  # an empty or foreign data object: nothing Janus can name
    attested: x509.Certificate | None = None
    if session.version >= (4, 3, 0):
        try:
            attested = session.attest_key(slot)
        except ApduError:
            attested = None  # imported keys cannot be attested; empty slots neither
    if attested is None and cert is None:
        return None
    pin_policy: PIN_POLICY | None = None
    touch_policy: TOUCH_POLICY | None = None
    generated: bool | None
    if attested is not None:
        public = attested.public_key()
        if cert is not None and _spki(cert.public_key()) != _spki(public):
            raise AttestationKeyMismatchError(
                f"slot {slot:02x}: the slot certificate names another public key than the "
                "one the card attests for the slot's private key. Anyone holding the "
                "management key can replace a slot certificate, so Janus refuses the slot "
                "rather than report a key that is not the card's. Check who wrote it "
                "(`ykman piv certificates export`), then delete the certificate or put "
                "back one for the attested key"
            )
        facts = slot_facts(attested)
        generated = True
        pin_policy = next((p for p in PIN_POLICY if _PIN_NAMES[p] == facts.pin_policy), None)
        touch_policy = next(
            (t for t in TOUCH_POLICY if _TOUCH_NAMES[t] == facts.touch_policy), None
        )
    else:
        assert cert is not None
        public = cert.public_key()
        generated = None
        log.warning(
            "slot %02x (firmware %s): the card cannot attest this key (imported, or firmware "
            "before 4.3), so its public key comes from the slot certificate, which anyone "
            "holding the management key can replace, and where the key was generated is "
            "unknown: Janus does not treat it as fit for custody",
            slot,
            session.version,
        )
    try:
        algorithm = algorithm_of(public)  # type: ignore[arg-type]
    except ValueError:
        raise MechanismUnsupportedError(
            f"slot {slot:02x} holds a key of a type Janus does not use"
        ) from None
    return SlotInfo(
        slot=slot,
        algorithm=algorithm,
        public_key=public,  # type: ignore[arg-type]
        pin_policy=pin_policy or DEFAULT_PIN_POLICY.get(slot, PIN_POLICY.ONCE),
        touch_policy=touch_policy,
        generated=generated,
    )
