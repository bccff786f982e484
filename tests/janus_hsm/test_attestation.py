"""YubiKey PIV attestation verification, on chains built here and on Yubico's real roots."""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from janus_hsm import attestation
from janus_hsm.attestation import (
    OID_FIRMWARE,
    OID_FORM_FACTOR,
    OID_POLICY,
    OID_SERIAL,
    from_x5c,
    to_x5c,
    verify_piv_attestation,
    yubico_intermediates,
    yubico_roots,
)
from janus_hsm.errors import (
    AttestationError,
    AttestationExpiredError,
    AttestationKeyMismatchError,
    AttestationUntrustedError,
)

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)

# SHA-256 of the shipped roots, checked against Yubico's files (see the PEM headers).
YUBICO_ROOT_FINGERPRINTS = {
    "CN=Yubico PIV Root CA Serial 263751": (
        "63ece914e54dd87915f34033c85af4c0696ba1512f8add66ced738331207b546"
    ),
    "CN=Yubico Attestation Root 1": (
        "62760c6a6ef91679f454c8902b80fd009825b3f25da90f1fbace2ec6586cd5a8"
    ),
}


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    public: object,
    issuer: str,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    extensions: list[x509.UnrecognizedExtension] = (),  # type: ignore[assignment]
    not_after: datetime.datetime = datetime.datetime(2071, 1, 1, tzinfo=datetime.UTC),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(not_after)
    )
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    for ext in extensions:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(signer, hashes.SHA256())


def _yubico_extensions(serial: int = 12345678) -> list[x509.UnrecognizedExtension]:
    return [
        x509.UnrecognizedExtension(OID_FIRMWARE, bytes([5, 7, 4])),
        x509.UnrecognizedExtension(OID_SERIAL, b"\x02\x04" + serial.to_bytes(4, "big")),
        x509.UnrecognizedExtension(OID_POLICY, bytes([3, 2])),
        x509.UnrecognizedExtension(OID_FORM_FACTOR, bytes([0x83])),
    ]


@dataclass
class Chain:
    root: x509.Certificate
    device: x509.Certificate
    slot: x509.Certificate
    device_key: ec.EllipticCurvePrivateKey
    slot_key: ec.EllipticCurvePrivateKey


def _chain(**slot_kwargs: object) -> Chain:
    root_key = ec.generate_private_key(ec.SECP384R1())
    device_key = ec.generate_private_key(ec.SECP256R1())
    slot_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("Test PIV Root", root_key.public_key(), "Test PIV Root", root_key, ca=True)
    device = _cert(
        "Yubico PIV Attestation", device_key.public_key(), "Test PIV Root", root_key, ca=True
    )
    slot = _cert(
        "YubiKey PIV Attestation 9c",
        slot_key.public_key(),
        "Yubico PIV Attestation",
        device_key,
        ca=False,
        extensions=_yubico_extensions(),
        **slot_kwargs,  # type: ignore[arg-type]
    )
    return Chain(root, device, slot, device_key, slot_key)


def test_a_good_chain_verifies_and_says_what_the_card_said() -> None:
    c = _chain()
    result = verify_piv_attestation(
        [c.slot, c.device], roots=[c.root], expected_public_key=c.slot_key.public_key(), now=NOW
    )
    assert result.generated_on_device
    assert (result.slot, result.serial, result.firmware) == ("9c", 12345678, "5.7.4")
    assert (result.pin_policy, result.touch_policy) == ("always", "always")
    assert result.form_factor == "usb-c-keychain+fips"
    assert result.root_name == "CN=Test PIV Root"
    assert result.as_dict()["verified"] is True


def test_fails_under_yubicos_roots() -> None:
    c = _chain()
    with pytest.raises(AttestationUntrustedError, match="none of the trusted roots"):
        verify_piv_attestation([c.slot, c.device], roots=yubico_roots(), now=NOW)


def test_tampered_slot_certificate_fails() -> None:
    c = _chain()
    other = ec.generate_private_key(ec.SECP256R1())
    forged = _cert(
        "YubiKey PIV Attestation 9c",
        c.slot_key.public_key(),
        "Yubico PIV Attestation",
        other,  # not the device key
        ca=False,
        extensions=_yubico_extensions(serial=1),
    )
    with pytest.raises(AttestationError, match="not signed by the device"):
        verify_piv_attestation([forged, c.device], roots=[c.root], now=NOW)
    der = bytearray(c.slot.public_bytes(serialization.Encoding.DER))
    index = der.find((12345678).to_bytes(4, "big"))
    der[index + 3] ^= 1  # change the attested serial, keep the signature
    altered = x509.load_der_x509_certificate(bytes(der))
    with pytest.raises(AttestationError):
        verify_piv_attestation([altered, c.device], roots=[c.root], now=NOW)


def test_mismatched_key_fails() -> None:
    c = _chain()
    stranger = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(AttestationKeyMismatchError):
        verify_piv_attestation(
            [c.slot, c.device], roots=[c.root], expected_public_key=stranger, now=NOW
        )
    with pytest.raises(AttestationKeyMismatchError):
        verify_piv_attestation(
            [c.slot, c.device],
            roots=[c.root],
            expected_public_key=ed25519.Ed25519PrivateKey.generate().public_key(),
            now=NOW,
        )


def test_expired_certificate_fails() -> None:
    c = _chain(not_after=datetime.datetime(2025, 1, 1, tzinfo=datetime.UTC))
    with pytest.raises(AttestationExpiredError, match="valid from"):
        verify_piv_attestation([c.slot, c.device], roots=[c.root], now=NOW)


def test_a_chain_needs_the_device_certificate() -> None:
    c = _chain()
    with pytest.raises(AttestationError, match="f9"):
        verify_piv_attestation([c.slot], roots=[c.root], now=NOW)


def test_intermediates_are_followed_but_must_be_cas() -> None:
    root_key = ec.generate_private_key(ec.SECP256R1())
    mid_key = ec.generate_private_key(ec.SECP256R1())
    device_key = ec.generate_private_key(ec.SECP256R1())
    slot_key = ec.generate_private_key(ec.SECP256R1())
    root = _cert("R", root_key.public_key(), "R", root_key, ca=True)
    device = _cert("D", device_key.public_key(), "M", mid_key, ca=True)
    slot = _cert("YubiKey PIV Attestation 9a", slot_key.public_key(), "D", device_key, ca=False)
    good_mid = _cert("M", mid_key.public_key(), "R", root_key, ca=True)
    result = verify_piv_attestation([slot, device], roots=[root], intermediates=[good_mid], now=NOW)
    assert [c.subject.rfc4514_string() for c in result.path][-1] == "CN=M"
    not_ca = _cert("M", mid_key.public_key(), "R", root_key, ca=False)
    with pytest.raises(AttestationUntrustedError):
        verify_piv_attestation([slot, device], roots=[root], intermediates=[not_ca], now=NOW)


def test_x5c_round_trip_and_refusals() -> None:
    c = _chain()
    x5c = to_x5c([c.slot, c.device])
    assert from_x5c(x5c) == [c.slot, c.device]
    for bad in ([], "abc", ["not base64!"], ["aGVsbG8="], [1]):
        with pytest.raises(AttestationError):
            from_x5c(bad)


def test_shipped_yubico_roots_are_pinned() -> None:
    roots = yubico_roots()
    found = {r.subject.rfc4514_string(): r.fingerprint(hashes.SHA256()).hex() for r in roots}
    assert found == YUBICO_ROOT_FINGERPRINTS
    for root in roots:
        root.verify_directly_issued_by(root)  # self-signed


def test_shipped_intermediates_chain_to_attestation_root_1() -> None:
    root = next(r for r in yubico_roots() if "Attestation Root 1" in r.subject.rfc4514_string())
    by_name = {c.subject: c for c in [*yubico_intermediates(), root]}
    names = set()
    for cert in yubico_intermediates():
        names.add(cert.subject.rfc4514_string())
        current = cert
        for _ in range(3):
            issuer = by_name[current.issuer]
            current.verify_directly_issued_by(issuer)
            if issuer is root:
                break
            current = issuer
        else:
            pytest.fail(f"{cert.subject} does not reach the root")
    assert "CN=Yubico PIV Attestation B 1" in names


def test_configured_roots_come_from_the_environment(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from pathlib import Path

    c = _chain()
    path = Path(str(tmp_path)) / "root.pem"
    path.write_bytes(c.root.public_bytes(serialization.Encoding.PEM))
    monkeypatch.setenv(attestation.ROOTS_ENV, str(path))
    result = verify_piv_attestation([c.slot, c.device], now=NOW)  # default roots + env
    assert result.root == c.root
    # Trusting them is said out loud, once per setting.
    announced = [r for r in caplog.records if attestation.ROOTS_ENV in r.getMessage()]
    assert len(announced) == 1 and "Test PIV Root" in announced[0].getMessage()
    verify_piv_attestation([c.slot, c.device], now=NOW)
    assert len([r for r in caplog.records if attestation.ROOTS_ENV in r.getMessage()]) == 1


def _issuer(
    subject: str, public: object, root_key: ec.EllipticCurvePrivateKey, constraints: object
) -> x509.Certificate:
    """A certificate issued by "Test PIV Root" with the given BasicConstraints."""
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name("Test PIV Root"))
        .public_key(public)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(datetime.datetime(2071, 1, 1, tzinfo=datetime.UTC))
        .add_extension(constraints, critical=True)  # type: ignore[arg-type]
        .sign(root_key, hashes.SHA256())
    )


def test_a_slot_certificate_cannot_stand_in_for_the_device_certificate() -> None:
    # The attack: with a genuine card, have a slot key sign a made-up "slot certificate"
    # for a software key, and present the genuine slot certificate as if it were f9.
    # Every signature holds; the device certificate's path length (0) must not.
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _cert("Test PIV Root", root_key.public_key(), "Test PIV Root", root_key, ca=True)
    device_key, slot_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(2))
    device = _issuer(
        "Yubico PIV Attestation",
        device_key.public_key(),
        root_key,
        x509.BasicConstraints(ca=True, path_length=0),
    )
    slot = _cert("YubiKey PIV Attestation 9a", slot_key.public_key(), "Yubico PIV Attestation",
                 device_key, ca=False, extensions=_yubico_extensions())  # fmt: skip
    software_key = ec.generate_private_key(ec.SECP256R1())
    forged = _cert("YubiKey PIV Attestation 9c", software_key.public_key(),
                   "YubiKey PIV Attestation 9a", slot_key, ca=False,
                   extensions=_yubico_extensions())  # fmt: skip
    verify_piv_attestation([slot, device], roots=[root], now=NOW)  # the genuine chain
    with pytest.raises(AttestationError, match="allows 0 CA certificate"):
        verify_piv_attestation(
            [forged, slot, device],
            roots=[root],
            expected_public_key=software_key.public_key(),
            now=NOW,
        )


def test_issuers_must_be_cas_and_the_slot_certificate_must_not_be() -> None:
    good = _chain()
    root_key = ec.generate_private_key(ec.SECP384R1())
    root = _cert("Test PIV Root", root_key.public_key(), "Test PIV Root", root_key, ca=True)
    not_a_ca = _issuer(
        "Yubico PIV Attestation",
        good.device_key.public_key(),
        root_key,
        x509.BasicConstraints(ca=False, path_length=None),
    )
    with pytest.raises(AttestationError, match="not a CA certificate"):
        verify_piv_attestation([good.slot, not_a_ca], roots=[root], now=NOW)
    ca_slot = _cert("YubiKey PIV Attestation 9c", good.slot_key.public_key(),
                    "Yubico PIV Attestation", good.device_key, ca=True,
                    extensions=_yubico_extensions())  # fmt: skip
    with pytest.raises(AttestationError, match="is a CA certificate"):
        verify_piv_attestation([ca_slot, good.device], roots=[good.root], now=NOW)
