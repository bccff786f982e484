"""The sync store: causal delivery, heads, one history per set of messages, crash safety."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sync.errors import StoreError
from agent.sync.ids import new_conversation_id
from agent.sync.messages import Message
from agent.sync.store import SyncStore

from .dag import random_dag
from .integrity import check_store
from .keys import DeviceKey

CONV = new_conversation_id()
DAG = random_dag(CONV, 40, random.Random(7))


def shown_in_causal_order(delivered: list[Message]) -> None:
    seen: set[str] = set()
    for message in delivered:
        assert set(message.parents) <= seen, "a message shown before one of its parents"
        seen.add(message.id)


def test_messages_wait_for_their_parents_then_are_delivered_parents_first() -> None:
    store = SyncStore(":memory:")
    key = DeviceKey.ed25519()
    a = Message.create(key, conversation=CONV, parents=[], content_type="t", body=b"a",
                       timestamp=1)  # fmt: skip
    b = Message.create(key, conversation=CONV, parents=[a.id], content_type="t", body=b"b",
                       timestamp=2)  # fmt: skip
    c = Message.create(key, conversation=CONV, parents=[a.id, b.id], content_type="t",
                       body=b"c", timestamp=3)  # fmt: skip
    first = store.add([c])
    assert first.stored == [c.id] and first.delivered == [] and first.waiting == [c.id]
    assert sorted(first.missing) == sorted([a.id, b.id])
    assert store.heads(CONV) == [] and store.waiting(CONV) == [c.id]
    assert sorted(store.missing(CONV)) == sorted([a.id, b.id])
    second = store.add([b, b])
    assert second.delivered == [] and second.missing == [a.id]
    third = store.add([a])
    assert [m.id for m in third.delivered] == [a.id, b.id, c.id]
    assert store.heads(CONV) == [c.id] and store.waiting(CONV) == []
    assert store.add([a, b, c]).stored == []  # duplicates change nothing
    assert store.history(CONV) == [a.id, b.id, c.id]
    assert [m.id for _, m in store.delivered(CONV, after=1)] == [b.id, c.id]
    assert sorted(store.ancestors(CONV, c.id)) == sorted([a.id, b.id, c.id])
    check_store(store._db)


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 5))
def test_any_arrival_order_gives_the_same_history_hash(rng: random.Random, batches: int) -> None:
    reference = SyncStore(":memory:")
    reference.add(DAG)
    shuffled = DAG[:]
    rng.shuffle(shuffled)
    store = SyncStore(":memory:")
    shown: list[Message] = []
    cuts = sorted(rng.sample(range(1, len(DAG)), batches - 1)) if batches > 1 else []
    for part in (shuffled[i:j] for i, j in zip([0, *cuts], [*cuts, len(DAG)], strict=True)):
        shown.extend(store.add(part).delivered)
    shown_in_causal_order(shown)
    assert len(shown) == len(DAG)
    assert [m.id for m in shown] == store.delivered_ids(CONV)
    assert store.history(CONV) == reference.history(CONV)
    assert store.history_hash(CONV) == reference.history_hash(CONV)
    assert store.heads(CONV) == reference.heads(CONV)
    check_store(store._db)


def test_history_is_a_linear_extension_with_a_deterministic_tie_break() -> None:
    store = SyncStore(":memory:")
    store.add(DAG)
    history = store.history(CONV)
    by_id = {m.id: m for m in DAG}
    shown_in_causal_order([by_id[i] for i in history])
    assert store.history_hash(CONV) != SyncStore(":memory:").history_hash(CONV)


def test_waiting_messages_are_bounded() -> None:
    store = SyncStore(":memory:", max_waiting=3)
    orphans = [m for m in DAG if m.parents][:5]
    result = store.add(orphans)
    assert len(result.stored) == 3 and result.full == [m.id for m in orphans[3:]]


def test_peer_knowledge_is_remembered_and_can_be_forgotten(tmp_path: Path) -> None:
    store = SyncStore(tmp_path / "sync.db")
    store.add(DAG[:5])
    ids = store.delivered_ids(CONV)
    store.mark_peer_has(CONV, "blair", ids[:2])
    store.close()
    store = SyncStore(tmp_path / "sync.db")
    assert store.unknown_to(CONV, "blair") == ids[2:]
    assert store.peer_has(CONV, "blair", ids) == set(ids[:2])
    store.forget_peer_has(CONV, "blair", ids[:1])
    assert store.unknown_to(CONV, "blair") == [ids[0], *ids[2:]]
    assert store.unknown_to(CONV, "casey") == ids


def test_backup_is_a_consistent_copy(tmp_path: Path) -> None:
    store = SyncStore(tmp_path / "sync.db")
    store.add(DAG[:10])
    store.backup(tmp_path / "copy.db")
    store.add(DAG[10:])
    copy = SyncStore(tmp_path / "copy.db")
    assert len(copy.history(CONV)) == len(SyncStore(":memory:").add(DAG[:10]).delivered)
    check_store(tmp_path / "copy.db")


def test_a_database_that_is_not_a_sync_store_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError):
        SyncStore(other)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(StoreError):
        SyncStore(garbage)


_WRITER = """
import random, sys
from agent.sync.messages import Message
from agent.sync.store import SyncStore
from tests.agent.sync.keys import DeviceKey
store = SyncStore(sys.argv[1])
conv, key, rng = sys.argv[2], DeviceKey.ed25519(), random.Random(int(sys.argv[3]))
heads = []
for n in range(10_000):
    batch = []
    for i in range(20):
        m = Message.create(key, conversation=conv, parents=heads, content_type="t",
                           body=f"batch-{n}-{i}".encode(), timestamp=n)
        heads = [m.id]
        batch.append(m)
    rng.shuffle(batch)  # the batch's deliveries happen inside its transaction
    store.add(batch)
    if n == 0:
        print("ready", flush=True)
"""


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_crash_leaves_whole_batches_only(tmp_path: Path, seed: int) -> None:
    path = tmp_path / "sync.db"
    conv = new_conversation_id()
    root = Path(__file__).resolve().parents[3]
    child = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path), conv, str(seed)],
        cwd=root,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        time.sleep(random.Random(seed).uniform(0.05, 0.4))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    delivered = check_store(path)[conv]
    store = SyncStore(path)
    batches: dict[str, int] = {}
    for _, message in store.delivered(conv):
        tag = message.body.decode().rsplit("-", 1)[0]
        batches[tag] = batches.get(tag, 0) + 1
    assert store.waiting(conv) == []  # each batch is a whole chain: all or nothing
    assert set(batches.values()) == {20} and len(delivered) == 20 * len(batches)
    assert len(store.heads(conv)) == 1


def test_the_store_file_is_owner_only(tmp_path: Path) -> None:
    store = SyncStore(tmp_path / "sync.db")
    store.add(DAG[:3])
    for name in ("sync.db", "sync.db-wal"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600
