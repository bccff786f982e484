"""`janus edge init | did | grant | verify` as real subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.cloud.process import CloudProcess
from hardware.softhsm import SoftHSMToken


def janus(token: SoftHSMToken, *args: str) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "agent", *args, "--json"],
        env=token.environ(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_init_did_grant_from_the_shell(cli_token: SoftHSMToken, tmp_path: Path) -> None:
    state = str(tmp_path / "me")
    made = janus(
        cli_token,
        "edge",
        "init",
        "--state-dir",
        state,
        "--token",
        cli_token.uri(),
        "--root-alg",
        "EdDSA",
        "--name",
        "shell",
    )
    assert made["created"] is True and made["did"].startswith("did:key:z6Mk")
    again = janus(
        cli_token,
        "edge",
        "init",
        "--state-dir",
        state,
        "--token",
        cli_token.uri(),
        "--root-alg",
        "EdDSA",
        "--name",
        "shell",
    )
    assert again["created"] is False and again["did"] == made["did"]
    document = janus(cli_token, "edge", "did", "--state-dir", state)
    assert document["id"] == made["did"] and document["keyAgreement"]
    cloud = CloudProcess(tmp_path / "cloud", owner=made["did"])
    try:
        granted = janus(
            cli_token,
            "edge",
            "grant",
            "--state-dir",
            state,
            "--cloud",
            cloud.url,
            "--can",
            "sign/payment",
            "--with",
            "janus:payments/eur",
            "--caveat",
            '{"field": "amount", "le": 10000}',
            "--ttl",
            "10m",
            "--uses",
            "5",
        )
        assert granted["status"] == "active"
        revoked = janus(
            cli_token, "edge", "revoke", "--state-dir", state, "--grant", granted["grant_id"]
        )
        assert revoked["destroyed"] == [granted["grant_id"]]
    finally:
        cloud.stop()
