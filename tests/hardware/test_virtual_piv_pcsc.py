"""The virtual PIV card in a real PC/SC reader, driven by yubikit and by independent clients.

Why this tier exists: ``test_virtual_piv.py`` drives the applet in process, so card and
client share one reading of yubikit.  Here the card sits in a vpcd reader of a private
pcscd (``tests/hardware/conftest.py``) and is reached the way a YubiKey is:

* yubikit through ``ykman.pcsc`` (pyscard, exclusive connections, extended APDUs) and
  Janus's own discovery (``janus_hsm.backends.piv.discovery``);
* Debian's ``yubico-piv-tool`` (libykpiv) and ``ykcs11`` driven by OpenSC's
  ``pkcs11-tool`` — Yubico's own C implementation of the protocol, a reading of it
  independent of yubikit's and of our emulator's.  Version 2.2.0 speaks only 3DES
  management keys, so where they administer the card it is a 5.4.3 profile, as a real
  YubiKey of that age; PIN, listing and signing through ykcs11 run on 5.7 as well.

The child processes find the private pcscd through ``PCSCLITE_CSOCK_NAME``, which the
conftest sets for this process; ``test_tools_talk_to_the_private_pcscd`` proves they do.

PINs never go on a command line, even this throwaway card's default test PIN:
``yubico-piv-tool --stdin-input`` reads it from stdin, and ``pkcs11-tool --pin env:NAME``
/ ``--so-pin env:NAME`` (OpenSC's ``util_get_pin``) from the environment.  Without
``-k`` yubico-piv-tool uses the default management key by itself.

Client-side limits of the Debian 2.2.0 tools seen on the way (none is the card's):
``yubico-piv-tool -a selfsign-certificate`` fails with "Failed signing certificate"
before sending the card a single APDU, so certificates for import are made with
``cryptography``; ykcs11 shows an Ed25519 key as "RSA 256 bits" (no 25519 support), and
gives public keys it took from GET METADATA (imported keys, F9) explicit curve
parameters instead of the named curve; yubico-piv-tool connects to a card even for
``-a list-readers``.
"""

from __future__ import annotations

import datetime
import glob
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import NameOID
from smartcard.Exceptions import CardConnectionException  # type: ignore[import-untyped]
from yubikit.core import TRANSPORT, InvalidPinError
from yubikit.core.smartcard import ApduError, SmartCardConnection
from yubikit.management import CAPABILITY
from yubikit.piv import (
    DEFAULT_MANAGEMENT_KEY,
    KEY_TYPE,
    PIN_POLICY,
    SLOT,
    TOUCH_POLICY,
    PivSession,
)

from hardware.card import VirtualCard
from hardware.pcscd import READER_NAME, VirtualReaders, wait_for_card
from hardware.virtual_piv import (
    OID_SERIAL_NUMBER,
    VERSION_5_4,
    VERSION_5_7,
    Presence,
    ScriptedTouch,
    TouchRequest,
    VirtualPivApplet,
    VirtualYubiKey,
    default_attestation_root,
)

#: The virtual card's factory PIN; fine to know: every card here is a throwaway.
PIN = "123456"
WRONG_PIN = "654321"
SERIAL = 13572468
SW_SECURITY = 0x6982
#: The module ykcs11's Debian package installs (multiarch directory varies).
YKCS11_GLOB = "/usr/lib/*/libykcs11.so"
#: pkcs11-tool ids as ykcs11 maps them: 01 9A, 02 9C, 03 9D, 04 9E, 05.. 82..
YKCS11_ID = {SLOT.AUTHENTICATION: "01", SLOT.SIGNATURE: "02", SLOT.KEY_MANAGEMENT: "03"}
#: The pcsc_reader fixture: plug(card, slot=0) -> reader name.
PlugCard = Callable[..., str]
MESSAGE = b"janus: a message to be signed by the virtual card"


@dataclass
class PluggedKey:
    """A virtual YubiKey in a vpcd reader."""

    key: VirtualYubiKey
    reader: str

    @property
    def piv(self) -> VirtualPivApplet:
        return self.key.piv


@pytest.fixture
def plugged(pcsc_reader: PlugCard) -> PluggedKey:
    """A fresh 5.7 key in slot 0 (yubikit tier)."""
    return _plug(pcsc_reader, VirtualPivApplet(version=VERSION_5_7, serial=SERIAL))


@pytest.fixture
def plugged54(pcsc_reader: PlugCard) -> PluggedKey:
    """A fresh 5.4.3 key in slot 0: the profile Debian's 2.2.0 clients can administer."""
    return _plug(pcsc_reader, VirtualPivApplet(version=VERSION_5_4, serial=SERIAL))


def _plug(pcsc_reader: PlugCard, applet: VirtualPivApplet, slot: int = 0) -> PluggedKey:
    key = VirtualYubiKey(piv=applet)
    return PluggedKey(key, pcsc_reader(key.card, slot))


# --------------------------------------------------------------------------------------
# Helpers


@contextmanager
def piv_session(reader: str) -> Iterator[PivSession]:
    """yubikit's PivSession over ykman's PC/SC device for ``reader``, closed afterwards.

    ykman opens the card exclusively, so a session must be closed before a tool runs.
    """
    from ykman.pcsc import list_devices

    devices = [d for d in list_devices(name_filter=reader) if d.reader.name == reader]  # type: ignore[no-untyped-call]
    assert len(devices) == 1, f"ykman lists {devices} for {reader!r}"
    connection = devices[0].open_connection(SmartCardConnection)
    try:
        yield PivSession(connection)
    finally:
        with suppress(Exception):  # a pulled card fails the close as well
            connection.close()


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"{name} is not installed: `make setup` installs it (SYSTEM_PACKAGES in the"
            " Makefile); the PIV cross-checks must not be skipped",
            pytrace=False,
        )
    return path


def _ykcs11() -> str:
    found = sorted(glob.glob(YKCS11_GLOB))
    if not found:
        pytest.fail(
            f"no ykcs11 module ({YKCS11_GLOB}): `make setup` installs Debian's ykcs11",
            pytrace=False,
        )
    return found[0]


def _run(
    argv: list[str],
    *,
    stdin: str | None = None,
    env: Mapping[str, str] | None = None,
    expect_ok: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Runs a client tool against the private pcscd (inherited PCSCLITE_CSOCK_NAME).

    A timeout keeps a hanging tool from hanging the suite; failures show the output.
    """
    result = subprocess.run(
        argv,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )
    if expect_ok and result.returncode != 0:
        pytest.fail(
            f"{' '.join(argv)} exited {result.returncode}\nstdout:\n{result.stdout}"
            f"\nstderr:\n{result.stderr}",
            pytrace=False,
        )
    return result


def _piv_tool(reader: str, *args: str, pin: bool = False, expect_ok: bool = True) -> str:
    """yubico-piv-tool on ``reader``; with ``pin`` the test PIN goes in through stdin."""
    argv = [_tool("yubico-piv-tool"), "-r", reader]
    if pin:
        argv.append("--stdin-input")
    result = _run([*argv, *args], stdin=PIN + "\n" if pin else None, expect_ok=expect_ok)
    return result.stdout + result.stderr


def _pkcs11_tool(*args: str, env: Mapping[str, str] | None = None) -> str:
    result = _run([_tool("pkcs11-tool"), "--module", _ykcs11(), *args], env=env)
    return result.stdout + result.stderr


def _point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _ec_public_key(value: object) -> ec.EllipticCurvePublicKey:
    assert isinstance(value, ec.EllipticCurvePublicKey), value
    return value


def _self_signed(public_key: ec.EllipticCurvePublicKey, name: str) -> x509.Certificate:
    """A certificate for ``public_key`` issued by a throwaway CA (content is what counts)."""
    issuer_key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Janus test CA")]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(issuer_key, hashes.SHA256())
    )


# --------------------------------------------------------------------------------------
# yubikit through pcscd


def test_ykman_discovers_the_card_and_yubikit_reads_its_serial(
    plugged: PluggedKey, pcsc_reader: PlugCard
) -> None:
    """ykman's PC/SC discovery sees the reader and the PIV application; PIV reads the serial.

    ``ykman.device.list_all_devices()`` reads a YubiKey's serial from the management (or
    OTP) application, which the virtual card does not have, so it reports the key with
    serial None and firmware "3.0.0 baseline"; it still detects the PIV capability.  The
    serial comes from PIV's GET SERIAL, which is also what Janus's discovery uses.
    """
    from ykman.device import list_all_devices
    from ykman.pcsc import list_devices

    pcsc_reader(VirtualCard([]), 1)  # a card without PIV next door (an empty reader costs
    # ykman 3 s of retries)
    assert plugged.reader == f"{READER_NAME} 00 00"
    assert plugged.reader in [d.reader.name for d in list_devices()]  # type: ignore[no-untyped-call]
    found = {str(dev.fingerprint): info for dev, info in list_all_devices()}
    assert plugged.reader in found, found
    assert CAPABILITY.PIV in found[plugged.reader].supported_capabilities[TRANSPORT.USB]

    with piv_session(plugged.reader) as session:
        assert session.version == VERSION_5_7
        assert session.get_serial() == SERIAL
        assert session.management_key_type.name == "AES192"  # 5.7's default


def test_janus_discovery_finds_the_card_by_serial(
    plugged: PluggedKey, pcsc_reader: PlugCard
) -> None:
    """Janus's own PIV discovery tells two YubiKeys apart by the serial PIV reports and
    reconnects to the one asked for."""
    from janus_hsm.backends.piv.discovery import find_card, list_cards

    other = _plug(pcsc_reader, VirtualPivApplet(version=VERSION_5_4, serial=SERIAL + 1), 1)
    assert {(c.reader, c.serial, c.version) for c in list_cards()} == {
        (plugged.reader, SERIAL, "5.7.2"),
        (other.reader, SERIAL + 1, "5.4.3"),
    }
    for wanted in (plugged, other):
        info, connect = find_card(serial=wanted.piv.serial, reader=None)
        assert info.reader == wanted.reader
        connection = connect()
        try:
            assert PivSession(connection).get_serial() == wanted.piv.serial
        finally:
            connection.close()


def _verify_attestation(
    certificate: x509.Certificate, intermediate: x509.Certificate, expected_key: object
) -> None:
    """The slot certificate chains to the test root through F9 and names this card."""
    root = default_attestation_root().certificate
    certificate.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    assert certificate.public_key() == expected_key
    serial_der = certificate.extensions.get_extension_for_oid(OID_SERIAL_NUMBER).value
    assert isinstance(serial_der, x509.UnrecognizedExtension)
    assert serial_der.value[0] == 0x02  # DER INTEGER
    assert int.from_bytes(serial_der.value[2:], "big") == SERIAL


def test_generate_sign_ecdh_and_attest_over_pcsc(plugged: PluggedKey) -> None:
    """The whole key life cycle through pyscard with extended APDUs: P-256 signature,
    P-384 and X25519 ECDH, Ed25519 under PIN "always", attestation and a certificate
    too large for a short APDU."""
    with piv_session(plugged.reader) as session:
        session.authenticate(DEFAULT_MANAGEMENT_KEY)
        p256 = _ec_public_key(
            session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, PIN_POLICY.ONCE)
        )
        p384 = _ec_public_key(session.generate_key(SLOT.KEY_MANAGEMENT, KEY_TYPE.ECCP384))
        x_key = session.generate_key(SLOT.RETIRED1, KEY_TYPE.X25519)
        ed_key = session.generate_key(SLOT.SIGNATURE, KEY_TYPE.ED25519)
        assert isinstance(x_key, x25519.X25519PublicKey)
        assert isinstance(ed_key, ed25519.Ed25519PublicKey)

        session.verify_pin(PIN)
        signature = session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, MESSAGE, hashes.SHA256())
        p256.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            p256.verify(signature, MESSAGE + b"!", ec.ECDSA(hashes.SHA256()))

        peer = ec.generate_private_key(ec.SECP384R1())
        secret = session.calculate_secret(SLOT.KEY_MANAGEMENT, peer.public_key())
        assert secret == peer.exchange(ec.ECDH(), p384)
        x_peer = x25519.X25519PrivateKey.generate()
        assert session.calculate_secret(SLOT.RETIRED1, x_peer.public_key()) == x_peer.exchange(
            x_key
        )

        session.verify_pin(PIN)  # 9C defaults to PIN "always": right before the signature
        ed_key.verify(session.sign(SLOT.SIGNATURE, KEY_TYPE.ED25519, MESSAGE, None), MESSAGE)

        _verify_attestation(
            session.attest_key(SLOT.AUTHENTICATION),
            session.get_certificate(SLOT.ATTESTATION),
            p256,
        )

        # ~3 KB: well beyond a short APDU in both directions.
        big = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "big")]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "big")]))
            .public_key(p256)
            .serial_number(1)
            .not_valid_before(datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
            .not_valid_after(datetime.datetime(2034, 1, 1, tzinfo=datetime.UTC))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName(f"host-{i:04d}.janus.example") for i in range(100)]
                ),
                critical=False,
            )
            .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
        )
        assert len(big.public_bytes(serialization.Encoding.DER)) > 2500
        session.put_certificate(SLOT.AUTHENTICATION, big)
        assert session.get_certificate(SLOT.AUTHENTICATION) == big


@pytest.mark.timeout(30)
def test_wrong_pin_counts_down_then_blocks(plugged: PluggedKey) -> None:
    """Wrong PINs are InvalidPinError with the tries left; a blocked PIN stays a typed
    error (0 tries) even for the right PIN, and signing is refused."""
    with piv_session(plugged.reader) as session:
        session.authenticate(DEFAULT_MANAGEMENT_KEY)
        session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, PIN_POLICY.ONCE)
        for left in (2, 1, 0):
            with pytest.raises(InvalidPinError) as wrong:
                session.verify_pin(WRONG_PIN)
            assert wrong.value.attempts_remaining == left
        with pytest.raises(InvalidPinError) as blocked:
            session.verify_pin(PIN)
        assert blocked.value.attempts_remaining == 0
        assert session.get_pin_attempts() == 0
        with pytest.raises(ApduError) as refused:
            session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, MESSAGE, hashes.SHA256())
        assert refused.value.sw == SW_SECURITY


@pytest.mark.timeout(30)
def test_touch_timeout_is_a_typed_error(pcsc_reader: PlugCard) -> None:
    """An untouched key answers 6982 after its timeout (ApduError), the next touch works."""
    touch = ScriptedTouch(Presence.TIMEOUT)
    plugged = _plug(pcsc_reader, VirtualPivApplet(serial=SERIAL, touch=touch, touch_timeout=0.5))
    with piv_session(plugged.reader) as session:
        session.authenticate(DEFAULT_MANAGEMENT_KEY)
        public_key = _ec_public_key(
            session.generate_key(
                SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, PIN_POLICY.NEVER, TOUCH_POLICY.ALWAYS
            )
        )
        started = time.monotonic()
        with pytest.raises(ApduError) as timed_out:
            session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, MESSAGE, hashes.SHA256())
        assert timed_out.value.sw == SW_SECURITY
        assert 0.4 < time.monotonic() - started < 10
        signature = session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, MESSAGE, hashes.SHA256())
        public_key.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))
    assert touch.requests == [TouchRequest("sign", SLOT.AUTHENTICATION)] * 2


@pytest.mark.timeout(30)
def test_card_pulled_while_waiting_for_touch_fails_the_client(pcsc_reader: PlugCard) -> None:
    """The key blinks for a touch that never comes (60 s timeout) and is pulled meanwhile:
    the waiting yubikit call fails through pyscard within seconds instead of hanging."""
    blinking = threading.Event()

    def never_touched(request: TouchRequest) -> Presence:
        blinking.set()
        return Presence.TIMEOUT

    plugged = _plug(
        pcsc_reader, VirtualPivApplet(serial=SERIAL, touch=never_touched, touch_timeout=60)
    )

    def pull_when_blinking() -> None:
        if blinking.wait(20):
            plugged.key.remove()

    with piv_session(plugged.reader) as session:
        session.authenticate(DEFAULT_MANAGEMENT_KEY)
        session.generate_key(
            SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, PIN_POLICY.NEVER, TOUCH_POLICY.ALWAYS
        )
        puller = threading.Thread(target=pull_when_blinking)
        puller.start()
        started = time.monotonic()
        try:
            with pytest.raises(CardConnectionException):
                session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, MESSAGE, hashes.SHA256())
        finally:
            puller.join()
        assert blinking.is_set()
        assert time.monotonic() - started < 10
    wait_for_card(plugged.reader, present=False, timeout=5)


@pytest.mark.timeout(30)
def test_card_pulled_between_commands_fails_fast_and_keeps_its_keys(
    plugged: PluggedKey, pcsc_readers: VirtualReaders
) -> None:
    """Pulling the card out of the reader fails the open session at its next APDU; put
    back, the card answers a new session with the key it had (volatile PIN state gone)."""
    bridge = pcsc_readers.bridge(0)
    assert bridge is not None
    with piv_session(plugged.reader) as session:
        session.authenticate(DEFAULT_MANAGEMENT_KEY)
        public_key = session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256)
        session.verify_pin(PIN)
        bridge.remove()
        started = time.monotonic()
        with pytest.raises(CardConnectionException):
            session.get_serial()
        assert time.monotonic() - started < 5
    bridge.insert()
    bridge.wait_connected()
    wait_for_card(plugged.reader)
    with piv_session(plugged.reader) as session:
        assert session.get_slot_metadata(SLOT.AUTHENTICATION).public_key == public_key
        with pytest.raises(ApduError) as not_verified:
            session.sign(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256, MESSAGE, hashes.SHA256())
        assert not_verified.value.sw == SW_SECURITY


# --------------------------------------------------------------------------------------
# Cross-check: yubico-piv-tool (libykpiv)


def test_tools_talk_to_the_private_pcscd(
    plugged54: PluggedKey, pcsc_readers: VirtualReaders
) -> None:
    """Child processes inherit PCSCLITE_CSOCK_NAME: they see exactly our vpcd readers
    (the machine's own pcscd, if any, would show others or none).  yubico-piv-tool
    connects to a PIV card before any action, even list-readers: hence the card."""
    output = _piv_tool(plugged54.reader, "-a", "list-readers")
    listed = [line.strip() for line in output.splitlines() if line.strip()]
    assert listed == [slot.reader_name for slot in pcsc_readers.pcscd.slots]


def test_yubico_piv_tool_reads_version_serial_and_pin_tries(plugged54: PluggedKey) -> None:
    output = _piv_tool(plugged54.reader, "-a", "status")
    assert re.search(r"^Version:\s+5\.4\.3$", output, re.M), output
    assert re.search(rf"^Serial Number:\s+{SERIAL}$", output, re.M), output
    assert re.search(r"^PIN tries left:\s+3$", output, re.M), output


def _tool_sign(reader: str, slot: str, message: bytes, tmp_path: Path) -> bytes:
    """``yubico-piv-tool -a verify-pin --sign``: ECDSA-SHA256 over ``message``, DER."""
    source, target = tmp_path / "message.bin", tmp_path / "signature.der"
    source.write_bytes(message)
    target.unlink(missing_ok=True)
    output = _piv_tool(
        reader,
        "-a", "verify-pin", "--sign", "-s", slot, "-A", "ECCP256", "-H", "SHA256",
        "-i", str(source), "-o", str(target),
        pin=True,
    )  # fmt: skip
    assert "Signature successful" in output, output
    return target.read_bytes()


def test_yubico_piv_tool_generates_signs_and_attests(plugged54: PluggedKey, tmp_path: Path) -> None:
    """libykpiv authenticates with the 3DES default key, generates in 9C, verifies the
    PIN and signs (9C: PIN "always"); the signature verifies under the key it printed,
    which is the key yubikit reads back; its ATTEST output chains to the test root."""
    reader = plugged54.reader
    printed = _piv_tool(reader, "-a", "generate", "-s", "9c", "-A", "ECCP256")
    pem = re.search(r"-----BEGIN PUBLIC KEY-----.*?-----END PUBLIC KEY-----", printed, re.S)
    assert pem is not None, printed
    public_key = _ec_public_key(serialization.load_pem_public_key(pem.group(0).encode()))

    with piv_session(reader) as session:
        metadata = session.get_slot_metadata(SLOT.SIGNATURE)
        assert metadata.public_key == public_key
        assert metadata.generated
        assert metadata.pin_policy == PIN_POLICY.ALWAYS  # the YubiKey default for 9C
        intermediate = session.get_certificate(SLOT.ATTESTATION)

    signature = _tool_sign(reader, "9c", MESSAGE, tmp_path)
    public_key.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))

    attestation = x509.load_pem_x509_certificate(
        _piv_tool(reader, "-a", "attest", "-s", "9c").encode()
    )
    _verify_attestation(attestation, intermediate, public_key)


def test_yubico_piv_tool_signs_with_a_key_yubikit_generated(
    plugged54: PluggedKey, tmp_path: Path
) -> None:
    """And the other way round: a P-256 key yubikit generated in 9A (3DES default
    management key on 5.4) signs for libykpiv."""
    with piv_session(plugged54.reader) as session:
        assert session.management_key_type.name == "TDES"
        session.authenticate(DEFAULT_MANAGEMENT_KEY)
        public_key = _ec_public_key(session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256))
    signature = _tool_sign(plugged54.reader, "9a", MESSAGE, tmp_path)
    public_key.verify(signature, MESSAGE, ec.ECDSA(hashes.SHA256()))


def test_wrong_pin_through_yubico_piv_tool(plugged54: PluggedKey) -> None:
    """libykpiv reads the same 63Cx as yubikit: "2 tries left", and yubikit agrees."""
    result = _run(
        [_tool("yubico-piv-tool"), "-r", plugged54.reader, "--stdin-input", "-a", "verify-pin"],
        stdin=WRONG_PIN + "\n",
        expect_ok=False,
    )
    assert result.returncode != 0
    assert "2 tries left" in result.stdout + result.stderr, result
    with piv_session(plugged54.reader) as session:
        assert session.get_pin_attempts() == 2
    assert re.search(r"^PIN tries left:\s+2$", _piv_tool(plugged54.reader, "-a", "status"), re.M)


def test_certificates_cross_read_between_yubikit_and_yubico_piv_tool(
    plugged54: PluggedKey, tmp_path: Path
) -> None:
    """A certificate yubikit stored (9A) reads back byte-identical through libykpiv, and
    one libykpiv imported (9D) reads back identical through yubikit: same object layout
    (53{70 cert, 71 info, FE}) on both sides."""
    reader = plugged54.reader
    with piv_session(reader) as session:
        session.authenticate(DEFAULT_MANAGEMENT_KEY)
        key_9a = _ec_public_key(session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256))
        key_9d = _ec_public_key(session.generate_key(SLOT.KEY_MANAGEMENT, KEY_TYPE.ECCP384))
        by_yubikit = _self_signed(key_9a, "written by yubikit")
        session.put_certificate(SLOT.AUTHENTICATION, by_yubikit)

    read = x509.load_pem_x509_certificate(
        _piv_tool(reader, "-a", "read-certificate", "-s", "9a").encode()
    )
    assert read == by_yubikit

    by_tool = _self_signed(key_9d, "imported by yubico-piv-tool")
    pem_file = tmp_path / "9d.pem"
    pem_file.write_bytes(by_tool.public_bytes(serialization.Encoding.PEM))
    output = _piv_tool(reader, "-a", "import-certificate", "-s", "9d", "-i", str(pem_file))
    assert "Successfully imported" in output, output
    with piv_session(reader) as session:
        assert session.get_certificate(SLOT.KEY_MANAGEMENT) == by_tool


def _touch_key_for_tool(
    pcsc_reader: PlugCard, touch: Callable[[TouchRequest], Presence], touch_timeout: float
) -> PluggedKey:
    """A 5.4 key with a touch-always, PIN-never P-256 key in 9A, generated by libykpiv."""
    plugged = _plug(
        pcsc_reader,
        VirtualPivApplet(
            version=VERSION_5_4, serial=SERIAL, touch=touch, touch_timeout=touch_timeout
        ),
    )
    _piv_tool(
        plugged.reader,
        "-a", "generate", "-s", "9a", "-A", "ECCP256",
        "--touch-policy", "always", "--pin-policy", "never",
    )  # fmt: skip
    return plugged


def _tool_sign_unchecked(
    reader: str, tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``yubico-piv-tool -v --sign -s 9a`` (``-a version``: the tool wants an action)."""
    source = tmp_path / "message.bin"
    source.write_bytes(MESSAGE)
    started = time.monotonic()
    result = _run(
        [
            _tool("yubico-piv-tool"), "-r", reader, "-v",
            "-a", "version", "--sign", "-s", "9a", "-A", "ECCP256",
            "-i", str(source), "-o", str(tmp_path / "signature.der"),
        ],
        expect_ok=False,
    )  # fmt: skip
    return result, time.monotonic() - started


@pytest.mark.timeout(30)
def test_yubico_piv_tool_sees_a_touch_timeout_as_6982(
    pcsc_reader: PlugCard, tmp_path: Path
) -> None:
    """libykpiv reads the untouched key's answer as a YubiKey's: SW 6982 after the wait."""
    touch = ScriptedTouch(Presence.TIMEOUT)
    plugged = _touch_key_for_tool(pcsc_reader, touch, touch_timeout=0.5)
    result, elapsed = _tool_sign_unchecked(plugged.reader, tmp_path)
    assert result.returncode != 0
    assert "Sign command failed with code 6982" in result.stderr, result.stderr
    assert 0.4 < elapsed < 10
    assert touch.requests == [TouchRequest("sign", SLOT.AUTHENTICATION)]


@pytest.mark.timeout(30)
def test_yubico_piv_tool_fails_fast_when_the_card_is_pulled_during_touch(
    pcsc_reader: PlugCard, tmp_path: Path
) -> None:
    """A key pulled while libykpiv waits for its touch (60 s timeout) ends the tool at
    once with a failure, not a hang, and the reader shows no card."""
    blinking = threading.Event()

    def never_touched(request: TouchRequest) -> Presence:
        blinking.set()
        return Presence.TIMEOUT

    plugged = _touch_key_for_tool(pcsc_reader, never_touched, touch_timeout=60)

    def pull_when_blinking() -> None:
        if blinking.wait(20):
            plugged.key.remove()

    puller = threading.Thread(target=pull_when_blinking)
    puller.start()
    try:
        result, elapsed = _tool_sign_unchecked(plugged.reader, tmp_path)
    finally:
        puller.join()
    assert blinking.is_set()
    assert result.returncode != 0
    assert "Failed signing" in result.stderr, result.stderr
    assert elapsed < 10
    wait_for_card(plugged.reader, present=False, timeout=5)


# --------------------------------------------------------------------------------------
# Cross-check: ykcs11 (Yubico's PKCS#11 module) driven by OpenSC's pkcs11-tool


def _pin_env() -> dict[str, str]:
    """``--pin env:JANUS_TEST_PIN``: OpenSC's pkcs11-tool reads the PIN from there."""
    return {"JANUS_TEST_PIN": PIN}


@pytest.fixture(params=[VERSION_5_4, VERSION_5_7], ids=["5.4", "5.7"])
def plugged_any(request: pytest.FixtureRequest, pcsc_reader: PlugCard) -> PluggedKey:
    """Both profiles: ykcs11 2.2.0 needs no management key for PIN, listing and signing."""
    return _plug(pcsc_reader, VirtualPivApplet(version=request.param, serial=SERIAL))


def test_ykcs11_lists_the_token_with_serial_and_version(plugged_any: PluggedKey) -> None:
    """ykcs11 names the token after the serial PIV reports and shows the firmware
    version (as "5.43": its major.minor rendering of 5.4.3)."""
    output = _pkcs11_tool("-L")
    slot = output.split(f"{plugged_any.reader}\n", 1)
    assert len(slot) == 2, output
    details = slot[1].split("\nSlot ", 1)[0]
    assert re.search(rf"token label\s+: YubiKey PIV #{SERIAL}$", details, re.M), output
    assert re.search(rf"serial num\s+: {SERIAL}$", details, re.M), output
    major, minor, patch = plugged_any.piv.version
    assert re.search(rf"firmware version\s+: {major}\.{minor}{patch}$", details, re.M), output


def _ykcs11_public_points(objects: str) -> dict[str, bytes]:
    """ID -> EC point of the public key objects in ``pkcs11-tool -O`` output."""
    points: dict[str, bytes] = {}
    for block in objects.split("Public Key Object")[1:]:
        point = re.search(r"EC_POINT:\s+([0-9a-f]+)", block)
        key_id = re.search(r"ID:\s+([0-9a-f]+)", block)
        if point and key_id:
            raw = bytes.fromhex(point.group(1))
            # An OCTET STRING around the point: 04 len (81 len for P-384).
            header = 3 if raw[1] == 0x81 else 2
            points[key_id.group(1)] = raw[header:]
    return points


def test_ykcs11_lists_and_uses_keys_yubikit_generated(
    plugged_any: PluggedKey, tmp_path: Path
) -> None:
    """ykcs11 finds yubikit's keys (9A P-256, 9C P-384 with PIN "always", 9D P-256),
    signs with them (the "always" key after a context-specific login pkcs11-tool does
    by itself) and derives ECDH secrets; cryptography checks each result against the
    public keys yubikit read."""
    with piv_session(plugged_any.reader) as session:
        session.authenticate(DEFAULT_MANAGEMENT_KEY)
        keys = {
            SLOT.AUTHENTICATION: session.generate_key(SLOT.AUTHENTICATION, KEY_TYPE.ECCP256),
            SLOT.SIGNATURE: session.generate_key(SLOT.SIGNATURE, KEY_TYPE.ECCP384),
            SLOT.KEY_MANAGEMENT: session.generate_key(SLOT.KEY_MANAGEMENT, KEY_TYPE.ECCP256),
        }
    public = {slot: _ec_public_key(key) for slot, key in keys.items()}

    points = _ykcs11_public_points(_pkcs11_tool("-O"))
    for slot, key in public.items():
        assert points.get(YKCS11_ID[slot]) == _point(key), (slot, points)

    message = tmp_path / "message.bin"
    message.write_bytes(MESSAGE)
    for slot, mechanism, digest in (
        (SLOT.AUTHENTICATION, "ECDSA-SHA256", hashes.SHA256()),
        (SLOT.SIGNATURE, "ECDSA-SHA384", hashes.SHA384()),
    ):
        signature = tmp_path / f"{slot.name}.der"
        _pkcs11_tool(
            "--login", "--pin", "env:JANUS_TEST_PIN",
            "--sign", "-m", mechanism, "--id", YKCS11_ID[slot],
            "--signature-format", "openssl",
            "-i", str(message), "-o", str(signature),
            env=_pin_env(),
        )  # fmt: skip
        public[slot].verify(signature.read_bytes(), MESSAGE, ec.ECDSA(digest))

    peer = ec.generate_private_key(ec.SECP256R1())
    peer_file, secret_file = tmp_path / "peer.der", tmp_path / "secret.bin"
    peer_file.write_bytes(
        peer.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    _pkcs11_tool(
        "--login", "--pin", "env:JANUS_TEST_PIN",
        "--derive", "-m", "ECDH1-DERIVE", "--id", YKCS11_ID[SLOT.KEY_MANAGEMENT],
        "-i", str(peer_file), "-o", str(secret_file),
        env=_pin_env(),
    )  # fmt: skip
    assert secret_file.read_bytes() == peer.exchange(ec.ECDH(), public[SLOT.KEY_MANAGEMENT])


def test_ykcs11_generates_a_key_yubikit_reads(plugged54: PluggedKey) -> None:
    """Key generation through ykcs11 (SO login = the 3DES management key, from the
    environment) lands in the slot yubikit reads: ID 05 is retired slot 82."""
    output = _pkcs11_tool(
        "--login", "--login-type", "so", "--so-pin", "env:JANUS_TEST_SO_PIN",
        "--keypairgen", "--key-type", "EC:secp384r1", "--id", "05",
        env={"JANUS_TEST_SO_PIN": DEFAULT_MANAGEMENT_KEY.hex()},
    )  # fmt: skip
    points = _ykcs11_public_points(output)
    with piv_session(plugged54.reader) as session:
        metadata = session.get_slot_metadata(SLOT.RETIRED1)
    assert metadata.key_type == KEY_TYPE.ECCP384
    assert metadata.generated
    assert points["05"] == _point(_ec_public_key(metadata.public_key))


def test_ykcs11_wrong_pin(plugged54: PluggedKey) -> None:
    """A wrong PIN is CKR_PIN_INCORRECT through ykcs11 and costs one try, as yubikit sees."""
    result = _run(
        [_tool("pkcs11-tool"), "--module", _ykcs11(), "--login", "--pin", "env:JANUS_TEST_PIN",
         "-O"],
        env={"JANUS_TEST_PIN": WRONG_PIN},
        expect_ok=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "CKR_PIN_INCORRECT" in result.stdout + result.stderr, result
    with piv_session(plugged54.reader) as session:
        assert session.get_pin_attempts() == 2
