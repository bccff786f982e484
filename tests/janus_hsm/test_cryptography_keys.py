"""Token keys used where pyca/cryptography expects a private key: CSRs and certificates."""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.pkcs11 import Pkcs11Provider
from janus_hsm.errors import ExportRefusedError, MechanismUnsupportedError


@pytest.fixture
def handle_for(pkcs11_provider: Pkcs11Provider, key_name: str) -> Iterator[Any]:
    made = []

    def make(alg: Algorithm) -> Any:
        handle = pkcs11_provider.generate(f"pkcs11:object={key_name}-{alg.value}", alg)
        made.append(handle.uri)
        return handle

    yield make
    for uri in made:
        pkcs11_provider.delete(uri)


@pytest.mark.parametrize("alg", [Algorithm.ES256, Algorithm.ES384, Algorithm.EdDSA])
def test_csr_signed_inside_the_token_verifies(handle_for: Any, alg: Algorithm) -> None:
    handle = handle_for(alg)
    key = handle.as_cryptography_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-root")])
    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, alg.hash_algorithm)
    )
    reloaded = x509.load_pem_x509_csr(csr.public_bytes(serialization.Encoding.PEM))
    assert reloaded.is_signature_valid
    assert reloaded.public_key() == handle.public_key()
    assert reloaded.subject == subject


@pytest.mark.parametrize("alg", [Algorithm.ES256, Algorithm.EdDSA])
def test_self_signed_certificate_verifies(handle_for: Any, alg: Algorithm) -> None:
    handle = handle_for(alg)
    key = handle.as_cryptography_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "janus root")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, alg.hash_algorithm)
    )
    cert.verify_directly_issued_by(cert)  # checks the signature made in the token
    assert cert.public_key() == handle.public_key()


def test_adapter_ecdh_and_refusals(handle_for: Any) -> None:
    handle = handle_for(Algorithm.ES256)
    key = handle.as_cryptography_key()
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.key_size == 256
    peer = ec.generate_private_key(ec.SECP256R1())
    assert key.exchange(ec.ECDH(), peer.public_key()) == peer.exchange(ec.ECDH(), key.public_key())
    with pytest.raises(ExportRefusedError):
        key.private_numbers()
    with pytest.raises(ExportRefusedError):
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def test_agreement_keys_have_no_signing_adapter(handle_for: Any) -> None:
    with pytest.raises(MechanismUnsupportedError):
        handle_for(Algorithm.X25519).as_cryptography_key()
