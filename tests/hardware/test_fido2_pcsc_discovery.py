"""janus_hsm.fido2 finds a security key through real PC/SC (pcscd + vpcd) and uses it.

The software authenticator sits behind the CTAP-over-ISO-7816 applet in a virtual card,
in a reader of the session's private pcscd: discovery goes through pyscard and
``fido2.pcsc.CtapPcscDevice`` exactly as with an NFC reader or a YubiKey's CCID.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fido2.ctap2.base import Ctap2
from fido2.ctap2.pin import ClientPin

from hardware.card import VirtualCard
from hardware.fido2_authenticator import Presence, ScriptedPresence, SoftwareAuthenticator
from hardware.fido2_card import Fido2Applet
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software.keyfile import HmacSecretRecipient
from janus_hsm.backends.software.provider import SoftwareProvider
from janus_hsm.fido2 import devices
from janus_hsm.fido2.authenticator import Authenticator
from janus_hsm.fido2.errors import PresenceDeniedError
from janus_hsm.fido2.keystore import KEYSTORE_RP_ID, Fido2HmacSecret

PlugCard = Callable[..., str]
PIN = "4711-janus"


@pytest.fixture
def pcsc_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices, "SOURCES", [devices._pcsc_devices])


def test_a_key_on_a_pcsc_reader_is_found_registered_and_unlocks_a_keystore(
    pcsc_reader: PlugCard, pcsc_only: None, tmp_path: Path
) -> None:
    presence = ScriptedPresence()
    authenticator = SoftwareAuthenticator(presence=presence, presence_timeout=0.5)
    ClientPin(Ctap2(authenticator)).set_pin(PIN)
    reader = pcsc_reader(VirtualCard([Fido2Applet(authenticator)]))

    (found,) = devices.list_devices()
    assert found.transport == devices.PCSC and reader in found.name
    key = Authenticator(found, pin=lambda: PIN)
    info = key.describe()
    assert info["pin_set"] is True and info["pin_retries"] == 8 and 2 in info["pin_protocols"]
    created = key.make_credential(KEYSTORE_RP_ID, "vault", hmac_secret=True)
    found.close()
    assert [c.credential_id for c in authenticator.credentials()] == [created.credential_id]

    recipient = HmacSecretRecipient(created.credential_id, KEYSTORE_RP_ID, created.uv, "vault")
    source = Fido2HmacSecret([recipient], pin=lambda: PIN)  # discovery at each request
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
    reopened.sign(b"x")
