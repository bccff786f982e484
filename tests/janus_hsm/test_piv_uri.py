"""piv: URIs: the grammar, canonical printing, and refusals that name the bad part."""

from __future__ import annotations

import pytest
from yubikit.piv import SLOT

from janus_hsm import uri_scheme
from janus_hsm.backends.piv.uri import KEY_SLOTS, PivUri, parse_slot
from janus_hsm.errors import UriError


def test_serial_and_slot() -> None:
    uri = PivUri.parse("piv:serial=12345678;slot=9c")
    assert uri.serial == 12345678
    assert uri.slot is SLOT.SIGNATURE
    assert uri.reader is None
    assert str(uri) == "piv:serial=12345678;slot=9c"


def test_reader_is_percent_decoded_and_round_trips() -> None:
    text = "piv:reader=Yubico%20YubiKey%20OTP%2BFIDO%2BCCID%2000%2000;slot=9a"
    uri = PivUri.parse(text)
    assert uri.reader == "Yubico YubiKey OTP+FIDO+CCID 00 00"
    assert uri.slot is SLOT.AUTHENTICATION
    assert PivUri.parse(str(uri)) == uri


def test_query_sources() -> None:
    uri = PivUri.parse(
        "piv:serial=1;slot=82?pin-source=file:/run/pin&management-key-source=/run/mgm"
    )
    assert uri.pin_source == "file:/run/pin"
    assert uri.management_key_source == "/run/mgm"
    assert PivUri.parse(str(uri)) == uri
    # The handle URI keeps only card and slot: no paths to secrets.
    assert str(uri.public()) == "piv:serial=1;slot=82"


@pytest.mark.parametrize("slot", ["9a", "9C", "0x9d", "9e", "82", "95", "signature"])
def test_every_key_slot_parses(slot: str) -> None:
    assert parse_slot(slot) in KEY_SLOTS


def test_all_24_key_slots() -> None:
    assert len(KEY_SLOTS) == 24
    assert SLOT.ATTESTATION not in KEY_SLOTS


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("piv:serial=1;slot=f9", "slot= is not a PIV key slot"),
        ("piv:serial=1;slot=96", "slot= is not a PIV key slot"),
        ("piv:serial=1;slot=81", "slot= is not a PIV key slot"),
        ("piv:serial=abc;slot=9a", "serial= must be a decimal number"),
        ("piv:serial=1;label=x", "unknown piv: URI path attribute 'label'"),
        ("piv:serial=1?module-path=/x", "unknown piv: URI query attribute 'module-path'"),
        ("piv:serial=1;slot=9a;slot=9c", "'slot' appears twice"),
        ("piv:serial=1;pin-source=/x", "'pin-source' is a query attribute"),
        ("piv:serial=1?slot=9a", "'slot' is a path attribute"),
        ("piv:serial", "'serial' without '='"),
        ("piv:serial=1?pin-source=relative", "pin-source"),
        ("piv:serial=1?management-key-source=https://x", "pin-source"),
        ("pkcs11:token=x", "'pkcs11:'"),
    ],
)
def test_refusals_name_the_offending_attribute(text: str, fragment: str) -> None:
    with pytest.raises(UriError) as info:
        PivUri.parse(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "piv:slot=9c;pin%2Dvalue=hunter2",
        "piv:slot=9c;PIN-VALUE=hunter2",
        "piv:slot=9c?Management_Key=hunter2",
        "piv:slot=hunter2",
        "piv:serial=hunter2",
        "piv:reader=hunter2;reader=hunter2",
        "piv:slot=9c;hunter2=hunter2x",
        "piv:slot=9c?pin-source=hunter2",
    ],
)
def test_refusals_never_repeat_a_value(text: str) -> None:
    with pytest.raises(UriError) as info:
        PivUri.parse(text)
    assert "hunter2x" not in str(info.value)
    assert "=hunter2" not in str(info.value)


def test_slot_errors_do_not_repeat_the_value() -> None:
    with pytest.raises(UriError) as info:
        parse_slot("hunter2")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("secret", ["pin-value=123456", "pin=123456", "management-key=01"])
def test_secrets_are_refused(secret: str) -> None:
    with pytest.raises(UriError, match="secrets in a URI leak"):
        PivUri.parse(f"piv:serial=1;slot=9a?{secret}")


def test_reader_characters_must_be_encoded() -> None:
    with pytest.raises(UriError, match="must be percent-encoded"):
        PivUri.parse("piv:reader=Yubico YubiKey;slot=9a")


def test_scheme_is_registered() -> None:
    assert uri_scheme("piv:serial=1;slot=9a") == "piv"


@pytest.mark.parametrize(
    "serial",
    [
        "%D9%A1%D9%A2%D9%A3",  # Arabic-Indic digits one two three: not 123
        "%C2%B2",  # superscript two: isdigit() but not int()able
        "%EF%BC%91",  # fullwidth digit one
        "4294967296",  # beyond the 32-bit serial a YubiKey reports
        "",
    ],
)
def test_serial_is_ascii_decimal_within_bounds(serial: str) -> None:
    with pytest.raises(UriError, match="serial="):
        PivUri.parse(f"piv:serial={serial};slot=9a")


def test_largest_serial_parses() -> None:
    assert PivUri.parse("piv:serial=4294967295").serial == 4294967295
