"""1:1 conversations as sync conversations between every device of the two owners.

With devices, a conversation between two owners is one sync conversation
(sync-protocol.md) whose sync peers are *devices*: every device of both owners holds
the same causal log of immutable, hash-named messages, and any device that missed
something (offline, added later, a message sent while its session was not open yet)
catches up from any other by offers and requests.  Batches ride device-pair sessions
(one fan-out message of type ``SYNC_TYPE`` to one device), so a message that arrives by
several paths (from its author and relayed by another device) is stored once.

- **Conversation id**: SHA-256 of the two owners' root dids (sorted), so both sides
  name it alike without agreeing on anything.
- **Author**: the writing device's sync key (agent/sync/device_sync_key.py), certified
  once by the device's key: the token signs that certificate, never a message.  The
  certificates of a batch's authors travel in the batch (``keys``); a message is
  admitted only if its author is a sync key certified by a device of one of the two
  owners (or, as written before sync keys, a device's own key) that is current, or
  was removed after the message's time (``DeviceList.admits_author``).
- **Sync peers** are named ``DEVICE|OWNER`` (the device, and the peer owner whose
  conversation it is): one poll makes one batch for one device and one conversation.

Retransmission is driven by the owner's commands, as for groups: every ``rel send`` and
``rel receive`` re-opens each (device, conversation) pair, which offers what the device
is not known to hold and asks for missing parents.  A batch that would only offer heads
the device is known to hold goes to it only when its session is new (opened, or
re-opened by a device restored from an old backup) or at most once an hour (``HEADS_EVERY``,
as for groups): that offer is how a restored device learns what it lost, and asks for
it; idle conversations cost nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Final

from agent.didcomm.message import Message as DIDCommMessage
from agent.relationships.manager import SYNC_TYPE
from agent.relationships.vault import Vault
from agent.sync.device_sync_key import DeviceSyncKeys
from agent.sync.errors import NotAdmittedError
from agent.sync.fanout import FanoutNode, Outgoing
from agent.sync.groups import HEADS_EVERY
from agent.sync.ids import id_text
from agent.sync.messages import Message
from agent.sync.protocol import SyncNode
from agent.sync.sealing import StoreSealer
from agent.sync.store import SyncStore
from agent.sync.transport import summarize, worth_sending
from janus_hsm import b64url
from janus_hsm.provider import KeyHandle

DIRECT_DB: Final = "direct.db"
#: A 1:1 message's content type: the DIDComm plaintext message, as JSON.
CONTENT_TYPE: Final = "application/didcomm-plain+json"
BATCH_VERSION: Final = 1
#: Vault kind of the last heads offer per device: ``{"session": digest, "at": time}``.
HEADS_KIND: Final = "direct_heads"


class NotADeviceError(NotAdmittedError):
    code = "direct_author_not_a_device"


def conversation_id(one: str, other: str) -> str:
    a, b = sorted((one, other))
    return id_text(hashlib.sha256(f"janus/direct/1\0{a}\0{b}".encode()).digest())


class Direct:
    """One device's 1:1 conversations with every peer owner its fan-out node knows."""

    def __init__(
        self,
        directory: Path,
        node: FanoutNode,
        keys: DeviceSyncKeys | None = None,
        vault: Vault | None = None,
    ) -> None:
        """``vault`` keeps when heads were last offered to each device (in memory
        without one)."""
        directory.mkdir(mode=0o700, exist_ok=True)
        sealer = None if vault is None else StoreSealer.of_vault(vault)
        self.store = SyncStore(directory / DIRECT_DB, sealer=sealer)
        self.node = node
        self.keys = DeviceSyncKeys() if keys is None else keys
        self.vault = vault
        self._heads: dict[str, bytes] = {}
        self.sync = SyncNode(self.store, admit=self._admit)
        self.peers = {conversation_id(node.owner, p): p for p in node.peers()}
        self._open(time.time())

    def close(self) -> None:
        self.store.close()

    def _open(self, now: float) -> None:
        """Every (device, conversation) pair with a live session, (re)started."""
        if self.node.removed:
            return
        for conv, peer in self.peers.items():
            for device in self._devices(peer):
                self.sync.open(f"{device}|{peer}", conv, now)

    def _devices(self, peer: str) -> list[str]:
        return sorted(
            {s.device for owner in (peer, self.node.owner) for s in self.node.views[owner].live()}
        )

    def _admit(self, message: Message) -> None:
        peer = self.peers.get(message.conversation)
        if peer is None:
            raise NotADeviceError("a message of no conversation here")
        device = self.device_of(message.author)
        if not any(
            self.node.views[o].current.admits_author(device, message.timestamp)
            for o in (peer, self.node.owner)
        ):
            raise NotADeviceError(
                "the author is no sync key of a device of the two owners that was current "
                "when the message was written"
            )

    def device_of(self, author: str) -> str:
        """The device a message's author stands for (its certified sync key's device)."""
        return self.keys.device_of(author) or author

    def _known_device(self, did: str) -> bool:
        return any(any(e.did == did for e in v.current.entries()) for v in self.node.views.values())

    # --- writing and taking ------------------------------------------------------------

    def post(self, key: KeyHandle, peer: str, message: DIDCommMessage) -> Message:
        """A new message of this device (``key``: the device's key, which certifies its
        sync key once) in the conversation with ``peer`` (its parents: the current
        heads), signed by the sync key, stored, and pushed to every device."""
        conv = conversation_id(self.node.owner, peer)
        written = Message.create(
            self.keys.signer(key),
            conversation=conv,
            parents=self.store.heads(conv),
            content_type=CONTENT_TYPE,
            body=json.dumps(message.to_dict(), sort_keys=True).encode(),
            timestamp=int(time.time()),
        )
        self.sync.post(written, time.time())
        for device in self._devices(peer):
            self.sync.push(f"{device}|{peer}", conv, [written.id])
        return written

    def take(self, device: str, peer: str, body: Any) -> list[Message]:
        """A batch from ``device`` for the conversation with ``peer``: the messages it
        made deliverable (in causal order); a malformed batch raises, nothing changed."""
        from agent.sync.group_errors import MalformedEnvelopeError

        if (
            not isinstance(body, dict)
            or set(body) - {"keys"} != {"v", "batch"}
            or body["v"] != BATCH_VERSION
        ):
            raise MalformedEnvelopeError("a direct sync batch is {'v': 1, 'batch', 'keys'}")
        raw = body["batch"]
        if not isinstance(raw, str):
            raise MalformedEnvelopeError("a direct sync batch is base64url text")
        batch = b64url.decode(raw, "the batch", error=MalformedEnvelopeError)
        name = f"{device}|{peer}"
        if name not in {p for c in self.peers for p in self.sync.peers(c)}:
            return []  # no session with it any more (a removed device): ignored
        # Verified all before any is kept: a bad certificate refuses the batch.
        self.keys.learn(body.get("keys", []), self._known_device)
        return self.sync.receive(name, batch, time.time()).delivered

    def outgoing(self) -> list[Outgoing]:
        """One batch per (device, conversation) that has something worth sending, and
        the heads of every shared conversation to each device whose offer is due."""
        if self.node.removed:
            return []
        now = time.time()
        out: list[Outgoing] = []
        due = {d for p in self.peers.values() for d in self._devices(p) if self._heads_due(d, now)}
        offered: set[str] = set()
        for peer in self.peers.values():
            for device in self._devices(peer):
                name = f"{device}|{peer}"
                batch = self.sync.poll(name, now)
                if batch is None:
                    continue
                holds = self._holds(name)
                summary = summarize(batch)
                if not worth_sending(summary, holds):
                    if device not in due or not summary.offers:
                        continue
                    offered.add(device)
                body = {
                    "v": BATCH_VERSION,
                    "batch": b64url.encode(batch),
                    "keys": self.keys.certificates(summary.authors),
                }
                out.append(self.node.send_to(device, peer, SYNC_TYPE, body))
        for device in sorted(offered):
            self._heads_offered(device, now)
        return out

    def _session_digest(self, device: str) -> str:
        views = self.node.views.values()
        session = next(v.sessions[device] for v in views if device in v.sessions)
        return session.initial_digest.hex()

    def _heads_due(self, device: str, now: float) -> bool:
        """Whether heads go to ``device`` even if it is known to hold them: its session
        is not the one they last went over (new, or re-opened after a restore), or an
        hour has passed."""
        raw = self._heads.get(device)
        if raw is None and self.vault is not None:
            raw = self.vault.get(HEADS_KIND, device)
        if raw is None:
            return True
        last = json.loads(raw)
        return bool(
            last["session"] != self._session_digest(device) or now - last["at"] >= HEADS_EVERY
        )

    def _heads_offered(self, device: str, now: float) -> None:
        raw = json.dumps({"session": self._session_digest(device), "at": now}).encode()
        self._heads[device] = raw
        if self.vault is not None:
            with self.vault.transaction() as tx:
                tx.put(HEADS_KIND, device, raw)

    def _holds(self, name: str) -> Any:
        def holds(conversation: str, message_id: str) -> bool:
            return bool(self.store.peer_has(conversation, name, [message_id]))

        return holds

    # --- reading -----------------------------------------------------------------------

    def history(self, peer: str) -> list[Message]:
        """The conversation in the order every device computes alike (depth, time, id),
        so that the same messages read the same everywhere; it respects causal order."""
        conv = conversation_id(self.node.owner, peer)
        return self.store.get(conv, self.store.history(conv))

    def history_hash(self, peer: str) -> str:
        return self.store.history_hash(conversation_id(self.node.owner, peer))
