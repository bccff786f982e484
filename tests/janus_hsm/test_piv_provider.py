"""The PIV provider through yubikit's real PivSession, on the virtual YubiKey in process."""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from yubikit.piv import MANAGEMENT_KEY_TYPE, OBJECT_ID, PIN_POLICY, SLOT, TOUCH_POLICY, PivSession

from hardware.virtual_piv import (
    DEFAULT_MANAGEMENT_KEY,
    VERSION_5_4,
    Presence,
    ScriptedTouch,
    VirtualPivApplet,
    VirtualYubiKey,
)
from janus_hsm.algorithms import Algorithm
from janus_hsm.attestation import verify_piv_attestation, yubico_roots
from janus_hsm.backends.piv import PivProvider, discovery
from janus_hsm.backends.piv import provider as piv_provider
from janus_hsm.errors import (
    AttestationKeyMismatchError,
    AttestationUnavailableError,
    AttestationUntrustedError,
    ExportRefusedError,
    ExtractableKeyError,
    KeyExistsError,
    KeyNotFoundError,
    ManagementKeyError,
    MechanismUnsupportedError,
    PinIncorrectError,
    PinLockedError,
    TokenLostError,
    UriError,
    UserPresenceTimeoutError,
)
from janus_hsm.provider import KeyHandle, KeyProvider, SignatureFormat

PIN = "123456"


@pytest.fixture
def yubikey() -> VirtualYubiKey:
    return VirtualYubiKey(piv=VirtualPivApplet(serial=12345678, touch_timeout=0.05))


@pytest.fixture
def provider(yubikey: VirtualYubiKey) -> Iterator[PivProvider]:
    with PivProvider.from_connection(yubikey.connect(), pin_source=lambda: PIN) as p:
        yield p  # type: ignore[misc]


def _verify(handle: KeyHandle, data: bytes, signature: bytes) -> None:
    public = handle.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, data)
        return
    assert isinstance(public, ec.EllipticCurvePublicKey)
    hash_alg = handle.algorithm.hash_algorithm
    assert hash_alg is not None
    from janus_hsm.provider import raw_to_der

    public.verify(raw_to_der(signature, handle.algorithm.coordinate_size), data, ec.ECDSA(hash_alg))


@pytest.mark.parametrize(
    ("slot", "alg"), [("9a", Algorithm.ES256), ("9c", Algorithm.ES384), ("82", Algorithm.EdDSA)]
)
def test_generate_sign_verify(provider: PivProvider, slot: str, alg: Algorithm) -> None:
    handle = provider.generate(f"piv:slot={slot}", alg)
    assert handle.uri == f"piv:serial=12345678;slot={slot}"
    assert handle.properties.custody_grade
    assert handle.properties.backend == "piv"
    data = b"the owner's key lives in hardware"
    signature = handle.sign(data)
    _verify(handle, data, signature)
    again = provider.find(handle.uri)
    assert again.public_key() == handle.public_key()
    if alg is not Algorithm.EdDSA:
        der = handle.sign(data, format=SignatureFormat.DER)
        public = handle.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(der, data, ec.ECDSA(alg.hash_algorithm))  # type: ignore[arg-type]


def test_slot_defaults_and_policies_are_reported(provider: PivProvider) -> None:
    sig = provider.generate("piv:slot=9c", Algorithm.ES256)
    assert (sig.properties.pin_policy, sig.properties.touch_policy) == ("always", "never")
    auth = provider.generate(
        "piv:slot=9a",
        Algorithm.ES256,
        pin_policy=PIN_POLICY.ONCE,
        touch_policy=TOUCH_POLICY.CACHED,
    )
    shown = provider.lookup(auth.uri)
    assert (shown.properties.pin_policy, shown.properties.touch_policy) == ("once", "cached")


def test_ecdh_equals_software_ecdh(provider: PivProvider) -> None:
    p256 = provider.generate("piv:slot=9d", Algorithm.ES256)
    peer = ec.generate_private_key(ec.SECP256R1())
    expected = peer.exchange(ec.ECDH(), p256.public_key())  # type: ignore[arg-type]
    assert p256.exchange(peer.public_key()) == expected
    x = provider.generate("piv:slot=83", Algorithm.X25519)
    peer_x = x25519.X25519PrivateKey.generate()
    assert x.exchange(peer_x.public_key()) == peer_x.exchange(x.public_key())  # type: ignore[arg-type]
    with pytest.raises(MechanismUnsupportedError):
        x.sign(b"x")


def test_list_and_delete(provider: PivProvider) -> None:
    assert provider.list_keys() == []
    provider.generate("piv:slot=9a", Algorithm.ES256)
    provider.generate("piv:slot=95", Algorithm.X25519)
    assert [h.uri for h in provider.list_keys()] == [
        "piv:serial=12345678;slot=9a",
        "piv:serial=12345678;slot=95",
    ]
    with pytest.raises(KeyExistsError):
        provider.generate("piv:slot=9a", Algorithm.ES256)
    provider.delete("piv:serial=12345678;slot=9a")
    assert [h.uri for h in provider.list_keys()] == ["piv:serial=12345678;slot=95"]
    with pytest.raises(KeyNotFoundError, match="holds no key"):
        provider.lookup("piv:slot=9a")


def test_uri_must_name_a_slot_of_this_card(provider: PivProvider) -> None:
    with pytest.raises(UriError, match="must name a slot"):
        provider.generate("piv:serial=12345678", Algorithm.ES256)
    with pytest.raises(UriError, match="serial 1"):
        provider.lookup("piv:serial=1;slot=9a")


def test_no_way_to_the_private_key(provider: PivProvider) -> None:
    handle = provider.generate("piv:slot=9a", Algorithm.ES256)
    public_api = {n for n in dir(handle) if not n.startswith("_")}
    assert not {n for n in public_api if "private" in n or "export" in n}
    for cls in (type(handle), KeyHandle, KeyProvider, PivProvider):
        assert not [n for n in vars(cls) if "export" in n or n == "private_bytes"]
    key = handle.as_cryptography_key()
    with pytest.raises(ExportRefusedError):
        key.private_numbers()  # type: ignore[union-attr]


def test_imported_key_is_not_custody_grade(yubikey: VirtualYubiKey, provider: PivProvider) -> None:
    session = PivSession(yubikey.connect())
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    session.put_key(SLOT.AUTHENTICATION, ec.generate_private_key(ec.SECP256R1()))
    shown = provider.lookup("piv:slot=9a")
    assert not shown.properties.custody_grade
    assert not shown.properties.local
    with pytest.raises(ExtractableKeyError, match="not generated on the device"):
        provider.find("piv:slot=9a")
    with pytest.raises(ExtractableKeyError):
        shown.sign(b"x")
    with pytest.raises(AttestationUnavailableError):
        shown.attest()
    with PivProvider.from_connection(
        yubikey.connect(), pin_source=lambda: PIN, allow_extractable=True
    ) as lenient:
        lenient.find("piv:slot=9a").sign(b"accepted at the caller's risk")


def test_25519_needs_firmware_5_7() -> None:
    old = VirtualYubiKey(piv=VirtualPivApplet(version=VERSION_5_4, serial=7))
    with PivProvider.from_connection(old.connect(), pin_source=lambda: PIN) as provider:
        with pytest.raises(MechanismUnsupportedError, match=r"5\.7"):
            provider.generate("piv:slot=9a", Algorithm.EdDSA)
        handle = provider.generate("piv:slot=9a", Algorithm.ES256)  # 3DES default key
        with pytest.raises(MechanismUnsupportedError, match="cannot delete"):
            provider.delete(handle.uri)


def test_wrong_pin_reports_retries_then_blocked_mentions_puk(yubikey: VirtualYubiKey) -> None:
    with PivProvider.from_connection(yubikey.connect(), pin_source=lambda: PIN) as good:
        handle = good.generate("piv:slot=9a", Algorithm.ES256)
    with PivProvider.from_connection(yubikey.connect(), pin_source=lambda: "654321") as bad:
        key = bad.find(handle.uri)
        with pytest.raises(PinIncorrectError) as first:
            key.sign(b"x")
        assert first.value.retries_left == 2
        assert "2 tries left" in str(first.value)
        with pytest.raises(PinIncorrectError) as second:
            key.sign(b"x")
        assert second.value.retries_left == 1
        with pytest.raises(PinLockedError, match="PUK") as locked:
            key.sign(b"x")
        assert "unblock-pin" in str(locked.value)
        assert locked.value.code == "pin_locked"
    with (
        PivProvider.from_connection(yubikey.connect(), pin_source=lambda: PIN) as good,
        pytest.raises(PinLockedError, match="PUK"),  # no try spent: metadata says 0
    ):
        good.find(handle.uri).sign(b"x")


def test_pin_policy_always_verifies_before_each_signature(yubikey: VirtualYubiKey) -> None:
    calls: list[int] = []

    def pin() -> str:
        calls.append(1)
        return PIN

    with PivProvider.from_connection(yubikey.connect(), pin_source=pin) as provider:
        always = provider.generate("piv:slot=9c", Algorithm.ES256)  # 9c: always
        once = provider.generate("piv:slot=9a", Algorithm.ES256, pin_policy=PIN_POLICY.ONCE)
        calls.clear()
        for _ in range(3):
            always.sign(b"x")
        assert len(calls) == 3
        calls.clear()
        for _ in range(3):
            once.sign(b"x")
        assert len(calls) <= 1


def test_touch_is_announced_and_timeout_is_typed(yubikey: VirtualYubiKey) -> None:
    prompts: list[str] = []
    touch = ScriptedTouch()
    yubikey.piv.touch = touch
    with PivProvider.from_connection(
        yubikey.connect(), pin_source=lambda: PIN, on_touch=prompts.append
    ) as provider:
        handle = provider.generate("piv:slot=9a", Algorithm.ES256, touch_policy=TOUCH_POLICY.ALWAYS)
        prompts.clear()
        handle.sign(b"approved")
        assert len(prompts) == 1 and "Touch your YubiKey" in prompts[0]
        touch.default = Presence.TIMEOUT
        with pytest.raises(UserPresenceTimeoutError, match="touch"):
            handle.sign(b"nobody there")
        assert UserPresenceTimeoutError.code == "presence_timeout"


def test_card_removed_mid_operation_is_typed_and_does_not_hang(yubikey: VirtualYubiKey) -> None:
    touch = ScriptedTouch(default=Presence.TIMEOUT)
    yubikey.piv.touch = touch
    yubikey.piv.touch_timeout = 30.0
    with PivProvider.from_connection(yubikey.connect(), pin_source=lambda: PIN) as provider:
        touch.default = Presence.APPROVE
        handle = provider.generate("piv:slot=9a", Algorithm.ES256, touch_policy=TOUCH_POLICY.ALWAYS)
        touch.default = Presence.TIMEOUT
        threading.Timer(0.2, yubikey.remove).start()
        with pytest.raises(TokenLostError, match="lost the connection"):
            handle.sign(b"pulled out while blinking")
        with pytest.raises(TokenLostError):
            handle.sign(b"still gone")


def test_default_management_key_warns(
    provider: PivProvider, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        provider.generate("piv:slot=9a", Algorithm.ES256)
    assert provider.default_management_key is True
    assert "FACTORY DEFAULT" in caplog.text


@pytest.mark.parametrize(
    "key_type",
    [
        MANAGEMENT_KEY_TYPE.TDES,
        MANAGEMENT_KEY_TYPE.AES128,
        MANAGEMENT_KEY_TYPE.AES192,
        MANAGEMENT_KEY_TYPE.AES256,
    ],
)
def test_management_key_types_from_env(
    yubikey: VirtualYubiKey, monkeypatch: pytest.MonkeyPatch, key_type: MANAGEMENT_KEY_TYPE
) -> None:
    key = bytes(range(1, key_type.key_len + 1))[::-1]
    session = PivSession(yubikey.connect())
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    session.set_management_key(key_type, key)
    with (
        PivProvider.from_connection(yubikey.connect(), pin_source=lambda: PIN) as provider,
        pytest.raises(ManagementKeyError, match="non-default management key"),
    ):
        provider.generate("piv:slot=9a", Algorithm.ES256)
    monkeypatch.setenv("JANUS_PIV_MANAGEMENT_KEY", "00" * key_type.key_len)
    with (
        PivProvider.from_connection(yubikey.connect(), pin_source=lambda: PIN) as provider,
        pytest.raises(ManagementKeyError, match="rejected"),
    ):
        provider.generate("piv:slot=9a", Algorithm.ES256)
    monkeypatch.setenv("JANUS_PIV_MANAGEMENT_KEY", key.hex())
    with PivProvider.from_connection(yubikey.connect(), pin_source=lambda: PIN) as provider:
        provider.generate("piv:slot=9a", Algorithm.ES256).sign(b"x")
        assert provider.default_management_key is False


def test_management_key_from_file(yubikey: VirtualYubiKey, tmp_path: object) -> None:
    from pathlib import Path

    key = bytes(range(32))
    session = PivSession(yubikey.connect())
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    session.set_management_key(MANAGEMENT_KEY_TYPE.AES256, key)
    path = Path(str(tmp_path)) / "mgm"
    path.write_text(key.hex() + "\n")
    path.chmod(0o600)
    uri = f"piv:slot=9e?management-key-source=file:{path}"
    with PivProvider.from_connection(yubikey.connect(), uri=uri, pin_source=lambda: PIN) as p:
        handle = p.generate(uri, Algorithm.ES256)
        assert handle.properties.pin_policy == "never"  # 9e's default
        assert "management-key-source" not in handle.uri


def test_pin_protected_management_key(yubikey: VirtualYubiKey) -> None:
    from ykman.piv import pivman_set_mgm_key

    session = PivSession(yubikey.connect())
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    session.verify_pin(PIN)
    pivman_set_mgm_key(session, bytes(range(24)), MANAGEMENT_KEY_TYPE.AES192, store_on_device=True)
    with PivProvider.from_connection(yubikey.connect(), pin_source=lambda: PIN) as provider:
        provider.generate("piv:slot=9a", Algorithm.ES256).sign(b"x")
        assert provider.default_management_key is False


def test_attestation_verifies_under_the_virtual_root_only(
    yubikey: VirtualYubiKey, provider: PivProvider
) -> None:
    handle = provider.generate("piv:slot=9c", Algorithm.ES256, touch_policy=TOUCH_POLICY.CACHED)
    evidence = handle.attest()
    assert evidence.format == "yubikey-piv"
    assert evidence.details["serial"] == 12345678
    assert evidence.details["touch_policy"] == "cached"
    root = yubikey.piv.attestation_root_certificate
    result = verify_piv_attestation(
        evidence.certificates, roots=[root], expected_public_key=handle.public_key()
    )
    assert (result.serial, result.slot, result.pin_policy) == (12345678, "9c", "always")
    assert result.firmware == "5.7.2"
    with pytest.raises(AttestationUntrustedError):
        verify_piv_attestation(evidence.certificates, roots=yubico_roots())
    other = provider.generate("piv:slot=9a", Algorithm.ES256)
    from janus_hsm.errors import AttestationKeyMismatchError

    with pytest.raises(AttestationKeyMismatchError):
        verify_piv_attestation(
            evidence.certificates, roots=[root], expected_public_key=other.public_key()
        )


def test_one_lock_per_card_under_threads(provider: PivProvider) -> None:
    handle = provider.generate("piv:slot=9a", Algorithm.ES256, pin_policy=PIN_POLICY.ONCE)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for i in range(5):
                data = f"{threading.get_ident()}-{i}".encode()
                _verify(handle, data, handle.sign(data))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_certificate_is_stored_for_cards_without_metadata(
    yubikey: VirtualYubiKey, provider: PivProvider
) -> None:
    handle = provider.generate("piv:slot=9d", Algorithm.X25519)
    cert = PivSession(yubikey.connect()).get_certificate(SLOT.KEY_MANAGEMENT)
    assert cert.public_key() == handle.public_key()
    signed = provider.generate("piv:slot=9a", Algorithm.ES256)
    cert = PivSession(yubikey.connect()).get_certificate(SLOT.AUTHENTICATION)
    public = signed.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))


TOUCH_POLICY_TOML = """
version = 1

[[rule]]
name = "touch-to-grant"
audiences = ["*"]
abilities = [{ can = "sign/*", with = "janus:payments/*" }]
max_ttl = "1h"
max_uses = 10
require = ["touch"]
"""


def test_a_touch_always_slot_satisfies_the_policys_touch_requirement(
    yubikey: VirtualYubiKey, provider: PivProvider
) -> None:
    # The card refuses to sign without a touch, so `touch` needs no caller declaration;
    # a slot that would sign untouched still does.
    from policies.abilities import Ability
    from policies.errors import PolicyViolationError
    from policies.issue import grant
    from policies.policy import IssuancePolicy

    policy = IssuancePolicy.loads(TOUCH_POLICY_TOML)
    pay = [Ability("janus:payments/eur", "sign/payment")]
    holder = "did:key:z6MkocFtYeZEXmXbjgtyEx7kgMaDoKgpdpdvd6131Azgdrjy"
    touched = ScriptedTouch()
    yubikey.piv.touch = touched
    always = provider.generate("piv:slot=9c", Algorithm.ES256, touch_policy=TOUCH_POLICY.ALWAYS)
    before = len(touched.requests)  # generating signed the slot's certificate: a touch
    bundle = grant(always, audience=holder, abilities=pay, ttl_seconds=60, uses=1, policy=policy)
    assert bundle.leaf.issuer == always.did
    assert [r.operation for r in touched.requests[before:]] == ["sign"]  # one touch to grant

    for policy_name in (TOUCH_POLICY.NEVER, TOUCH_POLICY.CACHED):
        untouched = provider.generate("piv:slot=9a", Algorithm.ES256, touch_policy=policy_name)
        with pytest.raises(PolicyViolationError, match="touch"):
            grant(untouched, audience=holder, abilities=pay, ttl_seconds=60, uses=1, policy=policy)
        provider.delete("piv:slot=9a")


# --- firmware without metadata: the slot certificate is not the key ---------------------

VERSION_5_2 = (5, 2, 7)


def _certificate_for(key: ec.EllipticCurvePrivateKey, name: str = "whoever") -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


def _admin(key: VirtualYubiKey) -> PivSession:
    """What anyone holding the card and the (public) default management key can do."""
    session = PivSession(key.connect())
    session.authenticate(DEFAULT_MANAGEMENT_KEY)
    return session


def test_old_firmware_refuses_a_replaced_slot_certificate() -> None:
    """Before 5.3 the certificate is writable by anyone with the management key: the key
    Janus reports must be the attested one, and a certificate for another key refused."""
    old = VirtualYubiKey(piv=VirtualPivApplet(version=VERSION_5_2, serial=5270001))
    with PivProvider.from_connection(old.connect(), pin_source=lambda: PIN) as provider:
        genuine = provider.generate("piv:slot=9d", Algorithm.ES256)
        assert provider.lookup("piv:slot=9d").public_key() == genuine.public_key()
        attacker = ec.generate_private_key(ec.SECP256R1())
        _admin(old).put_certificate(SLOT.KEY_MANAGEMENT, _certificate_for(attacker))
        with pytest.raises(AttestationKeyMismatchError, match="slot certificate"):
            provider.lookup("piv:slot=9d")
        with pytest.raises(AttestationKeyMismatchError):
            provider.find("piv:slot=9d")
        with pytest.raises(AttestationKeyMismatchError):
            provider.list_keys()


def test_old_firmware_takes_the_public_key_from_the_attestation() -> None:
    old = VirtualYubiKey(piv=VirtualPivApplet(version=VERSION_5_2, serial=5270002))
    with PivProvider.from_connection(old.connect(), pin_source=lambda: PIN) as provider:
        genuine = provider.generate("piv:slot=9a", Algorithm.ES256)
        _admin(old).delete_certificate(SLOT.AUTHENTICATION)  # no certificate: still found
        shown = provider.find("piv:slot=9a")
        assert shown.public_key() == genuine.public_key()
        assert shown.properties.custody_grade
        _verify(shown, b"attested", shown.sign(b"attested"))


def test_old_firmware_unattestable_key_is_not_custody_grade(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = VirtualYubiKey(piv=VirtualPivApplet(version=VERSION_5_2, serial=5270003))
    imported = ec.generate_private_key(ec.SECP256R1())
    admin = _admin(old)
    admin.put_key(SLOT.AUTHENTICATION, imported)
    admin.put_certificate(SLOT.AUTHENTICATION, _certificate_for(imported))
    with (
        caplog.at_level(logging.WARNING),
        PivProvider.from_connection(old.connect(), pin_source=lambda: PIN) as provider,
    ):
        shown = provider.lookup("piv:slot=9a")
        assert shown.slot_info.generated is None
        assert not shown.properties.custody_grade
        with pytest.raises(ExtractableKeyError):
            provider.find("piv:slot=9a")
    assert "cannot attest" in caplog.text and "slot certificate" in caplog.text


# --- the management key from the environment ----------------------------------------------


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_management_key_variable_is_an_error(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Set but empty is a mistake, not "use the card's key" (or the factory default)."""
    old = VirtualYubiKey(piv=VirtualPivApplet(version=VERSION_5_2, serial=5270004))
    monkeypatch.setenv("JANUS_PIV_MANAGEMENT_KEY", value)
    with (
        PivProvider.from_connection(old.connect(), pin_source=lambda: PIN) as provider,
        pytest.raises(ManagementKeyError, match="JANUS_PIV_MANAGEMENT_KEY is set but empty"),
    ):
        provider.generate("piv:slot=9a", Algorithm.ES256)
    assert old.piv._keys.get(0x9A) is None


# --- cards opened by discovery: per-provider PIN sources, reconnect identity ---------------

DISCOVERED = 86420135


@pytest.fixture
def discovered(monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualYubiKey]:
    """A virtual YubiKey that ``PivProvider.open`` finds (only find_card is replaced)."""
    key = VirtualYubiKey(piv=VirtualPivApplet(serial=DISCOVERED))
    info = discovery.CardInfo(f"Virtual YubiKey {id(key)}", DISCOVERED, "5.7.2")

    def find_card(*, serial: int | None, reader: str | None) -> Any:
        return info, key.connect

    monkeypatch.setattr(discovery, "find_card", find_card)
    yield key
    piv_provider._cards.pop(info.reader, None)


def test_a_second_open_keeps_each_providers_pin_source_and_touch_prompt(
    discovered: VirtualYubiKey,
) -> None:
    uri = f"piv:serial={DISCOVERED}"
    first_prompts: list[str] = []
    second_prompts: list[str] = []
    second_pins: list[int] = []

    def wrong_pin() -> str:
        second_pins.append(1)
        return "000000"

    first = PivProvider.open(uri, pin_source=lambda: PIN, on_touch=first_prompts.append)
    try:
        # 9c: PIN "always", so every signature verifies the PIN anew.
        handle = first.generate(f"{uri};slot=9c", Algorithm.ES256, touch_policy=TOUCH_POLICY.ALWAYS)
        second = PivProvider.open(uri, pin_source=wrong_pin, on_touch=second_prompts.append)
        assert second.card is first.card  # one card, one lock
        first_prompts.clear()
        _verify(handle, b"first", handle.sign(b"first"))
        assert second_pins == [] and second_prompts == []
        assert len(first_prompts) == 1
        assert discovered.piv._pin_left == 3  # no try spent with the other provider's PIN
        with pytest.raises(PinIncorrectError):
            second.lookup(f"{uri};slot=9c").sign(b"second")
        assert second_pins == [1] and len(second_prompts) == 0
    finally:
        first.close()


def test_open_does_not_wait_for_a_busy_card(discovered: VirtualYubiKey) -> None:
    uri = f"piv:serial={DISCOVERED}"
    first = PivProvider.open(uri, pin_source=lambda: PIN)
    held, release = threading.Event(), threading.Event()

    def busy() -> None:  # e.g. a signature waiting for a touch
        with first.card.lock:
            held.set()
            release.wait(10)

    opened: list[PivProvider] = []
    worker = threading.Thread(target=busy)
    worker.start()
    held.wait(5)
    opener = threading.Thread(
        target=lambda: opened.append(PivProvider.open(uri, pin_source=lambda: PIN))
    )
    opener.start()
    opener.join(2)
    try:
        assert opened, "open() waited for a card busy with another operation"
    finally:
        release.set()
        worker.join()
        opener.join()
        first.close()


class _Reader:
    """A PC/SC reader as ykman.pcsc lists it, holding whichever virtual card the test puts in."""

    def __init__(self, name: str, key: VirtualYubiKey) -> None:
        self.fingerprint = name
        self.key = key

    def open_connection(self, kind: object) -> object:
        if self.key.card.removed:
            raise ConnectionError("no card in the reader")
        return self.key.connect()


#: Firmware before 5.0 reports no serial, like a PIV card of another maker.
NO_SERIAL = (4, 3, 5)


def _with_key_in_9a(key: VirtualYubiKey) -> VirtualYubiKey:
    with PivProvider.from_connection(key.connect(), pin_source=lambda: PIN) as provider:
        provider.generate("piv:slot=9a", Algorithm.ES256, pin_policy=PIN_POLICY.ONCE)
    return key


def _with_chuid(key: VirtualYubiKey, guid: bytes) -> VirtualYubiKey:
    chuid = bytes.fromhex("3019d4e739da739ced39ce739d836858210842108421c84210c3eb") + (
        b"\x34\x10" + guid + b"\x35\x08" + b"20301231" + b"\x3e\x00\xfe\x00"
    )
    _admin(key).put_object(OBJECT_ID.CHUID, chuid)
    return key


@pytest.fixture
def reader(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[VirtualYubiKey], _Reader]]:
    names: list[str] = []

    def plug(key: VirtualYubiKey) -> _Reader:
        device = _Reader(f"Virtual Reader {len(names)}", key)
        names.append(device.fingerprint)
        monkeypatch.setattr(discovery, "_readers", lambda: [device])
        return device

    yield plug
    for name in names:
        piv_provider._cards.pop(name, None)


def _serial_less(identity: str) -> VirtualYubiKey:
    key = VirtualYubiKey(piv=VirtualPivApplet(version=NO_SERIAL))
    if identity == "keys":
        return _with_key_in_9a(key)
    return _with_chuid(_with_key_in_9a(key), secrets.token_bytes(16))


@pytest.mark.parametrize("identity", ["keys", "chuid"])
def test_reconnect_refuses_another_card_without_serial(
    reader: Callable[[VirtualYubiKey], _Reader], identity: str
) -> None:
    card_a, card_b = _serial_less(identity), _serial_less(identity)
    device = reader(card_a)
    pins: list[int] = []

    def pin() -> str:
        pins.append(1)
        return PIN

    provider = PivProvider.open(
        f"piv:reader={device.fingerprint.replace(' ', '%20')}", pin_source=pin
    )
    try:
        assert provider.card_uri.startswith("piv:reader=")
        handle = provider.find(f"{provider.card_uri};slot=9a")
        handle.sign(b"the card first opened")
        card_a.remove()
        with pytest.raises(TokenLostError, match="lost the connection"):
            handle.sign(b"pulled")  # signatures are not retried on a new connection
        device.key = card_b  # another card in the same reader
        pins.clear()
        with pytest.raises(TokenLostError, match="another card"):
            handle.sign(b"after the swap")
        assert pins == []  # the PIN never went to the other card
        assert card_b.piv._pin_left == 3
    finally:
        provider.close()


@pytest.mark.parametrize("identity", ["keys", "chuid"])
def test_reconnect_to_the_same_card_without_serial(
    reader: Callable[[VirtualYubiKey], _Reader], identity: str
) -> None:
    card = _serial_less(identity)
    device = reader(card)
    provider = PivProvider.open(
        f"piv:reader={device.fingerprint.replace(' ', '%20')}", pin_source=lambda: PIN
    )
    try:
        handle = provider.find(f"{provider.card_uri};slot=9a")
        handle.sign(b"before")
        card.remove()
        with pytest.raises(TokenLostError, match="lost the connection"):
            handle.sign(b"pulled")
        card.insert()  # put back (or a USB reset, a pcscd restart)
        _verify(handle, b"after", handle.sign(b"after"))
    finally:
        provider.close()


def test_reconnect_refuses_a_card_with_nothing_to_recognise_it_by(
    reader: Callable[[VirtualYubiKey], _Reader],
) -> None:
    blank = VirtualYubiKey(piv=VirtualPivApplet(version=NO_SERIAL))
    device = reader(blank)
    pins: list[int] = []
    provider = PivProvider.open(
        f"piv:reader={device.fingerprint.replace(' ', '%20')}",
        pin_source=lambda: pins.append(1) or PIN,  # type: ignore[func-returns-value]
    )
    try:
        handle = provider.generate(f"{provider.card_uri};slot=9a", Algorithm.ES256)
        blank.remove()
        with pytest.raises(TokenLostError, match="lost the connection"):
            handle.sign(b"pulled")
        device.key = VirtualYubiKey(piv=VirtualPivApplet(version=NO_SERIAL))
        pins.clear()
        with pytest.raises(TokenLostError, match="nothing tells"):
            handle.sign(b"which card is this?")
        assert pins == []
    finally:
        provider.close()
