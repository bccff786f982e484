"""The JOSE algorithms DIDComm envelopes use, hand-assembled from primitives.

Why by hand: the private half of a Janus key stays in its token, so key agreement has
to stop at the raw ECDH output ``Z`` that :meth:`KeyHandle.exchange` returns, and every
step after it - Concat KDF, AES key wrap, content encryption - has to run here.  JOSE
libraries (and the one maintained DIDComm library for Python) want a private key object
they can do ECDH with themselves, which a token key is not.  So this module holds the
few algorithms, each checked against RFC test vectors and the DIDComm spec's vectors in
the test suite:

* Concat KDF, RFC 7518 section 4.6.2 (NIST SP 800-56A, single-step, SHA-256);
* ECDH-1PU's variant of it (draft-madden-jose-ecdh-1pu-04 section 2.3): Z = Ze || Zs
  and the content tag appended to SuppPubInfo;
* A256KW (RFC 3394) from ``cryptography``;
* A256CBC-HS512 (RFC 7518 section 5.2), A256GCM, and XC20P (XChaCha20-Poly1305, via
  libsodium through PyNaCl).

Nothing here touches a private key other than the sender's ephemeral key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from agent.didcomm.errors import DecryptionError, InvalidPublicKeyError
from agent.didcomm.keys import EC_CURVES, PublicKey

ECDH_ES_A256KW = "ECDH-ES+A256KW"
ECDH_1PU_A256KW = "ECDH-1PU+A256KW"
A256CBC_HS512 = "A256CBC-HS512"
A256GCM = "A256GCM"
XC20P = "XC20P"

CONTENT_ALGORITHMS = (A256CBC_HS512, A256GCM, XC20P)
KEK_BITS = 256  # A256KW


# --- key agreement --------------------------------------------------------------------


class Ephemeral:
    """The sender's one-envelope key pair (the ``epk``), made here and dropped after use.

    X25519 ephemerals are computed with libsodium (through PyNaCl) rather than with
    ``cryptography``: libsodium's fixed-base scalar multiplication makes the key pair in
    about half the time OpenSSL's key generation takes, and it is on the path of every
    envelope packed.  libsodium clamps the scalar exactly as RFC 7748 says, and its
    ``crypto_scalarmult`` refuses an all-zero result (a small-order peer).
    """

    def __init__(self, crv: str) -> None:
        self._secret: bytes | None = None
        self._private: ec.EllipticCurvePrivateKey | None = None
        if crv == "X25519":
            self._secret = os.urandom(32)
            point = nacl.bindings.crypto_scalarmult_base(self._secret)
            self.public_key: PublicKey = x25519.X25519PublicKey.from_public_bytes(point)
        else:
            self._private = ec.generate_private_key(EC_CURVES[crv][0])
            self.public_key = self._private.public_key()

    def exchange(self, peer: PublicKey) -> bytes:
        """ECDH with a recipient's public key (already validated by the caller)."""
        try:
            if self._secret is not None:
                assert isinstance(peer, x25519.X25519PublicKey)
                z = nacl.bindings.crypto_scalarmult(self._secret, peer.public_bytes_raw())
            else:
                assert self._private is not None and isinstance(peer, ec.EllipticCurvePublicKey)
                z = self._private.exchange(ec.ECDH(), peer)
        except (ValueError, nacl.exceptions.CryptoError):
            raise InvalidPublicKeyError("key agreement refused the peer key") from None
        check_shared_secret(z)
        return z


def check_shared_secret(z: bytes) -> None:
    """An all-zero Z means a small-order X25519 peer (RFC 7748 6.1); refuse it."""
    if not any(z):
        raise InvalidPublicKeyError("key agreement produced an all-zero secret (small-order key)")


# --- Concat KDF -------------------------------------------------------------------------


def _len_prefixed(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def concat_kdf(
    z: bytes,
    *,
    alg: str,
    apu: bytes,
    apv: bytes,
    key_bits: int = KEK_BITS,
    tag: bytes | None = None,
) -> bytes:
    """RFC 7518 4.6.2 Concat KDF with SHA-256; with ``tag``, ECDH-1PU's form.

    OtherInfo = AlgorithmID || PartyUInfo || PartyVInfo || SuppPubInfo, each of the
    first three a 32-bit big-endian length and the bytes; SuppPubInfo is the key length
    in bits as 32 bits, followed for ECDH-1PU key wrapping by the content tag, itself
    length-prefixed (draft-madden-jose-ecdh-1pu-04 section 2.3).
    """
    supp_pub = struct.pack(">I", key_bits)
    if tag is not None:
        supp_pub += _len_prefixed(tag)
    other_info = (
        _len_prefixed(alg.encode("ascii")) + _len_prefixed(apu) + _len_prefixed(apv) + supp_pub
    )
    out = b""
    rounds = -(-key_bits // 256)
    for counter in range(1, rounds + 1):
        out += hashlib.sha256(struct.pack(">I", counter) + z + other_info).digest()
    return out[: key_bits // 8]


# --- key wrapping ------------------------------------------------------------------------


def wrap_key(kek: bytes, cek: bytes) -> bytes:
    return aes_key_wrap(kek, cek)


def unwrap_key(kek: bytes, wrapped: bytes) -> bytes:
    """A256KW unwrap; a failed integrity check means tampering or the wrong key."""
    if len(wrapped) < 24 or len(wrapped) % 8:
        raise DecryptionError("encrypted_key has an impossible length for A256KW")
    try:
        return aes_key_unwrap(kek, wrapped)
    except InvalidUnwrap:
        raise DecryptionError(
            "the content key did not unwrap: the envelope was altered or is not for this key"
        ) from None


# --- content encryption -----------------------------------------------------------------


@dataclass(frozen=True)
class ContentAlgorithm:
    name: str
    key_size: int
    iv_size: int
    tag_size: int


CONTENT: dict[str, ContentAlgorithm] = {
    A256CBC_HS512: ContentAlgorithm(A256CBC_HS512, 64, 16, 32),
    A256GCM: ContentAlgorithm(A256GCM, 32, 12, 16),
    XC20P: ContentAlgorithm(XC20P, 32, 24, 16),
}


def new_cek(enc: str) -> bytes:
    return os.urandom(CONTENT[enc].key_size)


def _cbc_hmac_tag(mac_key: bytes, aad: bytes, iv: bytes, ciphertext: bytes) -> bytes:
    al = struct.pack(">Q", len(aad) * 8)
    return hmac.digest(mac_key, aad + iv + ciphertext + al, "sha512")[:32]


def encrypt(enc: str, cek: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes, bytes]:
    """Encrypt ``plaintext``; returns (iv, ciphertext, tag). IVs are random, never reused."""
    spec = CONTENT[enc]
    iv = os.urandom(spec.iv_size)
    if enc == A256CBC_HS512:
        # RFC 7518 5.2.2.1: MAC_KEY is the first half of the CEK, ENC_KEY the second.
        mac_key, enc_key = cek[:32], cek[32:]
        # PKCS#7 to the AES block, written out: it is two lines, and the padding
        # objects of ``cryptography`` cost more than the AES itself for a 1 KiB message.
        pad = 16 - len(plaintext) % 16
        padded = plaintext + bytes((pad,)) * pad
        encryptor = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).encryptor()
        ciphertext = encryptor.update(padded) + encryptor.finalize()
        return iv, ciphertext, _cbc_hmac_tag(mac_key, aad, iv, ciphertext)
    if enc == A256GCM:
        sealed = AESGCM(cek).encrypt(iv, plaintext, aad)
    else:
        sealed = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(plaintext, aad, iv, cek)
    return iv, sealed[: -spec.tag_size], sealed[-spec.tag_size :]


def decrypt(enc: str, cek: bytes, iv: bytes, ciphertext: bytes, tag: bytes, aad: bytes) -> bytes:
    """Authenticate and decrypt; any failure is a DecryptionError and yields nothing."""
    spec = CONTENT[enc]
    if len(cek) != spec.key_size:
        raise DecryptionError(f"the content key has the wrong length for {enc}")
    if len(iv) != spec.iv_size or len(tag) != spec.tag_size:
        raise DecryptionError(f"iv or tag has the wrong length for {enc}")
    if enc == A256CBC_HS512:
        mac_key, enc_key = cek[:32], cek[32:]
        # Check the tag before touching the ciphertext: no padding oracle.
        if not hmac.compare_digest(_cbc_hmac_tag(mac_key, aad, iv, ciphertext), tag):
            raise DecryptionError("authentication tag mismatch: the envelope was altered")
        if not ciphertext or len(ciphertext) % 16:
            raise DecryptionError("ciphertext length is not a multiple of the AES block")
        decryptor = Cipher(algorithms.AES(enc_key), modes.CBC(iv)).decryptor()
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        # The tag was checked above, so the padding is the sender's: no oracle to fear.
        pad = padded[-1]
        if not 1 <= pad <= 16 or padded[-pad:] != bytes((pad,)) * pad:
            raise DecryptionError("bad padding in an authenticated ciphertext")
        return padded[:-pad]
    try:
        if enc == A256GCM:
            return AESGCM(cek).decrypt(iv, ciphertext + tag, aad)
        return bytes(
            nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext + tag, aad, iv, cek)
        )
    except (InvalidTag, nacl.exceptions.CryptoError):
        raise DecryptionError("authentication tag mismatch: the envelope was altered") from None
