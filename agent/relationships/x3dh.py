"""Starting a relationship: Signal's X3DH, hybrid with an ML-KEM-768 prekey as in PQXDH.

The one operation on a long-term key is one ECDH per side through ``KeyHandle.exchange``:
the initiator's DH(IK_A, SPK_B), the responder's DH(IK_B, EK_A).  Every other DH uses
software keys (the ephemeral key, prekeys), and XEdDSA is replaced by the root's binding
(prekeys.py), since a token cannot sign with its DH key.

Written here rather than taken from a library: the X3DH libraries for Python want the
identity private key as bytes, which a token never gives.

The initial header puts no identity on the wire: besides the ephemeral key and the
ML-KEM ciphertext (both fresh random-looking values), everything (the prekey ids and the
initiator's binding) is sealed under a key from DH(EK_A, SPK_B) and padded to a fixed
size.  The responder finds its signed prekey by trial decryption (it holds few).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.relationships import suite as suites
from agent.relationships.errors import (
    BadPrekeyBundleError,
    DecryptError,
    MalformedMessageError,
    ReplayedInitialMessageError,
    UnsupportedSuiteError,
)
from agent.relationships.prekeys import (
    PeerIdentity,
    PrekeyBundle,
    PrekeyStore,
    check_prekey_id,
    verify_binding,
)
from agent.relationships.suite import SUITE_IDS, PrivateKey, Suite
from janus_hsm.atomic_file import fsync_directory
from janus_hsm.file_lock import locked_file
from janus_hsm.provider import KeyHandle
from janus_hsm.strictjson import canonical_json, loads_object

KIND_INITIAL = 0
KIND_RATCHET = 1
KEM_CIPHERTEXT_LEN = 1088
SEALED_LEN = 1536  # the sealed part of an initial header, tag included
_SEALED_PLAIN = SEALED_LEN - 16
_ZERO_NONCE = bytes(12)
_F = b"\xff" * 32

INFO_SK = b"JANUS-PQXDH-v1 "
INFO_SEAL = b"JANUS-PQXDH-v1 seal"
AD_LABEL = b"JANUS-REL-AD-v1"


def hkdf(ikm: bytes, *, salt: bytes | None, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def x3dh_kdf(
    dh_outputs: Sequence[bytes], *, kem_secret: bytes = b"", info: bytes, length: int = 32
) -> bytes:
    """KDF(F || DH1 || DH2 || DH3 [|| DH4] [|| SS]) per X3DH §2.2 and PQXDH §2.2.

    HKDF-SHA-256 with a zero salt and F = 32 0xFF bytes.  With ``info=b"WhisperText"``
    and ``length=64`` it is libsignal's session derivation (root key || chain key).
    """
    return hkdf(_F + b"".join(dh_outputs) + kem_secret, salt=None, info=info, length=length)


def header_len(suite: Suite) -> int:
    """Bytes of an initial header: prefix, ephemeral key, ML-KEM ciphertext, sealed part."""
    return 2 + suites.public_len(suite) + KEM_CIPHERTEXT_LEN + SEALED_LEN


@dataclass(frozen=True)
class InitialHeader:
    suite: Suite
    ephemeral: bytes
    kem_ciphertext: bytes
    sealed: bytes

    @property
    def encoded(self) -> bytes:
        return (
            bytes((SUITE_IDS[self.suite], KIND_INITIAL))
            + self.ephemeral
            + (self.kem_ciphertext + self.sealed)
        )

    @property
    def digest(self) -> bytes:
        """What the replay guard remembers of a consumed initial header."""
        return hashlib.sha256(self.encoded).digest()


@dataclass
class InitialKeys:
    """What X3DH gives the Double Ratchet: SK, the associated data, and the first
    ratchet key (the responder's signed prekey: its public half for the initiator, its
    private half for the responder)."""

    shared_secret: bytes
    associated_data: bytes
    header: InitialHeader
    suite: Suite
    ratchet_public: bytes | None = None
    ratchet_private: PrivateKey | None = None
    #: One-time prekeys (id, is ML-KEM) that ``respond(consume=False)`` used but left on
    #: disk: the caller records their use with the state it commits, then discards them.
    one_time_unconsumed: tuple[tuple[str, bool], ...] = ()


class ReplayGuard(Protocol):
    """Remembers consumed initial headers (their SHA-256) durably."""

    def seen(self, digest: bytes) -> bool: ...

    def remember(self, digest: bytes) -> None:
        """Record ``digest`` durably; ReplayedInitialMessageError if already recorded."""


class FileReplayGuard:
    """Digests of consumed initial headers in one append-only file (32 bytes each).

    It grows by 32 bytes per relationship accepted; a lock spans check and append so two
    processes cannot both accept one initial message.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _digests(self, fd: int) -> set[bytes]:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
        return {data[i : i + 32] for i in range(0, size - size % 32, 32)}

    def seen(self, digest: bytes) -> bool:
        with locked_file(self.path) as fd:
            return digest in self._digests(fd)

    def remember(self, digest: bytes) -> None:
        with locked_file(self.path, flags=os.O_APPEND) as fd:
            if digest in self._digests(fd):
                raise ReplayedInitialMessageError("this initial message was already accepted")
            os.write(fd, digest)
            os.fsync(fd)
        fsync_directory(self.path.parent)


def associated_data(
    suite: Suite,
    initiator: tuple[str, suites.DHPublicKey],
    responder: tuple[str, suites.DHPublicKey],
) -> bytes:
    """AD = label || suite id || IK_A || IK_B || SHA-256(root_A) || SHA-256(root_B)."""
    return (
        AD_LABEL
        + bytes((SUITE_IDS[suite],))
        + suites.encode_public(initiator[1])
        + suites.encode_public(responder[1])
        + hashlib.sha256(initiator[0].encode()).digest()
        + hashlib.sha256(responder[0].encode()).digest()
    )


def _seal_key(dh3: bytes, suite: Suite) -> bytes:
    return hkdf(dh3, salt=None, info=INFO_SEAL + b" " + suite.value.encode(), length=32)


def _binding_of(own_binding: PrekeyBundle | Mapping[str, Any] | str) -> str:
    if isinstance(own_binding, PrekeyBundle):
        return own_binding.binding
    if isinstance(own_binding, str):
        return own_binding
    binding = own_binding.get("binding")
    if not isinstance(binding, str):
        raise BadPrekeyBundleError("the own binding must hold a 'binding' JWS")
    return binding


def initiate(
    agreement: KeyHandle,
    root_did: str,
    own_binding: PrekeyBundle | Mapping[str, Any] | str,
    peer: PrekeyBundle,
) -> tuple[InitialKeys, bytes]:
    """Start a relationship with ``peer``'s bundle: one token ECDH (DH(IK_A, SPK_B)).

    Returns the keys and the encoded initial header.  The first one-time prekeys of the
    bundle are used if it has any, else the signed (last-resort) ML-KEM prekey.
    """
    suite = peer.suite
    if suites.suite_for_key(agreement) is not suite:
        raise UnsupportedSuiteError("the agreement key is not of the peer's suite")
    binding = _binding_of(own_binding)
    mine, _ = verify_binding(binding)
    if mine.root_did != root_did or mine.identity_jwk != dict(agreement.jwk()):
        raise BadPrekeyBundleError("the own binding is not of this root and agreement key")
    peer_identity = peer.identity()
    spk = suites.decode_jwk(suite, peer.signed_prekey_jwk)
    opk_id: str | None = None
    opk = None
    if peer.one_time_prekeys:
        opk_id, opk_jwk = peer.one_time_prekeys[0]
        opk = suites.decode_jwk(suite, opk_jwk)
    if peer.one_time_pq_prekeys:
        pq_id, pq_raw = peer.one_time_pq_prekeys[0]
        pq_one_time = True
    else:
        pq_id, pq_raw, pq_one_time = peer.pq_prekey_id, peer.pq_prekey, False
    pq_public = suites.decode_pq_public(pq_raw)

    ephemeral = suites.generate(suite)
    # The software DHs first: a bundle's key that no DH may use (BadPublicKeyError) is
    # refused before the token is asked for anything.
    dh2 = suites.dh(ephemeral, peer_identity.identity_public)
    dh3 = suites.dh(ephemeral, spk)
    dh4 = None if opk is None else suites.dh(ephemeral, opk)
    dh1 = agreement.exchange(spk)  # the one token operation of this side
    dhs = [dh1, dh2, dh3] if dh4 is None else [dh1, dh2, dh3, dh4]
    kem_secret, kem_ciphertext = pq_public.encapsulate()
    sk = x3dh_kdf(dhs, kem_secret=kem_secret, info=INFO_SK + suite.value.encode())

    ek = suites.encode_public(ephemeral.public_key())
    plain = canonical_json(
        {
            "spk": peer.signed_prekey_id,
            "pq": pq_id,
            "pq_one_time": pq_one_time,
            "opk": opk_id,
            "binding": binding,
        }
    )
    if len(plain) + 1 > _SEALED_PLAIN:
        raise BadPrekeyBundleError("the own binding is too large for an initial header")
    padded = plain + b"\x80" + bytes(_SEALED_PLAIN - len(plain) - 1)
    prefix = bytes((SUITE_IDS[suite], KIND_INITIAL))
    sealed = AESGCM(_seal_key(dh3, suite)).encrypt(
        _ZERO_NONCE, padded, prefix + ek + kem_ciphertext
    )
    header = InitialHeader(suite, ek, kem_ciphertext, sealed)
    ad = associated_data(
        suite, (root_did, mine.identity_public), (peer.root_did, peer_identity.identity_public)
    )
    keys = InitialKeys(sk, ad, header, suite, ratchet_public=suites.encode_public(spk))
    return keys, header.encoded


def parse_initial_header(data: bytes) -> tuple[InitialHeader, bytes]:
    """The initial header at the start of ``data`` and what follows it."""
    if len(data) < 2:
        raise MalformedMessageError("a relationship message is too short")
    suite = suites.suite_from_id(data[0])
    if data[1] != KIND_INITIAL:
        raise MalformedMessageError("not an initial relationship message")
    size = header_len(suite)
    if len(data) < size:
        raise MalformedMessageError("an initial header is too short")
    n = suites.public_len(suite)
    header = InitialHeader(
        suite,
        data[2 : 2 + n],
        data[2 + n : 2 + n + KEM_CIPHERTEXT_LEN],
        data[2 + n + KEM_CIPHERTEXT_LEN : size],
    )
    return header, data[size:]


@dataclass(frozen=True)
class _Opened:
    spk_id: str
    spk: PrivateKey
    dh3: bytes
    fields: dict[str, Any]


def _open_sealed(store: PrekeyStore, header: InitialHeader) -> _Opened:
    suite = header.suite
    ek = suites.decode_public(suite, header.ephemeral)
    prefix = bytes((SUITE_IDS[suite], KIND_INITIAL))
    ad = prefix + header.ephemeral + header.kem_ciphertext
    for spk_id in store.signed_prekey_ids():
        spk = store.signed_prekey(spk_id)
        dh3 = suites.dh(spk, ek)
        try:
            padded = AESGCM(_seal_key(dh3, suite)).decrypt(_ZERO_NONCE, header.sealed, ad)
        except InvalidTag:
            continue
        plain = padded.rstrip(b"\x00")
        if not plain.endswith(b"\x80"):
            raise MalformedMessageError("an initial header is not padded")
        fields = loads_object(plain[:-1], "an initial header", error=MalformedMessageError)
        return _Opened(spk_id, spk, dh3, fields)
    raise DecryptError("the initial message is not addressed to a prekey held here")


def respond(
    agreement: KeyHandle,
    store: PrekeyStore,
    initial_header: bytes,
    *,
    replay_guard: ReplayGuard,
    consume: bool = True,
) -> tuple[InitialKeys, PeerIdentity]:
    """Accept an initial header: one token ECDH (DH(IK_B, EK_A)).

    Everything that can be checked is checked before any state changes.  Then the one
    time prekeys are deleted and the header's digest recorded, both durably, before the
    shared secret is computed: a replayed or concurrent copy is refused
    (ReplayedInitialMessageError, or PrekeyConsumedError after a crash in between).

    With ``consume=False`` the one-time prekeys are used but left on disk and named in
    ``InitialKeys.one_time_unconsumed``: for a caller that records their use and the
    header's digest in the same durable transaction as the state the message creates
    (a crash before it then loses nothing), under a lock that spans check and commit,
    and deletes them after.
    """
    header, rest = parse_initial_header(initial_header)
    if rest:
        raise MalformedMessageError("an initial header has trailing bytes")
    suite = header.suite
    if suite is not store.suite or suites.suite_for_key(agreement) is not suite:
        raise UnsupportedSuiteError("the initial message's suite is not this agent's")
    opened = _open_sealed(store, header)
    fields = opened.fields
    if set(fields) != {"spk", "pq", "pq_one_time", "opk", "binding"}:
        raise MalformedMessageError("an initial header has missing or unknown members")
    if fields["spk"] != opened.spk_id or not isinstance(fields["pq_one_time"], bool):
        raise MalformedMessageError("an initial header's prekey fields are inconsistent")
    pq_id = check_prekey_id(fields["pq"])
    opk_id = None if fields["opk"] is None else check_prekey_id(fields["opk"])
    peer, _ = verify_binding(fields["binding"])
    if peer.suite is not suite:
        raise UnsupportedSuiteError("the initiator's binding is of another suite")
    # Every DH with a key from outside that can be done before a state change is done
    # here: a small-order or invalid key (BadPublicKeyError) then changes nothing.  EK
    # passed DH3 with the signed prekey, so the DHs with it below cannot refuse it.
    dh1 = suites.dh(opened.spk, peer.identity_public)
    digest = header.digest
    if replay_guard.seen(digest):
        raise ReplayedInitialMessageError("this initial message was already accepted")
    pq_private = None if fields["pq_one_time"] else store.pq_prekey(pq_id)  # fails early
    unconsumed: list[tuple[str, bool]] = []
    if consume:
        # State changes from here: one-time prekeys gone, then the header remembered.
        opk = None if opk_id is None else store.take_one_time(opk_id)
        if pq_private is None:
            pq_private = store.take_one_time_pq(pq_id)
    else:
        opk = None if opk_id is None else store.peek_one_time(opk_id)
        if opk_id is not None:
            unconsumed.append((opk_id, False))
        if pq_private is None:
            pq_private = store.peek_one_time_pq(pq_id)
            unconsumed.append((pq_id, True))
    replay_guard.remember(digest)

    ek = suites.decode_public(suite, header.ephemeral)
    dh2 = agreement.exchange(ek)  # the one token operation of this side
    dhs = [dh1, dh2, opened.dh3] if opk is None else [dh1, dh2, opened.dh3, suites.dh(opk, ek)]
    kem_secret = pq_private.decapsulate(header.kem_ciphertext)
    sk = x3dh_kdf(dhs, kem_secret=kem_secret, info=INFO_SK + suite.value.encode())
    own_public = suites.check_public_for(suite, agreement.public_key())
    ad = associated_data(
        suite, (peer.root_did, peer.identity_public), (store.root_did(), own_public)
    )
    keys = InitialKeys(
        sk, ad, header, suite, ratchet_private=opened.spk, one_time_unconsumed=tuple(unconsumed)
    )
    return keys, peer
