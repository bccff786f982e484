"""Per-device FIDO2 PINs: one PIN never goes to two keys, and errors name the right variable."""

from __future__ import annotations

import pytest
from fido2.client import PinRequiredError

from hardware.fido2_authenticator import SoftwareAuthenticator
from janus_hsm.errors import PinUnavailableError
from janus_hsm.fido2.devices import Fido2Device
from janus_hsm.fido2.errors import Fido2SharedPinError, from_fido2_exception
from janus_hsm.fido2.pins import DevicePins


def two_devices() -> tuple[Fido2Device, Fido2Device]:
    return (
        Fido2Device.in_process(SoftwareAuthenticator(), "first key"),
        Fido2Device.in_process(SoftwareAuthenticator(), "second key"),
    )


def test_an_environment_pin_goes_to_one_device_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JANUS_FIDO2_PIN", "1234")
    first, second = two_devices()
    pins = DevicePins(interactive=False)
    assert pins.fixed
    assert pins.for_device(first)() == "1234"
    assert pins.for_device(first)() == "1234"  # the same device again is fine
    with pytest.raises(Fido2SharedPinError, match="another authenticator"):
        pins.for_device(second)()


def test_janus_pin_is_never_a_fido2_pin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JANUS_FIDO2_PIN", raising=False)
    monkeypatch.setenv("JANUS_PIN", "the keystore passphrase")
    first, _ = two_devices()
    with pytest.raises(PinUnavailableError, match="JANUS_FIDO2_PIN"):
        DevicePins(interactive=False).for_device(first)()


def test_prompts_name_the_device_and_are_cached_per_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("JANUS_FIDO2_PIN", raising=False)
    asked: list[str] = []
    answers = iter(["pin-one", "pin-two"])

    def prompt(text: str) -> str:
        asked.append(text)
        return next(answers)

    first, second = two_devices()
    pins = DevicePins(interactive=True, prompt=prompt)
    assert pins.for_device(first, lambda: "aaguid-1")() == "pin-one"
    assert pins.for_device(second)() == "pin-two"
    assert pins.for_device(first)() == "pin-one"  # cached for that device, not re-asked
    assert len(asked) == 2
    assert "first key" in asked[0] and "AAGUID aaguid-1" in asked[0]
    assert "second key" in asked[1]


def test_a_fixed_pin_for_several_devices_is_refused_up_front(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("JANUS_FIDO2_PIN", "1234")
    pins = DevicePins(interactive=False)
    pins.check_one_device({"a"}, "sealing")
    with pytest.raises(Fido2SharedPinError, match="JANUS_FIDO2_PIN"):
        pins.check_one_device({"a", "b"}, "sealing")


def test_pin_required_names_the_fido2_variable() -> None:
    message = str(from_fido2_exception(PinRequiredError(), doing="registering"))
    assert "JANUS_FIDO2_PIN" in message
    assert "JANUS_PIN " not in message and "JANUS_PIN or" not in message
