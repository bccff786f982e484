"""The software CTAP2 authenticator, driven by python-fido2's real client and server code.

Everything goes through ``Ctap2`` / ``ClientPin`` / ``Fido2Client`` as it would with a
USB key, and what the authenticator signs is checked by ``Fido2Server`` (and the packed
self attestation by fido2's own attestation verifier), so these tests pin down wire
compatibility as well as behaviour.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from fido2 import cbor
from fido2.attestation.base import AttestationType
from fido2.attestation.packed import PackedAttestation
from fido2.client import (
    ClientError,
    DefaultClientDataCollector,
    Fido2Client,
    UserInteraction,
)
from fido2.ctap import CtapError
from fido2.ctap2.base import Ctap2
from fido2.ctap2.extensions import HmacSecretExtension
from fido2.ctap2.pin import ClientPin, PinProtocol, PinProtocolV1, PinProtocolV2
from fido2.hid import CTAPHID
from fido2.server import Fido2Server
from fido2.utils import sha256
from fido2.webauthn import (
    AttestationConveyancePreference,
    AttestationObject,
    AttestedCredentialData,
    AuthenticationResponse,
    PublicKeyCredentialRpEntity,
    PublicKeyCredentialUserEntity,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from hardware.fido2_authenticator import (
    AAGUID,
    Presence,
    PresenceRequest,
    ScriptedPresence,
    SoftwareAuthenticator,
)

ERR = CtapError.ERR
ORIGIN = "https://janus.example"
RP_ID = "janus.example"
PIN = "4711-janus"
REQUIRED = UserVerificationRequirement.REQUIRED
DISCOURAGED = UserVerificationRequirement.DISCOURAGED


class Person(UserInteraction):
    """The human at the platform: knows the PIN and counts the "touch your key" prompts."""

    def __init__(self, pin: str | None = PIN) -> None:
        self.pin = pin
        self.touch_prompts = 0
        self.pin_requests = 0

    def prompt_up(self) -> None:
        self.touch_prompts += 1

    def request_pin(self, permissions: ClientPin.PERMISSION, rp_id: str | None) -> str | None:
        self.pin_requests += 1
        return self.pin


def _verify_self_attestation(attestation: AttestationObject, client_data_hash: bytes) -> None:
    result = PackedAttestation().verify(
        attestation.att_stmt, attestation.auth_data, client_data_hash
    )
    assert result.attestation_type == AttestationType.SELF


def make_server(rp_id: str = RP_ID) -> Fido2Server:
    return Fido2Server(
        PublicKeyCredentialRpEntity(id=rp_id, name="Janus"),
        attestation=AttestationConveyancePreference.DIRECT,
        verify_attestation=_verify_self_attestation,
    )


def make_client(
    device: SoftwareAuthenticator, person: Person | None = None, origin: str = ORIGIN
) -> Fido2Client:
    return Fido2Client(
        device,
        DefaultClientDataCollector(origin),
        person or Person(),
        extensions=[HmacSecretExtension(allow_hmac_secret=True)],  # type: ignore[no-untyped-call]
    )


def register(
    client: Fido2Client,
    server: Fido2Server,
    user: bytes = b"alice",
    *,
    uv: UserVerificationRequirement = REQUIRED,
    resident: bool = False,
    hmac_secret: bool = False,
    exclude: Sequence[AttestedCredentialData] | None = None,
) -> AttestedCredentialData:
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=user, name=user.decode(), display_name=user.decode()),
        credentials=exclude,
        resident_key_requirement=(
            ResidentKeyRequirement.REQUIRED if resident else ResidentKeyRequirement.DISCOURAGED
        ),
        user_verification=uv,
        extensions={"hmacCreateSecret": True} if hmac_secret else None,
    )
    response = client.make_credential(options.public_key)
    if hmac_secret:
        assert response.client_extension_results.hmac_create_secret is True
    auth_data = server.register_complete(state, response)
    assert auth_data.credential_data is not None
    return auth_data.credential_data


def authenticate(
    client: Fido2Client,
    server: Fido2Server,
    credentials: Sequence[AttestedCredentialData],
    *,
    allow: Sequence[AttestedCredentialData] | None = None,
    uv: UserVerificationRequirement = REQUIRED,
    extensions: Mapping[str, Any] | None = None,
) -> list[AuthenticationResponse]:
    """Authenticate; every response is verified by the server before it is returned."""
    options, state = server.authenticate_begin(allow, user_verification=uv, extensions=extensions)
    selection = client.get_assertion(options.public_key)
    responses = [selection.get_response(i) for i in range(len(selection.get_assertions()))]
    for response in responses:
        server.authenticate_complete(state, credentials, response)
    return responses


def hmac_outputs(response: AuthenticationResponse) -> tuple[bytes, bytes | None]:
    output = response.client_extension_results.hmac_get_secret
    assert output is not None
    return output.output1, output.output2 or None


def raw_make_credential(
    ctap: Ctap2,
    *,
    rp_id: str = RP_ID,
    user: bytes = b"alice",
    rk: bool = False,
    token: bytes | None = None,
    protocol: PinProtocol | None = None,
) -> Any:
    client_data_hash = sha256(b"raw client data")
    pin_uv_param = None
    if token is not None:
        protocol = protocol or PinProtocolV2()
        pin_uv_param = protocol.authenticate(token, client_data_hash)
    return ctap.make_credential(
        client_data_hash,
        {"id": rp_id, "name": rp_id},
        {"id": user, "name": user.decode()},
        [{"type": "public-key", "alg": -7}],
        options={"rk": True} if rk else None,
        pin_uv_param=pin_uv_param,
        pin_uv_protocol=protocol.VERSION if protocol and token else None,
    )


@pytest.fixture
def presence() -> ScriptedPresence:
    return ScriptedPresence()


@pytest.fixture
def device(presence: ScriptedPresence) -> SoftwareAuthenticator:
    return SoftwareAuthenticator(presence=presence, presence_timeout=0.2)


@pytest.fixture
def pinned(device: SoftwareAuthenticator) -> SoftwareAuthenticator:
    ClientPin(Ctap2(device)).set_pin(PIN)
    return device


@pytest.fixture
def server() -> Fido2Server:
    return make_server()


# ------------------------------------------------------------------------ getInfo


def test_get_info_through_ctap2(device: SoftwareAuthenticator) -> None:
    info = Ctap2(device).get_info()
    assert {"FIDO_2_0", "FIDO_2_1"} <= set(info.versions)
    assert info.extensions == ["hmac-secret"]
    assert bytes(info.aaguid) == AAGUID
    assert info.options["rk"] is True
    assert info.options["up"] is True
    assert info.options["clientPin"] is False  # supported, not yet set
    assert info.pin_uv_protocols == [2, 1]
    assert info.max_cred_id_length >= 32
    assert info.algorithms == [{"type": "public-key", "alg": -7}]

    ClientPin(Ctap2(device)).set_pin(PIN)
    assert Ctap2(device).get_info().options["clientPin"] is True


def test_ctaphid_basics(device: SoftwareAuthenticator) -> None:
    assert device.call(CTAPHID.PING, b"echo") == b"echo"
    assert device.call(CTAPHID.WINK) == b""
    init = device.call(CTAPHID.INIT, b"12345678")
    assert init[:8] == b"12345678" and init[-1] == device.capabilities
    with pytest.raises(CtapError) as raised:
        device.call(CTAPHID.MSG, b"\x00\x01\x00\x00")  # no CTAP1/U2F
    assert raised.value.code == ERR.INVALID_COMMAND


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x42", ERR.INVALID_COMMAND),
        (b"\x01\xff", ERR.INVALID_CBOR),
        (b"\x01\xa1\x01", ERR.INVALID_CBOR),  # truncated
        (b"\x01\xa2\x02\x00\x01\x00", ERR.INVALID_CBOR),  # keys out of canonical order
        (b"\x01\x80", ERR.CBOR_UNEXPECTED_TYPE),  # an array where a map belongs
        (b"\x01" + cbor.encode({1: b"x" * 32}), ERR.MISSING_PARAMETER),
        (b"\x02" + cbor.encode({1: 5, 2: b"x" * 32}), ERR.CBOR_UNEXPECTED_TYPE),
        (b"\x08", ERR.NOT_ALLOWED),  # getNextAssertion with nothing pending
        (b"\x06" + cbor.encode({1: 3, 2: 1}), ERR.INVALID_PARAMETER),  # protocol 3
        (b"\x06" + cbor.encode({1: 2, 2: 0x06}), ERR.INVALID_SUBCOMMAND),  # no built-in UV
    ],
)
def test_malformed_requests_get_ctap_status_codes(
    device: SoftwareAuthenticator, request_bytes: bytes, status: CtapError.ERR
) -> None:
    assert device.call(CTAPHID.CBOR, request_bytes) == bytes([status])


def test_only_es256_is_offered(device: SoftwareAuthenticator) -> None:
    ctap = Ctap2(device)
    with pytest.raises(CtapError) as raised:
        ctap.make_credential(
            b"\0" * 32, {"id": RP_ID}, {"id": b"u"}, [{"type": "public-key", "alg": -257}]
        )
    assert raised.value.code == ERR.UNSUPPORTED_ALGORITHM


# ------------------------------------------------------------------------ clientPIN


@pytest.mark.parametrize("protocol", [PinProtocolV1(), PinProtocolV2()], ids=["v1", "v2"])
def test_set_and_change_pin(device: SoftwareAuthenticator, protocol: PinProtocol) -> None:
    pin = ClientPin(Ctap2(device), protocol)
    pin.set_pin(PIN)
    assert pin.get_pin_retries()[0] == 8
    assert len(pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP_ID)) == 32

    with pytest.raises(CtapError) as raised:
        pin.set_pin("another")  # setPIN only works once; changePIN after that
    assert raised.value.code == ERR.PIN_AUTH_INVALID

    pin.change_pin(PIN, "new-pin-1")
    with pytest.raises(CtapError) as raised:
        pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP_ID)
    assert raised.value.code == ERR.PIN_INVALID
    assert pin.get_pin_retries()[0] == 7
    pin.get_pin_token("new-pin-1", ClientPin.PERMISSION.GET_ASSERTION, RP_ID)
    assert pin.get_pin_retries()[0] == 8  # a right PIN restores the counter


def test_change_pin_needs_the_current_pin(pinned: SoftwareAuthenticator) -> None:
    pin = ClientPin(Ctap2(pinned))
    with pytest.raises(CtapError) as raised:
        pin.change_pin("not-the-pin", "new-pin-1")
    assert raised.value.code == ERR.PIN_INVALID
    pin.get_pin_token(PIN)  # unchanged


def test_pin_composition_rules(device: SoftwareAuthenticator) -> None:
    pin = ClientPin(Ctap2(device))
    with pytest.raises(CtapError) as raised:
        pin.set_pin("x" * 64)  # 63 bytes at most
    assert raised.value.code == ERR.PIN_POLICY_VIOLATION
    assert Ctap2(device).get_info().options["clientPin"] is False


def test_wrong_pins_count_down_to_a_block(pinned: SoftwareAuthenticator) -> None:
    pin = ClientPin(Ctap2(pinned))

    def attempt(value: str) -> CtapError.ERR:
        with pytest.raises(CtapError) as raised:
            pin.get_pin_token(value)
        return raised.value.code

    # Three wrong in a row need a power cycle before the next try (§6.5.2)...
    assert [attempt("wrong-1") for _ in range(3)] == [
        ERR.PIN_INVALID,
        ERR.PIN_INVALID,
        ERR.PIN_AUTH_BLOCKED,
    ]
    assert pin.get_pin_retries() == (5, True)
    assert attempt(PIN) == ERR.PIN_AUTH_BLOCKED  # even the right PIN: replug first
    pinned.power_cycle()
    assert [attempt("wrong-2") for _ in range(3)] == [
        ERR.PIN_INVALID,
        ERR.PIN_INVALID,
        ERR.PIN_AUTH_BLOCKED,
    ]
    pinned.power_cycle()
    # ... and the eighth wrong PIN blocks it for good.
    assert [attempt("wrong-3") for _ in range(2)] == [ERR.PIN_INVALID, ERR.PIN_BLOCKED]
    assert pin.get_pin_retries()[0] == 0
    assert attempt(PIN) == ERR.PIN_BLOCKED
    pinned.power_cycle()
    assert attempt(PIN) == ERR.PIN_BLOCKED

    with pytest.raises(ClientError) as client_raised:
        register(make_client(pinned), make_server())
    assert isinstance(client_raised.value.cause, CtapError)
    assert client_raised.value.cause.code == ERR.PIN_BLOCKED


def test_token_permissions_and_rp_binding(pinned: SoftwareAuthenticator) -> None:
    ctap = Ctap2(pinned)
    pin = ClientPin(ctap)

    assertion_only = pin.get_pin_token(PIN, ClientPin.PERMISSION.GET_ASSERTION, RP_ID)
    with pytest.raises(CtapError) as raised:
        raw_make_credential(ctap, token=assertion_only)
    assert raised.value.code == ERR.PIN_AUTH_INVALID

    other_rp = pin.get_pin_token(PIN, ClientPin.PERMISSION.MAKE_CREDENTIAL, "other.example")
    with pytest.raises(CtapError) as raised:
        raw_make_credential(ctap, token=other_rp)
    assert raised.value.code == ERR.PIN_AUTH_INVALID

    with pytest.raises(CtapError) as raised:
        pin.get_pin_token(PIN, ClientPin.PERMISSION.CREDENTIAL_MGMT)
    assert raised.value.code == ERR.UNAUTHORIZED_PERMISSION

    token = pin.get_pin_token(PIN, ClientPin.PERMISSION.MAKE_CREDENTIAL, RP_ID)
    made = raw_make_credential(ctap, token=token)
    assert made.auth_data.is_user_verified()
    with pytest.raises(CtapError) as raised:  # spent by the presence-checked operation
        raw_make_credential(ctap, token=token)
    assert raised.value.code == ERR.PIN_AUTH_INVALID

    legacy = pin.get_pin_token(PIN)  # getPinToken (0x05): mc and ga, RP bound on use
    assert raw_make_credential(
        ctap, token=legacy, rp_id="other.example"
    ).auth_data.is_user_verified()


def test_discoverable_credentials_need_the_pin_once_one_is_set(
    pinned: SoftwareAuthenticator,
) -> None:
    ctap = Ctap2(pinned)
    with pytest.raises(CtapError) as raised:
        raw_make_credential(ctap, rk=True)
    assert raised.value.code == ERR.PUAT_REQUIRED
    made = raw_make_credential(ctap)  # makeCredUvNotRqd: non-discoverable is fine
    assert not made.auth_data.is_user_verified()


# ------------------------------------------------------------------------ register / sign


def test_register_and_authenticate_verified_by_the_server(
    pinned: SoftwareAuthenticator, server: Fido2Server
) -> None:
    person = Person()
    client = make_client(pinned, person)
    credential = register(client, server)
    assert credential.aaguid == AAGUID
    assert person.pin_requests == 1
    assert person.touch_prompts == 1

    first = authenticate(client, server, [credential], allow=[credential])[0]
    second = authenticate(client, server, [credential], allow=[credential])[0]
    assert first.raw_id == credential.credential_id
    for response in (first, second):
        auth_data = response.response.authenticator_data
        assert auth_data.is_user_present() and auth_data.is_user_verified()
    assert (
        second.response.authenticator_data.counter > first.response.authenticator_data.counter > 0
    )


def test_tampered_assertion_is_refused(device: SoftwareAuthenticator, server: Fido2Server) -> None:
    client = make_client(device)
    credential = register(client, server, uv=DISCOURAGED)
    options, state = server.authenticate_begin([credential], user_verification=DISCOURAGED)
    response = client.get_assertion(options.public_key).get_response(0)
    other_state = server.authenticate_begin([credential])[1]  # another challenge
    with pytest.raises(ValueError, match="challenge"):
        server.authenticate_complete(other_state, [credential], response)
    signature = bytearray(response.response.signature)
    signature[-1] ^= 1
    forged = replace(response, response=replace(response.response, signature=bytes(signature)))
    with pytest.raises(ValueError, match="signature"):
        server.authenticate_complete(state, [credential], forged)
    server.authenticate_complete(state, [credential], response)


def test_attestation_none(presence: ScriptedPresence) -> None:
    device = SoftwareAuthenticator(presence=presence, attestation="none")
    made = raw_make_credential(Ctap2(device))
    assert made.fmt == "none" and made.att_stmt == {}
    assert made.auth_data.credential_data is not None


def test_without_a_pin_signatures_carry_presence_not_verification(
    device: SoftwareAuthenticator, server: Fido2Server
) -> None:
    client = make_client(device, Person(pin=None))
    credential = register(client, server, uv=DISCOURAGED)
    response = authenticate(client, server, [credential], allow=[credential], uv=DISCOURAGED)[0]
    auth_data = response.response.authenticator_data
    assert auth_data.is_user_present() and not auth_data.is_user_verified()


def test_allow_list_selects_the_named_credential(
    pinned: SoftwareAuthenticator, server: Fido2Server
) -> None:
    client = make_client(pinned)
    alice = register(client, server, b"alice")
    bob = register(client, server, b"bob")
    assert alice.credential_id != bob.credential_id

    only_bob = authenticate(client, server, [alice, bob], allow=[bob])
    assert [r.raw_id for r in only_bob] == [bob.credential_id]
    either = authenticate(client, server, [alice, bob], allow=[alice, bob])
    assert len(either) == 1 and either[0].raw_id in {alice.credential_id, bob.credential_id}

    foreign = AttestedCredentialData.create(AAGUID, b"\x01" * 32, alice.public_key)
    with pytest.raises(ClientError) as raised:
        authenticate(client, server, [foreign], allow=[foreign])
    assert raised.value.code == ClientError.ERR.DEVICE_INELIGIBLE


def test_credentials_are_bound_to_their_rp(
    pinned: SoftwareAuthenticator, server: Fido2Server
) -> None:
    alice = register(make_client(pinned), server)
    other = make_server("other.example")
    with pytest.raises(ClientError) as raised:
        authenticate(
            make_client(pinned, origin="https://other.example"), other, [alice], allow=[alice]
        )
    assert raised.value.code == ClientError.ERR.DEVICE_INELIGIBLE


def test_exclude_list_refuses_a_second_registration(
    pinned: SoftwareAuthenticator, presence: ScriptedPresence, server: Fido2Server
) -> None:
    client = make_client(pinned)
    alice = register(client, server)
    presence.requests.clear()
    with pytest.raises(ClientError) as raised:
        register(client, server, b"alice", exclude=[alice])
    assert raised.value.code == ClientError.ERR.DEVICE_INELIGIBLE
    assert isinstance(raised.value.cause, CtapError)
    assert raised.value.cause.code == ERR.CREDENTIAL_EXCLUDED
    # The refusal waited for a touch, so a page cannot probe for credentials silently.
    assert presence.requests == [PresenceRequest("makeCredential", RP_ID)]
    assert len(pinned.credentials()) == 1


def test_discoverable_credentials_and_get_next_assertion(
    pinned: SoftwareAuthenticator, server: Fido2Server
) -> None:
    client = make_client(pinned)
    alice = register(client, server, b"alice", resident=True)
    bob = register(client, server, b"bob", resident=True)
    register(
        make_client(pinned, origin="https://other.example"),
        make_server("other.example"),
        b"carol",
        resident=True,
    )

    responses = authenticate(client, server, [alice, bob])  # no allow list
    assert [r.response.user_handle for r in responses] == [b"bob", b"alice"]  # newest first
    assert [r.raw_id for r in responses] == [bob.credential_id, alice.credential_id]

    # The same through Ctap2 directly: numberOfCredentials, then getNextAssertion.
    ctap = Ctap2(pinned)
    client_data_hash = sha256(b"direct")
    first = ctap.get_assertion(RP_ID, client_data_hash)
    assert first.number_of_credentials == 2
    assert first.user == {"id": b"bob"}  # no names without user verification
    second = ctap.get_next_assertion()
    assert second.user == {"id": b"alice"}
    first.verify(client_data_hash, bob.public_key)
    second.verify(client_data_hash, alice.public_key)
    with pytest.raises(CtapError) as raised:
        ctap.get_next_assertion()
    assert raised.value.code == ERR.NOT_ALLOWED


def test_a_new_discoverable_credential_replaces_the_same_users_old_one(
    pinned: SoftwareAuthenticator, server: Fido2Server
) -> None:
    client = make_client(pinned)
    register(client, server, b"alice", resident=True)
    newer = register(client, server, b"alice", resident=True)
    stored = pinned.credentials()
    assert [c.credential_id for c in stored] == [newer.credential_id]
    assert stored[0].discoverable and stored[0].user_name == "alice"


# ------------------------------------------------------------------------ hmac-secret


SALT1 = b"\x11" * 32
SALT2 = b"\x22" * 32


def _get_secret(
    client: Fido2Client,
    server: Fido2Server,
    credential: AttestedCredentialData,
    *,
    uv: UserVerificationRequirement = REQUIRED,
    salt2: bool = True,
) -> tuple[bytes, bytes | None]:
    salts: dict[str, bytes] = {"salt1": SALT1}
    if salt2:
        salts["salt2"] = SALT2
    response = authenticate(
        client,
        server,
        [credential],
        allow=[credential],
        uv=uv,
        extensions={"hmacGetSecret": salts},
    )[0]
    return hmac_outputs(response)


def test_hmac_secret_is_a_stable_per_credential_prf(
    pinned: SoftwareAuthenticator, server: Fido2Server
) -> None:
    client = make_client(pinned)
    alice = register(client, server, b"alice", hmac_secret=True)
    bob = register(client, server, b"bob", hmac_secret=True)
    plain = register(client, server, b"carol")
    assert [c.hmac_secret for c in pinned.credentials()] == [True, True, False]

    out1, out2 = _get_secret(client, server, alice)
    assert len(out1) == 32 and out2 is not None and len(out2) == 32 and out1 != out2
    assert _get_secret(client, server, alice) == (out1, out2)  # same salt, same secret
    assert _get_secret(client, server, alice, salt2=False) == (out1, None)
    assert _get_secret(client, server, bob)[0] != out1  # another credential
    # Without UV a different CredRandom is used (§12.5): touch alone does not give the
    # secret that was derived with the PIN.
    no_uv = _get_secret(client, server, alice, uv=DISCOURAGED)
    assert no_uv[0] != out1
    assert _get_secret(client, server, alice, uv=DISCOURAGED) == no_uv

    response = authenticate(
        client, server, [plain], allow=[plain], extensions={"hmacGetSecret": {"salt1": SALT1}}
    )[0]
    assert response.client_extension_results.hmac_get_secret is None


def test_hmac_secret_salts_must_be_authenticated(device: SoftwareAuthenticator) -> None:
    ctap = Ctap2(device)
    made = raw_make_credential(ctap)
    assert made.auth_data.credential_data is not None
    protocol: PinProtocol = PinProtocolV2()
    peer = ctap.client_pin(2, ClientPin.CMD.GET_KEY_AGREEMENT)[ClientPin.RESULT.KEY_AGREEMENT]
    key_agreement, shared_secret = protocol.encapsulate(peer)
    salt_enc = protocol.encrypt(shared_secret, SALT1)
    forged = {1: key_agreement, 2: salt_enc, 3: b"\0" * 32, 4: 2}
    descriptor: Mapping[str, Any] = {
        "type": "public-key",
        "id": made.auth_data.credential_data.credential_id,
    }
    with pytest.raises(CtapError) as raised:
        ctap.get_assertion(RP_ID, b"\0" * 32, [descriptor], {"hmac-secret": forged})
    assert raised.value.code == ERR.PIN_AUTH_INVALID


def test_hmac_secret_is_the_same_under_both_pin_protocols(
    tmp_path: Path, server: Fido2Server
) -> None:
    state = tmp_path / "authenticator.json"
    modern = SoftwareAuthenticator(state_path=state)
    credential = register(
        make_client(modern, Person(pin=None)), server, uv=DISCOURAGED, hmac_secret=True
    )
    via_two = _get_secret(make_client(modern), server, credential, uv=DISCOURAGED)

    legacy = SoftwareAuthenticator(state_path=state, pin_uv_protocols=(1,))
    assert Ctap2(legacy).info.pin_uv_protocols == [1]
    via_one = _get_secret(make_client(legacy), server, credential, uv=DISCOURAGED)
    assert via_one == via_two


def test_hmac_secret_during_discoverable_assertions(
    device: SoftwareAuthenticator, server: Fido2Server
) -> None:
    client = make_client(device, Person(pin=None))
    alice = register(client, server, b"alice", uv=DISCOURAGED, resident=True, hmac_secret=True)
    bob = register(client, server, b"bob", uv=DISCOURAGED, resident=True, hmac_secret=True)
    responses = authenticate(
        client,
        server,
        [alice, bob],
        uv=DISCOURAGED,
        extensions={"hmacGetSecret": {"salt1": SALT1}},
    )
    by_handle = {r.response.user_handle: hmac_outputs(r)[0] for r in responses}
    assert set(by_handle) == {b"alice", b"bob"} and by_handle[b"alice"] != by_handle[b"bob"]
    single = authenticate(
        client,
        server,
        [alice],
        allow=[alice],
        uv=DISCOURAGED,
        extensions={"hmacGetSecret": {"salt1": SALT1}},
    )[0]
    assert hmac_outputs(single)[0] == by_handle[b"alice"]


def test_prf_extension_rides_on_hmac_secret(
    device: SoftwareAuthenticator, server: Fido2Server
) -> None:
    client = make_client(device, Person(pin=None))
    options, state = server.register_begin(
        PublicKeyCredentialUserEntity(id=b"alice", name="alice"),
        user_verification=DISCOURAGED,
        extensions={"prf": {}},
    )
    registration = client.make_credential(options.public_key)
    assert registration.client_extension_results.prf.enabled is True
    credential = server.register_complete(state, registration).credential_data
    assert credential is not None
    evaluate = {"prf": {"eval": {"first": b"janus keystore"}}}
    results = [
        authenticate(
            client, server, [credential], allow=[credential], uv=DISCOURAGED, extensions=evaluate
        )[0].client_extension_results.prf.results.first
        for _ in range(2)
    ]
    assert len(results[0]) == 32 and results[0] == results[1]


# ------------------------------------------------------------------------ user presence


def test_presence_denied_means_no_credential(
    device: SoftwareAuthenticator, presence: ScriptedPresence, server: Fido2Server
) -> None:
    presence.push(Presence.DENY)
    with pytest.raises(ClientError) as raised:
        register(make_client(device, Person(pin=None)), server, uv=DISCOURAGED)
    assert isinstance(raised.value.cause, CtapError)
    assert raised.value.cause.code == ERR.OPERATION_DENIED
    assert device.credentials() == []


def test_presence_denied_means_no_signature(
    pinned: SoftwareAuthenticator, presence: ScriptedPresence, server: Fido2Server
) -> None:
    client = make_client(pinned)
    credential = register(client, server)
    presence.push(Presence.DENY)
    with pytest.raises(ClientError) as raised:
        authenticate(client, server, [credential], allow=[credential])
    assert isinstance(raised.value.cause, CtapError)
    assert raised.value.cause.code == ERR.OPERATION_DENIED
    assert presence.requests[-1] == PresenceRequest("getAssertion", RP_ID)


def test_presence_timeout_after_keepalives(
    pinned: SoftwareAuthenticator, presence: ScriptedPresence, server: Fido2Server
) -> None:
    person = Person()
    client = make_client(pinned, person)
    credential = register(client, server)
    prompts_before = person.touch_prompts
    presence.push(Presence.TIMEOUT)
    started = time.monotonic()
    with pytest.raises(ClientError) as raised:
        authenticate(client, server, [credential], allow=[credential])
    assert time.monotonic() - started >= pinned.presence_timeout
    assert raised.value.code == ClientError.ERR.TIMEOUT
    assert isinstance(raised.value.cause, CtapError)
    assert raised.value.cause.code == ERR.USER_ACTION_TIMEOUT
    assert person.touch_prompts == prompts_before + 1  # the UPNEEDED keepalive was seen


def test_waiting_for_presence_can_be_cancelled_and_blocks_other_callers() -> None:
    presence = ScriptedPresence(default=Presence.TIMEOUT)
    device = SoftwareAuthenticator(presence=presence, presence_timeout=10)
    ctap = Ctap2(device)
    cancel = threading.Event()
    outcome: list[int] = []

    def wait_for_touch() -> None:
        try:
            ctap.selection(event=cancel)
        except CtapError as exc:
            outcome.append(exc.code)

    waiter = threading.Thread(target=wait_for_touch)
    started = time.monotonic()
    waiter.start()
    # Asked for a touch: it holds the device now (a fixed sleep may be too short when
    # the machine is busy, and the PING below would then be answered).
    deadline = time.monotonic() + 5
    while not presence.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.command for r in presence.requests] == ["selection"]
    with pytest.raises(CtapError) as raised:  # another "channel" while it waits
        device.call(CTAPHID.PING, b"x")
    assert raised.value.code == ERR.CHANNEL_BUSY
    cancel.set()
    waiter.join(5)
    assert outcome == [ERR.KEEPALIVE_CANCEL]
    assert time.monotonic() - started < 5


def test_selection(device: SoftwareAuthenticator, presence: ScriptedPresence) -> None:
    client = make_client(device)
    client.selection()
    presence.push(Presence.DENY)
    with pytest.raises(ClientError):
        client.selection()
    assert [r.command for r in presence.requests] == ["selection", "selection"]


# ------------------------------------------------------------------------ reset


def test_reset_wipes_credentials_and_pin(
    pinned: SoftwareAuthenticator, server: Fido2Server
) -> None:
    client = make_client(pinned)
    resident = register(client, server, b"alice", resident=True)
    register(client, server, b"bob")
    Ctap2(pinned).reset()

    assert pinned.credentials() == []
    info = Ctap2(pinned).get_info()
    assert info.options["clientPin"] is False
    ctap = Ctap2(pinned)
    descriptor: Mapping[str, Any] = {"type": "public-key", "id": resident.credential_id}
    for allow in (None, [descriptor]):
        with pytest.raises(CtapError) as raised:
            ctap.get_assertion(RP_ID, b"\0" * 32, allow)
        assert raised.value.code == ERR.NO_CREDENTIALS


def test_reset_needs_presence_and_a_fresh_power_up(presence: ScriptedPresence) -> None:
    device = SoftwareAuthenticator(presence=presence, reset_window=0.2)
    raw_make_credential(Ctap2(device))
    presence.push(Presence.DENY)
    with pytest.raises(CtapError) as raised:
        Ctap2(device).reset()
    assert raised.value.code == ERR.OPERATION_DENIED
    time.sleep(0.25)
    with pytest.raises(CtapError) as raised:
        Ctap2(device).reset()
    assert raised.value.code == ERR.NOT_ALLOWED
    assert len(device.credentials()) == 1
    device.power_cycle()
    Ctap2(device).reset()
    assert device.credentials() == []


# ------------------------------------------------------------------------ persistence


def test_state_persists_privately_and_atomically(tmp_path: Path, server: Fido2Server) -> None:
    state = tmp_path / "key.json"
    first = SoftwareAuthenticator(state_path=state)
    ClientPin(Ctap2(first)).set_pin(PIN)
    client = make_client(first)
    credential = register(client, server, resident=True, hmac_secret=True)
    before = authenticate(
        client,
        server,
        [credential],
        allow=[credential],
        extensions={"hmacGetSecret": {"salt1": SALT1}},
    )[0]

    assert state.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key.json"]  # no temp files left
    assert json.loads(state.read_text())["pin_retries"] == 8

    replugged = SoftwareAuthenticator(state_path=state)
    assert Ctap2(replugged).info.options["clientPin"] is True
    again = make_client(replugged)
    after = authenticate(
        again, server, [credential], extensions={"hmacGetSecret": {"salt1": SALT1}}
    )[0]
    assert after.raw_id == credential.credential_id
    assert after.response.authenticator_data.counter > before.response.authenticator_data.counter
    assert hmac_outputs(after) == hmac_outputs(before)

    with pytest.raises(CtapError):
        ClientPin(Ctap2(replugged)).get_pin_token("wrong-pin")
    assert SoftwareAuthenticator(state_path=state).pin_retries == 7  # counted on disk


@pytest.mark.parametrize(
    "content",
    [{"format": "something-else"}, {"format": "janus-soft-ctap2/1", "pin_retries": 8}],
    ids=["foreign", "malformed"],
)
def test_a_bad_state_file_is_refused(tmp_path: Path, content: dict[str, Any]) -> None:
    state = tmp_path / "key.json"
    state.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="state file"):
        SoftwareAuthenticator(state_path=state)


def test_descriptor_type_is_honoured(pinned: SoftwareAuthenticator, server: Fido2Server) -> None:
    credential = register(make_client(pinned), server)
    ctap = Ctap2(pinned)
    descriptor = {"type": "public-key", "id": credential.credential_id}
    found = ctap.get_assertion(RP_ID, b"\0" * 32, [descriptor], options={"up": False})
    assert not found.auth_data.is_user_present()  # a silent pre-flight check
    with pytest.raises(CtapError) as raised:
        ctap.get_assertion(RP_ID, b"\0" * 32, [{"type": "other", "id": credential.credential_id}])
    assert raised.value.code == ERR.NO_CREDENTIALS
