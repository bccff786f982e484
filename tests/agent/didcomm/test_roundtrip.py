"""Pack → unpack round trips for every mode, curve and content encryption, with real keys.

Recipient and sender keys are KeyHandles from the software keystore and from SoftHSM
(generated inside the token; ECDH done by it).  Other implementations' output is
covered by test_spec_vectors.py.
"""

from __future__ import annotations

import json
from typing import Any

import nacl.bindings
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519

from agent.didcomm import (
    A256CBC_HS512,
    A256GCM,
    XC20P,
    KeyResolutionError,
    Message,
    NamedKey,
    PackError,
    Recipient,
    UnusableKeyError,
    WrongRecipientError,
    pack_anoncrypt,
    pack_authcrypt,
    pack_plaintext,
    pack_signed,
    resolve_recipient,
    unpack,
)
from agent.didcomm._encoding import b64d
from agent.didcomm.keys import (
    agreement_kid,
    did_key_of,
    ed25519_to_x25519,
    public_to_jwk,
    raw_bytes,
)
from janus_hsm.provider import KeyHandle

from .helpers import StaticKey

CURVES = {"X25519": "x25519", "P-256": "p256", "P-384": "p384"}
ENCS = [A256CBC_HS512, A256GCM, XC20P]
TYPE = "https://example.com/protocols/test/1.0/ping"


class Counting:
    """A KeyHandle seen through what DIDComm uses of it, counting ECDH calls."""

    def __init__(self, handle: KeyHandle) -> None:
        self.handle, self.exchanges = handle, 0

    def public_key(self) -> Any:
        return self.handle.public_key()

    def exchange(self, peer: Any) -> bytes:
        self.exchanges += 1
        return self.handle.exchange(peer)


def message(sender: KeyHandle | None = None, **kwargs: Any) -> Message:
    return Message.new(
        TYPE,
        {"text": "x" * 1000, "n": 7},
        from_=sender.did if sender is not None else None,
        **kwargs,
    )


def header(envelope: str) -> dict[str, Any]:
    obj = json.loads(envelope)
    result: dict[str, Any] = json.loads(b64d(obj["protected"], "protected"))
    return result


# --- software keystore keys -----------------------------------------------------------


@pytest.mark.parametrize("crv", list(CURVES))
@pytest.mark.parametrize("enc", ENCS)
def test_anoncrypt_software(soft_keys: dict[str, KeyHandle], crv: str, enc: str) -> None:
    recipient = soft_keys[f"{CURVES[crv]}-a"]
    sent = message()
    envelope = pack_anoncrypt(sent, [recipient.did], enc=enc)
    h = header(envelope)
    assert h["alg"] == "ECDH-ES+A256KW" and h["enc"] == enc and h["epk"]["crv"] == crv
    assert h["typ"] == "application/didcomm-encrypted+json"
    assert "apu" not in h and "skid" not in h
    counting = Counting(recipient)
    unpacked = unpack(envelope, [counting])
    assert unpacked.message == sent
    assert counting.exchanges == 1
    meta = unpacked.metadata
    assert meta.mode == "anoncrypt" and meta.algorithms == [f"ECDH-ES+A256KW/{enc}"]
    assert meta.sender is None and meta.layers[0].kid == agreement_kid(recipient.did)


@pytest.mark.parametrize("crv", list(CURVES))
def test_authcrypt_software(soft_keys: dict[str, KeyHandle], crv: str) -> None:
    sender = soft_keys[f"{CURVES[crv]}-a"]
    recipient = soft_keys[f"{CURVES[crv]}-b"]
    sent = message(sender)
    counting_sender = Counting(sender)
    envelope = pack_authcrypt(sent, [recipient.did], counting_sender)
    assert counting_sender.exchanges == 1
    h = header(envelope)
    skid = agreement_kid(sender.did)
    assert h["alg"] == "ECDH-1PU+A256KW" and h["enc"] == A256CBC_HS512
    assert h["skid"] == skid and b64d(h["apu"], "apu") == skid.encode()
    counting = Counting(recipient)
    unpacked = unpack(envelope, [counting])
    assert counting.exchanges == 2
    assert unpacked.message == sent
    assert unpacked.metadata.mode == "authcrypt"
    assert unpacked.metadata.sender_kid == skid
    assert unpacked.metadata.sender == sender.did


@pytest.mark.parametrize("signer_name", ["ed25519", "p256-a", "p384-a"])
def test_signed_software(soft_keys: dict[str, KeyHandle], signer_name: str) -> None:
    signer = soft_keys[signer_name]
    sent = message(signer)
    for flattened in (False, True):
        envelope = pack_signed(sent, signer, flattened=flattened)
        assert ("signatures" in json.loads(envelope)) is not flattened
        unpacked = unpack(envelope)
        assert unpacked.message == sent
        assert unpacked.metadata.mode == "signed"
        assert unpacked.metadata.signed_by == f"{signer.did}#{signer.did[8:]}"


@pytest.mark.parametrize("enc", ENCS)
def test_anoncrypt_of_signed(soft_keys: dict[str, KeyHandle], enc: str) -> None:
    signer, recipient = soft_keys["ed25519"], soft_keys["x25519-a"]
    sent = message(signer)
    envelope = pack_anoncrypt(sent, [recipient.did], enc=enc, signer=signer)
    unpacked = unpack(envelope, [recipient])
    assert unpacked.message == sent
    assert unpacked.metadata.mode == "anoncrypt+signed"
    assert unpacked.metadata.sender == signer.did
    assert unpacked.metadata.signed_message is not None
    # The signed message is independently verifiable (non-repudiation).
    assert unpack(unpacked.metadata.signed_message).message == sent


@pytest.mark.parametrize("crv", list(CURVES))
def test_authcrypt_with_protected_sender(soft_keys: dict[str, KeyHandle], crv: str) -> None:
    sender, recipient = soft_keys[f"{CURVES[crv]}-a"], soft_keys[f"{CURVES[crv]}-b"]
    sent = message(sender)
    envelope = pack_authcrypt(sent, [recipient.did], sender, protect_sender=True)
    h = header(envelope)
    assert h["alg"] == "ECDH-ES+A256KW" and "skid" not in h  # the sender is hidden
    unpacked = unpack(envelope, [recipient])
    assert unpacked.message == sent
    assert unpacked.metadata.mode == "anoncrypt+authcrypt"
    assert unpacked.metadata.sender == sender.did


def test_authcrypt_of_signed(soft_keys: dict[str, KeyHandle]) -> None:
    sender = soft_keys["p256-a"]  # one P-256 key both signs and agrees keys
    recipient = soft_keys["p256-b"]
    sent = message(sender)
    envelope = pack_authcrypt(sent, [recipient.did], sender, signer=sender)
    unpacked = unpack(envelope, [recipient])
    assert unpacked.metadata.mode == "authcrypt+signed"
    assert unpacked.message == sent


@pytest.mark.parametrize("crv", list(CURVES))
def test_several_recipients(soft_keys: dict[str, KeyHandle], crv: str) -> None:
    names = [f"{CURVES[crv]}-a", f"{CURVES[crv]}-b"] + (["x25519-c"] if crv == "X25519" else [])
    recipients = [soft_keys[n] for n in names]
    sent = message(to=[r.did for r in recipients])
    for envelope in (
        pack_anoncrypt(sent, [r.did for r in recipients], enc=XC20P),
        pack_authcrypt(
            message(recipients[0], to=[r.did for r in recipients]),
            [r.did for r in recipients],
            recipients[0],
        ),
    ):
        obj = json.loads(envelope)
        assert [r["header"]["kid"] for r in obj["recipients"]] == [
            agreement_kid(r.did) for r in recipients
        ]
        for r in recipients:
            unpacked = unpack(envelope, [r])
            assert unpacked.metadata.layers[0].kid == agreement_kid(r.did)


def test_recipients_on_different_curves_are_refused(soft_keys: dict[str, KeyHandle]) -> None:
    with pytest.raises(PackError, match="different curves"):
        pack_anoncrypt(message(), [soft_keys["x25519-a"].did, soft_keys["p256-a"].did])


def test_authcrypt_refuses_wrong_from_and_other_encs(soft_keys: dict[str, KeyHandle]) -> None:
    sender, recipient = soft_keys["x25519-a"], soft_keys["x25519-b"]
    with pytest.raises(PackError, match="from"):
        pack_authcrypt(message(soft_keys["x25519-c"]), [recipient.did], sender)
    with pytest.raises(PackError, match="from"):
        pack_authcrypt(message(), [recipient.did], sender)
    with pytest.raises(PackError, match=r"curve|P-256"):
        pack_authcrypt(message(soft_keys["p256-a"]), [recipient.did], soft_keys["p256-a"])
    with pytest.raises(UnusableKeyError):
        pack_authcrypt(message(soft_keys["ed25519"]), [recipient.did], soft_keys["ed25519"])


def test_to_must_list_every_recipient(soft_keys: dict[str, KeyHandle]) -> None:
    recipient = soft_keys["x25519-a"]
    with pytest.raises(PackError, match="does not list"):
        pack_anoncrypt(message(to=["did:example:someone-else"]), [recipient.did])


def test_signed_from_must_be_the_signer(soft_keys: dict[str, KeyHandle]) -> None:
    with pytest.raises(PackError):
        pack_signed(message(soft_keys["p256-a"]), soft_keys["ed25519"])
    with pytest.raises(PackError):
        pack_signed(message(soft_keys["x25519-a"]), soft_keys["x25519-a"])  # cannot sign


def test_unknown_enc_is_refused(soft_keys: dict[str, KeyHandle]) -> None:
    with pytest.raises(PackError):
        pack_anoncrypt(message(), [soft_keys["x25519-a"].did], enc="A128GCM")


def test_plaintext_round_trip() -> None:
    sent = message()
    unpacked = unpack(pack_plaintext(sent))
    assert unpacked.message == sent and unpacked.metadata.mode == "plaintext"


def test_wrong_recipient(soft_keys: dict[str, KeyHandle]) -> None:
    envelope = pack_anoncrypt(message(), [soft_keys["x25519-a"].did])
    with pytest.raises(WrongRecipientError):
        unpack(envelope, [soft_keys["x25519-b"]])
    with pytest.raises(WrongRecipientError):
        unpack(envelope, [soft_keys["p256-a"]])
    with pytest.raises(WrongRecipientError):
        unpack(envelope, [])


def test_ed25519_key_cannot_unpack(soft_keys: dict[str, KeyHandle]) -> None:
    envelope = pack_anoncrypt(message(), [soft_keys["x25519-a"].did])
    with pytest.raises(UnusableKeyError, match="Ed25519"):
        unpack(envelope, [soft_keys["ed25519"], soft_keys["x25519-a"]])


# --- recipients given other ways -------------------------------------------------------


def test_ed25519_did_key_recipient_gets_the_derived_x25519_key() -> None:
    signing = ed25519.Ed25519PrivateKey.generate()
    did = did_key_of(signing.public_key())
    recipient = resolve_recipient(did)
    expected = nacl.bindings.crypto_sign_ed25519_pk_to_curve25519(raw_bytes(signing.public_key()))
    assert raw_bytes(recipient.public_key) == expected
    assert recipient.kid.startswith(did + "#z6LS")
    assert recipient.did == did
    envelope = pack_anoncrypt(message(to=[did]), [did])
    # The holder of the Ed25519 private key can derive the X25519 one (here in software).
    seed_and_public = signing.private_bytes_raw() + raw_bytes(signing.public_key())
    x_private = x25519.X25519PrivateKey.from_private_bytes(
        nacl.bindings.crypto_sign_ed25519_sk_to_curve25519(seed_and_public)
    )
    # Matched through its did:key alone: did:key:<Ed25519>#<X25519> is recognised.
    unpacked = unpack(envelope, [StaticKey(x_private)])
    assert unpacked.metadata.layers[0].kid == recipient.kid
    assert ed25519_to_x25519(signing.public_key()).public_bytes_raw() == expected


def test_jwk_recipient_with_did_url_kid() -> None:
    key = StaticKey(ec.generate_private_key(ec.SECP384R1()))
    kid = "did:example:carol#key-agreement-1"
    jwk = {**public_to_jwk(key.public_key()), "kid": kid}
    envelope = pack_anoncrypt(message(to=["did:example:carol"]), [jwk])
    assert json.loads(envelope)["recipients"][0]["header"]["kid"] == kid
    unpacked = unpack(envelope, [NamedKey(kid, key)])
    assert unpacked.metadata.layers[0].kid == kid
    with pytest.raises(WrongRecipientError):  # a bare key is matched only via did:key
        unpack(envelope, [key])


@pytest.mark.parametrize(
    "spec",
    [
        "did:example:carol",
        "did:key:zNotBase58Okay0",
        {"kty": "OKP", "crv": "X25519", "x": "AAAA"},
        {"kty": "OKP", "crv": "X25519", "x": "AAAA", "kid": "not-a-did-url"},
    ],
)
def test_unresolvable_recipients(spec: Any) -> None:
    with pytest.raises(KeyResolutionError):
        pack_anoncrypt(message(), [spec])


def test_did_key_jwk_must_match_its_kid(soft_keys: dict[str, KeyHandle]) -> None:
    a, b = soft_keys["x25519-a"], soft_keys["x25519-b"]
    jwk = {**public_to_jwk(a.public_key()), "kid": agreement_kid(b.did)}
    with pytest.raises(KeyResolutionError):
        resolve_recipient(jwk)


def test_ed25519_jwk_is_not_a_recipient() -> None:
    public = ed25519.Ed25519PrivateKey.generate().public_key()
    with pytest.raises(KeyResolutionError):
        resolve_recipient(Recipient("did:example:x#k", public))


def test_p521_round_trip_with_named_keys() -> None:
    sender = StaticKey(ec.generate_private_key(ec.SECP521R1()))
    recipient = StaticKey(ec.generate_private_key(ec.SECP521R1()))
    skid, rkid = "did:example:alice#p521", "did:example:bob#p521"
    sent = Message.new(TYPE, {"a": 1}, from_="did:example:alice", to=["did:example:bob"])
    bob = Recipient(rkid, recipient.public_key())
    envelope = pack_authcrypt(sent, [bob], NamedKey(skid, sender))
    assert header(envelope)["epk"]["crv"] == "P-521"
    unpacked = unpack(
        envelope,
        [NamedKey(rkid, recipient)],
        sender_resolver={skid: sender.public_key()}.get,
    )
    assert unpacked.message == sent and unpacked.metadata.sender_kid == skid


# --- keys in SoftHSM ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["x25519", "p256", "p384"])
@pytest.mark.parametrize("enc", ENCS)
def test_anoncrypt_to_softhsm_key(hsm_keys: dict[str, KeyHandle], name: str, enc: str) -> None:
    recipient = hsm_keys[name]
    assert recipient.properties.custody_grade  # generated in the token, never extractable
    sent = message()
    envelope = pack_anoncrypt(sent, [recipient.did], enc=enc)
    counting = Counting(recipient)
    assert unpack(envelope, [counting]).message == sent
    assert counting.exchanges == 1


@pytest.mark.parametrize("name", ["x25519", "p256"])
def test_authcrypt_between_softhsm_keys(hsm_keys: dict[str, KeyHandle], name: str) -> None:
    sender, recipient = hsm_keys[name], hsm_keys[f"{name}-b"]
    sent = message(sender)
    envelope = pack_authcrypt(sent, [recipient.did], sender)
    unpacked = unpack(envelope, [recipient])
    assert unpacked.message == sent
    assert unpacked.metadata.sender == sender.did


@pytest.mark.parametrize(("soft", "hsm"), [("x25519-a", "x25519"), ("p256-a", "p256")])
def test_software_and_softhsm_interwork(
    soft_keys: dict[str, KeyHandle], hsm_keys: dict[str, KeyHandle], soft: str, hsm: str
) -> None:
    software, token = soft_keys[soft], hsm_keys[hsm]
    # Software sender → token recipient, and back; several recipients mixing both.
    to_token = pack_authcrypt(message(software), [token.did], software)
    assert unpack(to_token, [token]).metadata.sender == software.did
    to_soft = pack_authcrypt(message(token), [software.did], token)
    assert unpack(to_soft, [software]).metadata.sender == token.did
    both = pack_anoncrypt(message(), [software.did, token.did])
    assert unpack(both, [token]).metadata.layers[0].kid == agreement_kid(token.did)
    assert unpack(both, [software]).metadata.layers[0].kid == agreement_kid(software.did)


def test_signed_by_softhsm_keys(hsm_keys: dict[str, KeyHandle]) -> None:
    for name in ("ed25519", "p256", "p384"):
        signer = hsm_keys[name]
        sent = message(signer)
        assert unpack(pack_signed(sent, signer)).metadata.signed_by is not None
        envelope = pack_anoncrypt(sent, [hsm_keys["x25519"].did], signer=signer)
        assert unpack(envelope, [hsm_keys["x25519"]]).metadata.mode == "anoncrypt+signed"


def test_recipient_kid_must_be_a_did_url(soft_keys: dict[str, KeyHandle]) -> None:
    with pytest.raises(KeyResolutionError):
        Recipient("key-1", soft_keys["x25519-a"].public_key())
