"""Keys from outside that no DH may use: typed errors, no state change, no token use.

Small-order X25519 points (the DH output is all zeros, which ``cryptography`` refuses
with a bare ValueError), P-256 encodings off the curve, and random bytes, wherever an
initial message or a bundle carries a public key.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, mlkem, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.relationships import suite as suites
from agent.relationships import x3dh
from agent.relationships.errors import BadPublicKeyError, RelationshipError
from agent.relationships.prekeys import (
    BINDING_TYP,
    PrekeyBundle,
    PrekeyStore,
    prekeys_digest,
    sign_binding,
    verify_binding,
)
from agent.relationships.ratchet import RatchetState, first_message, open_first_message
from agent.relationships.suite import SUITE_IDS, Suite, decode_jwk
from janus_hsm import b64url
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle
from janus_hsm.strictjson import canonical_json
from policies.jws import sign_compact
from tests.agent.relationships.test_vault import CountingHandle

#: X25519 encodings of small-order points (and non-canonical encodings of them): every
#: DH with one gives all zeros (the list of "Curve25519 points to reject", as data).
SMALL_ORDER = [
    bytes(32),
    bytes([1]) + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    bytes.fromhex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
]

SUITE_KEYS = {
    Suite.X25519: (Algorithm.EdDSA, Algorithm.X25519),
    Suite.P256: (Algorithm.ES256, Algorithm.ES256),
}
PUBLIC_LEN = {Suite.X25519: 32, Suite.P256: 33}
SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@dataclass
class Side:
    root: KeyHandle
    agreement: CountingHandle
    store: PrekeyStore
    guard: x3dh.FileReplayGuard

    def consumed(self) -> int:
        path = self.guard.path
        return path.stat().st_size // 32 if path.exists() else 0


@pytest.fixture
def pair(
    pkcs11_provider: Pkcs11Provider, tmp_path: Path
) -> Iterator[dict[Suite, tuple[Side, Side]]]:
    """For each suite: an initiator (alex) and a responder (blair), keys on the token."""
    made: list[KeyHandle] = []

    def side(suite: Suite) -> Side:
        root_alg, agreement_alg = SUITE_KEYS[suite]
        prefix = f"bad-{secrets.token_hex(4)}"
        root = pkcs11_provider.generate(f"pkcs11:object={prefix}-root", root_alg)
        agreement = pkcs11_provider.generate(f"pkcs11:object={prefix}-agree", agreement_alg)
        made.extend((root, agreement))
        return Side(
            root,
            CountingHandle(agreement),
            PrekeyStore(tmp_path / prefix / "prekeys", suite),
            x3dh.FileReplayGuard(tmp_path / prefix / "consumed"),
        )

    yield {suite: (side(suite), side(suite)) for suite in Suite}
    for handle in made:
        with contextlib.suppress(KeyNotFoundError):
            pkcs11_provider.delete(handle.uri)


def _first_message(alex: Side, bundle: PrekeyBundle) -> bytes:
    own = sign_binding(alex.root, alex.agreement)
    keys, _ = x3dh.initiate(alex.agreement, alex.root.did, own, bundle)
    return first_message(keys, RatchetState.initiator(keys), b'{"type":"hello"}')


def _refused_without_change(blair: Side, bundle: PrekeyBundle, wire: bytes) -> RelationshipError:
    before = (blair.agreement.exchanges, blair.consumed())
    with pytest.raises(RelationshipError) as info:
        open_first_message(blair.agreement, blair.store, wire, replay_guard=blair.guard)
    assert (blair.agreement.exchanges, blair.consumed()) == before
    assert blair.store.has_one_time(bundle.one_time_prekeys[0][0])
    assert blair.store.has_one_time(bundle.one_time_pq_prekeys[0][0], pq=True)
    return info.value


@pytest.mark.parametrize("suite", list(Suite))
def test_garbage_ephemeral_keys_are_typed_errors_without_state_change(
    suite: Suite, pair: dict[Suite, tuple[Side, Side]]
) -> None:
    alex, blair = pair[suite]
    bundle = PrekeyBundle.from_dict(blair.store.publish(blair.root, blair.agreement).to_dict())
    wire = _first_message(alex, bundle)
    n = PUBLIC_LEN[suite]
    keys = st.binary(min_size=n, max_size=n)
    if suite is Suite.X25519:
        keys = st.sampled_from(SMALL_ORDER) | keys
    else:  # compressed points: about half of the x values are on the curve
        keys = keys | st.builds(
            lambda p, x: bytes([p]) + x,
            st.sampled_from([2, 3]),
            st.binary(min_size=32, max_size=32),
        )

    @SETTINGS
    @given(ephemeral=keys)
    def check(ephemeral: bytes) -> None:
        bad = wire[:2] + ephemeral + wire[2 + n :]
        if bad == wire:
            return
        error = _refused_without_change(blair, bundle, bad)
        if suite is Suite.X25519 and ephemeral in SMALL_ORDER:
            assert isinstance(error, BadPublicKeyError)

    check()
    # After all of that, the real message still opens (nothing was used up).
    opened = open_first_message(blair.agreement, blair.store, wire, replay_guard=blair.guard)
    assert opened.plaintext == b'{"type":"hello"}'


def _x25519_jwk(raw: bytes) -> dict[str, str]:
    return {"kty": "OKP", "crv": "X25519", "x": b64url.encode(raw)}


def _sealed_header(alex: Side, bundle: PrekeyBundle, binding: str) -> bytes:
    """An initial header as ``x3dh.initiate`` seals it, for a binding ``initiate`` would
    not send (it checks its own binding): what a hostile initiator can put on the wire."""
    suite = bundle.suite
    ephemeral = x25519.X25519PrivateKey.generate()
    spk = decode_jwk(suite, bundle.signed_prekey_jwk)
    dh3 = ephemeral.exchange(spk)  # type: ignore[arg-type]
    pq_id, pq_raw = bundle.one_time_pq_prekeys[0]
    _, kem_ciphertext = mlkem.MLKEM768PublicKey.from_public_bytes(pq_raw).encapsulate()
    plain = canonical_json(
        {
            "spk": bundle.signed_prekey_id,
            "pq": pq_id,
            "pq_one_time": True,
            "opk": bundle.one_time_prekeys[0][0],
            "binding": binding,
        }
    )
    padded = plain + b"\x80" + bytes(x3dh.SEALED_LEN - 16 - len(plain) - 1)
    prefix = bytes((SUITE_IDS[suite], x3dh.KIND_INITIAL))
    ek = ephemeral.public_key().public_bytes_raw()
    key = x3dh.hkdf(dh3, salt=None, info=x3dh.INFO_SEAL + b" " + suite.value.encode(), length=32)
    sealed = AESGCM(key).encrypt(bytes(12), padded, prefix + ek + kem_ciphertext)
    return prefix + ek + kem_ciphertext + sealed


@pytest.mark.parametrize("point", SMALL_ORDER[:4], ids=lambda p: p.hex()[:8])
def test_a_small_order_identity_key_in_the_binding_consumes_nothing(
    point: bytes, pair: dict[Suite, tuple[Side, Side]]
) -> None:
    """The initiator's agreement key comes from its own binding, which a hostile
    initiator signs with its own root: refused before any prekey is used up."""
    alex, blair = pair[Suite.X25519]
    bundle = PrekeyBundle.from_dict(blair.store.publish(blair.root, blair.agreement).to_dict())
    now = int(time.time())
    payload: dict[str, Any] = {
        "iss": alex.root.did,
        "suite": str(Suite.X25519),
        "idk": _x25519_jwk(point),
        "iat": now,
        "exp": now + 3600,
    }
    binding = sign_compact(alex.root, {"typ": BINDING_TYP}, payload)
    wire = _sealed_header(alex, bundle, binding)
    error = _refused_without_change(blair, bundle, wire)
    assert isinstance(error, BadPublicKeyError)


@pytest.mark.parametrize("where", ["signed_prekey", "one_time_prekeys"])
@pytest.mark.parametrize("point", SMALL_ORDER[:3], ids=lambda p: p.hex()[:8])
def test_a_bundle_with_a_small_order_prekey_is_refused_before_the_token(
    where: str, point: bytes, pair: dict[Suite, tuple[Side, Side]]
) -> None:
    alex, blair = pair[Suite.X25519]
    published = blair.store.publish(blair.root, blair.agreement, one_time=1).to_dict()
    if where == "signed_prekey":
        published["signed_prekey"]["jwk"] = _x25519_jwk(point)
    else:
        published["one_time_prekeys"][0]["jwk"] = _x25519_jwk(point)
    digest = prekeys_digest(
        (published["signed_prekey"]["id"], published["signed_prekey"]["jwk"]),
        (published["pq_prekey"]["id"], b64url.decode(published["pq_prekey"]["key"])),
        tuple((e["id"], e["jwk"]) for e in published["one_time_prekeys"]),
        tuple((e["id"], b64url.decode(e["key"])) for e in published["one_time_pq_prekeys"]),
    )
    binding = sign_binding(blair.root, blair.agreement, prekeys_digest=digest)
    published["binding"] = binding
    published["expires"] = verify_binding(binding)[1]["exp"]
    bundle = PrekeyBundle.from_dict(published)  # its root signed it: only the DH can tell
    own = sign_binding(alex.root, alex.agreement)
    with pytest.raises(BadPublicKeyError):
        x3dh.initiate(alex.agreement, alex.root.did, own, bundle)
    assert alex.agreement.exchanges == 0


@SETTINGS
@given(raw=st.sampled_from(SMALL_ORDER))
def test_the_ratchet_refuses_a_small_order_ratchet_key(raw: bytes) -> None:
    """The DH ratchet runs on a key from the peer's (decrypted) header: the same typed
    refusal, and the pure ``decrypt`` leaves the caller's state as it was."""
    private = x25519.X25519PrivateKey.generate()
    with pytest.raises(BadPublicKeyError):
        suites.dh(private, suites.decode_public(Suite.X25519, raw))
    keys = x3dh.InitialKeys(bytes(32), b"ad", None, Suite.X25519)  # type: ignore[arg-type]
    with pytest.raises(BadPublicKeyError):
        RatchetState.initiator(keys, raw)


def test_keys_of_another_curve_are_typed_errors() -> None:
    x_private = x25519.X25519PrivateKey.generate()
    e_private = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(BadPublicKeyError):
        suites.dh(x_private, e_private.public_key())
    with pytest.raises(BadPublicKeyError):
        suites.dh(e_private, x_private.public_key())
    other = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(BadPublicKeyError):
        suites.dh(e_private, other)
    refused = 0
    for x in range(16):  # about half of the x values have no point on P-256
        try:
            suites.decode_public(Suite.P256, bytes([2]) + x.to_bytes(32, "big"))
        except BadPublicKeyError:
            refused += 1
    assert refused > 0


@SETTINGS
@given(raw=st.sampled_from(SMALL_ORDER))
def test_an_authenticated_small_order_ratchet_key_changes_nothing(raw: bytes) -> None:
    """A peer (who holds the header key) announces a small-order ratchet key: the DH
    ratchet refuses it with a typed error, and the receiving state is as it was."""
    spk = x25519.X25519PrivateKey.generate()
    secret = secrets.token_bytes(32)
    alice = RatchetState.initiator(
        x3dh.InitialKeys(
            secret, b"ad", None,  # type: ignore[arg-type]
            Suite.X25519, ratchet_public=spk.public_key().public_bytes_raw(),
        )
    )  # fmt: skip
    bob = RatchetState.responder(
        x3dh.InitialKeys(secret, b"ad", None, Suite.X25519, ratchet_private=spk)  # type: ignore[arg-type]
    )
    bob, _ = bob.decrypt(alice.encrypt(b"hello"))
    honest = RatchetState.from_bytes(bob.to_bytes())
    bob.dhs_public = raw  # what a hostile peer puts in its (encrypted) header
    before = alice.to_bytes()
    with pytest.raises(BadPublicKeyError):
        alice.decrypt(bob.encrypt(b"evil"))
    assert alice.to_bytes() == before
    alice, text = alice.decrypt(honest.encrypt(b"fine"))
    assert text == b"fine"
