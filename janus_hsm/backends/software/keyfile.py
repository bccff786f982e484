"""The ``.jkey`` file: one private key, encrypted at rest, with its public half in clear.

Why a format of our own: ``cryptography`` offers encrypted PKCS#8 (PBES2), which only
knows passphrases, and PKCS#12, which knows little more.  Neither can wrap a key to an
ECDH key that lives elsewhere (a token's key, for instance), neither carries the public
key and metadata in a form that can be read without the secret, and neither
authenticates that metadata.  So the private key is kept as plain PKCS#8 DER - the
standard, lossless serialisation - sealed with AES-256-GCM, inside a small JSON
document whose every other field is the AEAD's associated data.  The key-encryption key
comes either from the passphrase (scrypt) or from ECDH with a wrapping key (ECDH-ES
with HKDF-SHA256, the construction JOSE uses, with HKDF in place of Concat KDF).

The file is canonical JSON (RFC 8785: sorted keys, no whitespace, ASCII only) plus one
newline, and is refused if it is not byte-for-byte in that form.  So *any* change to
the file is noticed: a change that keeps it well formed changes the associated data
and fails authentication when the key is unlocked; any other change is refused at
load time.  docs/software-keystore.md documents every field.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from janus_hsm import strictjson
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeystoreError, MechanismUnsupportedError
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
SUFFIX = ".jkey"
ENC = "A256GCM"
MODE_PASSPHRASE = "passphrase"  # noqa: S105 - the name of a mode, not a secret
MODE_ECDH_ES = "ecdh-es"
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
_SCRYPT_MAX_MEMORY = 1 << 30
# HKDF info for the ECDH-ES mode; the header digest is appended, binding the KEK to it.
HKDF_INFO = b"janus-software-key/1 ECDH-ES HKDF-SHA256 A256GCM\x00"

_TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
_B64URL = re.compile(r"[A-Za-z0-9_-]*")

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


def open_key_file(
    key_file: KeyFile,
    *,
    passphrase: Callable[[], str],
    wrapping_key: WrappingKey | None,
    where: str,
) -> PrivateKey:
    """Decrypt and check a key file. ``where`` names it in messages (a URI, never secrets)."""
    doc = key_file.document
    protection = doc["protection"]
    aad = canonical_json(key_file.header())
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
) -> KeyFile:
    public = private_key.public_key()
    when = datetime.now(UTC)
    header: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
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
    if doc.get("version") != VERSION or type(doc.get("version")) is not int:
        raise KeystoreError(
            f"{where} has format version {doc.get('version')!r}; this Janus reads version "
            f"{VERSION} only. Upgrade Janus to read it"
        )
    _fields(doc, _TOP_FIELDS, where)
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
    else:
        raise KeystoreError(f"{where}: unknown protection mode {mode!r}")


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


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: Any, where: str) -> bytes:
    """Strict, canonical base64url: one spelling per byte string, so no flip goes unseen."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text):
        raise KeystoreError(f"{where} is not base64url")
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise KeystoreError(f"{where} is not base64url") from None
    if b64e(data) != text:
        raise KeystoreError(f"{where} is not canonical base64url")
    return data


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
    fd = os.open(
        directory / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def read_key_file(directory: Path, name: str) -> KeyFile | None:
    """The parsed file for ``name``, or None if there is none. Symlinks are refused."""
    path = key_path(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
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
    """Write atomically: temp file in the same directory, fsync, rename, fsync directory.

    The caller holds :func:`locked` and has checked the name is free.  After a crash at
    any point the directory holds either the complete file or no file of that name (at
    worst a stray temp file, which is ignored and cleaned up by the next writer).
    """
    final = key_path(directory, key_file.name)
    fd = -1
    temp = directory / f"{TEMP_PREFIX}{key_file.name}.{os.urandom(8).hex()}"
    try:
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        os.fchmod(fd, 0o600)  # whatever the umask
        data = key_file.to_bytes()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(temp, final)
    except BaseException as exc:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temp)
        if isinstance(exc, OSError):
            raise KeystoreError(f"cannot write {final}: {exc.strerror or exc}") from None
        raise
    fsync_directory(directory)
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


def fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
