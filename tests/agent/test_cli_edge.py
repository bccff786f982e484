"""`janus edge init | did | grant | verify` as real subprocesses."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from hardware.softhsm import SoftHSMToken
from policies.abilities import Ability


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


def test_edge_verify_of_an_unreadable_or_malformed_file_is_a_verdict(
    cli_token: SoftHSMToken, tmp_path: Path
) -> None:
    """As with `janus verify`: whatever keeps the evidence from verifying is "valid": false."""
    (tmp_path / "dir.json").mkdir()
    for name, text in (("empty", ""), ("array", "[]"), ("not utf-8", "\udcff")):
        (tmp_path / f"{name}.json").write_text(text, errors="surrogateescape")
    for name in ("missing", "dir", "empty", "array", "not utf-8"):
        refused = janus(cli_token, "edge", "verify", str(tmp_path / f"{name}.json"), status=1)
        assert refused["valid"] is False, name
        assert refused["error"]["code"] in {"bad_request", "bad_format"}, name


class FakeDid:
    """Answers GET /v1/did with what it is given; records any other request."""

    def __init__(self, answer: dict[str, Any]) -> None:
        self.answer = answer
        self.other: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = json.dumps(fake.answer).encode()
                self.send_response(200)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                fake.other.append(self.path)
                self.send_response(202)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_edge_send_to_a_cloud_agent_takes_its_signed_routing_key(
    cli_token: SoftHSMToken, tmp_path: Path, key_name: str
) -> None:
    edge, _ = EdgeAgent.init(tmp_path / "me", cli_token.uri(), name=key_name)
    note = tmp_path / "note.json"
    note.write_text('{"text": "hello"}')
    send = ["edge", "send", "--to", edge.did, "--in", str(note)]
    cloud = CloudProcess(tmp_path / "cloud", owner=edge.did)
    try:
        edge.grant(cloud.url, [Ability("janus:mailbox", "msg/receive")], ttl_seconds=600, uses=10)
        real = httpx.get(f"{cloud.url}/v1/did", timeout=10).json()
        sent = janus(cli_token, *send, "--cloud", cloud.url, "--cloud-did", real["did"])
        assert sent["status"] == 202
        assert [m["message"]["body"] for m in edge.pickup(cloud.url)] == [{"text": "hello"}]
        wrong_agent = janus(
            cli_token, *send, "--cloud", cloud.url, "--cloud-did", edge.did, status=1
        )
        assert "not " + edge.did in wrong_agent["error"]["message"]
    finally:
        cloud.stop()
    # Whoever answers at the URL cannot slip in a routing key the agent did not sign.
    other = "did:key:z6LSbysY2xFMRpGMhb7tFTLMpeuPRaqaWM1yECx2AtzE3KCc"
    for name, answer in (
        ("another key", {**real, "routing_key": other}),
        ("no statement", {k: v for k, v in real.items() if k != "routing_proof"}),
        ("not x25519", {**real, "routing_key": real["did"]}),
    ):
        fake = FakeDid(answer)
        try:
            refused = janus(cli_token, *send, "--cloud", fake.url, status=1)
        finally:
            fake.server.shutdown()
        assert refused["error"]["code"] in {"bad_format", "invalid"}, name
        assert fake.other == [], name
