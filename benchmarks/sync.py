"""Benchmark: a device that was offline for 1,000 messages catches up (agent/sync).

What it answers
* **Catch-up cost.** Device A holds a conversation of 100 messages that B also holds,
  then 1,000 more written while B was offline (100-byte bodies, Ed25519-signed, a
  chain with a few concurrent branches).  B comes back: the two SyncNodes exchange
  batches over an in-memory transport (lossless, in order) until neither has
  anything to send.  Reported: wall time, batches and round trips, bytes each way,
  and the bytes per caught-up message.
* **Against a raw copy.** The same 1,000 encoded messages read from A's database and
  inserted into an empty SQLite table with raw ``sqlite3`` (same pragmas, WAL and
  ``synchronous=FULL``, and as many commits as the sync run's message batches):
  what the protocol costs (offers, requests, acks, signature checks, causal delivery
  bookkeeping) over moving the bytes.
* **Sealing at rest.** The same catch-up with both stores sealed (as an owner's stores
  are: every body under AES-256-GCM, agent/sync/sealing.py), side by side: what
  sealing costs a catch-up.

Both sides use durable stores on disk; signing the 1,000 messages is not timed.
Run it as::

    .venv/bin/python benchmarks/sync.py [--messages N] [--repeat N] [--json OUT]
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import harness  # noqa: E402
from harness import median, progress  # noqa: E402

from agent.relationships.delivery import HolderKey  # noqa: E402
from agent.sync import Message, SyncNode, SyncStore, new_conversation_id  # noqa: E402
from agent.sync.sealing import StoreSealer  # noqa: E402

PREFIX = 100
BODY = b"m" * 100


def author(conversation: str, count: int, seed: int) -> list[Message]:
    """A conversation written by three devices; mostly a chain, sometimes concurrent."""
    rng = random.Random(seed)
    keys = [HolderKey.generate() for _ in range(3)]
    heads: list[str] = []
    out = []
    for i in range(count):
        parents = heads if rng.random() < 0.9 else heads[:1]
        message = Message.create(
            rng.choice(keys),
            conversation=conversation,
            parents=parents,
            content_type="text/plain",
            body=BODY,
            timestamp=1_700_000_000_000 + i,
        )
        heads = sorted({*heads, message.id} - set(parents))
        out.append(message)
    return out


def catch_up(directory: Path, messages: list[Message], *, sealed: bool = False) -> dict[str, Any]:
    conversation = messages[0].conversation

    def sealer() -> StoreSealer | None:
        return StoreSealer(os.urandom(32)) if sealed else None

    a = SyncNode(SyncStore(directory / "a.db", sealer=sealer()))
    b = SyncNode(SyncStore(directory / "b.db", sealer=sealer()))
    for message in messages[:PREFIX]:
        a.post(message, 0)
        b.post(message, 0)
    a.store.mark_peer_has(conversation, "b", [m.id for m in messages[:PREFIX]])
    b.store.mark_peer_has(conversation, "a", [m.id for m in messages[:PREFIX]])
    for message in messages[PREFIX:]:
        a.post(message, 0)  # written while b was away
    bytes_ab = bytes_ba = batches = rounds = message_batches = 0
    start = time.perf_counter()
    a.open("b", conversation, 0)
    b.open("a", conversation, 0)
    while True:
        moved = False
        for src, dst, name, peer in ((a, b, "a", "b"), (b, a, "b", "a")):
            while (batch := src.poll(peer, 0)) is not None:
                moved = True
                batches += 1
                if src is a:
                    bytes_ab += len(batch)
                else:
                    bytes_ba += len(batch)
                if dst.receive(name, batch, 0).stored:
                    message_batches += 1
        if not moved:
            break
        rounds += 1
    seconds = time.perf_counter() - start
    assert b.store.history_hash(conversation) == a.store.history_hash(conversation)
    assert len(b.store.history(conversation)) == len(messages)
    a.store.close()
    b.store.close()
    return {
        "seconds": seconds,
        "batches": batches,
        "message_batches": message_batches,
        "round_trips": rounds,
        "bytes_to_b": bytes_ab,
        "bytes_to_a": bytes_ba,
    }


def raw_copy(directory: Path, messages: list[Message], commits: int) -> float:
    rows = [(m.id.encode(), m.encoded) for m in messages[PREFIX:]]
    db = sqlite3.connect(str(directory / "raw.db"), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE messages (id BLOB PRIMARY KEY, encoded BLOB NOT NULL)")
    size = -(-len(rows) // max(commits, 1))
    start = time.perf_counter()
    for i in range(0, len(rows), size):
        db.execute("BEGIN")
        db.executemany("INSERT INTO messages VALUES (?, ?)", rows[i : i + size])
        db.execute("COMMIT")
    seconds = time.perf_counter() - start
    db.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=harness.positive_int, default=1000)
    parser.add_argument("--repeat", type=harness.positive_int, default=5)
    parser.add_argument("--json", type=Path, metavar="OUT")
    args = parser.parse_args()
    result: dict[str, Any] = {"machine": harness.machine(), "messages": args.messages}
    conversation = new_conversation_id()
    messages = author(conversation, PREFIX + args.messages, seed=1)
    payload = sum(len(m.encoded) for m in messages[PREFIX:])
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="janus-bench-sync-") as tmp:
            run = catch_up(Path(tmp), messages)
            run["raw_seconds"] = raw_copy(Path(tmp), messages, run["message_batches"])
        with tempfile.TemporaryDirectory(prefix="janus-bench-sync-") as tmp:
            run["sealed_seconds"] = catch_up(Path(tmp), messages, sealed=True)["seconds"]
        progress(
            f"run {i + 1}: sync {run['seconds']:.3f} s, sealed {run['sealed_seconds']:.3f} s,"
            f" raw {run['raw_seconds']:.4f} s"
        )
        runs.append(run)
    sync_s = median([r["seconds"] for r in runs])
    raw_s = median([r["raw_seconds"] for r in runs])
    sealed_ratio = median([r["sealed_seconds"] / r["seconds"] for r in runs])
    last = runs[-1]
    total = last["bytes_to_b"] + last["bytes_to_a"]
    summary = {
        "sync_seconds": sync_s,
        "raw_seconds": raw_s,
        "time_ratio": sync_s / raw_s,
        "sealed_seconds": median([r["sealed_seconds"] for r in runs]),
        "sealed_over_plain": sealed_ratio,
        "messages_per_second": args.messages / sync_s,
        "payload_bytes": payload,
        "sync_bytes": total,
        "bytes_ratio": total / payload,
        "batches": last["batches"],
        "round_trips": last["round_trips"],
        "bytes_to_b": last["bytes_to_b"],
        "bytes_to_a": last["bytes_to_a"],
    }
    result |= {"runs": runs, "summary": summary}
    print(f"catch-up of {args.messages} messages (medians of {args.repeat} runs)")
    print(f"{'':28}{'sync protocol':>16}{'raw sqlite3 copy':>18}{'ratio':>8}")
    print(f"{'time (s)':28}{sync_s:>16.3f}{raw_s:>18.4f}{sync_s / raw_s:>8.1f}")
    print(f"{'bytes':28}{total:>16,}{payload:>18,}{total / payload:>8.2f}")
    print(
        f"sealed stores: {summary['sealed_seconds']:.3f} s, {sealed_ratio:.2f}x the plain"
        " stores' time (median of per-run ratios)"
    )
    print(
        f"messages/s: {args.messages / sync_s:,.0f}; batches: {last['batches']}, round trips: "
        f"{last['round_trips']}; bytes A→B {last['bytes_to_b']:,}, B→A {last['bytes_to_a']:,}"
    )
    if args.json:
        harness.write_json(args.json, result)


if __name__ == "__main__":
    main()
