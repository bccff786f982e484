"""`janus edge init | did | grant | verify` as real subprocesses."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from agent.cloud.process import CloudProcess
from hardware.softhsm import SoftHSMToken


def janus(token: SoftHSMToken, *args: str, status: int = 0) -> Any:
    result = subprocess.run(
        [sys.executable, "-m", "agent", *args, "--json"],
        env=token.environ(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr
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
        check_evidence_from_the_shell(cli_token, tmp_path, cloud, granted["grant_id"], made["did"])
        revoked = janus(
            cli_token, "edge", "revoke", "--state-dir", state, "--grant", granted["grant_id"]
        )
        assert revoked["destroyed"] == [granted["grant_id"]]
    finally:
        cloud.stop()


def check_evidence_from_the_shell(
    token: SoftHSMToken, tmp_path: Path, cloud: CloudProcess, grant_id: str, owner: str
) -> None:
    """`janus edge verify`: valid evidence exits 0; anything else exits 1 with
    {"valid": false, "error"}, never a traceback."""
    answer = httpx.post(
        f"{cloud.url}/v1/grants/{grant_id}/actions/sign/payment",
        json={"resource": "janus:payments/eur", "request": {"amount": 12, "to": "bob"}},
        timeout=30,
    )
    assert answer.status_code == 200, answer.text
    evidence = answer.json()["evidence"]
    path = tmp_path / "evidence.json"
    path.write_text(json.dumps(evidence))
    valid = janus(token, "edge", "verify", str(path), "--root", owner)
    assert valid["valid"] is True and valid["principal"] == owner
    assert valid["payload"] == {"amount": 12, "to": "bob"}
    signature = evidence["signature"]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # 64 bytes in 86 characters: the last one's 4 low bits are spare; set one of them.
    stray_bits = signature[:-1] + alphabet[alphabet.index(signature[-1]) ^ 1]
    assert base64.urlsafe_b64decode(signature + "==") == base64.urlsafe_b64decode(stray_bits + "==")
    bad = {
        "tampered": json.dumps({**evidence, "payload": {"amount": 13, "to": "bob"}}),
        "not json": "{not json",
        "invocation not a string": json.dumps({**evidence, "invocation": 5}),
        "non-canonical base64url": json.dumps({**evidence, "signature": stray_bits}),
        "wrong root": None,
    }
    for name, text in bad.items():
        args = [str(path), "--root", evidence["signer"]] if text is None else [str(path)]
        if text is not None:
            path.write_text(text)
        refused = janus(token, "edge", "verify", *args, status=1)
        assert refused["valid"] is False and refused["error"]["code"], name
        path.write_text(json.dumps(evidence))
