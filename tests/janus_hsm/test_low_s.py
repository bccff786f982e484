"""Every ECDSA signature Janus makes is in low-S form, whatever the device gave.

(r, s) and (r, n - s) both verify; a capability's id is a hash of its text, so a
second valid signature would be a second id with its own use count.  Devices give
either form: the provider puts each in the one form its verifiers accept.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from janus_hsm.algorithms import Algorithm, is_low_s, low_s
from janus_hsm.provider import KeyHandle, SignatureFormat, der_to_raw, raw_to_der
from tests.policies.keys import software_keys

ECDSA = [Algorithm.ES256, Algorithm.ES384]


def signatures(handle: KeyHandle, count: int) -> list[tuple[bytes, bytes]]:
    """(message, raw signature) pairs made through the public API."""
    return [(m, handle.sign(m)) for m in (f"message {i}".encode() for i in range(count))]


def check_all_low_and_valid(handle: KeyHandle, alg: Algorithm, count: int) -> None:
    public = handle.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    hash_alg = alg.hash_algorithm
    assert hash_alg is not None
    for message, raw in signatures(handle, count):
        assert is_low_s(raw, alg)
        public.verify(raw_to_der(raw, alg.coordinate_size), message, ec.ECDSA(hash_alg))
    der = handle.sign(b"der form", format=SignatureFormat.DER)
    assert is_low_s(der_to_raw(der, alg.coordinate_size), alg)


@pytest.mark.parametrize("alg", ECDSA)
def test_software_keys_sign_low_s_only(tmp_path: Path, alg: Algorithm) -> None:
    handle = software_keys(tmp_path, {"k": alg})["k"]
    check_all_low_and_valid(handle, alg, 64)


@pytest.mark.parametrize("alg", ECDSA)
def test_softhsm_keys_sign_low_s_only(
    pkcs11_provider: object, key_name: str, alg: Algorithm
) -> None:
    from janus_hsm.backends.pkcs11 import Pkcs11Provider

    assert isinstance(pkcs11_provider, Pkcs11Provider)
    handle = pkcs11_provider.generate(f"pkcs11:object={key_name}-{alg.value}", alg)
    try:
        # The token itself gives high S about half the time (64 tries: all low by
        # chance is 2**-64); the public API never does.
        digest = hashlib.new(alg.hash_algorithm.name, b"x").digest()  # type: ignore[union-attr]
        device = [handle._sign_ecdsa_digest(digest) for _ in range(64)]
        assert not all(is_low_s(raw, alg) for raw in device)
        check_all_low_and_valid(handle, alg, 64)
    finally:
        pkcs11_provider.delete(handle.uri)


@pytest.mark.parametrize("alg", ECDSA)
def test_low_s_is_the_other_valid_signature(tmp_path: Path, alg: Algorithm) -> None:
    """low_s turns a high-S signature into the other one that verifies, and leaves a low
    one alone."""
    handle = software_keys(tmp_path, {"k": alg})["k"]
    public = handle.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    size = alg.coordinate_size
    raw = handle.sign(b"m")
    order = {Algorithm.ES256: ec.SECP256R1, Algorithm.ES384: ec.SECP384R1}[alg]
    n = _order(order)
    high = raw[:size] + (n - int.from_bytes(raw[size:], "big")).to_bytes(size, "big")
    hash_alg = alg.hash_algorithm
    assert hash_alg is not None
    public.verify(raw_to_der(high, size), b"m", ec.ECDSA(hash_alg))  # it is valid
    assert not is_low_s(high, alg)
    assert low_s(high, alg) == raw and low_s(raw, alg) == raw


def _order(curve: type[ec.EllipticCurve]) -> int:
    # Independent of the constants under test: n from the curve's published parameters.
    return {
        ec.SECP256R1: int(
            "115792089210356248762697446949407573529996955224135760342422259061068512044369"
        ),
        ec.SECP384R1: int(
            "39402006196394479212279040100143613805079739270465446667946905279627659399113263"
            "569398956308152294913554433653942643"
        ),
    }[curve]
