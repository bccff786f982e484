"""The PIV backend on a REAL YubiKey: run only with ``pytest --device SERIAL``.

!!! THESE TESTS WRITE TO THE YUBIKEY YOU NAME. !!!

They generate a P-256 key in RETIRED slot 95 (override: ``JANUS_DEVICE_SLOT=82`` …
``95``), never in 9a/9c/9d/9e where your real keys live, and they refuse to start when
that slot already holds a key: Janus never overwrites one.  On firmware 5.7+ the key is
deleted at the end; on older firmware a single PIV key cannot be deleted, so the test
key STAYS in the slot (remove it with ``ykman piv keys generate`` over it, or run the
next time with another ``JANUS_DEVICE_SLOT``).  Generating and deleting need the PIV
management key: ``JANUS_PIV_MANAGEMENT_KEY`` (hex), or the PIN-protected key that
``ykman piv access change-management-key --protect`` leaves; a card still on the factory
default works too, with a warning.

Why these exist although the virtual YubiKey covers the protocol: only a real key proves
that its attestation chains to Yubico's *genuine* roots (the ones Janus ships), and that
the firmware accepts what the emulator accepts.

The PIN: the suite's conftest clears ``JANUS_PIN`` for every run (no test may spend a
developer's PIN by accident), so give ``JANUS_DEVICE_PIN_SOURCE=file:/path`` (a 0600
file), or run with ``-s`` to be asked on the terminal.  Example::

    JANUS_DEVICE_PIN_SOURCE=file:$HOME/.yubikey-pin \\
        .venv/bin/pytest tests/janus_hsm/test_piv_device.py --device 12345678 -s -v

Without ``--device`` every test here is skipped (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from janus_hsm.algorithms import Algorithm
from janus_hsm.attestation import verify_piv_attestation, yubico_roots
from janus_hsm.backends.piv import PivProvider
from janus_hsm.backends.piv.handle import PivKeyHandle
from janus_hsm.backends.piv.uri import PivUri, parse_slot
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.pin import resolve_pin_source

pytestmark = pytest.mark.hardware

PIN_SOURCE_ENV = "JANUS_DEVICE_PIN_SOURCE"
SLOT_ENV = "JANUS_DEVICE_SLOT"
MESSAGE = b"janus hardware test: sign me"


def _touch(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@pytest.fixture(scope="module")
def serial(request: pytest.FixtureRequest) -> int:
    value = str(request.config.getoption("--device"))
    if not value.isdigit():
        pytest.fail(f"--device must be the YubiKey's serial number, not {value!r}")
    return int(value)


@pytest.fixture(scope="module")
def provider(serial: int) -> Iterator[PivProvider]:
    """The YubiKey found through PC/SC by its serial, as `janus` finds it."""
    pin_source = resolve_pin_source(
        os.environ.get(PIN_SOURCE_ENV),
        prompt=f"PIV PIN of YubiKey {serial} (for the hardware tests): ",
        interactive=True,
    )
    opened = PivProvider.open(f"piv:serial={serial}", pin_source=pin_source, on_touch=_touch)
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture(scope="module")
def key_uri(serial: int, provider: PivProvider) -> str:
    """The retired slot the tests use, checked empty before anything is written."""
    slot = parse_slot(os.environ.get(SLOT_ENV, "95"))
    if int(slot) not in range(0x82, 0x96):
        pytest.fail(f"{SLOT_ENV} must name a retired slot (82..95), not {slot:02x}")
    uri = str(PivUri(serial=serial, slot=slot))
    try:
        found = provider.lookup(uri)
    except KeyNotFoundError:
        return uri
    pytest.fail(
        f"slot {slot:02x} of YubiKey {serial} already holds a {found.algorithm.value} key "
        f"({found.did}); these tests never overwrite a key. Free the slot or set {SLOT_ENV}",
        pytrace=False,
    )


@pytest.fixture(scope="module")
def test_key(provider: PivProvider, key_uri: str) -> Iterator[PivKeyHandle]:
    """A P-256 key generated in the slot with the default policies; deleted on 5.7+."""
    handle = provider.generate(key_uri, Algorithm.ES256)
    try:
        yield handle
    finally:
        if provider.version >= (5, 7, 0):
            with contextlib.suppress(KeyNotFoundError):  # test_delete got there first
                provider.delete(key_uri)
        else:
            print(
                f"\nNOTE: firmware {provider.version} cannot delete one PIV key: the test key "
                f"stays in {key_uri}",
                file=sys.stderr,
            )


def test_generated_with_the_default_policies(test_key: PivKeyHandle, key_uri: str) -> None:
    assert test_key.uri == key_uri
    assert test_key.algorithm is Algorithm.ES256
    props = test_key.properties
    assert props.backend == "piv"
    assert props.local and props.never_extractable and not props.extractable
    assert props.pin_policy == "once"  # the retired slots' default
    assert props.touch_policy == "never"
    test_key.check_custody()


def test_found_again_by_uri(provider: PivProvider, test_key: PivKeyHandle, key_uri: str) -> None:
    again = provider.find(key_uri)
    assert again.did == test_key.did
    assert key_uri in [k.uri for k in provider.list_keys()]


def test_sign_and_verify(test_key: PivKeyHandle) -> None:
    raw = test_key.sign(MESSAGE)
    public = test_key.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(int.from_bytes(raw[:32]), int.from_bytes(raw[32:]))
    public.verify(der, MESSAGE, ec.ECDSA(hashes.SHA256()))


def test_attestation_chains_to_yubicos_genuine_roots(
    test_key: PivKeyHandle, serial: int, provider: PivProvider
) -> None:
    """Only Yubico's shipped roots are trusted here: no test root, no environment root."""
    attestation = test_key.attest()
    verified = verify_piv_attestation(
        attestation.certificates, roots=yubico_roots(), expected_public_key=test_key.public_key()
    )
    assert verified.generated_on_device is True
    assert verified.serial == serial
    assert verified.slot == f"{test_key.slot:02x}"
    assert verified.pin_policy == "once" and verified.touch_policy == "never"
    assert verified.firmware == ".".join(map(str, provider.version))
    assert "Yubico" in verified.root_name


def test_delete_on_firmware_5_7(provider: PivProvider, test_key: PivKeyHandle) -> None:
    if provider.version < (5, 7, 0):
        pytest.skip(f"firmware {provider.version} cannot delete a single PIV key")
    provider.delete(test_key.uri)
    with pytest.raises(KeyNotFoundError):
        provider.lookup(test_key.uri)
