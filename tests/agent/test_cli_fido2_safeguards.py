"""FIDO2 safeguards through the CLI: a PIN per security key, the test-only device fence,
what an approver is shown, locked registry writes, the warning on removing a credential.

Same software authenticators as tests/agent/test_cli_fido2.py (the ``cli`` fixture).
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from fido2.ctap2.base import Ctap2
from fido2.ctap2.pin import ClientPin

from hardware.fido2_authenticator import SoftwareAuthenticator
from janus_hsm.fido2 import devices
from janus_hsm.fido2.authenticator import Authenticator
from janus_hsm.fido2.devices import Fido2Device
from policies.approvals import ApproverSet
from policies.errors import FormatError
from tests.agent.test_cli_fido2 import Cli


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(tmp_path, capsys, monkeypatch)


PINS = {"primary": "1111-primary", "backup": "2222-backup", "alice": "3333", "bob": "4444"}


def with_pin(cli: Cli, name: str) -> None:
    device = SoftwareAuthenticator(state_path=cli.key(name))
    ClientPin(Ctap2(device)).set_pin(PINS[name])


def retries(cli: Cli, name: str) -> int:
    device = SoftwareAuthenticator(state_path=cli.key(name))
    return int(ClientPin(Ctap2(device)).get_pin_retries()[0])


def register(cli: Cli, name: str, *extra: str) -> None:
    """Register on one key, with that key's own PIN in JANUS_FIDO2_PIN (and in JANUS_PIN,
    which FIDO2 code must ignore, only so this setup also runs on the code before the fix
    and the tests below fail for the reason they test)."""
    cli.connect(name)
    cli.mp.setenv("JANUS_FIDO2_PIN", PINS[name])
    cli.mp.setenv("JANUS_PIN", PINS[name])
    cli.ok(*cli.fido2("register", name, *extra))
    cli.mp.delenv("JANUS_FIDO2_PIN")
    cli.mp.delenv("JANUS_PIN")
    cli.connect()


def terminal(cli: Cli, answers: dict[str, str]) -> list[str]:
    """Pretend stdin is a terminal; answer each PIN prompt by the device it names."""
    prompts: list[str] = []

    def getpass(prompt: str) -> str:
        prompts.append(prompt)
        return next(pin for name, pin in answers.items() if f"{name}.authenticator" in prompt)

    cli.mp.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    cli.mp.setattr("getpass.getpass", getpass)
    return prompts


# ------------------------------------------------------------------ one PIN per key


def sealed_pair(cli: Cli) -> tuple[str, tuple[str, ...]]:
    for name in ("primary", "backup"):
        with_pin(cli, name)
        register(cli, name, "--purpose", "keystore")
    uri = f"{cli.store};object=vault-key"
    args = ("keys", "generate", uri, "--alg", "ES256", "--allow-extractable")
    reg = ("--registry-dir", str(cli.registry))
    return uri, (*args, *reg, "--fido2-credential", "primary", "--fido2-credential", "backup")


def test_one_environment_pin_is_not_sent_to_a_second_key(cli: Cli) -> None:
    _, generate = sealed_pair(cli)
    cli.connect("primary", "backup")
    cli.mp.setenv("JANUS_FIDO2_PIN", PINS["primary"])
    out = cli.fails("shared_pin_refused", *generate)
    assert "JANUS_FIDO2_PIN" in out["error"]["message"]
    assert retries(cli, "backup") == 8 and retries(cli, "primary") == 8
    assert not list((cli.tmp / "keys").glob("vault-key*"))


def test_each_key_is_prompted_for_its_own_pin(cli: Cli) -> None:
    _, generate = sealed_pair(cli)
    cli.connect("primary", "backup")
    prompts = terminal(cli, {"primary": PINS["primary"], "backup": PINS["backup"]})
    assert cli.ok(*generate)["backend"] == "software"
    assert len(prompts) == 2
    assert "primary.authenticator" in prompts[0] and "backup.authenticator" in prompts[1]
    assert all("AAGUID" in p for p in prompts)
    assert retries(cli, "backup") == 8 and retries(cli, "primary") == 8


def test_rewrap_with_one_environment_pin_for_two_keys_is_refused(cli: Cli) -> None:
    uri, generate = sealed_pair(cli)
    cli.connect("primary", "backup")
    terminal(cli, {"primary": PINS["primary"], "backup": PINS["backup"]})
    cli.ok(*generate)
    cli.mp.setattr(sys.stdin, "isatty", lambda: False, raising=False)
    with_pin(cli, "alice")
    register(cli, "alice", "--purpose", "keystore")
    cli.connect("primary", "alice")
    cli.mp.setenv("JANUS_FIDO2_PIN", PINS["primary"])
    reg = ("--registry-dir", str(cli.registry))
    cli.fails("shared_pin_refused", "keys", "rewrap", uri, "--add", "alice", *reg)
    assert retries(cli, "alice") == 8


def approvers_with_pins(cli: Cli) -> None:
    for name in ("alice", "bob"):
        with_pin(cli, name)
        register(cli, name)


def test_approvals_never_take_janus_pin(cli: Cli) -> None:
    approvers_with_pins(cli)
    cli.connect("alice", "bob")
    cli.mp.setenv("JANUS_PIN", "issuer passphrase")  # the issuer's, never a FIDO2 PIN
    out = cli.tmp / "bundle.json"
    grant = cli.grant("--approver-device", "--approval-require-uv", "--out", str(out))
    cli.fails("pin_required", *grant)
    assert retries(cli, "alice") == 8 and retries(cli, "bob") == 8
    assert not out.exists()


def test_one_environment_pin_for_two_approvers_is_refused_before_any_touch(cli: Cli) -> None:
    approvers_with_pins(cli)
    cli.connect("alice", "bob")
    cli.mp.setenv("JANUS_FIDO2_PIN", PINS["alice"])
    out = cli.tmp / "bundle.json"
    grant = cli.grant("--approver-device", "--approval-require-uv", "--out", str(out))
    cli.fails("shared_pin_refused", *grant)
    assert retries(cli, "alice") == 8 and retries(cli, "bob") == 8

    cli.mp.delenv("JANUS_FIDO2_PIN")
    terminal(cli, {"alice": PINS["alice"], "bob": PINS["bob"]})
    cli.ok(*grant)  # on a terminal each approver's key is asked for its own PIN


# ------------------------------------------------------------------ the test-only device


def test_the_software_authenticator_needs_the_testing_flag(cli: Cli) -> None:
    cli.connect("alice")
    cli.mp.delenv(devices.INSECURE_TESTING_ENV)
    cli.fails("software_device_refused", *cli.fido2("list"))
    cli.fails("software_device_refused", *cli.fido2("register", "alice"))
    cli.mp.setenv(devices.INSECURE_TESTING_ENV, "yes")  # exactly 1, nothing else
    cli.fails("software_device_refused", *cli.fido2("list"))
    assert not (cli.registry / "approvers.json").exists()


def test_in_process_devices_cannot_register_or_approve_outside_tests(cli: Cli) -> None:
    cli.register_approvers("alice", "bob")
    request = cli.tmp / "request.json"
    cli.ok(*cli.grant("--approval-request-out", str(request)))
    cli.connect()
    state = cli.key("alice")
    cli.mp.setattr(
        devices,
        "SOURCES",
        [lambda: [Fido2Device.in_process(SoftwareAuthenticator(state_path=state), "alice")]],
    )
    cli.mp.delenv(devices.INSECURE_TESTING_ENV)
    cli.fails("software_device_refused", *cli.fido2("register", "carol"))
    cli.fails("software_device_refused", "fido2", "approve", "--request", str(request))
    out = cli.tmp / "bundle.json"
    cli.fails("software_device_refused", *cli.grant("--approver-device", "--out", str(out)))
    assert not out.exists()


# ------------------------------------------------------------------ what is approved


def test_approve_shows_every_signed_claim(cli: Cli) -> None:
    cli.register_approvers("alice")
    request = cli.tmp / "request.json"
    cli.ok(*cli.grant("--approval-request-out", str(request)))
    claims = json.loads(request.read_text())["claims"]
    cli.connect("alice")
    code, _, err = cli.run("fido2", "approve", "--request", str(request))
    assert code == 0, err
    for name, value in claims.items():
        assert f'"{name}": {json.dumps(value, sort_keys=True)}' in err


def test_approve_refuses_odd_claim_types_without_a_crash(cli: Cli) -> None:
    cli.register_approvers("alice")
    request = cli.tmp / "request.json"
    cli.ok(*cli.grant("--approval-request-out", str(request)))
    document = json.loads(request.read_text())
    document["claims"]["exp"] = "tomorrow\x1b[2J"
    request.write_text(json.dumps(document))
    cli.connect("alice")
    out = cli.fails("malformed_request", "fido2", "approve", "--request", str(request))
    assert "\x1b" not in out["error"]["message"]


# ------------------------------------------------------------------ concurrent writers


@pytest.mark.parametrize(
    ("purpose", "registry"), [("approval", "approvers.json"), ("keystore", "credentials.json")]
)
def test_registration_holds_the_registry_lock_across_the_touch(
    cli: Cli, purpose: str, registry: str
) -> None:
    seen: list[bool] = []
    real = Authenticator.make_credential

    def make_credential(self: Authenticator, *args: Any, **kwargs: Any) -> Any:
        fd = os.open(cli.registry / f"{registry}.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            seen.append(False)
        except BlockingIOError:
            seen.append(True)  # another writer would wait
        finally:
            os.close(fd)
        return real(self, *args, **kwargs)

    cli.mp.setattr(Authenticator, "make_credential", make_credential)
    cli.connect("alice")
    cli.ok(*cli.fido2("register", "alice", "--purpose", purpose))
    assert seen == [True]


def test_an_oversized_approver_registry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "approvers.json"
    path.write_text(ApproverSet().to_json() + " " * (1 << 20))
    with pytest.raises(FormatError, match="larger than"):
        ApproverSet.load(path)


# ------------------------------------------------------------------ removal warns


def test_removing_a_keystore_credential_warns_that_sealed_keys_still_open(cli: Cli) -> None:
    cli.connect("alice")
    cli.ok(*cli.fido2("register", "vault", "--purpose", "keystore"))
    code, out, err = cli.run(*cli.fido2("remove", "vault", "--purpose", "keystore"))
    assert code == 0, err
    (warning,) = out["warnings"]
    assert "janus keys rewrap URI --remove vault" in warning and "old copies" in warning
    assert "WARNING" in err and "rewrap" in err
    cli.ok(*cli.fido2("register", "alice"))
    assert "warnings" not in cli.ok(*cli.fido2("remove", "alice", "--purpose", "approval"))
