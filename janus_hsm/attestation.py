"""YubiKey PIV attestation: checking that a key was generated inside a YubiKey.

A YubiKey answers ATTEST for a slot with a certificate for that slot's public key,
signed by the device's attestation key (slot f9), whose certificate Yubico issued: under
"Yubico PIV Root CA Serial 263751" for keys made before firmware 5.7.4, under "Yubico
Attestation Root 1" (through "Yubico Attestation Intermediate A/B 1" and "Yubico PIV
Attestation A/B/B2 1") after.  The card only attests keys it generated, so a chain that
verifies to a Yubico root proves the key was born in a genuine YubiKey and cannot have
been copied out.  yubikit returns the certificates but checks nothing: this module does.

It depends on ``cryptography`` only (no yubikit), so verifiers that never touch a card
can use it.  Yubico's roots ship as package data (``janus_hsm/data``); more roots (a test
CA, a virtual card's root) come from ``JANUS_PIV_ATTESTATION_ROOTS`` (PEM files separated
by ``os.pathsep``) or the caller.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import enum
import functools
import hmac
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from janus_hsm.errors import (
    AttestationError,
    AttestationExpiredError,
    AttestationKeyMismatchError,
    AttestationUntrustedError,
)
from janus_hsm.public_keys import PublicKey

FORMAT = "yubikey-piv"
ROOTS_ENV = "JANUS_PIV_ATTESTATION_ROOTS"

log = logging.getLogger(__name__)
_MAX_DEPTH = 6

# Yubico's PIV attestation extensions (developers.yubico.com/PIV/Introduction/PIV_attestation).
_YUBICO = "1.3.6.1.4.1.41482.3"
OID_FIRMWARE = x509.ObjectIdentifier(f"{_YUBICO}.3")
OID_SERIAL = x509.ObjectIdentifier(f"{_YUBICO}.7")
OID_POLICY = x509.ObjectIdentifier(f"{_YUBICO}.8")
OID_FORM_FACTOR = x509.ObjectIdentifier(f"{_YUBICO}.9")

PIN_POLICIES = {1: "never", 2: "once", 3: "always", 4: "match-once", 5: "match-always"}
TOUCH_POLICIES = {1: "never", 2: "always", 3: "cached"}
FORM_FACTORS = {
    0: "unknown",
    1: "usb-a-keychain",
    2: "usb-a-nano",
    3: "usb-c-keychain",
    4: "usb-c-nano",
    5: "usb-c-lightning",
    6: "usb-a-bio",
    7: "usb-c-bio",
}


class RootSet(enum.StrEnum):
    """Named root sets a caller can ask for."""

    YUBICO = "yubico"


@dataclass(frozen=True)
class SlotFacts:
    """What the slot certificate's Yubico extensions say."""

    slot: str | None
    serial: int | None
    firmware: str | None
    pin_policy: str | None
    touch_policy: str | None
    form_factor: str | None


@dataclass(frozen=True)
class PivAttestation(SlotFacts):
    """What a verified YubiKey PIV attestation says about one key: the slot certificate's
    facts, now that the chain behind them holds."""

    public_key: PublicKey
    #: Always true: a YubiKey only attests keys it generated itself.
    generated_on_device: bool
    #: The path that verified: slot certificate, device (f9) certificate, intermediates.
    path: list[x509.Certificate] = field(repr=False)
    #: The trusted root the path ended at.
    root: x509.Certificate = field(repr=False)

    @property
    def root_name(self) -> str:
        return self.root.subject.rfc4514_string()

    def as_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "verified": True,
            "generated_on_device": self.generated_on_device,
            "slot": self.slot,
            "serial": self.serial,
            "firmware": self.firmware,
            "pin_policy": self.pin_policy,
            "touch_policy": self.touch_policy,
            "form_factor": self.form_factor,
            "root": self.root_name,
            "path": [c.subject.rfc4514_string() for c in self.path],
        }


# --- loading certificates -----------------------------------------------------------


def load_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate in PEM text (one or many) or one DER certificate."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise AttestationError(f"not a certificate (PEM or DER): {exc}") from None


def load_certificate_file(path: str | Path) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AttestationError(f"cannot read {path}: {exc.strerror}") from None
    return load_certificates(data)


@functools.cache
def _package_pem(name: str) -> tuple[x509.Certificate, ...]:
    data = resources.files("janus_hsm").joinpath("data", name).read_bytes()
    return tuple(x509.load_pem_x509_certificates(data))


def yubico_roots() -> list[x509.Certificate]:
    """Yubico's PIV attestation roots, as shipped in janus_hsm/data/yubico-piv-roots.pem."""
    return list(_package_pem("yubico-piv-roots.pem"))


def yubico_intermediates() -> list[x509.Certificate]:
    """Yubico's published PIV attestation intermediates (path building only)."""
    return list(_package_pem("yubico-piv-intermediates.pem"))


def configured_roots() -> list[x509.Certificate]:
    """Extra trusted roots from ``JANUS_PIV_ATTESTATION_ROOTS`` (PEM files, os.pathsep).

    Whoever sets this variable decides what counts as "born in hardware", so the roots
    it adds are logged (once per process and value) rather than trusted silently.
    """
    roots: list[x509.Certificate] = []
    setting = os.environ.get(ROOTS_ENV, "")
    for entry in setting.split(os.pathsep):
        if entry.strip():
            roots.extend(load_certificate_file(entry.strip()))
    if roots and setting not in _announced:
        _announced.add(setting)
        log.warning(
            "%s adds trusted PIV attestation roots: %s",
            ROOTS_ENV,
            "; ".join(r.subject.rfc4514_string() for r in roots),
        )
    return roots


_announced: set[str] = set()


def default_roots() -> list[x509.Certificate]:
    """Yubico's roots plus any configured in the environment."""
    return yubico_roots() + configured_roots()


# --- x5c (RFC 7515 section 4.1.6): standard base64 DER, leaf first ------------------


def to_x5c(chain: Iterable[x509.Certificate]) -> list[str]:
    return [
        base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode("ascii") for c in chain
    ]


def from_x5c(x5c: Any) -> list[x509.Certificate]:
    if not isinstance(x5c, list) or not x5c or len(x5c) > 8:
        raise AttestationError("x5c must be a list of 1 to 8 base64 DER certificates")
    chain = []
    for entry in x5c:
        if not isinstance(entry, str) or len(entry) > 16384:
            raise AttestationError("x5c entries must be base64 strings")
        try:
            der = base64.b64decode(entry, validate=True)
            chain.append(x509.load_der_x509_certificate(der))
        except (binascii.Error, ValueError) as exc:
            raise AttestationError(f"x5c entry is not a base64 DER certificate: {exc}") from None
    return chain


# --- the extensions ------------------------------------------------------------------


def _extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> bytes | None:
    try:
        ext = cert.extensions.get_extension_for_oid(oid)
    except x509.ExtensionNotFound:
        return None
    value = ext.value
    return value.value if isinstance(value, x509.UnrecognizedExtension) else None


def _der_integer(data: bytes) -> int | None:
    """A DER INTEGER (how YubiKeys encode the serial), or None when it is not one."""
    if len(data) < 3 or data[0] != 0x02 or data[1] != len(data) - 2 or data[1] > 8:
        return None
    return int.from_bytes(data[2:], "big", signed=True)


def slot_facts(cert: x509.Certificate) -> SlotFacts:
    """Parse serial, firmware, policies and form factor out of a slot attestation cert."""
    firmware = _extension(cert, OID_FIRMWARE)
    serial = _extension(cert, OID_SERIAL)
    policy = _extension(cert, OID_POLICY)
    form = _extension(cert, OID_FORM_FACTOR)
    slot = None
    for attr in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME):
        text = str(attr.value)
        if text.startswith("YubiKey PIV Attestation "):
            slot = text.rsplit(" ", 1)[-1].lower()
    form_factor = None
    if form:
        form_factor = FORM_FACTORS.get(form[0] & 0x0F, f"0x{form[0] & 0x0F:02x}")
        flags = [n for bit, n in ((0x80, "fips"), (0x40, "cspn")) if form[0] & bit]
        if flags:
            form_factor += "+" + "+".join(flags)
    return SlotFacts(
        slot=slot,
        serial=_der_integer(serial) if serial else None,
        firmware=".".join(str(b) for b in firmware) if firmware and len(firmware) == 3 else None,
        pin_policy=PIN_POLICIES.get(policy[0]) if policy and len(policy) >= 2 else None,
        touch_policy=TOUCH_POLICIES.get(policy[1]) if policy and len(policy) >= 2 else None,
        form_factor=form_factor,
    )


# --- verification --------------------------------------------------------------------


def _spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _check_path_constraints(path: Sequence[x509.Certificate], anchor: x509.Certificate) -> None:
    """RFC 5280's CA rules on ``path`` (slot certificate, f9, intermediates) and its root.

    Signatures alone are not enough: someone holding a genuine YubiKey can have a slot
    key sign a made-up "slot certificate" for a software key and present the genuine slot
    certificate as if it were the device's f9 certificate ([forged, slot, f9, ...]).
    What stops that is what stops it in any PKI: an issuer must be a CA allowed to sign
    certificates, and no CA may have more CAs below it than its path length allows
    (Yubico's roots and intermediates all set one; the f9 certificates use 0).
    """
    leaf_constraints = _basic_constraints(path[0])
    if leaf_constraints is not None and leaf_constraints.ca:
        raise AttestationError(
            f"{path[0].subject.rfc4514_string()} is a CA certificate, not a slot attestation"
        )
    for below, issuer in enumerate([*path[1:], anchor]):
        name = issuer.subject.rfc4514_string()
        constraints = _basic_constraints(issuer)
        if constraints is not None and not constraints.ca:
            raise AttestationError(
                f"{name} is not a CA certificate, so it cannot have issued the certificate "
                "below it: the chain was assembled from certificates of another kind"
            )
        try:
            usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        except x509.ExtensionNotFound:
            usage = None
        if usage is not None and not usage.key_cert_sign:
            raise AttestationError(f"{name} may not sign certificates (key usage)")
        # ``below`` = how many CA certificates sit between this issuer and the slot one.
        limit = None if constraints is None else constraints.path_length
        if limit is not None and below > limit:
            raise AttestationError(
                f"{name} allows {limit} CA certificate(s) below it, "
                f"but the chain puts {below} there: it is not a genuine attestation"
            )


def _check_time(cert: x509.Certificate, now: datetime.datetime) -> None:
    if now < cert.not_valid_before_utc or now > cert.not_valid_after_utc:
        raise AttestationExpiredError(
            f"{cert.subject.rfc4514_string()} is valid from {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d}, not at {now:%Y-%m-%d %H:%M}"
        )


def verify_piv_attestation(
    chain: Sequence[x509.Certificate],
    *,
    roots: Sequence[x509.Certificate] | None = None,
    intermediates: Sequence[x509.Certificate] | None = None,
    expected_public_key: PublicKey | None = None,
    now: datetime.datetime | None = None,
) -> PivAttestation:
    """Verify a YubiKey PIV attestation chain (slot certificate first, then f9's).

    ``roots`` are the trust anchors (default: Yubico's plus ``JANUS_PIV_ATTESTATION_ROOTS``);
    ``intermediates`` only help build the path (default: Yubico's published ones).  Every
    signature, every validity period (at ``now``), the CA flag, key usage and path length
    of every issuer (the device certificate included) are checked, and, when given,
    that the attested key is ``expected_public_key``.
    """
    if len(chain) < 2:
        raise AttestationError(
            "a PIV attestation needs the slot certificate and the device (f9) certificate"
        )
    roots = default_roots() if roots is None else list(roots)
    pool = list(chain[2:]) + list(
        yubico_intermediates() if intermediates is None else intermediates
    )
    now = now or datetime.datetime.now(datetime.UTC)
    leaf, device = chain[0], chain[1]
    if not _signed_by(leaf, device):
        raise AttestationError(
            "the slot attestation certificate is not signed by the device's attestation "
            "key (f9): the chain was altered or assembled from different cards"
        )
    path = [leaf, device]
    anchor: x509.Certificate | None = None
    current = device
    for _ in range(_MAX_DEPTH):
        anchor = next((r for r in roots if _signed_by(current, r)), None)
        if anchor is not None:
            break
        issuer = next(
            (c for c in pool if c not in path and _signed_by(current, c) and _is_ca(c)), None
        )
        if issuer is None:
            break
        path.append(issuer)
        current = issuer
    if anchor is None:
        names = ", ".join(sorted({r.subject.rfc4514_string() for r in roots})) or "none"
        raise AttestationUntrustedError(
            f"the attestation chain ends at {current.issuer.rfc4514_string()!r}, which is "
            f"none of the trusted roots ({names}). A key on a genuine YubiKey chains to "
            "Yubico's roots; add other roots with --trust-root or "
            f"{ROOTS_ENV} only if you know where they come from"
        )
    if not _is_ca(anchor):
        raise AttestationUntrustedError(
            f"trusted root {anchor.subject.rfc4514_string()} is not a CA"
        )
    _check_path_constraints(path, anchor)
    for cert in [*path, anchor]:
        _check_time(cert, now)
    public_key = leaf.public_key()
    if expected_public_key is not None and not hmac.compare_digest(
        _spki(public_key), _spki(expected_public_key)
    ):
        raise AttestationKeyMismatchError(
            "the attestation is for a different public key than the one presented"
        )
    facts = slot_facts(leaf)
    return PivAttestation(
        **vars(facts),
        public_key=public_key,  # type: ignore[arg-type]
        generated_on_device=True,
        path=path,
        root=anchor,
    )
