"""The ``.jkey`` file: one private key, encrypted at rest, with its public half in clear.

Why a format of our own: ``cryptography`` offers encrypted PKCS#8 (PBES2), which only
knows passphrases, and PKCS#12, which knows little more.  Neither can wrap a key to an
ECDH key that lives elsewhere (a token's key, for instance), neither carries the public
key and metadata in a form that can be read without the secret, and neither
authenticates that metadata.  So the private key is kept as plain PKCS#8 DER - the
standard, lossless serialisation - sealed with AES-256-GCM, inside a small JSON
document whose every other field is the AEAD's associated data.  The key-encryption key
comes either from the passphrase (scrypt) or from ECDH with a wrapping key (ECDH-ES
with HKDF-SHA256, the construction JOSE uses, with HKDF in place of Concat KDF), or, in
format version 2, from a FIDO2 authenticator's hmac-secret (one wrapped content key per
enrolled credential, any one of which opens the file).

The file is canonical JSON (RFC 8785: sorted keys, no whitespace, ASCII only) plus one
newline, and is refused if it is not byte-for-byte in that form.  So *any* change to
the file is noticed: a change that keeps it well formed changes the associated data
and fails authentication when the key is unlocked; any other change is refused at
load time.  docs/software-keystore.md documents every field.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from janus_hsm import b64url, strictjson
from janus_hsm.algorithms import Algorithm
from janus_hsm.atomic_file import fsync_directory, replace_file
from janus_hsm.errors import KeystoreError, MechanismUnsupportedError
from janus_hsm.file_lock import locked_file
from janus_hsm.public_keys import (
    PublicKey,
    PublicKeyFormatError,
    algorithm_of,
    from_jwk,
    jwk_thumbprint,
    to_jwk,
)

log = logging.getLogger(__name__)

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey

FORMAT = "janus-software-key"
VERSION = 1
#: Files in the fido2-hmac-secret mode are version 2, so a Janus that predates the mode
#: says "upgrade Janus" instead of "unknown protection mode"; other modes stay version 1.
VERSION_FIDO2 = 2
SUFFIX = ".jkey"
ENC = "A256GCM"
MODE_PASSPHRASE = "passphrase"  # noqa: S105 - the name of a mode, not a secret
MODE_ECDH_ES = "ecdh-es"
MODE_FIDO2_HMAC_SECRET = "fido2-hmac-secret"  # noqa: S105 - the name of a mode
KEY_WRAP = "A256KW"
HMAC_SECRET_EXTENSION = "hmac-secret"  # noqa: S105 - an extension name
HMAC_SECRET_SALT_SIZE = 32  # what the hmac-secret extension takes (CTAP 2.1 §12.5)
MAX_RECIPIENTS = 16
KDF_SCRYPT = "scrypt"
KDF_HKDF = "HKDF-SHA256"
LOCK_NAME = ".janus-keystore.lock"
TEMP_PREFIX = ".tmp-"
MAX_FILE = 64 * 1024

# scrypt cost for new files (RFC 7914's interactive-login recommendation, ~32 MiB).
# Files may record other costs, within bounds that keep a tampered file from turning
# an unlock into a memory or CPU exhaustion.
SCRYPT_N = 2**15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_SIZE = 16
NONCE_SIZE = 12
_SCRYPT_MAX_MEMORY = 1 << 27  # 128 MiB: 4x what new files use; more would be an OOM risk
# HKDF info for the ECDH-ES mode; the header digest is appended, binding the KEK to it.
HKDF_INFO = b"janus-software-key/1 ECDH-ES HKDF-SHA256 A256GCM\x00"
# HKDF info for the fido2-hmac-secret mode; the digest of the recipient's binding
# (key name, alg, public key, credential id, RP ID, uv) is appended.
HKDF_INFO_FIDO2 = b"janus-software-key/2 fido2-hmac-secret HKDF-SHA256 A256KW\x00"
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")

_TOP_FIELDS = frozenset(
    {
        "format",
        "version",
        "name",
        "alg",
        "created",
        "public_jwk",
        "protection",
        "enc",
        "nonce",
        "ciphertext",
    }
)
_PASSPHRASE_FIELDS = frozenset({"mode", "kdf", "salt", "n", "r", "p"})
_ECDH_FIELDS = frozenset({"mode", "kdf", "epk", "wrapping_key"})
_WRAPPING_FIELDS = frozenset({"uri", "thumbprint"})
_FIDO2_FIELDS = frozenset({"mode", "kdf", "key_wrap", "extension", "salt", "recipients"})
_RECIPIENT_FIELDS = frozenset({"credential_id", "rp_id", "uv", "label", "wrapped_key"})


@dataclass(frozen=True)
class KeyFile:
    """A parsed, validated ``.jkey`` document (still encrypted)."""

    document: dict[str, Any]
    algorithm: Algorithm
    public_key: PublicKey

    @property
    def name(self) -> str:
        return str(self.document["name"])

    @property
    def created(self) -> datetime:
        return datetime.strptime(self.document["created"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)

    @property
    def mode(self) -> str:
        return str(self.document["protection"]["mode"])

    @property
    def wrapping_key_uri(self) -> str | None:
        if self.mode != MODE_ECDH_ES:
            return None
        return str(self.document["protection"]["wrapping_key"]["uri"])

    @property
    def wrapping_key_thumbprint(self) -> str | None:
        if self.mode != MODE_ECDH_ES:
            return None
        return str(self.document["protection"]["wrapping_key"]["thumbprint"])

    def header(self) -> dict[str, Any]:
        return {k: v for k, v in self.document.items() if k != "ciphertext"}

    def to_bytes(self) -> bytes:
        return canonical_json(self.document) + b"\n"


class WrappingKey:
    """What sealing and opening need from a wrapping key: its public key and ECDH.

    Kept apart from KeyHandle so this module stays about the file format; the provider
    builds one from a KeyHandle of any backend (a token's key, another software key).
    """

    def __init__(
        self, uri: str, public_key: PublicKey, exchange: Callable[[PublicKey], bytes]
    ) -> None:
        alg = algorithm_of(public_key)
        if not alg.can_exchange:
            raise MechanismUnsupportedError(
                f"wrapping key {uri} is {alg.value}, which cannot do key agreement; "
                "use an ES256, ES384 or X25519 key to wrap software keys"
            )
        # The file records where the wrapping key lives, but never its PIN source.
        self.uri = uri.partition("?")[0]
        self.public_key = public_key
        self.algorithm = alg
        self.thumbprint = jwk_thumbprint(public_key)
        self.exchange = exchange


@dataclass(frozen=True)
class HmacSecretRecipient:
    """One FIDO2 credential a key file is (or is to be) wrapped for; nothing secret.

    ``uv`` says whether the hmac-secret is asked for with user verification (the PIN):
    an authenticator keeps two secrets per credential, one with and one without UV, so
    opening must ask the way sealing did.  ``label`` names the credential for people.
    """

    credential_id: bytes
    rp_id: str
    uv: bool
    label: str

    def __post_init__(self) -> None:
        _check_recipient_values(self.credential_id, self.rp_id, self.uv, self.label, "recipient")


class HmacSecretSource(Protocol):
    """Where hmac-secret outputs come from (in practice: connected authenticators).

    Kept a protocol so this module stays about the file format and never imports fido2;
    :class:`janus_hsm.fido2.keystore.Fido2HmacSecret` is the real one.
    """

    def enrolled(self) -> Sequence[HmacSecretRecipient]:
        """The credentials new keys are wrapped for (each must be reachable to seal)."""
        ...

    def hmac_secret(
        self, recipients: Sequence[HmacSecretRecipient], salt: bytes
    ) -> tuple[int, bytes]:
        """(index into ``recipients`` of the credential that answered, its 32-byte
        hmac-secret over ``salt``); a typed error when none can answer."""
        ...


# --- sealing and opening ------------------------------------------------------------


def seal_with_passphrase(*, name: str, private_key: PrivateKey, passphrase: str) -> KeyFile:
    salt = os.urandom(SALT_SIZE)
    protection = {
        "mode": MODE_PASSPHRASE,
        "kdf": KDF_SCRYPT,
        "salt": b64e(salt),
        "n": SCRYPT_N,
        "r": SCRYPT_R,
        "p": SCRYPT_P,
    }
    kek = _scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    return _seal(name, private_key, protection, lambda _aad: kek)


def seal_with_wrapping_key(
    *,
    name: str,
    private_key: PrivateKey,
    wrapping_key: WrappingKey,
) -> KeyFile:
    ephemeral = _generate(wrapping_key.algorithm)
    assert not isinstance(ephemeral, ed25519.Ed25519PrivateKey)
    epk = ephemeral.public_key()
    z = exchange(ephemeral, wrapping_key.public_key)
    # ECDH-ES needs only the recipient's public key, but a wrapping key whose private half
    # does not match its public key (or cannot do ECDH at all) would make this key
    # unrecoverable; finding out now, before anything is written, costs one operation.
    check = wrapping_key.exchange(epk)
    if not hmac.compare_digest(z, check):
        raise KeystoreError(
            f"wrapping key {wrapping_key.uri} did not reproduce the shared secret of its own "
            "public key; it cannot be used to wrap keys (nothing was written)"
        )
    protection = {
        "mode": MODE_ECDH_ES,
        "kdf": KDF_HKDF,
        "epk": to_jwk(epk),
        "wrapping_key": {"uri": wrapping_key.uri, "thumbprint": wrapping_key.thumbprint},
    }
    return _seal(name, private_key, protection, lambda aad: _hkdf(z, aad))


def seal_with_hmac_secret(
    *,
    name: str,
    private_key: PrivateKey,
    source: HmacSecretSource,
    recipients: Sequence[HmacSecretRecipient] | None = None,
) -> KeyFile:
    """Wrap a key for every enrolled credential; any one of them opens it.

    Why a content key wrapped per credential: hmac-secret is symmetric (only the
    authenticator can compute it), so a file cannot be "encrypted to" a credential the
    way ECDH-ES encrypts to a public key; each credential instead wraps one random
    content-encryption key (CEK).  Enrolling a second credential is what makes a lost
    security key survivable.  Every credential's authenticator is asked once here.
    """
    chosen = list(source.enrolled() if recipients is None else recipients)
    _check_recipient_list(chosen)
    salt = os.urandom(HMAC_SECRET_SALT_SIZE)
    cek = os.urandom(32)
    public = private_key.public_key()
    entries = []
    for recipient in chosen:
        output = _recipient_output(source, recipient, salt)
        kek = _fido2_kek(output, salt, recipient, name, public)
        entries.append(_recipient_json(recipient, aes_key_wrap(kek, cek)))
    protection = _fido2_protection(salt, entries)
    return _seal(name, private_key, protection, lambda _aad: cek, version=VERSION_FIDO2)


def hmac_secret_recipients(key_file: KeyFile) -> list[HmacSecretRecipient]:
    """The credentials a fido2-hmac-secret file is wrapped for ([] for other modes)."""
    if key_file.mode != MODE_FIDO2_HMAC_SECRET:
        return []
    return [
        HmacSecretRecipient(
            b64d(r["credential_id"], "credential_id"), r["rp_id"], r["uv"], r["label"]
        )
        for r in key_file.document["protection"]["recipients"]
    ]


def rewrap_hmac_secret(
    key_file: KeyFile,
    *,
    source: HmacSecretSource,
    add: Sequence[HmacSecretRecipient] = (),
    remove: Sequence[bytes] = (),
    where: str,
) -> KeyFile:
    """The same key, wrapped for its credentials plus ``add`` minus ``remove``.

    Opens with any connected enrolled credential, then wraps the same CEK for each new
    credential (whose authenticator must be connected) and re-encrypts under a fresh
    nonce (the header, hence the AAD, changed).  The salt and CEK are kept, so removed
    credentials are only cut off from *this* file: whoever holds a removed key and an
    old copy of the file can still open that copy (retire the key itself if that matters).
    """
    if key_file.mode != MODE_FIDO2_HMAC_SECRET:
        raise KeystoreError(f"{where} is not protected by FIDO2 credentials")
    private, cek = _open_fido2(key_file, source, where)
    protection = key_file.document["protection"]
    salt = b64d(protection["salt"], "salt")
    kept = [
        r
        for r in protection["recipients"]
        if not any(
            hmac.compare_digest(b64d(r["credential_id"], "credential_id"), x) for x in remove
        )
    ]
    if len(kept) == len(protection["recipients"]) and remove:
        raise KeystoreError(f"{where} is not wrapped for that credential")
    public = private.public_key()
    for recipient in add:
        output = _recipient_output(source, recipient, salt)
        kek = _fido2_kek(output, salt, recipient, key_file.name, public)
        kept.append(_recipient_json(recipient, aes_key_wrap(kek, cek)))
    _check_recipient_list(
        [
            HmacSecretRecipient(b64d(r["credential_id"], "id"), r["rp_id"], r["uv"], r["label"])
            for r in kept
        ]
    )
    header = {**key_file.header(), "protection": _fido2_protection(salt, kept)}
    header["nonce"] = b64e(os.urandom(NONCE_SIZE))
    aad = canonical_json(header)
    der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ciphertext = AESGCM(cek).encrypt(b64d(header["nonce"], "nonce"), der, aad)
    del der
    return parse_key_file(
        canonical_json({**header, "ciphertext": b64e(ciphertext)}) + b"\n",
        expected_name=key_file.name,
    )


def _recipient_output(
    source: HmacSecretSource, recipient: HmacSecretRecipient, salt: bytes
) -> bytes:
    index, output = source.hmac_secret([recipient], salt)
    if index != 0 or len(output) != 32:
        raise KeystoreError(f"credential {recipient.label!r} gave no usable hmac-secret")
    return output


def _recipient_json(recipient: HmacSecretRecipient, wrapped: bytes) -> dict[str, Any]:
    return {
        "credential_id": b64e(recipient.credential_id),
        "rp_id": recipient.rp_id,
        "uv": recipient.uv,
        "label": recipient.label,
        "wrapped_key": b64e(wrapped),
    }


def _fido2_protection(salt: bytes, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "mode": MODE_FIDO2_HMAC_SECRET,
        "kdf": KDF_HKDF,
        "key_wrap": KEY_WRAP,
        "extension": HMAC_SECRET_EXTENSION,
        "salt": b64e(salt),
        "recipients": entries,
    }


def _fido2_kek(
    output: bytes, salt: bytes, recipient: HmacSecretRecipient, name: str, public: PublicKey
) -> bytes:
    """KEK = HKDF-SHA256(ikm = hmac-secret output, salt = the file's salt, info = label ‖
    SHA-256(binding)): the binding ties a wrapped CEK to this key and this credential's
    recorded parameters, so no recipient entry can be moved to another file or edited."""
    binding = canonical_json(
        {
            "name": name,
            "alg": algorithm_of(public).value,
            "public_jwk": to_jwk(public),
            "credential_id": b64e(recipient.credential_id),
            "rp_id": recipient.rp_id,
            "uv": recipient.uv,
        }
    )
    info = HKDF_INFO_FIDO2 + hashlib.sha256(binding).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(output)


def _open_fido2(
    key_file: KeyFile, source: HmacSecretSource | None, where: str
) -> tuple[PrivateKey, bytes]:
    recipients = hmac_secret_recipients(key_file)
    if source is None:
        labels = ", ".join(repr(r.label) for r in recipients)
        raise KeystoreError(
            f"{where} opens only with one of its FIDO2 credentials ({labels}); open the "
            "keystore with hmac_secret set to a connected security key"
        )
    protection = key_file.document["protection"]
    salt = b64d(protection["salt"], "salt")
    index, output = source.hmac_secret(recipients, salt)
    if not 0 <= index < len(recipients) or len(output) != 32:
        raise KeystoreError(f"{where}: the hmac-secret source gave an unusable answer")
    recipient = recipients[index]
    kek = _fido2_kek(output, salt, recipient, key_file.name, key_file.public_key)
    try:
        cek = aes_key_unwrap(
            kek, b64d(protection["recipients"][index]["wrapped_key"], "wrapped_key")
        )
    except InvalidUnwrap:
        from janus_hsm.fido2.errors import WrongCredentialError

        raise WrongCredentialError(
            f"cannot unlock {where}: the authenticator answered for credential "
            f"{recipient.label!r}, but its hmac-secret does not unwrap the key (a different "
            "authenticator, or the file was altered)"
        ) from None
    return _decrypt(key_file, cek, where, "the file was altered"), cek


def open_key_file(
    key_file: KeyFile,
    *,
    passphrase: Callable[[], str],
    wrapping_key: WrappingKey | None,
    where: str,
    hmac_secret: HmacSecretSource | None = None,
) -> PrivateKey:
    """Decrypt and check a key file. ``where`` names it in messages (a URI, never secrets)."""
    doc = key_file.document
    protection = doc["protection"]
    aad = canonical_json(key_file.header())
    if protection["mode"] == MODE_FIDO2_HMAC_SECRET:
        return _open_fido2(key_file, hmac_secret, where)[0]
    if protection["mode"] == MODE_PASSPHRASE:
        salt = b64d(protection["salt"], "protection.salt")
        secret = passphrase()
        kek = _scrypt(secret, salt, protection["n"], protection["r"], protection["p"])
        failure = "the passphrase is wrong or the file was altered"
    else:
        recorded = protection["wrapping_key"]
        if wrapping_key is None or wrapping_key.thumbprint != recorded["thumbprint"]:
            given = (
                "no wrapping key was given"
                if wrapping_key is None
                else f"the wrapping key given ({wrapping_key.uri}, thumbprint "
                f"{wrapping_key.thumbprint}) is a different key"
            )
            raise KeystoreError(
                f"{where} is wrapped by {recorded['uri']} (thumbprint {recorded['thumbprint']})"
                f" but {given}; open the keystore with wrapping_key set to that key"
            )
        epk = _public_from_jwk(protection["epk"], "protection.epk")
        if algorithm_of(epk) is not wrapping_key.algorithm:
            raise KeystoreError(f"{where}: the ephemeral key is not on the wrapping key's curve")
        kek = _hkdf(wrapping_key.exchange(epk), aad)
        failure = "the file was altered"
    return _decrypt(key_file, kek, where, failure)


def _decrypt(key_file: KeyFile, kek: bytes, where: str, failure: str) -> PrivateKey:
    """AES-GCM open under ``kek`` and check the key against the recorded public key."""
    doc = key_file.document
    aad = canonical_json(key_file.header())
    try:
        der = AESGCM(kek).decrypt(
            b64d(doc["nonce"], "nonce"), b64d(doc["ciphertext"], "ciphertext"), aad
        )
    except InvalidTag:
        raise KeystoreError(f"cannot unlock {where}: {failure}") from None
    try:
        private = serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError):
        raise KeystoreError(f"{where} decrypted, but does not hold a valid PKCS#8 key") from None
    finally:
        del der
    if not isinstance(
        private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | x25519.X25519PrivateKey
    ):
        raise KeystoreError(f"{where} holds an unsupported key type")
    try:
        actual = algorithm_of(private.public_key())
    except PublicKeyFormatError:
        raise KeystoreError(f"{where} holds a key on an unsupported curve") from None
    if actual is not key_file.algorithm or to_jwk(private.public_key()) != to_jwk(
        key_file.public_key
    ):
        raise KeystoreError(f"{where}: the private key does not match the public key recorded")
    return private


def generate_private_key(algorithm: Algorithm) -> PrivateKey:
    return _generate(algorithm)


def _seal(
    name: str,
    private_key: PrivateKey,
    protection: dict[str, Any],
    kek_for: Callable[[bytes], bytes],
    *,
    version: int = VERSION,
) -> KeyFile:
    public = private_key.public_key()
    when = datetime.now(UTC)
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": version,
        "name": name,
        "alg": algorithm_of(public).value,
        "created": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "public_jwk": to_jwk(public),
        "protection": protection,
        "enc": ENC,
        "nonce": b64e(os.urandom(NONCE_SIZE)),
    }
    aad = canonical_json(header)
    der = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ciphertext = AESGCM(kek_for(aad)).encrypt(b64d(header["nonce"], "nonce"), der, aad)
    del der
    return parse_key_file(
        canonical_json({**header, "ciphertext": b64e(ciphertext)}) + b"\n", expected_name=name
    )


# --- parsing ------------------------------------------------------------------------


def parse_key_file(data: bytes, *, expected_name: str) -> KeyFile:
    """Validate a file's bytes completely, without any secret; KeystoreError otherwise."""
    where = f"key file {expected_name}{SUFFIX}"
    try:
        doc = strictjson.loads(data.decode("ascii"), where, allow_floats=True)
    except UnicodeDecodeError as exc:
        raise KeystoreError(f"{where} is not a valid key file (not JSON: {exc})") from None
    except strictjson.StrictJSONError as exc:
        raise KeystoreError(f"{where} is not a valid key file (not JSON: {exc.problem})") from None
    if not isinstance(doc, dict):
        raise KeystoreError(f"{where} is not a valid key file (not a JSON object)")
    if doc.get("format") != FORMAT:
        raise KeystoreError(f"{where} is not a Janus software key file")
    if doc.get("version") not in (VERSION, VERSION_FIDO2) or type(doc.get("version")) is not int:
        raise KeystoreError(
            f"{where} has format version {doc.get('version')!r}; this Janus reads versions "
            f"{VERSION} and {VERSION_FIDO2} only. Upgrade Janus to read it"
        )
    _fields(doc, _TOP_FIELDS, where)
    fido2_mode = isinstance(doc["protection"], dict) and (
        doc["protection"].get("mode") == MODE_FIDO2_HMAC_SECRET
    )
    if fido2_mode != (doc["version"] == VERSION_FIDO2):
        raise KeystoreError(
            f"{where}: version {doc['version']} does not match its protection mode "
            f"(version {VERSION_FIDO2} is exactly the {MODE_FIDO2_HMAC_SECRET} mode)"
        )
    if canonical_json(doc) + b"\n" != data:
        raise KeystoreError(f"{where} is not in canonical form; it was edited or corrupted")
    if doc["name"] != expected_name:
        raise KeystoreError(
            f"{where} holds the key named {doc['name']!r}; key files cannot be renamed "
            "(the name is authenticated). Rename it back"
        )
    try:
        algorithm = Algorithm(doc["alg"])
    except ValueError:
        raise KeystoreError(f"{where}: unknown alg {doc['alg']!r}") from None
    if not isinstance(doc["created"], str) or not _TIMESTAMP.fullmatch(doc["created"]):
        raise KeystoreError(f"{where}: created must look like 2025-01-31T12:00:00Z")
    try:
        datetime.strptime(doc["created"], "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        raise KeystoreError(f"{where}: created is not a valid date") from None
    public = _public_from_jwk(doc["public_jwk"], f"{where}: public_jwk")
    if algorithm_of(public) is not algorithm:
        raise KeystoreError(f"{where}: public_jwk is not an {algorithm.value} key")
    if doc["enc"] != ENC:
        raise KeystoreError(f"{where}: unsupported enc {doc['enc']!r}")
    if len(b64d(doc["nonce"], f"{where}: nonce")) != NONCE_SIZE:
        raise KeystoreError(f"{where}: nonce must be {NONCE_SIZE} bytes")
    if len(b64d(doc["ciphertext"], f"{where}: ciphertext")) <= 16:
        raise KeystoreError(f"{where}: ciphertext is too short")
    _check_protection(doc["protection"], where)
    return KeyFile(doc, algorithm, public)


def _check_protection(protection: Any, where: str) -> None:
    if not isinstance(protection, dict):
        raise KeystoreError(f"{where}: protection must be an object")
    mode = protection.get("mode")
    if mode == MODE_PASSPHRASE:
        _fields(protection, _PASSPHRASE_FIELDS, f"{where}: protection")
        if protection["kdf"] != KDF_SCRYPT:
            raise KeystoreError(f"{where}: unsupported kdf {protection['kdf']!r}")
        if len(b64d(protection["salt"], f"{where}: salt")) != SALT_SIZE:
            raise KeystoreError(f"{where}: salt must be {SALT_SIZE} bytes")
        n, r, p = protection["n"], protection["r"], protection["p"]
        if not all(type(v) is int for v in (n, r, p)):
            raise KeystoreError(f"{where}: scrypt parameters must be integers")
        if not (
            2**14 <= n <= 2**20
            and n & (n - 1) == 0
            and 1 <= r <= 32
            and 1 <= p <= 16
            and 128 * n * r * p <= _SCRYPT_MAX_MEMORY
        ):
            raise KeystoreError(f"{where}: scrypt parameters n={n} r={r} p={p} out of bounds")
    elif mode == MODE_ECDH_ES:
        _fields(protection, _ECDH_FIELDS, f"{where}: protection")
        if protection["kdf"] != KDF_HKDF:
            raise KeystoreError(f"{where}: unsupported kdf {protection['kdf']!r}")
        epk = _public_from_jwk(protection["epk"], f"{where}: epk")
        if not algorithm_of(epk).can_exchange:
            raise KeystoreError(f"{where}: epk cannot do key agreement")
        wrapping = protection["wrapping_key"]
        if not isinstance(wrapping, dict):
            raise KeystoreError(f"{where}: wrapping_key must be an object")
        _fields(wrapping, _WRAPPING_FIELDS, f"{where}: wrapping_key")
        if not isinstance(wrapping["uri"], str) or not wrapping["uri"]:
            raise KeystoreError(f"{where}: wrapping_key.uri must be a non-empty string")
        if len(b64d(wrapping["thumbprint"], f"{where}: thumbprint")) != 32:
            raise KeystoreError(f"{where}: wrapping_key.thumbprint must be a SHA-256 thumbprint")
    elif mode == MODE_FIDO2_HMAC_SECRET:
        _fields(protection, _FIDO2_FIELDS, f"{where}: protection")
        if protection["kdf"] != KDF_HKDF or protection["key_wrap"] != KEY_WRAP:
            raise KeystoreError(f"{where}: unsupported kdf or key_wrap")
        if protection["extension"] != HMAC_SECRET_EXTENSION:
            raise KeystoreError(f"{where}: unsupported extension {protection['extension']!r}")
        if len(b64d(protection["salt"], f"{where}: salt")) != HMAC_SECRET_SALT_SIZE:
            raise KeystoreError(f"{where}: salt must be {HMAC_SECRET_SALT_SIZE} bytes")
        entries = protection["recipients"]
        if not isinstance(entries, list):
            raise KeystoreError(f"{where}: recipients must be an array")
        parsed = []
        for i, entry in enumerate(entries):
            what = f"{where}: recipient #{i}"
            if not isinstance(entry, dict):
                raise KeystoreError(f"{what} must be an object")
            _fields(entry, _RECIPIENT_FIELDS, what)
            if len(b64d(entry["wrapped_key"], f"{what}: wrapped_key")) != 40:
                raise KeystoreError(f"{what}: wrapped_key must be 40 bytes (A256KW of 32)")
            credential_id = b64d(entry["credential_id"], f"{what}: credential_id")
            _check_recipient_values(
                credential_id, entry["rp_id"], entry["uv"], entry["label"], what
            )
            parsed.append(
                HmacSecretRecipient(credential_id, entry["rp_id"], entry["uv"], entry["label"])
            )
        _check_recipient_list(parsed, where)
    else:
        raise KeystoreError(f"{where}: unknown protection mode {mode!r}")


def _check_recipient_values(credential_id: Any, rp_id: Any, uv: Any, label: Any, what: str) -> None:
    if not isinstance(credential_id, bytes) or not 1 <= len(credential_id) <= 1023:
        raise KeystoreError(f"{what}: credential_id must be 1-1023 bytes")
    if (
        not isinstance(rp_id, str)
        or not 1 <= len(rp_id) <= 253
        or not rp_id.isascii()
        or not rp_id.isprintable()
    ):
        raise KeystoreError(f"{what}: rp_id must be 1-253 printable ASCII characters")
    if type(uv) is not bool:
        raise KeystoreError(f"{what}: uv must be true or false")
    if not isinstance(label, str) or not _LABEL.fullmatch(label):
        raise KeystoreError(f"{what}: label must be 1-64 letters, digits, '.', '_', '@' or '-'")


def _check_recipient_list(recipients: Sequence[HmacSecretRecipient], where: str = "key") -> None:
    if not 1 <= len(recipients) <= MAX_RECIPIENTS:
        raise KeystoreError(
            f"{where}: a FIDO2-protected key needs 1 to {MAX_RECIPIENTS} credentials"
            " (enrol a second one: a lost key must not lose the keystore)"
        )
    ids = [r.credential_id for r in recipients]
    if len(set(ids)) != len(ids):
        raise KeystoreError(f"{where}: the same credential is enrolled twice")


def _fields(obj: dict[str, Any], expected: frozenset[str], where: str) -> None:
    missing = expected - obj.keys()
    extra = obj.keys() - expected
    if missing or extra:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(sorted(missing))}")
        if extra:
            problems.append(f"unknown {', '.join(sorted(extra))}")
        raise KeystoreError(f"{where} is malformed: {'; '.join(problems)}")


def _public_from_jwk(jwk: Any, where: str) -> PublicKey:
    if not isinstance(jwk, dict):
        raise KeystoreError(f"{where} must be a JWK object")
    try:
        public = from_jwk(jwk)
    except (PublicKeyFormatError, ValueError) as exc:
        raise KeystoreError(f"{where} is not a valid public key: {exc}") from None
    if to_jwk(public) != jwk:
        raise KeystoreError(f"{where} is not in canonical JWK form")
    return public


# --- primitives ---------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """RFC 8785 form for the values this format holds (ASCII strings, small integers)."""
    return strictjson.canonical_json(value, ascii_only=True)


b64e = b64url.encode


def b64d(text: Any, where: str) -> bytes:
    """Strict, canonical base64url: one spelling per byte string, so no flip goes unseen."""
    return b64url.decode(text, where, error=KeystoreError)


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _hkdf(z: bytes, aad: bytes) -> bytes:
    info = HKDF_INFO + hashlib.sha256(aad).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(z)


def _generate(algorithm: Algorithm) -> PrivateKey:
    if algorithm is Algorithm.EdDSA:
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm is Algorithm.X25519:
        return x25519.X25519PrivateKey.generate()
    curve = algorithm.curve
    assert curve is not None
    return ec.generate_private_key(curve)


def exchange(private: PrivateKey, peer: PublicKey) -> bytes:
    """Raw ECDH Z with cryptography; a small-order X25519 peer is refused (RFC 7748 6.1)."""
    try:
        if isinstance(private, x25519.X25519PrivateKey) and isinstance(
            peer, x25519.X25519PublicKey
        ):
            return private.exchange(peer)
        if isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(
            peer, ec.EllipticCurvePublicKey
        ):
            return private.exchange(ec.ECDH(), peer)
    except ValueError as exc:
        raise PublicKeyFormatError(f"key agreement with this peer key failed: {exc}") from None
    raise MechanismUnsupportedError("key agreement needs two keys of the same curve")


# --- the directory ------------------------------------------------------------------


def key_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX}"


def ensure_directory(directory: Path, *, create: bool) -> None:
    """Create the keystore 0700, or refuse one that other users could write to."""
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        info = directory.stat()
    except OSError as exc:
        raise KeystoreError(f"cannot create keystore {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise KeystoreError(f"keystore {directory} is not a directory")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KeystoreError(
            f"keystore {directory} is writable by other users, who could replace or delete "
            f"keys; chmod 700 {directory}"
        )
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("keystore %s is readable by other users; chmod 700 it", directory)


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Serialise writers of one keystore across threads and processes (flock)."""
    with locked_file(directory / LOCK_NAME):
        yield


def read_key_file(directory: Path, name: str) -> KeyFile | None:
    """The parsed file for ``name``, or None if there is none. Symlinks are refused."""
    path = key_path(directory, name)
    try:
        # O_NONBLOCK: a FIFO planted under a key's name must not hang the open (the
        # descriptor is checked to be a regular file before anything is read).
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise KeystoreError(
                f"{path} is a symbolic link; key files must be regular files"
            ) from None
        raise KeystoreError(f"cannot read {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeystoreError(f"{path} is not a regular file")
        if info.st_size > MAX_FILE:
            raise KeystoreError(f"{path} is too large to be a key file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("key file %s is accessible to other users; chmod 600 it", path)
        data = b""
        while len(data) <= MAX_FILE and (chunk := os.read(fd, MAX_FILE + 1 - len(data))):
            data += chunk
        if len(data) > MAX_FILE:
            raise KeystoreError(f"{path} is too large to be a key file")
    except OSError as exc:
        raise KeystoreError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return parse_key_file(data, expected_name=name)
    except KeystoreError as exc:
        raise KeystoreError(f"{exc} (in {directory})") from None


def write_new_key_file(directory: Path, key_file: KeyFile) -> Path:
    """Write atomically (janus_hsm.atomic_file): temp file, fsync, rename, fsync directory.

    The caller holds :func:`locked` and has checked the name is free.  After a crash at
    any point the directory holds either the complete file or no file of that name (at
    worst a stray temp file, which is ignored and cleaned up by the next writer).
    """
    final = key_path(directory, key_file.name)
    try:
        replace_file(final, key_file.to_bytes(), temp_prefix=f"{TEMP_PREFIX}{key_file.name}.")
    except OSError as exc:
        raise KeystoreError(f"cannot write {final}: {exc.strerror or exc}") from None
    return final


def remove_key_file(directory: Path, name: str) -> bool:
    try:
        os.unlink(key_path(directory, name))
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise KeystoreError(f"cannot delete {key_path(directory, name)}: {exc.strerror}") from None
    fsync_directory(directory)
    return True


def remove_stale_temp_files(directory: Path) -> None:
    """Temp files left by a crashed writer; only safe while holding the lock."""
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def list_names(directory: Path, valid_name: Callable[[str], bool]) -> list[str]:
    """Names of the key files in ``directory``, sorted; nothing if it does not exist."""
    try:
        with os.scandir(directory) as entries:
            names = [
                e.name[: -len(SUFFIX)]
                for e in entries
                if e.name.endswith(SUFFIX)
                and valid_name(e.name[: -len(SUFFIX)])
                and e.is_file(follow_symlinks=False)
            ]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeystoreError(f"cannot list keystore {directory}: {exc.strerror}") from None
    return sorted(names)
