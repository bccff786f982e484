"""The sync state machine between devices: catch-up, loss, restore from backup, admission."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from agent.sync.errors import NotAdmittedError, SyncError
from agent.sync.ids import new_conversation_id
from agent.sync.messages import Message
from agent.sync.protocol import Limits, SyncNode
from agent.sync.records import (
    IdsRecord,
    MessageRecord,
    RecordType,
    ids_records,
    pack_batch,
    parse_batch,
)
from agent.sync.store import SyncStore

from .dag import random_dag
from .integrity import check_store
from .keys import DeviceKey
from .network import Network


@pytest.fixture
def net(tmp_path: Path) -> Network:
    return Network(tmp_path, ["alex", "blair", "casey"], new_conversation_id())


def test_a_device_offline_for_many_messages_catches_up_in_few_batches(net: Network) -> None:
    net.set_online("casey", False)
    for i in range(300):
        net.post(["alex", "blair"][i % 2])
        for src, dst in [("alex", "blair"), ("blair", "alex")]:
            net.poll(src, dst)
            net.deliver(src, dst, 0)
    rounds = net.settle()
    assert rounds <= 8
    assert len(set(net.histories().values())) == 1
    assert len(net.devices["casey"].shown) == 300
    for device in net.devices.values():
        check_store(device.path)


def test_lost_batches_are_retransmitted_after_the_timeout(net: Network) -> None:
    message = net.post("alex")
    assert net.poll("alex", "blair")
    net.links[("alex", "blair")].clear()  # the offer is lost
    assert not net.poll("alex", "blair")  # nothing until the timeout
    net.now += 1.0
    assert net.poll("alex", "blair")
    net.deliver("alex", "blair", 0)
    assert net.poll("blair", "alex")  # the request
    net.links[("blair", "alex")].clear()  # lost too
    net.now += 1.0
    assert net.poll("blair", "alex")
    net.deliver("blair", "alex", 0)
    assert net.poll("alex", "blair")  # the message
    net.deliver("alex", "blair", 0, keep=True)
    net.deliver("alex", "blair", 0)  # and a duplicate of it
    assert message.id in net.devices["blair"].shown
    assert net.poll("blair", "alex")  # the ack, sent for each copy
    net.deliver("blair", "alex", 0)
    net.now += 100
    records = parse_batch(net.devices["alex"].node.poll("blair", net.now) or b"\x01")
    assert all(message.id not in getattr(r, "ids", ()) for r in records[1:])  # acked


def test_a_device_restored_from_an_old_backup_catches_up(net: Network) -> None:
    for i in range(20):
        net.post(["alex", "blair", "casey"][i % 3])
    net.settle()
    net.backup("casey")
    for i in range(30):
        net.post(["alex", "casey"][i % 2])  # casey's own messages too
    net.settle()
    assert len(net.devices["casey"].shown) == 50
    net.restore("casey")
    assert len(net.devices["casey"].shown) == 20
    # The others notice it asks for what it once acked and offer it the lost ancestors
    # at once, rather than one parent per round trip (which took 17 rounds here).
    assert net.settle() <= 5
    assert len(net.devices["casey"].shown) == 50
    assert len(set(net.histories().values())) == 1
    net.post("casey")  # and it goes on writing after the others
    net.settle()
    assert len(set(net.histories().values())) == 1


def test_a_restored_device_finds_out_from_heads_alone(tmp_path: Path) -> None:
    """Nobody writes after the restore and nobody reconnects: the periodic heads offer
    is what shows the restored device what it lost."""
    conv = new_conversation_id()
    net = Network(tmp_path, ["alex", "blair"], conv)
    net.post("alex")
    net.settle()
    net.backup("blair")
    for _ in range(5):
        net.post("alex")
    net.settle()
    blair = net.devices["blair"]
    blair.node.store.close()
    (tmp_path / "blair.db").unlink()
    (tmp_path / "blair.backup").rename(tmp_path / "blair.db")
    blair.node = SyncNode(SyncStore(tmp_path / "blair.db", durable=False), limits=blair.node.limits)
    blair.node.open("alex", conv, net.now)
    blair.shown = set(blair.node.store.delivered_ids(conv))
    for _ in range(3):
        net.now += 25  # past heads_every
        for src, dst in [("alex", "blair"), ("blair", "alex")] * 3:
            net.poll(src, dst)
            while net.links[(src, dst)]:
                net.deliver(src, dst, 0)
    assert len(blair.shown) == 6


def test_a_message_reaches_a_device_through_another(tmp_path: Path) -> None:
    """alex and casey never talk directly; blair relays (and re-offers) what it gets."""
    net = Network(tmp_path, ["alex", "blair", "casey"], new_conversation_id())
    net.devices["alex"].node.close("casey", net.conversation)
    net.devices["casey"].node.close("alex", net.conversation)
    first = net.post("alex")
    net.settle()
    assert first.id in net.devices["casey"].shown


def test_missing_parents_are_requested_from_the_sender(tmp_path: Path) -> None:
    conv = new_conversation_id()
    parent, child = _chain(conv, 2)
    node = SyncNode(SyncStore(":memory:"))
    node.open("alex", conv, 0)
    result = node.receive("alex", pack_batch([MessageRecord(child)]), 0)
    assert result.delivered == [] and result.waiting == [child.id]
    records = parse_batch(node.poll("alex", 0) or b"")
    kinds = {(r.kind, r.ids) for r in records if not isinstance(r, MessageRecord)}
    assert (RecordType.ACK, (child.id,)) in kinds
    assert (RecordType.REQUEST, (parent.id,)) in kinds
    result = node.receive("alex", pack_batch([MessageRecord(parent)]), 1)
    assert [m.id for m in result.delivered] == [parent.id, child.id]


def _chain(conv: str, n: int) -> list[Message]:
    key, out = DeviceKey.ed25519(), list[Message]()
    for i in range(n):
        out.append(
            Message.create(
                key,
                conversation=conv,
                parents=[out[-1].id] if out else [],
                content_type="text/plain",
                body=str(i).encode(),
                timestamp=i,
            )
        )
    return out


def test_a_refused_message_is_acked_not_stored_and_not_requested_again() -> None:
    conv = new_conversation_id()
    (message,) = _chain(conv, 1)

    def members_only(m: Message) -> None:
        raise NotAdmittedError("the author is not a member")

    node = SyncNode(SyncStore(":memory:"), admit=members_only)
    node.open("alex", conv, 0)
    result = node.receive("alex", pack_batch([MessageRecord(message)]), 0)
    assert result.refused == {message.id: "sync_not_admitted"} and result.delivered == []
    assert node.store.has(conv, [message.id]) == set()
    node.receive("alex", pack_batch(ids_records(RecordType.OFFER, conv, [message.id])), 1)
    records = parse_batch(node.poll("alex", 1) or b"")
    assert all(r.kind is RecordType.ACK for r in records if not isinstance(r, MessageRecord))
    assert any(message.id in r.ids for r in records if not isinstance(r, MessageRecord))


def test_a_closed_conversation_sends_and_takes_nothing() -> None:
    conv = new_conversation_id()
    messages = random_dag(conv, 5, random.Random(1))
    node = SyncNode(SyncStore(":memory:"))
    node.open("alex", conv, 0)
    node.close("alex", conv)
    for message in messages[:2]:
        node.post(message, 0)
    assert node.poll("alex", 0) is None
    result = node.receive("alex", pack_batch([MessageRecord(messages[2])]), 0)
    assert result.ignored_records == 1 and not node.store.has(conv, [messages[2].id])


def test_a_batch_limit_too_small_for_the_largest_message_is_refused() -> None:
    with pytest.raises(SyncError, match="max_batch_bytes"):
        SyncNode(SyncStore(":memory:"), limits=Limits(max_batch_bytes=8 * 1024))


def test_after_a_restart_only_the_heads_are_offered_again(tmp_path: Path) -> None:
    """What each peer holds is kept in the store: a restart re-offers nothing it acked,
    but asks again for parents that waiting messages still miss."""
    net = Network(tmp_path, ["alex", "blair"], new_conversation_id())
    for _ in range(10):
        net.post("alex")
    net.settle()
    conv = net.conversation
    orphan_parent, orphan = _chain(conv, 2)
    alex = net.devices["alex"]
    alex.node.store.add([orphan])
    alex.node.store.close()
    restarted = SyncNode(SyncStore(alex.path, durable=False))
    restarted.open("blair", conv, 0)
    records = parse_batch(restarted.poll("blair", 0) or b"")
    offers = [r for r in records if not isinstance(r, MessageRecord) and r.kind is RecordType.OFFER]
    requests = [
        r for r in records if not isinstance(r, MessageRecord) and r.kind is RecordType.REQUEST
    ]
    assert [r.ids for r in offers] == [tuple(restarted.store.heads(conv))]
    assert [r.ids for r in requests] == [(orphan_parent.id,)]


def test_a_message_whose_parent_was_lost_by_a_restore_waits_and_harms_nothing(
    tmp_path: Path,
) -> None:
    """alex writes m1 then m2, blair gets only m2, then alex goes back to a backup from
    before m1: m1 is gone everywhere, so m2 can never be shown; it waits (bounded by
    max_waiting), and everything else still converges."""
    net = Network(tmp_path, ["alex", "blair"], new_conversation_id())
    net.post("alex")
    net.settle()
    net.backup("alex")
    net.post("alex")
    m2 = net.post("alex")
    blair = net.devices["blair"]
    blair.node.receive("alex", pack_batch([MessageRecord(m2)]), net.now)
    net.restore("alex")
    net.post("alex")
    net.settle()
    assert len(set(net.histories().values())) == 1
    assert blair.node.store.waiting(net.conversation) == [m2.id]
    assert len(blair.shown) == 2


def test_missing_parents_are_asked_of_every_peer_at_the_heads_interval() -> None:
    """The sender of a child may have lost its parent (a restore); another peer that
    believes we hold it would never offer it, so every peer is asked in time."""
    conv = new_conversation_id()
    parent, child = _chain(conv, 2)
    limits = Limits(heads_every=600)
    node = SyncNode(SyncStore(":memory:"), limits=limits)
    node.open("alex", conv, 0)
    node.open("casey", conv, 0)
    assert node.poll("casey", 0) is None  # nothing to say yet; heads are next due at 600
    node.receive("alex", pack_batch([MessageRecord(child)]), 1)

    def requested(peer: str, now: float) -> set[str]:
        records = parse_batch(node.poll(peer, now) or b"\x01")
        return {
            i for r in records if isinstance(r, IdsRecord) and r.kind is RecordType.REQUEST
            for i in r.ids
        }  # fmt: skip

    assert requested("alex", 1) == {parent.id}
    assert requested("casey", 1) == set()
    assert requested("casey", 601) == {parent.id}
