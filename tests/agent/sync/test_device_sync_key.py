"""Device sync keys on real SoftHSM device keys: the token certifies, never signs a message.

Two owners with two devices each (the fan-out world of test_fanout.py); 1:1 messages
are written through :class:`Direct`.  The device key's ``sign`` is wrapped to count
the token signatures a device makes.
"""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from agent.didcomm.message import Message as DIDComm
from agent.relationships.manager import SYNC_TYPE
from agent.sync import sync_key
from agent.sync.device_sync_key import (
    CERT_TYP,
    BadDeviceSyncKeyCertificateError,
    DeviceSyncKeys,
)
from agent.sync.direct import CONTENT_TYPE, Direct, NotADeviceError, conversation_id
from agent.sync.fanout import Outgoing
from agent.sync.messages import Message as SyncMessage
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle
from tests.agent.sync.test_fanout import (  # noqa: F401  (fixtures)
    NOW,
    TEXT,
    Device,
    World,
    make_device,
    world,
)


def count_signatures(key: KeyHandle, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the token signatures ``key`` makes from now on (each still made by it)."""
    calls: list[int] = []
    real = key.sign

    def sign(data: bytes) -> bytes:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(key, "sign", sign)
    return calls


class Directs:
    """Every device's 1:1 side, with what its vault would keep across commands."""

    def __init__(self, w: World, tmp_path: Path) -> None:
        self.w = w
        self.keys = {d.did: DeviceSyncKeys() for d in w.all}
        self.dirs = {d.did: tmp_path / f"direct-{d.name}" for d in w.all}
        self.by_did = {d.did: Direct(self.dirs[d.did], d.fan, self.keys[d.did]) for d in w.all}

    def run(self, out: list[Outgoing]) -> None:
        queue = deque(out)
        while queue:
            item = queue.popleft()
            got = self.w.net.by_did[item.device].fan.receive(item.wire)
            queue.extend(got.outgoing)
            if got.kind == "message" and got.type == SYNC_TYPE:
                assert got.conversation is not None
                here = self.by_did[item.device]
                here.take(got.device, got.conversation, got.body)
                queue.extend(here.outgoing())

    def post(self, device: Device, peer: str, text: str) -> SyncMessage:
        written = self.by_did[device.did].post(
            device.edge.root, peer, DIDComm.new(TEXT, {"text": text})
        )
        self.run(self.by_did[device.did].outgoing())
        return written

    def texts(self, device: Device, peer: str) -> list[str]:
        return [json.loads(m.body)["body"]["text"] for m in self.by_did[device.did].history(peer)]

    def close(self) -> None:
        for direct in self.by_did.values():
            direct.close()


@pytest.fixture
def directs(world: World, tmp_path: Path) -> Any:  # noqa: F811
    d = Directs(world, tmp_path)
    yield d
    d.close()


def test_messages_cost_one_token_signature_per_device_not_per_message(
    world: World,  # noqa: F811
    directs: Directs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    w = world
    token = count_signatures(w.a1.edge.root, monkeypatch)
    sent = [directs.post(w.a1, w.b, f"m{i}") for i in range(5)]
    # One signature: the certificate of A1's sync key, made with the first message.
    assert len(token) == 1
    sync_did = sent[0].author
    assert {m.author for m in sent} == {sync_did} and sync_did != w.a1.did
    assert directs.keys[w.a1.did].device_of(sync_did) == w.a1.did
    # Every device of both owners took them, the author standing for device A1.
    for d in w.all:
        peer = w.b if d in (w.a1, w.a2) else w.a
        assert directs.texts(d, peer) == [f"m{i}" for i in range(5)]
        assert directs.by_did[d.did].device_of(sync_did) == w.a1.did
    # A later command (a Direct opened again over the same vault): no signature at all.
    directs.by_did[w.a1.did].close()
    directs.by_did[w.a1.did] = Direct(directs.dirs[w.a1.did], w.a1.fan, directs.keys[w.a1.did])
    directs.post(w.a1, w.b, "later")
    assert len(token) == 1
    assert directs.texts(w.b2, w.a)[-1] == "later"


def test_the_sync_key_and_certificates_live_in_the_vault(
    world: World,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from agent.relationships.vault import Vault

    w = world
    token = count_signatures(w.a1.edge.root, monkeypatch)
    vault = Vault.open(tmp_path / "a1-vault", w.a1.edge.agreement)
    try:
        first = DeviceSyncKeys(vault).signer(w.a1.edge.root)
        # Sealed: neither the seed nor the certificate is in clear in the database.
        raw = (tmp_path / "a1-vault" / "vault.db").read_bytes()
        assert first.seed not in raw and first.did.encode() not in raw
        again = DeviceSyncKeys(vault)  # the next command
        assert again.signer(w.a1.edge.root).did == first.did and len(token) == 1
    finally:
        vault.close()
    assert again.device_of(first.did) == w.a1.did


def batch_with(keys: object) -> dict[str, Any]:
    return {"v": 1, "batch": b64url.encode(b"\x01"), "keys": keys}


def test_bad_certificates_refuse_the_batch_with_nothing_kept(
    world: World,  # noqa: F811
    directs: Directs,
) -> None:
    w = world
    b1 = directs.by_did[w.b1.did]
    good = directs.keys[w.a1.did]
    good.signer(w.a1.edge.root)
    [compact] = good.certificates(good.known)
    other = sync_key.SyncKey.generate()
    wrong_typ = sync_key.certify(w.a1.edge.root, other).compact  # an owner's certificate
    header, payload, signature = compact.split(".")
    tampered = f"{header}.{payload}.{signature[:-4]}AAAA"
    cases: list[Any] = [["not a jws"], [wrong_typ], [tampered], [compact, 7], "x", [compact] * 65]
    for keys in cases:
        before = (dict(b1.keys.known), b1.history_hash(w.a))
        with pytest.raises(BadDeviceSyncKeyCertificateError) as exc:
            b1.take(w.a1.did, w.a, batch_with(keys))
        assert exc.value.code == "bad_device_sync_key_certificate"
        assert (dict(b1.keys.known), b1.history_hash(w.a)) == before


def forged(author: KeyHandle, w: World, parents: list[str], timestamp: int = 1) -> SyncMessage:
    return SyncMessage.create(
        author,
        conversation=conversation_id(w.a, w.b),
        parents=parents,
        content_type=CONTENT_TYPE,
        body=b"{}",
        timestamp=timestamp,
    )


def test_a_sync_key_of_an_unknown_device_is_refused(
    world: World,  # noqa: F811
    directs: Directs,
) -> None:
    w = world
    b1 = directs.by_did[w.b1.did]
    stranger, stranger_sync = sync_key.SyncKey.generate(), sync_key.SyncKey.generate()
    compact = sync_key.certify(stranger, stranger_sync, typ=CERT_TYP).compact
    # A good certificate of a device no list names: not kept, its messages refused.
    b1.keys.learn([compact], b1._known_device)
    assert b1.keys.device_of(stranger_sync.did) is None
    with pytest.raises(NotADeviceError) as exc:
        b1._admit(forged(stranger_sync, w, []))
    assert exc.value.code == "direct_author_not_a_device"
    # An uncertified software key is refused too.
    with pytest.raises(NotADeviceError):
        b1._admit(forged(sync_key.SyncKey.generate(), w, []))


def test_a_sync_key_of_a_removed_device_is_refused(
    world: World,  # noqa: F811
    directs: Directs,
) -> None:
    w = world
    written = directs.post(w.a2, w.b, "before the removal")
    a2_sync = directs.keys[w.a2.did].signer(w.a2.edge.root)
    b1 = directs.by_did[w.b1.did]
    assert b1.device_of(written.author) == w.a2.did
    b1._admit(forged(a2_sync, w, [written.id]))  # admitted while A2 is current
    removed, _ = w.a1.devices.remove("a2", now=NOW + 1)
    w.net.deliver(w.a1.fan.accept_own_list(removed.compact))
    # A2's sync key (held by whoever kept A2) writes no more: what is stamped at or
    # after the removal's time is refused at every device, nothing stored.
    late = forged(a2_sync, w, [written.id], timestamp=NOW + 1)
    for d in (w.a1, w.b1, w.b2):
        here = directs.by_did[d.did]
        with pytest.raises(NotADeviceError):
            here._admit(late)
        assert not here.store.has(late.conversation, [late.id])
    # What A2 wrote while current stays in every history.
    assert directs.texts(w.b1, w.a) == ["before the removal"]
