"""``janus rel …`` and ``janus edge service …`` as real subprocesses, two owners."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.cloud.process import CloudProcess
from hardware.softhsm import SoftHSMToken
from tests.agent.relationships.owners import SERVICE_ARGS, unique


def run(token: SoftHSMToken, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "agent", *args, "--json"],
        env=token.environ(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert "Traceback" not in result.stderr, result.stderr
    return result


def ok(token: SoftHSMToken, *args: str) -> Any:
    result = run(token, *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def fails(token: SoftHSMToken, *args: str) -> dict[str, Any]:
    result = run(token, *args)
    assert result.returncode == 1, result.stdout
    assert result.stderr.startswith("janus: error: ") and result.stderr.count("\n") == 1
    error: dict[str, Any] = json.loads(result.stdout)["error"]
    return error


def init(token: SoftHSMToken, tmp_path: Path, name: str) -> tuple[str, str]:
    state = str(tmp_path / name)
    made = ok(
        token, "edge", "init", "--state-dir", state, "--token", token.uri(),
        "--name", unique(tmp_path, name),
    )  # fmt: skip
    return state, made["did"]


def test_two_owners_from_the_shell(cli_token: SoftHSMToken, tmp_path: Path) -> None:
    alex, alex_did = init(cli_token, tmp_path, "alex")
    blair, blair_did = init(cli_token, tmp_path, "blair")
    alex_cloud = CloudProcess(tmp_path / "ac", owner=alex_did, extra_args=SERVICE_ARGS)
    blair_cloud = CloudProcess(tmp_path / "bc", owner=blair_did, extra_args=["--receiving"])
    try:
        for state, cloud in ((alex, alex_cloud), (blair, blair_cloud)):
            added = ok(cli_token, "edge", "service", "add", cloud.url, "--role", "receiving",
                       "--state-dir", state)  # fmt: skip
            assert added["role"] == "receiving" and "intro" not in added
        granted = ok(cli_token, "edge", "service", "add", alex_cloud.url, "--role", "sending",
                     "--uses", "50", "--ttl", "1d", "--state-dir", alex)  # fmt: skip
        assert granted["grant_id"]
        listed = ok(cli_token, "edge", "service", "list", "--state-dir", alex)
        assert sorted(s["role"] for s in listed) == ["receiving", "sending"]

        invite_file = tmp_path / "invitation.json"
        png = tmp_path / "invitation.png"
        invited = ok(cli_token, "rel", "invite", "--name", "blair", "--out", str(invite_file),
                     "--qr-png", str(png), "--state-dir", alex)  # fmt: skip
        assert invited["uri"].startswith("janus:invitation?v=1&jws=")
        assert invite_file.stat().st_mode & 0o777 == 0o600 and invited["qr_png"]

        # Bad input: a typed error, and nothing changes.
        garbage = tmp_path / "garbage.json"
        garbage.write_text('{"type": "nope"}')
        assert fails(cli_token, "rel", "accept", str(garbage), "--name", "alex",
                     "--state-dir", blair)["code"] == "bad_invitation"  # fmt: skip
        assert ok(cli_token, "rel", "list", "--state-dir", blair) == []
        assert fails(cli_token, "rel", "accept", invited["uri"], "--name", "../x",
                     "--state-dir", blair)["code"] == "bad_relationship_label"  # fmt: skip

        started = ok(cli_token, "rel", "accept", invited["uri"], "--name", "alex",
                     "--state-dir", blair)  # fmt: skip
        assert started["peer"] == alex_did
        got = ok(cli_token, "rel", "receive", "--state-dir", alex)
        assert got["events"][0]["event"] == "established"
        ok(cli_token, "rel", "receive", "--state-dir", blair)
        ok(cli_token, "rel", "receive", "--state-dir", alex)

        ok(cli_token, "rel", "send", "alex", "--text", "hi from Blair", "--state-dir", blair)
        message = tmp_path / "request.json"
        message.write_text(json.dumps({
            "type": "https://example.org/questions/1.0/ask", "body": {"q": "lunch?"},
            "thid": "t-1",
        }))  # fmt: skip
        ok(cli_token, "rel", "send", "alex", "--in", str(message), "--state-dir", blair)
        untyped = tmp_path / "untyped.json"
        untyped.write_text('{"body": {"q": 1}}')
        assert fails(cli_token, "rel", "send", "alex", "--in", str(untyped),
                     "--state-dir", blair)["code"] == "bad_message_input"  # fmt: skip
        got = ok(cli_token, "rel", "receive", "--state-dir", alex)
        bodies = [m["message"]["body"] for m in got["messages"]]
        assert bodies == [{"text": "hi from Blair"}, {"q": "lunch?"}]
        assert got["messages"][1]["message"]["thid"] == "t-1"

        shown_a = ok(cli_token, "rel", "show", "blair", "--state-dir", alex)
        shown_b = ok(cli_token, "rel", "show", "alex", "--state-dir", blair)
        assert shown_a["safety_number"] == shown_b["safety_number"]
        assert len(shown_a["safety_number"].replace(" ", "")) == 60

        assert ok(cli_token, "rel", "rotate", "alex", "--state-dir", blair)["rotating"]
        policy = ok(cli_token, "rel", "rotate", "alex", "--every-messages", "5",
                    "--every", "1d", "--state-dir", blair)  # fmt: skip
        assert policy["rotation"]["every_messages"] == 5

        error = fails(cli_token, "rel", "send", "nobody", "--text", "x", "--state-dir", alex)
        assert error["code"] == "unknown_relationship" and "janus rel list" in error["message"]

        assert ok(cli_token, "rel", "block", "blair", "--state-dir", alex)["state"] == "blocked"
        error = fails(cli_token, "rel", "send", "blair", "--text", "x", "--state-dir", alex)
        assert error["code"] == "relationship_blocked"
        ok(cli_token, "rel", "receive", "--state-dir", blair)
        error = fails(cli_token, "rel", "send", "alex", "--text", "x", "--state-dir", blair)
        assert error["code"] == "peer_address_retired" and "still queued" in error["message"]

        blair_cloud.stop()
        unreachable = fails(cli_token, "rel", "rotate", "alex", "--state-dir", blair)
        assert unreachable["code"] == "service_unreachable"
    finally:
        alex_cloud.stop()
        if blair_cloud.process.poll() is None:
            blair_cloud.stop()


def test_service_add_refuses_bad_urls(cli_token: SoftHSMToken, tmp_path: Path) -> None:
    state, _ = init(cli_token, tmp_path, "solo")
    for url in ("ftp://x.example", "http://user:pw@x.example", "not a url"):
        error = fails(cli_token, "edge", "service", "add", url, "--role", "receiving",
                      "--state-dir", state)  # fmt: skip
        assert error["code"] == "address_invalid"
    assert ok(cli_token, "edge", "service", "list", "--state-dir", state) == []
    error = fails(cli_token, "rel", "invite", "--name", "x", "--state-dir", state)
    assert error["code"] == "no_service" and "edge service add" in error["message"]
