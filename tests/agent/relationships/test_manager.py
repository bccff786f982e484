"""Relationships end to end: two owners, real tokens, real cloud agents as services."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.cloud.process import CloudProcess
from agent.relationships import delivery
from agent.relationships.manager import (
    RelationshipBlockedError,
    RelationshipExistsError,
    UnknownRelationshipError,
)
from hardware.softhsm import SoftHSMToken
from janus_hsm import b64url
from tests.agent.relationships.owners import connect, owner, texts


def test_invite_accept_talk_both_ways(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)
        with blair.rels() as rels:
            rels.send("alex", text="hello Alex")
            rels.send("alex", text="second")
        with alex.rels() as rels:
            assert texts(rels.receive()) == ["hello Alex", "second"]
            rels.send("blair", text="hi Blair")
            assert texts(rels.receive()) == []  # nothing twice
            shown = rels.show("blair")
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["hi Blair"]
            assert rels.show("alex")["safety_number"] == shown["safety_number"]
            names = [r["name"] for r in rels.list()]
        assert names == ["alex"]


def test_rotation_mid_conversation_loses_nothing(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)
        with blair.rels() as rels:
            rels.rotate("alex", grace_seconds=0)
            old = {a.address_id for a in rels._find("alex").addresses.own}
            rels.rotate("alex")
        with alex.rels() as rels:
            rels.send("blair", text="during the switch")
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["during the switch"]
        with alex.rels() as rels:
            rels.receive()
            rels.send("blair", text="after the switch")
        with blair.rels() as rels:
            report = rels.receive()
            assert texts(report) == ["after the switch"]
            rel = rels._find("alex")
            current = rel.addresses.own_current()
            assert current is not None and current.address_id not in old
            assert len(rel.addresses.own) == 1, "the old address was retired"
        with alex.rels() as rels:
            rels.receive()  # learns the retirement
            assert [p.address.address_id for p in rels._find("blair").addresses.peer] == [
                current.address_id
            ]


def test_sending_service_never_holds_the_address(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)
        for n in range(3):
            with alex.rels() as rels:
                rels.send("blair", text=f"m{n}")
        with alex.rels() as rels:
            peer = rels._find("blair").addresses.peer_targets()[0]
        needles = [
            peer.address_id.encode(),
            peer.credential.encode(),
            b64url.decode(peer.address_id),
            b64url.decode(peer.credential),
        ]
        for path in (alex.cloud.state_dir).glob("sending.db*"):
            data = path.read_bytes()
            assert not any(n in data for n in needles), path
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["m0", "m1", "m2"]


def test_block_stops_delivery(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair", sending=False) as blair,
    ):
        connect(alex, blair)
        with alex.rels() as rels:
            blocked = rels.block("blair")
            assert blocked["retired"] >= 1
            with pytest.raises(RelationshipBlockedError):
                rels.send("blair", text="no")
        with blair.rels() as rels:
            with pytest.raises(Exception) as refused:
                rels.send("alex", text="are you there?")
            assert getattr(refused.value, "code", "") == "peer_address_retired"
            assert len(rels.vault.outbox()) == 1  # still queued, not lost


def test_unknown_and_duplicate_names_are_typed(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    with owner(softhsm_token, tmp_path, "alex") as alex:
        with alex.rels() as rels:
            with pytest.raises(UnknownRelationshipError):
                rels.send("nobody", text="x")
            rels.invite("blair")
            with pytest.raises(RelationshipExistsError):
                rels.invite("blair")
            with sqlite3.connect(rels.vault.path) as db:
                kinds = {k for (k,) in db.execute("SELECT kind FROM records")}
        assert kinds == {"service", "invitation"}
        assert delivery  # the services' module is importable from the edge side


def test_unreachable_service_keeps_the_message_queued(
    softhsm_token: SoftHSMToken, tmp_path: Path
) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex", sending=False) as alex,
        owner(softhsm_token, tmp_path, "blair", sending=False) as blair,
    ):
        connect(alex, blair)
        port = blair.cloud.port
        blair.cloud.stop()
        with alex.rels() as rels:
            with pytest.raises(delivery.ServiceUnreachableError, match="still queued"):
                rels.send("blair", text="while you were away")
            assert len(rels.vault.outbox()) == 1
        blair.cloud = CloudProcess(
            blair.cloud.state_dir, owner=blair.did, port=port, extra_args=["--receiving"]
        )
        with alex.rels() as rels:
            assert rels.receive().errors == []  # hands the queued message over
            assert rels.vault.outbox() == []
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["while you were away"]


def test_automatic_rotation_after_n_messages(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)
        with blair.rels() as rels:
            rels.rotate("alex", every_messages=2, grace_seconds=0)
            first = rels._find("alex").addresses.own_current()
            assert first is not None
        with alex.rels() as rels:
            for n in range(2):
                rels.send("blair", text=f"m{n}")
        with blair.rels() as rels:
            report = rels.receive()
            assert texts(report) == ["m0", "m1"]
            assert {"event": "rotation_started", "name": "alex", "reason": "policy"} in (
                report.events
            )
        with alex.rels() as rels:
            rels.receive()  # the announcement; confirmed at once
            rels.send("blair", text="m2")
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["m2"]
            rels.receive()
            now = rels._find("alex").addresses
            current = now.own_current()
            assert current is not None and current.address_id != first.address_id
            assert [a.address_id for a in now.own] == [current.address_id]


def test_one_token_ecdh_per_process(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    from agent.edge.agent import EdgeAgent
    from agent.relationships.manager import Relationships
    from tests.agent.relationships.test_vault import CountingHandle

    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)
        with blair.rels() as rels:
            for n in range(5):
                rels.send("alex", text=f"m{n}")
        edge = EdgeAgent.open(alex.state)
        counting = CountingHandle(edge.agreement)
        edge.agreement = counting
        with Relationships(edge) as rels:
            assert len(texts(rels.receive())) == 5
            for n in range(5):
                rels.send("blair", text=f"r{n}")
            rels.receive()
        assert counting.exchanges == 1  # the vault's unlock; nothing per message


def test_garbage_at_an_address_changes_nothing(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)
        with alex.rels() as rels:
            target = rels._find("blair").addresses.peer_targets()[0]
        client = delivery.ReceivingClient(target.service)
        # Malformed (wrong layout), then two of the layout that do not decrypt: fewer
        # than it takes to call the session wedged.
        junk = [b"\x00", b"\x01", b"\x01\x00" + bytes(3000), b"\x09\x01" + bytes(300)]
        junk += [b"\x01\x01" + bytes(400), b"\x01\x01" + bytes(401)]
        for data in junk:
            client.deliver(target, data)
        client.close()
        with blair.rels() as rels:
            before = rels._find("alex").ratchet
            report = rels.receive()
            assert report.messages == [] and len(report.errors) == len(junk)
            assert report.events == []
            assert rels._find("alex").ratchet == before
        with alex.rels() as rels:
            rels.send("blair", text="still fine")
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["still fine"]
