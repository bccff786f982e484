"""A YubiKey-flavoured virtual PIV applet, for driving yubikit's real ``PivSession`` in CI.

Why this exists: no Debian or PyPI package emulates a PIV card with YubiKey extensions
(metadata, attestation, PIN/touch policies, AES management keys), and CI has no YubiKey.
Hosted by :class:`hardware.card.VirtualCard`, this applet answers the APDUs that
``yubikit.piv.PivSession`` sends with the status words a YubiKey 5 returns, so the code
under test meets yubikit's normal exceptions (``InvalidPinError``, ``ApduError`` with the
real SW) instead of a mock's idea of them.

What it implements (NIST SP 800-73-4 part 2 plus Yubico's documented extensions):

* SELECT (application property template), GET VERSION, GET SERIAL (from 5.0), GET METADATA
  (from 5.3) for the management key, PIN, PUK and key slots.
* VERIFY (including the empty "how many tries" form and P1=FF "forget"), CHANGE REFERENCE
  for PIN and PUK, RESET RETRY COUNTER, SET PIN RETRIES, RESET (only when PIN and PUK are
  both blocked); PIN 123456 and PUK 12345678 by default, three tries each.
* Management key mutual authentication (3DES, AES-128/192/256) and SET MANAGEMENT KEY with
  the touch flag; the default key is 0102…08 three times, 3DES before 5.7 and AES-192 from 5.7.
* GENERATE and IMPORT of P-256, P-384, Ed25519 and X25519 keys (25519 only from 5.7) with
  PIN and touch policies; GENERAL AUTHENTICATE for signatures and ECDH; MOVE/DELETE KEY
  (from 5.7).
* GET DATA / PUT DATA for any PIV or Yubico object (certificates, CHUID, CCC, the PRINTED
  object that holds a PIN-protected management key, which needs the PIN to read), at most
  :data:`MAX_OBJECT_SIZE` bytes each.
* ATTEST: an X.509 certificate for a generated key, signed by the card's attestation key
  (slot F9), whose certificate is signed by :func:`default_attestation_root` — the
  "Janus Virtual PIV Test Root", a fixed test CA that stands in for Yubico's PIV CA.  The
  certificate carries Yubico's extensions under 1.3.6.1.4.1.41482.3 with Yubico's
  encodings: .3 firmware (three raw bytes), .7 serial (a DER INTEGER), .8 PIN and touch
  policy (two raw bytes), .9 form factor (one raw byte).

What it does not: RSA keys (6A80, as for an unknown algorithm), decryption, YubiKey Bio
(fingerprints, temporary PIN: GET METADATA 96 answers 6A88 like a non-Bio key), secure
messaging (SCP03/SCP11), FIPS restrictions, the OTP/OATH/OpenPGP applications.

PIN "always" follows the YubiKey (and SP 800-73-4): the VERIFY must be the command right
before the private key operation; any other command in between de-authenticates it.

Touch is a hook (:data:`TouchHook`) instead of a capacitive sensor: it answers
:class:`Presence` approve, deny or timeout.  A YubiKey that is not touched within about
15 s answers 6982 (security status not satisfied: yubico-piv-tool reports "Failed sign
command with code 6982"); here both deny and timeout give 6982, timeout after
``touch_timeout`` seconds.  A cached touch policy skips the hook for 15 s after a touch.

Removal: :meth:`VirtualYubiKey.remove` marks the card removed (every later APDU raises
:class:`hardware.card.CardRemovedError`) and wakes an operation waiting for touch, which
then raises the same error instead of answering, as a pulled card would.

State lives in memory and, when ``state_path`` is given, in a JSON file (mode 0600,
replaced atomically on every change) so a card process (hardware/vpcd.py) keeps its keys,
PINs and serial across runs.  The file holds private keys and PINs in the clear: it is a
test device, not a keystore.
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidKey
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.x509.oid import NameOID
from yubikit.core import TRANSPORT

from hardware.card import (
    YUBIKEY_ATR,
    Applet,
    CardRemovedError,
    Command,
    InProcessConnection,
    VirtualCard,
)
from hardware.fido2_authenticator import Presence, Scripted
from janus_hsm.atomic_file import replace_file

__all__ = [
    "DEFAULT_MANAGEMENT_KEY",
    "DEFAULT_PIN",
    "DEFAULT_PUK",
    "FORM_FACTOR_USB_A_KEYCHAIN",
    "FORM_FACTOR_USB_C_KEYCHAIN",
    "MAX_OBJECT_SIZE",
    "OID_FIRMWARE_VERSION",
    "OID_FORM_FACTOR",
    "OID_PIN_TOUCH_POLICY",
    "OID_SERIAL_NUMBER",
    "PIV_AID",
    "VERSION_5_4",
    "VERSION_5_7",
    "AttestationRoot",
    "Presence",
    "ScriptedTouch",
    "TouchHook",
    "TouchRequest",
    "VirtualPivApplet",
    "VirtualYubiKey",
    "approve_always",
    "default_attestation_root",
    "make_card",
]

PIV_AID: Final = bytes.fromhex("A000000308")
#: What a YubiKey answers to SELECT: 61{4F PIX+version, 79{4F RID}} (SP 800-73-4 3.1.1).
_SELECT_RESPONSE: Final = bytes.fromhex("61114F0600001000010079074F05A000000308")
#: The discovery object (7E) a YubiKey serves: the full AID and "PIV PIN only".
_DISCOVERY: Final = bytes.fromhex("7E124F0BA0000003080000100001005F2F024000")

VERSION_5_7: Final = (5, 7, 2)
#: An older firmware profile: 3DES default management key, no 25519, no MOVE KEY.
VERSION_5_4: Final = (5, 4, 3)

DEFAULT_PIN: Final = b"123456"
DEFAULT_PUK: Final = b"12345678"
DEFAULT_MANAGEMENT_KEY: Final = bytes.fromhex("010203040506070801020304050607080102030405060708")
DEFAULT_RETRIES: Final = 3
#: A YubiKey 4/5 stores at most 3,052 bytes in one data object.
MAX_OBJECT_SIZE: Final = 3052
#: A cached touch stays good this long on a YubiKey.
TOUCH_CACHE_SECONDS: Final = 15.0

OID_FIRMWARE_VERSION: Final = x509.ObjectIdentifier("1.3.6.1.4.1.41482.3.3")
OID_SERIAL_NUMBER: Final = x509.ObjectIdentifier("1.3.6.1.4.1.41482.3.7")
OID_PIN_TOUCH_POLICY: Final = x509.ObjectIdentifier("1.3.6.1.4.1.41482.3.8")
OID_FORM_FACTOR: Final = x509.ObjectIdentifier("1.3.6.1.4.1.41482.3.9")

FORM_FACTOR_USB_A_KEYCHAIN: Final = 0x01
FORM_FACTOR_USB_C_KEYCHAIN: Final = 0x03

_STATE_FORMAT: Final = "janus-virtual-piv/1"

# Status words (ISO 7816-4 as used by SP 800-73-4 and the YubiKey).
_SW_OK: Final = 0x9000
_SW_WRONG_LENGTH: Final = 0x6700
_SW_SECURITY: Final = 0x6982
_SW_BLOCKED: Final = 0x6983
_SW_CONDITIONS: Final = 0x6985
_SW_INCORRECT_DATA: Final = 0x6A80
_SW_FILE_NOT_FOUND: Final = 0x6A82
_SW_NO_SPACE: Final = 0x6A84
_SW_WRONG_P1P2: Final = 0x6A86
_SW_REFERENCE_NOT_FOUND: Final = 0x6A88
_SW_INS_NOT_SUPPORTED: Final = 0x6D00
_SW_CLA_NOT_SUPPORTED: Final = 0x6E00

_INS_VERIFY: Final = 0x20
_INS_CHANGE_REFERENCE: Final = 0x24
_INS_RESET_RETRY: Final = 0x2C
_INS_GENERATE: Final = 0x47
_INS_AUTHENTICATE: Final = 0x87
_INS_GET_DATA: Final = 0xCB
_INS_PUT_DATA: Final = 0xDB
_INS_MOVE_KEY: Final = 0xF6
_INS_GET_METADATA: Final = 0xF7
_INS_GET_SERIAL: Final = 0xF8
_INS_ATTEST: Final = 0xF9
_INS_SET_PIN_RETRIES: Final = 0xFA
_INS_RESET: Final = 0xFB
_INS_GET_VERSION: Final = 0xFD
_INS_IMPORT_KEY: Final = 0xFE
_INS_SET_MGMKEY: Final = 0xFF

_PIN_REF: Final = 0x80
_PUK_REF: Final = 0x81
_BIO_REF: Final = 0x96
_MGMT_SLOT: Final = 0x9B
_ATTESTATION_SLOT: Final = 0xF9
_SIGNATURE_SLOT: Final = 0x9C
_CARD_AUTH_SLOT: Final = 0x9E
_KEY_SLOTS: Final = frozenset({0x9A, 0x9C, 0x9D, 0x9E, *range(0x82, 0x96)})

_ORIGIN_GENERATED: Final = 1
_ORIGIN_IMPORTED: Final = 2
_PIN_LENGTH: Final = 8  # PIN and PUK travel padded with FF to eight bytes
_MIN_PIN_LENGTH: Final = 6

#: Objects a YubiKey only reads out after VERIFY (SP 800-73-4 part 1 table 3; PRINTED
#: also holds ykman's PIN-protected management key).
_PIN_PROTECTED_OBJECTS: Final = frozenset({0x5FC103, 0x5FC108, 0x5FC109, 0x5FC121})
_ATTESTATION_CERT_OBJECT: Final = 0x5FFF01
_DISCOVERY_OBJECT: Final = 0x7E

#: The attestation certificates' validity (a YubiKey copies the F9 certificate's dates).
_NOT_BEFORE: Final = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER: Final = datetime.datetime(2099, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


class KeyType(enum.IntEnum):
    """PIV algorithm identifiers (SP 800-78-4 table 6-2 plus Yubico's 25519 codes)."""

    ECCP256 = 0x11
    ECCP384 = 0x14
    ED25519 = 0xE0
    X25519 = 0xE1


class ManagementKeyType(enum.IntEnum):
    TDES = 0x03
    AES128 = 0x08
    AES192 = 0x0A
    AES256 = 0x0C

    @property
    def key_length(self) -> int:
        return {0x03: 24, 0x08: 16, 0x0A: 24, 0x0C: 32}[self.value]

    @property
    def block_size(self) -> int:
        return 8 if self is ManagementKeyType.TDES else 16


class PinPolicy(enum.IntEnum):
    DEFAULT = 0
    NEVER = 1
    ONCE = 2
    ALWAYS = 3
    MATCH_ONCE = 4
    MATCH_ALWAYS = 5


class TouchPolicy(enum.IntEnum):
    DEFAULT = 0
    NEVER = 1
    ALWAYS = 2
    CACHED = 3


_PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey

_CURVES: Final[dict[KeyType, ec.EllipticCurve]] = {
    KeyType.ECCP256: ec.SECP256R1(),
    KeyType.ECCP384: ec.SECP384R1(),
}
_PREHASH: Final[dict[KeyType, hashes.HashAlgorithm]] = {
    KeyType.ECCP256: hashes.SHA256(),
    KeyType.ECCP384: hashes.SHA384(),
}


# --------------------------------------------------------------------------------------
# Touch


@dataclass(frozen=True)
class TouchRequest:
    """What the card wants a touch for: ``operation`` is "sign", "ecdh" or
    "management-key"; ``slot`` the key reference (9B for the management key)."""

    operation: str
    slot: int


#: A person at the key: answers each touch request with approve, deny or timeout.
TouchHook = Callable[[TouchRequest], Presence]


def approve_always(request: TouchRequest) -> Presence:
    """The default hook: somebody touches the key every time it blinks."""
    return Presence.APPROVE


class ScriptedTouch(Scripted[TouchRequest]):
    """Scripted answers to the card's touch requests (see :class:`Scripted`)."""


# --------------------------------------------------------------------------------------
# BER-TLV, as far as PIV uses it (one- and two-byte tags, lengths up to 65535)


class _SwError(Exception):
    """Ends a command with a status word; caught in :meth:`VirtualPivApplet.process`."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"SW {sw:04X}")
        self.sw = sw


def _tlv(tag: int, value: bytes = b"") -> bytes:
    tag_bytes = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n <= 0xFF:
        length = bytes([0x81, n])
    else:
        length = b"\x82" + n.to_bytes(2, "big")
    return tag_bytes + length + value


def _parse_tlvs(data: bytes) -> list[tuple[int, bytes]]:
    """Splits concatenated TLVs; malformed input is 6A80 (wrong data) as on a card."""
    items: list[tuple[int, bytes]] = []
    i = 0
    try:
        while i < len(data):
            tag = data[i]
            i += 1
            if tag & 0x1F == 0x1F:  # multi-byte tag
                while True:
                    tag = tag << 8 | data[i]
                    i += 1
                    if not data[i - 1] & 0x80:
                        break
            n = data[i]
            i += 1
            if n == 0x81:
                n = data[i]
                i += 1
            elif n == 0x82:
                n = int.from_bytes(data[i : i + 2], "big")
                i += 2
            elif n > 0x80:
                raise _SwError(_SW_INCORRECT_DATA)
            if i + n > len(data):
                raise _SwError(_SW_INCORRECT_DATA)
            items.append((tag, data[i : i + n]))
            i += n
    except IndexError as exc:
        raise _SwError(_SW_INCORRECT_DATA) from exc
    return items


def _tlv_dict(data: bytes) -> dict[int, bytes]:
    return dict(_parse_tlvs(data))


def _dynamic_auth(data: bytes) -> dict[int, bytes]:
    """The items of GENERAL AUTHENTICATE's dynamic authentication template (7C)."""
    outer = _tlv_dict(data)
    if 0x7C not in outer:
        raise _SwError(_SW_INCORRECT_DATA)
    return _tlv_dict(outer[0x7C])


def _der_integer(value: int) -> bytes:
    """A non-negative INTEGER in DER (a leading zero keeps the top bit clear)."""
    return _tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _unpad_pin(padded: bytes) -> bytes:
    return padded.rstrip(b"\xff")


def _pad_pin(pin: bytes) -> bytes:
    return pin.ljust(_PIN_LENGTH, b"\xff")


# --------------------------------------------------------------------------------------
# Keys


def _public_encoding(key: _PrivateKey) -> bytes:
    """The public key as PIV carries it in tag 86: an uncompressed point or raw 25519."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _generate(key_type: KeyType) -> _PrivateKey:
    if key_type is KeyType.ED25519:
        return ed25519.Ed25519PrivateKey.generate()
    if key_type is KeyType.X25519:
        return x25519.X25519PrivateKey.generate()
    return ec.generate_private_key(_CURVES[key_type])


def _key_type_of(key: _PrivateKey) -> KeyType:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return KeyType.ED25519
    if isinstance(key, x25519.X25519PrivateKey):
        return KeyType.X25519
    for key_type, curve in _CURVES.items():
        if key.curve.name == curve.name:
            return key_type
    raise ValueError(f"unsupported curve {key.curve.name}")


@dataclass
class _SlotKey:
    """A private key in a slot, with its effective (never DEFAULT) policies."""

    private_key: _PrivateKey
    pin_policy: PinPolicy
    touch_policy: TouchPolicy
    generated: bool

    @property
    def key_type(self) -> KeyType:
        return _key_type_of(self.private_key)

    def to_json(self) -> dict[str, Any]:
        der = self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {
            "pkcs8": der.hex(),
            "pin_policy": int(self.pin_policy),
            "touch_policy": int(self.touch_policy),
            "generated": self.generated,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> _SlotKey:
        key = serialization.load_der_private_key(bytes.fromhex(data["pkcs8"]), password=None)
        if not isinstance(
            key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey
        ):
            raise ValueError("unsupported key type in state file")
        _key_type_of(key)
        return cls(
            key,
            PinPolicy(int(data["pin_policy"])),
            TouchPolicy(int(data["touch_policy"])),
            bool(data["generated"]),
        )


def _default_pin_policy(slot: int) -> PinPolicy:
    """YubiKey defaults: 9C always, 9E never, every other slot once."""
    if slot == _SIGNATURE_SLOT:
        return PinPolicy.ALWAYS
    if slot in (_CARD_AUTH_SLOT, _ATTESTATION_SLOT):
        return PinPolicy.NEVER
    return PinPolicy.ONCE


# --------------------------------------------------------------------------------------
# Attestation


@dataclass(frozen=True)
class AttestationRoot:
    """A CA that certifies virtual cards' attestation keys (Yubico's PIV CA in real life)."""

    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate


_ROOT_SEED: Final = b"janus virtual piv test root, v1"
_P384_ORDER: Final = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
    "581a0db248b0a77aecec196accc52973",
    16,
)


@functools.cache
def default_attestation_root() -> AttestationRoot:
    """The "Janus Virtual PIV Test Root": the same key and certificate in every process.

    Derived from a fixed seed (and signed with deterministic ECDSA) rather than stored, so
    a card process behind vpcd and the test process that verifies its attestations agree
    on the root without sharing a file.  Its private key is public knowledge: trust it in
    tests only.
    """
    scalar = int.from_bytes(hashlib.sha512(_ROOT_SEED).digest(), "big") % (_P384_ORDER - 1) + 1
    key = ec.derive_private_key(scalar, ec.SECP384R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Janus Virtual PIV Test Root"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Janus test devices (not Yubico)"),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(int.from_bytes(hashlib.sha256(_ROOT_SEED).digest()[:16], "big") >> 1)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384(), ecdsa_deterministic=True)
    )
    return AttestationRoot(key, certificate)


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _attestation_name(serial: int) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "Yubico PIV Attestation (virtual)"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Janus virtual PIV card"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)),
        ]
    )


def _issue_attestation_certificate(
    root: AttestationRoot, key: ec.EllipticCurvePrivateKey, serial: int
) -> x509.Certificate:
    """The F9 certificate: a CA (path length 0) under the test root, named per card."""
    return (
        x509.CertificateBuilder()
        .subject_name(_attestation_name(serial))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(root.private_key.public_key()),
            critical=False,
        )
        .sign(root.private_key, hashes.SHA256())
    )


# --------------------------------------------------------------------------------------
# Persistence


def _write_private_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` (0600): a crash leaves the old state or the new, never half."""
    replace_file(path, data)


# --------------------------------------------------------------------------------------
# The applet

#: A command handler: (applet, command, "the previous command was a successful VERIFY").
_Handler = Callable[["VirtualPivApplet", Command, bool], bytes]


class VirtualPivApplet:
    """The PIV application of a virtual YubiKey (implements :class:`hardware.card.Applet`).

    :param version: firmware version reported by GET VERSION; it also gates features as
        on real keys (serial ≥ 5.0, metadata ≥ 5.3, AES management keys ≥ 5.4, 25519 and
        MOVE KEY ≥ 5.7) and picks the default management key type.
    :param serial: the device serial; random (8 digits) when None.
    :param form_factor: the byte in the attestation's form factor extension.
    :param touch: the touch hook (see :class:`ScriptedTouch`); settable as ``.touch``.
    :param touch_timeout: seconds a :attr:`Presence.TIMEOUT` answer waits before 6982
        (a YubiKey waits about 15 s; tests pass a fraction of a second).
    :param state_path: JSON state file, loaded if present (then ``serial`` is ignored),
        created otherwise, rewritten on every change.
    :param attestation_root: the CA that signs the F9 certificate; the module's fixed
        test root by default.
    """

    aid = PIV_AID

    def __init__(
        self,
        *,
        version: tuple[int, int, int] = VERSION_5_7,
        serial: int | None = None,
        form_factor: int = FORM_FACTOR_USB_A_KEYCHAIN,
        touch: TouchHook = approve_always,
        touch_timeout: float = 15.0,
        state_path: Path | str | None = None,
        attestation_root: AttestationRoot | None = None,
    ) -> None:
        if len(version) != 3 or not all(0 <= v <= 255 for v in version):
            raise ValueError("version must be three bytes")
        if not 0 <= form_factor <= 0xFF:
            raise ValueError("form_factor must be one byte")
        self.version: tuple[int, int, int] = (version[0], version[1], version[2])
        self.form_factor = form_factor
        self.touch = touch
        self.touch_timeout = touch_timeout
        self._root = attestation_root or default_attestation_root()
        self._state_path = Path(state_path) if state_path is not None else None
        self._lock = threading.RLock()
        self._removed = threading.Event()

        # Persistent state.
        self.serial = serial if serial is not None else 10_000_000 + secrets.randbelow(80_000_000)
        self._pin = DEFAULT_PIN
        self._puk = DEFAULT_PUK
        self._pin_max = self._pin_left = DEFAULT_RETRIES
        self._puk_max = self._puk_left = DEFAULT_RETRIES
        self._mgmt_type = self._default_mgmt_type()
        self._mgmt_key = DEFAULT_MANAGEMENT_KEY
        self._mgmt_touch = False
        self._keys: dict[int, _SlotKey] = {}
        self._objects: dict[int, bytes] = {_DISCOVERY_OBJECT: _DISCOVERY}

        # Volatile state (lost on SELECT, reset and removal).
        self._pin_verified = False
        self._pin_just_verified = False  # the previous command was a successful VERIFY
        self._mgmt_authenticated = False
        self._witness: bytes | None = None
        self._card_challenge: bytes | None = None
        self._last_touch: float | None = None

        if self._state_path is not None and self._state_path.exists():
            self._load(self._state_path)
        else:
            self._create_attestation_key()
            self._save()

    # ---------------------------------------------------------------- public helpers

    @property
    def attestation_root_certificate(self) -> x509.Certificate:
        """The root that the F9 certificate chains to: what a verifier must trust."""
        return self._root.certificate

    @property
    def attestation_certificate(self) -> x509.Certificate | None:
        """The F9 certificate as stored in object 5FFF01 (None if deleted or unreadable)."""
        stored = self._objects.get(_ATTESTATION_CERT_OBJECT)
        if stored is None:
            return None
        try:
            return x509.load_der_x509_certificate(_tlv_dict(_tlv_dict(stored)[0x53])[0x70])
        except (_SwError, KeyError, ValueError):
            return None

    def on_card_removed(self) -> None:
        """The card left the reader: volatile state is gone; a touch wait ends."""
        self._removed.set()
        with self._lock:
            self._clear_session()
            self._last_touch = None

    def on_card_inserted(self) -> None:
        self._removed.clear()

    # ---------------------------------------------------------------- Applet protocol

    def select(self) -> tuple[bytes, int]:
        with self._lock:
            self._clear_session()
        return _SELECT_RESPONSE, _SW_OK

    def deselect(self) -> None:
        with self._lock:
            self._clear_session()

    def process(self, command: Command) -> tuple[bytes, int]:
        with self._lock:
            just_verified, self._pin_just_verified = self._pin_just_verified, False
            if command.ins != _INS_AUTHENTICATE or command.p2 != _MGMT_SLOT:
                self._witness = self._card_challenge = None
            if command.cla & ~0x10:
                return b"", _SW_CLA_NOT_SUPPORTED
            handler = self._handlers.get(command.ins)
            if handler is None:
                return b"", _SW_INS_NOT_SUPPORTED
            try:
                return handler(self, command, just_verified), _SW_OK
            except _SwError as exc:
                return b"", exc.sw

    # ---------------------------------------------------------------- internals

    def _default_mgmt_type(self) -> ManagementKeyType:
        return ManagementKeyType.AES192 if self.version >= (5, 7, 0) else ManagementKeyType.TDES

    def _clear_session(self) -> None:
        self._pin_verified = False
        self._pin_just_verified = False
        self._mgmt_authenticated = False
        self._witness = None
        self._card_challenge = None

    def _create_attestation_key(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        self._keys[_ATTESTATION_SLOT] = _SlotKey(key, PinPolicy.NEVER, TouchPolicy.NEVER, False)
        cert = _issue_attestation_certificate(self._root, key, self.serial)
        der = cert.public_bytes(serialization.Encoding.DER)
        self._objects[_ATTESTATION_CERT_OBJECT] = _tlv(
            0x53, _tlv(0x70, der) + _tlv(0x71, b"\x00") + _tlv(0xFE)
        )

    def _require_version(self, minimum: tuple[int, int, int]) -> None:
        if self.version < minimum:
            raise _SwError(_SW_INS_NOT_SUPPORTED)

    def _require_mgmt(self) -> None:
        if not self._mgmt_authenticated:
            raise _SwError(_SW_SECURITY)

    def _collect_touch(self, operation: str, slot: int, policy: TouchPolicy) -> None:
        """Blink and wait for a touch, as the key's LED would ask a person."""
        if policy is TouchPolicy.NEVER:
            return
        now = time.monotonic()
        if (
            policy is TouchPolicy.CACHED
            and self._last_touch is not None
            and now - self._last_touch < TOUCH_CACHE_SECONDS
        ):
            return
        decision = self.touch(TouchRequest(operation, slot))
        if decision is Presence.TIMEOUT:
            self._removed.wait(self.touch_timeout)
        if self._removed.is_set():
            raise CardRemovedError("card removed while waiting for touch")
        if decision is not Presence.APPROVE:
            raise _SwError(_SW_SECURITY)
        self._last_touch = time.monotonic()

    # ---------------------------------------------------------------- simple getters

    def _get_version(self, cmd: Command, just_verified: bool) -> bytes:
        return bytes(self.version)

    def _get_serial(self, cmd: Command, just_verified: bool) -> bytes:
        self._require_version((5, 0, 0))
        return self.serial.to_bytes(4, "big")

    def _get_metadata(self, cmd: Command, just_verified: bool) -> bytes:
        """Yubico's GET METADATA: 01 algorithm, 02 policies, 03 origin, 04 public key,
        05 default value, 06 retries (total, remaining)."""
        self._require_version((5, 3, 0))
        if cmd.p1 != 0:
            raise _SwError(_SW_WRONG_P1P2)
        ref = cmd.p2
        if ref == _MGMT_SLOT:
            touch = TouchPolicy.ALWAYS if self._mgmt_touch else TouchPolicy.NEVER
            return (
                _tlv(0x01, bytes([self._mgmt_type]))
                + _tlv(0x02, bytes([0, touch]))
                + _tlv(0x05, bytes([self._mgmt_key == DEFAULT_MANAGEMENT_KEY]))
            )
        if ref in (_PIN_REF, _PUK_REF):
            value, default, total, left = (
                (self._pin, DEFAULT_PIN, self._pin_max, self._pin_left)
                if ref == _PIN_REF
                else (self._puk, DEFAULT_PUK, self._puk_max, self._puk_left)
            )
            return (
                _tlv(0x01, b"\xff")
                + _tlv(0x05, bytes([value == default]))
                + _tlv(0x06, bytes([total, left]))
            )
        key = self._keys.get(ref)
        if key is None:
            raise _SwError(_SW_REFERENCE_NOT_FOUND)
        return (
            _tlv(0x01, bytes([key.key_type]))
            + _tlv(0x02, bytes([key.pin_policy, key.touch_policy]))
            + _tlv(0x03, bytes([_ORIGIN_GENERATED if key.generated else _ORIGIN_IMPORTED]))
            + _tlv(0x04, _tlv(0x86, _public_encoding(key.private_key)))
        )

    # ---------------------------------------------------------------- PIN and PUK

    def _verify(self, cmd: Command, just_verified: bool) -> bytes:
        if cmd.p2 != _PIN_REF:
            raise _SwError(_SW_REFERENCE_NOT_FOUND)
        if cmd.p1 == 0xFF:  # SP 800-73-4 3.2.1: reset the security status
            if cmd.data:
                raise _SwError(_SW_INCORRECT_DATA)
            self._pin_verified = False
            return b""
        if cmd.p1 != 0:
            raise _SwError(_SW_WRONG_P1P2)
        if not cmd.data:  # "how many tries are left?" (or 9000 when verified)
            if self._pin_left == 0:
                raise _SwError(_SW_BLOCKED)
            if self._pin_verified:
                return b""
            raise _SwError(0x63C0 | min(self._pin_left, 15))
        if len(cmd.data) != _PIN_LENGTH:
            raise _SwError(_SW_INCORRECT_DATA)
        self._check_reference(_PIN_REF, cmd.data)  # a failure leaves the status as it was
        self._pin_verified = True
        self._pin_just_verified = True
        return b""

    def _check_reference(self, ref: int, padded: bytes) -> None:
        """Compares a PIN or PUK, counting down its tries; 63Cx or 6983 on failure."""
        if ref == _PIN_REF:
            stored, left, total = self._pin, self._pin_left, self._pin_max
        else:
            stored, left, total = self._puk, self._puk_left, self._puk_max
        if left == 0:
            raise _SwError(_SW_BLOCKED)
        ok = hmac.compare_digest(_pad_pin(stored), padded)
        new_left = total if ok else left - 1
        if ref == _PIN_REF:
            self._pin_left = new_left
        else:
            self._puk_left = new_left
        if new_left != left:
            self._save()
        if not ok:
            raise _SwError(0x63C0 | min(new_left, 15))

    @staticmethod
    def _new_value(padded: bytes) -> bytes:
        value = _unpad_pin(padded)
        if len(value) < _MIN_PIN_LENGTH or b"\xff" in value:
            raise _SwError(_SW_INCORRECT_DATA)
        return value

    def _change_reference(self, cmd: Command, just_verified: bool) -> bytes:
        if cmd.p1 != 0 or cmd.p2 not in (_PIN_REF, _PUK_REF):
            raise _SwError(_SW_REFERENCE_NOT_FOUND)
        if len(cmd.data) != 2 * _PIN_LENGTH:
            raise _SwError(_SW_INCORRECT_DATA)
        self._check_reference(cmd.p2, cmd.data[:_PIN_LENGTH])
        new = self._new_value(cmd.data[_PIN_LENGTH:])
        if cmd.p2 == _PIN_REF:
            self._pin = new
        else:
            self._puk = new
        self._save()
        return b""

    def _reset_retry(self, cmd: Command, just_verified: bool) -> bytes:
        """Unblock (and set) the PIN with the PUK."""
        if cmd.p1 != 0 or cmd.p2 != _PIN_REF:
            raise _SwError(_SW_REFERENCE_NOT_FOUND)
        if len(cmd.data) != 2 * _PIN_LENGTH:
            raise _SwError(_SW_INCORRECT_DATA)
        self._check_reference(_PUK_REF, cmd.data[:_PIN_LENGTH])
        self._pin = self._new_value(cmd.data[_PIN_LENGTH:])
        self._pin_left = self._pin_max
        self._save()
        return b""

    def _set_pin_retries(self, cmd: Command, just_verified: bool) -> bytes:
        """Yubico's SET PIN RETRIES: needs management key and PIN; resets PIN and PUK."""
        self._require_mgmt()
        if not self._pin_verified:
            raise _SwError(_SW_SECURITY)
        if not 1 <= cmd.p1 <= 0xFF or not 1 <= cmd.p2 <= 0xFF:
            raise _SwError(_SW_WRONG_P1P2)
        self._pin_max = self._pin_left = cmd.p1
        self._puk_max = self._puk_left = cmd.p2
        self._pin, self._puk = DEFAULT_PIN, DEFAULT_PUK
        self._save()
        return b""

    def _reset(self, cmd: Command, just_verified: bool) -> bytes:
        """Yubico's RESET: only with PIN and PUK blocked; the F9 key and cert survive."""
        if self._pin_left or self._puk_left:
            raise _SwError(_SW_CONDITIONS)
        attestation_key = self._keys.get(_ATTESTATION_SLOT)
        attestation_cert = self._objects.get(_ATTESTATION_CERT_OBJECT)
        self._pin, self._puk = DEFAULT_PIN, DEFAULT_PUK
        self._pin_max = self._pin_left = DEFAULT_RETRIES
        self._puk_max = self._puk_left = DEFAULT_RETRIES
        self._mgmt_type = self._default_mgmt_type()
        self._mgmt_key = DEFAULT_MANAGEMENT_KEY
        self._mgmt_touch = False
        self._keys = {}
        self._objects = {_DISCOVERY_OBJECT: _DISCOVERY}
        if attestation_key is not None:
            self._keys[_ATTESTATION_SLOT] = attestation_key
        if attestation_cert is not None:
            self._objects[_ATTESTATION_CERT_OBJECT] = attestation_cert
        self._clear_session()
        self._save()
        return b""

    # ---------------------------------------------------------------- management key

    def _mgmt_cipher(self) -> Cipher[modes.ECB]:
        algorithm = (
            TripleDES(self._mgmt_key)
            if self._mgmt_type is ManagementKeyType.TDES
            else algorithms.AES(self._mgmt_key)
        )
        # One block each way, as the protocol prescribes: ECB is what PIV specifies.
        return Cipher(algorithm, modes.ECB())  # noqa: S305

    def _encrypt_block(self, block: bytes) -> bytes:
        encryptor = self._mgmt_cipher().encryptor()
        return encryptor.update(block) + encryptor.finalize()

    def _authenticate_management_key(self, cmd: Command) -> bytes:
        """SP 800-73-4 appendix A.1: mutual (80/81/82) or card challenge (81, then 82)."""
        if cmd.p1 != self._mgmt_type:
            raise _SwError(_SW_INCORRECT_DATA)
        items = _dynamic_auth(cmd.data)
        size = self._mgmt_type.block_size
        witness, self._witness = self._witness, None
        card_challenge, self._card_challenge = self._card_challenge, None
        if items.get(0x80) == b"" and len(items) == 1:  # step 1: ask for a witness
            self._mgmt_authenticated = False
            self._witness = secrets.token_bytes(size)
            return _tlv(0x7C, _tlv(0x80, self._encrypt_block(self._witness)))
        if 0x80 in items and 0x81 in items:  # step 2: decrypted witness + host challenge
            challenge = items[0x81]
            if witness is None:
                raise _SwError(_SW_CONDITIONS)
            if len(challenge) != size or not hmac.compare_digest(items[0x80], witness):
                raise _SwError(_SW_SECURITY)
            if self._mgmt_touch:
                self._collect_touch("management-key", _MGMT_SLOT, TouchPolicy.ALWAYS)
            self._mgmt_authenticated = True
            return _tlv(0x7C, _tlv(0x82, self._encrypt_block(challenge)))
        if items.get(0x81) == b"" and len(items) == 1:  # one-way: card challenge
            self._mgmt_authenticated = False
            self._card_challenge = secrets.token_bytes(size)
            return _tlv(0x7C, _tlv(0x81, self._card_challenge))
        if 0x82 in items and len(items) == 1 and card_challenge is not None:
            if not hmac.compare_digest(items[0x82], self._encrypt_block(card_challenge)):
                raise _SwError(_SW_SECURITY)
            if self._mgmt_touch:
                self._collect_touch("management-key", _MGMT_SLOT, TouchPolicy.ALWAYS)
            self._mgmt_authenticated = True
            return b""
        raise _SwError(_SW_INCORRECT_DATA)

    def _set_management_key(self, cmd: Command, just_verified: bool) -> bytes:
        self._require_mgmt()
        if cmd.p1 != 0xFF or cmd.p2 not in (0xFE, 0xFF):
            raise _SwError(_SW_WRONG_P1P2)
        if len(cmd.data) < 1:
            raise _SwError(_SW_INCORRECT_DATA)
        try:
            key_type = ManagementKeyType(cmd.data[0])
        except ValueError as exc:
            raise _SwError(_SW_INCORRECT_DATA) from exc
        if key_type is not ManagementKeyType.TDES and self.version < (5, 4, 0):
            raise _SwError(_SW_INCORRECT_DATA)
        items = _parse_tlvs(cmd.data[1:])
        if len(items) != 1 or items[0][0] != _MGMT_SLOT:
            raise _SwError(_SW_INCORRECT_DATA)
        key = items[0][1]
        if len(key) != key_type.key_length:
            raise _SwError(_SW_INCORRECT_DATA)
        self._mgmt_type, self._mgmt_key = key_type, key
        self._mgmt_touch = cmd.p2 == 0xFE
        self._save()
        return b""

    # ---------------------------------------------------------------- keys

    def _parse_policies(self, items: dict[int, bytes], slot: int) -> tuple[PinPolicy, TouchPolicy]:
        try:
            pin = PinPolicy(items.get(0xAA, b"\x00")[0])
            touch = TouchPolicy(items.get(0xAB, b"\x00")[0])
        except (ValueError, IndexError) as exc:
            raise _SwError(_SW_INCORRECT_DATA) from exc
        if pin in (PinPolicy.MATCH_ONCE, PinPolicy.MATCH_ALWAYS):  # no fingerprint sensor
            raise _SwError(_SW_INCORRECT_DATA)
        if touch is TouchPolicy.CACHED and self.version < (4, 3, 0):
            raise _SwError(_SW_INCORRECT_DATA)
        if pin is PinPolicy.DEFAULT:
            pin = _default_pin_policy(slot)
        if touch is TouchPolicy.DEFAULT:
            touch = TouchPolicy.NEVER
        return pin, touch

    def _key_type(self, code: int) -> KeyType:
        try:
            key_type = KeyType(code)
        except ValueError as exc:  # RSA and anything unknown
            raise _SwError(_SW_INCORRECT_DATA) from exc
        if key_type in (KeyType.ED25519, KeyType.X25519) and self.version < (5, 7, 0):
            raise _SwError(_SW_INCORRECT_DATA)
        return key_type

    def _generate_key(self, cmd: Command, just_verified: bool) -> bytes:
        self._require_mgmt()
        if cmd.p1 != 0 or cmd.p2 not in _KEY_SLOTS:
            raise _SwError(_SW_WRONG_P1P2)
        template = _tlv_dict(cmd.data)
        if 0xAC not in template:
            raise _SwError(_SW_INCORRECT_DATA)
        items = _tlv_dict(template[0xAC])
        if len(items.get(0x80, b"")) != 1:
            raise _SwError(_SW_INCORRECT_DATA)
        key_type = self._key_type(items[0x80][0])
        pin, touch = self._parse_policies(items, cmd.p2)
        key = _generate(key_type)
        self._keys[cmd.p2] = _SlotKey(key, pin, touch, generated=True)
        self._save()
        return _tlv(0x7F49, _tlv(0x86, _public_encoding(key)))

    def _import_key(self, cmd: Command, just_verified: bool) -> bytes:
        self._require_mgmt()
        if cmd.p2 not in _KEY_SLOTS and cmd.p2 != _ATTESTATION_SLOT:
            raise _SwError(_SW_WRONG_P1P2)
        key_type = self._key_type(cmd.p1)
        items = _tlv_dict(cmd.data)
        key: _PrivateKey
        try:
            if key_type is KeyType.ED25519:
                key = ed25519.Ed25519PrivateKey.from_private_bytes(items[0x07])
            elif key_type is KeyType.X25519:
                key = x25519.X25519PrivateKey.from_private_bytes(items[0x08])
            else:
                curve = _CURVES[key_type]
                scalar = items[0x06]
                if len(scalar) != (curve.key_size + 7) // 8:
                    raise _SwError(_SW_INCORRECT_DATA)
                key = ec.derive_private_key(int.from_bytes(scalar, "big"), curve)
        except (KeyError, ValueError) as exc:
            raise _SwError(_SW_INCORRECT_DATA) from exc
        pin, touch = self._parse_policies(items, cmd.p2)
        self._keys[cmd.p2] = _SlotKey(key, pin, touch, generated=False)
        self._save()
        return b""

    def _move_key(self, cmd: Command, just_verified: bool) -> bytes:
        """Yubico's MOVE KEY (5.7): P1 destination (FF deletes), P2 source."""
        self._require_version((5, 7, 0))
        self._require_mgmt()
        source, destination = cmd.p2, cmd.p1
        if source not in _KEY_SLOTS or (destination != 0xFF and destination not in _KEY_SLOTS):
            raise _SwError(_SW_WRONG_P1P2)
        key = self._keys.pop(source, None)
        if key is None:
            raise _SwError(_SW_REFERENCE_NOT_FOUND)
        if destination != 0xFF:
            self._keys[destination] = key
        self._save()
        return b""

    def _authenticate(self, cmd: Command, just_verified: bool) -> bytes:
        if cmd.p2 == _MGMT_SLOT:
            return self._authenticate_management_key(cmd)
        key = self._keys.get(cmd.p2)
        if cmd.p2 not in _KEY_SLOTS or key is None or cmd.p1 != key.key_type:
            raise _SwError(_SW_INCORRECT_DATA)
        items = _dynamic_auth(cmd.data)
        if items.get(0x82) != b"":
            raise _SwError(_SW_INCORRECT_DATA)
        if 0x81 in items:
            operation, payload = "sign", items[0x81]
        elif 0x85 in items:
            operation, payload = "ecdh", items[0x85]
        else:
            raise _SwError(_SW_INCORRECT_DATA)
        compute = self._signer(key, payload) if operation == "sign" else self._ecdh(key, payload)
        self._check_pin_policy(key.pin_policy, just_verified)
        self._collect_touch(operation, cmd.p2, key.touch_policy)
        return _tlv(0x7C, _tlv(0x82, compute()))

    def _check_pin_policy(self, policy: PinPolicy, just_verified: bool) -> None:
        if policy is PinPolicy.NEVER:
            return
        if not self._pin_verified:
            raise _SwError(_SW_SECURITY)
        if policy in (PinPolicy.ALWAYS, PinPolicy.MATCH_ALWAYS) and not just_verified:
            raise _SwError(_SW_SECURITY)

    @staticmethod
    def _signer(key: _SlotKey, message: bytes) -> Callable[[], bytes]:
        """Checks the input now, signs later (after PIN and touch): a bad request costs
        neither a PIN "always" verification nor a touch."""
        private_key = key.private_key
        if isinstance(private_key, ed25519.Ed25519PrivateKey):
            return lambda: private_key.sign(message)
        if isinstance(private_key, ec.EllipticCurvePrivateKey):
            size = (private_key.curve.key_size + 7) // 8
            if len(message) > size:
                raise _SwError(_SW_INCORRECT_DATA)
            # A shorter digest is the same integer left-padded (SEC 1 4.1.3 step 5).
            digest = message.rjust(size, b"\x00")
            algorithm = ec.ECDSA(Prehashed(_PREHASH[key.key_type]))
            return lambda: private_key.sign(digest, algorithm)
        raise _SwError(_SW_INCORRECT_DATA)  # X25519 cannot sign

    @staticmethod
    def _ecdh(key: _SlotKey, peer: bytes) -> Callable[[], bytes]:
        private_key = key.private_key
        try:
            if isinstance(private_key, x25519.X25519PrivateKey):
                x_peer = x25519.X25519PublicKey.from_public_bytes(peer)
                return lambda: private_key.exchange(x_peer)
            if isinstance(private_key, ec.EllipticCurvePrivateKey):
                if len(peer) < 1 or peer[0] != 0x04:  # uncompressed points only
                    raise _SwError(_SW_INCORRECT_DATA)
                ec_peer = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, peer)
                return lambda: private_key.exchange(ec.ECDH(), ec_peer)
        except (ValueError, InvalidKey) as exc:
            raise _SwError(_SW_INCORRECT_DATA) from exc
        raise _SwError(_SW_INCORRECT_DATA)  # Ed25519 cannot agree keys

    # ---------------------------------------------------------------- data objects

    @staticmethod
    def _object_id(data: bytes) -> tuple[int, bytes]:
        """Splits 5C{id} from the rest; ids are 7E, 7F61 or 5FC1xx/5FFFxx."""
        items = _parse_tlvs(data)
        if not items or items[0][0] != 0x5C:
            raise _SwError(_SW_INCORRECT_DATA)
        raw = items[0][1]
        object_id = int.from_bytes(raw, "big")
        valid = (
            (len(raw) == 1 and object_id == _DISCOVERY_OBJECT)
            or (len(raw) == 2 and object_id == 0x7F61)
            or (len(raw) == 3 and (object_id >> 8) in (0x5FC1, 0x5FFF))
        )
        if not valid:
            raise _SwError(_SW_INCORRECT_DATA)
        header = len(_tlv(0x5C, raw))
        return object_id, data[header:]

    def _get_data(self, cmd: Command, just_verified: bool) -> bytes:
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF):
            raise _SwError(_SW_WRONG_P1P2)
        object_id, rest = self._object_id(cmd.data)
        if rest:
            raise _SwError(_SW_INCORRECT_DATA)
        if object_id in _PIN_PROTECTED_OBJECTS and not self._pin_verified:
            raise _SwError(_SW_SECURITY)
        stored = self._objects.get(object_id)
        if stored is None:
            raise _SwError(_SW_FILE_NOT_FOUND)
        return stored

    def _put_data(self, cmd: Command, just_verified: bool) -> bytes:
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF):
            raise _SwError(_SW_WRONG_P1P2)
        self._require_mgmt()
        object_id, rest = self._object_id(cmd.data)
        items = _parse_tlvs(rest)
        expected_tag = _DISCOVERY_OBJECT if object_id == _DISCOVERY_OBJECT else 0x53
        if len(items) != 1 or items[0][0] != expected_tag:
            raise _SwError(_SW_INCORRECT_DATA)
        value = items[0][1]
        if len(value) > MAX_OBJECT_SIZE:
            raise _SwError(_SW_NO_SPACE)
        if value:
            self._objects[object_id] = _tlv(expected_tag, value)
        else:
            self._objects.pop(object_id, None)
        self._save()
        return b""

    # ---------------------------------------------------------------- attestation

    def _attest(self, cmd: Command, just_verified: bool) -> bytes:
        """Yubico's ATTEST (4.3): a certificate for a key generated on the card."""
        self._require_version((4, 3, 0))
        if cmd.p1 not in _KEY_SLOTS or cmd.p2 != 0:
            raise _SwError(_SW_WRONG_P1P2)
        key = self._keys.get(cmd.p1)
        if key is None:
            raise _SwError(_SW_REFERENCE_NOT_FOUND)
        if not key.generated:
            raise _SwError(_SW_INCORRECT_DATA)
        signer = self._keys.get(_ATTESTATION_SLOT)
        if signer is None:
            raise _SwError(_SW_REFERENCE_NOT_FOUND)
        issuer_cert = self.attestation_certificate
        issuer = issuer_cert.subject if issuer_cert is not None else _attestation_name(self.serial)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    [
                        x509.NameAttribute(
                            NameOID.COMMON_NAME, f"YubiKey PIV Attestation {cmd.p1:02x}"
                        )
                    ]
                )
            )
            .issuer_name(issuer)
            .public_key(key.private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(issuer_cert.not_valid_before_utc if issuer_cert else _NOT_BEFORE)
            .not_valid_after(issuer_cert.not_valid_after_utc if issuer_cert else _NOT_AFTER)
            .add_extension(
                x509.UnrecognizedExtension(OID_FIRMWARE_VERSION, bytes(self.version)), False
            )
            .add_extension(
                x509.UnrecognizedExtension(OID_SERIAL_NUMBER, _der_integer(self.serial)), False
            )
            .add_extension(
                x509.UnrecognizedExtension(
                    OID_PIN_TOUCH_POLICY, bytes([key.pin_policy, key.touch_policy])
                ),
                False,
            )
            .add_extension(
                x509.UnrecognizedExtension(OID_FORM_FACTOR, bytes([self.form_factor])), False
            )
        )
        signing_key = signer.private_key
        if isinstance(signing_key, ec.EllipticCurvePrivateKey):
            certificate = builder.sign(signing_key, hashes.SHA256())
        elif isinstance(signing_key, ed25519.Ed25519PrivateKey):
            certificate = builder.sign(signing_key, None)
        else:
            raise _SwError(_SW_INCORRECT_DATA)
        return certificate.public_bytes(serialization.Encoding.DER)

    _handlers: Final[dict[int, _Handler]] = {
        _INS_VERIFY: _verify,
        _INS_CHANGE_REFERENCE: _change_reference,
        _INS_RESET_RETRY: _reset_retry,
        _INS_GENERATE: _generate_key,
        _INS_AUTHENTICATE: _authenticate,
        _INS_GET_DATA: _get_data,
        _INS_PUT_DATA: _put_data,
        _INS_MOVE_KEY: _move_key,
        _INS_GET_METADATA: _get_metadata,
        _INS_GET_SERIAL: _get_serial,
        _INS_ATTEST: _attest,
        _INS_SET_PIN_RETRIES: _set_pin_retries,
        _INS_RESET: _reset,
        _INS_GET_VERSION: _get_version,
        _INS_IMPORT_KEY: _import_key,
        _INS_SET_MGMKEY: _set_management_key,
    }

    # ---------------------------------------------------------------- persistence

    def _save(self) -> None:
        if self._state_path is None:
            return
        state = {
            "format": _STATE_FORMAT,
            "serial": self.serial,
            "pin": self._pin.hex(),
            "puk": self._puk.hex(),
            "pin_retries": [self._pin_max, self._pin_left],
            "puk_retries": [self._puk_max, self._puk_left],
            "management_key": {
                "type": int(self._mgmt_type),
                "key": self._mgmt_key.hex(),
                "touch": self._mgmt_touch,
            },
            "keys": {f"{slot:02x}": key.to_json() for slot, key in sorted(self._keys.items())},
            "objects": {f"{oid:x}": value.hex() for oid, value in sorted(self._objects.items())},
        }
        encoded = json.dumps(state, indent=1, sort_keys=True).encode("utf-8")
        _write_private_atomically(self._state_path, encoded)

    def _load(self, path: Path) -> None:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"{path}: not a {_STATE_FORMAT} state file")
        try:
            self.serial = int(state["serial"])
            self._pin = bytes.fromhex(state["pin"])
            self._puk = bytes.fromhex(state["puk"])
            self._pin_max, self._pin_left = (int(v) for v in state["pin_retries"])
            self._puk_max, self._puk_left = (int(v) for v in state["puk_retries"])
            mgmt = state["management_key"]
            self._mgmt_type = ManagementKeyType(int(mgmt["type"]))
            self._mgmt_key = bytes.fromhex(mgmt["key"])
            self._mgmt_touch = bool(mgmt["touch"])
            self._keys = {int(s, 16): _SlotKey.from_json(k) for s, k in state["keys"].items()}
            self._objects = {int(o, 16): bytes.fromhex(v) for o, v in state["objects"].items()}
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed virtual PIV state file: {exc!r}") from exc
        if len(self._mgmt_key) != self._mgmt_type.key_length:
            raise ValueError(f"{path}: management key length does not match its type")


# --------------------------------------------------------------------------------------
# Card composition


def make_card(
    *,
    piv: VirtualPivApplet | None = None,
    extra_applets: Sequence[Applet] = (),
    atr: bytes = YUBIKEY_ATR,
) -> VirtualCard:
    """A virtual card with the PIV applet (a fresh 5.7 one by default) and any others
    (FIDO2, OpenPGP, …) that share the card, as on a YubiKey."""
    return VirtualCard([piv if piv is not None else VirtualPivApplet(), *extra_applets], atr)


class VirtualYubiKey:
    """A virtual YubiKey: the card, its PIV applet, and the hands that pull it out.

    ``VirtualYubiKey(piv=VirtualPivApplet(version=VERSION_5_4))`` gives an old-firmware
    key; :meth:`connect` returns yubikit's connection (``TRANSPORT.NFC`` makes yubikit use
    short APDUs with chaining, as over NFC).
    """

    def __init__(
        self,
        *,
        piv: VirtualPivApplet | None = None,
        extra_applets: Sequence[Applet] = (),
    ) -> None:
        self.piv = piv if piv is not None else VirtualPivApplet()
        self.card = make_card(piv=self.piv, extra_applets=extra_applets)

    @property
    def serial(self) -> int:
        return self.piv.serial

    def connect(self, transport: TRANSPORT = TRANSPORT.USB) -> InProcessConnection:
        return InProcessConnection(self.card, transport)

    def remove(self) -> None:
        """Pull the card: later APDUs raise ``CardRemovedError``; a touch wait ends."""
        self.card.removed = True
        self.piv.on_card_removed()

    def insert(self) -> None:
        """Put the card back: powered up afresh, nothing selected or verified."""
        self.piv.on_card_inserted()
        self.card.power_off()
        self.card.removed = False
