"""`janus keys` on piv: URIs, in process, with discovery pointed at the virtual YubiKey.

Only PC/SC discovery is replaced (``find_card``); URI parsing, the provider, yubikit and
the card are the real ones.  The PC/SC tier (pcscd + vpcd) exercises discovery itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from agent.cli import main
from hardware.virtual_piv import Presence, ScriptedTouch, VirtualPivApplet, VirtualYubiKey
from janus_hsm.backends.piv import discovery
from janus_hsm.backends.piv import provider as piv_provider
from janus_hsm.public_keys import from_did_key

SERIAL = 23456789


@pytest.fixture
def yubikey(monkeypatch: pytest.MonkeyPatch) -> Iterator[VirtualYubiKey]:
    key = VirtualYubiKey(piv=VirtualPivApplet(serial=SERIAL, touch_timeout=0.05))
    info = discovery.CardInfo(reader=f"Virtual YubiKey {id(key)}", serial=SERIAL, version="5.7.2")

    def find_card(*, serial: int | None, reader: str | None) -> Any:
        assert serial in (None, SERIAL)
        return info, key.connect

    monkeypatch.setattr(discovery, "find_card", find_card)
    monkeypatch.setenv("JANUS_PIN", "123456")
    yield key
    piv_provider._cards.pop(info.reader, None)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    try:
        return code, json.loads(out), err
    except json.JSONDecodeError:
        return code, out, err


def test_generate_show_list_sign_delete(
    yubikey: VirtualYubiKey, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"piv:serial={SERIAL};slot=9a"
    code, info, err = run(
        capsys, "keys", "generate", uri, "--alg", "ES256", "--pin-policy", "once", "--json"
    )
    assert code == 0, err
    assert info["uri"] == uri and info["custody_grade"] is True
    assert info["policies"] == {"pin": "once", "touch": "never"}
    assert "FACTORY DEFAULT" in err and info["warnings"]
    assert from_did_key(info["did"])
    code, shown, _ = run(capsys, "keys", "show", uri, "--json")
    assert shown["did"] == info["did"]
    code, listed, _ = run(capsys, "keys", "list", f"piv:serial={SERIAL}", "--json")
    assert [k["uri"] for k in listed] == [uri]
    code, signed, err = run(capsys, "keys", "sign", uri, "--in", "/dev/null", "--json")
    assert code == 0, err and signed["alg"] == "ES256"
    code, _, err = run(capsys, "keys", "delete", uri, "--yes", "--json")
    assert code == 0, err
    code, listed, _ = run(capsys, "keys", "list", f"piv:serial={SERIAL}", "--json")
    assert listed == []


def test_policy_options_are_piv_only(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "keys", "generate", "soft:/tmp/x;object=a", "--alg", "ES256", "--pin-policy", "once"
    )
    assert code == 1 and "piv: keys only" in err


def test_touch_prompt_goes_to_stderr_and_timeout_is_an_error(
    yubikey: VirtualYubiKey, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"piv:serial={SERIAL};slot=9c"
    code, _, err = run(
        capsys, "keys", "generate", uri, "--alg", "EdDSA", "--touch-policy", "always", "--json"
    )
    assert code == 0, err
    assert "Touch your YubiKey" in err
    yubikey.piv.touch = ScriptedTouch(default=Presence.TIMEOUT)
    code, result, err = run(capsys, "keys", "sign", uri, "--in", "/dev/null", "--json")
    assert code == 1
    assert "Touch your YubiKey" in err
    assert "presence_timeout" in json.dumps(result) + err
    assert "none came in time" in json.dumps(result) + err


def test_attest_json_verifies_only_with_the_trusted_root(
    yubikey: VirtualYubiKey, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    uri = f"piv:serial={SERIAL};slot=9d"
    assert run(capsys, "keys", "generate", uri, "--alg", "ES256", "--json")[0] == 0
    code, result, _ = run(capsys, "keys", "attest", uri, "--json")
    assert code == 1  # Yubico's roots do not cover the virtual card
    assert result["verification"]["verified"] is False
    assert result["verification"]["error"] == "attestation_untrusted"
    root = tmp_path / "root.pem"
    root.write_bytes(
        yubikey.piv.attestation_root_certificate.public_bytes(serialization.Encoding.PEM)
    )
    code, result, _ = run(capsys, "keys", "attest", uri, "--json", "--trust-root", str(root))
    assert code == 0
    assert result["generated_on_device"] is True
    assert result["verification"]["serial"] == SERIAL
    assert "CN=Janus Virtual PIV Test Root" in result["verification"]["root"]
    assert len(result["certificates"]) == 2


def test_attested_root_grant_and_verifiers_that_require_it(
    yubikey: VirtualYubiKey, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    root = f"piv:serial={SERIAL};slot=9c"
    code, _, err = run(capsys, "keys", "generate", root, "--alg", "ES256", "--json")
    assert code == 0, err
    test_root = tmp_path / "virtual-root.pem"
    test_root.write_bytes(
        yubikey.piv.attestation_root_certificate.public_bytes(serialization.Encoding.PEM)
    )
    holder = "did:key:z6MkocFtYeZEXmXbjgtyEx7kgMaDoKgpdpdvd6131Azgdrjy"
    common = ("--to", holder, "--can", "sign/payment", "--with", "janus:payments/eur")
    limits = ("--ttl", "10m", "--uses", "5", "--json")
    attested, plain = tmp_path / "attested.json", tmp_path / "plain.json"
    code, _, err = run(capsys, "grant", "--issuer", root, *common, *limits,
                             "--attach-attestation", "--out", str(attested))  # fmt: skip
    assert code == 0, err
    code, _, err = run(capsys, "grant", "--issuer", root, *common, *limits, "--out", str(plain))
    assert code == 0, err

    def verify(bundle: Path, *extra: str) -> tuple[int, Any]:
        code, out, _ = run(capsys, "verify", str(bundle), *extra, "--json")
        return code, out

    trusted = ("--require-attestation", "--trust-root", str(test_root))
    code, out = verify(attested, *trusted)
    assert code == 0 and out["valid"] is True, out
    # Yubico's roots alone do not vouch for the virtual card; no attestation at all, or
    # --trust-root without --require-attestation, are refused too.
    code, out = verify(attested, "--require-attestation")
    assert code != 0 and out["error"]["code"] == "root_not_attested", out
    code, out = verify(plain, *trusted)
    assert code != 0 and out["error"]["code"] == "root_not_attested", out
    code, out = verify(plain)
    assert code == 0 and out["valid"] is True
    code, _, err = run(capsys, "verify", str(plain), "--trust-root", str(test_root))
    assert code != 0 and "--require-attestation" in err
