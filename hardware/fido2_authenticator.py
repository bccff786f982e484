"""A software CTAP 2.1 authenticator that python-fido2 drives as an in-process ``CtapDevice``.

Why this exists: no usable software authenticator with PIN/UV auth protocol 2 and
hmac-secret exists on PyPI or in Debian, and CI has no USB security key.  This one lets
the tests drive fido2's *real* client code (``Ctap2``, ``ClientPin``, ``Fido2Client``)
end to end, and lets a relying party (``Fido2Server``) verify what it signs.

What it implements (section numbers are CTAP 2.1, Proposed Standard, 2021-06-15):

* CTAPHID framing only as far as an in-process device needs it (§11.2.9): CBOR, PING,
  WINK and INIT; no CTAP1/U2F (``CAPABILITY.NMSG``).
* authenticatorMakeCredential (§6.1): ES256 only, packed self attestation or "none",
  discoverable credentials, excludeList, the hmac-secret extension flag.
* authenticatorGetAssertion (§6.2) and authenticatorGetNextAssertion (§6.3): allowList
  and discoverable credentials, per-credential signature counters, hmac-secret (§12.5)
  with one or two salts under PIN/UV auth protocol 1 or 2.
* authenticatorGetInfo (§6.4), authenticatorReset (§6.6), authenticatorSelection (§6.9).
* authenticatorClientPIN (§6.5) with PIN/UV auth protocols one and two (§6.5.6, §6.5.7):
  getPINRetries, getKeyAgreement, setPIN, changePIN, getPinToken and
  getPinUvAuthTokenUsingPinWithPermissions (§6.5.5.7.2), retry counting, the
  three-strikes power-cycle lock and the permanent PIN block.

What it does not: built-in UV (no fingerprint: ``uv`` is absent from getInfo), credProtect,
credBlob, largeBlobs, credentialManagement, authenticatorConfig, enterprise attestation,
algorithms other than ES256, attestation certificates (self attestation only).

User presence is a pluggable policy (:data:`PresencePolicy`) instead of a button: it
answers approve, deny or timeout, and the authenticator turns that into success,
``CTAP2_ERR_OPERATION_DENIED`` or, after ``presence_timeout`` seconds of keepalives,
``CTAP2_ERR_USER_ACTION_TIMEOUT``.  Nothing is printed: telling a person to touch their
key is the caller's job (fido2 calls ``UserInteraction.prompt_up`` on the keepalive).

State lives in memory and, when ``state_path`` is given, in a JSON file (mode 0600,
replaced atomically on every change).  That file holds the credential private keys and
the PIN hash in the clear: it is a test device, not a keystore.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import hmac
import json
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from threading import Event
from typing import Any, Final, Generic, Literal, TypeVar

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from fido2 import cbor
from fido2.ctap import STATUS, CtapDevice, CtapError
from fido2.hid import CAPABILITY, CTAPHID

from janus_hsm.atomic_file import replace_file

__all__ = [
    "AAGUID",
    "Presence",
    "PresencePolicy",
    "PresenceRequest",
    "ScriptedPresence",
    "SoftwareAuthenticator",
    "StoredCredential",
    "approve_always",
]

ERR = CtapError.ERR

#: The model identifier of this authenticator (random, fixed: AAGUIDs name a model).
AAGUID: Final = bytes.fromhex("e5465697e9424d81827941fec508663d")
#: The largest CTAP message accepted and advertised (§6.4 maxMsgSize).
MAX_MSG_SIZE: Final = 1200
#: Credential IDs are random; getInfo advertises a bound so clients filter foreign IDs.
CREDENTIAL_ID_LENGTH: Final = 32
MAX_CREDENTIAL_ID_LENGTH: Final = 64
#: How many allowList entries one getAssertion may carry (§6.4 maxCredentialCountInList).
MAX_CREDENTIALS_IN_LIST: Final = 8
#: §6.5.1: at least 4 Unicode code points, at most 63 bytes of UTF-8.
MIN_PIN_LENGTH: Final = 4
MAX_PIN_BYTES: Final = 63
#: §6.5.2: eight tries in all, and a power cycle after three wrong ones in a row.
DEFAULT_PIN_RETRIES: Final = 8
_CONSECUTIVE_MISMATCH_LIMIT: Final = 3
#: A pinUvAuthToken is usable this long after it was issued (§6.5.2.1 allows ≤ 10 min).
TOKEN_LIFETIME: Final = 600.0
#: getNextAssertion state expires after 30 s (§6.3).
_NEXT_ASSERTION_WINDOW: Final = 30.0
#: §6.6: reset is only accepted within 10 s of power-up.
RESET_WINDOW: Final = 10.0

_ES256: Final = -7
_ECDH_ES_HKDF_256: Final = -25
_SALT_LENGTH: Final = 32
_HMAC_EXTENSION_ID: Final = "hmac-secret"

# Authenticator data flags (WebAuthn §6.1).
_FLAG_UP: Final = 0x01
_FLAG_UV: Final = 0x04
_FLAG_AT: Final = 0x40
_FLAG_ED: Final = 0x80

# pinUvAuthToken permissions (§6.5.5.7): only the two this authenticator has a use for.
PERMISSION_MAKE_CREDENTIAL: Final = 0x01
PERMISSION_GET_ASSERTION: Final = 0x02
_SUPPORTED_PERMISSIONS: Final = PERMISSION_MAKE_CREDENTIAL | PERMISSION_GET_ASSERTION

_STATE_FORMAT: Final = "janus-soft-ctap2/1"


class _Command(enum.IntEnum):
    """CTAP2 command bytes (§6)."""

    MAKE_CREDENTIAL = 0x01
    GET_ASSERTION = 0x02
    GET_INFO = 0x04
    CLIENT_PIN = 0x06
    RESET = 0x07
    GET_NEXT_ASSERTION = 0x08
    SELECTION = 0x0B


class _PinCommand(enum.IntEnum):
    """authenticatorClientPIN subcommands (§6.5.5)."""

    GET_PIN_RETRIES = 0x01
    GET_KEY_AGREEMENT = 0x02
    SET_PIN = 0x03
    CHANGE_PIN = 0x04
    GET_PIN_TOKEN = 0x05
    GET_PIN_UV_AUTH_TOKEN_USING_PIN_WITH_PERMISSIONS = 0x09


# --------------------------------------------------------------------------------------
# User presence


class Presence(enum.Enum):
    """What the person at the key did when asked to touch it."""

    APPROVE = "approve"
    DENY = "deny"
    TIMEOUT = "timeout"


@dataclass(frozen=True)
class PresenceRequest:
    """What the authenticator wants presence for, so a policy can decide per request.

    ``command`` is the CTAP command's name ("makeCredential", "getAssertion", "reset",
    "selection"); ``rp_id`` is None for the commands that have no relying party.
    """

    command: str
    rp_id: str | None


#: A person, as far as the authenticator can tell: a callable answering each request.
PresencePolicy = Callable[[PresenceRequest], Presence]


def approve_always(request: PresenceRequest) -> Presence:
    """The default policy: somebody touches the key every time it asks."""
    return Presence.APPROVE


_Request = TypeVar("_Request")


class Scripted(Generic[_Request]):
    """Answers presence requests from a script, then with a default; records every request.

    Tests use it to say "deny the next touch" and then check what was asked for. Shared
    by the virtual cards: each asks with its own request type.
    """

    def __init__(self, *answers: Presence, default: Presence = Presence.APPROVE) -> None:
        self._answers = list(answers)
        self.default = default
        self.requests: list[_Request] = []

    def push(self, *answers: Presence) -> None:
        """Queue answers for the next requests."""
        self._answers.extend(answers)

    def __call__(self, request: _Request) -> Presence:
        self.requests.append(request)
        return self._answers.pop(0) if self._answers else self.default


class ScriptedPresence(Scripted[PresenceRequest]):
    """Scripted answers to this authenticator's user-presence requests."""


# --------------------------------------------------------------------------------------
# PIN/UV auth protocols (§6.5.4 abstract definition, §6.5.6 one, §6.5.7 two)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _aes_cbc(key: bytes, iv: bytes, data: bytes, *, encrypt: bool) -> bytes:
    if len(data) % 16:
        raise ValueError("AES-CBC data must be a multiple of the block size")
    cipher = Cipher(algorithms.AES(key), modes.CBC(iv))
    ctx = cipher.encryptor() if encrypt else cipher.decryptor()
    return ctx.update(data) + ctx.finalize()


class _PinProtocolOne:
    """§6.5.6: SHA-256 of the ECDH x-coordinate, AES-256-CBC with a zero IV, HMAC cut to 16."""

    version = 1

    def kdf(self, z: bytes) -> bytes:
        return _sha256(z)

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        return _aes_cbc(key, b"\0" * 16, plaintext, encrypt=True)

    def decrypt(self, key: bytes, ciphertext: bytes) -> bytes:
        return _aes_cbc(key, b"\0" * 16, ciphertext, encrypt=False)

    def authenticate(self, key: bytes, message: bytes) -> bytes:
        return _hmac_sha256(key, message)[:16]

    def verify(self, key: bytes, message: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(self.authenticate(key, message), signature)


class _PinProtocolTwo(_PinProtocolOne):
    """§6.5.7: HKDF-split HMAC and AES keys, a random IV, and the full HMAC.

    The shared secret is 64 bytes (HMAC key, then AES key); a pinUvAuthToken used as a
    key is 32 bytes, and ``key[:32]`` is then the token itself, as the spec requires.
    """

    version = 2

    def kdf(self, z: bytes) -> bytes:
        def hkdf(info: bytes) -> bytes:
            return HKDF(hashes.SHA256(), 32, salt=b"\0" * 32, info=info).derive(z)

        return hkdf(b"CTAP2 HMAC key") + hkdf(b"CTAP2 AES key")

    def encrypt(self, key: bytes, plaintext: bytes) -> bytes:
        iv = os.urandom(16)
        return iv + _aes_cbc(key[32:], iv, plaintext, encrypt=True)

    def decrypt(self, key: bytes, ciphertext: bytes) -> bytes:
        if len(ciphertext) < 16:
            raise ValueError("ciphertext shorter than its IV")
        return _aes_cbc(key[32:], ciphertext[:16], ciphertext[16:], encrypt=False)

    def authenticate(self, key: bytes, message: bytes) -> bytes:
        return _hmac_sha256(key[:32], message)


_PROTOCOLS: Final[dict[int, _PinProtocolOne]] = {1: _PinProtocolOne(), 2: _PinProtocolTwo()}


# --------------------------------------------------------------------------------------
# State


@dataclass
class _Credential:
    credential_id: bytes
    rp_id: str
    user_id: bytes
    user_name: str | None
    user_display_name: str | None
    private_key: ec.EllipticCurvePrivateKey
    discoverable: bool
    hmac_secret: bool
    # §12.5: two per-credential secrets, so outputs with and without UV differ.
    cred_random_with_uv: bytes
    cred_random_without_uv: bytes
    sign_count: int
    # Creation order: discoverable credentials are returned most recent first (§6.2.2).
    sequence: int

    def to_json(self) -> dict[str, Any]:
        der = self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {
            "id": _b64(self.credential_id),
            "rp_id": self.rp_id,
            "user_id": _b64(self.user_id),
            "user_name": self.user_name,
            "user_display_name": self.user_display_name,
            "private_key": _b64(der),
            "discoverable": self.discoverable,
            "hmac_secret": self.hmac_secret,
            "cred_random_with_uv": _b64(self.cred_random_with_uv),
            "cred_random_without_uv": _b64(self.cred_random_without_uv),
            "sign_count": self.sign_count,
            "sequence": self.sequence,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> _Credential:
        key = serialization.load_der_private_key(_unb64(data["private_key"]), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("credential key is not a P-256 private key")
        return cls(
            credential_id=_unb64(data["id"]),
            rp_id=str(data["rp_id"]),
            user_id=_unb64(data["user_id"]),
            user_name=data.get("user_name"),
            user_display_name=data.get("user_display_name"),
            private_key=key,
            discoverable=bool(data["discoverable"]),
            hmac_secret=bool(data["hmac_secret"]),
            cred_random_with_uv=_unb64(data["cred_random_with_uv"]),
            cred_random_without_uv=_unb64(data["cred_random_without_uv"]),
            sign_count=int(data["sign_count"]),
            sequence=int(data["sequence"]),
        )


@dataclass(frozen=True)
class StoredCredential:
    """A read-only view of one credential, for tests and diagnostics (no private key)."""

    credential_id: bytes
    rp_id: str
    user_id: bytes
    user_name: str | None
    discoverable: bool
    hmac_secret: bool
    sign_count: int


@dataclass
class _PinUvAuthToken:
    """The §6.5.2.1 token state: value, permissions, bound RP ID and usage window."""

    value: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    permissions: int = 0
    rp_id: str | None = None
    in_use: bool = False
    expires_at: float = 0.0


@dataclass
class _HmacSecretRequest:
    protocol: _PinProtocolOne
    shared_secret: bytes
    salt1: bytes
    salt2: bytes | None


@dataclass
class _PendingAssertions:
    """What getNextAssertion needs to continue a discoverable getAssertion (§6.3)."""

    rp_id_hash: bytes
    client_data_hash: bytes
    credentials: list[_Credential]
    user_present: bool
    user_verified: bool
    hmac_secret: _HmacSecretRequest | None
    expires_at: float


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(data: Any) -> bytes:
    if not isinstance(data, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(data, validate=True)


def _write_private_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` (0600): a crash leaves the old state or the new, never half."""
    replace_file(path, data)


# --------------------------------------------------------------------------------------
# CBOR parameter access: wrong types are CTAP2_ERR_CBOR_UNEXPECTED_TYPE, absent
# required ones CTAP2_ERR_MISSING_PARAMETER, as the command definitions in §6 say.

_T = TypeVar("_T")


def _param(params: Mapping[Any, Any], key: int | str, kind: type[_T]) -> _T | None:
    value = params.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CtapError(ERR.CBOR_UNEXPECTED_TYPE)
    return value


def _required(params: Mapping[Any, Any], key: int | str, kind: type[_T]) -> _T:
    value = _param(params, key, kind)
    if value is None:
        raise CtapError(ERR.MISSING_PARAMETER)
    return value


def _option(options: Mapping[Any, Any], name: str, default: bool) -> bool:
    value = _param(options, name, bool)
    return default if value is None else value


def _cose_es256(public_key: ec.EllipticCurvePublicKey, alg: int = _ES256) -> dict[int, Any]:
    numbers = public_key.public_numbers()
    return {
        1: 2,  # kty: EC2
        3: alg,
        -1: 1,  # crv: P-256
        -2: numbers.x.to_bytes(32, "big"),
        -3: numbers.y.to_bytes(32, "big"),
    }


def _authenticator_data(
    rp_id_hash: bytes,
    flags: int,
    sign_count: int,
    attested_credential_data: bytes = b"",
    extensions: Mapping[str, Any] | None = None,
) -> bytes:
    """WebAuthn §6.1 authenticator data; the AT and ED flags follow from the arguments."""
    if attested_credential_data:
        flags |= _FLAG_AT
    encoded_extensions = b""
    if extensions:
        flags |= _FLAG_ED
        encoded_extensions = cbor.encode(extensions)
    return (
        rp_id_hash
        + struct.pack(">BI", flags, sign_count & 0xFFFFFFFF)
        + attested_credential_data
        + encoded_extensions
    )


def _sign(key: ec.EllipticCurvePrivateKey, message: bytes) -> bytes:
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


# --------------------------------------------------------------------------------------
# The authenticator


_Handler = Callable[
    [Mapping[Any, Any], Event | None, Callable[[STATUS], None] | None], dict[int, Any] | None
]


class SoftwareAuthenticator(CtapDevice):
    """An in-memory CTAP 2.1 authenticator behind ``CtapDevice.call``.

    :param presence: decides every user-presence test (see :class:`ScriptedPresence`).
    :param presence_timeout: seconds a :attr:`Presence.TIMEOUT` answer waits, sending
        keepalives, before failing with ``CTAP2_ERR_USER_ACTION_TIMEOUT`` (a real key
        waits about 30 s; tests pass a fraction of a second).
    :param state_path: JSON file that persists credentials and PIN; loaded if present.
    :param attestation: ``"packed"`` (self attestation) or ``"none"``.
    :param pin_uv_protocols: protocols offered in getInfo, preferred first; a test can
        offer only ``(1,)`` to make fido2's client use protocol one.
    :param make_cred_uv_not_required: getInfo's ``makeCredUvNotRqd``: when true (as on
        YubiKeys), non-discoverable credentials can be made without the PIN even when
        one is set; discoverable ones always need it (§6.1.2).
    :param max_pin_retries: the value the PIN retry counter is reset to.
    :param max_discoverable: discoverable credential slots, then KEY_STORE_FULL.
    :param reset_window: seconds after power-up in which reset is accepted, or None to
        accept it at any time (§6.6 asks for 10 s; :meth:`power_cycle` reopens it).
    """

    def __init__(
        self,
        *,
        presence: PresencePolicy = approve_always,
        presence_timeout: float = 30.0,
        state_path: Path | str | None = None,
        attestation: Literal["packed", "none"] = "packed",
        pin_uv_protocols: Sequence[int] = (2, 1),
        make_cred_uv_not_required: bool = True,
        max_pin_retries: int = DEFAULT_PIN_RETRIES,
        max_discoverable: int = 25,
        reset_window: float | None = RESET_WINDOW,
    ) -> None:
        if not pin_uv_protocols or any(p not in _PROTOCOLS for p in pin_uv_protocols):
            raise ValueError(f"PIN/UV auth protocols must be a subset of {sorted(_PROTOCOLS)}")
        if attestation not in ("packed", "none"):
            raise ValueError("attestation must be 'packed' or 'none'")
        self.presence = presence
        self.presence_timeout = presence_timeout
        self._state_path = Path(state_path) if state_path is not None else None
        self._attestation = attestation
        self._protocols = {v: _PROTOCOLS[v] for v in pin_uv_protocols}
        self._protocol_order = list(pin_uv_protocols)
        self._make_cred_uv_not_required = make_cred_uv_not_required
        self._max_pin_retries = max_pin_retries
        self._max_discoverable = max_discoverable
        self._reset_window = reset_window
        self._lock = threading.Lock()

        # Persistent state (§6.5.2: the PIN and its retry counter survive power cycles).
        self._credentials: dict[bytes, _Credential] = {}
        self._pin_hash: bytes | None = None
        self._pin_retries = max_pin_retries
        self._next_sequence = 0

        # Volatile state, set by _power_up.
        self._key_agreement: ec.EllipticCurvePrivateKey
        self._token: _PinUvAuthToken
        self._consecutive_mismatches = 0
        self._pin_auth_blocked = False
        self._pending: _PendingAssertions | None = None
        self._powered_at = 0.0

        if self._state_path is not None and self._state_path.exists():
            self._load(self._state_path)
        self._power_up()

        self._handlers: dict[int, _Handler] = {
            _Command.MAKE_CREDENTIAL: self._make_credential,
            _Command.GET_ASSERTION: self._get_assertion,
            _Command.GET_INFO: self._get_info,
            _Command.CLIENT_PIN: self._client_pin,
            _Command.RESET: self._reset,
            _Command.GET_NEXT_ASSERTION: self._get_next_assertion,
            _Command.SELECTION: self._selection,
        }

    # ----------------------------------------------------------------- CtapDevice API

    @property
    def capabilities(self) -> int:
        """CBOR and WINK; NMSG because there is no CTAP1/U2F behind CTAPHID_MSG."""
        return CAPABILITY.CBOR | CAPABILITY.WINK | CAPABILITY.NMSG

    @classmethod
    def list_devices(cls) -> Iterator[CtapDevice]:
        """Nothing to discover: a virtual key exists only where it was constructed."""
        return iter(())

    def call(
        self,
        cmd: int,
        data: bytes = b"",
        event: Event | None = None,
        on_keepalive: Callable[[STATUS], None] | None = None,
    ) -> bytes:
        """Handle one CTAPHID transaction (§11.2.9), as a HID key's firmware would.

        A transaction that arrives while another is running (another thread) gets
        ``CTAP1_ERR_CHANNEL_BUSY``, as a second HID channel would.  HID-level errors are
        raised as ``CtapError``, like fido2's ``CtapHidDevice`` does; CTAP2 errors come
        back as the status byte of the CBOR response.
        """
        if not self._lock.acquire(blocking=False):
            raise CtapError(ERR.CHANNEL_BUSY)
        try:
            if cmd == CTAPHID.CBOR:
                return self._dispatch_cbor(bytes(data), event, on_keepalive)
            if cmd == CTAPHID.PING:
                return bytes(data)
            if cmd == CTAPHID.WINK:
                return b""
            if cmd == CTAPHID.INIT:
                if len(data) != 8:
                    raise CtapError(ERR.INVALID_LENGTH)
                # nonce, channel id, CTAPHID protocol 2, device version 1.0.0, capabilities
                return bytes(data) + b"\x00\x00\x00\x01" + bytes([2, 1, 0, 0, self.capabilities])
            raise CtapError(ERR.INVALID_COMMAND)
        finally:
            self._lock.release()

    # ----------------------------------------------------------------- test controls

    def power_cycle(self) -> None:
        """Unplug and replug: new key agreement key and token, PIN-auth block lifted.

        The PIN retry counter and credentials persist; the reset window reopens.
        """
        with self._lock:
            self._power_up()

    def credentials(self) -> list[StoredCredential]:
        """Every stored credential, oldest first."""
        with self._lock:
            return [
                StoredCredential(
                    credential_id=c.credential_id,
                    rp_id=c.rp_id,
                    user_id=c.user_id,
                    user_name=c.user_name,
                    discoverable=c.discoverable,
                    hmac_secret=c.hmac_secret,
                    sign_count=c.sign_count,
                )
                for c in sorted(self._credentials.values(), key=lambda c: c.sequence)
            ]

    @property
    def pin_retries(self) -> int:
        """The persistent PIN retry counter (what getPINRetries reports)."""
        return self._pin_retries

    # ----------------------------------------------------------------- plumbing

    def _power_up(self) -> None:
        self._key_agreement = ec.generate_private_key(ec.SECP256R1())
        self._token = _PinUvAuthToken()
        self._consecutive_mismatches = 0
        self._pin_auth_blocked = False
        self._pending = None
        self._powered_at = time.monotonic()

    def _dispatch_cbor(
        self, data: bytes, event: Event | None, on_keepalive: Callable[[STATUS], None] | None
    ) -> bytes:
        if not data:
            return bytes([ERR.INVALID_LENGTH])
        if len(data) > MAX_MSG_SIZE:
            return bytes([ERR.INVALID_LENGTH])
        command, payload = data[0], data[1:]
        if command != _Command.GET_NEXT_ASSERTION:
            # §6.3: any other command ends a getAssertion/getNextAssertion sequence.
            self._pending = None
        handler = self._handlers.get(command)
        if handler is None:
            return bytes([ERR.INVALID_COMMAND])
        params: Mapping[Any, Any] = {}
        if payload:
            try:
                decoded = cbor.decode(payload)
                # fido2's decoder is lenient (truncated strings, 0xff read as false);
                # re-encoding holds requests to CTAP2 canonical CBOR (§8, message encoding).
                canonical = cbor.encode(decoded) == payload
            except (ValueError, KeyError, IndexError, struct.error, RecursionError):
                canonical = False
            if not canonical:
                return bytes([ERR.INVALID_CBOR])
            if not isinstance(decoded, dict):
                return bytes([ERR.CBOR_UNEXPECTED_TYPE])
            params = decoded
        try:
            result = handler(params, event, on_keepalive)
        except CtapError as exc:
            return bytes([exc.code])
        return b"\x00" + (cbor.encode(result) if result else b"")

    def _collect_presence(
        self,
        command: str,
        rp_id: str | None,
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> None:
        """Ask the policy for a touch, as the key's LED blinking would ask a person.

        The UPNEEDED keepalive goes out first, so fido2 calls ``prompt_up`` before the
        policy answers, as with a real key.  A timeout waits out ``presence_timeout``
        (cut short by the caller's cancel event, which gives KEEPALIVE_CANCEL).
        """
        if on_keepalive is not None:
            on_keepalive(STATUS.UPNEEDED)
        if event is not None and event.is_set():
            raise CtapError(ERR.KEEPALIVE_CANCEL)
        decision = self.presence(PresenceRequest(command=command, rp_id=rp_id))
        if decision is Presence.APPROVE:
            return
        if decision is Presence.DENY:
            raise CtapError(ERR.OPERATION_DENIED)
        if (event or Event()).wait(self.presence_timeout):
            raise CtapError(ERR.KEEPALIVE_CANCEL)
        raise CtapError(ERR.USER_ACTION_TIMEOUT)

    def _protocol(self, version: int | None) -> _PinProtocolOne:
        if version is None:
            raise CtapError(ERR.MISSING_PARAMETER)
        protocol = self._protocols.get(version)
        if protocol is None:
            raise CtapError(ERR.INVALID_PARAMETER)
        return protocol

    def _decapsulate(self, protocol: _PinProtocolOne, peer: Any) -> bytes:
        """ECDH with the platform's COSE key, then the protocol's KDF (§6.5.6, §6.5.7)."""
        if not isinstance(peer, dict):
            raise CtapError(ERR.INVALID_PARAMETER)
        x, y = peer.get(-2), peer.get(-3)
        if (
            peer.get(1) != 2
            or peer.get(-1) != 1
            or not isinstance(x, bytes)
            or not isinstance(y, bytes)
            or len(x) != 32
            or len(y) != 32
        ):
            raise CtapError(ERR.INVALID_PARAMETER)
        try:
            public_key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1()
            ).public_key()
        except ValueError as exc:  # not a point on the curve
            raise CtapError(ERR.INVALID_PARAMETER) from exc
        return protocol.kdf(self._key_agreement.exchange(ec.ECDH(), public_key))

    def _check_pin_uv_auth_param(
        self,
        protocol: _PinProtocolOne,
        client_data_hash: bytes,
        pin_uv_auth_param: bytes,
        permission: int,
        rp_id: str,
    ) -> None:
        """Verify a request's pinUvAuthParam against the current token (§6.1.2, §6.2.2).

        Every failure is PIN_AUTH_INVALID: a wrong MAC, a token not issued since power-up,
        expired, lacking the permission or bound to another RP ID.  An unbound token is
        bound to this RP ID on first use.
        """
        if self._pin_hash is None:
            raise CtapError(ERR.PIN_NOT_SET)
        token = self._token
        if not token.in_use or time.monotonic() > token.expires_at:
            raise CtapError(ERR.PIN_AUTH_INVALID)
        if not protocol.verify(token.value, client_data_hash, pin_uv_auth_param):
            raise CtapError(ERR.PIN_AUTH_INVALID)
        if not token.permissions & permission:
            raise CtapError(ERR.PIN_AUTH_INVALID)
        if token.rp_id is not None and token.rp_id != rp_id:
            raise CtapError(ERR.PIN_AUTH_INVALID)
        token.rp_id = rp_id

    def _spend_token_permissions(self) -> None:
        """After a presence-checked operation the token's mc/ga permissions are used up.

        CTAP 2.1 clears them once user presence has been collected with the token, so
        one PIN entry cannot silently authorise a second makeCredential/getAssertion.
        """
        self._token.permissions &= ~_SUPPORTED_PERMISSIONS

    def _probe_with_empty_pin_auth(
        self,
        command: str,
        rp_id: str,
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> None:
        """A zero-length pinUvAuthParam asks "touch to select me" (§6.1.2 step 1)."""
        self._collect_presence(command, rp_id, event, on_keepalive)
        raise CtapError(ERR.PIN_INVALID if self._pin_hash is not None else ERR.PIN_NOT_SET)

    def _save(self) -> None:
        if self._state_path is None:
            return
        state = {
            "format": _STATE_FORMAT,
            "pin_hash": self._pin_hash.hex() if self._pin_hash is not None else None,
            "pin_retries": self._pin_retries,
            "next_sequence": self._next_sequence,
            "credentials": [c.to_json() for c in self._credentials.values()],
        }
        encoded = json.dumps(state, indent=1, sort_keys=True).encode("utf-8")
        _write_private_atomically(self._state_path, encoded)

    def _load(self, path: Path) -> None:
        state = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"{path}: not a {_STATE_FORMAT} authenticator state file")
        try:
            pin_hash = state.get("pin_hash")
            self._pin_hash = bytes.fromhex(pin_hash) if pin_hash is not None else None
            self._pin_retries = int(state["pin_retries"])
            self._next_sequence = int(state["next_sequence"])
            credentials = [_Credential.from_json(c) for c in state["credentials"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: malformed authenticator state file: {exc!r}") from exc
        self._credentials = {c.credential_id: c for c in credentials}

    # ----------------------------------------------------------------- §6.4 getInfo

    def _get_info(
        self,
        params: Mapping[Any, Any],
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> dict[int, Any]:
        """§6.4: versions, hmac-secret, the AAGUID, options and limits.

        ``clientPin`` is present and false until a PIN is set, which tells platforms
        that PIN protection is supported but not configured.
        """
        discoverable = sum(1 for c in self._credentials.values() if c.discoverable)
        return {
            0x01: ["FIDO_2_0", "FIDO_2_1"],
            0x02: [_HMAC_EXTENSION_ID],
            0x03: AAGUID,
            0x04: {
                "rk": True,
                "up": True,
                "clientPin": self._pin_hash is not None,
                "pinUvAuthToken": True,
                "makeCredUvNotRqd": self._make_cred_uv_not_required,
            },
            0x05: MAX_MSG_SIZE,
            0x06: self._protocol_order,
            0x07: MAX_CREDENTIALS_IN_LIST,
            0x08: MAX_CREDENTIAL_ID_LENGTH,
            0x0A: [{"type": "public-key", "alg": _ES256}],
            0x0D: MIN_PIN_LENGTH,
            0x0E: 1,
            0x14: max(0, self._max_discoverable - discoverable),
        }

    # ----------------------------------------------------------------- §6.5 clientPIN

    def _client_pin(
        self,
        params: Mapping[Any, Any],
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> dict[int, Any]:
        protocol = self._protocol(_required(params, 0x01, int))
        subcommand = _required(params, 0x02, int)
        if subcommand == _PinCommand.GET_PIN_RETRIES:
            # powerCycleState: a power cycle is needed before the next PIN attempt.
            return {0x03: self._pin_retries, 0x04: self._pin_auth_blocked}
        if subcommand == _PinCommand.GET_KEY_AGREEMENT:
            return {0x01: _cose_es256(self._key_agreement.public_key(), _ECDH_ES_HKDF_256)}
        if subcommand == _PinCommand.SET_PIN:
            self._set_pin(protocol, params)
            return {}
        if subcommand == _PinCommand.CHANGE_PIN:
            self._change_pin(protocol, params)
            return {}
        if subcommand == _PinCommand.GET_PIN_TOKEN:
            # §6.5.5.7.1, the 2.0 subcommand: a token for makeCredential and getAssertion,
            # bound to the RP it is first used with; it takes no permissions of its own.
            if 0x09 in params or 0x0A in params:
                raise CtapError(ERR.INVALID_PARAMETER)
            return self._issue_token(protocol, params, _SUPPORTED_PERMISSIONS, None)
        if subcommand == _PinCommand.GET_PIN_UV_AUTH_TOKEN_USING_PIN_WITH_PERMISSIONS:
            permissions = _required(params, 0x09, int)
            rp_id = _param(params, 0x0A, str)
            if permissions == 0:
                raise CtapError(ERR.INVALID_PARAMETER)
            if permissions & ~_SUPPORTED_PERMISSIONS:
                # credMgmt, bioEnroll, largeBlobWrite, authnrCfg: features we lack.
                raise CtapError(ERR.UNAUTHORIZED_PERMISSION)
            if rp_id is None:
                raise CtapError(ERR.MISSING_PARAMETER)  # mc and ga need an RP ID
            return self._issue_token(protocol, params, permissions, rp_id)
        # 0x06 getPinUvAuthTokenUsingUvWithPermissions, 0x07 getUVRetries: no built-in UV.
        raise CtapError(ERR.INVALID_SUBCOMMAND)

    def _check_pin_usable(self) -> None:
        if self._pin_hash is None:
            raise CtapError(ERR.PIN_NOT_SET)
        if self._pin_retries <= 0:
            raise CtapError(ERR.PIN_BLOCKED)
        if self._pin_auth_blocked:
            raise CtapError(ERR.PIN_AUTH_BLOCKED)

    def _verify_pin_hash(
        self, protocol: _PinProtocolOne, shared_secret: bytes, pin_hash_enc: bytes
    ) -> None:
        """§6.5.5.6 / §6.5.5.7: compare LEFT(SHA-256(PIN), 16), counting the attempt.

        The counter is decremented and saved *before* comparing, so cutting power in
        the middle cannot buy an extra guess.  A mismatch also regenerates the key
        agreement key, so the platform must start over.
        """
        self._pin_retries -= 1
        self._save()
        try:
            pin_hash = protocol.decrypt(shared_secret, pin_hash_enc)
        except ValueError:
            pin_hash = b""
        assert self._pin_hash is not None  # _check_pin_usable ran first
        if not hmac.compare_digest(pin_hash, self._pin_hash):
            self._key_agreement = ec.generate_private_key(ec.SECP256R1())
            self._consecutive_mismatches += 1
            if self._pin_retries <= 0:
                raise CtapError(ERR.PIN_BLOCKED)
            if self._consecutive_mismatches >= _CONSECUTIVE_MISMATCH_LIMIT:
                self._pin_auth_blocked = True
                raise CtapError(ERR.PIN_AUTH_BLOCKED)
            raise CtapError(ERR.PIN_INVALID)
        self._consecutive_mismatches = 0
        self._pin_retries = self._max_pin_retries
        self._save()

    def _decrypt_new_pin(
        self, protocol: _PinProtocolOne, shared_secret: bytes, new_pin_enc: bytes
    ) -> bytes:
        """Decrypt paddedNewPin and apply the §6.5.1 composition rules; return its hash."""
        if len(new_pin_enc) != 64 + (16 if protocol.version == 2 else 0):
            raise CtapError(ERR.INVALID_PARAMETER)  # paddedNewPin must be 64 bytes
        try:
            padded = protocol.decrypt(shared_secret, new_pin_enc)
        except ValueError as exc:
            raise CtapError(ERR.PIN_AUTH_INVALID) from exc
        pin = padded.split(b"\0", 1)[0]
        if len(pin) > MAX_PIN_BYTES:
            raise CtapError(ERR.PIN_POLICY_VIOLATION)
        try:
            code_points = len(pin.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise CtapError(ERR.PIN_POLICY_VIOLATION) from exc
        if code_points < MIN_PIN_LENGTH:
            raise CtapError(ERR.PIN_POLICY_VIOLATION)
        return _sha256(pin)[:16]

    def _set_pin(self, protocol: _PinProtocolOne, params: Mapping[Any, Any]) -> None:
        """§6.5.5.5 setPIN: only when no PIN exists, authenticated by the shared secret."""
        key_agreement = _required(params, 0x03, dict)
        pin_uv_auth_param = _required(params, 0x04, bytes)
        new_pin_enc = _required(params, 0x05, bytes)
        if self._pin_hash is not None:
            raise CtapError(ERR.PIN_AUTH_INVALID)  # §6.5.5.5 step 3: changePIN's job
        shared_secret = self._decapsulate(protocol, key_agreement)
        if not protocol.verify(shared_secret, new_pin_enc, pin_uv_auth_param):
            raise CtapError(ERR.PIN_AUTH_INVALID)
        self._pin_hash = self._decrypt_new_pin(protocol, shared_secret, new_pin_enc)
        self._pin_retries = self._max_pin_retries
        self._save()

    def _change_pin(self, protocol: _PinProtocolOne, params: Mapping[Any, Any]) -> None:
        """§6.5.5.6 changePIN: the current PIN's hash proves knowledge; tokens die."""
        key_agreement = _required(params, 0x03, dict)
        pin_uv_auth_param = _required(params, 0x04, bytes)
        new_pin_enc = _required(params, 0x05, bytes)
        pin_hash_enc = _required(params, 0x06, bytes)
        self._check_pin_usable()
        shared_secret = self._decapsulate(protocol, key_agreement)
        if not protocol.verify(shared_secret, new_pin_enc + pin_hash_enc, pin_uv_auth_param):
            raise CtapError(ERR.PIN_AUTH_INVALID)
        self._verify_pin_hash(protocol, shared_secret, pin_hash_enc)
        self._pin_hash = self._decrypt_new_pin(protocol, shared_secret, new_pin_enc)
        self._token = _PinUvAuthToken()
        self._save()

    def _issue_token(
        self,
        protocol: _PinProtocolOne,
        params: Mapping[Any, Any],
        permissions: int,
        rp_id: str | None,
    ) -> dict[int, Any]:
        """§6.5.5.7.2: verify the PIN, then issue a fresh token encrypted to the platform.

        A new token replaces the old one, so a token leaked from an earlier session is
        worthless once the PIN has been entered again.
        """
        key_agreement = _required(params, 0x03, dict)
        pin_hash_enc = _required(params, 0x06, bytes)
        self._check_pin_usable()
        shared_secret = self._decapsulate(protocol, key_agreement)
        self._verify_pin_hash(protocol, shared_secret, pin_hash_enc)
        self._token = _PinUvAuthToken(
            permissions=permissions,
            rp_id=rp_id,
            in_use=True,
            expires_at=time.monotonic() + TOKEN_LIFETIME,
        )
        return {0x02: protocol.encrypt(shared_secret, self._token.value)}

    # ----------------------------------------------------------------- §6.1 makeCredential

    def _make_credential(
        self,
        params: Mapping[Any, Any],
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> dict[int, Any]:
        """§6.1.2, in the spec's order: parameters, PIN/UV, excludeList, presence, key."""
        client_data_hash = _required(params, 0x01, bytes)
        rp = _required(params, 0x02, dict)
        user = _required(params, 0x03, dict)
        key_params = _required(params, 0x04, list)
        exclude_list = _param(params, 0x05, list) or []
        extensions = _param(params, 0x06, dict) or {}
        options = _param(params, 0x07, dict) or {}
        pin_uv_auth_param = _param(params, 0x08, bytes)
        pin_uv_protocol = _param(params, 0x09, int)
        enterprise_attestation = _param(params, 0x0A, int)

        rp_id = _required(rp, "id", str)
        user_id = _required(user, "id", bytes)
        user_name = _param(user, "name", str)
        user_display_name = _param(user, "displayName", str)
        if len(user_id) > 64:
            raise CtapError(ERR.INVALID_PARAMETER)

        if pin_uv_auth_param is not None and not pin_uv_auth_param:
            self._probe_with_empty_pin_auth("makeCredential", rp_id, event, on_keepalive)
        protocol = self._protocol(pin_uv_protocol) if pin_uv_auth_param is not None else None

        if not any(
            isinstance(p, dict) and p.get("type") == "public-key" and p.get("alg") == _ES256
            for p in key_params
        ):
            raise CtapError(ERR.UNSUPPORTED_ALGORITHM)

        rk = _option(options, "rk", False)
        if not _option(options, "up", True):
            raise CtapError(ERR.INVALID_OPTION)  # makeCredential always needs presence
        if _option(options, "uv", False) and pin_uv_auth_param is None:
            raise CtapError(ERR.INVALID_OPTION)  # no built-in user verification
        if enterprise_attestation is not None:
            raise CtapError(ERR.INVALID_PARAMETER)

        user_verified = False
        if protocol is not None and pin_uv_auth_param is not None:
            self._check_pin_uv_auth_param(
                protocol,
                client_data_hash,
                pin_uv_auth_param,
                PERMISSION_MAKE_CREDENTIAL,
                rp_id,
            )
            user_verified = True
        elif self._pin_hash is not None and (rk or not self._make_cred_uv_not_required):
            # A PIN-protected key makes discoverable credentials only for its owner.
            raise CtapError(ERR.PUAT_REQUIRED)

        for descriptor in exclude_list:
            if self._find(descriptor, rp_id) is not None:
                # Presence first, so a web page cannot probe for credentials silently.
                self._collect_presence("makeCredential", rp_id, event, on_keepalive)
                raise CtapError(ERR.CREDENTIAL_EXCLUDED)

        hmac_secret = extensions.get(_HMAC_EXTENSION_ID) is True
        if rk and not any(
            c.discoverable and c.rp_id == rp_id and c.user_id == user_id
            for c in self._credentials.values()
        ):
            discoverable = sum(1 for c in self._credentials.values() if c.discoverable)
            if discoverable >= self._max_discoverable:
                raise CtapError(ERR.KEY_STORE_FULL)

        self._collect_presence("makeCredential", rp_id, event, on_keepalive)
        if user_verified:
            self._spend_token_permissions()

        if rk:
            # One discoverable credential per (RP, user): a new one replaces the old.
            for old in [
                c
                for c in self._credentials.values()
                if c.discoverable and c.rp_id == rp_id and c.user_id == user_id
            ]:
                del self._credentials[old.credential_id]
        credential = _Credential(
            credential_id=self._new_credential_id(),
            rp_id=rp_id,
            user_id=user_id,
            user_name=user_name,
            user_display_name=user_display_name,
            private_key=ec.generate_private_key(ec.SECP256R1()),
            discoverable=rk,
            hmac_secret=hmac_secret,
            cred_random_with_uv=secrets.token_bytes(32),
            cred_random_without_uv=secrets.token_bytes(32),
            sign_count=0,
            sequence=self._next_sequence,
        )
        self._next_sequence += 1
        self._credentials[credential.credential_id] = credential
        self._save()

        public_key = cbor.encode(_cose_es256(credential.private_key.public_key()))
        attested = (
            AAGUID
            + struct.pack(">H", len(credential.credential_id))
            + credential.credential_id
            + public_key
        )
        flags = _FLAG_UP | (_FLAG_UV if user_verified else 0)
        auth_data = _authenticator_data(
            _sha256(rp_id.encode("utf-8")),
            flags,
            credential.sign_count,
            attested,
            {_HMAC_EXTENSION_ID: True} if hmac_secret else None,
        )
        if self._attestation == "packed":
            # WebAuthn §8.2 self attestation: signed by the credential key itself.
            statement: dict[str, Any] = {
                "alg": _ES256,
                "sig": _sign(credential.private_key, auth_data + client_data_hash),
            }
            return {0x01: "packed", 0x02: auth_data, 0x03: statement}
        return {0x01: "none", 0x02: auth_data, 0x03: {}}

    def _new_credential_id(self) -> bytes:
        while True:
            credential_id = secrets.token_bytes(CREDENTIAL_ID_LENGTH)
            if credential_id not in self._credentials:
                return credential_id

    def _find(self, descriptor: Any, rp_id: str) -> _Credential | None:
        """The credential a PublicKeyCredentialDescriptor names, if it is for this RP."""
        if not isinstance(descriptor, dict):
            raise CtapError(ERR.CBOR_UNEXPECTED_TYPE)
        credential_id = _required(descriptor, "id", bytes)
        if _required(descriptor, "type", str) != "public-key":
            return None
        credential = self._credentials.get(credential_id)
        if credential is None or credential.rp_id != rp_id:
            return None
        return credential

    # ----------------------------------------------------------------- §6.2 getAssertion

    def _get_assertion(
        self,
        params: Mapping[Any, Any],
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> dict[int, Any]:
        """§6.2.2: locate credentials, verify PIN/UV, collect presence, sign the first.

        With an allowList the first applicable credential answers and nothing is left
        for getNextAssertion (CTAP 2.1 behaviour); without one, every discoverable
        credential of the RP is returned, most recent first, with numberOfCredentials.
        Presence is collected even when nothing matches, so a page cannot find out
        silently whether a credential exists.
        """
        rp_id = _required(params, 0x01, str)
        client_data_hash = _required(params, 0x02, bytes)
        allow_list = _param(params, 0x03, list)
        extensions = _param(params, 0x04, dict) or {}
        options = _param(params, 0x05, dict) or {}
        pin_uv_auth_param = _param(params, 0x06, bytes)
        pin_uv_protocol = _param(params, 0x07, int)

        if pin_uv_auth_param is not None and not pin_uv_auth_param:
            self._probe_with_empty_pin_auth("getAssertion", rp_id, event, on_keepalive)
        protocol = self._protocol(pin_uv_protocol) if pin_uv_auth_param is not None else None

        if "rk" in options:
            raise CtapError(ERR.UNSUPPORTED_OPTION)
        user_present = _option(options, "up", True)
        if _option(options, "uv", False) and pin_uv_auth_param is None:
            raise CtapError(ERR.INVALID_OPTION)  # no built-in user verification

        user_verified = False
        if protocol is not None and pin_uv_auth_param is not None:
            self._check_pin_uv_auth_param(
                protocol, client_data_hash, pin_uv_auth_param, PERMISSION_GET_ASSERTION, rp_id
            )
            user_verified = True

        if allow_list:
            found = (self._find(d, rp_id) for d in allow_list)
            applicable = [c for c in found if c is not None][:1]
        else:
            applicable = sorted(
                (c for c in self._credentials.values() if c.discoverable and c.rp_id == rp_id),
                key=lambda c: c.sequence,
                reverse=True,
            )

        hmac_request = None
        if _HMAC_EXTENSION_ID in extensions:
            hmac_request = self._parse_hmac_secret(extensions[_HMAC_EXTENSION_ID])

        if user_present:
            self._collect_presence("getAssertion", rp_id, event, on_keepalive)
            if user_verified:
                self._spend_token_permissions()
        if not applicable:
            raise CtapError(ERR.NO_CREDENTIALS)

        rp_id_hash = _sha256(rp_id.encode("utf-8"))
        first, rest = applicable[0], applicable[1:]
        response = self._assertion(
            first, rp_id_hash, client_data_hash, user_present, user_verified, hmac_request
        )
        if rest:
            response[0x05] = len(applicable)
            self._pending = _PendingAssertions(
                rp_id_hash=rp_id_hash,
                client_data_hash=client_data_hash,
                credentials=rest,
                user_present=user_present,
                user_verified=user_verified,
                hmac_secret=hmac_request,
                expires_at=time.monotonic() + _NEXT_ASSERTION_WINDOW,
            )
        return response

    def _get_next_assertion(
        self,
        params: Mapping[Any, Any],
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> dict[int, Any]:
        """§6.3: the next credential of the last getAssertion, with its flags and salts."""
        pending = self._pending
        if pending is None or not pending.credentials or time.monotonic() > pending.expires_at:
            self._pending = None
            raise CtapError(ERR.NOT_ALLOWED)
        credential = pending.credentials.pop(0)
        return self._assertion(
            credential,
            pending.rp_id_hash,
            pending.client_data_hash,
            pending.user_present,
            pending.user_verified,
            pending.hmac_secret,
        )

    def _assertion(
        self,
        credential: _Credential,
        rp_id_hash: bytes,
        client_data_hash: bytes,
        user_present: bool,
        user_verified: bool,
        hmac_request: _HmacSecretRequest | None,
    ) -> dict[int, Any]:
        credential.sign_count += 1
        self._save()
        extension_outputs: dict[str, Any] | None = None
        if hmac_request is not None and credential.hmac_secret:
            output = self._hmac_secret_output(credential, hmac_request, user_verified)
            extension_outputs = {_HMAC_EXTENSION_ID: output}
        flags = (_FLAG_UP if user_present else 0) | (_FLAG_UV if user_verified else 0)
        auth_data = _authenticator_data(
            rp_id_hash, flags, credential.sign_count, extensions=extension_outputs
        )
        response: dict[int, Any] = {
            0x01: {"type": "public-key", "id": credential.credential_id},
            0x02: auth_data,
            0x03: _sign(credential.private_key, auth_data + client_data_hash),
        }
        if credential.discoverable:
            # The user handle always; names only to a platform that verified the user.
            user: dict[str, Any] = {"id": credential.user_id}
            if user_verified:
                if credential.user_name is not None:
                    user["name"] = credential.user_name
                if credential.user_display_name is not None:
                    user["displayName"] = credential.user_display_name
            response[0x04] = user
        return response

    # ----------------------------------------------------------------- §12.5 hmac-secret

    def _parse_hmac_secret(self, value: Any) -> _HmacSecretRequest:
        """§12.5: keyAgreement, saltEnc, saltAuth and the PIN/UV protocol (default one)."""
        if not isinstance(value, dict):
            raise CtapError(ERR.CBOR_UNEXPECTED_TYPE)
        key_agreement = _required(value, 0x01, dict)
        salt_enc = _required(value, 0x02, bytes)
        salt_auth = _required(value, 0x03, bytes)
        protocol = self._protocol(_param(value, 0x04, int) or 1)
        shared_secret = self._decapsulate(protocol, key_agreement)
        if not protocol.verify(shared_secret, salt_enc, salt_auth):
            raise CtapError(ERR.PIN_AUTH_INVALID)
        try:
            salts = protocol.decrypt(shared_secret, salt_enc)
        except ValueError as exc:
            raise CtapError(ERR.INVALID_LENGTH) from exc
        if len(salts) not in (_SALT_LENGTH, 2 * _SALT_LENGTH):
            raise CtapError(ERR.INVALID_LENGTH)
        return _HmacSecretRequest(
            protocol=protocol,
            shared_secret=shared_secret,
            salt1=salts[:_SALT_LENGTH],
            salt2=salts[_SALT_LENGTH:] or None,
        )

    @staticmethod
    def _hmac_secret_output(
        credential: _Credential, request: _HmacSecretRequest, user_verified: bool
    ) -> bytes:
        """HMAC-SHA-256(CredRandom, salt) per salt, encrypted to the platform.

        The CredRandom used depends on whether the user was verified, so a secret
        derived with the PIN cannot be obtained by touch alone.
        """
        cred_random = (
            credential.cred_random_with_uv if user_verified else credential.cred_random_without_uv
        )
        output = _hmac_sha256(cred_random, request.salt1)
        if request.salt2 is not None:
            output += _hmac_sha256(cred_random, request.salt2)
        return request.protocol.encrypt(request.shared_secret, output)

    # ----------------------------------------------------------------- §6.6, §6.9

    def _reset(
        self,
        params: Mapping[Any, Any],
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> None:
        """§6.6: wipe credentials and PIN, shortly after power-up and with presence."""
        if (
            self._reset_window is not None
            and time.monotonic() - self._powered_at > self._reset_window
        ):
            raise CtapError(ERR.NOT_ALLOWED)
        self._collect_presence("reset", None, event, on_keepalive)
        self._credentials = {}
        self._pin_hash = None
        self._pin_retries = self._max_pin_retries
        self._next_sequence = 0
        self._key_agreement = ec.generate_private_key(ec.SECP256R1())
        self._token = _PinUvAuthToken()
        self._consecutive_mismatches = 0
        self._pin_auth_blocked = False
        self._save()
        return None

    def _selection(
        self,
        params: Mapping[Any, Any],
        event: Event | None,
        on_keepalive: Callable[[STATUS], None] | None,
    ) -> None:
        """§6.9: "which of your keys?" — answered by touching this one."""
        self._collect_presence("selection", None, event, on_keepalive)
        return None
