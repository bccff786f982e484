"""Sync stores sealed at rest: bodies unreadable without the key, rows bound to their place."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from agent.sync.errors import StoreError
from agent.sync.ids import new_conversation_id
from agent.sync.messages import Message
from agent.sync.sealing import StoreSealer
from agent.sync.store import SyncStore

from .keys import DeviceKey

CONV = new_conversation_id()
SECRET = b"meet at the north gate at nine"


def chain(bodies: list[bytes]) -> list[Message]:
    key = DeviceKey.ed25519()
    out: list[Message] = []
    for n, body in enumerate(bodies):
        parents = [out[-1].id] if out else []
        out.append(
            Message.create(
                key,
                conversation=CONV,
                parents=parents,
                content_type="text/plain",
                body=body,
                timestamp=n + 1,
            )
        )
    return out


def on_disk(path: Path) -> bytes:
    """Every byte of the store's files (the database, its WAL and shared memory)."""
    return b"".join(p.read_bytes() for p in path.parent.iterdir() if p.name.startswith(path.name))


def test_a_sealed_store_keeps_no_body_in_the_clear(tmp_path: Path) -> None:
    path = tmp_path / "sync.db"
    sealer = StoreSealer(os.urandom(32))
    messages = chain([SECRET, b"second " + SECRET])
    store = SyncStore(path, sealer=sealer)
    assert store.sealed
    assert [m.body for m in store.add(messages).delivered] == [m.body for m in messages]
    store.close()
    assert SECRET not in on_disk(path)

    store = SyncStore(path, sealer=sealer)
    assert [m.body for _, m in store.delivered(CONV)] == [SECRET, b"second " + SECRET]
    assert [m.id for m in store.get(CONV, [messages[1].id])] == [messages[1].id]
    store.close()


def test_a_sealed_store_opens_only_with_its_key(tmp_path: Path) -> None:
    path = tmp_path / "sync.db"
    SyncStore(path, sealer=StoreSealer(os.urandom(32))).close()
    with pytest.raises(StoreError, match="sealed messages"):
        SyncStore(path)
    with pytest.raises(StoreError, match="another key"):
        SyncStore(path, sealer=StoreSealer(os.urandom(32)))


def test_a_sealed_row_moved_to_another_message_does_not_open(tmp_path: Path) -> None:
    path = tmp_path / "sync.db"
    sealer = StoreSealer(os.urandom(32))
    first, second = chain([b"one", b"two"])
    store = SyncStore(path, sealer=sealer)
    store.add([first, second])
    store.close()
    with sqlite3.connect(path) as db:  # the second row's blob put in the first's place
        blob = db.execute("SELECT encoded FROM messages WHERE ts = 2").fetchone()[0]
        db.execute("UPDATE messages SET encoded = ? WHERE ts = 1", (blob,))
    store = SyncStore(path, sealer=sealer)
    with pytest.raises(StoreError, match="does not authenticate"):
        store.get(CONV, [first.id])
    assert [m.body for m in store.get(CONV, [second.id])] == [b"two"]
    store.close()


def test_a_store_written_in_the_clear_is_sealed_when_first_opened_with_a_key(
    tmp_path: Path,
) -> None:
    path = tmp_path / "sync.db"
    messages = chain([SECRET, b"after"])
    store = SyncStore(path)
    store.add(messages)
    heads = store.heads(CONV)
    store.close()
    assert SECRET in on_disk(path)
    with sqlite3.connect(path) as db:  # as a store of the version before sealing
        db.execute("DROP TABLE store_meta")
        db.execute("PRAGMA user_version = 1")

    sealer = StoreSealer(os.urandom(32))
    store = SyncStore(path, sealer=sealer)
    assert store.sealed and store.heads(CONV) == heads
    assert [m.body for _, m in store.delivered(CONV)] == [SECRET, b"after"]
    store.close()
    assert SECRET not in on_disk(path)  # vacuumed: no free page keeps the old body
    with pytest.raises(StoreError, match="sealed messages"):
        SyncStore(path)
