"""The DIDComm spec's published vectors decrypt and verify (interoperability).

The envelopes were made by other implementations; decrypting them exercises the parts a
round trip cannot: the exact KDF inputs (apu/apv, ECDH-1PU's tag), the header layout,
the JWS signing input.  Data: spec_vectors.py (copied from the spec's appendix).
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.concatkdf import ConcatKDFHash

from agent.didcomm import (
    EnvelopeError,
    NamedKey,
    SignatureError,
    UnknownSenderError,
    WrongRecipientError,
    jwk_resolver,
    unpack,
)
from agent.didcomm._encoding import b64d, b64e
from agent.didcomm.jwa import concat_kdf

from . import spec_vectors as v
from .helpers import StaticKey, doc_jwks, kid_of, named_keys, private_from_jwk

EXPECTED_PLAINTEXT = {
    **v.PLAINTEXT,
    # The signed and encrypted vectors carry "http://…" although C.1 prints "https://…".
    "type": "http://example.com/protocols/lets_do_lunch/1.0/proposal",
}

ENCRYPTED_EXPECTATIONS = {
    "anoncrypt_x25519_xc20p": ("anoncrypt", ["ECDH-ES+A256KW/XC20P"]),
    "anoncrypt_p384_a256cbc": ("anoncrypt", ["ECDH-ES+A256KW/A256CBC-HS512"]),
    "anoncrypt_p521_a256gcm": ("anoncrypt", ["ECDH-ES+A256KW/A256GCM"]),
    "authcrypt_x25519": ("authcrypt", ["ECDH-1PU+A256KW/A256CBC-HS512"]),
    "signed_authcrypt_p256": ("authcrypt+signed", ["ECDH-1PU+A256KW/A256CBC-HS512", "EdDSA"]),
    "signed_authcrypt_anoncrypt_p521_xc20p": (
        "anoncrypt+authcrypt+signed",
        ["ECDH-ES+A256KW/XC20P", "ECDH-1PU+A256KW/A256CBC-HS512", "EdDSA"],
    ),
}


def alice_resolver() -> Any:
    return jwk_resolver(doc_jwks(v.ALICE_DID_DOC))


def bob_keys() -> list[NamedKey]:
    return named_keys(v.BOB_SECRETS)


def as_plaintext(message: dict[str, Any]) -> dict[str, Any]:
    out = dict(message)
    assert out.pop("typ") == "application/didcomm-plain+json"
    return out


@pytest.mark.parametrize("name", list(ENCRYPTED_EXPECTATIONS))
def test_encrypted_vectors_decrypt(name: str) -> None:
    unpacked = unpack(v.ENCRYPTED[name], bob_keys(), sender_resolver=alice_resolver())
    mode, algorithms = ENCRYPTED_EXPECTATIONS[name]
    assert as_plaintext(unpacked.message.to_dict()) == EXPECTED_PLAINTEXT
    assert unpacked.metadata.mode == mode
    assert unpacked.metadata.algorithms == algorithms
    assert unpacked.metadata.encrypted
    if "authcrypt" in mode:
        assert unpacked.metadata.sender_kid is not None
        assert unpacked.metadata.sender_kid.startswith("did:example:alice#key-")
        assert unpacked.metadata.sender == "did:example:alice"
    else:
        assert unpacked.metadata.sender is None
    if "signed" in mode:
        assert unpacked.metadata.signed_by == "did:example:alice#key-1"
        assert unpacked.metadata.signed_message is not None


@pytest.mark.parametrize("name", list(ENCRYPTED_EXPECTATIONS))
def test_each_recipient_of_a_vector_decrypts_alone(name: str) -> None:
    envelope = v.ENCRYPTED[name]
    outer_kids = [r["header"]["kid"] for r in envelope["recipients"]]
    by_kid = {k.kid: k for k in bob_keys()}
    for kid in outer_kids:
        # Only this recipient's key for the outer layer (inner layers may need others).
        keys = [by_kid[kid]] + [k for k in bob_keys() if k.kid not in outer_kids]
        unpacked = unpack(envelope, keys, sender_resolver=alice_resolver())
        assert unpacked.metadata.layers[0].kid == kid
        assert as_plaintext(unpacked.message.to_dict()) == EXPECTED_PLAINTEXT


def test_anoncrypt_vector_needs_one_ecdh_and_authcrypt_two() -> None:
    anon_key = NamedKey(
        "did:example:bob#key-x25519-1", StaticKey(private_from_jwk(v.BOB_SECRETS[0]))
    )
    unpack(v.ENCRYPTED["anoncrypt_x25519_xc20p"], [anon_key])
    assert isinstance(anon_key.key, StaticKey) and anon_key.key.exchanges == 1
    auth_key = NamedKey(
        "did:example:bob#key-x25519-1", StaticKey(private_from_jwk(v.BOB_SECRETS[0]))
    )
    unpack(v.ENCRYPTED["authcrypt_x25519"], [auth_key], sender_resolver=alice_resolver())
    assert isinstance(auth_key.key, StaticKey) and auth_key.key.exchanges == 2


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "ES256K"])
def test_signed_vectors_verify(alg: str) -> None:
    unpacked = unpack(v.SIGNED[alg], [], sender_resolver=alice_resolver())
    assert as_plaintext(unpacked.message.to_dict()) == EXPECTED_PLAINTEXT
    assert unpacked.metadata.mode == "signed"
    assert unpacked.metadata.algorithms == [alg]
    assert unpacked.metadata.signed_by and unpacked.metadata.signed_by.startswith(
        "did:example:alice#key-"
    )
    assert not unpacked.metadata.encrypted


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "ES256K"])
def test_signed_vectors_in_flattened_form_verify(alg: str) -> None:
    general = v.SIGNED[alg]
    flattened = {"payload": general["payload"], **general["signatures"][0]}
    assert unpack(flattened, [], sender_resolver=alice_resolver()).metadata.algorithms == [alg]


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "ES256K"])
def test_signed_vectors_tampered_fail(alg: str) -> None:
    jws = copy.deepcopy(v.SIGNED[alg])
    payload = json.loads(b64d(jws["payload"], "payload"))
    payload["body"]["messagespecificattribute"] = "and another value"
    jws["payload"] = b64e(json.dumps(payload).encode())
    with pytest.raises(SignatureError):
        unpack(jws, [], sender_resolver=alice_resolver())


def test_signed_vector_without_resolver_is_unknown_sender() -> None:
    with pytest.raises(UnknownSenderError):
        unpack(v.SIGNED["EdDSA"], [])


def test_vectors_refuse_the_wrong_recipient() -> None:
    alice = named_keys(v.ALICE_SECRETS[3:5])  # alice's own X25519 and P-256 keys
    for name in ENCRYPTED_EXPECTATIONS:
        with pytest.raises(WrongRecipientError):
            unpack(v.ENCRYPTED[name], alice, sender_resolver=alice_resolver())


@pytest.mark.parametrize("name", list(ENCRYPTED_EXPECTATIONS))
@pytest.mark.parametrize("member", ["ciphertext", "tag", "iv", "encrypted_key", "protected"])
def test_vectors_with_one_flipped_bit_fail(name: str, member: str) -> None:
    envelope = copy.deepcopy(v.ENCRYPTED[name])
    holder = envelope["recipients"][0] if member == "encrypted_key" else envelope
    raw = bytearray(b64d(holder[member], member))
    raw[len(raw) // 2] ^= 0x01
    holder[member] = b64e(bytes(raw))
    # Only the first recipient's key for the outer layer: with several of our keys
    # listed, a damaged wrapped key for one of them is (correctly) not fatal.
    others = {r["header"]["kid"] for r in envelope["recipients"][1:]}
    keys = [k for k in bob_keys() if k.kid not in others]
    with pytest.raises(EnvelopeError):
        unpack(envelope, keys, sender_resolver=alice_resolver())


def test_a_damaged_wrapped_key_of_another_of_our_keys_is_not_fatal() -> None:
    envelope = copy.deepcopy(v.ENCRYPTED["anoncrypt_x25519_xc20p"])
    raw = bytearray(b64d(envelope["recipients"][0]["encrypted_key"], "k"))
    raw[3] ^= 0x80
    envelope["recipients"][0]["encrypted_key"] = b64e(bytes(raw))
    unpacked = unpack(envelope, bob_keys())
    assert unpacked.metadata.layers[0].kid == "did:example:bob#key-x25519-2"


def test_secrets_and_did_docs_agree() -> None:
    """Sanity of the copied data: every secret's public half is in its DID document."""
    published = {j["kid"]: j for j in doc_jwks(v.ALICE_DID_DOC) + doc_jwks(v.BOB_DID_DOC)}
    for jwk in v.ALICE_SECRETS + v.BOB_SECRETS:
        public = {k: jwk[k] for k in ("kty", "crv", "x", "y") if k in jwk}
        assert {k: published[kid_of(jwk)][k] for k in public} == public


# --- the KDF on its own -------------------------------------------------------------------


def test_concat_kdf_rfc7518_appendix_c() -> None:
    """RFC 7518 Appendix C: ECDH-ES with A128GCM, apu "Alice", apv "Bob"."""
    alice_d = "0_NxaRPUMQoAJt50Gz8YiTr8gRTwyEaCumd-MToTmIo"
    bob = {
        "x": "weNJy2HscCSM6AEDTDg04biOvhFhyyWvOHQfeF_PxMQ",
        "y": "e8lnCO-AlStT-NJVX-crhB7QRYhiix03illJOVAOyck",
    }
    private = ec.derive_private_key(int.from_bytes(b64d(alice_d, "d"), "big"), ec.SECP256R1())
    public = ec.EllipticCurvePublicNumbers(
        int.from_bytes(b64d(bob["x"], "x"), "big"),
        int.from_bytes(b64d(bob["y"], "y"), "big"),
        ec.SECP256R1(),
    ).public_key()
    z = private.exchange(ec.ECDH(), public)
    key = concat_kdf(z, alg="A128GCM", apu=b"Alice", apv=b"Bob", key_bits=128)
    assert b64e(key) == "VqqN6vgjbSBcIijNcacQGg"


@pytest.mark.parametrize("bits", [128, 256, 512])
@pytest.mark.parametrize("tag", [None, b"", bytes(range(32))])
def test_concat_kdf_matches_cryptography(bits: int, tag: bytes | None) -> None:
    z = bytes(range(64))
    apu, apv = b"did:example:alice#key-1", bytes(32)
    supp = bits.to_bytes(4, "big") + (b"" if tag is None else len(tag).to_bytes(4, "big") + tag)
    alg = b"ECDH-1PU+A256KW"
    other = (
        len(alg).to_bytes(4, "big")
        + alg
        + len(apu).to_bytes(4, "big")
        + apu
        + len(apv).to_bytes(4, "big")
        + apv
        + supp
    )
    expected = ConcatKDFHash(hashes.SHA256(), bits // 8, other).derive(z)
    assert concat_kdf(z, alg=alg.decode(), apu=apu, apv=apv, key_bits=bits, tag=tag) == expected
