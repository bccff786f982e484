"""What Janus packs, an independent JOSE implementation (joserfc) opens and verifies.

The spec's vectors show that Janus reads other implementations' envelopes; this is the
other direction: the hand-assembled ECDH-ES / ECDH-1PU key agreement, Concat KDF, key
wrap, content encryption and JWS come out as any RFC 7516/7515 (and 1PU draft) reader
expects.  joserfc is a dev dependency; XC20P needs pycryptodome there, so it is covered
by the spec vector instead.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from agent.didcomm import (
    A256CBC_HS512,
    A256GCM,
    Message,
    NamedKey,
    Recipient,
    pack_anoncrypt,
    pack_authcrypt,
    pack_signed,
)
from agent.didcomm._encoding import b64e
from agent.didcomm.keys import public_to_jwk

from .helpers import PrivateKey, StaticKey

joserfc = pytest.importorskip("joserfc")
from joserfc import jwe, jws  # noqa: E402
from joserfc.drafts.jwe_ecdh_1pu import register_ecdh_1pu  # noqa: E402
from joserfc.jwk import ECKey, KeySet, OKPKey  # noqa: E402

register_ecdh_1pu()

CURVES = ["X25519", "P-256", "P-384"]


def new_key(crv: str) -> PrivateKey:
    if crv == "X25519":
        return x25519.X25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1() if crv == "P-256" else ec.SECP384R1())


def joserfc_key(private: PrivateKey, kid: str | None = None) -> Any:
    jwk: dict[str, Any] = public_to_jwk(private.public_key())
    if kid is not None:
        jwk["kid"] = kid
    if isinstance(private, x25519.X25519PrivateKey | ed25519.Ed25519PrivateKey):
        jwk["d"] = b64e(private.private_bytes_raw())
        return OKPKey.import_key(jwk)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    size = (private.curve.key_size + 7) // 8
    jwk["d"] = b64e(private.private_numbers().private_value.to_bytes(size, "big"))
    return ECKey.import_key(jwk)


def public_jwk(public: Any) -> dict[str, Any]:
    return dict(public_to_jwk(public))


def message(**kwargs: Any) -> Message:
    return Message.new("https://example.com/t/1.0/m", {"text": "hello"}, **kwargs)


@pytest.mark.parametrize("crv", CURVES)
@pytest.mark.parametrize("enc", [A256CBC_HS512, A256GCM])
def test_joserfc_decrypts_anoncrypt(crv: str, enc: str) -> None:
    bob, carol = new_key(crv), new_key(crv)
    sent = message(to=["did:example:bob", "did:example:carol"])
    envelope = pack_anoncrypt(
        sent,
        [
            Recipient("did:example:bob#k1", bob.public_key()),
            Recipient("did:example:carol#k1", carol.public_key()),
        ],
        enc=enc,
    )
    # joserfc unwraps the CEK for every recipient entry, so it gets both keys, by kid.
    keys = KeySet(
        [joserfc_key(bob, "did:example:bob#k1"), joserfc_key(carol, "did:example:carol#k1")]
    )
    result = jwe.decrypt_json(json.loads(envelope), keys, algorithms=["ECDH-ES+A256KW", enc])
    assert json.loads(result.plaintext or b"") == sent.to_dict()
    single = pack_anoncrypt(
        message(to=["did:example:bob"]),
        [Recipient("did:example:bob#k1", bob.public_key())],
        enc=enc,
    )
    result = jwe.decrypt_json(
        json.loads(single), joserfc_key(bob), algorithms=["ECDH-ES+A256KW", enc]
    )
    assert json.loads(result.plaintext or b"")["to"] == ["did:example:bob"]


@pytest.mark.parametrize("crv", CURVES)
def test_joserfc_decrypts_authcrypt(crv: str) -> None:
    alice, bob = new_key(crv), new_key(crv)
    sent = message(from_="did:example:alice", to=["did:example:bob"])
    envelope = pack_authcrypt(
        sent,
        [Recipient("did:example:bob#k1", bob.public_key())],
        NamedKey("did:example:alice#k1", StaticKey(alice)),
    )
    sender_public = OKPKey if crv == "X25519" else ECKey
    result = jwe.decrypt_json(
        json.loads(envelope),
        joserfc_key(bob),
        algorithms=["ECDH-1PU+A256KW", A256CBC_HS512],
        sender_key=sender_public.import_key(public_jwk(alice.public_key())),
    )
    assert json.loads(result.plaintext or b"") == sent.to_dict()


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")  # joserfc prefers "Ed25519" now
@pytest.mark.parametrize("crv", ["Ed25519", "P-256"])
def test_joserfc_verifies_signed(crv: str) -> None:
    private: PrivateKey = (
        ed25519.Ed25519PrivateKey.generate()
        if crv == "Ed25519"
        else ec.generate_private_key(ec.SECP256R1())
    )
    sent = message(from_="did:example:alice")
    alg = "EdDSA" if crv == "Ed25519" else "ES256"
    for flattened in (False, True):
        envelope = pack_signed(
            sent, StaticKey(private), kid="did:example:alice#sig", flattened=flattened
        )
        key = (OKPKey if crv == "Ed25519" else ECKey).import_key(public_jwk(private.public_key()))
        result = jws.deserialize_json(json.loads(envelope), key, algorithms=[alg])
        assert json.loads(result.payload or b"") == sent.to_dict()
