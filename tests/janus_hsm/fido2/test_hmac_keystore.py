"""A software keystore wrapped with FIDO2 hmac-secret opens only with an enrolled credential.

Every authenticator is a ``SoftwareAuthenticator`` driven through fido2's real client.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
from fido2.ctap2.base import Ctap2
from fido2.ctap2.pin import ClientPin

from hardware.fido2_authenticator import Presence, ScriptedPresence, SoftwareAuthenticator
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software import keyfile
from janus_hsm.backends.software.keyfile import HmacSecretRecipient
from janus_hsm.backends.software.provider import SoftwareProvider
from janus_hsm.errors import KeystoreError
from janus_hsm.fido2.authenticator import Authenticator
from janus_hsm.fido2.devices import Fido2Device
from janus_hsm.fido2.errors import (
    Fido2Error,
    Fido2PinBlockedError,
    Fido2PinInvalidError,
    NoDeviceError,
    PresenceDeniedError,
    UnknownCredentialError,
    WrongCredentialError,
)
from janus_hsm.fido2.keystore import KEYSTORE_RP_ID, Fido2HmacSecret

PIN = "4711-janus"


class Key:
    """One security key: the device, its presence script and an enrolled credential."""

    def __init__(self, label: str, *, pin: bool = False, retries: int = 8) -> None:
        self.presence = ScriptedPresence()
        self.device = SoftwareAuthenticator(
            presence=self.presence, presence_timeout=0.2, max_pin_retries=retries
        )
        if pin:
            ClientPin(Ctap2(self.device)).set_pin(PIN)
        self.pin = PIN
        created = Authenticator(self.device, pin=lambda: self.pin).make_credential(
            KEYSTORE_RP_ID, label, hmac_secret=True
        )
        self.recipient = HmacSecretRecipient(
            created.credential_id, KEYSTORE_RP_ID, created.uv, label
        )

    def as_device(self) -> Fido2Device:
        return Fido2Device.in_process(self.device, self.recipient.label)


def source(enrolled: Sequence[Key], connected: Sequence[Key], pin: str = PIN) -> Fido2HmacSecret:
    return Fido2HmacSecret(
        [k.recipient for k in enrolled],
        pin=lambda: pin,
        devices=lambda: [k.as_device() for k in connected],
    )


def provider(directory: Path, hmac: Fido2HmacSecret) -> SoftwareProvider:
    return SoftwareProvider.open(
        f"soft:dir={directory}",
        allow_extractable=True,
        hmac_secret=hmac,
        passphrase_source=lambda: pytest.fail("no passphrase may be asked for"),
    )


def uri(directory: Path, name: str = "grant-1") -> str:
    return f"soft:dir={directory};object={name}"


def test_opens_with_the_enrolled_credential_and_stores_nothing_secret(tmp_path: Path) -> None:
    alice = Key("alice")
    generated = provider(tmp_path, source([alice], [alice])).generate(
        uri(tmp_path), Algorithm.ES256
    )
    signature_key = generated.public_key()

    reopened = provider(tmp_path, source([alice], [alice])).find(uri(tmp_path))
    reopened.sign(b"hello")  # decrypts through the authenticator
    assert reopened.public_key() == signature_key
    doc = json.loads((tmp_path / "grant-1.jkey").read_bytes())
    assert doc["version"] == 2
    protection = doc["protection"]
    assert protection["mode"] == "fido2-hmac-secret"
    assert set(protection) == {"mode", "kdf", "key_wrap", "extension", "salt", "recipients"}
    assert [r["label"] for r in protection["recipients"]] == ["alice"]
    assert set(protection["recipients"][0]) == {
        "credential_id",
        "rp_id",
        "uv",
        "label",
        "wrapped_key",
    }
    # The hmac-secret output itself is nowhere in the file.
    salt = keyfile.b64d(protection["salt"], "salt")
    _, output = Authenticator(alice.device).hmac_secret(
        KEYSTORE_RP_ID, [alice.recipient.credential_id], salt, uv=False
    )
    assert keyfile.b64e(output) not in (tmp_path / "grant-1.jkey").read_text()


def test_another_authenticator_cannot_open_it(tmp_path: Path) -> None:
    alice, mallory = Key("alice"), Key("mallory")
    provider(tmp_path, source([alice], [alice])).generate(uri(tmp_path), Algorithm.ES256)
    handle = provider(tmp_path, source([mallory], [mallory])).find(uri(tmp_path))
    with pytest.raises(UnknownCredentialError) as raised:
        handle.sign(b"x")
    assert raised.value.code == "unknown_credential"
    assert mallory.presence.requests == [] or all(
        r.command != "getAssertion" for r in mallory.presence.requests
    ), "no touch is asked for when the key holds no enrolled credential"
    with pytest.raises(NoDeviceError):
        provider(tmp_path, source([alice], [])).find(uri(tmp_path)).sign(b"x")
    with pytest.raises(KeystoreError, match="FIDO2 credentials"):
        SoftwareProvider.open(
            f"soft:dir={tmp_path}", allow_extractable=True, passphrase_source=lambda: "x"
        ).find(uri(tmp_path)).sign(b"x")


def test_a_wrong_hmac_secret_for_the_right_credential_id_yields_no_key(tmp_path: Path) -> None:
    alice = Key("alice")
    provider(tmp_path, source([alice], [alice])).generate(uri(tmp_path), Algorithm.ES256)

    class Impostor:
        """Claims alice's credential id but answers with another credential's secret."""

        def enrolled(self) -> list[HmacSecretRecipient]:
            return [alice.recipient]

        def hmac_secret(
            self, recipients: Sequence[HmacSecretRecipient], salt: bytes
        ) -> tuple[int, bytes]:
            return 0, b"\x01" * 32

    handle = SoftwareProvider.open(
        f"soft:dir={tmp_path}", allow_extractable=True, hmac_secret=Impostor()
    ).find(uri(tmp_path))
    with pytest.raises(WrongCredentialError) as raised:
        handle.sign(b"x")
    assert raised.value.code == "wrong_credential"


def test_any_enrolled_credential_opens_it_so_a_lost_key_is_survivable(tmp_path: Path) -> None:
    primary, backup, replacement = Key("primary"), Key("backup"), Key("replacement")
    provider(tmp_path, source([primary, backup], [primary, backup])).generate(
        uri(tmp_path), Algorithm.EdDSA
    )
    # The primary is lost: the backup alone opens the key.
    provider(tmp_path, source([backup], [backup])).find(uri(tmp_path)).sign(b"x")
    # Re-enrol: drop the lost key, add a replacement (the backup opens, the new one wraps).
    store = provider(tmp_path, source([backup], [backup, replacement]))
    store.rewrap(
        uri(tmp_path), add=[replacement.recipient], remove=[primary.recipient.credential_id]
    )
    labels = [
        r.label for r in keyfile.hmac_secret_recipients(store.lookup(uri(tmp_path))._key_file)
    ]
    assert labels == ["backup", "replacement"]
    provider(tmp_path, source([], [replacement])).find(uri(tmp_path)).sign(b"x")
    with pytest.raises(UnknownCredentialError):
        provider(tmp_path, source([], [primary])).find(uri(tmp_path)).sign(b"x")


def test_user_verification_needs_the_right_pin_and_a_blocked_pin_is_typed(tmp_path: Path) -> None:
    alice = Key("alice", pin=True, retries=2)
    assert alice.recipient.uv is True
    provider(tmp_path, source([alice], [alice])).generate(uri(tmp_path), Algorithm.ES256)
    with pytest.raises(Fido2PinInvalidError) as wrong:
        provider(tmp_path, source([alice], [alice], pin="0000")).find(uri(tmp_path)).sign(b"x")
    assert wrong.value.retries_left == 1
    with pytest.raises((Fido2PinInvalidError, Fido2PinBlockedError)):  # the last try
        provider(tmp_path, source([alice], [alice], pin="0000")).find(uri(tmp_path)).sign(b"x")
    with pytest.raises(Fido2PinBlockedError) as blocked:
        provider(tmp_path, source([alice], [alice])).find(uri(tmp_path)).sign(b"x")
    assert blocked.value.code == "pin_blocked"


def test_presence_denied_opens_nothing(tmp_path: Path) -> None:
    alice = Key("alice")
    provider(tmp_path, source([alice], [alice])).generate(uri(tmp_path), Algorithm.ES256)
    alice.presence.push(Presence.DENY)
    handle = provider(tmp_path, source([alice], [alice])).find(uri(tmp_path))
    with pytest.raises(PresenceDeniedError):
        handle.sign(b"x")
    assert handle._private is None


def test_touch_prompt_is_reported(tmp_path: Path) -> None:
    alice = Key("alice")
    messages: list[str] = []
    hmac = Fido2HmacSecret(
        [alice.recipient], on_touch=messages.append, devices=lambda: [alice.as_device()]
    )
    provider(tmp_path, hmac).generate(uri(tmp_path), Algorithm.ES256)
    assert messages and "Touch" in messages[0]


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["protection"]["recipients"][0].__setitem__("uv", True),
        lambda d: d["protection"]["recipients"][0].__setitem__("rp_id", "evil.example"),
        lambda d: d.__setitem__("version", 1),
        lambda d: d["protection"].__setitem__("recipients", []),
        lambda d: d["protection"]["recipients"][0].__setitem__("label", "../x"),
        lambda d: d["protection"].__setitem__("salt", "AAAA"),
    ],
)
def test_edited_files_are_refused(tmp_path: Path, edit: object) -> None:
    alice = Key("alice")
    provider(tmp_path, source([alice], [alice])).generate(uri(tmp_path), Algorithm.ES256)
    path = tmp_path / "grant-1.jkey"
    doc = json.loads(path.read_bytes())
    edit(doc)  # type: ignore[operator]
    path.write_bytes(keyfile.canonical_json(doc) + b"\n")
    handle = None
    with pytest.raises((KeystoreError, Fido2Error)):  # refused at load, unlock or unwrap
        handle = provider(tmp_path, source([alice], [alice])).find(uri(tmp_path))
        handle.sign(b"x")
    assert handle is None or handle._private is None


def test_passphrase_files_stay_version_1(tmp_path: Path) -> None:
    store = SoftwareProvider.open(
        f"soft:dir={tmp_path}", allow_extractable=True, passphrase_source=lambda: "pass phrase"
    )
    store.generate(uri(tmp_path), Algorithm.ES256)
    doc = json.loads((tmp_path / "grant-1.jkey").read_bytes())
    assert doc["version"] == 1
    doc["version"] = 2
    (tmp_path / "grant-1.jkey").write_bytes(keyfile.canonical_json(doc) + b"\n")
    with pytest.raises(KeystoreError, match="does not match its protection mode"):
        store.find(uri(tmp_path))
