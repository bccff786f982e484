"""A security key over USB HID: the software authenticator behind CTAPHID framing.

No ``/dev/uhid`` here, so the HID device is python-fido2's real ``CtapHidDevice`` on a
connection that speaks CTAPHID reports (hardware/fido2_hid.py); Janus's USB discovery is
pointed at it by replacing only ``CtapHidDevice.list_devices``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fido2.ctap import CtapError
from fido2.ctap2.base import Ctap2
from fido2.ctap2.pin import ClientPin
from fido2.hid import CAPABILITY, CTAPHID, CtapHidDevice

from hardware.fido2_authenticator import Presence, ScriptedPresence, SoftwareAuthenticator
from hardware.fido2_hid import REPORT_SIZE, SoftwareHidConnection, software_hid_device
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software.keyfile import HmacSecretRecipient
from janus_hsm.backends.software.provider import SoftwareProvider
from janus_hsm.fido2 import devices
from janus_hsm.fido2.authenticator import Authenticator
from janus_hsm.fido2.errors import PresenceDeniedError
from janus_hsm.fido2.keystore import KEYSTORE_RP_ID, Fido2HmacSecret

PIN = "4711-janus"


def test_ctaphid_framing_through_python_fido2() -> None:
    device = software_hid_device(SoftwareAuthenticator())
    assert CAPABILITY.CBOR in CAPABILITY(device.capabilities)
    message = os.urandom(300)  # one initialisation packet and five continuations
    assert device.ping(message) == message
    info = Ctap2(device).get_info()
    assert "FIDO_2_1" in info.versions or "FIDO_2_0" in info.versions
    with pytest.raises(CtapError) as refused:
        device.call(CTAPHID.LOCK, b"\x01")  # not offered by this key
    assert refused.value.code == CtapError.ERR.INVALID_COMMAND


def test_a_continuation_out_of_sequence_is_an_error() -> None:
    connection = SoftwareHidConnection(SoftwareAuthenticator())
    init = (b"\xff\xff\xff\xff" + bytes([0x80 | CTAPHID.PING]) + (100).to_bytes(2, "big")).ljust(
        REPORT_SIZE, b"\x01"
    )
    connection.write_packet(init)
    connection.write_packet(b"\xff\xff\xff\xff\x05".ljust(REPORT_SIZE, b"\x02"))  # not seq 0
    reply = connection.read_packet()
    assert reply[4] == 0x80 | 0x3F and reply[7] == CtapError.ERR.INVALID_SEQ


@pytest.fixture
def usb_key(
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[SoftwareAuthenticator, ScriptedPresence]]:
    presence = ScriptedPresence()
    authenticator = SoftwareAuthenticator(presence=presence, presence_timeout=0.5)
    ClientPin(Ctap2(authenticator)).set_pin(PIN)
    monkeypatch.setattr(devices, "SOURCES", [devices._hid_devices])
    monkeypatch.setattr(
        CtapHidDevice,
        "list_devices",
        classmethod(lambda cls: iter([software_hid_device(authenticator)])),
    )
    yield authenticator, presence


def test_usb_discovery_registers_a_credential_and_unlocks_a_keystore(
    usb_key: tuple[SoftwareAuthenticator, ScriptedPresence], tmp_path: Path
) -> None:
    authenticator, presence = usb_key
    (found,) = devices.list_devices()
    assert found.transport == devices.HID and found.name == "Janus software security key (HID)"
    key = Authenticator(found, pin=lambda: PIN)
    assert key.describe()["pin_set"] is True
    created = key.make_credential(KEYSTORE_RP_ID, "vault", hmac_secret=True)
    assert [c.credential_id for c in authenticator.credentials()] == [created.credential_id]

    recipient = HmacSecretRecipient(created.credential_id, KEYSTORE_RP_ID, created.uv, "vault")
    source = Fido2HmacSecret([recipient], pin=lambda: PIN)  # USB discovery at each request
    store = SoftwareProvider.open(
        f"soft:dir={tmp_path}", allow_extractable=True, hmac_secret=source
    )
    store.generate(f"soft:dir={tmp_path};object=grant", Algorithm.ES256)
    reopened = SoftwareProvider.open(
        f"soft:dir={tmp_path}", allow_extractable=True, hmac_secret=source
    ).find(f"soft:dir={tmp_path};object=grant")
    presence.push(Presence.DENY)
    with pytest.raises(PresenceDeniedError):
        reopened.sign(b"x")
    assert reopened.sign(b"x")
