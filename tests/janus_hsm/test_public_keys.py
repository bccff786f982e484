"""JWK and did:key encoding against published vectors, and refusal of malformed input."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from hypothesis import given
from hypothesis import strategies as st

from janus_hsm.algorithms import Algorithm
from janus_hsm.public_keys import (
    PublicKeyFormatError,
    algorithm_of,
    from_did_key,
    from_jwk,
    jwk_thumbprint,
    to_did_key,
    to_jwk,
)

# Test vectors from the did:key method specification (W3C CCG).
DID_KEY_VECTORS = [
    ("did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp", Algorithm.EdDSA),
    ("did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK", Algorithm.EdDSA),
    ("did:key:z6LSbysY2xFMRpGMhb7tFTLMpeuPRaqaWM1yECx2AtzE3KCc", Algorithm.X25519),
    ("did:key:zDnaerDaTF5BXEavCrfRZEk316dpbLsfPDZ3WJ5hRTPFU2169", Algorithm.ES256),
    ("did:key:zDnaerx9CtbPJ1q36T5Ln5wYt3MQYeGRG5ehnPAmxcf5mDZpv", Algorithm.ES256),
    (
        "did:key:z82Lm1MpAkeJcix9K8TMiLd5NMAhnwkjjCBeWHXyu3U4oT2MVJJKXkcVBgjGhnLBn2Kaau9",
        Algorithm.ES384,
    ),
]


@pytest.mark.parametrize(("did", "alg"), DID_KEY_VECTORS)
def test_did_key_vectors_round_trip(did: str, alg: Algorithm) -> None:
    public = from_did_key(did)
    assert algorithm_of(public) is alg
    assert to_did_key(public) == did
    assert from_did_key(did + "#" + did.removeprefix("did:key:")) == public


def test_rfc8037_thumbprint_vector() -> None:
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert jwk_thumbprint(from_jwk(jwk)) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def _keys() -> list[object]:
    return [
        ec.generate_private_key(ec.SECP256R1()).public_key(),
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
        x25519.X25519PrivateKey.generate().public_key(),
    ]


@pytest.mark.parametrize("public", _keys(), ids=["P-256", "P-384", "Ed25519", "X25519"])
def test_jwk_and_did_round_trip(public: object) -> None:
    assert from_jwk(to_jwk(public)) == public  # type: ignore[arg-type]
    assert from_did_key(to_did_key(public)) == public  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        ({"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"}, "crv"),
        ({"kty": "OKP", "crv": "P-256", "x": "AA", "y": "AA"}, "kty"),
        ({"kty": "OKP", "crv": "Ed25519"}, "'x'"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}, "32 bytes"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "a+b/"}, "base64url"),
        ({"kty": "OKP", "crv": "Ed25519", "x": "AA==", "d": "AA"}, "private"),
        (
            {"kty": "EC", "crv": "P-256", "x": "A" * 43, "y": "A" * 43},
            "invalid P-256",
        ),
        ("not json", "JSON"),
        ("[1]", "object"),
    ],
)
def test_bad_jwks_are_refused(jwk: object, message: str) -> None:
    with pytest.raises(PublicKeyFormatError, match=message):
        from_jwk(jwk)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "did",
    [
        "did:web:example.com",
        "did:key:6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp",
        "did:key:z0OIl",
        "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDoo",
        "did:key:z6MkiTBz1ymuepAQ4HEHYSF1H8quG5GLVVQR3djdX3mDooWp#other",
        "did:key:z" + "1" * 300,
    ],
)
def test_bad_did_keys_are_refused(did: str) -> None:
    with pytest.raises(PublicKeyFormatError):
        from_did_key(did)


@given(st.binary(max_size=60))
def test_arbitrary_multicodec_bytes_never_crash(data: bytes) -> None:
    import base58

    did = "did:key:z" + base58.b58encode(data).decode()
    try:
        public = from_did_key(did)
    except PublicKeyFormatError:
        return
    assert to_did_key(public).startswith("did:key:z")
