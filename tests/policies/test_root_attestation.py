"""Verifier(require_attestation=True): the root key must be attested as born in a YubiKey.

The root key lives on the virtual YubiKey (yubikit's real PivSession in process); its
attestation chain rides in the root capability's evidence as x5c.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hardware.virtual_piv import VirtualPivApplet, VirtualYubiKey
from janus_hsm.algorithms import Algorithm
from janus_hsm.attestation import yubico_roots
from janus_hsm.backends.piv import PivKeyHandle, PivProvider
from policies.abilities import Ability
from policies.attestation import attestation_evidence
from policies.errors import AttestationRequiredError
from policies.issue import grant
from policies.verify import Verifier
from tests.policies.keys import software_keys

ABILITY = Ability("janus:payments/eur", "sign/payment")


@pytest.fixture
def yubikey() -> VirtualYubiKey:
    return VirtualYubiKey(piv=VirtualPivApplet(serial=31415926))


@pytest.fixture
def root(yubikey: VirtualYubiKey) -> Iterator[PivKeyHandle]:
    with PivProvider.from_connection(yubikey.connect(), pin_source=lambda: "123456") as p:
        yield p.generate("piv:slot=9c", Algorithm.ES256)  # type: ignore[misc]


def _bundle(root: PivKeyHandle, holder: str, *, attested: bool, now: int) -> object:
    evidence = attestation_evidence(root.attest()) if attested else None
    return grant(
        root,
        audience=holder,
        abilities=[ABILITY],
        ttl_seconds=600,
        uses=3,
        evidence=evidence,
        now=now,
    )


def test_attested_root_is_accepted_and_unattested_refused(
    yubikey: VirtualYubiKey, root: PivKeyHandle, tmp_path: Path
) -> None:
    holder = software_keys(tmp_path, {"cloud": Algorithm.ES256})["cloud"]
    now = int(time.time())
    virtual_root = [yubikey.piv.attestation_root_certificate]
    verifier = Verifier(require_attestation=True, attestation_roots=virtual_root)
    attested = _bundle(root, holder.did, attested=True, now=now)
    chain = verifier.verify_chain(attested, now=now)  # type: ignore[arg-type]
    assert chain.principal == root.did
    plain = _bundle(root, holder.did, attested=False, now=now)
    with pytest.raises(AttestationRequiredError, match="no hardware attestation"):
        verifier.verify_chain(plain, now=now)  # type: ignore[arg-type]
    # A verifier that does not require attestation accepts both.
    Verifier().verify_chain(plain, now=now)  # type: ignore[arg-type]


def test_untrusted_root_or_another_key_is_refused(
    yubikey: VirtualYubiKey, root: PivKeyHandle, tmp_path: Path
) -> None:
    holder = software_keys(tmp_path, {"cloud": Algorithm.ES256})["cloud"]
    now = int(time.time())
    attested = _bundle(root, holder.did, attested=True, now=now)
    yubico_only = Verifier(require_attestation=True, attestation_roots=yubico_roots())
    with pytest.raises(AttestationRequiredError, match="none of the trusted roots"):
        yubico_only.verify_chain(attested, now=now)  # type: ignore[arg-type]
    # Another key's genuine attestation attached to this root's capability.
    with PivProvider.from_connection(yubikey.connect(), pin_source=lambda: "123456") as p:
        other = p.generate("piv:slot=9a", Algorithm.ES256)
    borrowed = grant(
        root,
        audience=holder.did,
        abilities=[ABILITY],
        ttl_seconds=600,
        uses=3,
        evidence=attestation_evidence(other.attest()),
        now=now,
    )
    verifier = Verifier(
        require_attestation=True, attestation_roots=[yubikey.piv.attestation_root_certificate]
    )
    with pytest.raises(AttestationRequiredError, match="different public key"):
        verifier.verify_chain(borrowed, now=now)
