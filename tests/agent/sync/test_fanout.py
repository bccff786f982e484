"""The device fan-out on real SoftHSM keys: two owners with two devices each.

Every device is an edge agent with its own labelled keys on the session's token (its
device key and its X25519 agreement key, as `janus edge init` makes them); lists are
made by the real join flow.  Messages travel through a little in-memory network that
hands every outgoing message to the device it names.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.edge.agent import EdgeAgent
from agent.relationships.errors import DuplicateMessageError, RelationshipError
from agent.relationships.prekeys import PrekeyStore
from agent.relationships.ratchet import RatchetState, first_message
from agent.relationships.vault import Vault
from agent.relationships.x3dh import initiate
from agent.sync import device_errors as derr
from agent.sync.device_format import LIST_TYP
from agent.sync.device_list import DeviceList
from agent.sync.devices import Devices
from agent.sync.errors import SyncError
from agent.sync.fanout import FanoutNode, Outgoing, Received
from agent.sync.fanout_bundle import publish_device_bundle
from agent.sync.fanout_errors import (
    DeviceBundleError,
    MalformedFanoutError,
    UnknownOwnerError,
    UnknownSessionError,
)
from agent.sync.fanout_state import dump_node, load_node
from agent.sync.fanout_store import FanoutStore
from agent.sync.fanout_wire import Announcement, OwnerMessage, parse_plaintext
from hardware.softhsm import SoftHSMToken
from janus_hsm import b64url
from policies.jws import sign_compact

NOW = 1_800_000_000
TEXT = "https://janus.dev/rel/1.0/text"


@dataclass
class Device:
    name: str
    devices: Devices
    node: FanoutNode | None = None

    @property
    def edge(self) -> EdgeAgent:
        return self.devices.edge

    @property
    def did(self) -> str:
        return self.devices.did

    @property
    def fan(self) -> FanoutNode:
        assert self.node is not None
        return self.node


class Net:
    """Hands each outgoing message to the device it names, until nothing is left."""

    def __init__(self, devices: Iterable[Device]) -> None:
        self.by_did = {d.did: d for d in devices}
        self.inbox: dict[str, list[Received]] = {did: [] for did in self.by_did}
        self.waiting = 0

    def deliver(self, outgoing: Iterable[Outgoing]) -> None:
        queue = deque(outgoing)
        steps = 0
        while queue:
            steps += 1
            assert steps < 500, "announcements do not settle"
            item = queue.popleft()
            try:
                received = self.by_did[item.device].fan.receive(item.wire)
            except UnknownOwnerError:
                self.waiting += 1  # a session opened before its owner is known there
                continue
            self.inbox[item.device].append(received)
            queue.extend(received.outgoing)

    def messages(self, device: Device) -> list[Received]:
        return [r for r in self.inbox[device.did] if r.kind == "message"]


def join(new: Device, existing: Device) -> DeviceList:
    request = new.devices.request(new.name, now=NOW)
    dl = existing.devices.add(request.compact, request.code, now=NOW)
    new.devices.accept(dl.compact)
    return dl


@pytest.fixture
def make_device(softhsm_token: SoftHSMToken, tmp_path: Path) -> Any:
    tag = hashlib.sha256(str(tmp_path).encode()).hexdigest()[:10]

    def make(name: str) -> Device:
        edge, _ = EdgeAgent.init(tmp_path / name, softhsm_token.uri(), name=f"{name}-{tag}")
        return Device(name, Devices(edge))

    return make


def start_node(device: Device, tmp_path: Path) -> FanoutNode:
    dl = device.devices.stored()
    assert dl is not None
    device.node = FanoutNode(
        device.edge.root, device.edge.agreement, dl, tmp_path / f"{device.name}-pk"
    )
    return device.node


@dataclass
class World:
    a1: Device
    a2: Device
    b1: Device
    b2: Device
    net: Net

    @property
    def all(self) -> list[Device]:
        return [self.a1, self.a2, self.b1, self.b2]

    @property
    def a(self) -> str:
        return self.a1.did  # the first device's key is the owner's root

    @property
    def b(self) -> str:
        return self.b1.did


def owner_with_two(
    make_device: Any, tmp_path: Path, first: str, second: str
) -> tuple[Device, Device]:
    one, two = make_device(first), make_device(second)
    one.devices.init(first, now=NOW)
    join(two, one)
    return one, two


def pair_up(net: Net, one: Device, two: Device) -> None:
    """Join time: the new device and the approving one hand each other what they know."""
    owner = one.fan.owner
    net.deliver(
        one.fan.meet(two.fan.introduce(), owner=owner)
        + two.fan.meet(one.fan.introduce(), owner=owner)
    )


@pytest.fixture
def world(make_device: Any, tmp_path: Path) -> World:
    a1, a2 = owner_with_two(make_device, tmp_path, "a1", "a2")
    b1, b2 = owner_with_two(make_device, tmp_path, "b1", "b2")
    for d in (a1, a2, b1, b2):
        start_node(d, tmp_path)
    net = Net([a1, a2, b1, b2])
    pair_up(net, a1, a2)
    pair_up(net, b1, b2)
    # The relationship: its first devices hand each other their owner's announcement.
    net.deliver(
        a1.fan.meet(b1.fan.introduce(), owner=b1.did)
        + b1.fan.meet(a1.fan.introduce(), owner=a1.did)
    )
    return World(a1, a2, b1, b2, net)


def live(node: FanoutNode, owner: str) -> set[str]:
    return {d for d, s in node.sessions(owner).items() if not s.ended}


# --- establishment -------------------------------------------------------------------


def test_announcements_establish_every_device_pair(world: World) -> None:
    w = world
    for me, mine, theirs, peer in (
        (w.a1, w.a2, (w.b1, w.b2), w.b),
        (w.a2, w.a1, (w.b1, w.b2), w.b),
        (w.b1, w.b2, (w.a1, w.a2), w.a),
        (w.b2, w.b1, (w.a1, w.a2), w.a),
    ):
        assert live(me.fan, me.fan.owner) == {mine.did}
        assert live(me.fan, peer) == {d.did for d in theirs}
        assert me.fan.peers() == [peer]
        assert me.fan.missing(peer) == [] and me.fan.missing(me.fan.owner) == []
    # One session per pair (4 across the owners, one within each): opened by the device
    # whose did sorts first, both sides naming it by the same initial header; every
    # opener has heard back, so no initial header is repeated any more.
    pairs = [(x, y) for x in w.all for y in w.all if x.did < y.did]
    assert len(pairs) == 6
    for x, y in pairs:
        sx = x.fan.sessions(y.fan.owner)[y.did]
        sy = y.fan.sessions(x.fan.owner)[x.did]
        assert sx.initiator and not sy.initiator
        assert sx.initial_digest == sy.initial_digest and sx.initial is None


def test_a_message_from_any_device_reaches_every_device_of_both(world: World) -> None:
    w = world
    for sender, own_other, peers, peer_owner in (
        (w.a1, w.a2, (w.b1, w.b2), w.b),
        (w.a2, w.a1, (w.b1, w.b2), w.b),
        (w.b1, w.b2, (w.a1, w.a2), w.a),
        (w.b2, w.b1, (w.a1, w.a2), w.a),
    ):
        text = f"hello from {sender.name}"
        out = sender.fan.send(peer_owner, TEXT, {"text": text})
        assert sorted(o.device for o in out) == sorted([own_other.did, *(p.did for p in peers)])
        assert len({o.wire for o in out}) == 3  # one ciphertext per session
        w.net.deliver(out)
        for peer in peers:
            got = w.net.messages(peer)[-1]
            assert (got.device, got.owner, got.conversation) == (
                sender.did,
                sender.fan.owner,
                sender.fan.owner,
            )
            assert not got.own_copy and got.type == TEXT and got.body == {"text": text}
        copy = w.net.messages(own_other)[-1]
        assert copy.own_copy and copy.conversation == peer_owner and copy.body == {"text": text}
    assert [len(w.net.messages(d)) for d in w.all] == [3, 3, 3, 3]
    # A transport that knows the sending device names it (tried first); a wrong name
    # only changes the order sessions are tried in.
    first = next(o for o in w.a1.fan.send(w.b, TEXT, {"n": 1}) if o.device == w.b1.did)
    second = next(o for o in w.a2.fan.send(w.b, TEXT, {"n": 2}) if o.device == w.b1.did)
    assert w.b1.fan.receive(first.wire, device=w.a1.did).device == w.a1.did
    assert w.b1.fan.receive(second.wire, device=w.b2.did).body == {"n": 2}


def test_a_message_for_an_own_device_names_its_owner(world: World) -> None:
    """What belongs to no one peer's conversation (a group's batch) goes to an own
    device addressed to this owner; a peer's device cannot be sent one that way."""
    w = world
    out = w.a1.fan.send_to(w.a2.did, w.a, TEXT, {"group": 1})
    w.net.deliver([out])
    got = w.net.messages(w.a2)[-1]
    assert got.own_copy and got.conversation == w.a and got.body == {"group": 1}
    with pytest.raises(UnknownSessionError):
        w.a1.fan.send_to(w.b1.did, w.a, TEXT, {})


def test_a_lost_first_message_is_repeated_by_the_next(make_device: Any, tmp_path: Path) -> None:
    one, two = owner_with_two(make_device, tmp_path, "one", "two")
    for d in (one, two):
        start_node(d, tmp_path)
    net = Net([one, two])
    out = one.fan.meet(two.fan.introduce(), owner=one.did) + two.fan.meet(
        one.fan.introduce(), owner=one.did
    )
    opener, other = (one, two) if one.did < two.did else (two, one)
    assert [o.device for o in out] == [other.did]  # the session's first message, lost
    again = opener.fan.announce()
    assert again[0].wire[:2] == out[0].wire[:2] and again[0].wire[2:2000] == out[0].wire[2:2000]
    net.deliver(again)
    assert other.did in live(opener.fan, one.did) and opener.did in live(other.fan, one.did)
    assert opener.fan.sessions(one.did)[other.did].initial is None  # it heard back
    # The lost first message turning up late opens as an earlier message of that
    # session (nothing new in it); a second copy is a duplicate, refused without a change.
    late = other.fan.receive(out[0].wire)
    assert late.kind == "announce" and not late.opened and late.outgoing == []
    before = other.fan.fingerprint()
    with pytest.raises(DuplicateMessageError):
        other.fan.receive(out[0].wire)
    assert other.fan.fingerprint() == before


# --- removal -------------------------------------------------------------------------


def test_a_removed_device_gets_nothing_new_and_is_refused(world: World) -> None:
    w = world
    stale = w.a2.fan.sessions(w.b)[w.b1.did].state.to_bytes()  # what A2 holds now
    removed, _ = w.a1.devices.remove("a2", now=NOW + 1)
    out = w.a1.fan.accept_own_list(removed.compact)
    # The new list goes to B's devices, and once to A2 so that it learns of its removal.
    assert sorted(o.device for o in out) == sorted([w.a2.did, w.b1.did, w.b2.did])
    w.net.deliver(out)
    assert w.a2.fan.removed
    assert w.a2.did not in live(w.a1.fan, w.a) and w.a1.fan.sessions(w.a)[w.a2.did].ended
    for b in (w.b1, w.b2):
        assert live(b.fan, w.a) == {w.a1.did}
        assert b.fan.sessions(w.a)[w.a2.did].ended
    # Nothing new reaches A2, from any device.
    for sender, owner in ((w.a1, w.b), (w.b1, w.a), (w.b2, w.a)):
        out = sender.fan.send(owner, TEXT, {"text": "after the removal"})
        assert w.a2.did not in {o.device for o in out} and out
        w.net.deliver(out)
    assert all(o.device != w.a2.did for o in w.a1.fan.announce() + w.b1.fan.announce())
    assert [r.body for r in w.net.messages(w.a2)] == []
    with pytest.raises(derr.RemovedDeviceError):
        w.a2.fan.send(w.b, TEXT, {"text": "still here?"})
    # A2 going on with the state it held (a thief ignoring the list): refused by B1,
    # whether on its old session or by opening a new one; nothing changes at B1.
    before = w.b1.fan.fingerprint()
    plaintext = OwnerMessage(w.b, TEXT, {"text": "from a removed device"}).encode()
    with pytest.raises(derr.RemovedDeviceError) as exc:
        w.b1.fan.receive(RatchetState.from_bytes(stale).encrypt(plaintext))
    assert exc.value.code == "device_removed"
    store = PrekeyStore(w.a2.edge.config.state_dir / "thief-pk", w.a2.fan.suite)
    bundle = publish_device_bundle(store, w.a2.edge.root, w.a2.edge.agreement)
    wire = opening(w.a2.edge, bundle, w.b1.fan, Announcement(removed.compact, ()).encode())
    with pytest.raises(derr.RemovedDeviceError):
        w.b1.fan.receive(wire)
    assert w.b1.fan.fingerprint() == before


def opening(edge: EdgeAgent, own_bundle: Any, to: FanoutNode, plaintext: bytes) -> bytes:
    """A session's first message from ``edge``'s keys to ``to``, carrying ``plaintext``."""
    keys, _ = initiate(edge.agreement, edge.did, own_bundle, to.bundle)
    return first_message(keys, RatchetState.initiator(keys), plaintext)


# --- forgeries -----------------------------------------------------------------------


def refused(node: FanoutNode, error: type[Exception], call: Any) -> str:
    before = node.fingerprint()
    with pytest.raises(error) as exc:
        call()
    assert node.fingerprint() == before
    code = getattr(exc.value, "code", "")
    assert isinstance(exc.value, SyncError | RelationshipError) and code
    return str(code)


def test_forged_bundles_and_lists_are_refused_without_a_change(
    world: World, make_device: Any, tmp_path: Path
) -> None:
    w = world
    a_list = w.a1.devices.stored()
    assert a_list is not None
    stranger = make_device("stranger")
    stranger.devices.init("stranger", now=NOW)
    s_store = PrekeyStore(tmp_path / "stranger-pk", w.a1.fan.suite)
    s_bundle = publish_device_bundle(s_store, stranger.edge.root, stranger.edge.agreement)
    b1 = w.b1.fan

    def announce(listed: str, *bundles: dict[str, Any]) -> bytes:
        return Announcement(listed, tuple(bundles)).encode()

    # A bundle by a key that is no device of A.
    assert (
        refused(
            b1,
            derr.UnknownDeviceError,
            lambda: b1.meet(announce(a_list.compact, s_bundle.to_dict()), owner=w.a),
        )
        == "unknown_device"
    )
    # A2's device key binding another agreement key than the list names.
    mixed = publish_device_bundle(s_store, w.a2.edge.root, stranger.edge.agreement)
    assert (
        refused(
            b1,
            DeviceBundleError,
            lambda: b1.meet(announce(a_list.compact, mixed.to_dict()), owner=w.a),
        )
        == "device_bundle_invalid"
    )
    # A2's real bundle with its signed prekey swapped.
    real = w.a2.fan.bundle.to_dict()
    tampered = {
        **real,
        "signed_prekey": {**real["signed_prekey"], "jwk": s_bundle.signed_prekey_jwk},
    }
    refused(b1, DeviceBundleError, lambda: b1.meet(announce(a_list.compact, tampered), owner=w.a))
    # One-time prekeys are not for bundles every device sees.
    with_opk = PrekeyStore(tmp_path / "opk", w.a1.fan.suite).publish(
        w.a2.edge.root, w.a2.edge.agreement, one_time=1
    )
    refused(
        b1,
        DeviceBundleError,
        lambda: b1.meet(announce(a_list.compact, with_opk.to_dict()), owner=w.a),
    )
    # Lists: another root's list as A's; older lists; a fork of the same version.
    s_list = stranger.devices.stored()
    assert s_list is not None
    assert (
        refused(b1, derr.WrongRootError, lambda: b1.meet(announce(s_list.compact), owner=w.a))
        == "device_list_wrong_root"
    )
    removed, _ = w.a1.devices.remove("a2", now=NOW + 1)
    w.net.deliver(w.a1.fan.accept_own_list(removed.compact))
    assert removed.version == 3
    # An older list the current one extends is a late announcement: nothing changes
    # (A2's bundle in it is not taken back); one it does not extend is a fork.
    before = b1.fingerprint()
    assert b1.meet(announce(a_list.compact, real), owner=w.a) == [] and b1.fingerprint() == before
    other_v2 = sign_compact(
        w.a1.edge.root,
        {"typ": LIST_TYP},
        {"iss": w.a, "version": 2, "prev": a_list.prev, "iat": NOW + 5,
         "devices": [a_list.devices[0].to_json()], "removed": []},
    )  # fmt: skip
    refused(b1, derr.ForkedListError, lambda: b1.meet(announce(other_v2), owner=w.a))
    fork = sign_compact(
        w.a1.edge.root,
        {"typ": LIST_TYP},
        {"iss": w.a, "version": 3, "prev": a_list.hash, "iat": NOW + 2,
         "devices": [e.to_json() for e in removed.devices],
         "removed": [e.to_json() for e in removed.removed]},
    )  # fmt: skip
    assert (
        refused(b1, derr.ForkedListError, lambda: b1.meet(announce(fork), owner=w.a))
        == "device_list_fork"
    )
    # Over a live session: A1 speaking for another owner, or with a malformed plaintext.
    session = w.a1.fan.sessions(w.b)[w.b1.did]
    wire = session.encrypt(announce(s_list.compact))
    refused(b1, derr.WrongRootError, lambda: b1.receive(wire))
    wire = session.encrypt(b'{"v": 1, "kind": "shout"}')
    refused(b1, MalformedFanoutError, lambda: b1.receive(wire))
    wire = session.encrypt(OwnerMessage(stranger.did, TEXT, {}).encode())
    refused(b1, UnknownOwnerError, lambda: b1.receive(wire))
    # A stranger opening a session: with A's list it is no device of A; with its own
    # list it is an owner B1 has no relationship with.  Nothing is kept (not even the
    # initial message's digest: the same message is refused alike again).
    with_a = opening(stranger.edge, s_bundle, b1, announce(removed.compact))
    assert refused(b1, derr.UnknownDeviceError, lambda: b1.receive(with_a)) == "unknown_device"
    refused(b1, derr.UnknownDeviceError, lambda: b1.receive(with_a))
    own = opening(stranger.edge, s_bundle, b1, announce(s_list.compact))
    assert refused(b1, UnknownOwnerError, lambda: b1.receive(own)) == "device_owner_unknown"
    refused(b1, MalformedFanoutError, lambda: b1.receive(b"\x01"))
    # And after all that, A1 and B1 still talk.
    w.net.deliver(w.a1.fan.send(w.b, TEXT, {"text": "still fine"}))
    assert w.net.messages(w.b1)[-1].body == {"text": "still fine"}


def test_an_own_device_introduces_a_peer(world: World, make_device: Any, tmp_path: Path) -> None:
    """A device that joins after the relationship started learns the peer from its own
    devices, and the peer's devices learn the new device: all sessions open."""
    w = world
    a3 = make_device("a3")
    dl = join(a3, w.a1)
    start_node(a3, tmp_path)
    net = Net([*w.all, a3])
    net.deliver(
        w.a1.fan.accept_own_list(dl.compact, [a3.fan.bundle.to_dict()])
        + a3.fan.meet(w.a1.fan.introduce(), owner=w.a)
    )
    net.deliver(w.a2.fan.announce())
    assert a3.fan.peers() == [w.b]
    assert live(a3.fan, w.b) == {w.b1.did, w.b2.did} and live(a3.fan, w.a) == {w.a1.did, w.a2.did}
    for other in w.all:
        assert a3.did in live(other.fan, w.a)
    out = w.b2.fan.send(w.a, TEXT, {"text": "to all three"})
    assert sorted(o.device for o in out) == sorted([w.a1.did, w.a2.did, a3.did, w.b1.did])
    net.deliver(out)
    assert net.messages(a3)[-1].body == {"text": "to all three"}
    with pytest.raises(UnknownOwnerError):
        a3.fan.send(a3.did, TEXT, {})


def test_a_session_opened_before_its_owner_is_known_waits_for_it(
    make_device: Any, tmp_path: Path
) -> None:
    """The opener may learn of the pair first: its first message is kept aside (not
    accepted) and taken once the relationship reaches the other device."""
    # The device whose did sorts first opens a session: of two fresh devices, the
    # first becomes A1 and the other B1, so that A1 opens the session with B1.
    a1, b1 = sorted((make_device("x"), make_device("y")), key=lambda d: d.did)
    b1.devices.init(b1.name, now=NOW)
    b2 = make_device("b2")
    join(b2, b1)
    a1.devices.init(a1.name, now=NOW)
    for d in (a1, b1, b2):
        start_node(d, tmp_path)
    net = Net([a1, b1, b2])
    pair_up(net, b1, b2)
    net.deliver(a1.fan.meet(b1.fan.introduce(), owner=b1.did))
    assert net.waiting >= 1 and a1.did not in b1.fan.sessions(b1.did)
    assert b1.fan.peers() == []  # nothing accepted
    opened = a1.fan.sessions(b1.did)[b1.did]
    net.deliver(b1.fan.meet(a1.fan.introduce(), owner=a1.did))
    # The first message kept aside opened the session: no second one was needed.
    assert b1.fan.sessions(a1.did)[a1.did].initial_digest == opened.initial_digest
    assert opened.initial is None and a1.fan.sessions(b1.did)[b1.did] is opened
    assert live(a1.fan, b1.did) == {b1.did, b2.did} and live(b2.fan, a1.did) == {a1.did}


def test_a_node_dumped_and_loaded_goes_on(world: World, tmp_path: Path) -> None:
    w = world
    data = dump_node(w.b2.fan)
    again = load_node(w.b2.edge.root, w.b2.edge.agreement, data, tmp_path / "b2-pk")
    assert again.fingerprint() == w.b2.fan.fingerprint() and dump_node(again) == data
    w.b2.node = again
    w.net.deliver(w.a2.fan.send(w.b, TEXT, {"text": "to the reloaded node"}))
    assert w.net.messages(w.b2)[-1].body == {"text": "to the reloaded node"}
    w.net.deliver(again.send(w.a, TEXT, {"text": "from it"}))
    assert [w.net.messages(d)[-1].body for d in (w.a1, w.a2, w.b1)] == [{"text": "from it"}] * 3
    with pytest.raises(derr.DeviceStateError):
        load_node(w.b1.edge.root, w.b1.edge.agreement, data, tmp_path / "b1-pk")
    with pytest.raises(derr.DeviceStateError):
        load_node(w.b2.edge.root, w.b2.edge.agreement, data[:-20], tmp_path / "b2-pk")


def test_an_announcement_too_large_for_one_message_goes_in_parts(world: World) -> None:
    w = world
    whole = w.a1.fan.introduce()
    parts = w.a1.fan._announcement_parts(w.a, None, limit=len(whole) - 1)
    assert len(parts) == 2 and all(len(p) < len(whole) for p in parts)
    announced = [a for a in map(parse_plaintext, parts) if isinstance(a, Announcement)]
    assert len(announced) == 2 and announced[0].list == announced[1].list
    bundles = [b for a in announced for b in a.bundles]
    assert sorted(b["root_did"] for b in bundles) == sorted([w.a1.did, w.a2.did])


def test_a_device_restored_from_an_old_backup_reopens_its_sessions(
    world: World, tmp_path: Path
) -> None:
    w = world
    backup = dump_node(w.b2.fan)
    for _ in range(2):
        w.net.deliver(w.a1.fan.send(w.b, TEXT, {"text": "while b2 was backed up"}))
        w.net.deliver(w.b2.fan.send(w.a, TEXT, {"text": "b2 before the crash"}))
    restored = load_node(w.b2.edge.root, w.b2.edge.agreement, backup, tmp_path / "b2-pk")
    w.b2.node = restored
    # Its ratchets are behind: what it sends now is refused, nothing changes at A1.
    stale = restored.send(w.a, TEXT, {"text": "from the past"})
    to_a1 = next(o for o in stale if o.device == w.a1.did)
    before = w.a1.fan.fingerprint()
    with pytest.raises((RelationshipError, SyncError)):  # a duplicate, or no session's
        w.a1.fan.receive(to_a1.wire)
    assert w.a1.fan.fingerprint() == before
    # Re-opening every session (whatever the did order) replaces them on both sides.
    w.net.deliver(restored.reopen())
    for other in (w.a1, w.a2, w.b1):
        theirs = other.fan.sessions(w.b)[w.b2.did]
        mine = restored.sessions(other.fan.owner)[other.did]
        assert theirs.initial_digest == mine.initial_digest and mine.initiator
        assert mine.initial is None  # each answered
    w.net.deliver(restored.send(w.a, TEXT, {"text": "back"}))
    assert [w.net.messages(d)[-1].body for d in (w.a1, w.a2, w.b1)] == [{"text": "back"}] * 3
    w.net.deliver(w.a2.fan.send(w.b, TEXT, {"text": "welcome back"}))
    assert w.net.messages(w.b2)[-1].body == {"text": "welcome back"}


def test_two_devices_reopening_at_once_keep_one_session(world: World) -> None:
    w = world
    low, high = sorted((w.a1, w.b2), key=lambda d: d.did)
    from_low = low.fan.reopen([high.did])
    from_high = high.fan.reopen([low.did])
    w.net.deliver(from_high + from_low)  # crossed on the way
    assert any(r.kind == "ignored" for r in w.net.inbox[low.did])
    kept_low = low.fan.sessions(high.fan.owner)[high.did]
    kept_high = high.fan.sessions(low.fan.owner)[low.did]
    assert kept_low.initiator and not kept_high.initiator
    assert kept_low.initial_digest == kept_high.initial_digest
    # The ignored initial message cannot replace the session later.
    replay = next(o for o in from_high if o.device == low.did)
    before = low.fan.fingerprint()
    with pytest.raises(RelationshipError):
        low.fan.receive(replay.wire)
    assert low.fan.fingerprint() == before
    w.net.deliver(high.fan.send(low.fan.owner, TEXT, {"text": "one session"}))
    assert w.net.messages(low)[-1].body == {"text": "one session"}


class LossyNet(Net):
    """Delivers in random order, duplicating and dropping some messages; what a device
    refuses (a duplicate, a replay, an owner not known yet) is counted, not raised."""

    def __init__(self, devices: Iterable[Device], seed: int) -> None:
        super().__init__(devices)
        self.random = random.Random(seed)
        self.lossy = True
        self.refused: list[str] = []

    def deliver(self, outgoing: Iterable[Outgoing]) -> None:
        pending = list(outgoing)
        steps = 0
        while pending:
            steps += 1
            assert steps < 2000, "announcements do not settle"
            item = pending.pop(self.random.randrange(len(pending)))
            roll = self.random.random() if self.lossy else 1.0
            if roll < 0.1:
                continue  # lost
            if roll < 0.2:
                pending.append(item)  # delivered twice
            try:
                received = self.by_did[item.device].fan.receive(item.wire)
            except (SyncError, RelationshipError) as exc:
                self.refused.append(str(getattr(exc, "code", "")))
                continue
            self.inbox[item.device].append(received)
            pending.extend(received.outgoing)


@pytest.mark.parametrize("seed", [1, 2])
def test_sessions_converge_despite_loss_duplicates_and_reordering(
    make_device: Any, tmp_path: Path, seed: int
) -> None:
    a1, a2 = owner_with_two(make_device, tmp_path, "a1", "a2")
    b1, b2 = owner_with_two(make_device, tmp_path, "b1", "b2")
    devices = [a1, a2, b1, b2]
    for d in devices:
        start_node(d, tmp_path)
    net = LossyNet(devices, seed)
    net.deliver(
        a1.fan.meet(a2.fan.introduce(), owner=a1.did)
        + a2.fan.meet(a1.fan.introduce(), owner=a1.did)
        + b1.fan.meet(b2.fan.introduce(), owner=b1.did)
        + b2.fan.meet(b1.fan.introduce(), owner=b1.did)
        + a1.fan.meet(b1.fan.introduce(), owner=b1.did)
        + b1.fan.meet(a1.fan.introduce(), owner=a1.did)
    )
    # Repair: every device announces again (what a device does now and then); the
    # announcements and the repeated initial headers make up for what was lost.
    net.lossy = False

    def settled() -> bool:
        try:
            return all(not d.fan.missing(o) for d in devices for o in (a1.did, b1.did))
        except UnknownOwnerError:
            return False

    for _ in range(3):
        if settled():
            break
        net.deliver([o for d in devices for o in d.fan.announce()])
    for d in devices:
        assert d.fan.missing(a1.did) == [] and d.fan.missing(b1.did) == []
    for d in devices:
        owner = b1.did if d in (a1, a2) else a1.did
        net.deliver(d.fan.send(owner, TEXT, {"text": f"from {d.name}"}))
    for d in devices:
        got = sorted(r.body["text"] for r in net.messages(d))
        assert got == sorted(f"from {o.name}" for o in devices if o is not d)


def test_the_node_lives_in_the_vault(make_device: Any, tmp_path: Path) -> None:
    one, _ = owner_with_two(make_device, tmp_path, "one", "two")
    vault = Vault.open(tmp_path / "one-vault", one.edge.agreement)
    try:
        store = FanoutStore(one.devices, vault)
        node = store.open()
        assert store.open().fingerprint() == node.fingerprint()  # saved when made
        assert (store.prekeys / "root").read_text() == one.did
        # The record is sealed: no session secret, no list in clear in the database.
        raw = (tmp_path / "one-vault" / "vault.db").read_bytes()
        assert node.bundle.binding.encode() not in raw
        three = make_device("three")
        dl = join(three, one)
        assert store.refresh(node) == [] and node.views[one.did].current.version == dl.version
        store.save(node)
        assert store.open().views[one.did].current.version == 3
        assert store.refresh(node) == []  # nothing newer
    finally:
        vault.close()
    lone = make_device("lone")
    lone_vault = Vault.open(tmp_path / "lone-vault", lone.edge.agreement)
    try:
        with pytest.raises(derr.NoDeviceListError):
            FanoutStore(lone.devices, lone_vault).open()
    finally:
        lone_vault.close()


# --- inboxes: the transport's addresses ------------------------------------------------


def address(n: int) -> dict[str, str]:
    return {
        "service": "http://127.0.0.1:9",
        "address_id": b64url.encode(bytes([n]) * 16),
        "credential": b64url.encode(bytes([n]) * 32),
    }


def test_device_addresses_travel_in_announcements(world: World, tmp_path: Path) -> None:
    w = world
    w.net.deliver(w.a1.fan.set_address(w.a1.did, address(1)))
    w.net.deliver(w.a1.fan.set_address(w.a2.did, address(2)))  # the root's device makes it
    w.net.deliver(w.b2.fan.set_address(w.b2.did, address(3)))
    for d in w.all:
        assert d.fan.address_of(w.a, w.a1.did) == address(1) or d is w.a1
        assert d.fan.address_of(w.b, w.b2.did) == address(3) or d is w.b2
    assert w.b1.fan.address_of(w.a, w.a2.did) == address(2)
    assert w.a1.fan.set_address(w.a1.did, address(1)) == []  # no change, nothing sent
    with pytest.raises(derr.UnknownDeviceError):
        w.a1.fan.set_address(w.b1.did, address(4))  # only this owner's devices
    # A malformed address in an announcement is refused whole, nothing changed.
    own = w.a1.devices.stored()
    assert own is not None
    bad = Announcement(own.compact, (), {w.a1.did: {"service": "ftp://x"}})
    assert refused(w.b1.fan, MalformedFanoutError, lambda: w.b1.fan.meet(bad.encode(), owner=w.a))
    # Removing A2: peers forget its address; A1 keeps it to send the list that removes it.
    removed, _ = w.a1.devices.remove("a2", now=NOW + 1)
    out = w.a1.fan.accept_own_list(removed.compact)
    assert w.a1.fan.address_of(w.a, w.a2.did) == address(2)
    w.net.deliver(out)
    assert w.b1.fan.address_of(w.a, w.a2.did) is None and w.a2.fan.removed
    # A removed device's node is saved and loaded as removed (and refuses to send).
    again = load_node(w.a2.edge.root, w.a2.edge.agreement, dump_node(w.a2.fan), tmp_path / "pk")
    assert again.removed and again.fingerprint() == w.a2.fan.fingerprint()
    with pytest.raises(derr.RemovedDeviceError):
        again.send(w.b, TEXT, {"text": "still here?"})


# --- 1:1 conversations as sync conversations over the sessions -------------------------


def deliver_sync(
    w: World,
    directs: dict[str, Any],
    out: list[Outgoing],
    drop: frozenset[str] = frozenset(),
    taken: dict[str, int] | None = None,
) -> None:
    """Deliver ``out`` and all it causes (answers, sync batches and theirs) until quiet;
    what goes to a device in ``drop`` is lost; ``taken`` counts messages delivered."""
    from agent.relationships.manager import SYNC_TYPE

    queue = deque(out)
    while queue:
        item = queue.popleft()
        if item.device in drop:
            continue
        got = w.net.by_did[item.device].fan.receive(item.wire)
        queue.extend(got.outgoing)
        if got.kind == "message" and got.type == SYNC_TYPE:
            assert got.conversation is not None
            here = directs[item.device]
            delivered = here.take(got.device, got.conversation, got.body)
            if taken is not None:
                taken[item.device] += len(delivered)
            queue.extend(here.outgoing())


def direct_texts(directs: dict[str, Any], device: Device, peer: str) -> list[str]:
    return [json.loads(m.body)["body"]["text"] for m in directs[device.did].history(peer)]


def test_a_direct_conversation_catches_up_through_any_device(world: World, tmp_path: Path) -> None:
    from agent.didcomm.message import Message as DIDComm
    from agent.sync.device_sync_key import DeviceSyncKeys
    from agent.sync.direct import Direct

    w = world
    # What a device's vault keeps across commands: its sync key, the certificates known.
    keys = {d.did: DeviceSyncKeys() for d in w.all}
    directs = {d.did: Direct(tmp_path / f"direct-{d.name}", d.fan, keys[d.did]) for d in w.all}
    taken: dict[str, int] = {d.did: 0 for d in w.all}

    def run(out: list[Outgoing], drop: frozenset[str] = frozenset()) -> None:
        deliver_sync(w, directs, out, drop, taken)

    def texts(device: Device, peer: str) -> list[str]:
        return direct_texts(directs, device, peer)

    # A1 writes; its batches reach A2 only (B's devices lose them).
    first = directs[w.a1.did].post(w.a1.edge.root, w.b, DIDComm.new(TEXT, {"text": "one"}))
    run(directs[w.a1.did].outgoing(), drop=frozenset({w.b1.did, w.b2.did}))
    assert texts(w.a2, w.b) == ["one"] and texts(w.b1, w.a) == []
    # A2's next command re-opens its pairs: its offers bring "one" to B1 and B2.
    directs[w.a2.did].close()
    directs[w.a2.did] = Direct(tmp_path / "direct-a2", w.a2.fan, keys[w.a2.did])
    run(directs[w.a2.did].outgoing())
    assert texts(w.b1, w.a) == ["one"] and texts(w.b2, w.a) == ["one"]
    # B2 answers: "two" names "one" as its parent; every device delivers each once.
    second = directs[w.b2.did].post(w.b2.edge.root, w.a, DIDComm.new(TEXT, {"text": "two"}))
    assert second.parents == (first.id,)
    run(directs[w.b2.did].outgoing())
    assert {directs[d.did].history_hash(d.fan.peers()[0]) for d in w.all} == {
        directs[w.a1.did].history_hash(w.b)
    }
    assert all(texts(d, d.fan.peers()[0]) == ["one", "two"] for d in w.all)
    # Each device delivered each message it did not write exactly once, whatever the
    # paths it came by (its author, relays, offers answered by several devices).
    assert taken == {w.a1.did: 1, w.a2.did: 2, w.b1.did: 2, w.b2.did: 1}
    # Only a current device of the two owners may write: any other key is refused.
    from agent.sync.direct import NotADeviceError, conversation_id
    from agent.sync.messages import Message as SyncMessage
    from agent.sync.sync_key import SyncKey

    forged = SyncMessage.create(
        SyncKey.generate(),
        conversation=conversation_id(w.a, w.b),
        parents=[second.id],
        content_type="application/didcomm-plain+json",
        body=b"{}",
        timestamp=1,
    )
    with pytest.raises(NotADeviceError) as exc:
        directs[w.a1.did]._admit(forged)
    assert exc.value.code == "direct_author_not_a_device"
    for direct in directs.values():
        direct.close()


def test_a_device_restored_from_an_old_backup_catches_up_in_one_round(
    world: World, tmp_path: Path
) -> None:
    import shutil
    import time

    from agent.didcomm.message import Message as DIDComm
    from agent.relationships.manager import SYNC_TYPE
    from agent.sync.device_sync_key import DeviceSyncKeys
    from agent.sync.direct import HEADS_KIND, Direct
    from agent.sync.groups import HEADS_EVERY

    w = world
    vaults = {d.did: Vault.open(tmp_path / f"vault-{d.name}", d.edge.agreement) for d in w.all}
    keys = {d.did: DeviceSyncKeys(vaults[d.did]) for d in w.all}
    directs: dict[str, Direct] = {}

    def command(device: Device) -> Direct:
        """Each owner's command works on a Direct of its own, as `janus rel` does."""
        if device.did in directs:
            directs[device.did].close()
        directs[device.did] = Direct(
            tmp_path / f"direct-{device.name}", device.fan, keys[device.did], vaults[device.did]
        )
        return directs[device.did]

    def run(out: list[Outgoing]) -> None:
        queue = deque(out)
        while queue:
            item = queue.popleft()
            got = w.net.by_did[item.device].fan.receive(item.wire)
            queue.extend(got.outgoing)
            if got.kind == "message" and got.type == SYNC_TYPE:
                assert got.conversation is not None
                here = directs[item.device]
                here.take(got.device, got.conversation, got.body)
                queue.extend(here.outgoing())

    def write(device: Device, text: str) -> None:
        peer = device.fan.peers()[0]
        direct = command(device)
        direct.post(device.edge.root, peer, DIDComm.new(TEXT, {"text": text}))
        run(direct.outgoing())

    def texts(device: Device) -> list[str]:
        history = directs[device.did].history(device.fan.peers()[0])
        return [json.loads(m.body)["body"]["text"] for m in history]

    def hashes() -> set[str]:
        return {directs[d.did].history_hash(d.fan.peers()[0]) for d in w.all}

    try:
        for d in w.all:
            run(command(d).outgoing())
        write(w.a1, "before the backup")
        assert all(texts(d) == ["before the backup"] for d in w.all)
        node_backup = dump_node(w.b2.fan)
        directs[w.b2.did].store.backup(tmp_path / "b2-backup.db")
        for device, text in ((w.a1, "one"), (w.b2, "two"), (w.b1, "three"), (w.a2, "four")):
            write(device, text)
        whole = texts(w.a1)
        assert len(whole) == 5 and len(hashes()) == 1
        # B2 comes back from its backup: the store and the node (its ratchets) both old.
        directs.pop(w.b2.did).close()
        here = tmp_path / "direct-b2"
        for leftover in here.iterdir():
            leftover.unlink()
        shutil.copy(tmp_path / "b2-backup.db", here / "direct.db")
        w.b2.node = load_node(w.b2.edge.root, w.b2.edge.agreement, node_backup, tmp_path / "r")
        command(w.b2)
        assert texts(w.b2) == ["before the backup"]
        # It re-opens its sessions; then one round of commands, nothing new written:
        # the heads offered over the new sessions bring it all it lost.
        run(w.b2.fan.reopen())
        for d in w.all:
            run(command(d).outgoing())
        assert texts(w.b2) == whole and len(hashes()) == 1
        # Nothing changed and the hour has not passed: the next commands send nothing.
        assert [command(d).outgoing() for d in w.all] == [[]] * 4
        # Its sessions work both ways.
        write(w.b2, "back")
        write(w.a1, "welcome back")
        assert all(texts(d)[-2:] == ["back", "welcome back"] for d in w.all)
        assert len(hashes()) == 1
        # An hour after the last offer, the heads go again (to that device only).
        raw = json.loads(vaults[w.a1.did].get(HEADS_KIND, w.b1.did) or b"{}")
        raw["at"] = time.time() - HEADS_EVERY
        with vaults[w.a1.did].transaction() as tx:
            tx.put(HEADS_KIND, w.b1.did, json.dumps(raw).encode())
        again = command(w.a1).outgoing()
        assert [o.device for o in again] == [w.b1.did]
        run(again)
        assert len(hashes()) == 1
    finally:
        for direct in directs.values():
            direct.close()
        for vault in vaults.values():
            vault.close()


def test_what_a_removed_device_wrote_before_its_removal_still_reaches_every_device(
    world: World, tmp_path: Path
) -> None:
    """Admission by the list each device holds, alike everywhere: a device that was
    offline during a removal (or joins after it) gets what the removed device wrote
    before, from any device that kept it; nothing stamped after the removal is taken."""
    from agent.didcomm.message import Message as DIDComm
    from agent.sync.device_sync_key import DeviceSyncKeys
    from agent.sync.direct import CONTENT_TYPE, Direct, NotADeviceError, conversation_id
    from agent.sync.messages import Message as SyncMessage

    w = world
    keys = {d.did: DeviceSyncKeys() for d in w.all}
    directs = {d.did: Direct(tmp_path / f"direct-{d.name}", d.fan, keys[d.did]) for d in w.all}

    def run(out: list[Outgoing], drop: frozenset[str] = frozenset()) -> None:
        deliver_sync(w, directs, out, drop)

    def texts(device: Device, peer: str) -> list[str]:
        return direct_texts(directs, device, peer)

    try:
        offline = frozenset({w.b2.did})
        run([o for d in w.all for o in directs[d.did].outgoing()], drop=offline)
        written = directs[w.a2.did].post(
            w.a2.edge.root, w.b, DIDComm.new(TEXT, {"text": "from the desktop"})
        )
        assert written.timestamp < NOW + 1  # the removal below is stamped later
        run(directs[w.a2.did].outgoing(), drop=offline)
        assert texts(w.b1, w.a) == ["from the desktop"] and texts(w.b2, w.a) == []
        # A removes A2 while B2 is offline; A2's sessions end everywhere.
        removed, _ = w.a1.devices.remove("a2", now=NOW + 1)
        w.net.deliver(w.a1.fan.accept_own_list(removed.compact))
        assert w.b2.fan.views[w.a].current.was_removed(w.a2.did)
        # B2 is back: B1's next command offers its heads; B2 takes A2's earlier message.
        directs[w.b1.did].close()
        directs[w.b1.did] = Direct(tmp_path / "direct-b1", w.b1.fan, keys[w.b1.did])
        run(directs[w.b1.did].outgoing())
        assert texts(w.b2, w.a) == ["from the desktop"]
        assert directs[w.b2.did].history_hash(w.a) == directs[w.a1.did].history_hash(w.b)

        # Stamped after the removal, by A2's certified sync key: refused everywhere.
        def by_a2(timestamp: int) -> SyncMessage:
            return SyncMessage.create(
                keys[w.a2.did].signer(w.a2.edge.root),
                conversation=conversation_id(w.a, w.b),
                parents=[written.id],
                content_type=CONTENT_TYPE,
                body=b"{}",
                timestamp=timestamp,
            )

        for device in (w.a1, w.b1, w.b2):
            directs[device.did]._admit(by_a2(NOW))  # before the removal: taken
            with pytest.raises(NotADeviceError) as exc:
                directs[device.did]._admit(by_a2(NOW + 1))
            assert exc.value.code == "direct_author_not_a_device"
    finally:
        for direct in directs.values():
            direct.close()
