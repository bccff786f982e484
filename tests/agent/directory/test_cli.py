"""``janus dir …`` as scripts use it: real subprocesses, --json, one-line errors."""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from hardware.softhsm import SoftHSMToken
from tests.agent.directory.dirprocess import DirectoryProcess, directory_key


def janus(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=120
    )
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def as_json(*args: str) -> Any:
    return json.loads(janus(*args, "--json").stdout)


@pytest.fixture(scope="module")
def world(
    softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dir-cli")
    owner, _ = EdgeAgent.init(tmp / "owner", softhsm_token.uri(), name="dir-cli-owner")
    claimer, _ = EdgeAgent.init(tmp / "claimer", softhsm_token.uri(), name="dir-cli-claimer")
    receiving = CloudProcess(tmp / "receiving", owner=owner.did, extra_args=["--receiving"])
    key = directory_key(softhsm_token.uri, "dir-cli")
    directory = DirectoryProcess(tmp / "dir", key)
    yield {
        "owner": owner, "claimer": claimer, "receiving": receiving, "directory": directory,
        "tmp": tmp, "key": key,
    }  # fmt: skip
    directory.stop()
    receiving.stop()


def test_publish_lookup_status_attest_monitor_consistency(world: dict[str, Any]) -> None:
    url, tmp = world["directory"].url, world["tmp"]
    owner_dir, claimer_dir = str(tmp / "owner"), str(tmp / "claimer")
    published = as_json(
        "dir", "publish", "--directory", url, "--name", "erin", "--prekeys", "2",
        "--state-dir", owner_dir, "--receiving", world["receiving"].url,
    )  # fmt: skip
    assert published["remaining"] == 2 and published["name"] == "erin@example.org"

    found = as_json(
        "dir", "lookup", "erin@example.org", "--directory", url, "--state-dir", claimer_dir
    )
    for member in ("leaf", "leaf_index", "tree_size", "audit_path", "tree_head", "package"):
        assert member in found
    assert set(found["tree_head"]) == {"tree_size", "root_hash", "timestamp", "signature", "key"}
    assert found["package"]["root_did"] == world["owner"].did and not found["last_resort"]
    # The leaf and path check with RFC 9162's definitions, independently of the client.
    node = hashlib.sha256(b"\x00" + base64.b64decode(found["leaf"])).digest()
    index, size = found["leaf_index"], found["tree_size"]
    fn, sn = index, size - 1
    for sibling in map(base64.b64decode, found["audit_path"]):
        if fn % 2 == 1 or fn == sn:
            node = hashlib.sha256(b"\x01" + sibling + node).digest()
            while fn % 2 == 0 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            node = hashlib.sha256(b"\x01" + node + sibling).digest()
        fn, sn = fn >> 1, sn >> 1
    assert node == base64.b64decode(found["tree_head"]["root_hash"])

    status = as_json(
        "dir", "status", "--directory", url, "--name", "erin", "--state-dir", owner_dir
    )
    assert status["remaining"] == 1

    attestation = tmp / "erin.jws"
    janus("dir", "attest", "erin", "--directory", url, "--out", str(attestation))
    checked = as_json("dir", "verify-attestation", str(attestation))
    assert checked["valid"] is True and checked["root"] == world["owner"].did
    attestation.write_text(attestation.read_text().replace(".", ".x", 1))
    refused = janus("dir", "verify-attestation", str(attestation), "--json", ok=False)
    assert refused.returncode == 1 and refused.stderr.startswith("janus: error: ")
    assert json.loads(refused.stdout)["valid"] is False

    report = as_json("dir", "monitor", "erin", "--directory", url, "--state-dir", owner_dir)
    assert report["ok"] is True and report["bindings"]

    head = found["tree_head"]["tree_size"]
    proof = as_json("dir", "consistency", "--directory", url, "--from", "0", "--to", str(head))
    assert {"first_root", "second_root", "proof"} <= set(proof)


def test_lookup_of_an_unknown_name_is_one_error_line(world: dict[str, Any]) -> None:
    done = janus(
        "dir", "lookup", "nobody@example.org", "--directory", world["directory"].url,
        "--state-dir", str(world["tmp"] / "claimer"), ok=False,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.startswith("janus: error: ") and len(done.stderr.splitlines()) == 1
    assert "nobody@example.org is not published" in done.stderr


def test_serve_fails_fast(world: dict[str, Any], tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = janus(
            "dir", "serve", "--namespace", "example.org", "--key", world["key"], "--port",
            str(port), "--state-dir", str(tmp_path), ok=False,
        )  # fmt: skip
    assert done.returncode == 1 and "already in use" in done.stderr
    assert done.stderr.startswith("janus: error: ") and not done.stdout
    bad_rules = tmp_path / "rules.toml"
    bad_rules.write_text("[limits]\nclaims_per_name = -1\n")
    done = janus(
        "dir", "serve", "--namespace", "example.org", "--key", world["key"], "--rules",
        str(bad_rules), "--state-dir", str(tmp_path), ok=False,
    )  # fmt: skip
    assert done.returncode == 1 and "rules.toml:2: limits.claims_per_name" in done.stderr
    done = janus("dir", "serve", "--namespace", "Example..org", "--key", world["key"], ok=False)
    assert done.returncode == 1 and "namespace" in done.stderr
    done = janus(
        "dir", "serve", "--namespace", "example.org", "--key", world["key"], "--store",
        "postgresql://janus:secret-pw@127.0.0.1:1/none", ok=False,
    )  # fmt: skip
    assert done.returncode == 1 and "secret-pw" not in done.stderr + done.stdout
