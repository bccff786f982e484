"""`janus grant | invoke | verify | revoke | audit verify` as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from hardware.softhsm import SoftHSMToken

PASS = "holder passphrase"


class Shell:
    def __init__(self, token: SoftHSMToken, tmp: Path) -> None:
        self.token, self.tmp = token, tmp

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env={**self.token.environ(), "JANUS_PIN": PASS},
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def ok(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def fails(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.returncode == 1, result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
        return json.loads(result.stdout)

    def file(self, name: str, obj: Any) -> str:
        path = self.tmp / name
        path.write_text(json.dumps(obj))
        return str(path)


@pytest.fixture
def sh(cli_token: SoftHSMToken, tmp_path: Path) -> Shell:
    return Shell(cli_token, tmp_path)


@pytest.fixture
def setup(sh: Shell, key_name: str) -> dict[str, Any]:
    root_uri = sh.token.uri(object=f"{key_name}-root")
    root = sh.ok("keys", "generate", root_uri, "--alg", "ES256")
    soft = f"soft:dir={sh.tmp / 'keys'}"
    holder_uri = f"{soft};object=cloud"
    holder = sh.ok("keys", "generate", holder_uri, "--alg", "EdDSA", "--allow-extractable")
    worker_uri = f"{soft};object=worker"
    worker = sh.ok("keys", "generate", worker_uri, "--alg", "ES256", "--allow-extractable")
    bundle = str(sh.tmp / "bundle.json")
    granted = sh.ok(
        "grant",
        "--issuer",
        root_uri,
        "--to",
        holder["did"],
        "--can",
        "sign/payment",
        "--with",
        "janus:payments/eur",
        "--caveat",
        '{"field": "amount", "le": 10000}',
        "--caveat",
        '[{"field": "currency", "eq": "EUR"}]',
        "--ttl",
        "10m",
        "--uses",
        "5",
        "--depth",
        "1",
        "--out",
        bundle,
    )
    return {
        "root_uri": root_uri,
        "root": root,
        "holder_uri": holder_uri,
        "holder": holder,
        "worker_uri": worker_uri,
        "worker": worker,
        "bundle": bundle,
        "granted": granted,
    }


def invoke(
    sh: Shell,
    s: dict[str, Any],
    request: dict[str, Any],
    name: str,
    key: str = "holder_uri",
    bundle: str | None = None,
) -> tuple[str, str]:
    request_file = sh.file(f"{name}.request.json", request)
    out = str(sh.tmp / f"{name}.inv")
    sh.ok(
        "invoke",
        "--key",
        s[key],
        "--bundle",
        bundle or s["bundle"],
        "--can",
        "sign/payment",
        "--with",
        "janus:payments/eur",
        "--request",
        request_file,
        "--out",
        out,
        "--allow-extractable",
    )
    return out, request_file


def test_grant_invoke_verify(sh: Shell, setup: dict[str, Any]) -> None:
    granted = setup["granted"]
    assert granted["principal"] == setup["root"]["did"]
    assert granted["audience"] == setup["holder"]["did"]
    assert granted["links"] == 1
    assert json.loads(Path(setup["bundle"]).read_text())["typ"] == "janus-bundle/1"

    inv, req = invoke(sh, setup, {"amount": 9900, "currency": "EUR"}, "ok")
    verdict = sh.ok(
        "verify",
        setup["bundle"],
        "--invocation",
        inv,
        "--request",
        req,
        "--root",
        setup["root"]["did"],
    )
    assert verdict["valid"] is True and verdict["invocation"] is True
    assert verdict["leaf"]["uses"] == 5

    inv, req = invoke(sh, setup, {"amount": 20000, "currency": "EUR"}, "big")
    refused = sh.fails("verify", setup["bundle"], "--invocation", inv, "--request", req)
    assert refused["valid"] is False
    assert refused["error"]["code"] == "caveat_failed" and refused["error"]["link"] == 0

    wrong_root = sh.fails("verify", setup["bundle"], "--root", setup["holder"]["did"])
    assert wrong_root["error"]["code"] == "wrong_root"


def test_redelegation_narrower_ok_wider_refused(sh: Shell, setup: dict[str, Any]) -> None:
    common = [
        "grant",
        "--issuer",
        setup["holder_uri"],
        "--to",
        setup["worker"]["did"],
        "--can",
        "sign/payment",
        "--with",
        "janus:payments/eur",
        "--ttl",
        "5m",
        "--proof",
        setup["bundle"],
        "--allow-extractable",
    ]
    child = str(sh.tmp / "child.json")
    granted = sh.ok(*common, "--uses", "2", "--out", child)
    assert granted["links"] == 2
    inv, req = invoke(
        sh, setup, {"amount": 1, "currency": "EUR"}, "child", key="worker_uri", bundle=child
    )
    assert sh.ok("verify", child, "--invocation", inv, "--request", req)["valid"]
    wider = sh.fails(*common, "--uses", "6")
    assert wider["error"]["code"] == "not_attenuated"


def test_tampered_and_expired_bundles_are_invalid(sh: Shell, setup: dict[str, Any]) -> None:
    bundle = json.loads(Path(setup["bundle"]).read_text())
    compact = bundle["chain"][0]
    head, payload, sig = compact.split(".")
    bundle["chain"][0] = ".".join([head, payload, sig[:-2] + ("AA" if sig[-2:] != "AA" else "BA")])
    tampered = sh.file("tampered.json", bundle)
    result = sh.fails("verify", tampered)
    assert result["error"]["code"] in {"bad_signature", "bad_format"}
    expires = setup["granted"]["expires"]
    expired = sh.fails("verify", setup["bundle"], "--at", str(expires + 3600))
    assert expired["error"]["code"] == "expired"


def test_revoke_with_ledger_and_audit(sh: Shell, setup: dict[str, Any]) -> None:
    ledger = f"sqlite:///{sh.tmp / 'ledger.db'}"
    revoked = sh.ok(
        "revoke",
        "--issuer",
        setup["root_uri"],
        "--bundle",
        setup["bundle"],
        "--reason",
        "test",
        "--ledger",
        ledger,
    )
    assert revoked["revoked"] == setup["granted"]["id"] and revoked["link"] == 0
    verdict = sh.fails("verify", setup["bundle"], "--ledger", ledger)
    assert verdict["error"]["code"] == "revoked"
    # Someone who issued nothing in the chain cannot produce an acceptable record.
    refused = sh.fails(
        "revoke",
        "--issuer",
        setup["worker_uri"],
        "--bundle",
        setup["bundle"],
        "--allow-extractable",
    )
    assert "cannot revoke" in refused["error"]["message"]
    audit = sh.ok("audit", "verify", "--ledger", ledger)
    assert audit["valid"] is True and audit["entries"] == 1


def test_policy_refusal_names_the_rule(sh: Shell, setup: dict[str, Any]) -> None:
    policy = sh.tmp / "policy.toml"
    policy.write_text(
        'version = 1\n[[rule]]\nname = "small-payments"\naudiences = ["*"]\n'
        'abilities = [{ can = "sign/payment", with = "janus:payments/*" }]\n'
        'max_ttl = "10m"\nmax_uses = 5\nmax_depth = 0\nrequire = ["pin"]\n'
    )
    base = [
        "grant",
        "--issuer",
        setup["root_uri"],
        "--to",
        setup["holder"]["did"],
        "--can",
        "sign/payment",
        "--with",
        "janus:payments/eur",
        "--policy",
        str(policy),
    ]
    assert sh.ok(*base, "--ttl", "10m", "--uses", "5")["links"] == 1
    refused = sh.fails(*base, "--ttl", "1h", "--uses", "5")
    assert refused["error"]["code"] == "outside_policy"
    assert "small-payments" in refused["error"]["message"]
