"""Starting a relationship: X3DH + ML-KEM with the identity DH on a real SoftHSM token."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import x25519

from agent.relationships import x3dh
from agent.relationships.errors import (
    BadPrekeyBundleError,
    DecryptError,
    MalformedMessageError,
    PrekeyConsumedError,
    RelationshipError,
    ReplayedInitialMessageError,
    UnsupportedSuiteError,
)
from agent.relationships.prekeys import PrekeyBundle, PrekeyStore, sign_binding
from agent.relationships.ratchet import (
    RatchetState,
    first_message,
    open_first_message,
)
from agent.relationships.suite import Suite
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle

# libsignal's rust/protocol/tests/ratchet.rs, test_ratcheting_session_as_bob: the keys
# and the expected sender chain key, used as data only.
LIBSIGNAL = {
    "bob_identity_private": "4875cc69ddf8ea0719ec947d61081135868d5fd801f02c0225e516df2156605e",
    "bob_signed_prekey_private": "583900131fb727998b7803fe6ac22cc591f342e4e42a8c8d5d78194209b8d253",
    # public keys without libsignal's 0x05 type byte
    "alice_identity_public": "b4a8455660ada65b401007f615e654041746432e3339c6875149bceefcb42b4a",
    "alice_base_public": "472d1fb1a9862c3af6beaca8920277e2b26f4a79213ec7c906aeb35e03cf8950",
    "expected_sender_chain": "9797caca53c989bbe229a40ca7727010eb2604fc14945d77958a0aeda088b44d",
}


def test_the_kdf_reproduces_libsignals_published_session_vector() -> None:
    """Signal-compatible mode of the building blocks: DH order of X3DH, F || DHs,
    HKDF-SHA-256 with zero salt and info "WhisperText" -> root key || chain key."""
    h = bytes.fromhex
    ik_b = x25519.X25519PrivateKey.from_private_bytes(h(LIBSIGNAL["bob_identity_private"]))
    spk_b = x25519.X25519PrivateKey.from_private_bytes(h(LIBSIGNAL["bob_signed_prekey_private"]))
    ik_a = x25519.X25519PublicKey.from_public_bytes(h(LIBSIGNAL["alice_identity_public"]))
    ek_a = x25519.X25519PublicKey.from_public_bytes(h(LIBSIGNAL["alice_base_public"]))
    dhs = [spk_b.exchange(ik_a), ik_b.exchange(ek_a), spk_b.exchange(ek_a)]
    out = x3dh.x3dh_kdf(dhs, info=b"WhisperText", length=64)
    assert out[32:].hex() == LIBSIGNAL["expected_sender_chain"]
    # the same inputs in another order or with another label give another key
    assert x3dh.x3dh_kdf(dhs[::-1], info=b"WhisperText", length=64) != out
    assert x3dh.x3dh_kdf(dhs, info=b"JANUS", length=64) != out


def test_the_kdf_agrees_with_syndace_x3dh_on_the_same_keys() -> None:
    """An independent X3DH (Syndace's ``x3dh``, no ML-KEM) derives the same SK from the
    same keys and label as ``x3dh_kdf`` does from the responder's side."""
    import x3dh as syndace
    from x3dh.crypto_provider import HashFunction
    from x3dh.identity_key_pair import IdentityKeyPair
    from x3dh.types import IdentityKeyFormat

    class State(syndace.State):
        @staticmethod
        def _encode_public_key(key_format: IdentityKeyFormat, pub: bytes) -> bytes:
            return pub

        def _publish_bundle(self, bundle: Any) -> None:
            del bundle

    info = b"JANUS differential"
    for _ in range(3):
        alice = State.create(IdentityKeyFormat.CURVE_25519, HashFunction.SHA_256, info)
        bob = State.create(IdentityKeyFormat.CURVE_25519, HashFunction.SHA_256, info)
        secret, _, header = asyncio.run(alice.get_shared_secret_active(bob.bundle))
        model = bob.model
        ik_b = x25519.X25519PrivateKey.from_private_bytes(
            IdentityKeyPair.from_model(model.identity_key).as_priv().priv
        )
        spk_b = x25519.X25519PrivateKey.from_private_bytes(model.signed_pre_key.priv)
        by_public = {
            x25519.X25519PrivateKey.from_private_bytes(p).public_key().public_bytes_raw(): p
            for p in model.pre_keys
        }
        ik_a = x25519.X25519PublicKey.from_public_bytes(header.identity_key)
        ek_a = x25519.X25519PublicKey.from_public_bytes(header.ephemeral_key)
        dhs = [spk_b.exchange(ik_a), ik_b.exchange(ek_a), spk_b.exchange(ek_a)]
        assert header.pre_key is not None
        opk = x25519.X25519PrivateKey.from_private_bytes(by_public[header.pre_key])
        dhs.append(opk.exchange(ek_a))
        assert x3dh.x3dh_kdf(dhs, info=info) == secret


# -- establishment on the token ---------------------------------------------------------


@dataclass
class Owner:
    root: KeyHandle
    agreement: KeyHandle
    store: PrekeyStore
    guard: x3dh.FileReplayGuard


class Counter:
    """Counts ``exchange`` calls on a real token key (the key still does the ECDH)."""

    def __init__(self, handle: KeyHandle) -> None:
        self.exchanges = 0
        original = handle.exchange

        def exchange(peer: Any) -> bytes:
            self.exchanges += 1
            return original(peer)

        handle.exchange = exchange  # type: ignore[method-assign,assignment]


SUITE_KEYS = {
    Suite.X25519: (Algorithm.EdDSA, Algorithm.X25519),
    Suite.P256: (Algorithm.ES256, Algorithm.ES256),
}


@pytest.fixture
def make_owner(
    pkcs11_provider: Pkcs11Provider, tmp_path: Path
) -> Iterator[Callable[[Suite], Owner]]:
    made: list[KeyHandle] = []

    def make(suite: Suite) -> Owner:
        root_alg, agreement_alg = SUITE_KEYS[suite]
        prefix = f"rel-{secrets.token_hex(4)}"
        root = pkcs11_provider.generate(f"pkcs11:object={prefix}-root", root_alg)
        agreement = pkcs11_provider.generate(f"pkcs11:object={prefix}-agree", agreement_alg)
        made.extend((root, agreement))
        directory = tmp_path / prefix
        return Owner(
            root,
            agreement,
            PrekeyStore(directory / "prekeys", suite),
            x3dh.FileReplayGuard(directory / "consumed"),
        )

    yield make
    for handle in made:
        with contextlib.suppress(KeyNotFoundError):
            pkcs11_provider.delete(handle.uri)


def _bundle(owner: Owner, **kwargs: Any) -> PrekeyBundle:
    published = owner.store.publish(owner.root, owner.agreement, **kwargs)
    return PrekeyBundle.from_dict(published.to_dict())  # as a peer receives it


@pytest.mark.parametrize("suite", list(Suite))
def test_both_sides_agree_with_exactly_one_token_exchange_each(
    suite: Suite, make_owner: Callable[[Suite], Owner]
) -> None:
    alex, blair = make_owner(suite), make_owner(suite)
    bundle = _bundle(blair, one_time=2)
    alex_agreement, blair_agreement = Counter(alex.agreement), Counter(blair.agreement)
    own = sign_binding(alex.root, alex.agreement)
    keys, header = x3dh.initiate(alex.agreement, alex.root.did, own, bundle)
    state = RatchetState.initiator(keys)
    wire = first_message(keys, state, b'{"type":"hello"}')
    opened = open_first_message(blair.agreement, blair.store, wire, replay_guard=blair.guard)
    assert alex_agreement.exchanges == 1 and blair_agreement.exchanges == 1
    assert opened.plaintext == b'{"type":"hello"}'
    assert opened.keys.shared_secret == keys.shared_secret
    assert opened.keys.associated_data == keys.associated_data
    assert opened.peer.root_did == alex.root.did
    assert opened.peer.identity_jwk == alex.agreement.jwk()
    # the session works both ways afterwards, and no token operation happens per message
    blair_state = opened.state
    reply = blair_state.encrypt(b"reply")
    state, text = state.decrypt(reply)
    assert text == b"reply"
    assert alex_agreement.exchanges == 1 and blair_agreement.exchanges == 1
    # the one-time prekeys the first message used are gone, the others remain
    assert not blair.store.has_one_time(bundle.one_time_prekeys[0][0])
    assert not blair.store.has_one_time(bundle.one_time_pq_prekeys[0][0], pq=True)
    assert blair.store.has_one_time(bundle.one_time_prekeys[1][0])
    assert header == wire[: len(header)]


def test_no_identity_is_on_the_wire_of_an_initial_header(
    make_owner: Callable[[Suite], Owner],
) -> None:
    alex, blair = make_owner(Suite.X25519), make_owner(Suite.X25519)
    bundle = _bundle(blair, one_time=1)
    own = sign_binding(alex.root, alex.agreement)
    _, header = x3dh.initiate(alex.agreement, alex.root.did, own, bundle)
    assert len(header) == x3dh.header_len(Suite.X25519)
    for visible in (
        alex.root.did.encode(),
        blair.root.did.encode(),
        bundle.signed_prekey_id.encode(),
        bundle.one_time_prekeys[0][0].encode(),
        bytes.fromhex(alex.agreement.public_key().public_bytes_raw().hex()),  # type: ignore[union-attr]
    ):
        assert visible not in header


def test_a_replayed_initial_message_is_refused(make_owner: Callable[[Suite], Owner]) -> None:
    alex, blair = make_owner(Suite.X25519), make_owner(Suite.X25519)
    own = sign_binding(alex.root, alex.agreement)
    for one_time in (1, 0):
        bundle = _bundle(blair, one_time=one_time)
        keys, _ = x3dh.initiate(alex.agreement, alex.root.did, own, bundle)
        wire = first_message(keys, RatchetState.initiator(keys), b"hi")
        open_first_message(blair.agreement, blair.store, wire, replay_guard=blair.guard)
        with pytest.raises(ReplayedInitialMessageError):
            open_first_message(blair.agreement, blair.store, wire, replay_guard=blair.guard)
        # a guard that lost its memory still cannot reuse a one-time prekey
        if one_time:
            fresh = x3dh.FileReplayGuard(blair.store.directory / "other-guard")
            with pytest.raises(PrekeyConsumedError):
                open_first_message(blair.agreement, blair.store, wire, replay_guard=fresh)


def test_one_time_prekeys_are_taken_exactly_once_and_stored_0600(
    make_owner: Callable[[Suite], Owner],
) -> None:
    blair = make_owner(Suite.P256)
    bundle = blair.store.publish(blair.root, blair.agreement, one_time=3)
    for path in blair.store.directory.iterdir():
        if path.name != ".lock":
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    prekey_id = bundle.one_time_prekeys[0][0]
    blair.store.take_one_time(prekey_id)
    assert not (blair.store.directory / f"opk-{prekey_id}").exists()
    with pytest.raises(PrekeyConsumedError):
        blair.store.take_one_time(prekey_id)
    pq_id = bundle.one_time_pq_prekeys[0][0]
    blair.store.take_one_time_pq(pq_id)
    with pytest.raises(PrekeyConsumedError):
        blair.store.take_one_time_pq(pq_id)
    with pytest.raises(RelationshipError):
        blair.store.take_one_time("../../etc/passwd")


def test_every_flipped_byte_of_an_initial_header_is_refused_without_state_change(
    make_owner: Callable[[Suite], Owner],
) -> None:
    alex, blair = make_owner(Suite.X25519), make_owner(Suite.X25519)
    bundle = _bundle(blair, one_time=1)
    own = sign_binding(alex.root, alex.agreement)
    keys, header = x3dh.initiate(alex.agreement, alex.root.did, own, bundle)
    wire = first_message(keys, RatchetState.initiator(keys), b"hi")
    counting = Counter(blair.agreement)
    for i in range(len(header)):
        bad = bytearray(wire)
        bad[i] ^= 0x01
        with pytest.raises(RelationshipError) as info:
            open_first_message(blair.agreement, blair.store, bytes(bad), replay_guard=blair.guard)
        assert type(info.value) in (DecryptError, MalformedMessageError, UnsupportedSuiteError)
    assert counting.exchanges == 0  # refused before the token was used
    assert blair.store.has_one_time(bundle.one_time_prekeys[0][0])
    assert not blair.guard.path.exists() or blair.guard.path.stat().st_size == 0
    for cut in (0, 1, 2, len(header) - 1):
        with pytest.raises(MalformedMessageError):
            open_first_message(blair.agreement, blair.store, wire[:cut], replay_guard=blair.guard)
    # the untouched message still opens
    opened = open_first_message(blair.agreement, blair.store, wire, replay_guard=blair.guard)
    assert opened.plaintext == b"hi"


def test_a_bundle_is_refused_unless_its_root_signed_exactly_it(
    make_owner: Callable[[Suite], Owner],
) -> None:
    blair, mallory = make_owner(Suite.X25519), make_owner(Suite.X25519)
    good = blair.store.publish(blair.root, blair.agreement, one_time=1).to_dict()
    assert PrekeyBundle.from_dict(good).to_dict() == good
    other = mallory.store.publish(mallory.root, mallory.agreement, one_time=1).to_dict()
    changes: list[Callable[[dict[str, Any]], None]] = [
        lambda d: d.__setitem__("signed_prekey", other["signed_prekey"]),
        lambda d: d.__setitem__("pq_prekey", other["pq_prekey"]),
        lambda d: d.__setitem__("one_time_prekeys", other["one_time_prekeys"]),
        lambda d: d.__setitem__("one_time_pq_prekeys", []),
        lambda d: d.__setitem__("identity_jwk", other["identity_jwk"]),
        lambda d: d.__setitem__("root_did", other["root_did"]),
        lambda d: d.__setitem__("binding", other["binding"]),
        lambda d: d.__setitem__("expires", d["expires"] + 1),
        lambda d: d.__setitem__("extra", 1),
        lambda d: d.pop("binding"),
        # a changed signature byte (not the last ones: Ed25519's top bits are zero)
        lambda d: d.__setitem__("binding", _flip_char(d["binding"], len(d["binding"]) - 20)),
        lambda d: d.__setitem__("pq_prekey", {"id": "x" * 16, "key": "AAAA"}),
    ]
    for index, change in enumerate(changes):
        bad = {k: v for k, v in good.items()}
        change(bad)
        with pytest.raises(BadPrekeyBundleError), _case(index):
            PrekeyBundle.from_dict(bad)
    with pytest.raises(BadPrekeyBundleError):
        PrekeyBundle.from_dict(good, now=good["expires"] + 1)
    with pytest.raises(BadPrekeyBundleError):
        PrekeyBundle.from_dict("not a bundle")


@contextlib.contextmanager
def _case(index: int) -> Iterator[None]:
    try:
        yield
    except BaseException as exc:
        exc.add_note(f"change #{index}")
        raise


def _flip_char(text: str, at: int) -> str:
    return text[:at] + ("B" if text[at] == "A" else "A") + text[at + 1 :]


def test_suites_must_match(make_owner: Callable[[Suite], Owner]) -> None:
    alex, blair = make_owner(Suite.X25519), make_owner(Suite.P256)
    bundle = _bundle(blair, one_time=0)
    own = sign_binding(alex.root, alex.agreement)
    with pytest.raises(UnsupportedSuiteError):
        x3dh.initiate(alex.agreement, alex.root.did, own, bundle)
