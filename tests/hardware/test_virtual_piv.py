"""The virtual PIV applet, driven only through yubikit's real ``PivSession``.

Every check goes through the APDUs yubikit sends and the exceptions it raises, so these
tests pin down wire compatibility (TLV layouts, status words) as well as behaviour.  The
applet itself is touched only to plug in a touch hook or pull the card.
"""

from __future__ import annotations

import datetime
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import NameOID
from yubikit.core import TRANSPORT, InvalidPinError, NotSupportedError, Tlv, Version
from yubikit.core.smartcard import ApduError
from yubikit.piv import (
    DEFAULT_MANAGEMENT_KEY,
    KEY_TYPE,
    MANAGEMENT_KEY_TYPE,
    OBJECT_ID,
    PIN_POLICY,
    SLOT,
    TOUCH_POLICY,
    PivSession,
)

from hardware.card import CardRemovedError, InProcessConnection, VirtualCard
from hardware.virtual_piv import (
    OID_FIRMWARE_VERSION,
    OID_FORM_FACTOR,
    OID_PIN_TOUCH_POLICY,
    OID_SERIAL_NUMBER,
    VERSION_5_4,
    Presence,
    ScriptedTouch,
    VirtualPivApplet,
    VirtualYubiKey,
    default_attestation_root,
)

PIN = "123456"
PUK = "12345678"
AES256_KEY = bytes(range(32))

SW_SECURITY = 0x6982
SW_CONDITIONS = 0x6985
SW_INCORRECT_DATA = 0x6A80
SW_FILE_NOT_FOUND = 0x6A82
SW_NO_SPACE = 0x6A84
SW_REFERENCE_NOT_FOUND = 0x6A88


def _open(yk: VirtualYubiKey, transport: TRANSPORT = TRANSPORT.USB) -> PivSession:
    return PivSession(yk.connect(transport))


@pytest.fixture
def yk() -> VirtualYubiKey:
    return VirtualYubiKey(piv=VirtualPivApplet(serial=12345678))


@pytest.fixture
def session(yk: VirtualYubiKey) -> PivSession:
    return _open(yk)


def _admin(session: PivSession) -> PivSession:
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    return session


def _sw(excinfo: pytest.ExceptionInfo[ApduError]) -> int:
    return excinfo.value.sw


def _self_signed(padding: int = 0) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "janus test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2035, 1, 1, tzinfo=datetime.UTC))
    )
    if padding:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(
                x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), os.urandom(padding)
            ),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


# ------------------------------------------------------------------------- identity


def test_version_serial_and_default_management_key_type_follow_the_profile() -> None:
    new = _open(VirtualYubiKey(piv=VirtualPivApplet(serial=31415926)))
    assert new.version == Version(5, 7, 2)
    assert new.get_serial() == 31415926
    assert new.management_key_type == MANAGEMENT_KEY_TYPE.AES192

    old = _open(VirtualYubiKey(piv=VirtualPivApplet(version=VERSION_5_4, serial=27182818)))
    assert old.version == Version(5, 4, 3)
    assert old.get_serial() == 27182818
    assert old.management_key_type == MANAGEMENT_KEY_TYPE.TDES


def test_discovery_object_names_the_piv_application(session: PivSession) -> None:
    discovery = Tlv.parse_dict(session.get_object(OBJECT_ID.DISCOVERY))
    assert discovery[0x4F].startswith(bytes.fromhex("A000000308"))


# ------------------------------------------------------------------------- metadata


def test_pin_puk_and_management_key_metadata_defaults(session: PivSession) -> None:
    for metadata in (session.get_pin_metadata(), session.get_puk_metadata()):
        assert (metadata.default_value, metadata.total_attempts) == (True, 3)
        assert metadata.attempts_remaining == 3
    mgmt = session.get_management_key_metadata()
    assert mgmt.key_type == MANAGEMENT_KEY_TYPE.AES192
    assert mgmt.default_value is True
    assert mgmt.touch_policy == TOUCH_POLICY.NEVER


def test_slot_metadata_tells_generated_from_imported_with_effective_policies(
    session: PivSession,
) -> None:
    _admin(session)
    generated = session.generate_key(
        SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, PIN_POLICY.NEVER, TOUCH_POLICY.CACHED
    )
    imported = ec.generate_private_key(ec.SECP384R1())
    session.put_key(SLOT.KEY_MANAGEMENT, imported)

    meta = session.get_slot_metadata(SLOT.AUTHENTICATION)
    assert (meta.key_type, meta.generated) == (KEY_TYPE.ECCP256, True)
    assert (meta.pin_policy, meta.touch_policy) == (PIN_POLICY.NEVER, TOUCH_POLICY.CACHED)
    assert meta.public_key == generated

    meta = session.get_slot_metadata(SLOT.KEY_MANAGEMENT)
    assert (meta.key_type, meta.generated) == (KEY_TYPE.ECCP384, False)
    # DEFAULT resolves to the slot's YubiKey default: 9D is PIN once, no touch.
    assert (meta.pin_policy, meta.touch_policy) == (PIN_POLICY.ONCE, TOUCH_POLICY.NEVER)
    assert meta.public_key == imported.public_key()

    with pytest.raises(ApduError) as excinfo:
        session.get_slot_metadata(SLOT.RETIRED1)
    assert _sw(excinfo) == SW_REFERENCE_NOT_FOUND


# ------------------------------------------------------------------------- PIN and PUK


def test_wrong_pin_counts_down_blocks_and_puk_unblocks(session: PivSession) -> None:
    for remaining in (2, 1):
        with pytest.raises(InvalidPinError) as excinfo:
            session.verify_pin("000000")
        assert excinfo.value.attempts_remaining == remaining
    assert session.get_pin_attempts() == 1
    session.verify_pin(PIN)  # a right PIN restores the counter
    assert session.get_pin_metadata().attempts_remaining == 3

    for remaining in (2, 1, 0):
        with pytest.raises(InvalidPinError) as excinfo:
            session.verify_pin("000000")
        assert excinfo.value.attempts_remaining == remaining
    with pytest.raises(InvalidPinError) as excinfo:  # blocked: 6983, even the right PIN
        session.verify_pin(PIN)
    assert excinfo.value.attempts_remaining == 0
    assert session.get_pin_metadata().attempts_remaining == 0

    with pytest.raises(InvalidPinError) as excinfo:
        session.unblock_pin("87654321", "654321")
    assert excinfo.value.attempts_remaining == 2
    session.unblock_pin(PUK, "654321")
    assert session.get_puk_metadata().attempts_remaining == 3
    session.verify_pin("654321")
    pin = session.get_pin_metadata()
    assert (pin.default_value, pin.attempts_remaining) == (False, 3)


def test_change_pin_and_puk(session: PivSession) -> None:
    session.change_pin(PIN, "24681357")
    with pytest.raises(InvalidPinError):
        session.verify_pin(PIN)
    session.verify_pin("24681357")
    with pytest.raises(InvalidPinError) as excinfo:
        session.change_pin("11111111", "22222222")
    assert excinfo.value.attempts_remaining == 2
    with pytest.raises(ApduError) as apdu_excinfo:  # too short: refused, no try spent
        session.change_pin("24681357", "123")
    assert _sw(apdu_excinfo) == SW_INCORRECT_DATA
    assert session.get_pin_metadata().attempts_remaining == 3

    session.change_puk(PUK, "87654321")
    assert session.get_puk_metadata().default_value is False
    with pytest.raises(InvalidPinError):
        session.unblock_pin(PUK, "999999")
    session.unblock_pin("87654321", "999999")
    session.verify_pin("999999")


def test_empty_verify_reports_tries_before_metadata_existed() -> None:
    """On firmware before 5.3 yubikit asks with an empty VERIFY (63Cx, or 9000 once
    verified) instead of GET METADATA."""
    session = _open(VirtualYubiKey(piv=VirtualPivApplet(version=(5, 2, 7))))
    with pytest.raises(NotSupportedError):
        session.get_pin_metadata()
    assert session.get_pin_attempts() == 3
    with pytest.raises(InvalidPinError):
        session.verify_pin("000000")
    assert session.get_pin_attempts() == 2
    session.verify_pin(PIN)
    assert session.get_pin_attempts() == 3  # 9000: yubikit falls back to its cached count


def test_set_pin_attempts_needs_management_key_and_pin_and_resets_both(
    session: PivSession,
) -> None:
    session.change_pin(PIN, "777777")
    _admin(session)
    with pytest.raises(ApduError) as excinfo:
        session.set_pin_attempts(5, 4)
    assert _sw(excinfo) == SW_SECURITY
    session.verify_pin("777777")
    session.set_pin_attempts(5, 4)
    pin, puk = session.get_pin_metadata(), session.get_puk_metadata()
    assert (pin.total_attempts, pin.attempts_remaining, pin.default_value) == (5, 5, True)
    assert (puk.total_attempts, puk.attempts_remaining) == (4, 4)
    session.verify_pin(PIN)


def test_reset_needs_blocked_pin_and_puk_and_keeps_the_attestation_key(
    yk: VirtualYubiKey,
) -> None:
    session = _admin(_open(yk))
    attestation_before = session.get_certificate(SLOT.ATTESTATION)
    session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)
    session.set_management_key(MANAGEMENT_KEY_TYPE.AES256, AES256_KEY)
    session.change_pin(PIN, "555555")
    with pytest.raises(ApduError) as excinfo:
        session.protocol.send_apdu(0, 0xFB, 0, 0)
    assert _sw(excinfo) == SW_CONDITIONS

    session.reset()  # yubikit blocks PIN and PUK itself, then resets

    assert session.management_key_type == MANAGEMENT_KEY_TYPE.AES192
    assert session.get_management_key_metadata().default_value is True
    assert session.get_pin_metadata().default_value is True
    session.verify_pin(PIN)
    with pytest.raises(ApduError) as excinfo:
        session.get_slot_metadata(SLOT.AUTHENTICATION)
    assert _sw(excinfo) == SW_REFERENCE_NOT_FOUND
    assert session.get_certificate(SLOT.ATTESTATION) == attestation_before


# ------------------------------------------------------------------------- management key


def test_default_3des_management_key_on_old_firmware() -> None:
    session = _open(VirtualYubiKey(piv=VirtualPivApplet(version=VERSION_5_4)))
    with pytest.raises(ApduError) as excinfo:  # not authenticated yet
        session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)
    assert _sw(excinfo) == SW_SECURITY
    with pytest.raises(ApduError) as excinfo:
        session.authenticate(bytes(24))
    assert _sw(excinfo) == SW_SECURITY
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    assert isinstance(
        session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256), ec.EllipticCurvePublicKey
    )


def test_aes192_default_then_aes256_key(yk: VirtualYubiKey) -> None:
    session = _open(yk)
    with pytest.raises(ApduError) as excinfo:
        session.authenticate(os.urandom(24))
    assert _sw(excinfo) == SW_SECURITY
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    session.set_management_key(MANAGEMENT_KEY_TYPE.AES256, AES256_KEY)

    session = _open(yk)  # a new session learns the type from metadata
    assert session.management_key_type == MANAGEMENT_KEY_TYPE.AES256
    meta = session.get_management_key_metadata()
    assert (meta.default_value, meta.touch_policy) == (False, TOUCH_POLICY.NEVER)
    with pytest.raises(ApduError):
        session.authenticate(os.urandom(32))
    with pytest.raises(ApduError):
        session.put_object(OBJECT_ID.CHUID, b"x")
    session.authenticate(AES256_KEY)
    session.put_object(OBJECT_ID.CHUID, b"x")


def test_management_key_with_touch(yk: VirtualYubiKey) -> None:
    touch = ScriptedTouch(Presence.DENY)
    yk.piv.touch = touch
    session = _admin(_open(yk))
    session.set_management_key(MANAGEMENT_KEY_TYPE.AES128, AES256_KEY[:16], require_touch=True)
    assert session.get_management_key_metadata().touch_policy == TOUCH_POLICY.ALWAYS
    with pytest.raises(ApduError) as excinfo:
        session.authenticate(AES256_KEY[:16])
    assert _sw(excinfo) == SW_SECURITY
    with pytest.raises(ApduError):  # the denied authentication did not count
        session.put_object(OBJECT_ID.CHUID, b"x")
    session.authenticate(AES256_KEY[:16])
    session.put_object(OBJECT_ID.CHUID, b"x")
    assert [(r.operation, r.slot) for r in touch.requests] == [("management-key", 0x9B)] * 2


# ------------------------------------------------------------------------- key use


@pytest.mark.parametrize(
    ("key_type", "hash_algorithm"),
    [
        (KEY_TYPE.ECCP256, hashes.SHA256()),
        (KEY_TYPE.ECCP256, hashes.SHA384()),  # truncated to 32 bytes by yubikit
        (KEY_TYPE.ECCP384, hashes.SHA384()),
        (KEY_TYPE.ED25519, None),
    ],
)
def test_generated_keys_sign_verifiably(
    session: PivSession, key_type: KEY_TYPE, hash_algorithm: hashes.HashAlgorithm | None
) -> None:
    public_key = _admin(session).generate_key(SLOT.AUTHENTICATION, key_type)
    session.verify_pin(PIN)
    message = b"janus capability " + os.urandom(16)
    signature = session.sign(SLOT.AUTHENTICATION, key_type, message, hash_algorithm)
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        public_key.verify(signature, message)
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey) and hash_algorithm
        public_key.verify(signature, message, ec.ECDSA(hash_algorithm))
    other = session.sign(SLOT.AUTHENTICATION, key_type, b"something else", hash_algorithm)
    assert other != signature


@pytest.mark.parametrize("key_type", [KEY_TYPE.ECCP256, KEY_TYPE.ECCP384, KEY_TYPE.X25519])
def test_calculate_secret_matches_software_ecdh(session: PivSession, key_type: KEY_TYPE) -> None:
    card_public = _admin(session).generate_key(SLOT.KEY_MANAGEMENT, key_type)
    session.verify_pin(PIN)
    if key_type == KEY_TYPE.X25519:
        x_peer = x25519.X25519PrivateKey.generate()
        assert isinstance(card_public, x25519.X25519PublicKey)
        expected = x_peer.exchange(card_public)
        assert session.calculate_secret(SLOT.KEY_MANAGEMENT, x_peer.public_key()) == expected
    else:
        assert isinstance(card_public, ec.EllipticCurvePublicKey)
        ec_peer = ec.generate_private_key(card_public.curve)
        expected = ec_peer.exchange(ec.ECDH(), card_public)
        assert session.calculate_secret(SLOT.KEY_MANAGEMENT, ec_peer.public_key()) == expected


def test_imported_key_signs_like_the_original(session: PivSession) -> None:
    private_key = ed25519.Ed25519PrivateKey.generate()
    _admin(session).put_key(SLOT.RETIRED5, private_key, PIN_POLICY.NEVER)
    signature = session.sign(SLOT.RETIRED5, KEY_TYPE.ED25519, b"imported", None)
    private_key.public_key().verify(signature, b"imported")


def test_25519_is_refused_before_5_7() -> None:
    session = _admin(_open(VirtualYubiKey(piv=VirtualPivApplet(version=VERSION_5_4))))
    with pytest.raises(NotSupportedError):  # yubikit checks the version first …
        session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ED25519)
    for algorithm in (KEY_TYPE.ED25519, KEY_TYPE.X25519):  # … and so does the card
        data = Tlv(0xAC, Tlv(0x80, bytes([algorithm])))
        with pytest.raises(ApduError) as excinfo:
            session.protocol.send_apdu(0, 0x47, 0, SLOT.AUTHENTICATION, data)
        assert _sw(excinfo) == SW_INCORRECT_DATA
    assert isinstance(
        session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP384), ec.EllipticCurvePublicKey
    )


def test_pin_policy_always_needs_verify_right_before_each_signature(
    session: PivSession,
) -> None:
    _admin(session).generate_key(SLOT.SIGNATURE, KEY_TYPE.ECCP256)  # 9C: ALWAYS by default

    def sign() -> bytes:
        return session.sign(SLOT.SIGNATURE, KEY_TYPE.ECCP256, b"m", hashes.SHA256())

    with pytest.raises(ApduError) as excinfo:
        sign()
    assert _sw(excinfo) == SW_SECURITY
    session.verify_pin(PIN)
    sign()
    with pytest.raises(ApduError) as excinfo:  # used up by the signature
        sign()
    assert _sw(excinfo) == SW_SECURITY
    session.verify_pin(PIN)
    session.get_slot_metadata(SLOT.SIGNATURE)  # any command in between de-authenticates
    with pytest.raises(ApduError) as excinfo:
        sign()
    assert _sw(excinfo) == SW_SECURITY
    session.verify_pin(PIN)
    sign()


def test_pin_policy_once_lasts_the_session_and_never_needs_no_pin(yk: VirtualYubiKey) -> None:
    session = _admin(_open(yk))
    session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)  # 9A: ONCE
    session.generate_key(SLOT.CARD_AUTH, KEY_TYPE.ECCP256)  # 9E: NEVER
    with pytest.raises(ApduError) as excinfo:
        session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert _sw(excinfo) == SW_SECURITY
    session.verify_pin(PIN)
    for _ in range(2):
        session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())

    session = _open(yk)  # SELECT starts a new session: the PIN is forgotten
    with pytest.raises(ApduError) as excinfo:
        session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert _sw(excinfo) == SW_SECURITY
    session.sign(SLOT.CARD_AUTH, KEY_TYPE.ECCP256, b"m", hashes.SHA256())


def test_touch_always_denied_or_timed_out_gives_no_signature(yk: VirtualYubiKey) -> None:
    touch = ScriptedTouch(Presence.DENY, Presence.TIMEOUT)
    yk.piv.touch = touch
    yk.piv.touch_timeout = 0.3
    session = _admin(_open(yk))
    public_key = session.generate_key(
        SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, PIN_POLICY.NEVER, TOUCH_POLICY.ALWAYS
    )
    assert touch.requests == []  # generation asks for no touch

    with pytest.raises(ApduError) as excinfo:
        session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert _sw(excinfo) == SW_SECURITY
    started = time.monotonic()
    with pytest.raises(ApduError) as excinfo:
        session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert _sw(excinfo) == SW_SECURITY
    assert time.monotonic() - started >= 0.3
    signature = session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    public_key.verify(signature, b"m", ec.ECDSA(hashes.SHA256()))
    assert [(r.operation, r.slot) for r in touch.requests] == [("sign", 0x9A)] * 3
    session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert len(touch.requests) == 4  # ALWAYS asks every time


def test_touch_cached_asks_once(yk: VirtualYubiKey) -> None:
    touch = ScriptedTouch()
    yk.piv.touch = touch
    session = _admin(_open(yk))
    session.generate_key(SLOT.RETIRED1, KEY_TYPE.X25519, PIN_POLICY.NEVER, TOUCH_POLICY.CACHED)
    peer = x25519.X25519PrivateKey.generate().public_key()
    first = session.calculate_secret(SLOT.RETIRED1, peer)
    assert session.calculate_secret(SLOT.RETIRED1, peer) == first
    assert [(r.operation, r.slot) for r in touch.requests] == [("ecdh", 0x82)]


# ------------------------------------------------------------------------- data objects


def test_certificate_round_trip_and_delete(session: PivSession) -> None:
    certificate = _self_signed()
    with pytest.raises(ApduError) as excinfo:
        session.put_certificate(SLOT.AUTHENTICATION, certificate)
    assert _sw(excinfo) == SW_SECURITY
    _admin(session).put_certificate(SLOT.AUTHENTICATION, certificate)
    assert session.get_certificate(SLOT.AUTHENTICATION) == certificate
    session.put_certificate(SLOT.SIGNATURE, certificate, compress=True)
    assert session.get_certificate(SLOT.SIGNATURE) == certificate
    session.delete_certificate(SLOT.AUTHENTICATION)
    with pytest.raises(ApduError) as excinfo:
        session.get_certificate(SLOT.AUTHENTICATION)
    assert _sw(excinfo) == SW_FILE_NOT_FOUND


def test_object_size_limit(yk: VirtualYubiKey) -> None:
    # 3,052 bytes plus headers exceed yubikit's largest extended APDU: short ones chain.
    session = _admin(_open(yk, TRANSPORT.NFC))
    session.put_object(OBJECT_ID.RETIRED1, b"\x00" * 3052)
    assert session.get_object(OBJECT_ID.RETIRED1) == b"\x00" * 3052
    with pytest.raises(ApduError) as excinfo:
        session.put_object(OBJECT_ID.RETIRED2, b"\x00" * 3053)
    assert _sw(excinfo) == SW_NO_SPACE


def test_printed_object_is_read_only_after_pin(yk: VirtualYubiKey) -> None:
    """PRINTED holds ykman's PIN-protected management key: no PIN, no read."""
    _admin(_open(yk)).put_object(OBJECT_ID.PRINTED, b"\x88\x1a\x89\x18" + bytes(24))
    session = _open(yk)
    with pytest.raises(ApduError) as excinfo:
        session.get_object(OBJECT_ID.PRINTED)
    assert _sw(excinfo) == SW_SECURITY
    session.verify_pin(PIN)
    assert session.get_object(OBJECT_ID.PRINTED) == b"\x88\x1a\x89\x18" + bytes(24)


# ------------------------------------------------------------------------- attestation


@pytest.mark.parametrize(
    ("key_type", "pin_policy", "touch_policy", "expected_policy"),
    [
        (KEY_TYPE.ECCP256, PIN_POLICY.ONCE, TOUCH_POLICY.CACHED, b"\x02\x03"),
        (KEY_TYPE.ECCP384, PIN_POLICY.DEFAULT, TOUCH_POLICY.DEFAULT, b"\x03\x01"),
        (KEY_TYPE.ED25519, PIN_POLICY.NEVER, TOUCH_POLICY.ALWAYS, b"\x01\x02"),
        (KEY_TYPE.X25519, PIN_POLICY.ALWAYS, TOUCH_POLICY.NEVER, b"\x03\x01"),
    ],
)
def test_attestation_chains_to_the_test_root_and_describes_the_key(
    key_type: KEY_TYPE,
    pin_policy: PIN_POLICY,
    touch_policy: TOUCH_POLICY,
    expected_policy: bytes,
) -> None:
    serial = 4_000_000_000  # top bit set: the DER INTEGER needs a leading zero
    yk = VirtualYubiKey(piv=VirtualPivApplet(serial=serial))
    session = _admin(_open(yk))
    public_key = session.generate_key(SLOT.SIGNATURE, key_type, pin_policy, touch_policy)

    certificate = session.attest_key(SLOT.SIGNATURE)
    intermediate = session.get_certificate(SLOT.ATTESTATION)
    root = default_attestation_root().certificate
    assert yk.piv.attestation_root_certificate == root

    certificate.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    root.verify_directly_issued_by(root)
    assert root.subject.rfc4514_string().startswith("O=Janus test devices")
    assert "CN=Janus Virtual PIV Test Root" in root.subject.rfc4514_string()
    intermediate_cn = intermediate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert intermediate_cn == "Yubico PIV Attestation (virtual)"
    assert intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    subject_cn = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert subject_cn == "YubiKey PIV Attestation 9c"

    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert certificate.public_key().public_bytes(der, raw) == public_key.public_bytes(der, raw)

    def extension(oid: x509.ObjectIdentifier) -> bytes:
        value = certificate.extensions.get_extension_for_oid(oid).value
        assert isinstance(value, x509.UnrecognizedExtension)
        return value.value

    assert extension(OID_FIRMWARE_VERSION) == bytes([5, 7, 2])
    assert extension(OID_SERIAL_NUMBER) == bytes.fromhex("020500EE6B2800")
    assert int.from_bytes(extension(OID_SERIAL_NUMBER)[2:], "big") == session.get_serial()
    assert extension(OID_PIN_TOUCH_POLICY) == expected_policy
    assert extension(OID_FORM_FACTOR) == b"\x01"


def test_attestation_of_imported_or_missing_key_is_refused(session: PivSession) -> None:
    _admin(session).put_key(SLOT.AUTHENTICATION, ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(ApduError) as excinfo:
        session.attest_key(SLOT.AUTHENTICATION)
    assert _sw(excinfo) == SW_INCORRECT_DATA
    with pytest.raises(ApduError) as excinfo:
        session.attest_key(SLOT.KEY_MANAGEMENT)
    assert _sw(excinfo) == SW_REFERENCE_NOT_FOUND


def test_attestation_root_is_the_same_in_another_process() -> None:
    code = (
        "from hardware.virtual_piv import default_attestation_root as r;"
        "from cryptography.hazmat.primitives.serialization import Encoding;"
        "print(r().certificate.public_bytes(Encoding.DER).hex())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.strip()
    expected = default_attestation_root().certificate.public_bytes(serialization.Encoding.DER)
    assert bytes.fromhex(out) == expected


# ------------------------------------------------------------------------- keys move


def test_move_and_delete_key(session: PivSession) -> None:
    public_key = _admin(session).generate_key(SLOT.RETIRED1, KEY_TYPE.ECCP256)
    session.move_key(SLOT.RETIRED1, SLOT.RETIRED2)
    assert session.get_slot_metadata(SLOT.RETIRED2).public_key == public_key
    with pytest.raises(ApduError):
        session.get_slot_metadata(SLOT.RETIRED1)
    session.delete_key(SLOT.RETIRED2)
    with pytest.raises(ApduError) as excinfo:
        session.get_slot_metadata(SLOT.RETIRED2)
    assert _sw(excinfo) == SW_REFERENCE_NOT_FOUND


# ------------------------------------------------------------------------- the card


def test_removed_card_raises_instead_of_answering(yk: VirtualYubiKey) -> None:
    session = _open(yk)
    yk.remove()
    with pytest.raises(CardRemovedError):
        session.get_serial()
    yk.insert()
    assert _open(yk).get_serial() == 12345678


def test_card_removed_while_waiting_for_touch(yk: VirtualYubiKey) -> None:
    yk.piv.touch_timeout = 30.0

    def pull_the_card(request: object) -> Presence:
        yk.remove()
        return Presence.TIMEOUT

    session = _admin(_open(yk))
    session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, touch_policy=TOUCH_POLICY.ALWAYS)
    session.verify_pin(PIN)
    yk.piv.touch = pull_the_card
    started = time.monotonic()
    with pytest.raises(CardRemovedError):
        session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert time.monotonic() - started < 5  # the wait ended with the removal

    yk.insert()
    yk.piv.touch = ScriptedTouch()
    session = _open(yk)
    with pytest.raises(ApduError) as excinfo:  # power was lost: the PIN must be given again
        session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, b"m", hashes.SHA256())
    assert _sw(excinfo) == SW_SECURITY


class _RecordingConnection(InProcessConnection):
    def __init__(self, card: VirtualCard, transport: TRANSPORT) -> None:
        super().__init__(card, transport)
        self.apdus: list[bytes] = []

    def send_and_receive(self, apdu: bytes) -> tuple[bytes, int]:
        self.apdus.append(apdu)
        return super().send_and_receive(apdu)


@pytest.fixture
def big_certificate() -> Iterator[x509.Certificate]:
    certificate = _self_signed(padding=1900)
    assert len(certificate.public_bytes(serialization.Encoding.DER)) > 2000
    yield certificate


def test_short_apdus_chain_a_2kb_certificate(
    yk: VirtualYubiKey, big_certificate: x509.Certificate
) -> None:
    """Over NFC yubikit speaks short APDUs: command chaining in, GET RESPONSE out."""
    connection = _RecordingConnection(yk.card, TRANSPORT.NFC)
    session = _admin(PivSession(connection))
    session.put_certificate(SLOT.AUTHENTICATION, big_certificate)
    assert session.get_certificate(SLOT.AUTHENTICATION) == big_certificate
    session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP384)
    attestation = session.attest_key(SLOT.AUTHENTICATION)  # longer than 256 bytes too
    attestation.verify_directly_issued_by(session.get_certificate(SLOT.ATTESTATION))

    assert max(len(apdu) for apdu in connection.apdus) <= 5 + 255 + 1
    assert any(apdu[0] & 0x10 for apdu in connection.apdus)  # chained blocks
    assert any(apdu[1] == 0xC0 for apdu in connection.apdus)  # GET RESPONSE

    usb = _RecordingConnection(yk.card, TRANSPORT.USB)  # the other path: extended APDUs
    usb_session = PivSession(usb)
    assert usb_session.get_certificate(SLOT.AUTHENTICATION) == big_certificate
    _admin(usb_session).put_certificate(SLOT.SIGNATURE, big_certificate)
    assert max(len(apdu) for apdu in usb.apdus) > 2000
    assert not any(apdu[1] == 0xC0 for apdu in usb.apdus)


# ------------------------------------------------------------------------- persistence


def test_state_file_keeps_keys_pins_and_serial(tmp_path: Path) -> None:
    path = tmp_path / "piv.json"
    first = VirtualYubiKey(piv=VirtualPivApplet(state_path=path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    session = _admin(_open(first))
    public_key = session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ED25519, PIN_POLICY.ONCE)
    session.change_pin(PIN, "314159")
    with pytest.raises(InvalidPinError):
        session.verify_pin("000000")
    attestation = session.get_certificate(SLOT.ATTESTATION)
    serial = session.get_serial()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    second = VirtualYubiKey(piv=VirtualPivApplet(state_path=path, serial=1))
    session = _open(second)
    assert session.get_serial() == serial
    assert session.get_pin_metadata().attempts_remaining == 2
    assert session.get_certificate(SLOT.ATTESTATION) == attestation
    session.verify_pin("314159")  # restores the counter, on disk too
    assert _open(VirtualYubiKey(piv=VirtualPivApplet(state_path=path))).get_pin_attempts() == 3
    session = _open(second)
    session.verify_pin("314159")
    signature = session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ED25519, b"again", None)
    assert isinstance(public_key, ed25519.Ed25519PublicKey)
    public_key.verify(signature, b"again")
    session.attest_key(SLOT.AUTHENTICATION).verify_directly_issued_by(attestation)
    assert [p.name for p in tmp_path.iterdir()] == ["piv.json"]  # no temporary files left
