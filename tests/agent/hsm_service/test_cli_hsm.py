"""``janus hsm …`` and Janus's own commands on a service's keys, as subprocesses against a
real ``janus hsm serve`` process: ``janus keys sign``, ``janus grant`` and ``janus edge
init --token hsm+http://…`` with an institutional key."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from agent.hsm_service.provider import CAPABILITY_ENV, CLIENT_KEY_ENV
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle, raw_to_der
from janus_hsm.public_keys import from_did_key
from policies.capability import Bundle
from policies.verify import Verifier
from tests.agent.hsm_service.hsmprocess import HsmServiceProcess, capability
from tests.policies.keys import PASSPHRASE


def janus(
    *args: str, env: dict[str, str] | None = None, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        input=None if input is None else input.decode(),
    )


@pytest.fixture
def service(write_config: Any, tmp_path: Path) -> Iterator[HsmServiceProcess]:
    process = HsmServiceProcess(
        write_config(
            {
                "hsm-sign": {},
                "edge-root": {"object": "hsm-ed"},
                "edge-agreement": {"object": "hsm-x25519", "operations": ["ecdh"]},
            }
        ),
        tmp_path,
    )
    yield process
    process.stop()


@pytest.fixture
def client_env(tmp_path: Path, client_keys: dict[str, KeyHandle]) -> dict[str, str]:
    bundle = tmp_path / "alice.cap.json"
    bundle.write_text(capability(client_keys["admin"], client_keys["alice-app"]).to_json())
    return {
        **os.environ,
        CLIENT_KEY_ENV: client_keys["alice-app"].uri,
        CAPABILITY_ENV: str(bundle),
        "JANUS_PIN": PASSPHRASE,
    }


def test_serve_refuses_a_bad_config_at_once(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[service]\nstate-dir = "/tmp/x"\nbogus = 1\n')
    result = janus("hsm", "serve", "--config", str(config), "--port", "0", "--json")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("janus: error: ")
    assert "service.bogus" in lines[0] and "Traceback" not in result.stderr
    missing = janus("hsm", "serve", "--config", str(tmp_path / "none.toml"))
    assert missing.returncode == 1 and missing.stderr.startswith("janus: error: ")


def test_serve_announces_url_and_pid(service: HsmServiceProcess) -> None:
    announcement = json.loads(service.output().splitlines()[0])
    assert announcement["url"] == service.url
    assert announcement["pid"] == service.process.pid


def test_hsm_keys_and_key(service: HsmServiceProcess, client_env: dict[str, str]) -> None:
    result = janus("hsm", "keys", "--service", service.url, "--json", env=client_env)
    assert result.returncode == 0, result.stderr
    labels = [k["label"] for k in json.loads(result.stdout)["keys"]]
    assert labels == ["edge-agreement", "edge-root", "hsm-sign"]
    shown = janus("hsm", "key", "hsm-sign", "--service", service.url, "--json", env=client_env)
    assert json.loads(shown.stdout)["alg"] == "ES256"
    text = janus("hsm", "keys", "--service", f"hsm+{service.url}/keys", env=client_env)
    assert text.returncode == 0 and "hsm-sign  ES256  active  sign" in text.stdout
    head = janus("hsm", "audit-head", "--service", service.url, "--json", env=client_env)
    assert head.returncode == 0 and json.loads(head.stdout)["statement"]["iss"] == "test-hsm"
    refused = janus("hsm", "key", "nope", "--service", service.url, env=client_env)
    assert refused.returncode == 1
    assert refused.stderr.startswith("janus: error: ") and "unknown_key" in refused.stderr
    unset = {k: v for k, v in client_env.items() if k != CAPABILITY_ENV}
    missing = janus("hsm", "keys", "--service", service.url, env=unset)
    assert missing.returncode == 1 and "--capability" in missing.stderr


def test_keys_sign_with_an_institutional_key(
    service: HsmServiceProcess, client_env: dict[str, str], tmp_path: Path
) -> None:
    data = tmp_path / "data.bin"
    data.write_bytes(b"signed by the institution")
    uri = f"hsm+{service.url}/keys/hsm-sign"
    result = janus("keys", "sign", uri, "--in", str(data), "--json", env=client_env)
    assert result.returncode == 0, result.stderr
    signature = b64url.decode(json.loads(result.stdout)["signature"])
    shown = janus("hsm", "key", "hsm-sign", "--service", service.url, "--json", env=client_env)
    public = from_did_key(json.loads(shown.stdout)["did"])
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(raw_to_der(signature, 32), data.read_bytes(), ec.ECDSA(hashes.SHA256()))
    no_client = {k: v for k, v in client_env.items() if k != CLIENT_KEY_ENV}
    refused = janus("keys", "sign", uri, "--in", str(data), env=no_client)
    assert refused.returncode == 1 and CLIENT_KEY_ENV in refused.stderr


def test_grant_with_an_institutional_key(
    service: HsmServiceProcess,
    client_env: dict[str, str],
    tmp_path: Path,
    client_keys: dict[str, KeyHandle],
) -> None:
    out = tmp_path / "grant.json"
    result = janus(
        "grant", "--issuer", f"hsm+{service.url}/keys/hsm-sign",
        "--to", client_keys["bob-app"].did, "--can", "sign/payment",
        "--with", "janus:payments/eur", "--ttl", "10m", "--uses", "5",
        "--out", str(out), "--json",
        env=client_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    bundle = Bundle.parse(out.read_bytes())
    shown = janus("hsm", "key", "hsm-sign", "--service", service.url, "--json", env=client_env)
    root = json.loads(shown.stdout)["did"]
    import time

    Verifier().verify_chain(bundle, now=time.time(), root=root)


def test_edge_init_on_an_hsm_service(
    service: HsmServiceProcess, client_env: dict[str, str], tmp_path: Path
) -> None:
    state = tmp_path / "edge"
    token = f"hsm+{service.url}/keys"
    result = janus(
        "edge", "init", "--token", token, "--root-alg", "EdDSA", "--state-dir", str(state),
        "--json",
        env=client_env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["root"] == f"{token}/edge-root"
    assert info["agreement"] == f"{token}/edge-agreement"
    shown = janus("hsm", "key", "edge-root", "--service", service.url, "--json", env=client_env)
    assert info["did"] == json.loads(shown.stdout)["did"]
    did = janus("edge", "did", "--state-dir", str(state), "--json", env=client_env)
    assert did.returncode == 0, did.stderr
    assert info["did"] in did.stdout


def test_quorum_request_approve_and_sign(
    write_config: Any,
    tmp_path: Path,
    client_keys: dict[str, KeyHandle],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The requester prepares a request, each approver reads it and touches their key
    (``janus hsm approve``), then ``janus keys sign`` signs with the approvals."""
    from tests.agent.test_cli_fido2 import Cli

    (tmp_path / "approvers").mkdir()
    cli = Cli(tmp_path / "approvers", capsys, monkeypatch)
    cli.register_approvers("alice", "bob")
    quorum = {"m": 2, "approvers": ["alice", "bob"]}
    config = write_config(
        {"hsm-q": {"object": "hsm-sign", "quorum": quorum}},
        service={"approvers": str(cli.registry / "approvers.json")},
    )
    service = HsmServiceProcess(config, tmp_path)
    try:
        pin = tmp_path / "client.pin"
        pin.write_text(PASSPHRASE)
        pin.chmod(0o600)
        bundle = tmp_path / "alice.cap.json"
        bundle.write_text(capability(client_keys["admin"], client_keys["alice-app"]).to_json())
        identity = [
            "--service", service.url,
            "--client-key", f"{client_keys['alice-app'].uri}?pin-source=file:{pin}",
            "--capability", str(bundle),
        ]  # fmt: skip
        data = tmp_path / "payment.bin"
        data.write_bytes(b"pay 1M to ACME")
        request = tmp_path / "request.json"
        prepared = cli.ok(
            "hsm", "request", "hsm-q", "--operation", "sign", "--in", str(data),
            "--out", str(request), *identity,
        )  # fmt: skip
        assert prepared["out"] == str(request)
        approvals = []
        for name in ("alice", "bob"):
            cli.connect(name)
            out = tmp_path / f"{name}.approval.json"
            code, result, err = cli.run(
                "hsm", "approve", "--request", str(request), "--out", str(out)
            )
            assert code == 0, err
            assert result["approver_id"] == name
            assert '"operation": "sign"' in err and "hsm-q" in err  # what the approver saw
            approvals.append(str(out))
        env = {
            **os.environ,
            CLIENT_KEY_ENV: client_keys["alice-app"].uri,
            CAPABILITY_ENV: str(bundle),
            "JANUS_PIN": PASSPHRASE,
        }
        uri = f"hsm+{service.url}/keys/hsm-q"
        refused = janus("keys", "sign", uri, "--in", str(data), env=env)
        assert refused.returncode == 1 and "janus hsm request" in refused.stderr
        env["JANUS_HSM_APPROVAL_REQUEST"] = str(request)
        env["JANUS_HSM_APPROVALS"] = os.pathsep.join(approvals[:1])
        short = janus("keys", "sign", uri, "--in", str(data), env=env)
        assert short.returncode == 1 and "quorum_required" in short.stderr
        env["JANUS_HSM_APPROVALS"] = os.pathsep.join(approvals)
        signed = janus("keys", "sign", uri, "--in", str(data), "--json", env=env)
        assert signed.returncode == 0, signed.stderr
        again = janus("keys", "sign", uri, "--in", str(data), env=env)
        assert again.returncode == 1 and "approval_reused" in again.stderr
    finally:
        service.stop()


def test_serve_also_on_a_p11kit_socket(write_config: Any, tmp_path: Path) -> None:
    import stat

    socket_path = tmp_path / "p11kit.sock"
    service = HsmServiceProcess(
        write_config({"hsm-sign": {}}), tmp_path, extra=["--p11kit-socket", str(socket_path)]
    )
    try:
        announcement = json.loads(service.output().splitlines()[0])
        assert announcement["p11kit_socket"] == str(socket_path)
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
    finally:
        service.stop()
    assert not socket_path.exists()
