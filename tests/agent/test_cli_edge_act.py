"""`janus edge act | grants` and policy refusals, as real subprocesses against a real
cloud-agent process: no step of a cloud agent's use needs curl."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.process import CloudProcess
from hardware.softhsm import SoftHSMToken


@dataclass
class Shell:
    token: SoftHSMToken
    cwd: Path

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "agent", *args],
            env=self.token.environ(),
            cwd=self.cwd,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )

    def ok(self, *args: str) -> Any:
        result = self.run(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def fails(self, *args: str) -> tuple[dict[str, Any], str]:
        result = self.run(*args, "--json")
        assert result.returncode == 1, result.stdout
        assert "Traceback" not in result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("janus: error: "), result.stderr
        return json.loads(result.stdout)["error"], lines[0]


@dataclass
class Owner:
    shell: Shell
    state: str
    did: str
    cloud: CloudProcess

    def edge(self, command: str, *args: str) -> tuple[str, ...]:
        return ("edge", command, "--state-dir", self.state, *args)

    def grant(self, *args: str) -> dict[str, Any]:
        granted: dict[str, Any] = self.shell.ok(
            *self.edge("grant", "--cloud", self.cloud.url, *args)
        )
        return granted


@pytest.fixture
def owner(cli_token: SoftHSMToken, tmp_path: Path, key_name: str) -> Iterator[Owner]:
    shell = Shell(cli_token, tmp_path)
    state = str(tmp_path / "me")
    made = shell.ok(
        "edge", "init", "--state-dir", state, "--token", cli_token.uri(), "--name", key_name
    )
    cloud = CloudProcess(tmp_path / "cloud", owner=made["did"])
    try:
        yield Owner(shell, state, made["did"], cloud)
    finally:
        cloud.stop()


PAYMENT_GRANT = (
    "--can",
    "sign/payment",
    "--with",
    "janus:payments/eur",
    "--caveat",
    '{"field": "amount", "le": 10000}',
    "--ttl",
    "10m",
    "--uses",
    "3",
)


def test_act_prints_evidence_that_verifies(owner: Owner, tmp_path: Path) -> None:
    shell = owner.shell
    granted = owner.grant(*PAYMENT_GRANT)
    grant_id = granted["grant_id"]
    (tmp_path / "payment.json").write_text('{"amount": 1250, "to": "bob"}')
    evidence = shell.ok(
        *owner.edge("act", "--grant", grant_id, "--action", "sign/payment"),
        "--payload",
        "payment.json",
    )
    assert evidence["typ"] == "janus-evidence/1" and evidence["signer"] == granted["key"]
    (tmp_path / "evidence.json").write_text(json.dumps(evidence))
    verified = shell.ok("edge", "verify", "evidence.json", "--root", owner.did)
    assert verified["valid"] is True and verified["payload"] == {"amount": 1250, "to": "bob"}
    assert verified["resource"] == "janus:payments/eur"

    # Without --json, --out: the file is the same document, ready for `janus edge verify`.
    plain = shell.run(
        *owner.edge("act", "--grant", grant_id, "--action", "sign/payment"),
        "--payload",
        "payment.json",
        "--resource",
        "janus:payments/eur",
        "--out",
        "second.json",
    )
    assert plain.returncode == 0, plain.stderr
    assert "use 2 of grant" in plain.stderr
    assert shell.ok("edge", "verify", "second.json", "--root", owner.did)["valid"] is True

    # A caveat refusal: one error line, exit 1, the cloud agent's code; no use spent.
    (tmp_path / "big.json").write_text('{"amount": 20000, "to": "bob"}')
    error, line = shell.fails(
        *owner.edge("act", "--grant", grant_id, "--action", "sign/payment"),
        "--payload",
        "big.json",
    )
    assert error["code"] == "caveat_failed" and "caveat_failed" in line
    # Not a grant of this owner, a resource outside the grant, a payload that is no object.
    error, _ = shell.fails(
        *owner.edge("act", "--grant", "nosuchgrant", "--action", "sign/payment"),
        "--payload",
        "payment.json",
    )
    assert error["code"] == "not_found"
    error, _ = shell.fails(
        *owner.edge("act", "--grant", grant_id, "--action", "sign/payment"),
        "--payload",
        "payment.json",
        "--resource",
        "janus:payments/usd",
    )
    assert error["code"] == "not_authorized"
    (tmp_path / "list.json").write_text("[1, 2]")
    error, _ = shell.fails(
        *owner.edge("act", "--grant", grant_id, "--action", "sign/payment"),
        "--payload",
        "list.json",
    )
    assert error["code"] == "bad_format"

    listed = {g["grant_id"]: g for g in shell.ok(*owner.edge("grants"))}
    mine = listed[grant_id]
    assert mine["state"] == "active" and mine["uses"] == {"limit": 3, "used": 2}
    assert mine["abilities"][0]["can"] == "sign/payment" and mine["cloud"] == owner.cloud.url
    assert mine["expires"] == granted["expires"]

    shell.ok(
        *owner.edge("act", "--grant", grant_id, "--action", "sign/payment"),
        "--payload",
        "payment.json",
    )
    assert shell.ok(*owner.edge("grants"))[0]["state"] == "used up"
    error, _ = shell.fails(
        *owner.edge("act", "--grant", grant_id, "--action", "sign/payment"),
        "--payload",
        "payment.json",
    )
    assert error["code"] in {"grant_inactive", "uses_exhausted"}


def test_grants_lists_revoked_and_refreshed_states(owner: Owner) -> None:
    shell = owner.shell
    first = owner.grant(*PAYMENT_GRANT)["grant_id"]
    second = owner.grant(
        "--can", "msg/receive", "--with", "janus:mailbox", "--ttl", "1d", "--uses", "10"
    )["grant_id"]
    shell.ok(*owner.edge("revoke", "--grant", first))
    listed = {g["grant_id"]: g for g in shell.ok(*owner.edge("grants", "--refresh"))}
    assert listed[first]["state"] == "revoked"
    assert listed[first]["cloud_status"] == {"status": "destroyed", "reason": "revoked"}
    assert listed[second]["state"] == "active"
    assert listed[second]["abilities"] == [{"can": "msg/receive", "with": "janus:mailbox"}]
    assert listed[second]["uses"] == {"limit": 10, "used": None}
    text = shell.run(*owner.edge("grants"))
    assert text.returncode == 0 and first in text.stdout and "revoked" in text.stdout


def test_redelegate_then_the_holder_invokes(
    owner: Owner, tmp_path: Path, cli_token: SoftHSMToken, key_name: str
) -> None:
    """cap/delegate prints a bundle ready for `janus verify`; its holder then has the
    cloud agent sign with `janus edge invoke`, and that evidence verifies to the owner."""
    shell = owner.shell
    grant_id = owner.grant(
        *("--can", "sign/payment", "--can", "cap/delegate", "--with", "janus:payments/eur"),
        *("--ttl", "10m", "--uses", "5", "--depth", "1"),
    )["grant_id"]
    holder_key = cli_token.uri(object=f"{key_name}-holder")
    holder = shell.ok("keys", "generate", holder_key, "--alg", "ES256")["did"]
    delegation = {"to": holder, "can": "sign/payment", "with": "janus:payments/eur"}
    (tmp_path / "delegate.json").write_text(json.dumps({**delegation, "ttl": "5m", "uses": 1}))
    bundle = shell.ok(
        *owner.edge("act", "--grant", grant_id, "--action", "cap/delegate"),
        "--payload",
        "delegate.json",
    )
    assert len(bundle["chain"]) == 2
    (tmp_path / "bundle.json").write_text(json.dumps(bundle))
    verified = shell.ok("verify", "bundle.json", "--root", owner.did)
    assert verified["valid"] is True and verified["leaf"]["audience"] == holder

    (tmp_path / "payment.json").write_text('{"amount": 7, "to": "carol"}')
    invoke: tuple[str, ...] = ("edge", "invoke", "--cloud", owner.cloud.url)
    invoke += ("--bundle", "bundle.json", "--key", holder_key, "--action", "sign/payment")
    invoke += ("--payload", "payment.json")
    evidence = shell.ok(*invoke)
    (tmp_path / "evidence.json").write_text(json.dumps(evidence))
    checked = shell.ok("edge", "verify", "evidence.json", "--root", owner.did)
    assert checked["valid"] is True and checked["holder"] == holder
    error, _ = shell.fails(*invoke)  # the delegated capability had one use
    assert error["code"] == "uses_exhausted"


def test_policy_refusals_name_the_policy_file(owner: Owner, tmp_path: Path) -> None:
    """The default edge policy allows 100 uses: asking for more names policy.toml."""
    error, line = owner.shell.fails(
        *owner.edge(
            "grant",
            "--cloud",
            owner.cloud.url,
            "--can",
            "sign/payment",
            "--with",
            "janus:payments/eur",
            "--ttl",
            "10m",
            "--uses",
            "1000",
        )
    )
    policy = str((tmp_path / "me" / "policy.toml").resolve())
    assert error["code"] == "outside_policy"
    assert "uses 1000 exceeds max_uses 100" in error["message"] and policy in error["message"]
    assert policy in line


def test_janus_grant_policy_refusal_names_the_file(
    cli_token: SoftHSMToken, tmp_path: Path, key_name: str
) -> None:
    shell = Shell(cli_token, tmp_path)
    issuer = cli_token.uri(object=key_name)
    shell.ok("keys", "generate", issuer, "--alg", "ES256")
    holder = shell.ok("keys", "show", issuer)["did"]
    policy = tmp_path / "policy.toml"
    policy.write_text(
        'version = 1\n[[rule]]\nname = "small"\naudiences = ["*"]\n'
        'abilities = [{ can = "sign/*", with = "janus:payments/*" }]\n'
        'max_ttl = "1h"\nmax_uses = 5\n'
    )
    grant: tuple[str, ...] = ("grant", "--issuer", issuer, "--to", holder, "--can", "sign/payment")
    grant += ("--with", "janus:payments/eur", "--ttl", "10m", "--uses", "50")
    error, _ = shell.fails(*grant, "--policy", "policy.toml")
    assert error["code"] == "outside_policy" and str(policy) in error["message"]
    error, _ = shell.fails(*grant, "--uses", "5000")
    assert "--policy FILE" in error["message"]


def test_edge_modules_import_nothing_of_the_cloud_agent() -> None:
    """Both sides share agent.protocol; the edge agent runs without the server's code."""
    probe = (
        "import sys, agent.edge.agent, agent.edge.identity, agent.cli.edge\n"
        "print([m for m in sys.modules if m == 'agent.cloud' or m.startswith('agent.cloud.')])"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]", result.stdout
