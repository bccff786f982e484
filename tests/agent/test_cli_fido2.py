"""`janus fido2 …` and approvals collected by `janus grant`, in process.

Authenticators are software CTAP2 authenticators reached through discovery's test-only
hook (JANUS_FIDO2_SOFTWARE_AUTHENTICATOR, a list of state files); the PC/SC tier is
tested in tests/hardware/test_fido2_pcsc_discovery.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from fido2.ctap2.base import Ctap2
from fido2.ctap2.pin import ClientPin

from agent.cli import main
from hardware.fido2_authenticator import SoftwareAuthenticator
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software.provider import SoftwareProvider
from janus_hsm.fido2 import devices
from policies.capability import Bundle

PASSPHRASE = "issuer passphrase"
POLICY = """
version = 1

[[rule]]
name = "two-operators"
audiences = ["*"]
abilities = [{ can = "sign/*", with = "janus:payments/*" }]
max_ttl = "1h"
max_uses = 10
require = ["approval"]
approvals = 2
"""


class Cli:
    def __init__(self, tmp: Path, capsys: pytest.CaptureFixture[str], mp: pytest.MonkeyPatch):
        self.tmp, self.capsys, self.mp = tmp, capsys, mp
        self.registry = tmp / "fido2"
        mp.setattr(devices, "SOURCES", [devices._software_devices])  # no real USB/PC-SC here
        mp.delenv("JANUS_PIN", raising=False)
        mp.delenv("JANUS_FIDO2_PIN", raising=False)
        mp.delenv(devices.SOFTWARE_PRESENCE_ENV, raising=False)
        mp.setenv(devices.INSECURE_TESTING_ENV, "1")  # software authenticators: a test run
        self.connect()
        pin_file = tmp / "passphrase"
        pin_file.write_text(PASSPHRASE)
        pin_file.chmod(0o600)
        self.store = f"soft:dir={tmp / 'keys'}"
        provider = SoftwareProvider.open(
            self.store, allow_extractable=True, passphrase_source=lambda: PASSPHRASE
        )
        provider.generate(f"{self.store};object=root", Algorithm.ES256)
        self.holder = provider.generate(f"{self.store};object=holder", Algorithm.EdDSA).did
        self.issuer = f"{self.store};object=root?pin-source=file:{pin_file}"
        self.policy = tmp / "policy.toml"
        self.policy.write_text(POLICY)

    def key(self, name: str) -> str:
        return str(self.tmp / f"{name}.authenticator.json")

    def connect(self, *names: str) -> None:
        if names:
            self.mp.setenv(
                devices.SOFTWARE_AUTHENTICATOR_ENV, os.pathsep.join(map(self.key, names))
            )
        else:
            self.mp.delenv(devices.SOFTWARE_AUTHENTICATOR_ENV, raising=False)

    def run(self, *args: str) -> tuple[int, Any, str]:
        self.capsys.readouterr()
        code = main([*args, "--json"])
        out, err = self.capsys.readouterr()
        return code, json.loads(out) if out.strip() else None, err

    def ok(self, *args: str) -> Any:
        code, out, err = self.run(*args)
        assert code == 0, err
        return out

    def fails(self, code: str, *args: str) -> Any:
        status, out, _ = self.run(*args)
        assert status == 1, out
        assert out["error"]["code"] == code, out
        return out

    def fido2(self, *args: str) -> tuple[str, ...]:
        return ("fido2", *args, "--registry-dir", str(self.registry))

    def grant(self, *extra: str, uses: str = "5") -> tuple[str, ...]:
        return (
            "grant",
            "--issuer",
            self.issuer,
            "--to",
            self.holder,
            "--can",
            "sign/payment",
            "--with",
            "janus:payments/eur",
            "--ttl",
            "10m",
            "--uses",
            uses,
            "--policy",
            str(self.policy),
            "--allow-extractable",
            "--registry-dir",
            str(self.registry),
            *extra,
        )

    def register_approvers(self, *names: str) -> None:
        for name in names:
            self.connect(name)
            self.ok(*self.fido2("register", name))
        self.connect()


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(tmp_path, capsys, monkeypatch)


def test_no_device_is_a_typed_error(cli: Cli) -> None:
    listed = cli.ok(*cli.fido2("list"))
    assert listed == {"devices": [], "credentials": []}
    cli.fails("no_device", *cli.fido2("register", "alice"))
    assert not (cli.registry / "approvers.json").exists()


def test_register_list_remove(cli: Cli) -> None:
    cli.register_approvers("alice", "bob")
    cli.connect("alice")
    cli.ok(*cli.fido2("register", "vault", "--purpose", "keystore"))
    # The same key cannot be registered as a second approver (excludeList).
    cli.fails("credential_excluded", *cli.fido2("register", "alice2"))
    listed = cli.ok(*cli.fido2("list"))
    assert [(c["purpose"], c["name"]) for c in listed["credentials"]] == [
        ("approval", "alice"),
        ("approval", "bob"),
        ("keystore", "vault"),
    ]
    (device,) = listed["devices"]
    assert device["transport"] == "in-process"
    assert device["aaguid"] == "e5465697-e942-4d81-8279-41fec508663d"
    assert device["hmac_secret"] is True and device["pin_set"] is False
    assert device["holds"] == ["alice", "vault"]
    assert listed["credentials"][2]["rp_id"] == "keystore.janus.invalid"
    assert (cli.registry / "approvers.json").stat().st_mode & 0o777 == 0o600

    cli.ok(*cli.fido2("remove", "bob"))
    cli.fails("unknown_credential", *cli.fido2("remove", "bob"))
    names = [c["name"] for c in cli.ok(*cli.fido2("list"))["credentials"]]
    assert names == ["alice", "vault"]


def test_a_bad_registry_is_refused_and_left_alone(cli: Cli) -> None:
    cli.registry.mkdir()
    bad = cli.registry / "credentials.json"
    bad.write_text('{"typ": "janus-fido2-credentials/1", "credentials": [{"label": 1}]}')
    before = bad.read_bytes()
    cli.connect("alice")
    cli.fails("bad_registry", *cli.fido2("register", "vault", "--purpose", "keystore"))
    assert bad.read_bytes() == before


def test_pin_blocked_and_presence_timeout_are_typed(cli: Cli) -> None:
    device = SoftwareAuthenticator(state_path=cli.key("locked"), max_pin_retries=1)
    ClientPin(Ctap2(device)).set_pin("1234")
    with pytest.raises(Exception):  # noqa: B017 - burn the only retry
        ClientPin(Ctap2(device)).get_pin_token("0000")
    cli.connect("locked")
    cli.mp.setenv("JANUS_FIDO2_PIN", "1234")
    out = cli.fails("pin_blocked", *cli.fido2("register", "alice"))
    assert "blocked" in out["error"]["message"]
    listed = cli.ok(*cli.fido2("list"))
    assert listed["devices"][0]["pin_retries"] == 0

    cli.connect("slow")
    cli.mp.setenv(devices.SOFTWARE_PRESENCE_ENV, "timeout")
    cli.fails("presence_timeout", *cli.fido2("register", "alice"))
    assert not (cli.registry / "approvers.json").exists()


def test_grant_collects_approvals_from_connected_keys(cli: Cli) -> None:
    cli.register_approvers("alice", "bob", "carol")
    out = cli.tmp / "bundle.json"
    cli.connect("alice", "carol")
    granted = cli.ok(*cli.grant("--approver-device", "--out", str(out)))
    bundle = Bundle.parse(out.read_bytes())
    approvals = bundle.leaf.evidence["approvals"]  # type: ignore[index]
    assert [a["approver_id"] for a in approvals] == ["alice", "carol"]
    assert granted["id"] == bundle.leaf.id


def test_m_minus_one_approvals_or_a_denied_touch_sign_nothing(cli: Cli) -> None:
    cli.register_approvers("alice", "bob")
    out = cli.tmp / "bundle.json"
    cli.connect("alice")
    refused = cli.fails("outside_policy", *cli.grant("--approver-device", "--out", str(out)))
    assert "1 valid approval(s) from distinct approvers, 2 required" in refused["error"]["message"]
    assert not out.exists()

    cli.connect("alice", "bob")
    cli.mp.setenv(devices.SOFTWARE_PRESENCE_ENV, "deny")
    cli.fails("presence_denied", *cli.grant("--approver-device", "--out", str(out)))
    assert not out.exists()

    cli.mp.delenv(devices.SOFTWARE_PRESENCE_ENV)
    cli.fails("outside_policy", *cli.grant("--out", str(out)))  # no approvals at all
    assert not out.exists()


def test_satisfied_approval_cannot_be_declared(cli: Cli) -> None:
    out = cli.tmp / "bundle.json"
    cli.fails("approval_not_declarable", *cli.grant("--satisfied", "approval", "--out", str(out)))
    assert not out.exists()


def test_approvers_approve_on_their_own_machines(cli: Cli) -> None:
    cli.register_approvers("alice", "bob")
    request = cli.tmp / "request.json"
    prepared = cli.ok(*cli.grant("--approval-request-out", str(request)))
    assert prepared["signed"] is False and prepared["required"] == 2

    files = []
    for name in ("alice", "bob"):
        cli.connect(name)  # each approver's own machine and key; no registry needed there
        approval = cli.tmp / f"{name}.approval.json"
        approved = cli.ok("fido2", "approve", "--request", str(request), "--out", str(approval))
        assert approved["approver_id"] == name
        files += ["--approvals", str(approval)]
    cli.connect()

    out = cli.tmp / "bundle.json"
    only_one = cli.grant("--approval-request", str(request), *files[:2], "--out", str(out))
    cli.fails("outside_policy", *only_one)
    assert not out.exists()
    other_args = cli.grant("--approval-request", str(request), *files, "--out", str(out), uses="6")
    cli.fails("bad_request", *other_args)
    assert not out.exists()

    cli.ok(*cli.grant("--approval-request", str(request), *files, "--out", str(out)))
    leaf = Bundle.parse(out.read_bytes()).leaf
    assert [a["approver_id"] for a in leaf.evidence["approvals"]] == ["alice", "bob"]  # type: ignore[index]
    assert leaf.jws.payload["jti"] == json.loads(request.read_text())["claims"]["jti"]
    # The same approvals again would sign a second capability (a new id, its own uses).
    again = cli.tmp / "again.json"
    cli.fails(
        "approval_reused",
        *cli.grant("--approval-request", str(request), *files, "--out", str(again)),
    )
    assert not again.exists()


def test_an_approval_file_for_another_grant_is_refused(cli: Cli) -> None:
    cli.register_approvers("alice", "bob")
    first, second = cli.tmp / "first.json", cli.tmp / "second.json"
    cli.ok(*cli.grant("--approval-request-out", str(first)))
    cli.ok(*cli.grant("--approval-request-out", str(second)))
    cli.connect("alice")
    approval = cli.tmp / "alice.json"
    cli.ok("fido2", "approve", "--request", str(first), "--out", str(approval))
    cli.connect()
    cli.fails(
        "bad_format",
        *cli.grant("--approval-request", str(second), "--approvals", str(approval)),
    )


def test_edge_grant_refuses_a_declared_approval(cli: Cli) -> None:
    args = ("edge", "grant", "--state-dir", str(cli.tmp / "edge"), "--cloud", "http://127.0.0.1:9")
    grant_args = ("--can", "sign/payment", "--with", "janus:payments/eur", "--ttl", "10m")
    cli.fails(
        "approval_not_declarable", *args, *grant_args, "--uses", "1", "--satisfied", "approval"
    )
    assert not (cli.tmp / "edge").exists()


def test_keys_sealed_for_security_keys_open_only_with_one_of_them(cli: Cli, tmp_path: Path) -> None:
    # Two keystore credentials on two security keys; the key is sealed for both.
    for name in ("primary", "backup"):
        cli.connect(name)
        cli.ok(*cli.fido2("register", name, "--purpose", "keystore"))
    uri = f"{cli.store};object=vault-key"
    reg = ("--registry-dir", str(cli.registry))
    cli.connect("primary", "backup")
    sealed_for = ("--fido2-credential", "primary", "--fido2-credential", "backup")
    made = cli.ok(
        "keys", "generate", uri, "--alg", "ES256", "--allow-extractable", *reg, *sealed_for
    )
    assert made["backend"] == "software"
    message = tmp_path / "m.txt"
    message.write_bytes(b"pay alice")
    sign = ("keys", "sign", uri, "--in", str(message), "--allow-extractable")

    cli.connect()  # no security key: nothing opens, and no passphrase is asked for
    cli.fails("no_device", *sign)
    cli.connect("stranger")  # a key that holds neither credential
    cli.fails("unknown_credential", *sign)
    cli.connect("backup")  # either enrolled key opens it
    assert cli.ok(*sign)["signature"]

    # The primary key is lost: drop it (by the label recorded in the key file, after it
    # left the registry), keep the backup, enrol a replacement.
    cli.ok(*cli.fido2("remove", "primary", "--purpose", "keystore"))
    cli.connect("replacement")
    cli.ok(*cli.fido2("register", "replacement", "--purpose", "keystore"))
    cli.connect("backup", "replacement")
    cli.ok("keys", "rewrap", uri, "--add", "replacement", "--remove", "primary", *reg)
    cli.connect("primary")
    cli.fails("unknown_credential", *sign)
    cli.connect("replacement")
    assert cli.ok(*sign)["signature"]
    status, out, _ = cli.run("keys", "rewrap", uri, "--remove", "primary", *reg)
    assert status != 0 and "not sealed for 'primary'" in out["error"]["message"]


def test_fido2_protection_is_refused_for_hardware_uris(cli: Cli) -> None:
    status, out, _ = cli.run(
        "keys", "generate", "pkcs11:token=x;object=y", "--alg", "ES256",
        "--fido2-credential", "vault", "--registry-dir", str(cli.registry),
    )  # fmt: skip
    assert status != 0 and "soft: keystore keys only" in out["error"]["message"]
