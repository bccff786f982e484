"""The per-peer sync state machine (after Briar's BSP) and the node that runs one per peer.

Pure logic: no network, no clock of its own.  The caller gives ``now`` (seconds, any
monotonic origin) to every call, carries the batches :meth:`SyncNode.poll` returns to
the peer by any transport (lossy, reordering and duplicating ones included), and hands
what arrives to :meth:`SyncNode.receive`.

Per (peer, conversation), a :class:`PeerSync` keeps:

- *offers*: delivered messages the peer is not known to hold, each with its next
  (re)offer time; offered again with exponential backoff until the peer acks, offers
  or requests it;
- *sends*: messages the peer requested, sent at the next poll (then offered again
  after the timeout unless acked, so a lost message is noticed);
- *requests*: messages wanted from the peer (offered by it, or parents missing
  under a message it sent), requested again with backoff until they arrive;
- *acks*: messages to acknowledge (received, or offered and already held).

What a peer holds is remembered in the store (``peer_has``), so a restart does not
re-offer everything.  A peer whose store went back in time (restored from an old
backup) asks for a message it once acked: that request is the sign, and the ancestors
of that message are offered to it again (up to ``recovery_window`` per request), so
it catches up without anything else noticing.  Heads are offered on every
:meth:`PeerSync.start` and every ``heads_every`` seconds even to a peer believed to
hold them, which is how such a peer finds out what it lost.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.sync.errors import NotAdmittedError, SyncError
from agent.sync.messages import Message
from agent.sync.records import (
    MAX_BATCH_BYTES,
    MAX_IDS,
    MAX_RECORD_BYTES,
    IdsRecord,
    MessageRecord,
    Record,
    RecordType,
    ids_records,
    pack_batch,
    parse_batch,
    record_size,
)
from agent.sync.store import SyncStore


@dataclass(frozen=True)
class Limits:
    """Bounds of the state machine; defaults suit relationship messages of 64 KiB."""

    max_batch_bytes: int = 40 * 1024  # base64 of it fits a 64 KiB relationship message
    retransmit_after: float = 30.0  # first retransmission of an unanswered offer/request
    max_backoff: float = 3600.0
    heads_every: float = 600.0
    max_pending_sends: int = 4096
    max_pending_requests: int = 4096
    recovery_window: int = 1024

    def backoff(self, count: int) -> float:
        return float(min(self.retransmit_after * 2 ** min(count, 20), self.max_backoff))


class _Schedule:
    """Ids with a due time and a try count; a heap with lazy deletion."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, int]] = {}
        self._heap: list[tuple[float, str, int]] = []

    def __contains__(self, mid: object) -> bool:
        return mid in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, mid: str, due: float, count: int) -> None:
        self._entries[mid] = (due, count)
        heapq.heappush(self._heap, (due, mid, count))
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [(d, m, c) for m, (d, c) in self._entries.items()]
            heapq.heapify(self._heap)

    def discard(self, mid: str) -> None:
        self._entries.pop(mid, None)

    def take_due(self, now: float, limit: int) -> list[tuple[str, int]]:
        """Up to ``limit`` due ids (earliest first), removed: the caller puts them back."""
        out: list[tuple[str, int]] = []
        while self._heap and len(out) < limit and self._heap[0][0] <= now:
            due, mid, count = heapq.heappop(self._heap)
            if self._entries.get(mid) == (due, count):
                del self._entries[mid]
                out.append((mid, count))
        return out


@dataclass
class _Budget:
    left: int

    def fits(self, record: Record) -> bool:
        size = record_size(record)
        if size > self.left:
            return False
        self.left -= size
        return True


class PeerSync:
    """The sync state of one conversation with one peer (module docstring)."""

    def __init__(
        self, store: SyncStore, conversation: str, peer: str, limits: Limits, now: float
    ) -> None:
        self.store, self.conversation, self.peer, self.limits = store, conversation, peer, limits
        self._offers = _Schedule()
        self._requests = _Schedule()
        self._sends: dict[str, None] = {}
        self._acks: dict[str, None] = {}
        self._heads_due = now
        self.start(now)

    def start(self, now: float) -> None:
        """(Re)connected: offer what the peer may lack, our heads, and ask for what we miss."""
        for mid in self.store.unknown_to(self.conversation, self.peer):
            self._offers.put(mid, now, 0)
        self._heads_due = now
        self._ask_missing(now, restart=True)

    def _ask_missing(self, now: float, *, restart: bool = False) -> None:
        """Ask this peer for every parent that waiting messages miss: normally they are
        asked of the peer that sent the child, but that one may have lost them."""
        for mid in self.store.missing(self.conversation, self.limits.max_pending_requests):
            if restart or mid not in self._requests:
                self._requests.put(mid, now, 0)

    # -- what arrives ----------------------------------------------------------------

    def on_ids(self, record: IdsRecord, now: float, refused: set[str]) -> None:
        ids = list(record.ids)
        if record.kind is RecordType.ACK:
            self._peer_has(ids)
        elif record.kind is RecordType.OFFER:
            self._peer_has(ids)
            held = self.store.has(self.conversation, ids) | (refused & set(ids))
            for mid in ids:
                if mid in held:
                    self._acks[mid] = None
                elif mid not in self._requests and len(self._requests) < (
                    self.limits.max_pending_requests
                ):
                    self._requests.put(mid, now, 0)
        elif record.kind is RecordType.REQUEST:
            self._on_request(ids, now)

    def _on_request(self, ids: list[str], now: float) -> None:
        held = self.store.has(self.conversation, ids)
        stale = self.store.peer_has(self.conversation, self.peer, held)
        for mid in stale:
            # The peer acked this once and wants it now: its store went back in time.
            lost = self.store.ancestors(self.conversation, mid)[: self.limits.recovery_window]
            self.store.forget_peer_has(self.conversation, self.peer, lost)
            for ancestor in lost:
                if ancestor not in self._offers and ancestor not in held:
                    self._offers.put(ancestor, now, 0)
        for mid in ids:
            if mid in held and len(self._sends) < self.limits.max_pending_sends:
                self._sends[mid] = None
                self._offers.discard(mid)

    def on_messages(self, received: list[str], missing: list[str], now: float) -> None:
        """Messages this peer sent arrived (stored or already held); ack, ask for parents."""
        self._peer_has(received)
        for mid in received:
            self._acks[mid] = None
        for mid in missing:
            if mid not in self._requests and len(self._requests) < (
                self.limits.max_pending_requests
            ):
                self._requests.put(mid, now, 0)

    def on_delivered(self, ids: Iterable[str], now: float) -> None:
        """New messages are delivered here (posted, or from any peer): offer those it lacks."""
        ids = list(ids)
        known = self.store.peer_has(self.conversation, self.peer, ids)
        for mid in ids:
            self._requests.discard(mid)
            if mid not in known and mid not in self._offers:
                self._offers.put(mid, now, 0)

    def push(self, ids: Iterable[str]) -> None:
        """Send these at the next poll without waiting for a request (BSP's eager
        sending): one round trip instead of three for a message the peer surely lacks."""
        for mid in ids:
            if len(self._sends) >= self.limits.max_pending_sends:
                break
            self._sends[mid] = None
            self._offers.discard(mid)

    def _peer_has(self, ids: list[str]) -> None:
        self.store.mark_peer_has(self.conversation, self.peer, ids)
        for mid in ids:
            self._offers.discard(mid)
            self._sends.pop(mid, None)

    # -- what goes out ---------------------------------------------------------------

    def poll(self, now: float, budget: _Budget) -> list[Record]:
        """Records due now, within ``budget``: acks, requests, messages, then offers."""
        out: list[Record] = []
        conv = self.conversation
        if self._heads_due <= now:
            self._ask_missing(now)
        while self._acks:
            chunk = list(self._acks)[:MAX_IDS]
            (record,) = ids_records(RecordType.ACK, conv, chunk)
            if not budget.fits(record):
                return out
            out.append(record)
            for mid in chunk:
                del self._acks[mid]
        while due := self._requests.take_due(now, MAX_IDS):
            wanted = [m for m, _ in due]
            held = self.store.has(conv, wanted)
            want = [(m, c) for m, c in due if m not in held]
            if not want:
                continue
            (record,) = ids_records(RecordType.REQUEST, conv, [m for m, _ in want])
            if not budget.fits(record):
                for mid, count in want:
                    self._requests.put(mid, now, count)
                return out
            out.append(record)
            for mid, count in want:
                self._requests.put(mid, now + self.limits.backoff(count), count + 1)
        for mid in list(self._sends):
            found = self.store.get(conv, [mid])
            if not found:
                del self._sends[mid]
                continue
            message = found[0]
            message_record = MessageRecord(message)
            if not budget.fits(message_record):
                return out
            out.append(message_record)
            del self._sends[mid]
            # Offered again if no ack comes back: a lost message is then noticed.
            self._offers.put(mid, now + self.limits.retransmit_after, 1)
        if self._heads_due <= now:
            heads = self.store.heads(conv)
            records = ids_records(RecordType.OFFER, conv, heads) if heads else []
            if sum(record_size(r) for r in records) > budget.left:
                return out
            for record in records:
                budget.fits(record)
                out.append(record)
            self._heads_due = now + self.limits.heads_every
        while due := self._offers.take_due(now, MAX_IDS):
            (record,) = ids_records(RecordType.OFFER, conv, [m for m, _ in due])
            if not budget.fits(record):
                for mid, count in due:
                    self._offers.put(mid, now, count)
                return out
            out.append(record)
            for mid, count in due:
                self._offers.put(mid, now + self.limits.backoff(count), count + 1)
        return out

    @property
    def idle(self) -> bool:
        """Nothing queued but timed retransmissions."""
        return not self._acks and not self._sends


@dataclass
class ReceiveResult:
    """What one batch did: messages newly shown (in delivery order) and what was skipped."""

    delivered: list[Message] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # id -> error code
    ignored_records: int = 0  # for conversations not open with this peer


Admit = Callable[[Message], None]


class SyncNode:
    """One device's sync engine: a store, and a :class:`PeerSync` per open (peer, conversation).

    ``admit`` is the conversation's rule for who may write (the groups layer's member
    check); it raises :class:`NotAdmittedError` to refuse a verified message.
    """

    def __init__(
        self, store: SyncStore, *, limits: Limits | None = None, admit: Admit | None = None
    ) -> None:
        self.store = store
        self.limits = limits or Limits()
        self.admit = admit
        self._peers: dict[tuple[str, str], PeerSync] = {}
        self._refused: dict[str, set[str]] = {}
        smallest = 1 + 4 + MAX_RECORD_BYTES  # the largest message must fit a batch alone
        if not smallest <= self.limits.max_batch_bytes <= MAX_BATCH_BYTES:
            raise SyncError(f"max_batch_bytes is {smallest} to {MAX_BATCH_BYTES}")

    def open(self, peer: str, conversation: str, now: float) -> PeerSync:
        """Sync ``conversation`` with ``peer`` from now on (idempotent: restarts it)."""
        key = (peer, conversation)
        sync = self._peers.get(key)
        if sync is None:
            sync = self._peers[key] = PeerSync(self.store, conversation, peer, self.limits, now)
        else:
            sync.start(now)
        return sync

    def close(self, peer: str, conversation: str) -> None:
        """Stop syncing ``conversation`` with ``peer`` (a removed member or device)."""
        self._peers.pop((peer, conversation), None)

    def reconnect(self, peer: str, now: float) -> None:
        """The peer is reachable again: restart every conversation with it."""
        for (name, _), sync in self._peers.items():
            if name == peer:
                sync.start(now)

    def peers(self, conversation: str) -> list[str]:
        return [p for (p, c) in self._peers if c == conversation]

    def push(self, peer: str, conversation: str, ids: Iterable[str]) -> None:
        """Send these messages to ``peer`` at its next poll, unasked (if the pair is open)."""
        sync = self._peers.get((peer, conversation))
        if sync is not None:
            sync.push(ids)

    def post(self, message: Message, now: float) -> list[Message]:
        """Store a message this device authored (or got from outside sync); offer it."""
        result = self.store.add([message])
        self._announce(message.conversation, [m.id for m in result.delivered], now)
        return result.delivered

    def _announce(self, conversation: str, ids: list[str], now: float) -> None:
        if ids:
            for (_, conv), sync in self._peers.items():
                if conv == conversation:
                    sync.on_delivered(ids, now)

    def poll(self, peer: str, now: float) -> bytes | None:
        """The next batch for ``peer``, or None when nothing is due."""
        budget = _Budget(self.limits.max_batch_bytes - 1)
        records: list[Record] = []
        for (name, _), sync in self._peers.items():
            if name == peer:
                records.extend(sync.poll(now, budget))
        return pack_batch(records) if records else None

    def receive(self, peer: str, batch: bytes, now: float) -> ReceiveResult:
        """Apply a batch from ``peer``; a malformed batch raises and changes nothing."""
        records = parse_batch(batch)
        result = ReceiveResult()
        admitted: list[Message] = []
        by_conv: dict[str, list[str]] = {}
        for record in records:
            if (peer, record.conversation) not in self._peers:
                result.ignored_records += 1
            elif isinstance(record, MessageRecord):
                message = record.message
                by_conv.setdefault(message.conversation, []).append(message.id)
                try:
                    if self.admit is not None:
                        self.admit(message)
                except NotAdmittedError as exc:
                    result.refused[message.id] = exc.code
                    self._refused.setdefault(message.conversation, set()).add(message.id)
                    continue
                admitted.append(message)
        added = self.store.add(admitted)
        result.delivered, result.stored, result.waiting = (
            added.delivered,
            added.stored,
            added.waiting,
        )
        full = set(added.full)
        missing_by_conv: dict[str, list[str]] = {}
        waiting, missing = set(added.waiting), set(added.missing)
        for message in admitted:
            if message.id in waiting:
                missing_by_conv.setdefault(message.conversation, []).extend(
                    p for p in message.parents if p in missing
                )
        for record in records:
            sync = self._peers.get((peer, record.conversation))
            if sync is not None and isinstance(record, IdsRecord):
                sync.on_ids(record, now, self._refused.get(record.conversation, set()))
        for conv, ids in by_conv.items():
            sync = self._peers[(peer, conv)]
            sync.on_messages([i for i in ids if i not in full], missing_by_conv.get(conv, []), now)
        delivered_by_conv: dict[str, list[str]] = {}
        for message in added.delivered:
            delivered_by_conv.setdefault(message.conversation, []).append(message.id)
        for conv, ids in delivered_by_conv.items():
            self._announce(conv, ids, now)
        return result
