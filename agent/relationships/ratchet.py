"""The Double Ratchet with header encryption (Signal's specification, section 4).

Written here rather than taken from a library: the Python implementations have no header
encryption, and without it the ratchet public key in every header links all messages of
a relationship, whatever the addresses do.  Here every byte after the two-byte prefix
(suite id, kind: the same for every Janus user) is ciphertext under a key that changes
with the ratchet, and bodies are padded to a few buckets (padding.py).

Keys: KDF_RK is HKDF-SHA-256 (salt = root key, input = DH output) giving the next root
key, a chain key and the next header key; KDF_CK is HMAC-SHA-256 of the chain key with
0x01 (message key) and 0x02 (next chain key), as Signal recommends.  Each message key
encrypts exactly one body, so AES-256-GCM runs with a zero nonce under it; a header key
serves a whole chain, so headers carry a random nonce.

Bounds (a peer controls the counters): a message may skip at most ``MAX_SKIP`` keys of
one chain (more is refused, TooManySkippedError); at most ``MAX_STORED`` skipped keys
are kept in all, the oldest dropped first (refusing instead would wedge the relationship
for good after a long loss).  A message whose key is gone is refused as a duplicate.

``decrypt`` is pure: it returns a new state and leaves its own untouched, so a caller
commits the new state (durably) before it counts the message as received, and a message
that fails changes nothing.
"""

from __future__ import annotations

import hmac
import os
import struct
from dataclasses import dataclass, field
from hashlib import sha256

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from agent.relationships import padding
from agent.relationships import suite as suites
from agent.relationships.errors import (
    BadStateError,
    CannotSendYetError,
    DecryptError,
    DuplicateMessageError,
    MalformedMessageError,
    RelationshipError,
    TooManySkippedError,
)
from agent.relationships.prekeys import PeerIdentity, PrekeyStore
from agent.relationships.suite import SUITE_IDS, PrivateKey, Suite
from agent.relationships.x3dh import (
    KIND_RATCHET,
    InitialKeys,
    ReplayGuard,
    hkdf,
    parse_initial_header,
    respond,
)
from janus_hsm.provider import KeyHandle

MAX_SKIP = 1000
MAX_STORED = 2000
MAX_OLD_HEADER_KEYS = 16
HEADER_NONCE_LEN = 12
_ZERO_NONCE = bytes(12)

INFO_INIT = b"JANUS-RATCHET-v1 init"
INFO_ROOT = b"JANUS-RATCHET-v1 root"
_STATE_MAGIC = b"JRS"
STATE_VERSION = 1


def kdf_rk(root_key: bytes, dh_output: bytes) -> tuple[bytes, bytes, bytes]:
    """(root key, chain key, next header key) = HKDF(salt=rk, ikm=dh, info, 96)."""
    out = hkdf(dh_output, salt=root_key, info=INFO_ROOT, length=96)
    return out[:32], out[32:64], out[64:]


def kdf_ck(chain_key: bytes) -> tuple[bytes, bytes]:
    """(next chain key, message key): HMAC-SHA-256(ck, 0x02), HMAC-SHA-256(ck, 0x01)."""
    return (
        hmac.digest(chain_key, b"\x02", sha256),
        hmac.digest(chain_key, b"\x01", sha256),
    )


def header_len(suite: Suite) -> int:
    """Bytes of an encrypted ratchet header: nonce, ratchet key, PN, N, tag."""
    return HEADER_NONCE_LEN + suites.public_len(suite) + 8 + 16


def _init_keys(shared_secret: bytes) -> tuple[bytes, bytes, bytes]:
    """(root key, initiator's first header key, responder's first next-header key)."""
    out = hkdf(shared_secret, salt=None, info=INFO_INIT, length=96)
    return out[:32], out[32:64], out[64:]


@dataclass
class RatchetState:
    """One side of a relationship's ratchet: pure data, no I/O."""

    suite: Suite
    ad: bytes
    dhs: PrivateKey
    dhs_public: bytes
    dhr: bytes | None
    rk: bytes
    cks: bytes | None
    ckr: bytes | None
    hks: bytes | None
    hkr: bytes | None
    nhks: bytes
    nhkr: bytes
    ns: int = 0
    nr: int = 0
    pn: int = 0
    # header key -> {message number -> message key}; insertion order is age order.
    skipped: dict[bytes, dict[int, bytes]] = field(default_factory=dict)
    old_hkr: tuple[bytes, ...] = ()
    _skipped_shared: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def initiator(cls, keys: InitialKeys, peer_ratchet_public: bytes | None = None) -> RatchetState:
        """Alice's state: she can send at once (to the responder's signed prekey)."""
        public = keys.ratchet_public if peer_ratchet_public is None else peer_ratchet_public
        if public is None:
            raise RelationshipError("the initiator needs the responder's first ratchet key")
        suite = keys.suite
        rk, hka, nhkb = _init_keys(keys.shared_secret)
        dhs = suites.generate(suite)
        rk, cks, nhks = kdf_rk(rk, suites.dh(dhs, suites.decode_public(suite, public)))
        return cls(
            suite, keys.associated_data, dhs, suites.encode_public(dhs.public_key()), public, rk,
            cks, None, hka, None, nhks, nhkb,
        )  # fmt: skip

    @classmethod
    def responder(
        cls, keys: InitialKeys, own_ratchet_private: PrivateKey | None = None
    ) -> RatchetState:
        """Bob's state: he sends once the initiator's first message ratcheted him."""
        private = keys.ratchet_private if own_ratchet_private is None else own_ratchet_private
        if private is None:
            raise RelationshipError("the responder needs its first ratchet key")
        rk, hka, nhkb = _init_keys(keys.shared_secret)
        return cls(
            keys.suite, keys.associated_data, private, suites.encode_public(private.public_key()),
            None, rk, None, None, None, None, nhkb, hka,
        )  # fmt: skip

    # -- sending -------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes) -> bytes:
        """The wire bytes of one message; advances this state (commit it before sending)."""
        if self.cks is None or self.hks is None:
            raise CannotSendYetError("this side can send once the peer's first message arrived")
        body = padding.pad(plaintext)
        self.cks, mk = kdf_ck(self.cks)
        prefix = bytes((SUITE_IDS[self.suite], KIND_RATCHET))
        header = self.dhs_public + struct.pack(">II", self.pn, self.ns)
        nonce = os.urandom(HEADER_NONCE_LEN)
        enc_header = nonce + AESGCM(self.hks).encrypt(nonce, header, prefix)
        self.ns += 1
        aad = self.ad + prefix + enc_header
        return prefix + enc_header + AESGCM(mk).encrypt(_ZERO_NONCE, body, aad)

    # -- receiving -----------------------------------------------------------------------

    def decrypt(self, wire: bytes) -> tuple[RatchetState, bytes]:
        """(new state, plaintext); ``self`` is left unchanged whatever happens."""
        prefix, enc_header, body = self._split(wire)
        aad = self.ad + prefix + enc_header
        new = self._copy()
        if self.hkr is not None:
            parsed = self._open_header(self.hkr, enc_header, prefix)
            if parsed is not None:
                _, _, n = parsed
                if n < self.nr:
                    mk = new._take_skipped(self.hkr, n)
                else:
                    new._skip(n)
                    assert new.ckr is not None
                    new.ckr, mk = kdf_ck(new.ckr)
                    new.nr += 1
                return new, _open_body(mk, body, aad)
        parsed = self._open_header(self.nhkr, enc_header, prefix)
        if parsed is not None:
            dh_public, pn, n = parsed
            new._skip(pn)
            new._dh_ratchet(dh_public)
            new._skip(n)
            assert new.ckr is not None
            new.ckr, mk = kdf_ck(new.ckr)
            new.nr += 1
            return new, _open_body(mk, body, aad)
        for hk in self.skipped:
            if hk == self.hkr:
                continue
            parsed = self._open_header(hk, enc_header, prefix)
            if parsed is not None:
                mk = new._take_skipped(hk, parsed[2])
                return new, _open_body(mk, body, aad)
        for hk in self.old_hkr:
            if self._open_header(hk, enc_header, prefix) is not None:
                raise DuplicateMessageError("this message was already received")
        raise DecryptError("the message does not authenticate under this relationship")

    def _split(self, wire: bytes) -> tuple[bytes, bytes, bytes]:
        if not isinstance(wire, bytes | bytearray) or len(wire) < 2:
            raise MalformedMessageError("a relationship message is too short")
        wire = bytes(wire)
        if suites.suite_from_id(wire[0]) is not self.suite:
            raise MalformedMessageError("the message is of another suite than the relationship")
        if wire[1] != KIND_RATCHET:
            raise MalformedMessageError("not a ratchet message")
        end = 2 + header_len(self.suite)
        if len(wire) - end not in padding.BUCKETS:
            raise MalformedMessageError("a ratchet message has a length no sender produces")
        return wire[:2], wire[2:end], wire[end:]

    def _open_header(
        self, hk: bytes, enc_header: bytes, prefix: bytes
    ) -> tuple[bytes, int, int] | None:
        nonce = enc_header[:HEADER_NONCE_LEN]
        try:
            plain = AESGCM(hk).decrypt(nonce, enc_header[HEADER_NONCE_LEN:], prefix)
        except InvalidTag:
            return None
        size = suites.public_len(self.suite)
        pn, n = struct.unpack(">II", plain[size:])
        return plain[:size], pn, n

    def _copy(self) -> RatchetState:
        """A copy sharing the skipped-key store until it changes (copy on write)."""
        new = RatchetState(
            self.suite, self.ad, self.dhs, self.dhs_public, self.dhr, self.rk, self.cks,
            self.ckr, self.hks, self.hkr, self.nhks, self.nhkr, self.ns, self.nr, self.pn,
            self.skipped, self.old_hkr,
        )  # fmt: skip
        new._skipped_shared = True
        return new

    def _own_skipped(self) -> dict[bytes, dict[int, bytes]]:
        if self._skipped_shared:
            self.skipped = {hk: dict(keys) for hk, keys in self.skipped.items()}
            self._skipped_shared = False
        return self.skipped

    def _take_skipped(self, hk: bytes, n: int) -> bytes:
        keys = self.skipped.get(hk)
        if keys is None or n not in keys:
            raise DuplicateMessageError("this message was already received")
        skipped = self._own_skipped()
        mk = skipped[hk].pop(n)
        if not skipped[hk]:
            del skipped[hk]
        return mk

    def _skip(self, until: int) -> None:
        """Store the keys of the receiving chain's messages before ``until``."""
        if self.ckr is None or until <= self.nr:
            return
        if until - self.nr > MAX_SKIP:
            raise TooManySkippedError(
                f"the message would skip more than {MAX_SKIP} messages of one chain"
            )
        assert self.hkr is not None
        skipped = self._own_skipped()
        chain = skipped.setdefault(self.hkr, {})
        ck = self.ckr
        for n in range(self.nr, until):
            ck, chain[n] = kdf_ck(ck)
        self.ckr, self.nr = ck, until
        total = sum(len(keys) for keys in skipped.values())
        while total > MAX_STORED:
            oldest = next(iter(skipped))
            keys = skipped[oldest]
            del keys[next(iter(keys))]
            if not keys:
                del skipped[oldest]
            total -= 1

    def _dh_ratchet(self, dh_public: bytes) -> None:
        peer = suites.decode_public(self.suite, dh_public)
        if self.hkr is not None:
            self.old_hkr = (self.hkr, *self.old_hkr)[:MAX_OLD_HEADER_KEYS]
        self.pn, self.ns, self.nr = self.ns, 0, 0
        self.hks, self.hkr = self.nhks, self.nhkr
        self.dhr = dh_public
        self.rk, self.ckr, self.nhkr = kdf_rk(self.rk, suites.dh(self.dhs, peer))
        self.dhs = suites.generate(self.suite)
        self.dhs_public = suites.encode_public(self.dhs.public_key())
        self.rk, self.cks, self.nhks = kdf_rk(self.rk, suites.dh(self.dhs, peer))

    # -- serialisation -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Versioned binary form (holds secrets: store it encrypted)."""
        optional = (self.dhr, self.cks, self.ckr, self.hks, self.hkr)
        flags = sum(1 << i for i, v in enumerate(optional) if v is not None)
        parts = [
            _STATE_MAGIC,
            bytes((STATE_VERSION, SUITE_IDS[self.suite], flags)),
            struct.pack(">H", len(self.ad)),
            self.ad,
            suites.private_bytes(self.dhs),
            *(v for v in optional if v is not None),
            self.rk,
            self.nhks,
            self.nhkr,
            struct.pack(">IIIB", self.ns, self.nr, self.pn, len(self.old_hkr)),
            *self.old_hkr,
            struct.pack(">H", len(self.skipped)),
        ]
        for hk, keys in self.skipped.items():
            parts.append(hk + struct.pack(">H", len(keys)))
            parts.extend(struct.pack(">I", n) + mk for n, mk in keys.items())
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> RatchetState:
        """The state ``to_bytes`` wrote; anything else is BadStateError."""
        reader = _Reader(bytes(data))
        if reader.take(3) != _STATE_MAGIC:
            raise BadStateError("not relationship ratchet state")
        version, suite_id, flags = reader.take(3)
        if version != STATE_VERSION:
            raise BadStateError(f"ratchet state version {version} is not supported")
        if flags >= 1 << 5:
            raise BadStateError("ratchet state has unknown flags")
        try:
            suite = suites.suite_from_id(suite_id)
        except RelationshipError:
            raise BadStateError("ratchet state names an unknown suite") from None
        ad = reader.take(reader.u16())
        try:
            dhs = suites.private_from_bytes(suite, reader.take(suites.PRIVATE_LEN))
        except ValueError:
            raise BadStateError("ratchet state holds an invalid private key") from None
        sizes = (suites.public_len(suite), 32, 32, 32, 32)
        dhr, cks, ckr, hks, hkr = (
            reader.take(size) if flags & (1 << i) else None for i, size in enumerate(sizes)
        )
        if dhr is not None:
            try:
                suites.decode_public(suite, dhr)
            except RelationshipError:
                raise BadStateError("ratchet state holds an invalid public key") from None
        rk, nhks, nhkr = reader.take(32), reader.take(32), reader.take(32)
        ns, nr, pn, old_count = struct.unpack(">IIIB", reader.take(13))
        if old_count > MAX_OLD_HEADER_KEYS:
            raise BadStateError("ratchet state holds too many old header keys")
        old_hkr = tuple(reader.take(32) for _ in range(old_count))
        skipped: dict[bytes, dict[int, bytes]] = {}
        total = 0
        for _ in range(reader.u16()):
            hk = reader.take(32)
            count = reader.u16()
            if hk in skipped or count == 0:
                raise BadStateError("ratchet state has a malformed skipped-key store")
            keys: dict[int, bytes] = {}
            for _ in range(count):
                n = struct.unpack(">I", reader.take(4))[0]
                if n in keys:
                    raise BadStateError("ratchet state repeats a skipped key")
                keys[n] = reader.take(32)
            total += count
            skipped[hk] = keys
        if total > MAX_STORED:
            raise BadStateError("ratchet state holds more skipped keys than allowed")
        reader.end()
        if (cks is None) != (hks is None) or (ckr is None) != (hkr is None):
            raise BadStateError("ratchet state has a chain key without its header key")
        return cls(
            suite, ad, dhs, suites.encode_public(dhs.public_key()), dhr, rk, cks, ckr, hks,
            hkr, nhks, nhkr, ns, nr, pn, skipped, old_hkr,
        )  # fmt: skip


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.data):
            raise BadStateError("ratchet state is truncated")
        chunk = self.data[self.at : self.at + n]
        self.at += n
        return chunk

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def end(self) -> None:
        if self.at != len(self.data):
            raise BadStateError("ratchet state has trailing bytes")


def _open_body(mk: bytes, body: bytes, aad: bytes) -> bytes:
    try:
        padded = AESGCM(mk).decrypt(_ZERO_NONCE, body, aad)
    except InvalidTag:
        raise DecryptError("the message does not authenticate under this relationship") from None
    return padding.unpad(padded)


def first_message(keys: InitialKeys, state: RatchetState, plaintext: bytes) -> bytes:
    """The initiator's first message: the initial header, then a ratchet message without
    its prefix (the header's prefix serves both)."""
    return keys.header.encoded + state.encrypt(plaintext)[2:]


@dataclass(frozen=True)
class FirstMessage:
    """What the responder learns from an initial message; ``state`` is not yet stored."""

    state: RatchetState
    plaintext: bytes
    peer: PeerIdentity
    keys: InitialKeys


def open_first_message(
    agreement: KeyHandle,
    store: PrekeyStore,
    wire: bytes,
    *,
    replay_guard: ReplayGuard,
    consume: bool = True,
) -> FirstMessage:
    """The responder's side of ``first_message``: X3DH (one token ECDH), then the ratchet.

    Nothing is written but what ``respond`` must write first (the one-time prekeys'
    deletion, the header's digest): the caller stores the returned state.  A first message
    whose ratchet part fails to decrypt has still used up its one-time prekeys, unless
    ``consume=False`` (see ``respond``) leaves their deletion to the caller.
    """
    header, rest = parse_initial_header(wire)
    keys, peer = respond(
        agreement, store, header.encoded, replay_guard=replay_guard, consume=consume
    )
    state = RatchetState.responder(keys)
    new, plaintext = state.decrypt(bytes((SUITE_IDS[keys.suite], KIND_RATCHET)) + rest)
    return FirstMessage(new, plaintext, peer, keys)
