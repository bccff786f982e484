"""The software authenticator as a CTAP-over-PC/SC card: fido2's real PC/SC transport.

``fido2.pcsc.CtapPcscDevice`` finds the virtual key in the private pcscd's reader and
``Ctap2``, ``ClientPin``, ``Fido2Client`` and ``Fido2Server`` run over it as over a
YubiKey's CCID interface: SELECT, NFCCTAP_MSG with chaining and GET RESPONSE, and the
NFCCTAP_GETRESPONSE polling while the key waits for a touch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from fido2 import cbor
from fido2.attestation.base import AttestationType
from fido2.attestation.packed import PackedAttestation
from fido2.client import ClientError, DefaultClientDataCollector, Fido2Client, UserInteraction
from fido2.ctap import STATUS, CtapError
from fido2.ctap2.base import Ctap2
from fido2.ctap2.extensions import HmacSecretExtension
from fido2.ctap2.pin import ClientPin
from fido2.hid import CTAPHID
from fido2.pcsc import CtapPcscDevice
from fido2.server import Fido2Server
from fido2.webauthn import (
    AttestationConveyancePreference,
    AttestationObject,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from hardware.card import Command, VirtualCard
from hardware.fido2_authenticator import (
    AAGUID,
    Presence,
    ScriptedPresence,
    SoftwareAuthenticator,
)
from hardware.fido2_card import FIDO_AID, SW_STATUS_UPDATE, Fido2Applet

ERR = CtapError.ERR
ORIGIN = "https://janus.example"
RP_ID = "janus.example"
PIN = "4711-janus"
PlugCard = Callable[..., str]  # the pcsc_reader fixture: plug(card, slot=0) -> reader name


class Person(UserInteraction):
    """Knows the PIN and counts the "touch your key" prompts."""

    def __init__(self) -> None:
        self.touch_prompts = 0

    def prompt_up(self) -> None:
        self.touch_prompts += 1

    def request_pin(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> str | None:
        return PIN


def _verify_self_attestation(attestation: AttestationObject, client_data_hash: bytes) -> None:
    result = PackedAttestation().verify(
        attestation.att_stmt, attestation.auth_data, client_data_hash
    )
    assert result.attestation_type == AttestationType.SELF


@pytest.fixture
def presence() -> ScriptedPresence:
    return ScriptedPresence()


@pytest.fixture
def authenticator(presence: ScriptedPresence) -> SoftwareAuthenticator:
    return SoftwareAuthenticator(presence=presence, presence_timeout=0.5)


@pytest.fixture
def reader_name(pcsc_reader: PlugCard, authenticator: SoftwareAuthenticator) -> str:
    return pcsc_reader(VirtualCard([Fido2Applet(authenticator)]))


@pytest.fixture
def device(reader_name: str) -> Iterator[CtapPcscDevice]:
    devices = list(CtapPcscDevice.list_devices(reader_name))
    assert len(devices) == 1
    yield devices[0]
    devices[0].close(release=True)


def test_fido2_finds_the_key_over_pcsc(reader_name: str) -> None:
    devices = list(CtapPcscDevice.list_devices())  # every reader: the empty slot is skipped
    try:
        assert [d._name for d in devices] == [reader_name]
        assert devices[0].capabilities & 0x04  # CAPABILITY.CBOR: answered getInfo
    finally:
        for d in devices:
            d.close(release=True)


def test_get_info_and_set_pin(device: CtapPcscDevice) -> None:
    ctap = Ctap2(device)
    info = ctap.get_info()
    assert bytes(info.aaguid) == AAGUID
    assert {"FIDO_2_0", "FIDO_2_1"} <= set(info.versions)
    assert info.extensions == ["hmac-secret"]
    assert info.options["clientPin"] is False
    client_pin = ClientPin(ctap)
    client_pin.set_pin(PIN)
    assert ctap.get_info().options["clientPin"] is True
    assert client_pin.get_pin_retries()[0] == 8
    token = client_pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP_ID)
    assert len(token) == 32
    with pytest.raises(CtapError) as raised:
        client_pin.get_pin_token("wrong-pin")
    assert raised.value.code == ERR.PIN_INVALID


def test_register_and_authenticate_through_client_and_server(
    device: CtapPcscDevice, authenticator: SoftwareAuthenticator
) -> None:
    ClientPin(Ctap2(device)).set_pin(PIN)
    person = Person()
    client = Fido2Client(
        device,
        DefaultClientDataCollector(ORIGIN),
        person,
        extensions=[HmacSecretExtension(allow_hmac_secret=True)],  # type: ignore[no-untyped-call]
    )
    server = Fido2Server(
        PublicKeyCredentialRpEntity(id=RP_ID, name="Janus"),
        attestation=AttestationConveyancePreference.DIRECT,
        verify_attestation=_verify_self_attestation,
    )
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=b"alice", name="alice", display_name="Alice"),
        resident_key_requirement=ResidentKeyRequirement.REQUIRED,  # > 256-byte responses
        user_verification=UserVerificationRequirement.REQUIRED,
        extensions={"hmacCreateSecret": True},
    )
    response = client.make_credential(options.public_key)
    auth_data = server.register_complete(state, response)
    credential = auth_data.credential_data
    assert credential is not None
    assert [c.credential_id for c in authenticator.credentials()] == [credential.credential_id]

    for _ in range(2):
        request, state = server.authenticate_begin(
            [credential], user_verification=UserVerificationRequirement.REQUIRED
        )
        selection = client.get_assertion(request.public_key)
        server.authenticate_complete(state, [credential], selection.get_response(0))
    assert authenticator.credentials()[0].sign_count >= 2  # (+ the up=false pre-checks)


def test_denied_touch_is_a_ctap_error(device: CtapPcscDevice, presence: ScriptedPresence) -> None:
    presence.push(Presence.DENY)
    client = Fido2Client(device, DefaultClientDataCollector(ORIGIN), Person())
    server = Fido2Server(PublicKeyCredentialRpEntity(id=RP_ID, name="Janus"))
    options, _ = server.register_begin(
        PublicKeyCredentialUserEntity(id=b"bob", name="bob", display_name="Bob"),
        user_verification=UserVerificationRequirement.DISCOURAGED,
    )
    with pytest.raises(ClientError) as raised:
        client.make_credential(options.public_key)
    assert isinstance(raised.value.cause, CtapError)
    assert raised.value.cause.code == ERR.OPERATION_DENIED


def _make_credential_request(ctap: Ctap2, **kwargs: object) -> object:
    return ctap.make_credential(
        b"\1" * 32,
        {"id": RP_ID, "name": RP_ID},
        {"id": b"carol", "name": "carol"},
        [{"type": "public-key", "alg": -7}],
        **kwargs,  # type: ignore[arg-type]
    )


def test_pending_touch_is_polled_with_status_updates(
    device: CtapPcscDevice, presence: ScriptedPresence
) -> None:
    """A key waiting for a touch answers SW 9100 + UPNEEDED; the platform polls (INS 11)."""
    presence.push(Presence.TIMEOUT)  # nobody touches: times out after presence_timeout
    statuses: list[STATUS] = []
    with pytest.raises(CtapError) as raised:
        _make_credential_request(Ctap2(device), on_keepalive=statuses.append)
    assert raised.value.code == ERR.USER_ACTION_TIMEOUT
    assert statuses == [STATUS.UPNEEDED]


def test_cancel_while_polling(device: CtapPcscDevice, presence: ScriptedPresence) -> None:
    presence.push(Presence.TIMEOUT)
    cancel = threading.Event()
    statuses: list[STATUS] = []

    def on_keepalive(status: STATUS) -> None:
        statuses.append(status)
        cancel.set()  # the person pressed "cancel" when asked to touch

    with pytest.raises(CtapError) as raised:
        _make_credential_request(Ctap2(device), event=cancel, on_keepalive=on_keepalive)
    assert raised.value.code == ERR.KEEPALIVE_CANCEL
    assert statuses == [STATUS.UPNEEDED]


def test_synchronous_path_without_getresponse_support(device: CtapPcscDevice) -> None:
    """P1 00: the platform cannot poll, so NFCCTAP_MSG blocks until the answer."""
    device.use_nfcctap_getresponse = False
    info = Ctap2(device).get_info()
    assert bytes(info.aaguid) == AAGUID


def test_extended_apdus(device: CtapPcscDevice) -> None:
    device.use_ext_apdu = True
    ClientPin(Ctap2(device)).set_pin(PIN)
    assert Ctap2(device).get_info().options["clientPin"] is True


def test_long_requests_are_chained(
    device: CtapPcscDevice, authenticator: SoftwareAuthenticator
) -> None:
    """A request over 250 bytes travels as chained APDUs (CLA 90) and is reassembled."""
    exclude = [{"type": "public-key", "id": bytes([i]) * 32} for i in range(8)]
    request = cbor.encode({5: exclude})
    assert len(request) > 250
    result = _make_credential_request(Ctap2(device), exclude_list=exclude)
    assert result is not None
    assert len(authenticator.credentials()) == 1


# ---------------------------------------------------------------- the applet alone


def _command(ins: int, p1: int = 0, data: bytes = b"", cla: int = 0x80) -> Command:
    return Command(cla, ins, p1, 0, data, 0, False)


def test_applet_select_and_unsupported_commands() -> None:
    applet = Fido2Applet()
    card = VirtualCard([applet])
    select = bytes([0, 0xA4, 4, 0, len(FIDO_AID)]) + FIDO_AID
    assert card.transmit(select) == b"FIDO_2_0\x90\x00"
    assert card.transmit(bytes.fromhex("00010300")) == b"\x6d\x00"  # CTAP1 register
    assert card.transmit(bytes.fromhex("84100000")) == b"\x6e\x00"
    assert card.transmit(bytes.fromhex("80110000")) == b"\x69\x85"  # nothing pending
    assert card.transmit(bytes.fromhex("8010020001" + "04")) == b"\x6b\x00"  # bad P1


def test_applet_answers_ctap_status_for_busy_authenticator() -> None:
    authenticator = SoftwareAuthenticator()
    applet = Fido2Applet(authenticator)
    assert applet.process(_command(0x10, data=b"\x42"))[0] == bytes([ERR.INVALID_COMMAND])
    with authenticator._lock:  # another transport holds the authenticator
        data, sw = applet.process(_command(0x10, data=b"\x04"))
    assert (data, sw) == (bytes([ERR.CHANNEL_BUSY]), 0x9000)


def test_deselect_cancels_a_pending_command() -> None:
    presence = ScriptedPresence(Presence.TIMEOUT)
    authenticator = SoftwareAuthenticator(presence=presence, presence_timeout=30)
    applet = Fido2Applet(authenticator, update_interval=0.05)
    request = b"\x01" + cbor.encode(
        {
            1: b"\1" * 32,
            2: {"id": RP_ID, "name": RP_ID},
            3: {"id": b"c", "name": "c"},
            4: [{"type": "public-key", "alg": -7}],
        }
    )
    data, sw = applet.process(_command(0x10, 0x80, request))
    assert (data, sw) == (bytes([STATUS.UPNEEDED]), SW_STATUS_UPDATE)
    applet.deselect()  # the card was powered off or another applet selected
    assert authenticator.call(CTAPHID.CBOR, b"\x04")[0] == 0  # free again
