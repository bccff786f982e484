"""Starting a relationship from a directory: `janus rel request NAME@DOMAIN`, no invitation.

Real processes throughout: a directory (`janus dir serve`), two owners with their own
SoftHSM-backed edge state and cloud agents (receiving + sending), and the CLI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.directory.client import DirectoryClient
from agent.directory.contact import deliver_first_contact
from agent.directory.errors import ContactError
from agent.directory.treehead import SeenHeads
from agent.relationships import x3dh
from agent.relationships.delivery import ReceivingClient, ServiceError
from agent.relationships.intros import load_intros
from agent.relationships.manager import USED_PREKEY
from agent.relationships.vault import CRASH_ENV
from hardware.softhsm import SoftHSMToken
from tests.agent.directory.dirprocess import DirectoryProcess, directory_key
from tests.agent.relationships.owners import Owner, owner


def janus(token: SoftHSMToken, *args: str) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "agent", *args, "--json"],
        env=token.environ(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def world(softhsm_token: SoftHSMToken, tmp_path: Path) -> Iterator[tuple[str, Owner, Owner]]:
    rules = tmp_path / "rules.toml"  # three first contacts per claim: room for a replay
    rules.write_text('[enrolment]\nmode = "open"\n\n[contact]\nuses = 3\n')
    directory = DirectoryProcess(
        tmp_path / "dir", directory_key(softhsm_token.uri, "rel-request"), rules=rules
    )
    try:
        with (
            owner(softhsm_token, tmp_path, "alex") as alex,
            owner(softhsm_token, tmp_path, "blair") as blair,
        ):
            janus(softhsm_token, "dir", "publish", "--directory", directory.url, "--name",
                  "blair", "--prekeys", "2", "--state-dir", str(blair.state))  # fmt: skip
            yield directory.url, alex, blair
    finally:
        directory.stop()


def test_request_from_the_shell(
    softhsm_token: SoftHSMToken, world: tuple[str, Owner, Owner]
) -> None:
    url, alex, blair = world
    a, b = ("--state-dir", str(alex.state)), ("--state-dir", str(blair.state))
    requested = janus(softhsm_token, "rel", "request", "blair@example.org", "--directory", url, *a)
    assert requested["name"] == "blair@example.org" and requested["last_resort"] is False
    assert requested["peer"] == blair.did

    got = janus(softhsm_token, "rel", "receive", *b)
    assert [e["event"] for e in got["events"]] == ["requested"], got
    label = got["events"][0]["name"]
    listed = janus(softhsm_token, "rel", "list", *b)
    assert [(r["name"], r["peer"], r["state"]) for r in listed] == [(label, alex.did, "active")]
    # One of the two published one-time prekeys is gone from Blair's store, once.
    with blair.rels() as rels:
        assert len(list(rels.prekeys.directory.glob("opk-*"))) == 1

    janus(softhsm_token, "rel", "send", label, "--text", "hello Alex", *b)
    got = janus(softhsm_token, "rel", "receive", *a)
    assert [m["message"]["body"]["text"] for m in got["messages"]] == ["hello Alex"]
    janus(softhsm_token, "rel", "send", "blair@example.org", "--text", "hello Blair", *a)
    got = janus(softhsm_token, "rel", "receive", *b)
    assert [m["message"]["body"]["text"] for m in got["messages"]] == ["hello Blair"]
    shown = [
        janus(softhsm_token, "rel", "show", n, *s)
        for n, s in ((label, b), ("blair@example.org", a))
    ]
    assert shown[0]["safety_number"] == shown[1]["safety_number"]


def test_no_contact_and_replays_are_refused(world: tuple[str, Owner, Owner]) -> None:
    url, alex, blair = world
    [intro] = load_intros(blair.state)
    # Without the directory's contact capability, the intro address takes nothing.
    client = ReceivingClient(intro.held.address.service)
    try:
        with pytest.raises(ServiceError) as refusal:
            client.deliver(intro.held.address, b"\x01\x00" + b"x" * 3000)
        assert refusal.value.code == "contact_refused"
    finally:
        client.close()

    with alex.rels() as rels:
        with DirectoryClient(url) as directory:
            claim = directory.claim(
                rels.edge.root, "blair@example.org", seen=SeenHeads(alex.state / "heads.json")
            )
        sent: list[bytes] = []

        def refused(wire: bytes) -> None:  # a delivery the service refuses: nothing stays
            raise ContactError("refused")

        with pytest.raises(ContactError):
            rels.request(
                "blair", claim.bundle(), name=claim.name, directory=claim.package.directory,
                deliver=refused,
            )  # fmt: skip
        assert rels.list() == []

        def deliver(wire: bytes) -> None:
            sent.append(wire)
            deliver_first_contact(rels.edge.root, claim.contact, claim.package.intro, wire)

        rels.request(
            "blair", claim.bundle(), name=claim.name, directory=claim.package.directory,
            deliver=deliver,
        )  # fmt: skip
    [wire] = sent
    with blair.rels() as rels:
        report = rels.receive()
        assert [e["event"] for e in report.events] == ["requested"], report.to_dict()
    # The same first message again (a fresh invocation of the capability: the service
    # lets it through), and its initial header under another body: neither starts anything.
    header = wire[: x3dh.header_len(claim.bundle().suite)]
    for copy in (wire, header + bytes(len(wire) - len(header))):
        deliver_first_contact(alex_root(alex), claim.contact, claim.package.intro, copy)
    with blair.rels() as rels:
        report = rels.receive()
        assert report.events == [] and report.messages == []
        assert [e["code"] for e in report.errors] == ["replayed_initial_message"]
        assert len(rels.list()) == 1


def alex_root(alex: Owner) -> Any:
    from agent.edge.agent import EdgeAgent

    return EdgeAgent.open(alex.state).root


def claim_and_request(url: str, alex: Owner) -> tuple[Any, bytes]:
    """Alex claims Blair's package and sends the request; returns the claim and the wire."""
    sent: list[bytes] = []
    with alex.rels() as rels:
        with DirectoryClient(url) as directory:
            claim = directory.claim(
                rels.edge.root, "blair@example.org", seen=SeenHeads(alex.state / "heads.json")
            )

        def deliver(wire: bytes) -> None:
            sent.append(wire)
            deliver_first_contact(rels.edge.root, claim.contact, claim.package.intro, wire)

        rels.request(
            "blair", claim.bundle(), name=claim.name, directory=claim.package.directory,
            deliver=deliver,
        )  # fmt: skip
    [wire] = sent
    return claim, wire


@pytest.mark.parametrize("step", ["receive:decrypted", "receive:initial-committed"])
def test_request_taken_after_kill_9(
    softhsm_token: SoftHSMToken, world: tuple[str, Owner, Owner], step: str
) -> None:
    """Killed between using the one-time prekeys and committing the relationship (or
    between the commit and the prekeys' deletion), Blair's next receive establishes the
    relationship once, from the same first message; the prekeys end up used exactly once."""
    url, alex, blair = world
    b = ("--state-dir", str(blair.state))
    claim, wire = claim_and_request(url, alex)
    env = {**softhsm_token.environ(), CRASH_ENV: step}
    killed = subprocess.run(
        [sys.executable, "-m", "agent", "rel", "receive", *b, "--json"],
        env=env, capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    prekeys = blair.state / "relationships" / "prekeys"
    # Used, but not deleted yet at either step (the relationship's commit comes first).
    assert len(list(prekeys.glob("opk-*"))) == 2

    got = janus(softhsm_token, "rel", "receive", *b)
    assert got["errors"] == [], got
    if step == "receive:decrypted":  # the killed process committed nothing
        assert [e["event"] for e in got["events"]] == ["requested"], got
    else:  # committed before the kill: recognised, not taken again
        assert got["events"] == [], got
    listed = janus(softhsm_token, "rel", "list", *b)
    assert [(r["peer"], r["state"]) for r in listed] == [(alex.did, "active")]
    label = listed[0]["name"]
    # The used one-time prekeys are gone (once), and so are the records of their use.
    assert len(list(prekeys.glob("opk-*"))) == 1
    assert len(list(prekeys.glob("pqopk-*"))) == 1
    with blair.rels() as rels:
        assert rels.vault.all(USED_PREKEY) == []
        # The hello is stored once (as a control message it is not a text): one
        # relationship, one message received on it.
        assert [r["received"] for r in rels.list()] == [1]

    # The session works both ways.
    a = ("--state-dir", str(alex.state))
    janus(softhsm_token, "rel", "send", label, "--text", "hello Alex", *b)
    got = janus(softhsm_token, "rel", "receive", *a)
    assert [m["message"]["body"]["text"] for m in got["messages"]] == ["hello Alex"]
    janus(softhsm_token, "rel", "send", "blair", "--text", "hello Blair", *a)
    got = janus(softhsm_token, "rel", "receive", *b)
    assert [m["message"]["body"]["text"] for m in got["messages"]] == ["hello Blair"]

    # A replay of the first message, and its initial header under another body: refused.
    header = wire[: x3dh.header_len(claim.bundle().suite)]
    for copy in (wire, header + bytes(len(wire) - len(header))):
        deliver_first_contact(alex_root(alex), claim.contact, claim.package.intro, copy)
    got = janus(softhsm_token, "rel", "receive", *b)
    assert got["events"] == [] and got["messages"] == [], got
    assert [e["code"] for e in got["errors"]] == ["replayed_initial_message"], got
    assert len(janus(softhsm_token, "rel", "list", *b)) == 1
    assert len(list(prekeys.glob("opk-*"))) == 1
